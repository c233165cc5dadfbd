"""The activation cache: residual-stream activations on disk, so training need not run the LM.

Write one from a fit recipe (only ``data:`` and ``seed_everything`` are read)::

    python -m saetrain cache --config recipes/tiny.yaml --data.model DIR --data.source.path FILE \\
        [--out DIR] [--tokens N] [--shard_tokens N]

It writes the live training stream's activations in stream order, before the activation shuffle
(``ActivationDataModule.train_chunks``), as ``shard-00000.safetensors``, ... each holding one
tensor ``activations`` (<= shard_tokens, d_in); ``val.safetensors`` holds the held-out
activations when ``data.val_documents > 0``; ``manifest.json`` names the model, layer, data and
token counts. The folder is written beside its destination and renamed when complete, so an
interrupted write never leaves something that looks like a finished cache.

:class:`CacheReader` reads it back as shuffled (batch_size, d_in) float32 batches with bounded
memory, mixing several shards at a time, and resumes exactly from its ``state_dict()``. With
``shuffle_shards=False`` and ``seed=data.seed`` its batches are those of the live stream (which
seeds its activation shuffle with ``data.seed + rank`` and its document shuffle apart).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import UserError
from .stream import HandedOut

log = logging.getLogger(__name__)

FORMAT = "saetrain-activation-cache"
VERSION = 1
KEY = "activations"  # the one tensor in every shard and in val.safetensors
VAL_FILE = "val.safetensors"
HOW_TO_MAKE = "make one with `python -m saetrain cache --config RECIPE`"


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse to write a cache over anything: ``out_dir`` must be missing or an empty folder."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty: pick another --out or delete it")


def write_cache(
    out_dir: str | Path,
    chunks: Iterable[Tensor],
    *,
    manifest: dict,
    shard_tokens: int = 1 << 20,
    val: Tensor | None = None,
    max_tokens: int | None = None,
) -> Path:
    """Write activation chunks (N_i, d_in) as shards of ``shard_tokens`` rows; return the folder.

    ``manifest`` must name ``model`` and ``layer``; ``manifest.json`` holds it with the shard
    files, their token counts, ``d_in`` and ``dtype``. At most ``max_tokens`` rows are written
    when set. Memory: one shard's rows plus one chunk.
    """
    out = Path(out_dir)
    check_out_dir(out)
    if shard_tokens < 1 or (max_tokens is not None and max_tokens < 1):
        raise UserError(f"shard_tokens and max tokens must be >= 1: {shard_tokens}, {max_tokens}")
    if "model" not in manifest or "layer" not in manifest:
        raise ValueError(f"the cache manifest must name the model and layer, got {list(manifest)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        shards: list[dict[str, Any]] = []
        pending: list[Tensor] = []  # rows not yet in a shard, (N_i, d_in) each
        n_pending = total = 0
        first: Tensor | None = None

        def flush(rows: int) -> None:
            nonlocal pending, n_pending
            block = torch.cat(pending)  # (n_pending, d_in)
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({KEY: block[:rows].contiguous()}, str(tmp / name))
            shards.append({"file": name, "tokens": rows})
            pending, n_pending = [block[rows:].clone()], n_pending - rows  # frees the shard
            log.info("wrote %s (%d tokens, %d in all)", name, rows, total)

        for chunk in chunks:
            chunk = chunk.detach().cpu()[: None if max_tokens is None else max_tokens - total]
            first = chunk if first is None else first
            if chunk.ndim != 2 or chunk.shape[1:] != first.shape[1:] or chunk.dtype != first.dtype:
                raise ValueError(f"activation chunks must be alike (N, d_in), got {chunk.shape}")
            pending.append(chunk)
            n_pending, total = n_pending + chunk.shape[0], total + chunk.shape[0]
            while n_pending >= shard_tokens:
                flush(shard_tokens)
            if total == max_tokens:
                break
        if n_pending:
            flush(n_pending)
        if first is None or total == 0:
            raise UserError("the data source gave no training activations: nothing to cache")
        d_in = first.shape[1]
        if val is not None:
            if val.ndim != 2 or val.shape[1] != d_in:
                raise ValueError(f"val must be (N, {d_in}), got {tuple(val.shape)}")
            save_file({KEY: val.detach().cpu().contiguous()}, str(tmp / VAL_FILE))
        full = {"format": FORMAT, "version": VERSION, **manifest}
        full.update(
            format=FORMAT,
            version=VERSION,
            hookpoint=manifest.get("hookpoint", f"layers.{manifest['layer']}"),
            d_in=d_in,
            dtype=str(first.dtype).removeprefix("torch."),
            train_tokens=total,
            val_tokens=0 if val is None else int(val.shape[0]),
            val_file=None if val is None else VAL_FILE,
            shards=shards,
        )
        (tmp / "manifest.json").write_text(json.dumps(full, indent=2, default=str) + "\n")
        # mkdtemp makes a private (0700) folder: give it and its files the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, *tmp.iterdir()):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        check_out_dir(out)  # again: something may have appeared there while we wrote
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_manifest(path: str | Path) -> dict:
    """The manifest of the cache in folder ``path``; UserError (one line) if it is not one."""
    p = Path(path)
    file = p / "manifest.json"
    if not p.is_dir() or not file.is_file():
        why = "no manifest.json" if p.is_dir() else "no such folder" if not p.exists() else "a file"
        raise UserError(f"{p} is not a saetrain activation cache ({why}): {HOW_TO_MAKE}")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}): write the cache again") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        raise UserError(
            f"{p} is not a saetrain activation cache (manifest.json has format {fmt!r}, "
            f"not {FORMAT!r}): {HOW_TO_MAKE}"
        )
    if manifest.get("version") != VERSION:
        raise UserError(f"{p} is a version {manifest.get('version')!r} cache, not {VERSION}")
    for shard in manifest.get("shards", []):
        if not (p / shard["file"]).is_file():
            raise UserError(f"{p} lacks {shard['file']}, named in its manifest: write it again")
    return manifest


def check_cache_matches(manifest: dict, *, model: str, layer: int, d_in: int | None = None) -> None:
    """Refuse a cache made from another model, layer or residual width than the run's."""
    ours, theirs = Path(str(model)).expanduser(), Path(str(manifest["model"])).expanduser()
    same_folder = ours.exists() and theirs.exists() and ours.resolve() == theirs.resolve()
    for name, cached, wanted in (
        ("model", manifest["model"], model),
        ("layer", manifest["layer"], layer),
        ("d_in", manifest["d_in"], d_in),
    ):
        if wanted is not None and cached != wanted and not (name == "model" and same_folder):
            raise UserError(
                f"the activation cache was made with {name} {cached!r}, but this run uses "
                f"{wanted!r}: write a cache for this run's data section or use the matching one"
            )


