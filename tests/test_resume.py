"""Exact resume (issue #3): the live training stream's state, SIGKILL and SIGTERM mid-run,
kills during a checkpoint write, and resumes that must be refused.

A run killed at a random step and resumed from its last checkpoint must end with the same
weights, bit for bit, as a run that was never interrupted.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lmfixtures import error_line, tiny_fit_args
from safetensors.torch import load_file

from saetrain.cli import main
from saetrain.data.activations import (
    ActivationProducer,
    pack_documents,
    shuffle_batches,
    shuffle_documents,
)
from saetrain.data.lm import load_lm
from saetrain.data.sources import TextSource, iter_documents
from saetrain.data.stream import TrainStream

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------- the stream alone


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_lm(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))


def make_stream(lm, chat_jsonl, document_buffer=0, **kwargs):
    model, tokenizer = lm
    docs = list(iter_documents(TextSource(str(chat_jsonl)), tokenizer))
    producer = ActivationProducer(model, tokenizer, 1, ctx_len=32, lm_batch_size=4)
    args = dict(ctx_len=32, batch_size=64, buffer_size=256, document_buffer=document_buffer)
    args.update(kwargs)
    return TrainStream(lambda skip: iter(docs[skip:]), tokenizer, producer, **args), docs


@pytest.mark.parametrize("document_buffer", [0, 40])
def test_the_stream_yields_what_the_generator_chain_yields(lm, chat_jsonl, document_buffer):
    stream, docs = make_stream(lm, chat_jsonl, document_buffer, seed=3)
    model, tokenizer = lm
    producer = ActivationProducer(model, tokenizer, 1, ctx_len=32, lm_batch_size=4)
    it = iter(docs)
    if document_buffer:
        it = shuffle_documents(it, document_buffer, torch.Generator().manual_seed(4))
    chain = shuffle_batches(
        producer(pack_documents(it, tokenizer, 32)),
        batch_size=64,
        buffer_size=256,
        generator=torch.Generator().manual_seed(3),
    )
    got, want = list(stream), list(chain)
    assert len(got) == len(want) > 10
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("document_buffer", [0, 40])
@pytest.mark.parametrize("stop", [0, 1, 5, 6, 13])
def test_a_stream_resumed_from_its_state_yields_exactly_the_rest(
    lm, chat_jsonl, document_buffer, stop
):
    reference, _ = make_stream(lm, chat_jsonl, document_buffer)
    want = list(reference)
    stream, _ = make_stream(lm, chat_jsonl, document_buffer)
    head = list(itertools.islice(stream, stop + 2))  # two fetched ahead, as Lightning does
    state = stream.state_dict(consumed=stop)
    blob = io.BytesIO()
    torch.save(state, blob)  # through bytes, as in a checkpoint
    resumed, _ = make_stream(lm, chat_jsonl, document_buffer)
    resumed.load_state_dict(torch.load(io.BytesIO(blob.getvalue()), weights_only=False))
    got = head[:stop] + list(resumed)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_a_second_resume_while_replaying_stays_exact(lm, chat_jsonl):
    want = list(make_stream(lm, chat_jsonl)[0])
    stream, _ = make_stream(lm, chat_jsonl)
    head = list(itertools.islice(stream, 4))
    again, _ = make_stream(lm, chat_jsonl)
    again.load_state_dict(stream.state_dict(consumed=2))  # batches 3 and 4 to replay
    third, _ = make_stream(lm, chat_jsonl)
    third.load_state_dict(again.state_dict(consumed=2))  # before replaying any
    assert all(torch.equal(a, b) for a, b in zip(head[:2] + list(third), want, strict=True))


def test_the_state_cannot_go_back_further_than_the_batches_kept(lm, chat_jsonl):
    stream, _ = make_stream(lm, chat_jsonl)
    list(itertools.islice(stream, 8))
    with pytest.raises(ValueError, match="only the last 4 are kept"):
        stream.state_dict(consumed=2)


def test_ranks_stream_disjoint_documents_that_together_miss_none(tiny_model_dir, chat_jsonl):
    from saetrain.data.datamodule import ActivationDataModule

    seen = []
    for rank in range(3):
        dm = ActivationDataModule(str(tiny_model_dir), TextSource(str(chat_jsonl)), 1)
        dm.setup()
        dm.rank, dm.world_size = rank, 3
        seen.append(list(dm.rank_documents()))
    everything = list(dm.documents("train"))
    assert sorted(itertools.chain(*seen)) == sorted(everything)
    assert sum(map(len, seen)) == len(everything)  # no document twice


# ---------------------------------------------------------------- whole runs, killed


def fit_command(model_dir, data, out_dir, run_name, *extra) -> list[str]:
    run = ["--run_name", run_name, "--trainer.max_steps", "60", "--checkpoint_every", "10"]
    return [
        sys.executable,
        "-m",
        "saetrain",
        *tiny_fit_args(model_dir, data, out_dir, *run, *extra),
    ]


def run_env() -> dict:
    # The same threads in every process, so CPU results are bit for bit repeatable.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    return env


def start_and_kill_when(cmd, ready: Path, sig: int, delay: float) -> subprocess.Popen:
    """Start `cmd`; once `ready` exists, wait `delay` seconds and send `sig`."""
    proc = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the run never reached its first checkpoint"
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "sae.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, chat_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    done = subprocess.run(
        fit_command(tiny_model_dir, chat_jsonl, out, "whole"), env=run_env(), capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return out / "whole"


def resume(tiny_model_dir, chat_jsonl, out, run_name) -> subprocess.CompletedProcess:
    ckpt = out / run_name / "lightning" / "last.ckpt"
    cmd = fit_command(tiny_model_dir, chat_jsonl, out, run_name, "--ckpt_path", str(ckpt))
    return subprocess.run(cmd, env=run_env(), capture_output=True)


def test_a_run_killed_at_a_random_step_resumes_to_the_same_weights_bit_for_bit(
    uninterrupted, tiny_model_dir, chat_jsonl, tmp_path
):
    delay = random.Random().uniform(0.0, 1.5)  # somewhere after step 10's checkpoint
    run = tmp_path / "killed"
    cmd = fit_command(tiny_model_dir, chat_jsonl, tmp_path, "killed")
    cmd += ["--trainer.callbacks+=killers.Slow"]
    proc = start_and_kill_when(cmd, run / "lightning" / "last.ckpt", signal.SIGKILL, delay)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "sae.safetensors").exists()
    done = resume(tiny_model_dir, chat_jsonl, tmp_path, "killed")
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    want, got = final_weights(uninterrupted), final_weights(run)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches(
    uninterrupted, tiny_model_dir, chat_jsonl, tmp_path
):
    run = tmp_path / "term"
    cmd = fit_command(tiny_model_dir, chat_jsonl, tmp_path, "term")
    cmd += ["--trainer.callbacks+=killers.Slow"]
    proc = start_and_kill_when(cmd, run / "lightning" / "last.ckpt", signal.SIGTERM, 0.3)
    log = proc.stdout.read().decode()
    assert proc.returncode == 143, log[-3000:]
    assert "SIGTERM at step" in log
    saved = torch.load(run / "lightning" / "last.ckpt", weights_only=False)
    assert saved["global_step"] > 10  # saved at the step it stopped, not the last periodic one
    done = resume(tiny_model_dir, chat_jsonl, tmp_path, "term")
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    want, got = final_weights(uninterrupted), final_weights(run)
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(
    uninterrupted, tiny_model_dir, chat_jsonl, tmp_path
):
    # killers.KillMidWrite writes half of the second checkpoint's bytes and SIGKILLs itself.
    run = tmp_path / "midwrite"
    cmd = fit_command(tiny_model_dir, chat_jsonl, tmp_path, "midwrite")
    cmd += ["--trainer.callbacks+=killers.KillMidWrite"]
    done = subprocess.run(cmd, env=run_env(), capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-3000:]
    last = torch.load(run / "lightning" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 10  # the checkpoint before the interrupted write
    assert (run / "lightning" / ".last.ckpt.partial").exists()  # the write the kill cut short
    resumed = resume(tiny_model_dir, chat_jsonl, tmp_path, "midwrite")
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert not list((run / "lightning").glob(".*")), "a temporary file was left behind"
    want, got = final_weights(uninterrupted), final_weights(run)
    assert all(torch.equal(got[name], want[name]) for name in want)


# ---------------------------------------------------------------- resumes to refuse


@pytest.mark.parametrize(
    "change, words",
    [
        (["--data.layer", "0"], "['layers.1'] but data.layer gives ['layers.0']"),
        (["--model.k", "8"], "k=8"),
        (["--model.expansion_factor", "2"], "expansion_factor=2"),
    ],
    ids=["layer", "k", "width"],
)
def test_resuming_with_a_changed_setting_is_refused_in_one_line(
    uninterrupted, tiny_model_dir, chat_jsonl, tmp_path, capsys, change, words
):
    ckpt = uninterrupted / "lightning" / "last.ckpt"
    cmd = fit_command(tiny_model_dir, chat_jsonl, tmp_path, "changed", "--ckpt_path", str(ckpt))
    assert main(cmd[3:] + change) == 2
    line = error_line(capsys)
    assert words in line and "resume with the same" in line


def test_a_truncated_checkpoint_is_refused_in_one_line(
    uninterrupted, tiny_model_dir, chat_jsonl, tmp_path, capsys
):
    ckpt = tmp_path / "cut.ckpt"
    data = (uninterrupted / "lightning" / "last.ckpt").read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    cmd = fit_command(tiny_model_dir, chat_jsonl, tmp_path, "cut", "--ckpt_path", str(ckpt))
    assert main(cmd[3:]) == 2
    assert "corrupt or truncated" in error_line(capsys)


def test_held_out_documents_spread_by_val_every_are_never_trained_on(tiny_model_dir, chat_jsonl):
    from saetrain.data.datamodule import ActivationDataModule

    source = TextSource(str(chat_jsonl))
    dm = ActivationDataModule(str(tiny_model_dir), source, 1, val_documents=4, val_every=3)
    dm.setup()
    everything = list(iter_documents(source, dm.tokenizer))
    assert list(dm.documents("val")) == [everything[i] for i in (0, 3, 6, 9)]
    train = list(dm.documents("train"))
    assert train == [d for i, d in enumerate(everything) if i not in (0, 3, 6, 9)]
