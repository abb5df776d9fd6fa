"""The evaluation report: metrics.json, report.md and a self-contained report.html.

`write_report(results, out_dir)` takes the dict of `spatia.evaluate.evaluate` and writes, into
a new directory (built under a temporary name and renamed when complete):

- ``metrics.json``: every number of the run (per-seed values, mean, std), the config, the
  seeds and the split sizes (everything but the plot arrays);
- ``report.md``: the same tables in Markdown;
- ``report.html``: the tables and the figures, PNGs embedded as base64 (one file to share);
- ``figures/*.png``: UMAP (or PCA) of each representation coloured by label, spatial maps of labels,
  split and clusters, macro-F1 bars, per-gene Pearson bars of expression from morphology.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from spatia.outputs import _jsonable, atomic_output

Table = tuple[str, list[str], list[list[str]], str]


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


def _fmt(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    if stat.get("deterministic") or stat.get("n_runs", 0) <= 1:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _name(results: dict[str, Any], key: str) -> str:
    return results.get("embeddings", {}).get(key, {}).get("name", key)


def report_tables(results: dict[str, Any]) -> list[Table]:
    """The report's tables as (title, header, rows, note); shared by Markdown and HTML."""
    tables: list[Table] = []
    tasks = results["tasks"]
    seeds = ", ".join(str(s) for s in results["seeds"])

    ann = tasks.get("annotation", {})
    if ann.get("status") == "ok":
        rows = []
        for key, entry in ann["results"].items():
            rows.append([_name(results, key)] + [_fmt(entry[m][k]) for m in ("mlp", "logreg")
                                                  for k in ("macro_f1", "precision", "accuracy")])
        note = (f"{ann['n_train']} train / {ann['n_test']} test cells, {len(ann['classes'])} classes; "
                f"mean ± std over seeds {seeds} for the MLP; logistic regression is deterministic (one fit). "
                f"Majority-class accuracy: {ann['chance_accuracy']:.3f}.")
        if ann["excluded_classes"]:
            note += f" Left out (too few train cells): {', '.join(ann['excluded_classes'])}."
        tables.append(("Cell annotation", ["Representation", "MLP macro-F1", "MLP precision", "MLP accuracy",
                                           "LogReg macro-F1", "LogReg precision", "LogReg accuracy"], rows, note))
    else:
        tables.append(("Cell annotation", ["Status"], [[ann.get("status", "not run")]], ""))

    clu = tasks.get("clustering", {})
    if clu.get("status") == "ok":
        rows = []
        for key, entry in clu["results"].items():
            best, free, km = entry["leiden_best"], entry["leiden_label_free"], entry["kmeans"]
            rows.append([_name(results, key),
                         f"{best['resolution']:g}", _fmt(best["ari"]), _fmt(best["nmi"]),
                         f"{free['resolution']:g}", _fmt(free["ari"]), _fmt(free["nmi"]),
                         _fmt(km["ari"]), _fmt(km["nmi"])])
        note = (f"{clu['n_cells']} labelled cells, {clu['n_labels']} labels. Best: the resolution with the highest "
                "mean ARI (uses the labels). Label-free: the resolution with the highest mean modularity. "
                f"KMeans with k = {clu['n_labels']}. Mean ± std over seeds {seeds}.")
        tables.append(("Clustering", ["Representation", "Leiden best res.", "ARI", "NMI", "Label-free res.", "ARI",
                                      "NMI", "KMeans ARI", "KMeans NMI"], rows, note))
    else:
        tables.append(("Clustering", ["Status"], [[clu.get("status", "not run")]], ""))

    exp = tasks.get("expression", {})
    if exp.get("status") == "ok":
        rows = []
        for key, entry in exp["results"].items():
            row = [_name(results, key)]
            for model in ("xgboost", "ridge"):
                m = entry[model]
                row += [_fmt(m["pearson"]), _fmt(m["spearman"])] if m.get("status") == "ok" else [m["status"], ""]
            rows.append(row)
        detection = results.get("config", {}).get("hvg_min_detection", 0.0)
        note = (f"Top {len(exp['genes'])} highly variable genes (chosen on train cells, among genes detected in at "
                f"least {detection:.0%} of them), target {exp['target']}; "
                f"{exp['n_train']} train / {exp['n_test']} test cells; per-gene correlation on test cells, averaged "
                "over genes. Both regressors are deterministic (one fit).")
        tables.append(("Expression from morphology", ["Input", "XGBoost Pearson", "XGBoost Spearman",
                                                      "Ridge Pearson", "Ridge Spearman"], rows, note))
    else:
        tables.append(("Expression from morphology", ["Status"], [[exp.get("status", "not run")]], ""))

    imp = tasks.get("imputation", {})
    if imp.get("status") == "ok":
        rows = []
        for key, entry in imp["results"].items():
            label = {"model": "SPATIA gene decoder", "gene_mean": "Train mean profile",
                     "knn_expression": "kNN on visible expression"}.get(key, key)
            if key.startswith("knn_X") or key == "knn_morphology":
                label = f"kNN on {_name(results, key[4:])}"
            if entry.get("status") == "ok":
                rows.append([label, _fmt(entry["pearson"]), _fmt(entry["spearman"]), _fmt(entry["pearson_per_gene"])])
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
        f"labels: `{d['label_column']}` ({d['n_labels']} classes).",
        f"Split ({s['source']}): {s['n_train']} train, {s['n_test']} test, {s['n_buffer']} buffer cells"
        + (f"; {s['n_test_blocks']} of {s['n_blocks']} blocks of {s['block_um']:g} um in test, "
           f"buffer {s['buffer_um']:g} um" if s.get("n_blocks") is not None else "")
        + (f"; closest train-test pair {gap:.1f} um." if gap is not None else "."),
        f"Seeds: {', '.join(str(x) for x in results['seeds'])}.",
        "Representations: " + "; ".join(f"{v['name']} ({v['source']}, {v['dim']} dims)"
                                        for v in results["embeddings"].values()) + ".",
    ]
    if "timings_s" in results:
        lines.append("Time (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()) + ".")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    out = ["# SPATIA evaluation report", ""]
    out += [f"- {line}" for line in _setup_lines(results)] + [""]
    for title, header, rows, note in report_tables(results):
        out += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
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


def _categorical(ax, xy: np.ndarray, values: np.ndarray, title: str, legend: bool, size: float) -> None:
    values = np.asarray(values).astype(str)
    cats = sorted(set(values), key=lambda v: (len(v), v))
    colours = _colours(len(cats))
    lookup = {c: i for i, c in enumerate(cats)}
    idx = np.array([lookup[v] for v in values])
    ax.scatter(xy[:, 0], xy[:, 1], c=colours[idx], s=size, linewidths=0, rasterized=True)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend and len(cats) <= 20:
        handles = [ax.scatter([], [], color=colours[i], s=12, label=c) for i, c in enumerate(cats)]
        ax.legend(handles=handles, fontsize=6, markerscale=1.0, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _grid(n: int):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
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
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures[caption] = path

    labels = plots.get("labels")
    if plots.get("layout"):
        rows, kind = plots["layout_rows"], plots.get("layout_name", "UMAP")
        fig, axes = _grid(len(plots["layout"]))
        for i, (key, xy) in enumerate(plots["layout"].items()):
            _categorical(axes[i], xy, labels[rows], f"{kind}: {names.get(key, key)}",
                         legend=(i == len(plots["layout"]) - 1), size=3)
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
            _categorical(ax, xy, np.asarray(values, dtype=object)[ok], title, legend=(title == "Split"), size=1.5)
            ax.set_aspect("equal")
        save(fig, "spatial.png", "Spatial maps: labels, split, and clusters of each representation")

    ann = results["tasks"].get("annotation", {})
    if ann.get("status") == "ok":
        keys = list(ann["results"])
        fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(keys)), 3.6))
        pos = np.arange(len(keys))
        for offset, model, label in ((-0.2, "mlp", "MLP"), (0.2, "logreg", "LogReg")):
            means = [ann["results"][k][model]["macro_f1"]["mean"] or 0.0 for k in keys]
            stds = [ann["results"][k][model]["macro_f1"]["std"] or 0.0 for k in keys]
            ax.bar(pos + offset, means, width=0.4, yerr=stds, label=label, capsize=2)
        ax.set_xticks(pos, [names.get(k, k) for k in keys], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("macro-F1 (test)")
        ax.legend(fontsize=7)
        save(fig, "annotation_f1.png", "Cell annotation: macro-F1 per representation")

    exp = results["tasks"].get("expression", {})
    if exp.get("status") == "ok":
        genes = exp["genes"]
        fig, axes = plt.subplots(len(exp["results"]), 1, figsize=(max(8.0, 0.18 * len(genes)), 2.8 * len(exp["results"])),
                                 squeeze=False)
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
            ax.set_ylabel("Pearson r")
            ax.set_title(f"Per-gene Pearson from {names.get(key, key)}", fontsize=9)
            ax.axhline(0, color="k", lw=0.5)
            ax.legend(fontsize=7)
        save(fig, "per_gene_pearson.png", "Expression from morphology: per-gene Pearson on test cells")
    return figures


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(results: dict[str, Any], figures: dict[str, Path]) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>SPATIA evaluation report</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#eee}"
        ".note{color:#555;font-size:12px}img{max-width:100%}</style></head><body>",
        "<h1>SPATIA evaluation report</h1><ul>",
    ]
    parts += [f"<li>{html.escape(line).replace('`', '')}</li>" for line in _setup_lines(results)]
    parts.append("</ul>")
    for title, header, rows, note in report_tables(results):
        parts.append(f"<h2>{html.escape(title)}</h2>{_html_table(header, rows)}")
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
        (tmp / "metrics.json").write_text(json.dumps(metrics_payload(results), indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(results))
        figures = make_figures(results, tmp / "figures")
        (tmp / "report.html").write_text(render_html(results, figures))
    return out_dir
