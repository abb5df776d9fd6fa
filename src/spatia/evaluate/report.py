"""The evaluation report: metrics.json, report.md and a self-contained report.html.

`write_report(results, out_dir)` takes the dict of `spatia.evaluate.evaluate` and writes, into
a new directory (built under a temporary name and renamed when complete):

- ``metrics.json``: every number of the run (per-seed values, mean, std), the config, the
  seeds and the split sizes (everything but the plot arrays), and ``verdicts`` (see
  `spatia.evaluate.verdicts`);
- ``report.md``: a headline per task (best representation; SPATIA against the best baseline,
  the difference and its seed spread; a WARNING line where SPATIA is below a baseline), then the
  tables in Markdown, the best value of each column in bold;
- ``report.html``: the tables and the figures, PNGs embedded as base64 (one file to share);
- ``figures/*.png``: UMAP (or PCA) of each representation coloured by label, spatial maps of labels,
  split and clusters, macro-F1 bars, per-gene Pearson bars of expression from morphology.
"""

from __future__ import annotations

import base64
import html
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from spatia.evaluate.verdicts import headline, row_name, task_verdicts
from spatia.outputs import _jsonable, atomic_output

# (title, header, rows, note); a cell is text, or a metric stat dict ({"mean", "std", ...}) that
# `_cells` formats and compares to bold the best value of its column.
Table = tuple[str, list[str], list[list[Any]], str]


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy -> Python, NaN/inf -> None."""
    value = _jsonable(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metrics_payload(results: dict[str, Any]) -> dict[str, Any]:
    """Everything in `results` except the plot arrays, JSON-safe."""
    return _clean({k: v for k, v in results.items() if k != "plots"})


def _mean(stat: dict[str, Any] | None) -> float | None:
    return None if not stat or stat.get("mean") is None else round(float(stat["mean"]), 4)


def summary_figures(results: dict[str, Any]) -> dict[str, Any]:
    """The headline means of a run as compact plain data (benchmarks, run records).

    {"annotation": {label column: {representation: {"mlp_macro_f1", "logreg_macro_f1"}}},
     "clustering": {label column: {representation: {"leiden_best_ari", "leiden_label_free_ari",
     "kmeans_ari"}}}, "expression" / "patch_expression": {input: {"xgboost_pearson",
     "ridge_pearson"}}, "imputation": {imputer: {"pearson", "pearson_per_gene"}},
     "comparisons": {"annotation:<label column>" / "expression" / "patch_expression": [{"spatia",
     "baseline", "metric", "difference", "interval", "n_test", "resolved"}]}} (the paired
    bootstrap of each verdict, `spatia.evaluate.bootstrap`); tasks that did not run are left out.
    """
    out: dict[str, Any] = {"annotation": {}, "clustering": {}, "comparisons": {}}

    def comparison(key: str, entry: dict[str, Any]) -> None:
        for c in entry.get("comparisons", []):
            out["comparisons"].setdefault(key, []).append(
                {"spatia": c["spatia"], "baseline": c["baseline"], "metric": c["metric"],
                 "difference": round(c["difference"], 4), "interval": [round(v, 4) for v in c["interval"]],
                 "n_test": c["n_test"], "resolved": c["resolved"]})

    by_label = results.get("by_label") or {results["dataset"]["label_column"]: results["tasks"]}
    for column, tasks in by_label.items():
        ann = tasks.get("annotation", {})
        if ann.get("status") == "ok":
            out["annotation"][column] = {k: {"mlp_macro_f1": _mean(v["mlp"]["macro_f1"]),
                                             "logreg_macro_f1": _mean(v["logreg"]["macro_f1"])}
                                         for k, v in ann["results"].items()}
            comparison(f"annotation:{column}", ann)
        clu = tasks.get("clustering", {})
        if clu.get("status") == "ok":
            out["clustering"][column] = {k: {"leiden_best_ari": _mean(v["leiden_best"]["ari"]),
                                             "leiden_label_free_ari": _mean(v["leiden_label_free"]["ari"]),
                                             "kmeans_ari": _mean(v["kmeans"]["ari"])}
                                         for k, v in clu["results"].items()}
    for task in ("expression", "patch_expression"):
        entry = results["tasks"].get(task, {})
        if entry.get("status") == "ok":
            out[task] = {k: {f"{m}_pearson": _mean(v[m]["pearson"]) for m in ("xgboost", "ridge")
                             if v[m].get("status") == "ok"} for k, v in entry["results"].items()}
            comparison(task, entry)
    imp = results["tasks"].get("imputation", {})
    if imp.get("status") == "ok":
        out["imputation"] = {k: {"pearson": _mean(v["pearson"]), "pearson_per_gene": _mean(v["pearson_per_gene"])}
                             for k, v in imp["results"].items() if v.get("status") == "ok"}
    return out


def _fmt(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    if stat.get("deterministic") or stat.get("n_runs", 0) <= 1:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _name(results: dict[str, Any], key: str) -> str:
    return row_name(results, key)


def _cells(rows: list[list[Any]]) -> list[list[tuple[str, bool]]]:
    """(text, bold) of every cell: a stat cell is bold when its mean (at the 3 shown decimals) is the
    highest of its column; text cells are never bold."""
    def value(cell: Any) -> float | None:
        return round(float(cell["mean"]), 3) if isinstance(cell, dict) and cell.get("mean") is not None else None

    n_cols = max((len(r) for r in rows), default=0)
    best = []
    for j in range(n_cols):
        vals = [v for r in rows if j < len(r) and (v := value(r[j])) is not None]
        best.append(max(vals) if len(vals) > 1 else None)
    return [[(_fmt(c) if isinstance(c, dict) or c is None else str(c), best[j] is not None and value(c) == best[j])
             for j, c in enumerate(r)] for r in rows]


BOLD_NOTE = "Bold: the best value of each column."


LEVEL_NOTE = ("Niche and tissue embeddings are shared by all cells of a niche / tissue region: alone they describe "
              "the context, not the cell; 'cell + niche' and 'cell + niche + tissue' put them beside the cell's own "
              "embedding (each block scaled to unit total variance) to show what the context adds.")


LOGREG_NOTE = "Its C, chosen by cross-validated macro-F1 on the train cells"
RIDGE_NOTE = "Ridge penalty chosen by leave-one-out on the train cells"


def _annotation_table(results: dict[str, Any], ann: dict[str, Any], title: str, seeds: str) -> Table:
    if ann.get("status") != "ok":
        return title, ["Status"], [[ann.get("status", "not run")]], ""
    rows = []
    for key, entry in ann["results"].items():
        rows.append([_name(results, key)] + [entry[m][k] for m in ("mlp", "logreg")
                                              for k in ("macro_f1", "precision", "accuracy")])
    note = (f"{ann['n_train']} train / {ann['n_test']} test cells, {len(ann['classes'])} classes; "
            f"mean ± std over seeds {seeds} for the MLP; logistic regression is deterministic (one fit)."
            f"{_chosen_penalties(results, ann, 'logreg', 'C', LOGREG_NOTE)} "
            f"Majority-class accuracy: {ann['chance_accuracy']:.3f}.")
    if ann["excluded_classes"]:
        note += f" Left out (too few train cells): {', '.join(ann['excluded_classes'])}."
    if any("+" in key for key in ann["results"]):
        note += " " + LEVEL_NOTE
    requested = [c for c in ann.get("comparisons", [])
                 if f"{c['spatia']}:{c['baseline']}" in results.get("config", {}).get("compare", ())]
    if requested:
        note += " Requested comparisons (`compare`; MLP macro-F1, 95 % interval over the test cells): " + "; ".join(
            f"{_name(results, c['spatia'])} minus {_name(results, c['baseline'])} {c['difference']:+.3f} "
            f"[{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}]" for c in requested) + "."
    return title, ["Representation", "MLP macro-F1", "MLP precision", "MLP accuracy", "LogReg macro-F1",
                   "LogReg precision", "LogReg accuracy"], rows, note


def _clustering_table(results: dict[str, Any], clu: dict[str, Any], title: str, seeds: str) -> Table:
    if clu.get("status") != "ok":
        return title, ["Status"], [[clu.get("status", "not run")]], ""
    rows = []
    for key, entry in clu["results"].items():
        best, free, km = entry["leiden_best"], entry["leiden_label_free"], entry["kmeans"]
        rows.append([_name(results, key),
                     f"{best['resolution']:g}", best["ari"], best["nmi"],
                     f"{free['resolution']:g}", free["ari"], free["nmi"], km["ari"], km["nmi"]])
    note = (f"{clu['n_cells']} labelled cells, {clu['n_labels']} labels. Best: the resolution with the highest "
            "mean ARI (uses the labels). Label-free: the resolution with the highest mean modularity. "
            f"KMeans with k = {clu['n_labels']}. Mean ± std over seeds {seeds}.")
    return title, ["Representation", "Leiden best res.", "ARI", "NMI", "Label-free res.", "ARI", "NMI",
                   "KMeans ARI", "KMeans NMI"], rows, note


def _chosen_penalties(results: dict, task: dict, model: str, key: str, intro: str) -> str:
    """' <intro>: <representation> <value>, ...' for the penalty each row's `model` chose on the
    train cells (entry[model][key]); empty for results written before it was chosen."""
    chosen = [f"{_name(results, row)} {entry[model][key]:g}" for row, entry in task["results"].items()
              if key in entry.get(model, {})]
    return f" {intro}: {', '.join(chosen)}." if chosen else ""


def _levels_table(results: dict[str, Any]) -> Table | None:
    """Paper Table 4: MLP macro-F1 of each level's representation, one column per label column."""
    from spatia.evaluate.inputs import ABLATION_ORDER

    by_label = results.get("by_label") or {}
    columns = [c for c, entry in by_label.items() if entry.get("annotation", {}).get("status") == "ok"]
    if not columns:
        return None
    present = [k for k in ABLATION_ORDER if all(k in by_label[c]["annotation"]["results"] for c in columns)]
    if len(present) < 2:
        return None
    rows = [[_name(results, k)] + [by_label[c]["annotation"]["results"][k]["mlp"]["macro_f1"] for c in columns]
            for k in present]
    return ("What each level adds (MLP macro-F1)", ["Representation"] + [f"`{c}`" for c in columns], rows,
            "Rows in the order of the paper's Table 4. " + LEVEL_NOTE)


