"""Command line: ``python -m saetrain fit --config recipes/quickstart.yaml`` (LightningCLI).

``fit`` trains, ``validate`` measures a checkpoint on held-out activations. Several processes:
``--trainer.strategy ddp`` replicates the SAEs, ``--trainer.strategy fsdp2`` shards them
(:class:`FSDP2Strategy`); Lightning's own ``fsdp`` (FSDP1, flat parameters cut across rows) is
refused. Dotted overrides
(``--model.k 64``) and ``--print_config`` come from LightningCLI. Each run lives in
``<out_dir>/<run_name>/``: the resolved ``config.yaml``, TensorBoard events, Lightning
checkpoints under ``lightning/`` (resume with ``--ckpt_path`` or ``--resume auto``), and at the end
the exported SAE (``cfg.json`` + ``sae.safetensors``, read back with :func:`saetrain.load_sae`).
How a run folder is kept, replaced and resumed: :mod:`saetrain.runs`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .data.datamodule import ActivationDataModule
from .errors import UserError
from .evals.validation import LMValidation
from .module import SAEModule
from .progress import PlainProgress, stdout_is_terminal
from .runs import (
    AtomicCheckpointIO,
    RunFinished,
    RunFolder,
    holds_run,
    new_run_id,
    plan_resume,
    resumed_run_id,
    say,
)

log = logging.getLogger("saetrain")


class FSDP2Strategy(ModelParallelStrategy):
    """Every SAE sharded by rows over all processes with FSDP2 (``--trainer.strategy fsdp2``).

    Lightning's ModelParallelStrategy with all ranks data-parallel (no tensor parallelism);
    ``SAEModule.configure_model`` applies ``fully_shard``. Between steps each rank keeps
    1/world_size of the weights, gradients and Adam's state (the forward and backward gather
    an SAE's weights whole), for SAEs whose optimizer state is too large to replicate (DDP).
    Checkpoints are whole (gathered on rank 0, written atomically like DDP's), so a run
    resumes with ``--ckpt_path`` under either strategy and any number of processes.
    """

    def __init__(self, **kwargs: Any):
        kwargs = {"save_distributed_checkpoint": False, **kwargs}
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, description="saetrain: SAEs sharded by rows with FSDP2"
    )


class ExportSAE(Callback):
    """Writes the trained SAE as ``cfg.json`` + ``sae.safetensors`` when training ends."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        if trainer.interrupted:
            return
        # Sharded SAEs (fsdp2) are assembled by every rank together, then written by rank 0.
        saes = [t.sae.gathered() for t in pl_module.trained]
        dm = trainer.datamodule
        read = dm.documents_read() if hasattr(dm, "documents_read") else None  # every rank
        if not trainer.is_global_zero:
            return
        meta = dm.metadata() if hasattr(dm, "metadata") else {}
        if read is not None:  # `evaluate` skips them for held-out text
            meta["documents_read"] = read
        layers = getattr(dm, "layers", [meta.get("layer")])
        meta.update(tokens_seen=int(pl_module.tokens_seen), steps=int(trainer.global_step))
        several = len(pl_module.trained) > 1
        for i, t in enumerate(pl_module.trained):
            extra = {**meta, "dead_fraction": float(t.dead_mask.float().mean())}
            if len(layers) > 1:
                extra.update(layer=layers[t.hook_index], hookpoint=t.hookpoint)
            prefix = "val/" if not several else f"val/{t.name}/"
            val_fvu = trainer.callback_metrics.get(prefix + "fvu")
            if val_fvu is not None:
                extra["val_fvu"] = float(val_fvu)
            # One SAE: the run folder itself; several: one subfolder each, named after it.
            out = self.run_dir / t.name.replace("/", "__") if several else self.run_dir
            path = saes[i].save(out, metadata=extra)
            log.info("exported the SAE to %s", path)
            print(f"saetrain: exported the SAE to {path}", file=sys.stderr)


class SaveOnSigterm(Callback):
    """On SIGTERM (what cluster schedulers send before a kill), save ``last.ckpt`` at the end of
    the current step, or when Lightning stops the run elsewhere (during validation, say);
    ``main`` then exits with status 143."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.saved_step: int | None = None

    def save(self, trainer) -> None:
        if self.saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.path)  # every rank takes part; rank 0 writes
        self.saved_step = trainer.global_step
        if trainer.is_global_zero:
            print(
                f"saetrain: SIGTERM at step {trainer.global_step}: saved {self.path}; resume "
                f"with --ckpt_path {self.path}",
                file=sys.stderr,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm:
            self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.save(trainer)


def check_checkpoint(path: str | Path) -> None:
    """Refuse a missing, corrupt or truncated checkpoint in one line, before any work."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ckpt_path {path} does not exist: give a .ckpt file of an earlier run")
    bad = not zipfile.is_zipfile(path)
    if not bad:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip() is not None  # reads every entry, checks its CRC
        except (zipfile.BadZipFile, OSError, EOFError):
            bad = True
    if bad:
        raise UserError(
            f"--ckpt_path {path} is corrupt or truncated (not a whole torch checkpoint): resume "
            f"from another checkpoint in {path.parent}"
        )


