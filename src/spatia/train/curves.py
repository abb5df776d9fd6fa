"""The loss curve of a pretraining run: `logs/loss_curve.png`, beside `logs/metrics.csv`.

`LossHistory` (a Lightning callback) records every training step's losses (`train/total` and
`train/<level>/<image|gene>`, the values the module logs, whatever the CSV logging interval) and
every validation's (`val/...`). The history is part of the callback's checkpoint state, so a
resumed run's curve holds the steps before the interruption too. The plot is rewritten (under a
temporary name, then renamed) at every checkpoint and when training ends, so even a 5-step run,
whose `metrics.csv` may hold no row yet, gets one.

Steps follow `metrics.csv`: the row of step s holds the losses of the (s+1)-th optimiser step,
and a validation run after N steps is logged at step N - 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from spatia.keys import LEVELS
from spatia.outputs import atomic_output

LOSS_CURVE_FILE = "loss_curve.png"
MAX_POINTS = 2000  # points per plotted train line; longer runs are shown as means of k steps
KINDS = ("image", "gene", "morphometry")  # morphometry: the cell level only, when its weight > 0
STEP_LABEL = "step (metrics.csv's step column)"
LEVEL_COLOURS = {"cell": "tab:blue", "niche": "tab:orange", "tissue": "tab:green"}


def loss_keys(prefix: str) -> tuple[str, ...]:
    """`<prefix>/total` and `<prefix>/<level>/<kind>` for every level and kind (morphometry: cell only)."""
    return (f"{prefix}/total", *(f"{prefix}/{level}/{kind}" for level in LEVELS for kind in KINDS
                                  if kind != "morphometry" or level == "cell"))


LOSS_KEYS = (*loss_keys("train"), *loss_keys("val"))

Series = dict[str, tuple[list[int], list[float]]]


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred mean over `window` values (fewer at the ends, where the window is cut)."""
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    half, n = window // 2, len(values)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i - half + window)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def binned(points: list[tuple[int, float]], max_points: int) -> tuple[list[tuple[int, float]], int]:
    """At most `max_points` points: means over runs of k consecutive points (at the run's last
    step), k the smallest that fits; (points, k). Short series come back unchanged (k = 1)."""
    k = max(1, math.ceil(len(points) / max_points))
    if k == 1:
        return points, 1
    out = []
    for start in range(0, len(points), k):
        chunk = points[start:start + k]
        out.append((chunk[-1][0], sum(v for _, v in chunk) / len(chunk)))
    return out, k


