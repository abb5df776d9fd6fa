"""The pairing report a biologist reads: report.md, report.html, pairs_map.png, signature_genes.png.

`transition_reports(result)` turns a `PairingResult` into one `TransitionReport` per transition:
the numbers of controls, targets and pairs, the match-score distribution (median, 10th and 90th
percentiles), the median pair distance in um, the top signature genes up and down (by Delta g of
`result.signatures`, with the mean control and target log-expression) and a verdict. The
verdict is "OK" or "CHECK" with one warning per rule that fires:

- fewer pairs than `config.theta_min` (the same floor Algorithm 1 sets on each state);
- most pairs long-distance: more than LONG_PAIR_SHARE of the pairs are farther apart than
  LONG_DISTANCE_UM (about four 54 um niche tiles: the control and its target do not share a
  neighbourhood, so the pair says little about a local transition);
- low match scores: the median match score is under LOW_MATCH_SCORE, i.e. each control's
  transported mass is spread over more than ~20 about equally good targets, so single pairs
  are close to arbitrary within the candidates (averages such as the signatures still hold);
- weak signature: no gene's |Delta g| reaches WEAK_DELTA_G (natural log, a 1.28-fold change
  of normalised expression): the targets barely differ from their controls.

On the simulator (3,000 cells, defaults) every designed transition is "OK": 209-295 pairs,
median match scores 0.15-0.19, median distances 45-54 um, largest |Delta g| 1.1-1.5; a transition
between two random halves of one state has a top |Delta g| of 0.17, and pairing without the
spatial term puts 66-80% of pairs beyond 200 um (both flagged).

`write_report(result, directory, adata)` writes the four files (each atomically; the map only
when the paired AnnData is given: it draws all its cells). The figures are drawn by
`spatia.pl.pairs` and `spatia.pl.signature_genes`, the notebook functions, so there is one
plotting code path.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spatia.outputs import atomic_output
from spatia.perturb.pairing import PairingResult

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
MAP_FILE = "pairs_map.png"
GENES_FILE = "signature_genes.png"

N_TOP_GENES = 10
LONG_DISTANCE_UM = 200.0
LONG_PAIR_SHARE = 0.5
LOW_MATCH_SCORE = 0.05
WEAK_DELTA_G = 0.25
MAP_SEGMENTS = 60  # control -> target segments drawn per transition (a seeded subsample)
MAX_MAP_SLIDES = 6


@dataclass
class GeneChange:
    """One signature gene: Delta g = mean_tgt - mean_ctrl (mean log-normalised expression over the pairs)."""

    gene: str
    delta_g: float
    mean_ctrl: float
    mean_tgt: float


@dataclass
class TransitionReport:
    """The figures and the verdict of one transition (see the module docstring)."""

    name: str
    task: str
    control: str
    target: str
    lineage: str
    n_ctrl: int  # control cells of the lineage with counts (candidates)
    n_tgt: int  # target cells of the lineage with counts (candidates)
    n_pairs: int
    n_targets_used: int  # distinct targets among the pairs
    match_score_median: float | None
    match_score_p10: float | None
    match_score_p90: float | None
    distance_median_um: float | None
    long_pair_share: float | None  # share of pairs farther apart than LONG_DISTANCE_UM
    up: list[GeneChange]  # largest positive Delta g first
    down: list[GeneChange]  # most negative Delta g first
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.warnings

    def verdict(self) -> str:
        """One line: OK or CHECK, the headline figures, the leading genes, the warnings."""
        if self.n_pairs == 0:
            return f"CHECK: no pairs. {' '.join(self.warnings)}"
        genes = ", ".join(g.gene for g in self.up[:3]) or "none"
        down = ", ".join(g.gene for g in self.down[:3]) or "none"
        head = (f"{self.n_pairs} pairs, median distance {self.distance_median_um:.0f} um, median match score "
                f"{self.match_score_median:.2f}; up in {self.target}: {genes}; down: {down}.")
        return f"OK: {head}" if self.ok else f"CHECK: {head} " + " ".join(self.warnings)


def transition_reports(result: PairingResult, n_genes: int = N_TOP_GENES) -> list[TransitionReport]:
    """One `TransitionReport` per transition of `result`, in the transitions' order."""
    summary = result.summary()
    signatures = result.signatures
    pairs = result.pairs
    out = []
    for t in result.transitions:
        p = pairs[pairs["transition_tag"] == t.name]
        score = p["match_score"].to_numpy(dtype=np.float64)
        distance = p["spatial_distance_um"].to_numpy(dtype=np.float64)
        row = signatures.transitions.index(t.name)
        up, down = top_changes(signatures, t.name, n_genes)
        report = TransitionReport(
            name=t.name, task=t.task, control=t.control, target=t.target, lineage=t.lineage,
            n_ctrl=int(summary[t.name]["n_ctrl"]), n_tgt=int(summary[t.name]["n_tgt"]), n_pairs=len(p),
            n_targets_used=int(p["x_tgt_id"].nunique()),
            match_score_median=_quantile(score, 0.5), match_score_p10=_quantile(score, 0.1),
            match_score_p90=_quantile(score, 0.9), distance_median_um=_quantile(distance, 0.5),
            long_pair_share=float((distance > LONG_DISTANCE_UM).mean()) if len(p) else None,
            up=up, down=down,
        )
        report.warnings = _warnings(report, result.config.theta_min, float(np.abs(signatures.delta[row]).max()))
        out.append(report)
    return out