class LogDataStats(Callback):
    """Logs what the activation stream read and dropped, and the training throughput."""

    def __init__(self, every: int = 10):
        self.every = every
        self._t0: float | None = None
        self._tokens0 = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every:
            return
        now, tokens = time.perf_counter(), int(pl_module.tokens_seen)
        if self._t0 is not None and now > self._t0:
            rate = (tokens - self._tokens0) / (now - self._t0)
            pl_module.log("train/tokens_per_second", rate, prog_bar=True)
        self._t0, self._tokens0 = now, tokens
        producer = getattr(trainer.datamodule, "producer", None)
        if producer is not None:
            s = producer.stats
            pl_module.log_dict(
                {
                    "data/lm_tokens": float(s.tokens),
                    "data/excluded_special_fraction": s.special / max(1, s.tokens),
                    "data/outliers_dropped": float(producer.outliers.dropped),
                }
            )


class SAETrainCLI(LightningCLI):
    """LightningCLI with saetrain's run directory, checkpointing and export wired in."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str, default="sae", help="Name of the run folder.")
        parser.add_argument(
            "--out_dir", type=str, default="checkpoints", help="Folder that holds run folders."
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Allow a new run to replace a run of the same name (deleted once the new run "
            "has taken its first step).",
        )
        parser.add_argument(
            "--resume",
            type=Literal["never", "auto"],
            default="never",
            help="auto: continue the run folder's own last checkpoint if it has one (a finished "
            "run is left as it is, exit 0), else start the run.",
        )
        parser.add_argument(
            "--checkpoint_every",
            type=int,
            default=500,
            help="Save a Lightning checkpoint (for --ckpt_path) every this many steps.",
        )
        parser.add_argument(
            "--progress_every",
            type=float | None,
            default=30.0,
            help="When stdout is not a terminal (a log file), print a plain progress line every "
            "this many seconds of training instead of a progress bar; 0: every step; null: none.",
        )
        parser.add_argument(
            "--val_lm_sequences",
            type=int,
            default=4,
            help="Held-out sequences on which each validation splices the SAE into the LM and "
            "logs val/loss_recovered, val/kl and val/delta_loss (saetrain.evals.validation); 0: "
            "off. Needs the live LM (not data.cache).",
        )
        parser.link_arguments("data.d_in", "model.d_in", apply_on="instantiate")
        parser.link_arguments("data.hookpoints", "model.hookpoints", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` (or find it for ``--resume auto``) before Lightning reads it.

        On resume Lightning replaces the model settings with the checkpoint's, which would
        silently drop a changed ``--model.k``; a changed shape is refused instead, and other
        changed model settings are named in a warning. A checkpoint resumes only into its own
        run folder (:func:`saetrain.runs.check_resume`)."""
        if not self.config.get("subcommand"):
            return super()._parse_ckpt_path()
        sub = self.config[self.config.subcommand]
        fit, run_dir = self.config.subcommand == "fit", Path(sub.out_dir) / sub.run_name
        self._run_id = new_run_id()
        if fit:
            max_steps = sub.get("trainer", {}).get("max_steps")
            sub.ckpt_path = plan_resume(
                run_dir, sub.resume, sub.ckpt_path, sub.overwrite, max_steps
            )
        if sub.get("ckpt_path") and sub.ckpt_path not in ("last", "best", "hpc"):
            check_checkpoint(sub.ckpt_path)
            checkpoint = torch.load(sub.ckpt_path, weights_only=True, map_location="cpu")
            if fit:
                self._run_id = resumed_run_id(
                    Path(sub.ckpt_path), checkpoint, run_dir, sub.overwrite, self._run_id
                )
            saved = checkpoint.get("hyper_parameters", {})
            asked = sub.model
            for name in ("num_latents", "expansion_factor", "k", "sae_variants"):
                if name in saved and asked.get(name) != saved[name]:
                    raise UserError(
                        f"the checkpoint's SAE has {name}={saved[name]} but this run asks for "
                        f"{name}={asked.get(name)}: resume with the same model settings, or start "
                        "a new run"
                    )
            # YAML gives lists where the command line gives tuples (betas): compare as lists.
            changed = [
                n
                for n in saved
                if n in asked and n != "d_in" and _plain(asked[n]) != _plain(saved[n])
            ]
            if changed:
                log.warning("resuming with the checkpoint's model settings; ignoring %s", changed)
        super()._parse_ckpt_path()

    def _sub(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def run_dir(self) -> Path:
        cfg = self._sub()
        return Path(cfg.out_dir) / cfg.run_name

    def before_instantiate_classes(self) -> None:
        cfg = self._sub()
        strategy = cfg.get("trainer", {}).get("strategy")
        name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "")
        if name.startswith("fsdp") and name != "fsdp2" or name.endswith(".FSDPStrategy"):
            raise UserError(
                f"--trainer.strategy {name} (FSDP1) cuts the SAE's rows across ranks, which the "
                "decoder-norm step cannot use: pass --trainer.strategy fsdp2 to shard the SAEs"
            )
        run_dir = self.run_dir()
        finished = holds_run(run_dir)
        if self.subcommand == "fit" and finished and not cfg.ckpt_path and not cfg.overwrite:
            raise UserError(
                f"{run_dir} already holds a run: pick another --run_name, resume it with "
                "--resume auto, or pass --overwrite true to replace it"
            )
        if cfg.get("val_lm_sequences", 0) < 0:
            raise UserError(f"--val_lm_sequences must be >= 0, got {cfg.val_lm_sequences}")
        if self.subcommand == "fit" and cfg.checkpoint_every < 1:
            raise UserError(f"--checkpoint_every must be >= 1, got {cfg.checkpoint_every}")
        self._folder = None
        if self.subcommand == "fit":
            main = rank_zero_only.rank == 0
            self._folder = RunFolder(run_dir, self._run_id, bool(cfg.overwrite), main)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        cfg = self._sub()
        run_dir = self.run_dir()
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if self.subcommand == "fit":
            callbacks.append(
                ModelCheckpoint(
                    dirpath=run_dir / "lightning",
                    filename="step{step}",
                    auto_insert_metric_name=False,
                    every_n_train_steps=cfg.checkpoint_every,
                    save_top_k=1,
                    save_last=True,
                    # last.ckpt is always the run's latest (never a stale one beside last-v1.ckpt),
                    # also when a run folder was moved and resumed (issue #21).
                    enable_version_counter=False,
                )
            )
            callbacks.append(ExportSAE(run_dir))
            callbacks.append(self._folder)
            callbacks.append(SaveOnSigterm(run_dir / "lightning" / "last.ckpt"))
            callbacks.append(LogDataStats())
        if self.subcommand in ("fit", "validate") and cfg.val_lm_sequences > 0:
            callbacks.append(LMValidation(cfg.val_lm_sequences))
        # A log file gets plain lines (saetrain/progress.py), not a bar's carriage returns.
        terminal = stdout_is_terminal()
        if not terminal and trainer_cfg.get("enable_progress_bar") is None:
            kwargs["enable_progress_bar"] = False
        if self.subcommand == "fit" and not terminal and cfg.get("progress_every") is not None:
            callbacks.append(PlainProgress(cfg.progress_every))
        kwargs["callbacks"] = callbacks
        kwargs.setdefault("default_root_dir", str(run_dir))
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(
                save_dir=cfg.out_dir, name=cfg.run_name, version="", default_hp_metric=False
            )
        trainer = super().instantiate_trainer(**kwargs)
        # Every checkpoint (periodic, last, SIGTERM; on any strategy) through one atomic save.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """``fit`` between :meth:`RunFolder.begin` and its end or :meth:`RunFolder.abandon`."""
        folder = self._folder if subcommand == "fit" else None
        if folder is None:
            return super()._run_subcommand(subcommand)
        folder.begin()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            folder.abandon()
            raise
        folder.started()


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, for comparing settings read from YAML and the CLI."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def run_lightning(args: list[str]) -> None:
    """``fit`` / ``validate`` through :class:`SAETrainCLI`."""
    # LightningCLI reads sys.argv[1:], and multi-process launchers start each rank with
    # `python -m saetrain` + sys.argv[1:]: so the arguments go there, whoever called us.
    argv, sys.argv = sys.argv, [sys.argv[0], *args]
    try:
        SAETrainCLI(
            SAEModule,
            ActivationDataModule,
            args=None,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            trainer_defaults={"enable_model_summary": False},
        )
    except RunFinished as done:  # --resume auto on a finished run: nothing to do, exit 0
        say(str(done))
    finally:
        sys.argv = argv


