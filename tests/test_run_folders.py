"""Nothing a user made is replaced silently (issue #21): a checkpoint resumes only into its own
run folder, ``--overwrite`` leaves only the new run's files (and puts the old run back if the
new one fails before its first step), checkpoint saves are atomic within their folder,
``--resume auto`` continues a preempted run and leaves a finished one alone, impossible
settings are refused before the LM loads, and resuming with unchanged settings warns of
nothing. Every run here is the tiny recipe for a few steps, in this process."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from lmfixtures import error_line, tiny_fit_args

from saetrain import UserError
from saetrain.cli import main
from saetrain.data.datamodule import ActivationDataModule
from saetrain.module import SAEModule
from saetrain.runs import AtomicCheckpointIO, read_run_id, recover


def fit(model_dir, data, out, name, *extra) -> int:
    short = ["--trainer.max_steps", "4", "--checkpoint_every", "2"]
    return main(tiny_fit_args(model_dir, data, out, "--run_name", name, *short, *extra))


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_model_dir, chat_jsonl, tmp_path_factory) -> Path:
    """A run finished at step 4 (checkpoints at steps 2 and 4); tests work on copies."""
    out = tmp_path_factory.mktemp("finished")
    assert fit(tiny_model_dir, chat_jsonl, out, "done") == 0
    return out / "done"


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run, in this test's folder."""
    return Path(shutil.copytree(finished, tmp_path / "A"))


@pytest.fixture
def no_lm(monkeypatch):
    """Any attempt to load the LM fails the test (the command must stop before that)."""

    def refuse(self, stage=None):
        raise AssertionError("the LM was loaded")

    monkeypatch.setattr(ActivationDataModule, "setup", refuse)


# ---------------------------------------------------------------- whose checkpoint


def test_a_checkpoint_of_another_run_is_refused_and_the_finished_run_is_kept(
    run, tiny_model_dir, chat_jsonl, capsys
):
    out = run.parent
    assert fit(tiny_model_dir, chat_jsonl, out, "B") == 0
    before = (run / "sae.safetensors").read_bytes()
    other = out / "B" / "lightning" / "last.ckpt"
    args = ["--ckpt_path", str(other), "--trainer.max_steps", "6"]
    assert fit(tiny_model_dir, chat_jsonl, out, "A", *args) == 2
    line = error_line(capsys)
    assert "resume it into its own run folder" in line and "--run_name B" in line
    assert (run / "sae.safetensors").read_bytes() == before
    # continuing it into a new folder is allowed: a new run, with an id of its own
    assert fit(tiny_model_dir, chat_jsonl, out, "C", *args) == 0
    assert read_run_id(out / "C") not in (None, read_run_id(out / "B"))
    assert torch.load(out / "C" / "lightning" / "last.ckpt")["global_step"] == 6


def test_every_checkpoint_carries_its_runs_id(run):
    saved = torch.load(run / "lightning" / "last.ckpt", weights_only=True)
    assert saved["saetrain_run"]["id"] == read_run_id(run) is not None


# ---------------------------------------------------------------- --overwrite


def test_overwrite_leaves_only_the_new_runs_files(run, tiny_model_dir, chat_jsonl):
    old_id = read_run_id(run)
    args = ["--overwrite", "true", "--trainer.max_steps", "2"]
    assert fit(tiny_model_dir, chat_jsonl, run.parent, "A", *args) == 0
    assert {f for f in files(run) if not f.startswith("events.")} == {
        "cfg.json",
        "config.yaml",
        "hparams.yaml",
        "run.json",
        "sae.safetensors",
        "lightning/last.ckpt",
        "lightning/step2.ckpt",
    }
    assert len(list(run.glob("events.*"))) == 1
    assert torch.load(run / "lightning" / "last.ckpt")["global_step"] == 2
    assert read_run_id(run) != old_id
    assert sorted(p.name for p in run.parent.iterdir()) == ["A"]  # nothing left aside


def test_an_overwrite_that_fails_before_its_first_step_puts_the_old_run_back(
    run, tiny_model_dir, chat_jsonl, monkeypatch, capsys
):
    before = {f: (run / f).read_bytes() for f in files(run)}

    def fails(self, batch, batch_idx):
        raise UserError("planted failure on the first step")

    monkeypatch.setattr(SAEModule, "training_step", fails)
    args = ["--overwrite", "true", "--trainer.max_steps", "2"]
    assert fit(tiny_model_dir, chat_jsonl, run.parent, "A", *args) == 2
    assert "planted failure" in error_line(capsys)
    assert {f: (run / f).read_bytes() for f in files(run)} == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["A"]


def test_the_next_fit_puts_back_a_run_that_a_killed_overwrite_had_moved_aside(tmp_path):
    # A kill after the old run was moved aside, before the new one's first step...
    (tmp_path / ".A.old-1").mkdir()
    (tmp_path / ".A.old-1" / "sae.safetensors").write_text("old")
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "config.yaml").write_text("new")
    # ... and one while deleting it after the new run had started.
    (tmp_path / ".B.deleting-1").mkdir()
    recover(tmp_path / "A")
    recover(tmp_path / "B")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A"]
    assert files(tmp_path / "A") == {"sae.safetensors"}


# ---------------------------------------------------------------- atomic saves


