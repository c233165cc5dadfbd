"""Export to and import from SAELens and sparsify files, format detection, and safe loading.

The last tests use the real libraries and are skipped unless ``sae_lens`` / ``sparsify`` import
(``bash scripts/check_interop.sh`` installs them in a separate venv and compares more cases).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from lmfixtures import error_line
from safetensors import safe_open
from safetensors.torch import save_file

from saetrain import SAE, SAEConfig, UserError, load_sae
from saetrain.cli import main
from saetrain.interop import export_sae

D_IN, N, K = 16, 48, 4
META = {"model": "tiny-lm", "hookpoint": "layers.3", "layer": 3, "ctx_len": 64}


def make_sae() -> SAE:
    """A data-initialised SAE whose input scale is not 1, so exports must fold it."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D_IN, num_latents=N, k=K, extra=dict(META)))
    sae.init_from_data(torch.randn(256, D_IN) * 4 + 1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    return sae


def outputs(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (B, num_latents) latents and the reconstruction."""
    with torch.no_grad():
        acts, idx = sae.encode(x)
        return torch.zeros(x.shape[0], N).scatter(1, idx, acts), sae.decode(acts, idx)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 4 + 1


def shapes(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_then_load_gives_the_same_outputs_as_our_own_format(tmp_path, x, fmt):
    sae = make_sae()
    ours = load_sae(export_sae(sae, tmp_path / "ours", "saetrain"))
    back = load_sae(export_sae(sae, tmp_path / fmt, fmt))
    a, b = outputs(ours, x), outputs(back, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # ... and both match the unfolded SAE up to float rounding.
    acts, idx = sae.encode(x)
    torch.testing.assert_close(b[1], sae.decode(acts, idx), atol=1e-5, rtol=1e-5)
    assert back.cfg.extra["hookpoint"] == "layers.3" and back.cfg.extra["layer"] == 3
    assert back.cfg.extra["model"] == "tiny-lm" and back.cfg.k_aux == sae.cfg.k_aux


def test_saelens_export_has_its_tensor_layout_and_topk_config(tmp_path):
    out = export_sae(make_sae(), tmp_path / "sl", "saelens")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert shapes(out / "sae_weights.safetensors") == {
        "W_enc": (D_IN, N),
        "b_enc": (N,),
        "W_dec": (N, D_IN),
        "b_dec": (D_IN,),
    }
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (D_IN, N, K)
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["dtype"] == "float32" and cfg["rescale_acts_by_decoder_norm"] is False
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["model_name"] == "tiny-lm"
    assert meta["sae_lens_version"] >= "6" and meta["saetrain"]["extra"]["hookpoint"] == "layers.3"


def test_sparsify_export_is_a_hookpoint_folder_with_its_names_and_config(tmp_path):
    out = export_sae(make_sae(), tmp_path / "sp", "sparsify")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "layers.3"]
    assert shapes(out / "layers.3" / "sae.safetensors") == {
        "encoder.weight": (N, D_IN),
        "encoder.bias": (N,),
        "W_dec": (N, D_IN),
        "b_dec": (D_IN,),
    }
    cfg = json.loads((out / "layers.3" / "cfg.json").read_text())
    assert cfg == {
        "activation": "topk",
        "expansion_factor": 3,
        "normalize_decoder": True,
        "num_latents": N,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
    }
    run = json.loads((out / "config.json").read_text())
    assert run == {"model": "tiny-lm", "ctx_len": 64, "hookpoints": ["layers.3"]}


def saelens_folder(path, *, apply_b_dec: bool, rescale: bool, legacy: bool = False):
    """A SAELens Top-k folder written by hand, and its reference forward in SAELens' maths."""
    g = torch.Generator().manual_seed(2)
    W_enc, b_enc = torch.randn(D_IN, N, generator=g) * 0.3, torch.randn(N, generator=g) * 0.1
    W_dec = torch.randn(N, D_IN, generator=g) * (torch.rand(N, 1, generator=g) + 0.5) * 0.3
    b_dec = torch.randn(D_IN, generator=g)
    path.mkdir()
    save_file(
        {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
        str(path / "sae_weights.safetensors"),
    )
    if legacy:  # SAELens < 6
        cfg = {
            "d_in": D_IN,
            "d_sae": N,
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": K},
            "hook_point": "blocks.7.hook_resid_post",
            "model_name": "gpt2",
            "dtype": "float32",
            "apply_b_dec_to_input": apply_b_dec,
            "normalize_activations": False,
        }
    else:
        cfg = {
            "architecture": "topk",
            "d_in": D_IN,
            "d_sae": N,
            "k": K,
            "dtype": "float32",
            "apply_b_dec_to_input": apply_b_dec,
            "rescale_acts_by_decoder_norm": rescale,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": "6.54.12",
                "model_name": "gpt2",
                "hook_name": "blocks.7.hook_resid_post",
            },
        }
    (path / "cfg.json").write_text(json.dumps(cfg))

    def forward(x):
        norm = W_dec.norm(dim=1) if rescale else torch.ones(N)
        pre = ((x - b_dec * apply_b_dec) @ W_enc + b_enc) * norm
        top = pre.topk(K, dim=-1)
        feats = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        return feats, (feats / norm) @ W_dec + b_dec

    return forward


@pytest.mark.parametrize(
    "apply_b_dec,rescale,legacy",
    [(True, False, False), (False, False, False), (True, True, False), (False, False, True)],
)
def test_saelens_folders_load_with_the_same_latents_and_reconstruction(
    tmp_path, x, apply_b_dec, rescale, legacy
):
    forward = saelens_folder(
        tmp_path / "sl", apply_b_dec=apply_b_dec, rescale=rescale, legacy=legacy
    )
    sae = load_sae(tmp_path / "sl")
    got, want = outputs(sae, x), forward(x)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert sae.cfg.extra["layer"] == 7 and sae.cfg.extra["hookpoint"] == "layers.7"
    assert sae.cfg.extra["model"] == "gpt2"


def test_a_parent_folder_with_one_hookpoint_loads_it_and_with_several_asks_for_one(tmp_path):
    sae = make_sae()
    export_sae(sae, tmp_path / "run", "sparsify")
    assert load_sae(tmp_path / "run").cfg.extra["hookpoint"] == "layers.3"
    export_sae(sae, tmp_path / "l10", "sparsify", hookpoint="layers.10")
    (tmp_path / "l10" / "layers.10").rename(tmp_path / "run" / "layers.10")
    with pytest.raises(ValueError, match=r"holds 2 SAEs \(layers\.3, layers\.10\): pass one"):
        load_sae(tmp_path / "run")
    assert load_sae(tmp_path / "run" / "layers.10").cfg.extra["layer"] == 10


def test_unsupported_peer_saes_are_refused_with_the_reason(tmp_path):
    export_sae(make_sae(), tmp_path / "sp", "sparsify")
    cfg_path = tmp_path / "sp" / "layers.3" / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "transcode": True}))
    with pytest.raises(ValueError, match="sparsify transcode=True is not supported"):
        load_sae(tmp_path / "sp")
    export_sae(make_sae(), tmp_path / "sl", "saelens")
    cfg_path = tmp_path / "sl" / "cfg.json"
    saved = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**saved, "architecture": "gated"}))
    with pytest.raises(ValueError, match="SAELens 'gated' SAE; saetrain loads only Top-k and Ju"):
        load_sae(cfg_path.parent)
    cfg_path.write_text(json.dumps({**saved, "architecture": "jumprelu"}))
    with pytest.raises(ValueError, match=r"lacks \['threshold'\]: not a SAELens jumprelu SAE"):
        load_sae(cfg_path.parent)


