"""End to end through ``python -m saetrain``: the tiny recipe trains, exports, resumes; every
recipe parses; bad input gives one clear line and exit status 2 without touching old runs, while
a bug (or any error under --debug) keeps its traceback."""

from __future__ import annotations

import errno
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from host_syncs import HostSyncs
from lmfixtures import error_line, tiny_fit_args

from saetrain import UserError, load_sae
from saetrain.cli import COMMANDS, main
from saetrain.module import SAEModule

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


fit_args = tiny_fit_args
STEERING_CALLBACK = "saetrain.steering.callback.SteeringEvalCallback"


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, chat_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(fit_args(tiny_model_dir, chat_jsonl, out)) == 0
    return out / "tiny"


def test_fit_writes_the_export_checkpoints_config_and_tensorboard_logs(trained_run):
    assert (trained_run / "cfg.json").is_file() and (trained_run / "sae.safetensors").is_file()
    assert (trained_run / "lightning" / "last.ckpt").is_file()
    assert (trained_run / "config.yaml").is_file()
    assert list(trained_run.glob("events.out.tfevents.*"))
    cfg = json.loads((trained_run / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["num_latents"] == 128 and cfg["k"] == 4
    extra = cfg["extra"]
    assert extra["hookpoint"] == "layers.1" and extra["tokens_seen"] == 40 * 128
    assert extra["data"]["path"].endswith("chat.jsonl")
    # Past this many documents of the corpus lies text the SAE never saw (evaluate skips them).
    assert 20 < extra["documents_read"] < 300


def test_fit_validation_logs_loss_recovered_and_kl_in_the_lm(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run))
    events.Reload()
    recovered = [e.value for e in events.Scalars("val/loss_recovered")]
    kl = [e.value for e in events.Scalars("val/kl")]
    assert len(recovered) == 2 and len(kl) == 2 and all(v >= 0 for v in kl)
    assert len(events.Scalars("val/delta_loss")) == 2


def test_fit_lowers_fvu(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run))
    events.Reload()
    fvu = [e.value for e in events.Scalars("train/fvu")]
    assert fvu[-1] < 0.5 * fvu[0]
    val = [e.value for e in events.Scalars("val/fvu")]
    assert len(val) == 2 and val[-1] < 0.3