def top_changes(signatures, transition: str, n: int) -> tuple[list[GeneChange], list[GeneChange]]:
    """The `n` genes with the largest positive Delta g and the `n` with the most negative one
    (a list is shorter when fewer genes change in that direction)."""
    t = signatures.transitions.index(transition)
    delta = signatures.delta[t]

    def change(index: int) -> GeneChange:
        return GeneChange(signatures.genes[index], float(delta[index]), float(signatures.mean_ctrl[t, index]),
                          float(signatures.mean_tgt[t, index]))

    up = [i for i in np.argsort(-delta, kind="stable")[:n] if delta[i] > 0]
    down = [i for i in np.argsort(delta, kind="stable")[:n] if delta[i] < 0]
    return [change(i) for i in up], [change(i) for i in down]


def _quantile(values: np.ndarray, q: float) -> float | None:
    return float(np.quantile(values, q)) if len(values) else None


def _warnings(r: TransitionReport, min_pairs: int, max_abs_delta: float) -> list[str]:
    if r.n_pairs == 0:
        return [f"None of the {r.n_ctrl} controls was paired (see diagnostics.json: unmatched controls, notes)."]
    out = []
    if r.n_pairs < min_pairs:
        out.append(f"Few pairs: {r.n_pairs} < {min_pairs} (theta_min); the signature rests on few cells.")
    if r.long_pair_share is not None and r.long_pair_share > LONG_PAIR_SHARE:
        out.append(f"Mostly long-distance: {r.long_pair_share:.0%} of pairs are over {LONG_DISTANCE_UM:.0f} um apart; "
                   "controls and targets rarely share a neighbourhood (raise --spatial-weight or set "
                   "--max-distance-um).")
    if r.match_score_median is not None and r.match_score_median < LOW_MATCH_SCORE:
        out.append(f"Low match scores: median {r.match_score_median:.3f} < {LOW_MATCH_SCORE}; each control spreads "
                   f"its mass over ~{1 / r.match_score_median:.0f} similar targets, so single pairs are nearly "
                   "arbitrary (the signature, an average, still holds).")
    if max_abs_delta < WEAK_DELTA_G:
        out.append(f"Weak signature: the largest |Delta g| is {max_abs_delta:.2f} < {WEAK_DELTA_G}; targets barely "
                   "differ from their controls in expression.")
    return out


# --- writing ----------------------------------------------------------------------------------


def write_report(result: PairingResult, directory: str | Path, adata=None) -> list[Path]:
    """Write report.md, report.html, signature_genes.png and (given the paired `adata`)
    pairs_map.png into `directory`; each file atomically, never over an existing one."""
    directory = Path(directory)
    reports = transition_reports(result)
    figures: dict[str, str] = {}
    with atomic_output(directory / GENES_FILE) as tmp:
        plot_signature_genes(result, tmp)
    figures[GENES_FILE] = "Top signature genes per transition: Delta g = mean log-expression of the targets - that " \
                          "of their controls over the pairs (red: higher in the target state, blue: higher in the control)."
    if adata is not None:
        with atomic_output(directory / MAP_FILE) as tmp:
            plot_pairs_map(result, adata, tmp)
        figures[MAP_FILE] = f"Pairs over the tissue: all cells in grey, paired controls (circles) and targets " \
                            f"(triangles) coloured by transition, a segment from control to target for up to " \
                            f"{MAP_SEGMENTS} pairs per transition (a control of several transitions shows the last one's colour)."
    written = [directory / name for name in figures]
    with atomic_output(directory / REPORT_MD) as tmp:
        tmp.write_text(render_markdown(result, reports, figures))
    with atomic_output(directory / REPORT_HTML) as tmp:
        tmp.write_text(render_html(result, reports, {directory / name: caption for name, caption in figures.items()}))
    return [directory / REPORT_MD, directory / REPORT_HTML, *written]


