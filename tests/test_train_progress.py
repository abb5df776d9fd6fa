"""What `spatia pretrain` shows: one progress display over the whole run (resumed runs start at
their step), no library noise, and a loss-curve PNG beside metrics.csv."""

from __future__ import annotations

import io
import logging
import re

import pandas as pd
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from helpers import Interrupted, stop_at_step
from spatia.cli import app
from spatia.mist import BuildConfig, build_dataset
from spatia.sim import SimulationConfig, simulate_bundle
from spatia.train import pretrain, read_checkpoint
from spatia.train.curves import LOSS_KEYS, moving_average, plot_loss_curve
from spatia.train.progress import (
    LIGHTNING_LOGGERS,
    TrainingProgress,
    format_duration,
    format_losses,
    plain_line_interval,
)

NOISE = ("v_num", "Total FLOPs", "FLOPs", "Tip", "litlogger", "weights_only", "Epoch 0/-", "GPU available",
         "Trainable params", "Restoring states")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = {"cells_per_tissue": 8, "val_batches": 1, "val_every_n_steps": 3, "checkpoint_every_n_steps": 3}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small simulated section (1,500 cells: one training batch per epoch, a val split)."""
    root = tmp_path_factory.mktemp("progress")
    simulate_bundle(root / "bundle", SimulationConfig(n_cells=1500), seed=0)
    build_dataset([root / "bundle"], root / "mist", BuildConfig.cpu(), seed=0)
    return root / "mist"


def _lightning_logger_state():
    return [(logging.getLogger(n).level, list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
            for n in LIGHTNING_LOGGERS]


def _step_lines(text: str) -> list[tuple[int, int]]:
    return [(int(k), int(n)) for k, n in re.findall(r"step +(\d+)/(\d+) ·", text)]


def test_pretrain_cli_prints_one_run_long_progress_and_no_library_noise(dataset, tmp_path, capfd):
    before = _lightning_logger_state()
    run = tmp_path / "run"
    steps, log_every = 7, 2
    args = ["pretrain", str(dataset), "-o", str(run), "--max-steps", str(steps), "--log-every", str(log_every),
            "--cells-per-tissue", "8", "--val-batches", "1", "--val-every", "3", "--checkpoint-every", "3",
            "--threads", "1"]
    result = CliRunner().invoke(app, args)
    captured = capfd.readouterr()
    text = result.output + captured.out + captured.err
    assert result.exit_code == 0, text
    for noise in NOISE:
        assert noise not in text, (noise, text)
    assert "\r" not in text  # not a terminal: plain lines, no carriage-return redraws
    lines = _step_lines(text)
    assert lines[-1] == (steps, steps)  # ends at step 7 of 7, one run-long count (not per epoch)
    assert all(total == steps for _, total in lines) and [k for k, _ in lines] == sorted({k for k, _ in lines})
    interval = plain_line_interval(steps, log_every)
    assert len(lines) <= steps // interval + 2  # every `interval` steps, the first and the last
    # besides spatia's own INFO records (which wrap onto indented lines): the progress lines and the
    # result (which the console wraps onto up to 3 lines)
    others = [line for line in text.splitlines() if line.strip() and not line.startswith(("INFO", " "))]
    assert len(others) <= steps // interval + 2 + 3, "\n".join(others)
    assert _lightning_logger_state() == before  # Lightning's loggers are left as they were
    assert "GPU available" in (run / "logs" / "lightning.log").read_text()  # kept, off the terminal

    # the loss curve beside metrics.csv: a valid PNG of every step's losses and every validation
    png = run / "logs" / "loss_curve.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as image:
        image.verify()
    history = read_checkpoint(run / "checkpoints" / "last.ckpt")["callbacks"]["LossHistory"]
    assert history["train/total"]["step"].tolist() == list(range(steps))
    assert history["val/total"]["step"].tolist() == [2, 5]  # validated after steps 3 and 6
    assert {k for k in history} == set(LOSS_KEYS)  # joint: total + six terms, train and val
    metrics = pd.read_csv(run / "logs" / "metrics.csv", float_precision="round_trip")
    for prefix in ("train", "val"):  # the plotted values are the logged ones, at the logged steps
        rows = metrics[metrics[f"{prefix}/total"].notna()]
        assert len(rows) > 0
        plotted = dict(zip(history[f"{prefix}/total"]["step"].tolist(), history[f"{prefix}/total"]["value"].tolist()))
        for step, value in zip(rows["step"], rows[f"{prefix}/total"]):
            assert plotted[int(step)] == value
    series = {k: (v["step"].tolist(), v["value"].tolist()) for k, v in history.items()}
    counts = plot_loss_curve(series, tmp_path / "again.png", title="t")
    assert counts["train/total"] == steps and counts["val/total"] == 2 and counts["train/tissue/gene"] == steps




def test_resumed_run_starts_at_its_step_and_keeps_its_curve(dataset, tmp_path, capfd):
    run = tmp_path / "run"
    overrides = dict(FAST, max_steps=6, log_every_n_steps=1, checkpoint_every_n_steps=1)
    before = _lightning_logger_state()
    with pytest.raises(Interrupted):
        pretrain(dataset, run, train_overrides=overrides, threads=1, progress_bar=False, callbacks=[stop_at_step(4)])
    assert _lightning_logger_state() == before  # restored after a failed run too
    assert not _step_lines(capfd.readouterr().err)  # progress_bar=False prints no progress
    # a 5-step-or-shorter run already has its plot, though metrics.csv may hold few rows
    assert (run / "logs" / "loss_curve.png").read_bytes()[:8] == PNG_SIGNATURE

    live_output = io.StringIO()
    live = TrainingProgress(description="live", live=True,
                            console=Console(file=live_output, force_terminal=True, width=120))
    result = pretrain(dataset, run, resume=run / "checkpoints" / "last.ckpt", threads=1, callbacks=[live])
    assert result.global_step == 6
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert "resuming at step 4/6" in text
    assert [k for k, _ in _step_lines(text)] == [5, 6]  # the plain lines continue from the resumed step
    assert live.start_step == 4 and live.total_steps == 6
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", live_output.getvalue())
    counts = re.findall(r"(\d+)/6 steps", frames)
    assert counts[0] == "4" and counts[-1] == "6" and "0/6" not in counts  # the bar starts at step 4
    history = read_checkpoint(result.last_checkpoint)["callbacks"]["LossHistory"]
    assert history["train/total"]["step"].tolist() == list(range(6))  # steps before the interruption kept


def test_plain_line_interval_and_formats():
    assert plain_line_interval(2000, 10) == 20  # at most ~100 lines
    assert plain_line_interval(5, 10) == 10 and plain_line_interval(100, 1) == 1
    assert format_duration(None) == "-:--:--" and format_duration(3725.4) == "1:02:05"
    text = format_losses({"train/total": 21.3834, "train/cell/image": 1.9, "train/cell/gene": 0.86,
                          "train/niche/gene": 3.2})
    assert text == "loss 21.383 · cell img 1.900 gene 0.860 · niche gene 3.200"
    assert moving_average([1.0, 3.0, 5.0, 7.0, 9.0], 3) == [2.0, 3.0, 5.0, 7.0, 8.0]
