"""The kernel choices in effect, and those stored per GPU model for `fit` to apply.

Six switches choose between ways of running the same SAE step (`SWITCHES`); which is faster
depends on the GPU, Triton's version and the SAE's shape:

- ``fused-encoder``: the fused matmul + top-k encoder kernel, or cuBLAS's matmul then a
  selection (``saetrain/kernels/encode.py`` FUSE_ON_CUDA);
- ``radix``: the radix-select top-k kernel for those selections (``saetrain/kernels/topk.py``
  RADIX_DEVICES);
- ``grouped-topk``: torch.topk on the maxima of column groups first (GROUPED_DEVICES);
- ``latent-major``: weight-gradient rows summed latent-major, without atomics
  (``saetrain/kernels/sparse_ops.py`` LATENT_MAJOR);
- ``fused-optimizer``: the decoder's projection, Adam update and renormalisation in one pass
  (``saetrain/optim.py`` FUSE_WHERE_TRITON);
- ``fused-losses``: the reconstruction, FVU and AuxK loss in one pass forward and one
  backward (``saetrain/kernels/loss.py`` FUSE_LOSSES).

:func:`current`, :func:`apply` and :func:`chosen` read and set them. ``python -m saetrain
tune-kernels`` (:mod:`saetrain.tuning`) times them on a GPU and stores the winners per GPU
model in a JSON file; ``fit`` applies the stored choices for its GPU when training starts
(:func:`use_stored`). Lookup order: the user's file (``$SAETRAIN_TUNING_FILE``, else
``$XDG_CACHE_HOME/saetrain/kernel-tuning.json``, else ``~/.cache/...``), then the file shipped
in the package (``saetrain/kernels/tuned.json``, written by the project's own GPU runs). A set
``SAETRAIN_KERNEL_OPTIONS`` decides instead of either.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from . import kernels, optim
from .errors import UserError
from .kernels import _backend, sparse_ops
from .kernels import encode as encode_module
from .kernels import loss as loss_module
from .kernels import topk as topk_module

SWITCHES = (
    "fused-encoder", "radix", "grouped-topk", "latent-major", "fused-optimizer", "fused-losses",
)  # fmt: skip
FILE_VAR = "SAETRAIN_TUNING_FILE"
SHIPPED_FILE = Path(kernels.__file__).parent / "tuned.json"
FORMAT_VERSION = 1

Choices = dict[str, bool]


# ---------------------------------------------------------------- the switches


def _fused_flag(device_type: str) -> str:
    """The `encode` flag that turns the fused encoder on for `device_type`."""
    return "FUSE_ON_CUDA" if device_type == "cuda" else "FUSE_UNDER_INTERPRETER"


def current(device_type: str) -> Choices:
    """The choices in effect for tensors on `device_type` ("cuda"; "cpu" under Triton's
    interpreter, where the fused encoder follows ``encode.FUSE_UNDER_INTERPRETER``)."""
    return {
        "fused-encoder": getattr(encode_module, _fused_flag(device_type)),
        "radix": device_type in topk_module.RADIX_DEVICES,
        "grouped-topk": device_type in topk_module.GROUPED_DEVICES,
        "latent-major": sparse_ops.LATENT_MAJOR,
        "fused-optimizer": optim.FUSE_WHERE_TRITON,
        "fused-losses": loss_module.FUSE_LOSSES,
    }


def _checked(choices: Mapping[str, bool], source: str) -> Choices:
    unknown = sorted(set(choices) - set(SWITCHES))
    if unknown:
        raise UserError(
            f"{source} names {', '.join(map(repr, unknown))}; the switches are "
            f"{', '.join(SWITCHES)}."
        )
    if not all(isinstance(v, bool) for v in choices.values()):
        raise UserError(f"{source}: each switch must be true or false, got {dict(choices)}.")
    return dict(choices)


def apply(choices: Mapping[str, bool], device_type: str) -> None:
    """Set the switches named in `choices` for tensors on `device_type` (others unchanged)."""
    choices = _checked(choices, "kernel choices")

    def member(devices: frozenset[str], on: bool) -> frozenset[str]:
        return devices | {device_type} if on else devices - {device_type}

    if "fused-encoder" in choices:
        setattr(encode_module, _fused_flag(device_type), choices["fused-encoder"])
    if "radix" in choices:
        topk_module.RADIX_DEVICES = member(topk_module.RADIX_DEVICES, choices["radix"])
    if "grouped-topk" in choices:
        on = choices["grouped-topk"]
        topk_module.GROUPED_DEVICES = member(topk_module.GROUPED_DEVICES, on)
    if "latent-major" in choices:
        sparse_ops.LATENT_MAJOR = choices["latent-major"]
    if "fused-optimizer" in choices:
        optim.FUSE_WHERE_TRITON = choices["fused-optimizer"]
    if "fused-losses" in choices:
        loss_module.FUSE_LOSSES = choices["fused-losses"]


@contextlib.contextmanager
def chosen(choices: Mapping[str, bool], device_type: str) -> Iterator[None]:
    """`choices` in effect inside the block, the previous ones restored after it."""
    before = current(device_type)
    apply(choices, device_type)
    try:
        yield
    finally:
        apply(before, device_type)


def describe(choices: Mapping[str, bool]) -> str:
    """``radix on, latent-major off, ...`` in `SWITCHES` order."""
    return ", ".join(f"{s} {'on' if choices[s] else 'off'}" for s in SWITCHES if s in choices)


# ---------------------------------------------------------------- the files


def user_file() -> Path:
    """Where `tune` stores results and `use_stored` looks first."""
    if os.environ.get(FILE_VAR):
        return Path(os.environ[FILE_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "saetrain" / "kernel-tuning.json"


def device_key(device: torch.device) -> str:
    """The name results are stored under: the GPU model and its compute capability."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} (Triton interpreter)"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def read_file(path: Path) -> dict:
    """A tuning file's contents, ``{"version": 1, "devices": {key: entry}}``; a missing file
    reads as empty, an unreadable one is a one-line UserError saying what to do."""
    path = Path(path)
    if not path.exists():
        return {"version": FORMAT_VERSION, "devices": {}}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
            raise ValueError("no 'devices' table")
        for key, entry in data["devices"].items():
            _checked(entry["choices"], f"the entry for {key!r}")
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(
            f"{path} is not a saetrain kernel-tuning file ({' '.join(str(e).split())}); "
            f"delete it or point {FILE_VAR} elsewhere, then rerun `python -m saetrain "
            "tune-kernels`"
        ) from None
    return data


