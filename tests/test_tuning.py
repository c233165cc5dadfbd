"""`python -m saetrain tune-kernels` and the stored kernel choices (`saetrain.kernel_choices`):
the files, their lookup and precedence, the tie-aware selection check, and one-line errors.
(The timing runs through the Triton kernels: `test_triton_tune_*` in test_kernels.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import saetrain.kernels.encode as encode_module
import saetrain.kernels.loss as loss_module
import saetrain.kernels.sparse_ops as sparse_ops
import saetrain.kernels.topk as topk_module
from saetrain import kernel_choices as choices
from saetrain import optim, tuning
from saetrain.cli import main
from saetrain.kernels import EncodeOutput, _backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def switches(monkeypatch):
    """Every switch restored after the test, whatever it applies."""
    for module, name in (
        (encode_module, "FUSE_ON_CUDA"),
        (encode_module, "FUSE_UNDER_INTERPRETER"),
        (topk_module, "RADIX_DEVICES"),
        (topk_module, "GROUPED_DEVICES"),
        (sparse_ops, "LATENT_MAJOR"),
        (optim, "FUSE_WHERE_TRITON"),
        (loss_module, "FUSE_LOSSES"),
    ):
        monkeypatch.setattr(module, name, getattr(module, name))


@pytest.fixture
def files(tmp_path, monkeypatch):
    """The user's tuning file and the shipped one, both in tmp_path."""
    user, shipped = tmp_path / "user" / "tuning.json", tmp_path / "shipped.json"
    monkeypatch.setenv(choices.FILE_VAR, str(user))
    monkeypatch.setattr(choices, "SHIPPED_FILE", shipped)
    return user, shipped


def entry(**choices) -> dict:
    return {"choices": choices, "date": "2026-11-26", "precision": "bf16", "shape": {"k": 32}}


def test_apply_sets_each_switch_for_the_device_and_chosen_restores_them(switches):
    before = choices.current("cuda")
    flipped = {name: not on for name, on in before.items()}
    with choices.chosen(flipped, "cuda"):
        assert choices.current("cuda") == flipped
        assert ("cuda" in topk_module.RADIX_DEVICES) == flipped["radix"]
        assert sparse_ops.LATENT_MAJOR == flipped["latent-major"]
        assert encode_module.FUSE_ON_CUDA == flipped["fused-encoder"]
        assert optim.FUSE_WHERE_TRITON == flipped["fused-optimizer"]
        assert loss_module.FUSE_LOSSES == flipped["fused-losses"]
        assert "cpu" in topk_module.GROUPED_DEVICES  # another device's choice is its own
    assert choices.current("cuda") == before
    with pytest.raises(ValueError, match=r"names 'fast'; the switches are fused-encoder, "):
        choices.apply({"fast": True}, "cuda")
    with pytest.raises(ValueError, match="must be true or false"):
        choices.apply({"radix": "yes"}, "cuda")


def test_entries_are_stored_per_device_and_written_whole(files):
    user, _ = files
    choices.write_entry(user, "GPU A (sm_90)", entry(radix=True))
    choices.write_entry(user, "GPU B (sm_80)", entry(radix=False))
    choices.write_entry(user, "GPU A (sm_90)", entry(radix=False, **{"latent-major": True}))
    data = json.loads(user.read_text())
    assert data["version"] == choices.FORMAT_VERSION
    assert data["devices"]["GPU A (sm_90)"]["choices"] == {"radix": False, "latent-major": True}
    assert data["devices"]["GPU B (sm_80)"]["choices"] == {"radix": False}
    assert sorted(p.name for p in user.parent.iterdir()) == ["tuning.json"]  # no temp left


def test_the_users_file_comes_before_the_shipped_one(files):
    user, shipped = files
    assert choices.stored("GPU A (sm_90)") is None
    choices.write_entry(shipped, "GPU A (sm_90)", entry(radix=True))
    choices.write_entry(shipped, "GPU B (sm_80)", entry(radix=True))
    choices.write_entry(user, "GPU A (sm_90)", entry(radix=False))
    assert choices.stored("GPU A (sm_90)") == (entry(radix=False), user)
    assert choices.stored("GPU B (sm_80)") == (entry(radix=True), shipped)


@pytest.mark.parametrize("text", ["{not json", '{"devices": []}', '{"devices": {"G": {}}}'])
def test_an_unreadable_file_is_refused_in_one_line_and_left_as_it_was(files, text):
    user, _ = files
    user.parent.mkdir(parents=True)
    user.write_text(text)
    for call in (lambda: choices.stored("G"), lambda: choices.write_entry(user, "G", entry())):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "is not a saetrain kernel-tuning file" in message
        assert "delete it or point SAETRAIN_TUNING_FILE elsewhere" in message
    assert user.read_text() == text