def report_tables(results: dict[str, Any]) -> list[Table]:
    """The report's tables as (title, header, rows, note); shared by Markdown and HTML."""
    tables: list[Table] = []
    tasks = results["tasks"]
    seeds = ", ".join(str(s) for s in results["seeds"])
    by_label = results.get("by_label") or {results["dataset"]["label_column"]: tasks}
    several = len(by_label) > 1
    for column, entry in by_label.items():
        suffix = f" (labels: {column})" if several else ""
        tables.append(_annotation_table(results, entry.get("annotation", {}), "Cell annotation" + suffix, seeds))
    for column, entry in by_label.items():
        suffix = f" (labels: {column})" if several else ""
        tables.append(_clustering_table(results, entry.get("clustering", {}), "Clustering" + suffix, seeds))
    levels = _levels_table(results)
    if levels is not None:
        tables.append(levels)

    exp = tasks.get("expression", {})
    if exp.get("status") == "ok":
        rows = []
        for key, entry in exp["results"].items():
            row = [_name(results, key)]
            for model in ("xgboost", "ridge"):
                m = entry[model]
                row += [m["pearson"], m["spearman"]] if m.get("status") == "ok" else [m["status"], ""]
            rows.append(row)
        detection = results.get("config", {}).get("hvg_min_detection", 0.0)
        note = (f"Top {len(exp['genes'])} highly variable genes (chosen on train cells, among genes detected in at "
                f"least {detection:.0%} of them), target {exp['target']}; "
                f"{exp['n_train']} train / {exp['n_test']} test cells; per-gene correlation on test cells, averaged "
                f"over genes. Both regressors are deterministic (one fit)."
                f"{_chosen_penalties(results, exp, 'ridge', 'alpha', RIDGE_NOTE)}")
        tables.append(("Expression from morphology", ["Input", "XGBoost Pearson", "XGBoost Spearman",
                                                      "Ridge Pearson", "Ridge Spearman"], rows, note))
    else:
        tables.append(("Expression from morphology", ["Status"], [[exp.get("status", "not run")]], ""))

    patch = tasks.get("patch_expression", {})
    if patch.get("status") == "ok":
        rows = []
        for key, entry in patch["results"].items():
            row = [_name(results, key)]
            for model in ("xgboost", "ridge"):
                m = entry[model]
                row += [m["pearson"], m["spearman"]] if m.get("status") == "ok" else [m["status"], ""]
            rows.append(row)
        note = (f"Top {len(patch['genes'])} highly variable genes of the niches' pooled expression (target "
                f"{patch['target']}); {patch['n_train']} train / {patch['n_test']} test niches "
                f"({patch['n_left_out']} with cells on both sides or in the buffer left out; median "
                f"{patch['median_cells_per_niche']:g} cells per niche). Inputs: the mean over the niche's cells of "
                "each image-only embedding, and hand-made features of the niche image.")
        tables.append(("Niche expression from the niche image", ["Input", "XGBoost Pearson", "XGBoost Spearman",
                                                                 "Ridge Pearson", "Ridge Spearman"], rows, note))
    elif "patch_expression" in tasks:
        tables.append(("Niche expression from the niche image", ["Status"], [[patch.get("status", "not run")]], ""))

    imp = tasks.get("imputation", {})
    if imp.get("status") == "ok":
        rows = []
        for key, entry in imp["results"].items():
            label = _name(results, key)
            if entry.get("status") == "ok":
                rows.append([label, entry["pearson"], entry["spearman"], entry["pearson_per_gene"]])
            else:
                rows.append([label, entry["status"], "", ""])
        note = (f"{imp['n_held_out_per_cell']} of {imp['n_genes']} genes held out per test cell, {imp['n_cells']} cells; "
                f"correlation on held-out entries ({imp['scale']}), pooled and per gene; mean ± std over seeds {seeds}.")
        tables.append(("Gene imputation", ["Imputer", "Pearson", "Spearman", "Per-gene Pearson"], rows, note))
    else:
        tables.append(("Gene imputation", ["Status"], [[imp.get("status", "not run")]], ""))
    return tables