def last_val_fvu(run: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return events.Scalars("val/fvu")[-1].value


def test_fit_under_bf16_autocast_trains_fp32_weights_as_well(
    trained_run, tiny_model_dir, chat_jsonl, tmp_path
):
    # Lightning's bf16-mixed: the kernels run under autocast with fp32 parameters and send
    # back fp32 gradients; the run learns as well as the fp32 one on the same data.
    args = fit_args(tiny_model_dir, chat_jsonl, tmp_path, "--trainer.precision", "bf16-mixed")
    assert main(args) == 0
    sae = load_sae(tmp_path / "tiny")
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    fp32, bf16 = last_val_fvu(trained_run), last_val_fvu(tmp_path / "tiny")
    assert bf16 < 0.3 and abs(bf16 - fp32) < 0.01, (bf16, fp32)


def test_the_training_step_reads_nothing_back_from_the_device_after_the_first(
    tiny_model_dir, chat_jsonl, tmp_path, monkeypatch
):
    # On a GPU each read (item(), nonzero, boolean indexing, torchmetrics' NaN checks) stalls
    # the launch queue. The module's own code reads sae.initialized once, on the first step;
    # the kernels' one read (the dead latents' ids) is counted in test_kernels.py.
    reads = []
    step = SAEModule.training_step

    def counted(self, batch, batch_idx):
        with HostSyncs(only_from="module.py") as syncs:
            loss = step(self, batch, batch_idx)
        reads.extend((batch_idx, op) for op in syncs.ops)
        return loss

    monkeypatch.setattr(SAEModule, "training_step", counted)
    assert main(fit_args(tiny_model_dir, chat_jsonl, tmp_path, "--trainer.max_steps", "6")) == 0
    assert reads and all(batch_idx == 0 for batch_idx, _ in reads), reads


def test_exported_sae_matches_the_trained_module(trained_run):
    module = SAEModule.load_from_checkpoint(trained_run / "lightning" / "last.ckpt")
    exported = load_sae(trained_run)
    x = torch.randn(50, 32) * 3
    with torch.no_grad():
        expected = module.sae(x)
        got = exported(x)
    torch.testing.assert_close(got.x_hat, expected.x_hat, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.latent_indices, expected.latent_indices)


def test_fit_resumes_from_the_last_checkpoint(trained_run, tiny_model_dir, chat_jsonl):
    args = fit_args(tiny_model_dir, chat_jsonl, trained_run.parent)
    last = trained_run / "lightning" / "last.ckpt"
    assert main([*args, "--ckpt_path", str(last), "--trainer.max_steps", "50"]) == 0
    cfg = json.loads((trained_run / "cfg.json").read_text())
    assert cfg["extra"]["steps"] == 50 and cfg["extra"]["tokens_seen"] == 50 * 128


def test_a_finished_run_is_not_overwritten(trained_run, tiny_model_dir, chat_jsonl, capsys):
    before = (trained_run / "sae.safetensors").read_bytes()
    assert main(fit_args(tiny_model_dir, chat_jsonl, trained_run.parent)) == 2
    assert "already holds a run" in error_line(capsys)
    assert (trained_run / "sae.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.layer", "7"], "layer 7 does not exist"),
        (["--model.k", "1000"], "k=1000 is larger than num_latents=128"),
        (["--model.bogus_key", "1"], "bogus_key"),
        (["--data.source.path", "/nonexistent/chats.jsonl"], "/nonexistent/chats.jsonl"),
        (["--data.model", "/nonexistent/model"], "cannot load model"),
        (["--trainer.strategy", "fsdp"], "pass --trainer.strategy fsdp2 to shard the SAEs"),
        (["--model.k", "0"], "k must be >= 1, got 0"),
        (["--model.k", "abc"], 'Parser key "model.k"'),
        # jsonargparse wraps an error raised in a Union-typed value's __init__ (callbacks)
        (
            [f"--trainer.callbacks+={STEERING_CALLBACK}", "--trainer.callbacks.every_n_steps", "0"],
            "every_n_steps, sequences, max_new_tokens and batch_size must be >= 1",
        ),
    ],
)
def test_bad_input_gives_one_clear_line_and_nonzero_exit(
    extra, message, tiny_model_dir, chat_jsonl, tmp_path, capsys
):
    code = main(fit_args(tiny_model_dir, chat_jsonl, tmp_path, *extra))
    assert code == 2
    assert message in error_line(capsys)
    assert not list(tmp_path.rglob("sae.safetensors"))


def raising(error: BaseException):
    """A command that raises ``error`` (stands in for a verb in ``COMMANDS``)."""

    def command(args):
        raise error

    return command


@pytest.fixture
def no_debug(monkeypatch):
    """SAETRAIN_DEBUG off, and restored after the test (``--debug`` sets it)."""
    monkeypatch.setenv("SAETRAIN_DEBUG", "0")


