"""What `spatia pretrain` prints while it trains: one progress display over the whole run, and
nothing from the libraries.

`TrainingProgress` (a Lightning callback, used instead of Lightning's own bar) shows the run as
one task: optimiser step k of the run's last step (a resumed run starts at its checkpoint's
step), the latest losses (total, then image and gene loss of each level that trains), the
learning rate, the latest validation total, elapsed time and an ETA. On a terminal (or in
Jupyter) it is a live rich display; otherwise (a log file, a pipe, a batch job) it prints one
plain line every `every_n_steps` steps, plus the first and the last step, and never a carriage
return.

`lightning_logs_to(path)` is the context the run trains in: Lightning's own INFO lines (devices
found, "Restoring states") go to the run's `logs/lightning.log` instead of the terminal, its
product tips nowhere; its warnings still reach the user through spatia's logger. The previous logger
settings are put back when the run ends (nothing is changed at import).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from spatia.keys import LEVELS

# loggers Lightning writes its INFO lines to (lightning.pytorch and lightning.fabric carry their own
# StreamHandler when the root logger has none)
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
LIGHTNING_LOG_FILE = "lightning.log"
# at most about this many plain lines per run when the output is not a terminal
MAX_PLAIN_LINES = 100


def plain_line_interval(max_steps: int, log_every_n_steps: int) -> int:
    """Steps between two plain progress lines: the logging interval, or more for long runs so
    that a run prints at most about `MAX_PLAIN_LINES` lines."""
    return max(int(log_every_n_steps), math.ceil(int(max_steps) / MAX_PLAIN_LINES), 1)


def format_duration(seconds: float | None) -> str:
    """0:03:12 (hours:minutes:seconds), "1 day, 2:00:00" for long runs, "-:--:--" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    return str(timedelta(seconds=round(seconds)))


def format_losses(metrics: dict[str, float], prefix: str = "train") -> str:
    """`loss 21.383 · cell img 1.901 gene 0.861 · niche img ...` from logged `<prefix>/...` values
    (levels and kinds that were not logged are left out)."""
    parts = []
    if f"{prefix}/total" in metrics:
        parts.append(f"loss {metrics[f'{prefix}/total']:.3f}")
    for level in LEVELS:
        terms = [f"{short} {metrics[f'{prefix}/{level}/{kind}']:.3f}" for kind, short in (("image", "img"),
                 ("gene", "gene"), ("morphometry", "morph")) if f"{prefix}/{level}/{kind}" in metrics]
        if terms:
            parts.append(f"{level} {' '.join(terms)}")
    return " · ".join(parts)


class _RunProgress(Progress):
    """A rich progress display whose losses line sits under the bar (not squeezed into a column)."""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            losses = task.fields.get("losses", "")
            if losses:
                yield Text(f"  {losses}", style="dim")  # wraps onto a second line on narrow terminals