def plot_loss_curve(series: Series, path: str | Path, *, title: str) -> dict[str, int]:
    """Write a PNG of the losses (left: total; right: each level's image and gene term; lines for
    training, markers for validation) to `path`, atomically, with matplotlib's Agg canvas.

    A train series longer than `MAX_POINTS` is drawn as means of k consecutive steps (the legend
    says k). Returns the number of points plotted per series (non-finite values are left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    finite = {key: [(s, v) for s, v in zip(*series.get(key, ([], []))) if math.isfinite(v)] for key in LOSS_KEYS}
    # long runs: train lines of bin means (a 25,000-point line per term takes seconds to draw)
    bin_size = 1
    for key in loss_keys("train"):
        finite[key], k = binned(finite[key], MAX_POINTS)
        bin_size = max(bin_size, k)
    counts = {key: len(points) for key, points in finite.items() if points}
    per = "per step" if bin_size == 1 else f"mean of {bin_size} steps"

    figure = Figure(figsize=(13, 4.5))
    FigureCanvasAgg(figure)
    # fixed margins (the legend of the terms on the right): a layout engine would draw twice
    margins = {"left": 0.055, "right": 0.8, "bottom": 0.11, "top": 0.86, "wspace": 0.2}
    total_axes, terms_axes = figure.subplots(1, 2, gridspec_kw=margins)

    def few(points: list) -> bool:  # markers make short runs visible
        return len(points) <= 60

    train = finite["train/total"]
    if train:
        steps, values = zip(*train)
        total_axes.plot(steps, values, color="tab:gray", alpha=0.5 if len(train) > 60 else 1.0, linewidth=1,
                        marker="o" if few(train) else None, markersize=3, label=f"train ({per})")
        window = max(1, len(values) // 25)
        if window > 1:
            total_axes.plot(steps, moving_average(list(values), window), color="black", linewidth=1.8,
                            label=f"train (centred mean of {window} points)")
    val = finite["val/total"]
    if val:
        steps, values = zip(*val)
        total_axes.plot(steps, values, color="tab:red", marker="s", markersize=5, linewidth=1, label="validation")
    total_axes.set(title="total loss", xlabel=STEP_LABEL, ylabel="loss (weighted sum of the terms)")

    terms_note = f"train: {per}"  # replaced below when the lines are smoothed
    for level in LEVELS:
        for kind, style in zip(KINDS, ("-", "--", ":")):
            colour = LEVEL_COLOURS[level]
            points = finite.get(f"train/{level}/{kind}", [])
            if points:
                steps, values = zip(*points)
                window = max(1, len(values) // 25)  # the terms are noisy per step: centred means
                if window > 1:
                    terms_note = (f"train: centred means of {window} steps" if bin_size == 1 else
                                  f"train: centred means of {window} points of {bin_size} steps")
                terms_axes.plot(steps, moving_average(list(values), window), color=colour, linestyle=style,
                                linewidth=1.2, marker="o" if few(points) else None, markersize=2.5,
                                label=f"{level} {kind} (train)")
            points = finite.get(f"val/{level}/{kind}", [])
            if points:
                steps, values = zip(*points)
                terms_axes.plot(steps, values, color=colour, linestyle="none",
                                marker="s" if kind == "image" else "D", markersize=5,
                                markerfacecolor="white" if kind == "gene" else colour,
                                label=f"{level} {kind} (val)")
    terms_axes.set(title=f"loss terms per level ({terms_note})", xlabel=STEP_LABEL, ylabel="loss (unweighted)")
    for axes in (total_axes, terms_axes):
        axes.grid(alpha=0.3)
        low, high = axes.dataLim.intervaly
        if axes.has_data() and low > 0 and high / low > 20:  # early losses would flatten the rest
            axes.set_yscale("log")
        if axes.get_legend_handles_labels()[0]:
            if axes is terms_axes:  # twelve entries: beside the plot, not over the lines
                axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
            else:
                axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "no losses recorded yet", ha="center", va="center", transform=axes.transAxes)
    figure.suptitle(title)

    with atomic_output(path, overwrite=True) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return counts


class LossHistory(Callback):
    """Records the run's losses at every step and validation and writes `loss_curve.png` at
    every checkpoint and at the end (global rank 0 writes).

    Args:
        path: the PNG to write (`OUT/logs/loss_curve.png`).
        title: the figure's title (the run and its stage).
    """

    def __init__(self, path: str | Path, *, title: str = "SPATIA pretraining"):
        self.path = Path(path)
        self.title = title
        self.series: Series = {key: ([], []) for key in LOSS_KEYS}
        self.plotted: dict[str, int] = {}  # points per series in the last PNG written
        self._written_at: tuple[int, int] | None = None

    def _record(self, trainer, prefix: str, step: int) -> None:
        metrics = trainer.callback_metrics
        for key in loss_keys(prefix):
            if key in metrics:
                steps, values = self.series[key]
                if steps and steps[-1] == step:  # one value per step
                    continue
                steps.append(int(step))
                values.append(float(metrics[key]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, "train", int(trainer.global_step) - 1)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, "val", int(trainer.global_step) - 1)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer)

    def write(self, trainer) -> None:
        """Rewrite the PNG (rank zero), unless nothing was recorded since the last one."""
        if not trainer.is_global_zero:
            return
        stamp = (int(trainer.global_step), sum(len(steps) for steps, _ in self.series.values()))
        if stamp == self._written_at:
            return
        self.plotted = plot_loss_curve(self.series, self.path, title=self.title)
        self._written_at = stamp

    # ---- checkpoint state: tensors only (loadable with torch.load(weights_only=True)); float32 holds
    # the logged float32 values exactly
    def state_dict(self) -> dict:
        return {key: {"step": torch.tensor(steps, dtype=torch.int64), "value": torch.tensor(values, dtype=torch.float32)}
                for key, (steps, values) in self.series.items() if steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.series = {key: ([], []) for key in LOSS_KEYS}
        for key, entry in state_dict.items():
            if key in self.series:
                self.series[key] = (entry["step"].tolist(), entry["value"].tolist())