def test_a_user_error_is_exactly_one_line_on_stderr_and_exit_status_2(
    monkeypatch, capsys, no_debug
):
    monkeypatch.setitem(
        COMMANDS, "export", raising(UserError("--out x is a file:\n pick a folder"))
    )
    assert main(["export"]) == 2
    assert capsys.readouterr().err == "saetrain export: error: --out x is a file: pick a folder\n"


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/chats.jsonl"),
        PermissionError(errno.EACCES, "Permission denied", "/data/chats.jsonl"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["missing", "unreadable", "disk-full"],
)
def test_an_os_error_naming_a_file_or_a_full_disk_is_one_line_and_exit_status_2(
    error, monkeypatch, capsys, no_debug
):
    monkeypatch.setitem(COMMANDS, "export", raising(error))
    assert main(["export"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"saetrain export: error: {error.strerror}")
    assert error.filename is None or "/data/chats.jsonl" in err


@pytest.mark.parametrize(
    "error",
    [RuntimeError("bug"), ValueError("bug"), KeyError("bug"), TypeError("bug"), OSError("bug")],
    ids=lambda e: type(e).__name__,
)
def test_a_bug_propagates_with_its_traceback(error, monkeypatch, capsys, no_debug):
    monkeypatch.setitem(COMMANDS, "export", raising(error))
    with pytest.raises(type(error)) as raised:
        main(["export"])
    assert raised.value is error
    assert "error:" not in capsys.readouterr().err


def test_a_bug_behind_a_jsonargparse_wrapper_keeps_its_own_traceback(
    tiny_model_dir, chat_jsonl, tmp_path, monkeypatch, no_debug
):
    # jsonargparse turns an exception in a callback's __init__ into a ValueError of its own;
    # main must not mistake that for bad input, and the planted error must stay in the chain.
    from saetrain.steering.callback import SteeringEvalCallback

    @functools.wraps(SteeringEvalCallback.__init__)
    def broken_init(self, *args, **kwargs):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(SteeringEvalCallback, "__init__", broken_init)
    with pytest.raises(ValueError) as raised:
        main(
            fit_args(
                tiny_model_dir, chat_jsonl, tmp_path, f"--trainer.callbacks+={STEERING_CALLBACK}"
            )
        )
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert str(raised.value.__cause__) == "planted bug"


def test_debug_flag_anywhere_shows_a_user_errors_traceback_and_reaches_other_ranks(
    monkeypatch, no_debug
):
    seen = []
    monkeypatch.setitem(COMMANDS, "export", lambda args: seen.append(args))
    assert main(["--debug", "export", "--out", "x", "--debug"]) == 0
    assert seen == [["--out", "x"]]  # the verb never sees --debug
    assert os.environ["SAETRAIN_DEBUG"] == "1"  # DDP ranks inherit it
    monkeypatch.setitem(COMMANDS, "export", raising(UserError("bad")))
    with pytest.raises(UserError):
        main(["export", "--debug"])


def test_saetrain_debug_1_shows_a_user_errors_traceback(monkeypatch):
    monkeypatch.setenv("SAETRAIN_DEBUG", "1")
    monkeypatch.setitem(COMMANDS, "export", raising(UserError("bad")))
    with pytest.raises(UserError):
        main(["export"])


BUG = "import sys; from saetrain import cli; cli.COMMANDS['export'] = lambda a: {}['bug']"


@pytest.mark.parametrize(
    ("args", "last_line"),
    [
        # a bug: the traceback, exit status 1
        (["-c", f"{BUG}; sys.exit(cli.main(['export']))"], "KeyError: 'bug'"),
        # a user error under --debug: its traceback too
        (
            ["-m", "saetrain", "export", "--ckpt", "/nonexistent", "--format", "saelens"]
            + ["--out", "/nonexistent/out", "--debug"],
            "saetrain.errors.UserError: /nonexistent does not exist",
        ),
    ],
    ids=["bug", "user-error-under-debug"],
)
def test_python_m_saetrain_prints_the_traceback_and_exits_1(args, last_line):
    env = {k: v for k, v in os.environ.items() if k != "SAETRAIN_DEBUG"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(last_line)


def test_an_empty_data_set_is_refused(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(fit_args(tiny_model_dir, empty, tmp_path)) == 2
    assert "no documents" in error_line(capsys)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_parses(recipe, capsys):
    assert main(["fit", "--config", str(recipe), "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("#"), f"{recipe.name} must start with a comment giving its command"


def test_module_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "saetrain", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "fit" in out and "validate" in out
