"""Progress a log file can show (issue 19): plain lines instead of a progress bar that only draws
on a terminal.

Under nohup, CI or a cluster job, stdout is a file and Lightning's bar would write carriage-return
junk into it, or nothing for minutes. So ``fit`` (wired in ``cli.py``) turns the bar off when
stdout is not a terminal and :class:`PlainProgress` prints one line every ``--progress_every``
seconds instead (after ``saetrain: ``, like every line saetrain prints)::

    step 120/540 | 245,760 tokens | 1,912 tokens/s | train fvu 0.2314 | dead 0.40% | ETA 3m40s

The stages before the first step (loading the LM, computing the held-out activations, filling
the shuffle buffer) print :func:`stage` lines on stderr whether or not stdout is a terminal, on
rank 0 only; :class:`FillReport` paces the buffer's. This module imports nothing of saetrain, so
the data side and the CLI can both use it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import lightning as L
from lightning.pytorch.callbacks import Callback

from .errors import UserError


def stage(message: str) -> None:
    """One line about a stage of the run, on stderr (the caller checks it is rank 0)."""
    print(f"saetrain: {message}", file=sys.stderr, flush=True)


def stdout_is_terminal() -> bool:
    """Whether stdout draws on a terminal (False for a file, a pipe, or no stdout at all)."""
    try:
        return sys.stdout is not None and sys.stdout.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stdout
        return False


def format_duration(seconds: float) -> str:
    """``42s``, ``4m05s``, ``2h03m``: short enough for a progress line."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class FillReport:
    """Paced lines while activations pile up, e.g. ``filling the shuffle buffer: 32,768/131,072
    activations (1,850/s, ~53s left)``, at most one every ``every`` seconds, and one when all
    are there (``shuffle buffer full: ...``; none when ``done`` is None).

    The training stream calls it with (rows filled, buffer rows) when the fill starts and after
    each LM chunk, until it first serves batches; the held-out set, with the activations so far
    and ``val_tokens``. The rate counts the rows added since the first call (a resumed buffer
    starts part full). ``clock`` and ``out`` are replaceable for tests.
    """

    def __init__(
        self,
        doing: str = "filling the shuffle buffer",
        done: str | None = "shuffle buffer full",
        every: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        out: Callable[[str], None] = stage,
    ):
        self.doing, self.done, self.every, self.clock, self.out = doing, done, every, clock, out
        self.start: tuple[float, int] | None = None  # (time, rows) at the first call
        self.last = 0.0

    def __call__(self, filled: int, total: int) -> None:
        now = self.clock()
        if self.start is None:
            self.start, self.last = (now, filled), now
        t0, filled0 = self.start
        elapsed = now - t0
        rate = (filled - filled0) / elapsed if elapsed > 0 else 0.0
        if filled >= total:
            if self.done is not None:
                took = format_duration(elapsed)
                self.out(f"{self.done}: {total:,} activations in {took} ({rate:,.0f}/s)")
        elif now - self.last >= self.every:
            left = (total - filled) / rate if rate > 0 else math.inf
            self.out(
                f"{self.doing}: {filled:,}/{total:,} activations "
                f"({rate:,.0f}/s, ~{format_duration(left)} left)"
            )
            self.last = now


