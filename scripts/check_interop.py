"""Checks saetrain's SAELens and sparsify files against the real libraries, both ways.

    bash scripts/check_interop.sh        # makes a venv with sae-lens and eai-sparsify, runs this

Export: a random, data-initialised SAE of ours (input scale != 1, so the fold is exercised) is
written in each format and loaded with the library's own loader; its latents (dense, B x
num_latents) and reconstructions are compared with ours on the same inputs. Import: SAEs saved
by the libraries' own classes are read by ``saetrain.load_sae`` and compared the same way.
Then issue #22's architectures, both ways with SAELens: our BatchTopK SAE as its JumpReLU, our
Matryoshka Top-k and BatchTopK SAEs (widths restored on reading back), and SAELens' own
JumpReLU, BatchTopK and Matryoshka BatchTopK SAEs read by us.
Prints one line per check with the max abs differences; exits 1 if any exceeds 1e-5 (fp32).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
if not torch.cuda.is_available():  # sparsify picks its Triton decoder whenever triton imports
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
import sae_lens  # noqa: E402
import sparsify  # noqa: E402
from sae_lens.saes.topk_sae import (  # noqa: E402
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)

from saetrain import SAE, SAEConfig, load_sae  # noqa: E402
from saetrain.interop import export_sae  # noqa: E402

TOL = 1e-5
D_IN, N, K, B = 64, 384, 8, 256
failures: list[str] = []


def dense(acts: torch.Tensor, idx: torch.Tensor, n: int = N) -> torch.Tensor:
    return torch.zeros(acts.shape[0], n, dtype=acts.dtype).scatter(1, idx, acts)


def ours(sae: SAE, x: torch.Tensor, raw: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense latents and x_hat; ``raw``: latents in the units of an exported (folded) SAE,
    otherwise in the SAE's internal scale (as a peer trained with an input scale gives them)."""
    with torch.no_grad():
        acts, idx = sae.encode(x)
        return dense(acts, idx) / (sae.input_scale if raw else 1), sae.decode(acts, idx)


def report(name: str, a: tuple, b: tuple, quirk: bool = False) -> None:
    """Print the max abs differences of (latents, x_hat) pairs; ``quirk``: a peer's own
    behaviour we document, not a failure of ours."""
    d_lat = (a[0] - b[0]).abs().max().item()
    d_rec = (a[1] - b[1]).abs().max().item()
    ok = d_lat < TOL and d_rec < TOL
    if not ok and not quirk:
        failures.append(name)
    scale = max(b[0].abs().max().item(), b[1].abs().max().item())
    tag = "ok  " if ok else "note" if quirk else "FAIL"
    print(f"{tag} {name:56s} latents {d_lat:.1e}  x_hat {d_rec:.1e}  (max |value| {scale:.1f})")