USAGE = """usage: python -m saetrain COMMAND [options]

Train Top-k sparse autoencoders on language-model activations.

commands:
  fit        train an SAE (python -m saetrain fit --config recipes/quickstart.yaml)
  validate   measure a checkpoint on held-out activations (--ckpt_path ...)
  cache      write a recipe's activations to sharded files on disk (--config RECIPE --out DIR)
  export     write an SAE as saetrain, SAELens or sparsify files (--ckpt PATH --format F --out DIR)
  features   rank SAE latents as refusal features (--sae DIR; writes features.json/.txt)
  steer      answer one prompt with and without steering, side by side (--sae DIR --features [ID])
  eval-refusal  refusal rates on unsafe/safe prompts for a sweep of strengths, with plots
  eval-capability  lm-eval scores (MMLU, GSM8K, TruthfulQA) and loss under each strength
  evaluate   FVU, L0, loss recovered and KL of SAEs spliced into their LM (--sae DIR)
  tune-kernels  time the Triton kernels' alternatives on this GPU; `fit` uses the fastest

Run `python -m saetrain COMMAND --help` for a command's options. A problem with the input
prints one line and exits 2; add --debug anywhere (or set SAETRAIN_DEBUG=1) for its traceback.
"""

COMMANDS = {
    "fit": run_lightning,
    "validate": run_lightning,
    # Imported on use, so `fit` does not load the interop code and `export` does not need it.
    "export": lambda args: __import__("saetrain.interop", fromlist=["_"]).export_main(args),
    "cache": lambda a: __import__("saetrain.data.cache", fromlist=["_"]).run_cache(a),
    # Steering (issue #5), imported on use like `export`.
    "features": lambda a: __import__("saetrain.steering", fromlist=["_"]).run_features(a),
    "steer": lambda a: __import__("saetrain.steering", fromlist=["_"]).run_steer(a),
    "eval-refusal": lambda a: __import__(
        "saetrain.evals.commands", fromlist=["_"]
    ).run_eval_refusal(a),
    "eval-capability": lambda a: __import__(
        "saetrain.steering", fromlist=["_"]
    ).run_eval_capability(a),
    "evaluate": lambda a: __import__("saetrain.evals.evaluate", fromlist=["_"]).run_evaluate(a),
    "tune-kernels": lambda a: __import__("saetrain.tuning", fromlist=["_"]).run_tune(a),
}


