"""The user's files: JSON and safetensors files read with a one-line error naming the file,
and output folders that never replace anything silently or half-way (issue #21).

A command that writes a folder of results (``features``, ``eval-refusal``, ``eval-capability``,
``export``) refuses a non-empty one unless told to replace it (``--overwrite true``), checks
that before any model loads, and writes into a fresh folder beside it (same filesystem) that is
renamed into place once everything is written. So a command killed at any moment leaves the
previous complete results or the new complete results, never a mix; the old folder is removed
only after the new one is in place::

    check_out_dir(cfg.out_dir, cfg.overwrite)            # before the LM loads: fail fast
    ...                                                    # hours of evaluation
    with staged_dir(cfg.out_dir, cfg.overwrite) as out:  # out: the temporary folder
        (out / "results.json").write_text(text)
    # cfg.out_dir now holds results.json, and nothing of the old folder
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .errors import UserError


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """The JSON value in the file ``path``; a :class:`UserError` naming the file (``what`` it
    is, e.g. "features_table") and what to do (``fix``) when it is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist: {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = " ".join(str(e).split())
        raise UserError(f"{what} {path} is not valid JSON ({why}): {fix}") from None


@contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safe_open(path)`` (tensors read lazily, on demand); a one-line error naming the file
    when it is not a whole safetensors file (truncated, corrupt, another format)."""
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise UserError(
            f"{path} is not a readable safetensors file ({' '.join(str(e).split())}): it is "
            "truncated, corrupt or in another format; write it again"
        ) from None
    with handle as f:
        yield f


def holds_files(path: str | Path) -> bool:
    """Whether ``path`` is a file or a non-empty folder (what an output must not replace)."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def check_out_dir(
    out_dir: str | Path,
    overwrite: bool,
    *,
    inputs: Iterable[str | Path | None] = (),
    option: str = "--out_dir",
    flag: str = "--overwrite true",
) -> Path:
    """Refuse, in one line, an output folder that holds files unless ``overwrite``; and, even
    with ``overwrite``, one that holds the current directory or one of the command's ``inputs``
    (the SAE, a features table), which replacing it would delete. Returns ``out_dir``."""
    out = Path(out_dir)
    if holds_files(out) and not overwrite:
        raise UserError(
            f"{out} already exists and is not empty: choose another {option} or pass {flag} "
            "to replace it"
        )
    if overwrite and out.exists():
        whole = Path(os.path.abspath(out))
        for held in [Path.cwd(), *(Path(p) for p in inputs if p)]:
            held_abs = Path(os.path.abspath(held))
            if held.exists() and (held_abs == whole or whole in held_abs.parents):
                raise UserError(
                    f"{option} {out} holds {held}, which {flag} would delete with the folder: "
                    f"choose another {option}"
                )
    return out


@contextmanager
def staged_dir(
    out_dir: str | Path,
    overwrite: bool,
    *,
    inputs: Iterable[str | Path | None] = (),
    option: str = "--out_dir",
    flag: str = "--overwrite true",
) -> Iterator[Path]:
    """Yield a fresh folder beside ``out_dir`` to write into; on success it becomes ``out_dir``.

    ``out_dir`` is checked first (:func:`check_out_dir`). At the end an old ``out_dir`` is moved
    aside, the new folder renamed into its place, and only then the old one removed. When the
    body fails (an exception, Ctrl-C) the temporary folder is removed and ``out_dir`` is left as
    it was; when ``out_dir`` was filled by something else meanwhile (without ``overwrite``), the
    new results stay in the temporary folder, which the error names.
    """
    inputs = list(inputs)
    out = check_out_dir(out_dir, overwrite, inputs=inputs, option=option, flag=flag)
    whole = Path(os.path.abspath(out))  # "." and "a/.." have a name only once made absolute
    whole.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = whole.with_name(f".{whole.name}.tmp-{tag}")
    old = whole.with_name(f".{whole.name}.old-{tag}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if holds_files(out) and not overwrite:  # filled by something else while this ran
        raise UserError(
            f"{out} was filled by something else while this command ran: its results are in "
            f"{tmp}; move them where you want them"
        )
    moved = out.exists() or out.is_symlink()
    if moved:
        whole.rename(old)
    try:
        tmp.rename(whole)
    except BaseException:
        if moved and not whole.exists():
            old.rename(whole)  # the new folder could not take its place: put the old one back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif moved:
        old.unlink()