def test_export_refuses_a_non_empty_folder_unless_overwrite_and_then_replaces_it(tmp_path, x):
    sae = make_sae()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty: choose another --out or pass --overwrite"):
        export_sae(sae, out, "saelens")
    assert (out / "notes.txt").read_text() == "keep me"
    export_sae(sae, out, "saelens", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left


def test_a_failed_export_leaves_the_old_folder_intact_and_nothing_half_written(
    tmp_path, monkeypatch
):
    import saetrain.interop as interop

    out = export_sae(make_sae(), tmp_path / "out", "saelens")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(sae, path, hookpoint):
        (path / "cfg.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(interop, "_write_saelens", broken)
    with pytest.raises(OSError, match="disk full"):
        export_sae(make_sae(), out, "saelens", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(OSError, match="disk full"):
        export_sae(make_sae(), tmp_path / "new", "saelens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def lightning_checkpoint(path, sae: SAE) -> None:
    """A checkpoint laid out like the ones ``fit`` writes (see saetrain/module.py)."""
    state = {f"saes.0_0.sae.{k}": v for k, v in sae.state_dict().items()}
    state["saes.0_0.tokens_since_fired"] = torch.zeros(N, dtype=torch.long)
    state["tokens_seen"] = torch.tensor(5120)
    hp = {
        "d_in": D_IN,
        "num_latents": None,
        "expansion_factor": 3,
        "k": K,
        "lr": 0.01,
        "betas": [0.9, 0.999],
    }
    dm = {"model": "tiny-lm", "layer": 3, "ctx_len": 64, "batch_size": 128}
    ckpt = {
        "epoch": 0,
        "global_step": 40,
        "state_dict": state,
        "hyper_parameters": hp,
        "datamodule_hyper_parameters": dm,
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    torch.save(ckpt, path)


def test_export_command_converts_a_lightning_checkpoint(tmp_path, x, capsys):
    sae = make_sae()
    lightning_checkpoint(tmp_path / "last.ckpt", sae)
    argv = [
        "export",
        "--ckpt",
        str(tmp_path / "last.ckpt"),
        "--format",
        "sparsify",
        "--out",
        str(tmp_path / "sp"),
    ]
    assert main(argv) == 0
    back = load_sae(tmp_path / "sp")
    acts, idx = sae.encode(x)
    torch.testing.assert_close(outputs(back, x)[1], sae.decode(acts, idx), atol=1e-5, rtol=1e-5)
    assert back.cfg.extra["tokens_seen"] == 5120 and back.cfg.extra["steps"] == 40
    assert main(argv) == 2  # the folder now exists
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("saetrain export: error: ") and "pass --overwrite" in err


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"saes.0_0.sae.W_enc": Exploit()}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"GLOBAL (posix|os)\.system.*refusing to unpickle"):
        load_sae(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert (
        main(
            [
                "export",
                "--ckpt",
                str(tmp_path / "evil.ckpt"),
                "--format",
                "saelens",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_latents": 1e12}, "num_latents must be a whole number, got 1000000000000.0"),
        ({"num_latents": 10**12}, f"tensor W_enc has shape ({N}, {D_IN}), expected (10000"),
        ({"k": "4"}, "k must be a whole number, got '4'"),
        ({"d_in": None}, "d_in must be a whole number, got None"),
        ({"auxk_coef": "1/32"}, "auxk_coef must be a finite number, got '1/32'"),
        ({"normalize_activations": "no"}, "normalize_activations must be true or false"),
        ({"num_latents": -1}, "num_latents must be >= 1, got -1"),
    ],
)
def test_a_cfg_json_with_impossible_values_is_one_line_before_anything_is_allocated(
    tmp_path, capsys, monkeypatch, change, message
):
    path = make_sae().save(tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, **change}))

    def no_allocation(*a, **k):
        raise AssertionError("an SAE was allocated from an unchecked cfg.json")

    monkeypatch.setattr(torch, "randn", no_allocation)  # what SAE() allocates first
    with pytest.raises(UserError, match=re.escape(message)) as err:
        load_sae(path)
    assert str(err.value).startswith(str(path))  # names the file
    monkeypatch.undo()
    out = str(tmp_path / "o")
    assert main(["export", "--ckpt", str(path), "--format", "saelens", "--out", out]) == 2
    assert message in error_line(capsys) and not os.path.exists(out)


def test_corrupt_sae_files_and_checkpoints_are_one_line_naming_the_file(tmp_path, capsys):
    path = make_sae().save(tmp_path / "sae")
    weights = (path / "sae.safetensors").read_bytes()
    broken = {
        "sae.safetensors": [weights[: len(weights) // 2], os.urandom(300), b""],
        "cfg.json": [b'{"d_in": 16, "num_l', b"\x89PNG\r\n"],
    }
    for name, contents in broken.items():
        for content in contents:
            good = (path / name).read_bytes()
            (path / name).write_bytes(content)
            with pytest.raises(UserError) as err:
                load_sae(path)
            assert str(path / name) in str(err.value) and "\n" not in str(err.value)
            assert main(["steer", "--sae", str(path), "--features", "[1]"]) == 2
            assert str(path / name) in error_line(capsys)
            (path / name).write_bytes(good)
    ckpt = tmp_path / "last.ckpt"
    lightning_checkpoint(ckpt, make_sae())
    whole = ckpt.read_bytes()
    for content in (whole[: len(whole) // 2], os.urandom(300), b""):
        ckpt.write_bytes(content)
        with pytest.raises(UserError, match=f"{ckpt} is not a readable PyTorch checkpoint"):
            load_sae(ckpt)
        out = str(tmp_path / "o")
        assert main(["export", "--ckpt", str(ckpt), "--format", "saelens", "--out", out]) == 2
        assert f"{ckpt} is not a readable PyTorch checkpoint" in error_line(capsys)


def test_export_never_replaces_the_folder_it_reads_the_sae_from(tmp_path, capsys):
    path = make_sae().save(tmp_path / "run")
    (path / "notes.txt").write_text("keep")
    argv = ["export", "--ckpt", str(path), "--format", "saetrain", "--out", str(path)]
    assert main([*argv, "--overwrite"]) == 2
    assert "which --overwrite would delete with the folder" in error_line(capsys)
    assert (path / "notes.txt").read_text() == "keep"


def test_a_hub_id_that_cannot_be_downloaded_gives_one_clear_line(monkeypatch):
    import huggingface_hub

    def offline(repo_id, allow_patterns=None):
        assert (repo_id, allow_patterns) == ("EleutherAI/sae-pythia-70m-32k", ["layers.3/*"])
        raise ConnectionError("Failed to resolve 'huggingface.co'\nretrying")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as err:
        load_sae("EleutherAI/sae-pythia-70m-32k/layers.3")
    assert "\n" not in str(err.value)
    assert "downloading it from the Hugging Face Hub failed (Failed to resolve" in str(err.value)


def test_sae_lens_loads_our_export_with_the_same_outputs(tmp_path, x):
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae()
    theirs = sae_lens.SAE.load_from_disk(str(export_sae(sae, tmp_path / "sl", "saelens")))
    with torch.no_grad():
        feats = theirs.encode(x)
        recon = theirs.decode(feats)
    ours = outputs(load_sae(tmp_path / "sl"), x)
    assert (feats - ours[0]).abs().max() < 1e-5 and (recon - ours[1]).abs().max() < 1e-5


def test_sparsify_loads_our_export_with_the_same_outputs(tmp_path, x, monkeypatch):
    sparsify = pytest.importorskip("sparsify")
    if not torch.cuda.is_available():  # sparsify picks its Triton decoder whenever triton imports
        monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", sparsify.utils.eager_decode)
    sae = make_sae()
    coder = sparsify.SparseCoder.load_from_disk(
        export_sae(sae, tmp_path / "sp", "sparsify") / "layers.3"
    )
    with torch.no_grad():
        acts, idx, _ = coder.encode(x)
        recon = coder.decode(acts, idx)
    ours = outputs(load_sae(tmp_path / "sp"), x)
    feats = torch.zeros(x.shape[0], N).scatter(1, idx, acts)
    assert (feats - ours[0]).abs().max() < 1e-5 and (recon - ours[1]).abs().max() < 1e-5