def saelens_outputs(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        feats = sae.encode(x)
        feats = feats.to_dense() if feats.is_sparse else feats
        return feats, sae.decode(feats)


def sparsify_outputs(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        acts, idx, _ = sae.encode(x)
        return dense(acts, idx), sae.decode(acts, idx)


def main() -> int:
    print(
        f"torch {torch.__version__}, sae-lens {sae_lens.__version__}, "
        f"eai-sparsify {version('eai-sparsify')}; d_in={D_IN} num_latents={N} k={K} B={B}"
    )
    torch.manual_seed(0)
    x = torch.randn(B, D_IN) + 0.2
    tmp = Path(tempfile.mkdtemp(prefix="check-interop-"))

    # --- export: ours -> their loaders ---------------------------------------------------------
    meta = {"model": "HuggingFaceTB/SmolLM2-135M", "hookpoint": "layers.5", "layer": 5}
    sae = SAE(SAEConfig(d_in=D_IN, num_latents=N, k=K, extra=meta))
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.W_enc.add_(0.05 * torch.randn_like(sae.W_enc))
    ref = ours(sae, x)

    path = export_sae(sae, tmp / "saelens", "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(path))
    print(f"     SAELens loaded {type(theirs).__name__}, hook {theirs.cfg.metadata.hook_name}")
    report("ours -> SAELens SAE.load_from_disk", saelens_outputs(theirs, x), ref)
    report("ours -> SAELens -> saetrain.load_sae", ours(load_sae(path), x), ref)

    path = export_sae(sae, tmp / "sparsify", "sparsify")
    coder = sparsify.SparseCoder.load_from_disk(path / "layers.5")
    report("ours -> sparsify SparseCoder.load_from_disk", sparsify_outputs(coder, x), ref)
    many = sparsify.SparseCoder.load_many(str(path), local=True)
    print(f"     sparsify load_many found hookpoints {list(many)}")
    report("ours -> sparsify SparseCoder.load_many", sparsify_outputs(many["layers.5"], x), ref)
    out = coder(x)  # forward as well: its reconstruction is sae_out
    report("ours -> sparsify SparseCoder.forward", (ref[0], out.sae_out), ref)
    report("ours -> sparsify -> saetrain.load_sae", ours(load_sae(path), x), ref)

    # --- import: their classes -> saetrain.load_sae --------------------------------------------
    torch.manual_seed(1)
    plain = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=N, k=K))
    rand_(plain)
    plain.save_model(str(tmp / "sl_plain"))
    report(
        "SAELens TopKSAE.save_model -> ours",
        ours(load_sae(tmp / "sl_plain"), x),
        saelens_outputs(plain, x),
    )

    nob = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=N, k=K, apply_b_dec_to_input=False))
    rand_(nob)
    nob.save_model(str(tmp / "sl_nob"))
    report(
        "SAELens TopKSAE apply_b_dec_to_input=False -> ours",
        ours(load_sae(tmp / "sl_nob"), x),
        saelens_outputs(nob, x),
    )

    # A training SAE (rescale_acts_by_decoder_norm=True, decoder rows not unit-norm), saved the
    # two ways its trainer does: checkpoints (save_model) and the final inference model.
    train = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=N, k=K))
    rand_(train)
    want = saelens_outputs(train, x)
    train.save_model(str(tmp / "sl_ckpt"))
    report(
        "SAELens TopKTrainingSAE.save_model (checkpoint) -> ours",
        ours(load_sae(tmp / "sl_ckpt"), x),
        want,
    )
    train.save_inference_model(str(tmp / "sl_final"))
    report(
        "SAELens TopKTrainingSAE.save_inference_model -> ours",
        ours(load_sae(tmp / "sl_final"), x),
        want,
    )
    report(
        "SAELens inference model -> SAELens load_from_disk",
        saelens_outputs(sae_lens.SAE.load_from_disk(str(tmp / "sl_final")), x),
        want,
    )

    # Checkpoints of a run with normalize_activations="expected_average_only_in" keep the scale
    # in activation_scaler.json; SAELens' trainer applies it, its loader does not.
    from sae_lens.training.activation_scaler import ActivationScaler

    cfg = TopKTrainingSAEConfig(
        d_in=D_IN, d_sae=N, k=K, normalize_activations="expected_average_only_in"
    )
    scaled = TopKTrainingSAE(cfg)
    rand_(scaled)
    scaler = ActivationScaler(scaling_factor=0.37)
    with torch.no_grad():
        feats = scaled.encode(scaler(x))
        want = (feats, scaler.unscale(scaled.decode(feats)))
    scaled.save_model(str(tmp / "sl_scaled"))
    scaler.save(str(tmp / "sl_scaled" / "activation_scaler.json"))
    report(
        "SAELens checkpoint + activation_scaler.json -> ours",
        ours(load_sae(tmp / "sl_scaled"), x, raw=False),
        want,
    )
    report(
        "same checkpoint -> SAELens load_from_disk (ignores scale)",
        saelens_outputs(sae_lens.SAE.load_from_disk(str(tmp / "sl_scaled")), x),
        want,
        quirk=True,
    )

    torch.manual_seed(2)
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=N, k=K))
    with torch.no_grad():
        coder.encoder.weight.normal_(0, D_IN**-0.5)
        coder.encoder.bias.normal_(0, 0.1)
        coder.W_dec.normal_()
        coder.set_decoder_norm_to_unit_norm()
        coder.b_dec.normal_(0, 0.1)
    root = tmp / "sp_run"
    coder.save_to_disk(root / "layers.5")
    (root / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    loaded = load_sae(root)  # the run folder: one hookpoint, picked automatically
    print(f"     sparsify run folder -> ours: extra {loaded.cfg.extra}")
    report("sparsify SparseCoder.save_to_disk -> ours", ours(loaded, x), sparsify_outputs(coder, x))

    # SAELens can also read sparsify folders; compare it with sparsify itself.
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

    try:
        via = sae_lens.SAE.load_from_disk(str(root / "layers.5"), converter=sparsify_disk_loader)
        report(
            "sparsify folder -> SAELens sparsify_disk_loader",
            saelens_outputs(via.to(torch.float32), x),
            sparsify_outputs(coder, x),
            quirk=True,
        )
    except Exception as e:  # noqa: BLE001 - a report, not a test
        why = " ".join(str(e).split())[:160]
        print(f"note SAELens' sparsify_disk_loader fails on sparsify's own files: {why}")

    check_jumprelu_and_matryoshka(tmp, x)

    print("all checks passed" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


def l0(outputs: tuple[torch.Tensor, torch.Tensor]) -> float:
    return (outputs[0] > 0).sum(1).float().mean().item()


def check(name: str, ok: bool, detail: str) -> None:
    """A check that is not a comparison of outputs."""
    if not ok:
        failures.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name:56s} {detail}")


def batchtopk_sae(x: torch.Tensor, prefixes: list[int] | None = None) -> SAE:
    """Ours with activation batchtopk, its threshold estimated on a few training-mode batches."""
    meta = {"model": "HuggingFaceTB/SmolLM2-135M", "hookpoint": "layers.5", "layer": 5}
    cfg = SAEConfig(d_in=D_IN, num_latents=N, k=K, activation="batchtopk", extra=meta)
    cfg.threshold_start, cfg.threshold_ema, cfg.matryoshka_prefixes = 0, 0.5, prefixes
    sae = SAE(cfg)
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.W_enc.add_(0.05 * torch.randn_like(sae.W_enc))
        sae.train()
        for _ in range(8):
            sae(x[torch.randperm(B)[: B // 2]])
    return sae.eval()


def check_jumprelu_and_matryoshka(tmp: Path, x: torch.Tensor) -> None:
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    # --- export: ours -> SAELens, as JumpReLU (BatchTopK) and with Matryoshka widths ---------
    torch.manual_seed(3)
    sae = batchtopk_sae(x)
    ref = ours(sae, x)
    path = export_sae(sae, tmp / "sl_jumprelu", "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(path))
    print(
        f"     SAELens loaded {type(theirs).__name__}; our k={K}, L0 at the threshold {l0(ref):.2f}"
    )
    check("ours batchtopk -> SAELens is a JumpReLUSAE", isinstance(theirs, JumpReLUSAE), "")
    report("ours batchtopk -> SAELens JumpReLU load_from_disk", saelens_outputs(theirs, x), ref)
    back = load_sae(path)
    report("ours batchtopk -> SAELens JumpReLU -> saetrain.load_sae", ours(back, x), ref)
    folded = sae.threshold / sae.input_scale  # the threshold of raw activations
    check(
        "  ... loads back a batchtopk SAE at its threshold",
        back.cfg.activation == "batchtopk" and back.uses_threshold,
        f"threshold {float(back.threshold):.4f} (ours / scale {float(folded):.4f})",
    )

    torch.manual_seed(4)
    widths = [48, 128, N]
    topk = SAE(SAEConfig(d_in=D_IN, num_latents=N, k=K, matryoshka_prefixes=widths))
    topk.init_from_data(x)
    for name, m in (("topk", topk), ("batchtopk", batchtopk_sae(x, widths))):
        path = export_sae(m, tmp / f"sl_matryoshka_{name}", "saelens")
        theirs = sae_lens.SAE.load_from_disk(str(path))
        tag = f"ours matryoshka {name} -> SAELens {type(theirs).__name__}"
        report(tag, saelens_outputs(theirs, x), ours(m, x))
        back = load_sae(path)
        report(f"ours matryoshka {name} -> SAELens -> saetrain.load_sae", ours(back, x), ours(m, x))
        meta = theirs.cfg.metadata.training_architecture_details
        check(
            "  ... widths in SAELens' metadata, prefixes restored",
            meta["matryoshka_widths"] == widths and back.cfg.matryoshka_prefixes == widths,
            f"{theirs.cfg.metadata.training_architecture}: {meta}",
        )

    # --- import: SAELens' JumpReLU, BatchTopK and Matryoshka BatchTopK -> saetrain.load_sae ---
    torch.manual_seed(5)
    jump = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=N, apply_b_dec_to_input=False))
    rand_(jump)
    with torch.no_grad():  # one threshold per latent, some <= 0 (then it acts as relu)
        jump.threshold.uniform_(0.5, 1.5)
        jump.threshold[:16] = torch.linspace(-0.2, 0.0, 16)
    jump.save_model(str(tmp / "sl_peer_jumprelu"))
    want = saelens_outputs(jump, x)
    got = ours(load_sae(tmp / "sl_peer_jumprelu"), x)
    report(f"SAELens JumpReLUSAE.save_model -> ours (L0 {l0(want):.1f})", got, want)

    peers = [
        ("BatchTopK", BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {}),
        (
            "MatryoshkaBatchTopK",
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
            {"matryoshka_widths": widths},
        ),
    ]
    for name, cls, cfg_cls, more in peers:
        peer = cls(cfg_cls(d_in=D_IN, d_sae=N, k=K, rescale_acts_by_decoder_norm=True, **more))
        rand_(peer)
        with torch.no_grad():  # a threshold as its training leaves it: kept values' lower end
            acts = peer.encode(x)
            peer.topk_threshold = acts[acts > 0].quantile(0.2).double()
        peer.save_inference_model(str(tmp / f"sl_peer_{name}"))
        inference = sae_lens.SAE.load_from_disk(str(tmp / f"sl_peer_{name}"))
        want = saelens_outputs(inference, x)
        loaded = load_sae(tmp / f"sl_peer_{name}")
        report(
            f"SAELens {name} save_inference_model -> ours (L0 {l0(want):.1f})",
            ours(loaded, x),
            want,
        )
        if more:
            check(
                "  ... matryoshka_widths -> our matryoshka_prefixes",
                loaded.cfg.matryoshka_prefixes == widths,
                f"{loaded.cfg.matryoshka_prefixes}",
            )


def rand_(sae) -> None:
    """Random SAELens weights at a realistic scale: non-zero biases, decoder row norms in
    [0.5, 2] (not unit, so the rescale fold is exercised), latents and x_hat of order 1."""
    with torch.no_grad():
        sae.W_enc.normal_(0, D_IN**-0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.normal_().mul_(
            (torch.rand(N, 1) * 1.5 + 0.5) / sae.W_dec.norm(dim=1, keepdim=True)
        )
        sae.b_dec.normal_(0, 0.1)


if __name__ == "__main__":
    sys.exit(main())
