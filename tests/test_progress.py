"""Progress a log can show (issue 19): with stdout in a file, ``fit`` prints plain progress lines
and turns Lightning's bar off; the stages before the first step print one line each; on a
terminal the bar stays and no plain lines are printed."""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import pytest
import torch
from lmfixtures import tiny_fit_args

from saetrain.cli import SAETrainCLI, main
from saetrain.data.activations import ActivationProducer
from saetrain.data.lm import load_lm
from saetrain.data.sources import TextSource, iter_documents
from saetrain.data.stream import TrainStream
from saetrain.progress import FillReport, PlainProgress, format_duration

LINE = re.compile(
    r"saetrain: step (\d+)/(\d+) \| ([\d,]+) tokens \| ([\d,]+) tokens/s \| "
    r"train fvu ([\d.]+) \| dead ([\d.]+)%(?: \| ETA (\S+))?$"
)
BATCH = 128  # recipes/tiny.yaml's data.batch_size


class Clock:
    """A clock that moves only when told."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def trainers(monkeypatch):
    """The trainers SAETrainCLI builds, to see which progress callbacks they got."""
    built = []
    make = SAETrainCLI.instantiate_trainer

    def spy(self, **kwargs):
        built.append(make(self, **kwargs))
        return built[-1]

    monkeypatch.setattr(SAETrainCLI, "instantiate_trainer", spy)
    return built


def test_a_log_file_gets_a_plain_line_per_step_up_to_max_steps_and_no_bar(
    tiny_model_dir, chat_jsonl, tmp_path, capsys, trainers
):
    # stdout is captured (not a terminal); the recipe's enable_progress_bar is unset here, so
    # the CLI must turn Lightning's bar off itself.
    args = tiny_fit_args(tiny_model_dir, chat_jsonl, tmp_path, "--progress_every", "0")
    assert main([*args, "--trainer.enable_progress_bar", "null"]) == 0
    out, err = capsys.readouterr()
    assert trainers[0].progress_bar_callback is None
    assert "\r" not in out and "Epoch" not in out
    lines = out.splitlines()
    assert lines[0].startswith("saetrain: training 40 steps, 128 tokens a step; ")
    assert lines[-1].startswith("saetrain: training done in ")
    assert f"step 40/40 | {40 * BATCH:,} tokens | train fvu " in lines[-1]
    progress = [LINE.match(line) for line in lines[1:-1]]
    assert all(progress), [line for line, m in zip(lines[1:-1], progress, strict=True) if not m]
    steps = [int(m[1]) for m in progress]
    assert steps == list(range(1, 41))  # every step, in order
    for m in progress:
        step, max_steps, tokens = int(m[1]), int(m[2]), int(m[3].replace(",", ""))
        assert max_steps == 40 and tokens == step * BATCH
        assert 0 < float(m[5]) < 2 and 0 <= float(m[6]) <= 100
        assert float(m[4].replace(",", "")) > 0
    # No ETA after the first step (no rate to go by yet), then one.
    assert progress[0][7] is None and all(m[7] for m in progress[1:])
    assert progress[-1][7] == "0s"
    assert float(progress[-1][5]) < 0.5 * float(progress[0][5])  # the FVU shown is the FVU
    # The stages before the first step, one line each, on stderr.
    stages = [line for line in err.splitlines() if line.startswith("saetrain: ")]
    assert stages[0] == f"saetrain: loading the LM {tiny_model_dir} on cpu in float32..."
    assert re.fullmatch(r"saetrain: LM loaded in \d+s \(3 layers, d_in 32\)", stages[1])
    assert stages[2] == "saetrain: computing up to 1,024 held-out activations..."
    assert re.fullmatch(r"saetrain: 1,024 held-out activations in \d+s", stages[3])
    assert re.fullmatch(
        r"saetrain: shuffle buffer full: 1,024 activations in \d+s \(.*/s\)", stages[4]
    )


def test_on_a_terminal_the_bar_stays_and_no_plain_lines_are_printed(
    tiny_model_dir, chat_jsonl, tmp_path, capsys, monkeypatch, trainers
):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    args = tiny_fit_args(tiny_model_dir, chat_jsonl, tmp_path, "--progress_every", "0")
    assert main([*args, "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "null"]) == 0
    out, err = capsys.readouterr()
    assert trainers[0].progress_bar_callback is not None
    assert not any(isinstance(c, PlainProgress) for c in trainers[0].callbacks)
    assert "saetrain: step" not in out and "saetrain: training" not in out
    assert "saetrain: LM loaded in" in err  # stage lines print either way


def test_the_line_shows_step_tokens_rate_fvu_dead_and_eta():
    line = PlainProgress().line(120, 540, 245_760, 1912.4, 0.23141, 0.004, 220.0)
    assert line == (
        "saetrain: step 120/540 | 245,760 tokens | 1,912 tokens/s | train fvu 0.2314 | "
        "dead 0.40% | ETA 3m40s"
    )
    several = PlainProgress().line(3, -1, 384, None, 0.5, 0.0, None, n_saes=4)
    assert (
        several == "saetrain: step 3 | 384 tokens | train fvu 0.5000 (mean of 4 SAEs) | dead 0.00%"
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (245, "4m05s"), (7380, "2h03m"), (1e9, "277777h46m")],
)
def test_durations_read_as_seconds_minutes_or_hours(seconds, text):
    assert format_duration(seconds) == text
    assert format_duration(float("inf")) == "?"


def fake_run(clock: Clock, metrics: dict, batch: int = 2048, max_steps: int = 540):
    trainer = SimpleNamespace(
        global_step=0,
        max_steps=max_steps,
        is_global_zero=True,
        world_size=1,
        callback_metrics=metrics,
        datamodule=SimpleNamespace(hparams={"batch_size": batch}),
    )
    module = SimpleNamespace(tokens_seen=torch.tensor(0))
    return trainer, module


def test_lines_come_every_interval_with_an_eta_from_the_rate_after_the_first_step():
    clock, printed = Clock(), []
    metrics = {"train/fvu": torch.tensor(0.25), "train/dead_fraction": torch.tensor(0.01)}
    trainer, module = fake_run(clock, metrics)
    cb = PlainProgress(every=30, clock=clock, out=printed.append)
    cb.on_train_start(trainer, module)
    assert printed == ["saetrain: training 540 steps, 2,048 tokens a step; progress every 30s"]
    clock.now += 70  # the first step is slow (it also sets the SAE's bias from the data)
    for step in range(1, 11):  # then 10 s a step
        if step > 1:
            clock.now += 10
        trainer.global_step, module.tokens_seen = step, torch.tensor(step * 2048)
        cb.on_train_batch_end(trainer, module, None, None, step - 1)
    # Lines at step 1 (70 s after the start), 4 and 7 (30 s later each), 10.
    steps = [int(LINE.match(p)[1]) for p in printed[1:]]
    assert steps == [1, 4, 7, 10]
    assert "ETA" not in printed[1]  # no rate yet after one step
    # At step 4: 3 steps in 30 s since step 1, 536 left -> 5360 s; 3 x 2048 tokens in 30 s.
    assert printed[2] == (
        "saetrain: step 4/540 | 8,192 tokens | 205 tokens/s | train fvu 0.2500 | dead 1.00% | "
        "ETA 1h29m"
    )
    cb.on_train_end(trainer, module)
    assert printed[-1] == (
        "saetrain: training done in 2m40s, 128 tokens/s: step 10/540 | 20,480 tokens | "
        "train fvu 0.2500 | dead 1.00%"
    )


def test_only_rank_zero_prints():
    clock, printed = Clock(), []
    trainer, module = fake_run(clock, {})
    trainer.is_global_zero = False
    cb = PlainProgress(every=0, clock=clock, out=printed.append)
    cb.on_train_start(trainer, module)
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_train_end(trainer, module)
    assert printed == []


def test_several_saes_show_the_mean_fvu_and_dead_fraction():
    metrics = {
        "train/layers.1/fvu": torch.tensor(0.2),
        "train/layers.2/fvu": torch.tensor(0.4),
        "train/layers.1/dead_fraction": torch.tensor(0.0),
        "train/layers.2/dead_fraction": torch.tensor(0.1),
        "train/layers.1/l0": torch.tensor(4.0),
        "val/fvu": torch.tensor(9.0),
    }
    fvu, dead, n = PlainProgress.train_metrics(SimpleNamespace(callback_metrics=metrics))
    assert fvu == pytest.approx(0.3) and dead == pytest.approx(0.05) and n == 2


def test_the_buffer_fill_prints_at_most_once_per_interval_and_when_full():
    clock, printed = Clock(), []
    report = FillReport(every=15, clock=clock, out=printed.append)
    report(0, 131072)  # the fill starts
    for filled in range(8192, 131072 + 1, 8192):  # a chunk of 8,192 activations every 4 s
        clock.now += 4
        report(filled, 131072)
    assert printed == [
        "filling the shuffle buffer: 32,768/131,072 activations (2,048/s, ~48s left)",
        "filling the shuffle buffer: 65,536/131,072 activations (2,048/s, ~32s left)",
        "filling the shuffle buffer: 98,304/131,072 activations (2,048/s, ~16s left)",
        "shuffle buffer full: 131,072 activations in 1m04s (2,048/s)",
    ]


def test_the_stream_reports_its_first_fill_from_empty_to_full_and_then_stops(
    tiny_model_dir, chat_jsonl
):
    model, tokenizer = load_lm(str(tiny_model_dir), dtype=torch.float32)
    docs = list(iter_documents(TextSource(str(chat_jsonl)), tokenizer))
    producer = ActivationProducer(model, tokenizer, 1, ctx_len=32, lm_batch_size=4)
    calls = []
    stream = TrainStream(
        lambda skip: iter(docs[skip:]),
        tokenizer,
        producer,
        ctx_len=32,
        batch_size=64,
        buffer_size=256,
        on_fill=lambda filled, total: calls.append((filled, total)),
    )
    batches = [next(stream) for _ in range(10)]  # several refills after the first
    assert len(batches) == 10
    assert calls[0] == (0, 256) and calls[-1] == (256, 256)
    filled = [f for f, _ in calls]
    assert filled == sorted(filled) and len(calls) > 2


def test_the_held_out_set_report_leaves_the_last_line_to_its_caller():
    clock, printed = Clock(), []
    report = FillReport(
        "computing held-out activations", done=None, clock=clock, out=printed.append
    )
    report(0, 1000)
    clock.now += 20
    report(400, 1000)
    clock.now += 20
    report(1000, 1000)
    assert printed == ["computing held-out activations: 400/1,000 activations (20/s, ~30s left)"]
