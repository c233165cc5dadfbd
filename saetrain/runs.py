"""Run folders: which run a checkpoint belongs to, replacing a run safely, atomic saves (#21).

A ``fit`` run lives in ``<out_dir>/<run_name>/``. Nothing a user made there is replaced
silently:

- **Identity.** ``run.json`` holds the run's id; every checkpoint carries it (and the folder) under
  ``saetrain_run``. A checkpoint resumes only into the run folder it belongs to, or into a folder
  that holds no run yet (a new run continuing it, with an id of its own): :func:`check_resume`.
- **Overwrite.** ``--overwrite true`` renames the old folder to a hidden sibling
  ``.<run_name>.old-<time>`` before the new run writes anything; it is deleted once the new run
  has taken its first step, and put back if the new run fails before that (:class:`RunFolder`).
  A kill in between is finished or undone by the next ``fit`` into that folder (:func:`recover`).
- **Saves.** :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file beside it,
  fsyncs it and renames it into place, so a kill mid-save leaves the previous checkpoint whole
  (Lightning's own save writes the temporary file in ``$TMPDIR`` and, when that is another
  filesystem, copies it over the checkpoint in place).
- **``--resume auto``** continues a run folder's own last checkpoint (:func:`auto_checkpoint`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback

from .errors import UserError

RUN_FILE = "run.json"
CKPT_KEY = "saetrain_run"
"""The key of a checkpoint that holds ``{"id": run id, "dir": run folder}``."""


def say(line: str) -> None:
    """One line for the user on stderr."""
    print(f"saetrain: {line}", file=sys.stderr)


# ---------------------------------------------------------------- atomic saves


def _write_synced(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` and fsync it (the killers in tests/ patch this)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: str | Path, data: bytes | memoryview) -> None:
    """Replace ``path`` by ``data`` all at once: a kill leaves the old file or the new one.

    The temporary file is in ``path``'s own folder (a rename is atomic only within one
    filesystem) and is removed if the write fails; a SIGKILL can leave it, and the next save
    of the same file, or the next run in the folder, replaces or removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # already gone after the rename
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written with :func:`write_atomically` on local
    disks (other filesystems keep Lightning's own save)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        local = isinstance(get_filesystem(path), LocalFileSystem)
        if storage_options is not None or not local:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(path, buffer.getbuffer())


# ---------------------------------------------------------------- identity


def read_run_id(run_dir: Path) -> str | None:
    """The id in ``run_dir/run.json``, or None (no file: a new folder or an older run)."""
    try:
        return json.loads((run_dir / RUN_FILE).read_text())["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds something a run made that is worth keeping: a checkpoint or
    an exported SAE (in the folder, or in a subfolder per SAE)."""
    return any((run_dir / "lightning").glob("*.ckpt")) or any(
        p.is_file() for p in (*run_dir.glob("sae.safetensors"), *run_dir.glob("*/sae.safetensors"))
    )


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def check_resume(ckpt_path: Path, checkpoint: dict, run_dir: Path) -> None:
    """Refuse to resume ``checkpoint`` into ``run_dir`` when that folder holds another run.

    A checkpoint belongs to the folder whose ``run.json`` has its id; a checkpoint or folder
    from before run ids were recorded belongs to the folder it lies in. A folder that holds no
    run (no checkpoint, no export) takes any checkpoint: a new run that continues it."""
    if not holds_run(run_dir):
        return
    mine, its = read_run_id(run_dir), (checkpoint.get(CKPT_KEY) or {})
    belongs = mine == its.get("id") if mine and its.get("id") else _inside(ckpt_path, run_dir)
    if belongs:
        return
    home = Path(its["dir"]) if its.get("dir") else ckpt_path.resolve().parent.parent
    raise UserError(
        f"--ckpt_path {ckpt_path} is a checkpoint of the run in {home}, not of the run in "
        f"{run_dir}: resume it into its own run folder (--out_dir {home.parent} --run_name "
        f"{home.name}), or pick a new --run_name to continue it in a new folder"
    )


def new_run_id() -> str:
    return uuid.uuid4().hex


def resumed_run_id(
    ckpt_path: Path, checkpoint: dict, run_dir: Path, overwrite: bool, new_id: str
) -> str:
    """The id of a ``fit`` that resumes ``checkpoint`` in ``run_dir``: the folder's own when it
    continues its own run, ``new_id`` when it starts a new run from the checkpoint. Refuses a
    checkpoint of another run (:func:`check_resume`), and an ``--overwrite`` that would delete
    the checkpoint it resumes from."""
    if overwrite and _inside(ckpt_path, run_dir):
        raise UserError(
            f"--overwrite true would delete {run_dir}, which holds --ckpt_path {ckpt_path}: drop "
            "--overwrite to continue that run, or pick a new --run_name"
        )
    if overwrite:
        return new_id  # the folder is replaced: a new run continues the checkpoint
    check_resume(ckpt_path, checkpoint, run_dir)
    if not holds_run(run_dir):
        return new_id
    return read_run_id(run_dir) or (checkpoint.get(CKPT_KEY) or {}).get("id") or new_id


# ---------------------------------------------------------------- --resume auto


class RunFinished(Exception):
    """``--resume auto`` found the run finished: nothing to do (``fit`` exits 0)."""


def _exported_steps(run_dir: Path) -> int | None:
    """The steps recorded in the run's export (``cfg.json``), or None when there is none."""
    cfgs = [*run_dir.glob("cfg.json"), *run_dir.glob("*/cfg.json")]
    if not cfgs:
        return None
    try:
        return int(json.loads(cfgs[0].read_text())["extra"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1  # an export whose step is unknown counts as finished


def last_checkpoint(run_dir: Path) -> Path | None:
    """``lightning/last.ckpt``, else the periodic checkpoint of the highest step, else None."""
    folder = run_dir / "lightning"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    steps = [
        (int(m[1]), p) for p in folder.glob("step*.ckpt") if (m := re.match(r"step(\d+)", p.name))
    ]
    return max(steps)[1] if steps else None


def auto_checkpoint(run_dir: Path, max_steps: int | None) -> Path | None:
    """The checkpoint ``--resume auto`` continues, or None for a new run.

    A run exported at ``max_steps`` or beyond (or with no ``max_steps``) is finished: raises
    :class:`RunFinished`, so a re-submitted cluster job neither retrains nor fails."""
    steps, ckpt = _exported_steps(run_dir), last_checkpoint(run_dir)
    if steps is not None and (
        max_steps is None or max_steps < 0 or steps < 0 or steps >= max_steps
    ):
        raise RunFinished(
            f"{run_dir} is finished (exported at step {steps}): nothing to do; to train it "
            f"further, pass --resume auto with --trainer.max_steps above {steps}"
        )
    if steps is not None and ckpt is None:
        raise UserError(
            f"{run_dir} was exported at step {steps} but has no checkpoint in lightning/ to "
            "continue from: pick a new --run_name, or pass --overwrite true to start it again"
        )
    return ckpt


def plan_resume(
    run_dir: Path, resume: str, ckpt_path: str | None, overwrite: bool, max_steps: int | None
) -> str | None:
    """The ``--ckpt_path`` of a ``fit`` into ``run_dir``, after finishing or undoing an
    interrupted ``--overwrite`` there and resolving ``--resume auto`` (which says what it
    chose on stderr, or raises :class:`RunFinished`)."""
    main = rank_zero_only.rank == 0
    if main:
        recover(run_dir)
    if resume != "auto":
        return ckpt_path
    if ckpt_path:
        raise UserError(
            "--resume auto finds the run folder's own checkpoint, and --ckpt_path names one: "
            "give one of them"
        )
    if overwrite:
        raise UserError(
            "--resume auto continues the run in its folder, and --overwrite true replaces it: "
            "give one of them"
        )
    ckpt = auto_checkpoint(run_dir, max_steps)
    if ckpt is None:
        if main:
            say(f"--resume auto: no checkpoint in {run_dir / 'lightning'}: starting the run")
        return None
    if main:
        step = torch.load(ckpt, weights_only=True, map_location="cpu").get("global_step")
        say(f"--resume auto: continuing {run_dir} from step {step} ({ckpt})")
    return str(ckpt)


# ---------------------------------------------------------------- the folder of one fit


def _aside(run_dir: Path, state: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return run_dir.with_name(f".{run_dir.name}.{state}-{stamp}-{os.getpid()}")


def recover(run_dir: Path) -> None:
    """Finish or undo an ``--overwrite`` that a kill interrupted: a replaced run still aside
    (``.<name>.old-*``: the new run never took a step) is put back; one being deleted
    (``.<name>.deleting-*``: the new run had started) is deleted."""
    for path in sorted(run_dir.parent.glob(f".{run_dir.name}.deleting-*")):
        shutil.rmtree(path, ignore_errors=True)
    for path in sorted(run_dir.parent.glob(f".{run_dir.name}.old-*")):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        os.rename(path, run_dir)
        say(
            f"put back the run in {run_dir}: the --overwrite run that replaced it never took a step"
        )


class RunFolder(Callback):
    """This fit's run folder: writes its id, stamps it into every checkpoint, and replaces
    the previous run (``--overwrite true``) only once this one has taken a step.

    :meth:`begin` runs before the trainer writes anything and :meth:`abandon` if ``fit``
    fails; only the process that writes files (``main``: global rank 0) touches the folder."""

    def __init__(self, run_dir: Path, run_id: str, replace: bool, main: bool):
        self.run_dir, self.run_id, self.replace, self.main = run_dir, run_id, replace, main
        self.old: Path | None = None

    def begin(self) -> None:
        if not self.main:
            return
        if self.replace and self.run_dir.is_dir() and any(self.run_dir.iterdir()):
            self.old = _aside(self.run_dir, "old")
            os.rename(self.run_dir, self.old)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.run_dir / "lightning").glob(".*.partial"):
            stale.unlink()  # a save killed mid-write (see write_atomically)
        record = json.dumps({"id": self.run_id}) + "\n"
        write_atomically(self.run_dir / RUN_FILE, record.encode())

    def started(self) -> None:
        """The new run took a step (or ended): the run it replaces goes."""
        if self.old is not None:
            doomed = _aside(self.run_dir, "deleting")
            os.rename(self.old, doomed)  # a kill from here on finishes the delete (recover)
            self.old = None
            shutil.rmtree(doomed, ignore_errors=True)

    def abandon(self) -> None:
        """The new run failed before its first step: put the replaced run back."""
        if self.old is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            os.rename(self.old, self.run_dir)
            self.old = None
            say(f"the new run stopped before its first step: put back the run in {self.run_dir}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.started()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CKPT_KEY] = {"id": self.run_id, "dir": str(self.run_dir.resolve())}