def _setup_lines(results: dict[str, Any]) -> list[str]:
    d, s = results["dataset"], results["split"]
    gap = s.get("min_train_test_distance_um")
    lines = [
        f"Cells: {d['n_cells']} ({d['n_labelled']} labelled), genes: {d['n_genes']}, "
        "labels: " + ", ".join(
            f"`{c}` ({v['n_labels']} classes"
            + (f", {v['n_labelled']} labelled cells)" if v.get("n_labelled", d["n_labelled"]) != d["n_labelled"] else ")")
            for c, v in (results.get("labels") or {d["label_column"]: d}).items()) + ".",
        f"Split ({s['source']}): {s['n_train']} train, {s['n_test']} test, {s['n_buffer']} buffer cells"
        + (f"; {s['n_test_blocks']} of {s['n_blocks']} blocks of {s['block_um']:g} um in test, "
           f"buffer {s['buffer_um']:g} um" if s.get("n_blocks") is not None else "")
        + (f"; closest train-test pair {gap:.1f} um." if gap is not None else "."),
        f"Seeds: {', '.join(str(x) for x in results['seeds'])}.",
        "Representations: " + "; ".join(f"{v['name']} ({v['source']}, {v['dim']} dims)" if v["dim"] else
                                        f"{v['name']} ({v['source']})"
                                        for v in results["embeddings"].values()) + ".",
    ]
    if any(k in results.get("embeddings", {}) for k in ("X_spatia_niche", "X_spatia_tissue", "X_spatia_image_niche")):
        lines.append(LEVEL_NOTE)
    if "timings_s" in results:
        lines.append("Time (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()) + ".")
    return lines


def headlines(results: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(headline, warning or None) per task, in the order of the report's tables."""
    return [headline(v) for v in task_verdicts(results).values()]


def _table_note(note: str, cells: list[list[tuple[str, bool]]]) -> str:
    if any(bold for row in cells for _, bold in row):
        return f"{note} {BOLD_NOTE}".strip()
    return note


def render_markdown(results: dict[str, Any]) -> str:
    out = ["# SPATIA evaluation report", ""]
    out += [f"- {line}" for line in _setup_lines(results)] + [""]
    lines = headlines(results)
    if lines:
        out += ["## Headlines", ""]
        for text, warning in lines:
            out.append(f"- {text}")
            if warning:
                out.append(f"  - **{warning}**")
        out.append("")
    for title, header, rows, note in report_tables(results):
        cells = _cells(rows)
        out += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join((f"**{text}**" if bold else text).replace("|", "/") for text, bold in row) + " |"
                for row in cells]
        note = _table_note(note, cells)
        out += ["", note, ""] if note else [""]
    out += ["Metric definitions: docs/evaluate.md of the spatia repository. Full numbers: metrics.json.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------


def _colours(n: int) -> np.ndarray:
    import matplotlib

    base = np.concatenate([matplotlib.colormaps["tab20"](np.arange(20)), matplotlib.colormaps["tab20b"](np.arange(20)),
                           matplotlib.colormaps["tab20c"](np.arange(20))])
    if n <= len(base):
        return base[:n]
    return matplotlib.colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))