DEBUG_FLAG, DEBUG_VAR = "--debug", "SAETRAIN_DEBUG"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m saetrain``; returns the exit status.

    A user error (see :func:`_user_facing`) prints one line and returns 2; any other exception
    is a bug and propagates with its traceback (``python -m saetrain`` exits 1). ``--debug``
    anywhere in ``argv``, or ``SAETRAIN_DEBUG=1``, lets user errors propagate too.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in argv:
        argv = [a for a in argv if a != DEBUG_FLAG]
        os.environ[DEBUG_VAR] = "1"  # DDP starts its other ranks with this environment
    debug = os.environ.get(DEBUG_VAR, "") not in ("", "0")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = argv[0]
    if command not in COMMANDS:
        print(f"saetrain: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")
        return 2
    try:
        handler = COMMANDS[command]
        handler(argv if handler is run_lightning else argv[1:])
    except SIGTERMException:  # SaveOnSigterm saved the run first
        print(f"saetrain {command}: stopped by SIGTERM", file=sys.stderr)
        return 143
    except SystemExit as e:  # --help and --print_config exit through argparse
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"saetrain {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        shown = _user_facing(e)
        if shown is None or debug:
            raise
        print(f"saetrain {command}: error: {_one_line(shown)}", file=sys.stderr)
        return 2
    return 0