class PlainProgress(Callback):
    """Prints a plain progress line every ``every`` seconds of training (0: every step), and a
    line when training starts and ends; rank 0 only. ``cli.py`` adds it when stdout is not a
    terminal.

    The line reads: step/max_steps, tokens seen (all ranks), tokens per second since the last
    line, the train FVU and dead-latent percentage of the last step (the mean over the SAEs when
    a run trains several), and the time left at the rate since the end of the first step (which
    also sets the SAE's initial bias from the data). The numbers come from the metrics the module
    logs and its ``tokens_seen`` counter: one read from the device per line, none between.
    """

    def __init__(
        self,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        out: Callable[[str], None] | None = None,
    ):
        if every < 0:
            raise UserError(f"progress_every must be >= 0 seconds (or null), got {every}")
        self.every = every
        self.clock = clock
        self.out = out or (lambda line: print(line, flush=True))
        self._start: tuple[float, int] | None = None  # (time, step) at the end of the first step
        self._last: tuple[float, int] | None = None  # (time, tokens) at the last line
        self._begin = (0.0, 0)  # (time, tokens) when training started

    # ------------------------------------------------------------------ the line

    @staticmethod
    def line(
        step: int,
        max_steps: int,
        tokens: int,
        tokens_per_s: float | None,
        fvu: float | None,
        dead: float | None,
        eta: float | None,
        n_saes: int = 1,
    ) -> str:
        """One progress line (``dead`` a fraction; None leaves a number out)."""
        parts = [f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"]
        parts.append(f"{tokens:,} tokens")
        if tokens_per_s is not None:
            parts.append(f"{tokens_per_s:,.0f} tokens/s")
        mean = f" (mean of {n_saes} SAEs)" if n_saes > 1 else ""
        if fvu is not None:
            parts.append(f"train fvu {fvu:.4f}{mean}")
        if dead is not None:
            parts.append(f"dead {100 * dead:.2f}%")
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return "saetrain: " + " | ".join(parts)

    def eta(self, now: float, step: int, max_steps: int) -> float | None:
        """Seconds left at the mean rate since the end of the first step of this run."""
        if self._start is None or max_steps <= 0:
            return None
        t0, step0 = self._start
        if step <= step0 or now <= t0:
            return None
        return (max_steps - step) * (now - t0) / (step - step0)

    @staticmethod
    def train_metrics(trainer: L.Trainer) -> tuple[float | None, float | None, int]:
        """(train FVU, dead fraction, number of SAEs): the means of what the last step logged
        (``train/fvu`` for one SAE, ``train/<name>/fvu`` for each of several)."""
        metrics = trainer.callback_metrics
        fvu = [
            float(v) for k, v in metrics.items() if k.startswith("train/") and k.endswith("/fvu")
        ]
        dead = [
            float(v)
            for k, v in metrics.items()
            if k.startswith("train/") and k.endswith("/dead_fraction")
        ]
        n = max(len(fvu), 1)
        return (sum(fvu) / len(fvu) if fvu else None, sum(dead) / len(dead) if dead else None, n)

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = self.clock()
        self._begin = self._last = (now, int(pl_module.tokens_seen))
        if not trainer.is_global_zero:
            return
        batch = dict(getattr(trainer.datamodule, "hparams", {})).get("batch_size")
        per_step = f", {batch * trainer.world_size:,} tokens a step" if batch else ""
        steps = f"{trainer.max_steps:,} steps" if trainer.max_steps > 0 else "with no max_steps"
        at = f" from step {trainer.global_step}" if trainer.global_step else ""
        every = f"every {format_duration(self.every) if self.every >= 60 else f'{self.every:g}s'}"
        every = "every step" if self.every == 0 else every
        self.out(f"saetrain: training {steps}{per_step}{at}; progress {every}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self.clock()
        if self._start is None:
            self._start = (now, trainer.global_step)
        if not trainer.is_global_zero or now - self._last[0] < self.every:
            return
        self.out(self._progress_line(trainer, pl_module, now))

    def _progress_line(self, trainer, pl_module, now: float) -> str:
        tokens = int(pl_module.tokens_seen)
        t_last, tokens_last = self._last
        rate = (tokens - tokens_last) / (now - t_last) if now > t_last else None
        self._last = (now, tokens)
        fvu, dead, n = self.train_metrics(trainer)
        step, max_steps = trainer.global_step, trainer.max_steps
        return self.line(
            step, max_steps, tokens, rate, fvu, dead, self.eta(now, step, max_steps), n
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        now = self.clock()
        tokens = int(pl_module.tokens_seen)
        took = now - self._begin[0]
        fvu, dead, n = self.train_metrics(trainer)
        last = self.line(trainer.global_step, trainer.max_steps, tokens, None, fvu, dead, None, n)
        rate = f", {(tokens - self._begin[1]) / took:,.0f} tokens/s" if took > 0 else ""
        self.out(
            f"saetrain: training done in {format_duration(took)}{rate}: "
            + last.removeprefix("saetrain: ")
        )

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.is_global_zero:
            why = type(exception).__name__
            self.out(f"saetrain: training stopped at step {trainer.global_step} ({why})")