def _colours(result: PairingResult) -> dict[str, tuple]:
    from spatia.pl import _palette

    names = [t.name for t in result.transitions]
    return dict(zip(names, _palette(len(names))))


def plot_pairs_map(result: PairingResult, adata, path: str | Path) -> Path:
    """pairs_map.png: `spatia.pl.pairs` over all cells of `adata`, one panel per slide (at most
    MAX_MAP_SLIDES), transitions in the same colours on every panel."""
    from matplotlib.figure import Figure

    from spatia import pl

    pairs = result.pairs
    slide_key = result.config.slide_key
    slides = list(dict.fromkeys(pairs["slide_id"].astype(str))) if slide_key else []
    fig_title = f"{len(pairs)} control -> target pairs of {len(result.transitions)} transitions"
    if len(slides) <= 1 or slide_key not in adata.obs:
        panels = [(adata, pairs, fig_title)]
    else:
        slide_of = adata.obs[slide_key].astype(str).to_numpy()
        panels = [(adata[slide_of == s], pairs[pairs["slide_id"].astype(str) == s], f"slide {s}")
                  for s in slides[:MAX_MAP_SLIDES]]
        if len(slides) > MAX_MAP_SLIDES:
            fig_title += f" (first {MAX_MAP_SLIDES} of {len(slides)} slides)"
    fig = Figure(figsize=(9.5 * min(len(panels), 2), 6.5 * ((len(panels) + 1) // 2)), layout="constrained")
    axes = np.atleast_1d(fig.subplots((len(panels) + 1) // 2, min(len(panels), 2))).ravel()
    colours = _colours(result)
    for ax, (cells, table, title) in zip(axes, panels):
        if len(table) == 0:  # nothing paired: the tissue alone, said in the title
            ax.scatter(*pl._spatial(cells).T, s=pl._point_size(cells.n_obs), c=pl.NOT_EMBEDDED_COLOUR, linewidths=0)
            ax.set_title(f"{title}: no pairs")
            pl._tissue_axes(ax)
            continue
        pl.pairs(table, cells, ax=ax, max_pairs=MAP_SEGMENTS, colours=colours, title=title, seed=result.config.seed)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if len(panels) > 1:
        fig.suptitle(fig_title)
    fig.savefig(path, dpi=110, format="png")
    return Path(path)


def plot_signature_genes(result: PairingResult, path: str | Path, n_genes: int = N_TOP_GENES) -> Path:
    """signature_genes.png: `spatia.pl.signature_genes(direction="both")`, one panel per transition."""
    from matplotlib.figure import Figure

    from spatia import pl

    names = [t.name for t in result.transitions]
    columns = min(len(names), 3)
    rows = (len(names) + columns - 1) // columns
    fig = Figure(figsize=(5.5 * columns, (0.3 * 2 * n_genes + 1.8) * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, name in zip(axes, names):
        pl.signature_genes(result.signatures, name, n=n_genes, ax=ax, direction="both")
    for ax in axes[len(names):]:
        ax.set_axis_off()
    fig.savefig(path, dpi=110, format="png")
    return Path(path)


# --- rendering --------------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _settings(result: PairingResult) -> str:
    c = result.config
    radius = f", max distance {c.max_distance_um:g} um" if c.max_distance_um is not None else ""
    return (f"epsilon {c.epsilon:g}, spatial weight {c.spatial_weight:g} per {c.spatial_scale_um:g} um{radius}, "
            f"{'within niches, ' if c.same_niche else ''}{result.n_pcs_used} PCs, pair noise {c.pair_noise:g}, "
            f"seed {c.seed}")


def _headline(result: PairingResult, reports: list[TransitionReport]) -> str:
    flagged = [r.name for r in reports if not r.ok]
    text = f"{len(result.pairs):,} pairs over {len(reports)} transitions"
    if not flagged:
        return text + "; every transition looks sound."
    return text + f"; {len(flagged)} of {len(reports)} need a check: {', '.join(flagged)}."


SUMMARY_HEADER = ["transition", "task", "control -> target (lineage)", "controls", "targets (used)", "pairs",
                  "match score median [p10, p90]", "median distance (um)", "verdict"]
GENE_HEADER = ["gene", "Delta g", "mean control", "mean target"]


def _summary_row(r: TransitionReport) -> list[str]:
    return [r.name, r.task, f"{r.control} -> {r.target} ({r.lineage})", f"{r.n_ctrl}",
            f"{r.n_tgt} ({r.n_targets_used})", f"{r.n_pairs}",
            f"{_num(r.match_score_median, '.3f')} [{_num(r.match_score_p10, '.3f')}, {_num(r.match_score_p90, '.3f')}]",
            _num(r.distance_median_um, ".1f"), "OK" if r.ok else "CHECK"]


def _gene_rows(genes: list[GeneChange]) -> list[list[str]]:
    return [[g.gene, f"{g.delta_g:+.3f}", f"{g.mean_ctrl:.3f}", f"{g.mean_tgt:.3f}"] for g in genes]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "| " + " | ".join("---" for _ in header) + " |", *(line(r) for r in rows)]


READING_NOTES = [
    ("controls / targets: cells of the control / target state and the transition's lineage with counts "
     "(the candidates); (used): distinct targets among the pairs (several controls may share one)."),
    ("match score: the share of a control's transported mass that goes to its chosen target (P_ij / a_i, in (0, 1]); "
     "1 / score is roughly the number of about equally good targets."),
    "distance: between the centroids of a control and its target, in um.",
    ("Delta g: mean over pairs of (target - control) log-normalised expression (log1p of counts scaled to the "
     "median library size), a natural-log fold change; mean control / target: the two means. The tables list the "
     f"largest changes whatever their size: |Delta g| under {WEAK_DELTA_G} (1.28-fold) is a small change."),
    (f"verdict rules: fewer pairs than theta_min; more than {LONG_PAIR_SHARE:.0%} of pairs over "
     f"{LONG_DISTANCE_UM:.0f} um apart; median match score under {LOW_MATCH_SCORE}; largest |Delta g| under "
     f"{WEAK_DELTA_G} (spatia.perturb.report)."),
]


def render_markdown(result: PairingResult, reports: list[TransitionReport], figures: dict[str, str]) -> str:
    """report.md: headline, summary table, one section per transition, figures, how to read it."""
    lines = ["# Pairing report", "", f"**{_headline(result, reports)}**", "", f"Settings: {_settings(result)}.", "",
             "## Summary", "", *_md_table(SUMMARY_HEADER, [_summary_row(r) for r in reports]), "",
             "## Transitions", ""]
    for r in reports:
        lines += [f"### {r.name}", "", f"{r.task}: {r.control} -> {r.target} ({r.lineage})", "",
                  f"**Verdict: {r.verdict()}**", ""]
        lines += [f"Top genes up in {r.target} (largest Delta g):", ""]
        lines += (_md_table(GENE_HEADER, _gene_rows(r.up)) if r.up else ["(none)"]) + [""]
        lines += [f"Top genes down in {r.target} (most negative Delta g):", ""]
        lines += (_md_table(GENE_HEADER, _gene_rows(r.down)) if r.down else ["(none)"]) + [""]
    lines += ["## Figures", ""]
    for name, caption in figures.items():
        lines += [f"![{name}]({name})", "", caption, ""]
    if MAP_FILE not in figures:
        lines += [f"No {MAP_FILE}: the paired AnnData was not given to write_pairing.", ""]
    lines += ["Solver diagnostics (match scores, distances, controls per target): diagnostics.png, diagnostics.json.",
              "", "## How to read this report", "", *[f"- {note}" for note in READING_NOTES], ""]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(result: PairingResult, reports: list[TransitionReport], figures: dict[Path, str]) -> str:
    """report.html: the same content as report.md with the PNGs embedded (one file to share)."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>SPATIA pairing report</title>",
        ("<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
         "th{background:#f2f2f2}.ok{color:#1e7d32;font-weight:bold}.check{color:#b00020;font-weight:bold}"
         ".note{color:#555;font-size:12px}img{max-width:100%}</style></head><body>"),
        "<h1>Pairing report</h1>",
        f"<p><b>{html.escape(_headline(result, reports))}</b></p>",
        f"<p class='note'>Settings: {html.escape(_settings(result))}.</p>",
        "<h2>Summary</h2>", _html_table(SUMMARY_HEADER, [_summary_row(r) for r in reports]),
        "<h2>Transitions</h2>",
    ]
    for r in reports:
        parts += [f"<h3>{html.escape(r.name)}</h3>",
                  f"<p>{html.escape(f'{r.task}: {r.control} -> {r.target} ({r.lineage})')}</p>",
                  f"<p class='{'ok' if r.ok else 'check'}'>Verdict: {html.escape(r.verdict())}</p>"]
        for label, genes in ((f"Top genes up in {r.target}", r.up), (f"Top genes down in {r.target}", r.down)):
            parts.append(f"<p>{html.escape(label)}:</p>")
            parts.append(_html_table(GENE_HEADER, _gene_rows(genes)) if genes else "<p>(none)</p>")
    parts.append("<h2>Figures</h2>")
    for path, caption in figures.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(Path(path).name)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>How to read this report</h2><ul>"
                 + "".join(f"<li>{html.escape(note)}</li>" for note in READING_NOTES) + "</ul></body></html>")
    return "\n".join(parts)