def test_fit_applies_the_choices_stored_for_its_gpu_unless_the_environment_decides(
    files, switches, monkeypatch
):
    user, _ = files
    cuda = torch.device("cuda", 0)  # never touched: the key is patched
    monkeypatch.setattr(choices, "device_key", lambda device: "GPU A (sm_90)")
    monkeypatch.setattr(_backend, "KERNEL_OPTIONS", frozenset())
    lines = []
    assert choices.use_stored(cuda, log=lines.append) is None  # nothing stored yet
    assert "built-in choices" in lines[-1] and "tune-kernels" in lines[-1]
    stored_choices = {"radix": True, "latent-major": True, "fused-optimizer": False}
    choices.write_entry(user, "GPU A (sm_90)", entry(**stored_choices))
    assert choices.use_stored(torch.device("cpu"), log=lines.append) is None  # not a GPU
    assert choices.use_stored(cuda, log=lines.append) == stored_choices
    assert "cuda" in topk_module.RADIX_DEVICES and sparse_ops.LATENT_MAJOR
    assert not optim.FUSE_WHERE_TRITON
    assert lines[-1].startswith("saetrain kernels on GPU A (sm_90): radix on, latent-major on")
    assert str(user) in lines[-1]

    choices.apply({"radix": False, "latent-major": False, "fused-optimizer": True}, "cuda")
    monkeypatch.setattr(_backend, "KERNEL_OPTIONS", frozenset({"radix"}))  # as if set at import
    assert choices.use_stored(cuda, log=lines.append) is None
    assert "SAETRAIN_KERNEL_OPTIONS is set, so it decides" in lines[-1]
    assert not sparse_ops.LATENT_MAJOR and optim.FUSE_WHERE_TRITON


def tied_bench():
    """A tiny bench whose latent `twin` has the encoder row and bias of the k-th latent of
    token 0, so the two tie on every token; and the selection without ties made plain."""
    cfg = tuning.TuneConfig(d_in=16, num_latents=64, k=4, batch=8, precision="fp32")
    bench = tuning._Bench(cfg, torch.device("cpu"))
    bench.dead = torch.arange(64) >= 48
    out = bench.select(choices.current("cpu"))
    kth = int(out.latent_indices[0, -1])
    picked = set(out.latent_indices[0].tolist())
    twin = next(j for j in range(48) if j not in picked)
    with torch.no_grad():
        bench.sae.W_enc[twin] = bench.sae.W_enc[kth]
        bench.sae.b_enc[twin] = bench.sae.b_enc[kth]
    return bench, bench.select(choices.current("cpu")), twin, kth


def test_the_selection_check_accepts_either_latent_of_a_tie_and_nothing_else():
    bench, ref, twin, kth = tied_bench()
    row = ref.latent_indices[0].tolist()
    assert (twin in row) != (kth in row)  # the tie at the k-th place went one way
    chosen, other = (twin, kth) if twin in row else (kth, twin)

    def variant(**changes) -> EncodeOutput:
        fields = {name: t.clone() for name, t in ref._asdict().items()}
        for name, (row, col, value) in changes.items():
            fields[name][row, col] = value
        return EncodeOutput(**fields)

    col = row.index(chosen)
    assert (
        tuning._selection_error(bench, variant(latent_indices=(0, col, other)), ref, 1e-3) is None
    )
    unrelated = next(j for j in range(48) if j not in (twin, kth, *row))
    why = tuning._selection_error(bench, variant(latent_indices=(0, col, unrelated)), ref, 1e-3)
    assert why == "its latent values are not the pre-activations of the latents it names"
    wrong_value = float(ref.latent_acts[0, col]) * 0.5
    why = tuning._selection_error(bench, variant(latent_acts=(0, col, wrong_value)), ref, 1e-3)
    assert why == "its latent selection picks other values than the starting choices'"
    live = int(ref.latent_indices[0, 0])
    aux_col = int((ref.aux_acts[0] == ref.aux_acts[0].min()).nonzero()[0])
    why = tuning._selection_error(bench, variant(aux_indices=(0, aux_col, live)), ref, 1.0)
    assert why == "its AuxK selection names latents that are not dead"