LEGEND_MAX_ENTRIES = 20
"""A panel with more categories than this (e.g. Leiden on a niche-level embedding, whose cells
share a vector per niche) names their count in its title instead of listing them."""


def _categorical(ax, xy: np.ndarray, values: np.ndarray, title: str, legend: bool, size: float,
                 axis_labels: tuple[str, str], legend_title: str = "") -> None:
    """Scatter coloured by category, with axis labels and (when `legend`) a legend of every
    category, in several columns when there are many."""
    values = np.asarray(values).astype(str)
    cats = sorted(set(values), key=lambda v: (len(v), v))
    colours = _colours(len(cats))
    lookup = {c: i for i, c in enumerate(cats)}
    idx = np.array([lookup[v] for v in values])
    ax.scatter(xy[:, 0], xy[:, 1], c=colours[idx], s=size, linewidths=0, rasterized=True)
    if legend and len(cats) > LEGEND_MAX_ENTRIES:
        noun = f"{legend_title.lower()}s" if legend_title else "categories"
        title, legend = f"{title} ({len(cats)} {noun})", False
    ax.set_title(textwrap.fill(title, 44), fontsize=9)
    ax.set_xlabel(axis_labels[0], fontsize=7)
    ax.set_ylabel(axis_labels[1], fontsize=7)
    ax.tick_params(labelsize=6)
    if legend:
        handles = [ax.scatter([], [], color=colours[i], s=12, label=c) for i, c in enumerate(cats)]
        ax.legend(handles=handles, title=legend_title or None, title_fontsize=6, fontsize=6, markerscale=1.0,
                  loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _grid(n: int):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.9 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes.ravel()


def make_figures(results: dict[str, Any], fig_dir: Path) -> dict[str, Path]:
    """Write the report's PNGs into fig_dir; returns {caption: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = results.get("plots") or {}
    names = plots.get("names", {})
    figures: dict[str, Path] = {}
    fig_dir.mkdir(parents=True, exist_ok=True)

    def save(fig, file_name: str, caption: str) -> None:
        path = fig_dir / file_name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures[caption] = path

    labels = plots.get("labels")
    if plots.get("layout"):
        rows, kind = plots["layout_rows"], plots.get("layout_name", "UMAP")
        fig, axes = _grid(len(plots["layout"]))
        for i, (key, xy) in enumerate(plots["layout"].items()):
            _categorical(axes[i], xy, labels[rows], f"{kind}: {names.get(key, key)}",
                         legend=(i == len(plots["layout"]) - 1), size=3, axis_labels=(f"{kind} 1", f"{kind} 2"),
                         legend_title="Label (all panels)")
        save(fig, f"{kind.lower()}.png", f"{kind} of each representation, coloured by label")

    spatial = plots.get("spatial")
    if spatial is not None:
        panels = [("Labels", np.arange(len(labels)), labels), ("Split", np.arange(len(labels)), plots["split"])]
        for key, clusters in (plots.get("clusters") or {}).items():
            panels.append((f"Leiden (label-free res.): {names.get(key, key)}", plots["clusters_rows"], clusters))
        fig, axes = _grid(len(panels))
        for ax, (title, rows, values) in zip(axes, panels, strict=False):
            ok = np.array([v is not None for v in values])
            xy = spatial[rows][ok] * np.array([1.0, -1.0])  # y down, as in the image
            _categorical(ax, xy, np.asarray(values, dtype=object)[ok], title, legend=True, size=1.5,
                         axis_labels=("x (um)", "y (um, down as in the image)"),
                         legend_title={"Labels": "Label", "Split": "Split"}.get(title, "Cluster"))
            ax.set_aspect("equal")
        save(fig, "spatial.png", "Spatial maps: labels, split, and clusters of each representation")

    ann = results["tasks"].get("annotation", {})
    if ann.get("status") == "ok":
        keys = list(ann["results"])
        fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(keys)), 3.6), layout="constrained")
        pos = np.arange(len(keys))
        for offset, model, label in ((-0.2, "mlp", "MLP"), (0.2, "logreg", "LogReg")):
            means = [ann["results"][k][model]["macro_f1"]["mean"] or 0.0 for k in keys]
            stds = [ann["results"][k][model]["macro_f1"]["std"] or 0.0 for k in keys]
            ax.bar(pos + offset, means, width=0.4, yerr=stds, label=label, capsize=2)
        ax.set_xticks(pos, [names.get(k, k) for k in keys], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("macro-F1 (test)")
        ax.set_xlabel("Representation", fontsize=8)
        ax.legend(title="Classifier", fontsize=7, title_fontsize=7)
        save(fig, "annotation_f1.png", "Cell annotation: macro-F1 per representation")

    exp = results["tasks"].get("expression", {})
    if exp.get("status") == "ok":
        genes = exp["genes"]
        fig, axes = plt.subplots(len(exp["results"]), 1, figsize=(max(8.0, 0.18 * len(genes)), 2.8 * len(exp["results"])),
                                 squeeze=False, layout="constrained")
        for ax, (key, entry) in zip(axes[:, 0], exp["results"].items(), strict=True):
            models = [m for m in ("xgboost", "ridge") if entry[m].get("status") == "ok"]
            ref = np.array([np.nan if v is None else v for v in entry[models[0]]["per_gene_pearson"]])
            order = np.argsort(-np.nan_to_num(ref, nan=-2.0))
            pos = np.arange(len(genes))
            width = 0.8 / len(models)
            for i, m in enumerate(models):
                vals = np.array([np.nan if v is None else v for v in entry[m]["per_gene_pearson"]])[order]
                ax.bar(pos + (i - (len(models) - 1) / 2) * width, np.nan_to_num(vals), width=width, label=m)
            ax.set_xticks(pos, np.asarray(genes)[order], rotation=90, fontsize=6)
            ax.set_ylabel("Pearson r (test)")
            ax.set_xlabel(f"Gene (sorted by {models[0]} Pearson)", fontsize=7)
            ax.set_title(f"Per-gene Pearson from {names.get(key, key)}", fontsize=9)
            ax.axhline(0, color="k", lw=0.5)
            ax.legend(title="Regressor", fontsize=7, title_fontsize=7)
        save(fig, "per_gene_pearson.png", "Expression from morphology: per-gene Pearson on test cells")
    return figures


def _html_table(header: list[str], cells: list[list[tuple[str, bool]]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td><b>{html.escape(c)}</b></td>" if bold else f"<td>{html.escape(c)}</td>"
                                    for c, bold in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(results: dict[str, Any], figures: dict[str, Path]) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>SPATIA evaluation report</title>",
        ("<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:0.5em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 8px;"
         "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#eee}"
         ".note{color:#555;font-size:12px}img{max-width:100%}.warning{color:#b00020;font-weight:bold;margin:0.2em 0}"
         "</style></head><body>"),
        "<h1>SPATIA evaluation report</h1><ul>",
    ]
    parts += [f"<li>{html.escape(line).replace('`', '')}</li>" for line in _setup_lines(results)]
    parts.append("</ul>")
    lines = headlines(results)
    if lines:
        parts.append("<h2>Headlines</h2><ul>")
        for text, warning in lines:
            parts.append(f"<li>{html.escape(text).replace('`', '')}")
            if warning:
                parts.append(f"<p class='warning'>{html.escape(warning).replace('`', '')}</p>")
            parts.append("</li>")
        parts.append("</ul>")
    for title, header, rows, note in report_tables(results):
        cells = _cells(rows)
        note = _table_note(note, cells)
        parts.append(f"<h2>{html.escape(title)}</h2>{_html_table(header, cells)}")
        if note:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("<h2>Figures</h2>")
    for caption, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(metrics_payload(results)["config"], indent=2))
                 + "</pre></body></html>")
    return "".join(parts)


def write_report(results: dict[str, Any], out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write metrics.json, report.md, report.html and figures/ into a new directory out_dir.

    Refuses an existing out_dir unless overwrite is set; the directory appears only when
    complete.
    """
    out_dir = Path(out_dir)
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        payload = metrics_payload(results)
        payload["verdicts"] = _clean(task_verdicts(results))
        (tmp / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(results))
        figures = make_figures(results, tmp / "figures")
        (tmp / "report.html").write_text(render_html(results, figures))
    return out_dir
