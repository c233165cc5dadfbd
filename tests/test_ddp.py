"""Two-process DDP on CPU (gloo), through ``python -m saetrain fit`` as a user runs it: it
trains, each rank streams its own documents, the ranks agree on the dead-latent counters,
a run killed mid-way resumes to the same weights as one that never stopped, and two nodes
launched by torchrun train what two local processes do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from test_resume import final_weights, fit_command, run_env, start_and_kill_when

DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "40"]
FSDP = ["--trainer.strategy", "fsdp2"]  # after DDP: the last value wins


def ddp_run(model_dir, data, out, name, *extra) -> subprocess.CompletedProcess:
    cmd = fit_command(model_dir, data, out, name, *DDP, *extra)
    return subprocess.run(cmd, env=run_env(), capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_whole(tiny_model_dir, chat_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    done = ddp_run(tiny_model_dir, chat_jsonl, out, "whole")
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return out / "whole"


def test_two_processes_train_on_disjoint_shards_and_agree_on_the_counters(ddp_whole):
    # Training ends with a check that every rank's counters equal rank 0's (SAEModule.
    # on_train_end): exit status 0 says they agreed.
    import json

    extra = json.loads((ddp_whole / "cfg.json").read_text())["extra"]
    assert extra["steps"] == 40 and extra["tokens_seen"] == 40 * 128 * 2
    ckpt = torch.load(ddp_whole / "lightning" / "last.ckpt", weights_only=False)
    streams = ckpt["ActivationDataModule"]["streams"]
    assert len(streams) == 2 and all(s["docs_read"] > 0 for s in streams)
    # Interleaved shards: rank r reads documents r, r + 2, ...: about the same count each.
    assert abs(streams[0]["docs_read"] - streams[1]["docs_read"]) <= 1


@pytest.fixture(scope="module")
def fsdp_whole(tiny_model_dir, chat_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    report = "--trainer.callbacks+=killers.ShardReport"
    done = ddp_run(tiny_model_dir, chat_jsonl, out, "whole", *FSDP, report)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return out / "whole"


def test_fsdp2_shards_the_sae_and_trains_the_same_weights_as_ddp(fsdp_whole, ddp_whole):
    # FSDP2 averages the gradients as DDP does and every rank updates whole rows of its
    # shard, so the two must agree bit for bit; the checkpoint holds the whole SAE.
    want, got = final_weights(ddp_whole), final_weights(fsdp_whole)
    assert all(torch.equal(got[name], want[name]) for name in want)
    state = torch.load(fsdp_whole / "lightning" / "last.ckpt", weights_only=False)["state_dict"]
    assert state["saes.0_0.sae.W_dec"].shape == want["W_dec"].shape
    # Each of the two ranks held half of the decoder's rows and of Adam's moments for them.
    import json

    for rank in (0, 1):
        shards = json.loads((fsdp_whole / f"shards-{rank}.json").read_text())
        rows = shards["W_dec"][1]
        assert shards == {"W_dec": [rows // 2, rows], "exp_avg": rows // 2, "exp_avg_sq": rows // 2}


@pytest.mark.parametrize(
    ("killed", "resumed"), [("ddp", "ddp"), ("fsdp2", "fsdp2"), ("fsdp2", "ddp")]
)
def test_a_killed_two_process_run_resumes_to_the_same_weights(
    killed, resumed, ddp_whole, tiny_model_dir, chat_jsonl, tmp_path
):
    # Under either strategy (their runs train the same weights, see above); an fsdp2
    # checkpoint is whole, so it resumes under ddp too.
    run = tmp_path / "killed"
    strategy = {"ddp": [], "fsdp2": FSDP}
    cmd = fit_command(tiny_model_dir, chat_jsonl, tmp_path, "killed", *DDP, *strategy[killed])
    cmd += ["--trainer.callbacks+=killers.Slow"]
    # Its own process group: a kill takes every rank at once, as a scheduler's does.
    proc = subprocess.Popen(
        cmd,
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not (run / "lightning" / "last.ckpt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run / "sae.safetensors").exists(), "the run ended before it could be killed"
    ckpt = run / "lightning" / "last.ckpt"
    resume = ["--ckpt_path", str(ckpt), *strategy[resumed]]
    done = ddp_run(tiny_model_dir, chat_jsonl, tmp_path, "killed", *resume)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    want, got = final_weights(ddp_whole), final_weights(run)
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_a_one_process_checkpoint_resumes_with_two_and_says_what_is_not_exact(
    tiny_model_dir, chat_jsonl, tmp_path
):
    run = tmp_path / "grow"
    cmd = fit_command(tiny_model_dir, chat_jsonl, tmp_path, "grow")
    cmd += ["--trainer.callbacks+=killers.Slow"]
    proc = start_and_kill_when(cmd, run / "lightning" / "last.ckpt", signal.SIGKILL, 0.0)
    assert proc.returncode == -signal.SIGKILL
    ckpt = run / "lightning" / "last.ckpt"
    steps_before = torch.load(ckpt, weights_only=False)["global_step"]
    done = ddp_run(tiny_model_dir, chat_jsonl, tmp_path, "grow", "--ckpt_path", str(ckpt))
    log = done.stderr.decode()
    assert done.returncode == 0, log[-3000:]
    assert "resuming a 1-process run with 2 processes" in " ".join(log.split())
    import json

    extra = json.loads((run / "cfg.json").read_text())["extra"]
    assert extra["steps"] == 40
    assert extra["tokens_seen"] == steps_before * 128 + (40 - steps_before) * 128 * 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_launched_by_torchrun_train_the_same_weights_as_two_local_processes(
    ddp_whole, tiny_model_dir, chat_jsonl, tmp_path
):
    # Multi-node as a cluster runs it: one torchrun per node (here both on this machine), and
    # Lightning reads the ranks from torchrun's environment. Two nodes of one process each
    # are the same two ranks as one node with two, so the weights must agree bit for bit.
    port = str(free_port())
    fit = fit_command(tiny_model_dir, chat_jsonl, tmp_path, "nodes", *DDP)[3:]
    fit += ["--trainer.num_nodes", "2", "--trainer.devices", "1"]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
            + ["--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1"]
            + ["--master_port", port, "-m", "saetrain", *fit],
            env=run_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err.decode()[-3000:]
    want, got = final_weights(ddp_whole), final_weights(tmp_path / "nodes")
    assert all(torch.equal(got[name], want[name]) for name in want)