class TrainingProgress(Callback):
    """One progress display over a training run, for global rank 0.

    Args:
        every_n_steps: steps between two lines when the output is not a terminal
            (`plain_line_interval` gives the default `pretrain` uses).
        description: the display's label (e.g. "pretrain joint").
        console: where to print (default: spatia's stderr console).
        live: force the live bar (True) or plain lines (False); None: live on a terminal or in
            Jupyter, plain lines otherwise.
    """

    def __init__(self, every_n_steps: int = 50, *, description: str = "pretrain", console: Console | None = None,
                 live: bool | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, not {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.description = description
        self._console = console
        self._live_choice = live
        self.start_step: int | None = None  # the step the run started at (a resumed run: the checkpoint's)
        self.total_steps: int | None = None
        self.lines_printed = 0
        self._progress: _RunProgress | None = None
        self._task = None
        self._clock: tuple[float, int] | None = None  # (time, step) after the first step of this process
        self._started_at = 0.0
        self._last_line_step: int | None = None

    # ---------------------------------------------------------------------------------------------
    @property
    def console(self) -> Console:
        if self._console is None:
            from spatia.console import console

            return console
        return self._console

    @property
    def live(self) -> bool:
        if self._live_choice is not None:
            return self._live_choice
        return bool(self.console.is_terminal or self.console.is_jupyter)

    @staticmethod
    def run_total_steps(trainer) -> int:
        """The step the run ends at: max_steps, or fewer when max_epochs ends it earlier."""
        total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else None
        if trainer.max_epochs not in (None, -1):
            try:
                by_epochs = int(trainer.estimated_stepping_batches)
            except (TypeError, ValueError, OverflowError, RuntimeError):  # an unsized loader: max_steps alone
                by_epochs = None
            if by_epochs is not None and (total is None or by_epochs < total):
                total = by_epochs
        return total if total is not None else 0

    def _metrics(self, trainer) -> dict[str, float]:
        out = {}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("train/", "val/")):
                try:
                    out[key] = float(value)
                except (TypeError, ValueError, RuntimeError):  # not a single number
                    continue
        return out

    def _status(self, trainer, step: int) -> tuple[str, str, str]:
        """(losses text, timing text, ETA) at `step` completed steps."""
        metrics = self._metrics(trainer)
        text = format_losses(metrics)
        extra = [f"val {metrics['val/total']:.3f}"] if "val/total" in metrics else []
        extra += [f"lr {metrics['train/lr']:.2e}"] if "train/lr" in metrics else []
        if extra:  # after the total, before the per-level terms (the first to go on a narrow terminal)
            head, sep, rest = text.partition(" · ")
            text = " · ".join([head, *extra, *([rest] if sep else [])])
        eta = None
        if self._clock is not None and step > self._clock[1]:
            seconds_per_step = (time.monotonic() - self._clock[0]) / (step - self._clock[1])
            eta = seconds_per_step * max(self.total_steps - step, 0)
        elapsed = time.monotonic() - self._started_at
        return text, f"{format_duration(elapsed)} elapsed, ETA {format_duration(eta)}", format_duration(eta)

    # ---------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self.start_step = int(trainer.global_step)
        self.total_steps = max(self.run_total_steps(trainer), self.start_step)
        self._started_at = time.monotonic()
        self._clock = None
        self._last_line_step = None
        if self.live:
            self._progress = _RunProgress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(),
                TextColumn("steps"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
                console=self.console, transient=False, refresh_per_second=4, expand=True,
            )
            self._task = self._progress.add_task(self.description, total=self.total_steps,
                                                 completed=self.start_step, losses="", eta=format_duration(None))
            self._progress.start()
        elif self.start_step > 0:
            self._print(f"{self.description}: resuming at step {self.start_step}/{self.total_steps}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero or self.start_step is None:
            return
        step = int(trainer.global_step)  # optimiser steps completed
        if self._clock is None:  # the first step pays for start-up: time from its end on
            self._clock = (time.monotonic(), step)
        if self._progress is not None:
            losses, _, eta = self._status(trainer, step)
            self._progress.update(self._task, completed=step, losses=losses, eta=eta)
        elif step == self.start_step + 1 or step % self.every_n_steps == 0 or step >= self.total_steps:
            self._plain_line(trainer, step)

    def _plain_line(self, trainer, step: int) -> None:
        if step == self._last_line_step:
            return
        losses, timing, _ = self._status(trainer, step)
        width = len(str(self.total_steps))
        self._print(f"{self.description} step {step:>{width}}/{self.total_steps} · {losses} · {timing}")
        self._last_line_step = step

    def _print(self, line: str) -> None:
        # soft_wrap: one physical line however narrow the (non-terminal) console thinks it is
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self.lines_printed += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or self.start_step is None:
            return
        step = int(trainer.global_step)
        if self._progress is not None:
            losses, _, eta = self._status(trainer, step)
            self._progress.update(self._task, completed=step, losses=losses, eta=eta)
        elif step != self._last_line_step and step > self.start_step:
            self._plain_line(trainer, step)
        self._stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# -------------------------------------------------------------------------------------------------
# Lightning's own log lines
# -------------------------------------------------------------------------------------------------


def _no_adverts(record: logging.LogRecord) -> bool:
    """Drops Lightning's product tips ("💡 Tip: ... try installing litlogger/litmodels")."""
    return "Tip:" not in str(record.msg)


class _ToSpatiaLogger(logging.Handler):
    """Passes Lightning's warnings and errors on to spatia's logger (the CLI's console)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("spatia.train").handle(record)


@contextmanager
def lightning_logs_to(log_file: str | Path | None) -> Iterator[None]:
    """For the duration of the block: Lightning's INFO lines (devices, restored checkpoints,
    tips) go to `log_file` (appended; None: nowhere) instead of the terminal, its warnings go to
    spatia's logger. Each Lightning logger's level, handlers and propagation are restored after."""
    file_handler: logging.Handler | None = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8", delay=True)
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        file_handler.addFilter(_no_adverts)
    forward = _ToSpatiaLogger()
    forward.addFilter(_no_adverts)
    saved = []
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, list(logger.handlers), logger.propagate))
        logger.handlers = [h for h in (file_handler, forward) if h is not None]
        logger.propagate = False
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
            logger.setLevel(level)
        if file_handler is not None:
            file_handler.close()