def test_tune_kernels_without_a_gpu_fails_in_one_line(tmp_path, capsys):
    for device, says in (
        ("cuda", "tune-kernels got --device cuda but torch sees no CUDA GPU here"),
        ("cpu", "tune-kernels times the Triton kernels on a CUDA GPU, and there is none here"),
    ):
        if device == "cuda" and torch.cuda.is_available():
            continue
        if device == "cpu" and _backend.HAS_TRITON and _backend.triton_interpreted():
            continue  # the interpreter runs them (slowly): test_kernels' tune tests
        out = tmp_path / "tuning.json"
        assert main(["tune-kernels", "--device", device, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("saetrain tune-kernels: error: ")
        assert says in err
        assert not out.exists()


def test_tune_kernels_checks_its_options_and_its_file_before_timing(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    for args, says in (
        (["--k", "0"], "k must be >= 1, got 0"),
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
        (["--margin", "1.5"], "margin must be in [0, 1), got 1.5"),
        (["--out", str(bad)], f"{bad} is not a saetrain kernel-tuning file"),
    ):
        assert main(["tune-kernels", "--device", "cuda", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and says in err, err
    assert bad.read_text() == "[]"


def test_tune_kernels_passes_its_options_on_and_stores_unless_told_not_to(
    files, monkeypatch, capsys
):
    user, _ = files
    got = []

    def fake_tune(cfg, device):
        got.append((cfg, device))
        return {"device": "GPU A (sm_90)", "choices": {"radix": True}, "rejected": {}}

    monkeypatch.setattr(tuning, "tune", fake_tune)
    args = "tune-kernels --d-in 64 --num-latents 512 --k 8 --batch 256 --precision fp32"
    assert main([*args.split(), "--dry-run"]) == 0
    assert not user.exists()
    assert got[-1][0].budget_s is None
    assert main([*args.split(), "--device", "cuda:1", "--margin", "0.1", "--budget", "40"]) == 0
    cfg, device = got[-1]
    assert (cfg.d_in, cfg.num_latents, cfg.k, cfg.batch) == (64, 512, 8, 256)
    assert (cfg.precision, cfg.margin, cfg.budget_s, device) == ("fp32", 0.1, 40.0, "cuda:1")
    assert choices.stored("GPU A (sm_90)")[0]["choices"] == {"radix": True}
    assert f"stored for GPU A (sm_90) in {user}" in capsys.readouterr().out


@pytest.fixture
def tuned(monkeypatch):
    """`tuning.tune` replaced by one that records what it was asked to time."""
    got = []

    def fake_tune(cfg, device):
        got.append(cfg)
        return {"device": "GPU A (sm_90)", "choices": {}, "rejected": {}}

    monkeypatch.setattr(tuning, "tune", fake_tune)
    return got


def test_tune_kernels_takes_the_shape_from_a_recipe_and_flags_override_it(
    tuned, tmp_path, tiny_model_dir
):
    phi3 = str(ROOT / "recipes" / "phi3-mini-refusal.yaml")
    # d_in from the flag: the LM's config (on the Hub) is not read.
    assert main(["tune-kernels", "--config", phi3, "--d-in", "3072", "--dry-run"]) == 0
    cfg = tuned[-1]
    assert (cfg.d_in, cfg.num_latents, cfg.k, cfg.batch, cfg.precision) == (
        3072, 24576, 32, 4096, "bf16"
    )  # fmt: skip
    tiny = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    tiny["data"]["model"] = str(tiny_model_dir)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny))
    assert main(["tune-kernels", "--config", str(recipe), "--k", "8", "--dry-run"]) == 0
    d_in = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    cfg = tuned[-1]
    assert (cfg.d_in, cfg.num_latents, cfg.k, cfg.batch, cfg.precision) == (
        d_in, 4 * d_in, 8, 128, "fp32"
    )  # fmt: skip


def test_tune_kernels_refuses_a_recipe_it_cannot_time_in_one_line(tuned, tmp_path, capsys):
    fp16 = tmp_path / "fp16.yaml"
    fp16.write_text("model: {d_in: 64}\ntrainer: {precision: 16-mixed}\n")
    listed = tmp_path / "listed.yaml"
    listed.write_text("- model\n- data\n")
    for recipe, says in (
        (fp16, "trainer.precision '16-mixed'; tune-kernels times bf16 or fp32 steps"),
        (tmp_path / "missing.yaml", "cannot read the recipe"),
        (listed, "is not a fit recipe"),
    ):
        assert main(["tune-kernels", "--config", str(recipe), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and says in err, err
    assert tuned == []
