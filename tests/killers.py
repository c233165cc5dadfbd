"""Fault injection for the resume tests, loaded by a training subprocess through
``--trainer.callbacks+=killers.KillMidWrite`` (tests/ is on its PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import time

from lightning.pytorch.callbacks import Callback


class KillMidWrite(Callback):
    """SIGKILLs the process halfway through writing checkpoint file number ``at`` (counting
    every file saved: each periodic save writes ``stepN.ckpt`` and then ``last.ckpt``, so the
    default 4 is ``last.ckpt`` of the second save, overwriting the first one's). The bytes go
    to the save's temporary file (``saetrain.runs.write_atomically``)."""

    def __init__(self, at: int = 4):
        self.at = at
        self.saves = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves += 1
        if self.saves != self.at:
            return
        from saetrain import runs

        write = runs._write_synced

        def half_then_die(path, data):
            write(path, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        runs._write_synced = half_then_die


class Slow(Callback):
    """Sleeps after each step, so a tiny run lasts long enough to be killed mid-way."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class ShardReport(Callback):
    """Writes, per rank, how many rows of the (first) SAE's W_dec and of Adam's moments for it
    the rank holds when training ends, to ``<default_root_dir>/shards-<rank>.json`` (fsdp2 test)."""

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        from saetrain.sae import _local

        sae = pl_module.trained[0].sae
        sae.reshard()  # after the last validation forward the root SAE is unsharded
        state = trainer.optimizers[0].state[sae.W_dec]
        report = {
            "W_dec": [_local(sae.W_dec).shape[0], sae.W_dec.shape[0]],
            "exp_avg": _local(state["exp_avg"]).shape[0],
            "exp_avg_sq": _local(state["exp_avg_sq"]).shape[0],
        }
        path = f"{trainer.default_root_dir}/shards-{trainer.global_rank}.json"
        with open(path, "w") as f:
            json.dump(report, f)