class CacheReader:
    """Shuffled (batch_size, d_in) float32 training batches from a cache folder, resumable.

    One pass over this rank's shards (index ``j % num_shards == shard_index``) is an epoch;
    iterating again after a finished pass starts the next, shuffled with ``seed + epoch``.
    Iteration goes on where the last one stopped, so after :meth:`load_state_dict` it yields
    exactly what the saved reader would have yielded next.

    Rows are read ``read_rows`` at a time through ``safe_open(...).get_slice`` (a shard is never
    loaded whole). With ``shuffle_shards`` the shard order is a permutation drawn from its own
    generator and ``open_shards`` shards are read round robin, so each buffer fill mixes several
    shards; without it shards are read one after another in file order. The rows then go through
    the buffer of :func:`~saetrain.data.activations.shuffle_batches` (shuffle when full, serve the
    first half, end with the rest in whole batches; a last partial batch is dropped), so for one
    shard order the batches equal ``shuffle_batches`` on the same rows and seed. Memory: the
    buffer of ``buffer_size`` rows (the batches waiting to be served are part of it), one read
    of at most ``read_rows``, and the last 4 batches handed out (see :meth:`state_dict`).
    """

    # The position in the stream; with the buffer rows and the generator, the whole state.
    _FIELDS = ("epoch", "order", "next_shard", "open", "turn", "n", "pos", "served", "exhausted")

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int,
        buffer_size: int,
        seed: int = 0,
        shard_index: int = 0,
        num_shards: int = 1,
        shuffle_shards: bool = True,
        read_rows: int = 8192,
        open_shards: int = 4,
    ):
        if min(batch_size, read_rows, open_shards) < 1 or buffer_size < 2 * batch_size:
            raise UserError(
                f"need batch_size, read_rows, open_shards >= 1 and buffer_size >= 2 * batch_size, "
                f"got {batch_size}, {read_rows}, {open_shards} and {buffer_size}"
            )
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        shards = self.manifest["shards"]
        if len(shards) < num_shards:
            raise UserError(
                f"{self.path} holds {len(shards)} shards, fewer than the {num_shards} ranks "
                f"reading it: write it again with --shard_tokens of at most "
                f"{self.manifest['train_tokens'] // num_shards}"
            )
        self.shards: list[dict] = shards[shard_index::num_shards]  # this rank's
        if self.tokens_per_epoch < batch_size:
            raise UserError(
                f"{self.path} holds {self.tokens_per_epoch} tokens for rank {shard_index}, fewer "
                f"than batch_size={batch_size}: write a larger cache or lower batch_size"
            )
        self.d_in: int = self.manifest["d_in"]
        self.config = dict(
            batch_size=batch_size,
            buffer_size=buffer_size,
            seed=seed,
            shard_index=shard_index,
            num_shards=num_shards,
            shuffle_shards=shuffle_shards,
            read_rows=read_rows,
            open_shards=open_shards if shuffle_shards else 1,
        )
        self._files: dict[str, Any] = {}  # open safetensors handles, not part of the state
        self._buf: Tensor | None = None  # (buffer_size, d_in), allocated on the first read
        self.handed_out = HandedOut()  # served again first after a resume: see state_dict
        self._start_epoch(0)

    @property
    def tokens_per_epoch(self) -> int:
        """Training tokens in this rank's shards (each epoch drops fewer than batch_size)."""
        return sum(s["tokens"] for s in self.shards)

    def val(self) -> Tensor | None:
        """The held-out activations (N_val, d_in) as float32, or None when none were cached."""
        if not self.manifest.get("val_file"):
            return None
        return load_file(str(self.path / self.manifest["val_file"]))[KEY].float()

    def _start_epoch(self, epoch: int) -> None:
        seed, count = self.config["seed"] + epoch, len(self.shards)
        order = list(range(count))
        if self.config["shuffle_shards"]:  # own generator: the activation shuffle is unchanged
            order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
        self._epoch, self._order, self._next_shard = epoch, order, 0
        self._open: list[list[int]] = []  # [index in self.shards, next row] per open shard
        self._turn = 0  # which open shard is read next
        self._n = 0  # rows held in the buffer
        self._pos = self._served = 0  # buffer rows [pos, served) are shuffled, yet to be yielded
        self._exhausted = False  # every row read and the last batches scheduled
        self._gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Tensor]:
        if not self.handed_out.replay and self._exhausted and self._pos >= self._served:
            self._start_epoch(self._epoch + 1)
        while (batch := self.handed_out.next(self._next_batch)) is not None:
            yield batch

    def _next_batch(self) -> Tensor | None:
        """Advance the state machine to the next batch (batch_size, d_in); None ends the pass."""
        bs, size = self.config["batch_size"], self.config["buffer_size"]
        while True:
            if self._pos < self._served:
                assert self._buf is not None
                self._pos += bs
                return self._buf[self._pos - bs : self._pos].clone()
            if self._served:  # all served: keep the unserved rest at the front
                assert self._buf is not None
                rest = self._n - self._served
                self._buf[:rest] = self._buf[self._served : self._n].clone()
                self._n, self._pos, self._served = rest, 0, 0
            if self._exhausted:
                return None  # fewer than batch_size rows are left: dropped, as live
            if self._n == size:
                self._serve(size // 2)
                continue
            rows = self._read(size - self._n)  # (<= read_rows, d_in)
            if rows is None:
                self._exhausted = True
                if self._n >= bs:
                    self._serve(self._n)
                continue
            if self._buf is None:
                self._buf = torch.empty(size, self.d_in)
            self._buf[self._n : self._n + rows.shape[0]] = rows
            self._n += rows.shape[0]

    def _serve(self, count: int) -> None:
        """Shuffle the buffer and schedule its first ``count`` rows (whole batches) to yield."""
        assert self._buf is not None
        perm = torch.randperm(self._n, generator=self._gen)
        self._buf[: self._n] = self._buf[: self._n][perm]
        bs = self.config["batch_size"]
        self._served, self._pos = (count // bs) * bs, 0

    def _read(self, space: int) -> Tensor | None:
        """The next rows (N, d_in), N <= min(read_rows, space), round robin over open shards."""
        while len(self._open) < self.config["open_shards"] and self._next_shard < len(self._order):
            self._open.append([self._order[self._next_shard], 0])
            self._next_shard += 1
        if not self._open:
            return None
        self._turn %= len(self._open)
        entry = self._open[self._turn]
        shard, start = self.shards[entry[0]], entry[1]
        stop = min(start + self.config["read_rows"], start + space, shard["tokens"])
        file = shard["file"]
        if file not in self._files:
            self._files[file] = safe_open(str(self.path / file), framework="pt")
        view = self._files[file].get_slice(KEY)
        if view.get_shape() != [shard["tokens"], self.d_in]:
            raise UserError(
                f"{self.path / file} holds {view.get_shape()} activations, not the manifest's "
                f"[{shard['tokens']}, {self.d_in}]: the cache is damaged; write it again"
            )
        rows = view[start:stop].float()
        entry[1] = stop
        if stop == shard["tokens"]:
            del self._open[self._turn], self._files[file]  # the next shard takes this turn
        else:
            self._turn += 1
        return rows

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Everything needed to go on exactly after batch ``consumed`` (default: after every
        batch handed out, counted since this reader was made or restored): the config, the
        shard sizes, the position fields, the buffer's rows (n, d_in), the generator, and the
        batches handed out after ``consumed``, which a restored reader serves first."""
        consumed, replay = self.handed_out.as_of(consumed, "the cache reader's")
        state = {f: copy.deepcopy(getattr(self, "_" + f)) for f in self._FIELDS}
        rows = self._buf[: self._n].clone() if self._buf is not None else torch.empty(0, self.d_in)
        return {
            **state,
            "config": dict(self.config),
            "shard_tokens": [s["tokens"] for s in self.shards],
            "buffer": rows,
            "generator": self._gen.get_state(),
            "replay": [b.clone() for b in replay],
            "consumed": consumed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from :meth:`state_dict` of a reader with the same arguments and cache."""
        for key, value in self.config.items():
            if state["config"][key] != value:
                raise UserError(
                    f"the saved cache reader state has {key}={state['config'][key]!r}, but this "
                    f"reader has {key}={value!r}: resume with the same data settings"
                )
        if state["shard_tokens"] != [s["tokens"] for s in self.shards]:
            raise UserError(f"the saved reader state is from another cache than {self.path}")
        for f in self._FIELDS:
            setattr(self, "_" + f, copy.deepcopy(state[f]))
        self._files.clear()
        self._buf = torch.empty(self.config["buffer_size"], self.d_in)
        self._buf[: self._n] = state["buffer"]
        self._gen = torch.Generator()
        self._gen.set_state(state["generator"])
        self.handed_out.restore(state["consumed"], list(state["replay"]))


def _load_recipe(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist: pass a fit recipe such as recipes/*")
    try:
        config = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        raise UserError(f"{path} has no `data:` section: the cache is made from a fit recipe's")
    return config


def _apply_overrides(data: dict, rest: list[str]) -> None:
    """Set ``--data.a.b VALUE`` (or ``--data.a.b=VALUE``) in ``data``; values are YAML."""
    args = [part for arg in rest for part in (arg.split("=", 1) if arg[:2] == "--" else [arg])]
    if len(args) % 2 or any(not key.startswith("--data.") for key in args[::2]):
        raise UserError(
            f"cache takes --config, --out, --tokens, --shard_tokens and --data.KEY VALUE "
            f"overrides, not {' '.join(rest)!r}"
        )
    for key, value in zip(args[::2], args[1::2], strict=True):
        *parents, leaf = key.split(".")[1:]
        node = data
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise UserError(f"{key}: data.{name} is not a section")
        node[leaf] = yaml.safe_load(value)


def run_cache(args: list[str]) -> None:
    """``python -m saetrain cache``: write a recipe's training activations to a cache folder."""
    parser = argparse.ArgumentParser(
        prog="python -m saetrain cache",
        description="Write a recipe's activations to a cache folder; --data.* overrides the "
        "recipe's data section.",
        allow_abbrev=False,
        exit_on_error=False,
    )
    parser.add_argument("--config", required=True, help="Fit recipe; only data: is used.")
    parser.add_argument("--out", help="Cache folder (default: <out_dir>/<run_name>-cache).")
    parser.add_argument("--tokens", type=int, help="Write at most this many training tokens.")
    parser.add_argument("--shard_tokens", type=int, default=1 << 20, help="Tokens per shard.")
    opts, rest = parser.parse_known_args(args)
    config = _load_recipe(opts.config)
    data = config["data"]
    _apply_overrides(data, rest)
    run = f"{config.get('run_name') or 'sae'}-cache"
    out = Path(opts.out) if opts.out else Path(config.get("out_dir") or "checkpoints") / run
    check_out_dir(out)  # before minutes of LM work

    from jsonargparse import ArgumentParser

    from .datamodule import ActivationDataModule

    data_parser = ArgumentParser(exit_on_error=False)
    data_parser.add_class_arguments(ActivationDataModule, "data")
    dm = data_parser.instantiate(data_parser.parse_object({"data": data})).data
    if len(dm.layers) > 1:
        raise UserError(
            f"data.layer lists {len(dm.layers)} layers but a cache holds one: write one cache "
            "per layer (--data.layer L)"
        )
    dm.d_in  # noqa: B018 -- checks the layer exists before any weights are loaded
    dm.setup()
    # Held-out first: a bad val setting fails before the long write.
    val = torch.cat(dm.val_batches()) if dm.hparams.val_documents > 0 else None
    manifest = {**dm.metadata(), "seed": dm.hparams.seed}
    manifest.update(seed_everything=config.get("seed_everything"), data_module=dict(dm.hparams))

    def chunks():  # the manifest records the documents read, for `evaluate` (issue #22)
        for chunk in dm.train_chunks():
            manifest["documents_read"] = dm.documents_read()
            yield chunk

    path = write_cache(
        out,
        chunks(),
        manifest=manifest,
        shard_tokens=opts.shard_tokens,
        val=val,
        max_tokens=opts.tokens,
    )
    written = load_manifest(path)
    print(
        f"saetrain cache: wrote {path}: {written['train_tokens']} training tokens in "
        f"{len(written['shards'])} shard(s), {written['val_tokens']} validation tokens",
        file=sys.stderr,
    )