def test_every_checkpoint_is_renamed_into_place_from_its_own_folder_whatever_tmpdir_is(
    tiny_model_dir, chat_jsonl, tmp_path, monkeypatch
):
    # With $TMPDIR on another filesystem, a temporary file there is copied over the
    # checkpoint in place, and a kill mid-copy leaves a truncated last.ckpt.
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(elsewhere))
    moves = []
    for module, name in ((os, "replace"), (os, "rename"), (shutil, "move")):
        real = getattr(module, name)

        def move(src, dst, *args, _real=real, **kwargs):
            moves.append((Path(src), Path(dst)))
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(module, name, move)
    assert fit(tiny_model_dir, chat_jsonl, tmp_path, "A") == 0
    ckpts = [(src, dst) for src, dst in moves if dst.suffix == ".ckpt"]
    assert len(ckpts) == 4  # steps 2 and 4: stepN.ckpt, then last.ckpt
    assert all(src.parent == dst.parent for src, dst in ckpts), ckpts


@pytest.mark.parametrize("dies", ["writing", "renaming"])
def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_and_no_temporary_file(
    tmp_path, monkeypatch, dies
):
    from saetrain import runs

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    if dies == "writing":
        write = runs._write_synced

        def half(target, data):
            write(target, data[: len(data) // 2])
            raise KeyboardInterrupt

        monkeypatch.setattr(runs, "_write_synced", half)
    else:
        monkeypatch.setattr(runs.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, path)
    assert torch.load(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ---------------------------------------------------------------- --resume auto


def test_resume_auto_continues_a_preempted_run_and_says_from_which_step(
    run, tiny_model_dir, chat_jsonl, capsys
):
    for export in ("sae.safetensors", "cfg.json"):
        (run / export).unlink()  # as a kill before the end leaves it: checkpoints, no export
    args = ["--resume", "auto", "--trainer.max_steps", "6"]
    assert fit(tiny_model_dir, chat_jsonl, run.parent, "A", *args) == 0
    err = capsys.readouterr().err
    assert f"--resume auto: continuing {run} from step 4 ({run}/lightning/last.ckpt)" in err
    assert json.loads((run / "cfg.json").read_text())["extra"]["steps"] == 6
    assert not list((run / "lightning").glob("last-v*")), "last.ckpt must stay the latest"
    assert torch.load(run / "lightning" / "last.ckpt")["global_step"] == 6


def test_resume_auto_on_a_finished_run_says_so_and_exits_0_without_training(
    run, tiny_model_dir, chat_jsonl, capsys, no_lm
):
    before = (run / "sae.safetensors").read_bytes()
    assert fit(tiny_model_dir, chat_jsonl, run.parent, "A", "--resume", "auto") == 0
    assert f"{run} is finished (exported at step 4): nothing to do" in capsys.readouterr().err
    assert (run / "sae.safetensors").read_bytes() == before


def test_resume_auto_in_a_new_folder_starts_the_run_and_says_so(
    tiny_model_dir, chat_jsonl, tmp_path, capsys
):
    assert fit(tiny_model_dir, chat_jsonl, tmp_path, "new", "--resume", "auto") == 0
    assert "--resume auto: no checkpoint in" in capsys.readouterr().err
    assert (tmp_path / "new" / "sae.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "words"),
    [(["--ckpt_path", "LAST"], "give one of them"), (["--overwrite", "true"], "give one of them")],
    ids=["ckpt_path", "overwrite"],
)
def test_resume_auto_with_ckpt_path_or_overwrite_is_refused_in_one_line(
    run, tiny_model_dir, chat_jsonl, capsys, no_lm, extra, words
):
    extra = [str(run / "lightning" / "last.ckpt") if a == "LAST" else a for a in extra]
    assert fit(tiny_model_dir, chat_jsonl, run.parent, "A", "--resume", "auto", *extra) == 2
    assert words in error_line(capsys)


# ---------------------------------------------------------------- impossible settings


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--model.lr", "-0.01"], "model.lr must be > 0"),
        (["--model.lr", "0"], "model.lr must be > 0"),
        (["--model.warmup_steps", "-1"], "model.warmup_steps must be an integer >= 0"),
        (["--model.auxk_coef", "-1"], "model.auxk_coef must be >= 0"),
        (["--model.dead_tokens_threshold", "0"], "model.dead_tokens_threshold must be"),
        (["--model.k_aux", "-1"], "model.k_aux must be an integer >= 0"),
        (["--model.k", "0"], "model.k must be >= 1"),
        (["--model.betas", "[0.9, 1.5]"], "model.betas must be two numbers in [0, 1)"),
        (["--model.eps", "-1"], "model.eps must be >= 0"),
        (["--model.sae_variants", "[{lr: -1}]"], "model.sae_variants[0].lr must be > 0"),
        (["--model.sae_variants", "[{k: 2.5}]"], "model.sae_variants[0].k must be"),
        (["--checkpoint_every", "0"], "--checkpoint_every must be >= 1"),
    ],
)
def test_an_impossible_setting_is_refused_in_one_line_before_the_lm_loads(
    tiny_model_dir, chat_jsonl, tmp_path, capsys, no_lm, extra, words
):
    assert fit(tiny_model_dir, chat_jsonl, tmp_path, "bad", *extra) == 2
    assert words in error_line(capsys)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- the resume warning


def test_resuming_with_unchanged_settings_warns_of_nothing_and_a_change_is_named(
    run, tiny_model_dir, chat_jsonl, caplog
):
    last = str(run / "lightning" / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="saetrain"):
        args = ["--ckpt_path", last, "--trainer.max_steps", "5"]
        assert fit(tiny_model_dir, chat_jsonl, run.parent, "A", *args) == 0
        assert "ignoring" not in caplog.text
        args = ["--ckpt_path", last, "--trainer.max_steps", "6", "--model.betas", "[0.8, 0.99]"]
        assert fit(tiny_model_dir, chat_jsonl, run.parent, "A", *args) == 0
    assert "ignoring ['betas']" in caplog.text
