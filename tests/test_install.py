"""A fresh install works from the repo root: nothing there shadows an installed distribution.

`python -m saetrain ...` and `python -m pytest` put the current directory first on sys.path, so
a top-level folder or module of the repo named like a distribution's top-level module (a
`kernels/` beside Hugging Face's `kernels`, which transformers imports) replaces it for every
command typed in the repo root (issue 19).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level modules of what saetrain depends on, named here as well as read from the installed
# distributions, so that a shadowing folder is caught even where its distribution is missing.
DEPENDENCY_MODULES = {
    "torch", "lightning", "jsonargparse", "transformers", "datasets", "torchmetrics",
    "tensorboard", "safetensors", "triton", "gguf", "accelerate", "pyarrow", "matplotlib",
    "kernels", "huggingface_hub", "tokenizers", "numpy", "lm_eval", "pytest", "evaluate",
}  # fmt: skip


def importable_names(root: Path) -> set[str]:
    """Names `import NAME` could find in `root`: folders (packages, or namespace packages) and
    `.py` modules whose names are identifiers."""
    names = set()
    for entry in root.iterdir():
        name = entry.stem if entry.suffix == ".py" else entry.name
        if (entry.is_dir() or entry.suffix == ".py") and name.isidentifier():
            names.add(name)
    return names


def shadowed(root: Path) -> dict[str, list[str]]:
    """The names in `root` that an installed distribution (or a dependency) also provides."""
    provided = {k: list(v) for k, v in importlib.metadata.packages_distributions().items()}
    provided.pop("saetrain", None)  # our own package, which the repo root holds
    for name in DEPENDENCY_MODULES:
        provided.setdefault(name, ["(a saetrain dependency)"])
    return {name: provided[name] for name in sorted(importable_names(root)) if name in provided}


def test_no_top_level_folder_or_module_shadows_an_installed_distribution():
    assert shadowed(ROOT) == {}


@pytest.mark.parametrize("planted", ["kernels", "datasets", "lightning", "torch.py"])
def test_the_check_catches_a_planted_top_level_package(tmp_path, planted):
    (tmp_path / "saetrain").mkdir()
    (tmp_path / "tests").mkdir()
    if planted.endswith(".py"):
        (tmp_path / planted).write_text("")
    else:
        (tmp_path / planted).mkdir()
        (tmp_path / planted / "__init__.py").write_text("")
    assert list(shadowed(tmp_path)) == [planted.removesuffix(".py")]


def test_kernels_and_transformers_import_from_outside_the_repo_when_run_from_its_root():
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's kernels distribution is not installed")
    code = (
        "import kernels, transformers, saetrain.kernels; "
        "print(kernels.__file__); print(saetrain.kernels.__file__)"
    )
    # `python -c` puts the current directory first on sys.path, as `python -m` does.
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    theirs, ours = (Path(line) for line in result.stdout.split())
    assert ROOT not in theirs.parents
    assert ours == ROOT / "saetrain" / "kernels" / "__init__.py"