# Modules whose own exceptions are parse errors (a bad flag, value or config file).
_PARSERS = ("argparse", "jsonargparse", "yaml")


def _user_facing(e: BaseException) -> BaseException | None:
    """The error to print as one line for ``e``, or None when ``e`` is a bug.

    A :class:`UserError` is the user's to fix, an OSError naming a file (or a full disk) the
    machine's. argparse and jsonargparse report a bad flag, value or config file as an
    ArgumentError, chained to the parser's own exceptions. jsonargparse also wraps an error
    raised in a class's ``__init__`` (or a dataclass's ``__post_init__``) while it instantiates
    a Union-typed value (``trainer.callbacks``, ``gate: GateConfig | None``) in a ValueError of
    its own, caused by the original; top-level classes (``model``, ``data``) are not wrapped.
    So look through the parsers' exceptions, and only those: a bug behind a wrapper keeps its
    traceback (the original's, printed above the wrapper's).
    """
    top, seen = e, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError) or _environmental(e):
            return e
        if not (isinstance(e, argparse.ArgumentError) or _raised_in(e, _PARSERS)):
            return None
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return top if isinstance(top, argparse.ArgumentError) else None


def _environmental(e: BaseException) -> bool:
    """An OSError about a file the user named (missing, unreadable, a folder), or a full disk."""
    if not isinstance(e, OSError):
        return False
    return e.filename is not None or e.errno in (errno.ENOSPC, errno.EDQUOT)


def _raised_in(e: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether the innermost frame of ``e``'s traceback is in one of ``packages``."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "").split(".")[0] in packages


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (an OSError's without its ``[Errno N]``)."""
    text = " ".join(str(e).split())
    if isinstance(e, OSError):
        text = re.sub(r"^\[Errno \d+\] ", "", text)
    return text or type(e).__name__