def write_entry(path: Path, key: str, entry: dict) -> None:
    """Store `entry` under `key` in the file at `path`, keeping the other devices' entries;
    written to a temporary file and renamed, so a kill leaves the old file whole."""
    path = Path(path)
    data = read_file(path)  # an unreadable file is refused before anything is written
    data["version"] = FORMAT_VERSION
    data["devices"][key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def stored(key: str) -> tuple[dict, Path] | None:
    """The stored entry for `key` and the file it came from: the user's, then the shipped."""
    for path in (user_file(), SHIPPED_FILE):
        entry = read_file(path)["devices"].get(key)
        if entry is not None:
            return entry, path
    return None


def use_stored(device: torch.device, log: Callable[[str], None] = print) -> Choices | None:
    """Apply the choices stored for `device`'s GPU model, if any; returns them (None: none
    stored, not a device the Triton kernels run on, or SAETRAIN_KERNEL_OPTIONS decides)."""
    device = torch.device(device)
    if device.type != "cuda" or not _backend.use_triton(device):
        return None
    key = device_key(device)
    found = stored(key)
    if found is None:
        log(f"saetrain kernels on {key}: built-in choices ({describe(current('cuda'))}); "
            "`python -m saetrain tune-kernels` times the alternatives on this GPU")  # fmt: skip
        return None
    entry, path = found
    if _backend.KERNEL_OPTIONS:  # read from the environment at import, and applied there
        log(f"saetrain kernels on {key}: {_backend.OPTIONS_VAR} is set, so it decides and the "
            f"choices tuned in {path} are not applied")  # fmt: skip
        return None
    apply(entry["choices"], "cuda")
    shape = entry.get("shape", {})
    log(
        f"saetrain kernels on {key}: {describe(entry['choices'])} (tuned {entry.get('date', '?')}"
        f" at d_in {shape.get('d_in')}, {shape.get('num_latents')} latents, k {shape.get('k')}, "
        f"batch {shape.get('batch')}, {entry.get('precision')}; {path})"
    )
    return dict(entry["choices"])
