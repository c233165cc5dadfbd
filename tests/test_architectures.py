"""BatchTopK (trained on the batch, used as a JumpReLU at its running threshold) and Matryoshka
SAEs (issue #22), on tiny SAEs on the CPU; one tiny `fit` with ``activation: batchtopk``; their
SAELens export (a JumpReLU; the tests with ``sae_lens`` itself are skipped unless it imports);
the thresholds of two DDP ranks averaged; variants that set them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from lmfixtures import tiny_fit_args
from safetensors import safe_open
from safetensors.torch import save_file

from saetrain import SAE, SAEConfig, UserError, load_sae
from saetrain.cli import main
from saetrain.interop import export_sae


def make_sae(d_in=16, num_latents=64, k=4, **kw) -> SAE:
    torch.manual_seed(0)
    return SAE(SAEConfig(d_in=d_in, num_latents=num_latents, k=k, **kw))


def sample(n: int, d_in: int = 16, seed: int = 0) -> torch.Tensor:
    """Activations from a sparse dictionary: a few of 64 directions per row, plus noise."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(64, d_in, generator=torch.Generator().manual_seed(123))
    codes = torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.06)
    return codes @ dictionary + 0.05 * torch.randn(n, d_in, generator=g)


def train(sae: SAE, steps: int = 150, batch: int = 64) -> None:
    sae.init_from_data(sample(512, seed=1))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sae.train()
    for step in range(steps):
        out = sae(sample(batch, seed=10 + step))
        opt.zero_grad()
        (out.recon_loss + sae.cfg.auxk_coef * out.auxk_loss).backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()


def test_batchtopk_keeps_exactly_k_times_batch_latents_and_rows_differ_in_l0():
    sae = make_sae(activation="batchtopk").train()
    out = sae(sample(32))
    l0 = (out.latent_acts > 0).sum(1)  # (B,)
    assert l0.sum() == 4 * 32  # pre-activations of this init are positive far beyond k * B
    assert l0.min() < l0.max()
    assert out.latent_acts.shape == out.latent_indices.shape == (32, int(l0.max()))


def test_batchtopk_keeps_the_largest_preactivations_of_the_whole_batch():
    sae = make_sae(activation="batchtopk", normalize_activations=False).train()
    x = sample(8)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc  # (B, N)
    out = sae(x)
    kept = out.latent_acts[out.latent_acts > 0].sort().values
    torch.testing.assert_close(kept, pre.flatten().topk(4 * 8).values.relu().sort().values)


def test_auxk_works_with_batchtopk():
    sae = make_sae(activation="batchtopk", k_aux=6).train()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    out = sae(sample(16), dead_mask=dead)
    assert out.auxk_loss > 0
    out.auxk_loss.backward()
    assert sae.W_enc.grad[:10].abs().sum() > 0 and sae.W_enc.grad[10:].abs().sum() == 0


def test_the_threshold_estimated_in_training_gives_about_k_latents_on_held_out_data():
    sae = make_sae(activation="batchtopk", threshold_start=20, threshold_ema=0.95)
    train(sae)
    assert sae.threshold > 0 and int(sae.threshold_steps) == 150
    sae.eval()
    assert sae.uses_threshold
    with torch.no_grad():
        out = sae(sample(2048, seed=999))
    l0 = (out.latent_acts > 0).sum(1).float().mean().item()
    assert 0.8 * 4 <= l0 <= 1.2 * 4, l0


def test_the_threshold_is_an_ema_of_the_smallest_kept_activation_after_the_start():
    sae = make_sae(activation="batchtopk", threshold_start=1, threshold_ema=0.5).train()
    x1, x2, x3 = sample(8, seed=1), sample(8, seed=2), sample(8, seed=3)
    sae(x1)
    assert sae.threshold == -1  # before threshold_start batches: not estimated

    def smallest(x):
        acts = sae(x).latent_acts
        return acts[acts > 0].min()

    first = smallest(x2)
    torch.testing.assert_close(sae.threshold, first)
    second = smallest(x3)
    torch.testing.assert_close(sae.threshold, 0.5 * first + 0.5 * second)


def test_a_saved_batchtopk_sae_loads_with_its_threshold_and_no_batch_dependence(tmp_path):
    sae = make_sae(activation="batchtopk", threshold_start=0, threshold_ema=0.9)
    train(sae, steps=30)
    sae.eval()
    x = sample(64, seed=5) * 3
    with torch.no_grad():
        expected = sae(x)
        sae.save(tmp_path / "sae")
        loaded = load_sae(tmp_path / "sae")
        got = loaded(x)
        alone = [loaded(x[i : i + 1]).x_hat for i in (0, 7, 63)]
    assert loaded.cfg.activation == "batchtopk" and loaded.uses_threshold
    # The saved threshold takes raw activations (the input scale folded in, like b_enc).
    torch.testing.assert_close(loaded.threshold, sae.threshold / sae.input_scale)
    torch.testing.assert_close(got.x_hat, expected.x_hat, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.latent_acts > 0, expected.latent_acts > 0)
    for row, x_hat in zip((0, 7, 63), alone, strict=True):
        torch.testing.assert_close(x_hat[0], got.x_hat[row], atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # and the same on a second load: the tensors, not the process
        torch.testing.assert_close(load_sae(tmp_path / "sae")(x).x_hat, got.x_hat)


def test_matryoshka_loss_is_the_sum_of_each_prefixs_fvu():
    for activation in ("topk", "batchtopk"):
        sae = make_sae(activation=activation, matryoshka_prefixes=[8, 24, 64]).train()
        x = sample(32)
        out = sae(x)
        xs = x * sae.input_scale
        total = (xs - xs.mean(0)).pow(2).sum()
        fvus = []
        for m in (8, 24, 64):
            keep = out.latent_indices < m
            acts = torch.where(keep, out.latent_acts, 0)
            x_hat = (acts[..., None] * sae.W_dec[out.latent_indices]).sum(1) + sae.b_dec
            fvus.append((xs - x_hat).pow(2).sum() / total)
        torch.testing.assert_close(out.recon_loss, sum(fvus), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.fvu, fvus[-1], atol=1e-5, rtol=1e-5)


def test_a_matryoshka_loss_with_one_prefix_is_the_plain_loss():
    out = make_sae(matryoshka_prefixes=[64])(sample(16))
    plain = make_sae()(sample(16))
    torch.testing.assert_close(out.recon_loss, plain.fvu)


@pytest.mark.parametrize(
    "prefixes", [[], [8, 8, 64], [24, 8, 64], [8, 32], [0, 64], [8, 64, 128], "8,64", [8.0, 64]]
)
def test_bad_matryoshka_prefixes_are_refused_in_one_line(prefixes):
    with pytest.raises(UserError, match="matryoshka_prefixes") as e:
        make_sae(matryoshka_prefixes=prefixes)
    assert "\n" not in str(e.value)


def test_an_unknown_activation_is_refused_with_the_allowed_values():
    with pytest.raises(UserError, match="'topk' or 'batchtopk'"):
        make_sae(activation="jumprelu")


def test_fit_trains_a_matryoshka_batchtopk_sae_that_loads_with_its_threshold(
    tiny_model_dir, chat_jsonl, tmp_path
):
    extra = ["--model.activation", "batchtopk", "--model.threshold_start", "5"]
    extra += ["--model.matryoshka_prefixes", "[32, 128]"]
    assert main(tiny_fit_args(tiny_model_dir, chat_jsonl, tmp_path, *extra)) == 0
    sae = load_sae(tmp_path / "tiny")
    assert sae.cfg.activation == "batchtopk" and sae.cfg.matryoshka_prefixes == [32, 128]
    assert sae.uses_threshold and sae.threshold > 0
    assert load_sae(tmp_path / "tiny" / "lightning" / "last.ckpt").uses_threshold


def test_a_batchtopk_sae_is_refused_by_sparsify_in_one_line_saying_what_to_use(tmp_path):
    sae = make_sae(activation="batchtopk", extra={"hookpoint": "layers.1"})
    with pytest.raises(UserError, match="sparsify has no JumpReLU") as e:
        export_sae(sae, tmp_path / "out", "sparsify")
    assert "export it as saelens (a JumpReLU SAE) or saetrain" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_a_batchtopk_sae_without_an_estimated_threshold_is_not_exported_to_saelens(tmp_path):
    sae = make_sae(activation="batchtopk", threshold_start=1000)
    with pytest.raises(UserError, match="threshold is not estimated yet .*threshold_start=1000"):
        export_sae(sae, tmp_path / "out", "saelens")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- SAELens JumpReLU export (#22)


def trained_batchtopk(**kw) -> SAE:
    """A tiny BatchTopK SAE (k=4) trained briefly, its threshold estimated, in eval mode."""
    sae = make_sae(activation="batchtopk", threshold_start=20, threshold_ema=0.95, **kw)
    train(sae)
    return sae.eval()


def dense_outputs(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, num_latents) latents in raw units (the folded export's) and the reconstruction."""
    with torch.no_grad():
        out = sae(x)
        feats = torch.zeros(x.shape[0], sae.cfg.num_latents)
        feats.scatter_(1, out.latent_indices, out.latent_acts.float())
        return feats / sae.input_scale, out.x_hat


def test_a_batchtopk_sae_exports_to_saelens_as_a_jumprelu_and_loads_back_identical(tmp_path):
    sae = trained_batchtopk(extra={"model": "tiny", "hookpoint": "layers.2"})
    out = export_sae(sae, tmp_path / "sl", "saelens")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and (cfg["d_in"], cfg["d_sae"]) == (16, 64)
    assert "k" not in cfg and "rescale_acts_by_decoder_norm" not in cfg
    meta = cfg["metadata"]
    assert meta["training_architecture"] == "batchtopk"
    assert meta["training_architecture_details"] == {"k": 4}
    assert meta["hook_name"] == "blocks.2.hook_resid_post"
    with safe_open(str(out / "sae_weights.safetensors"), framework="pt") as f:
        w = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert sorted(w) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    assert w["threshold"].shape == (64,) and w["W_enc"].shape == (16, 64)
    # One threshold, repeated, in raw units: the input scale folded in as in b_enc.
    torch.testing.assert_close(w["threshold"], (sae.threshold / sae.input_scale).expand(64))
    back = load_sae(out)
    assert back.cfg.activation == "batchtopk" and back.uses_threshold and back.cfg.k == 4
    assert back.threshold.shape == () and back.cfg.extra["hookpoint"] == "layers.2"
    x = sample(256, seed=7) * 3
    want, got = dense_outputs(sae, x), dense_outputs(back, x)
    assert torch.equal(got[0] > 0, want[0] > 0)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no batch dependence: a row alone decodes as in the batch
        torch.testing.assert_close(back(x[3:4]).x_hat[0], got[1][3], atol=1e-6, rtol=1e-6)


def test_the_saelens_jumprelu_export_keeps_the_trained_l0_within_10_percent_held_out(tmp_path):
    # Issue #22's done-when: trained with BatchTopK at k=4 (so an L0 of exactly 4 per token on
    # average in training), the exported JumpReLU gives 4 +- 10% on activations of the same
    # distribution that no training batch held, through our loader and SAELens' own.
    sae = trained_batchtopk()
    out = export_sae(sae, tmp_path / "sl", "saelens")
    held_out = sample(4096, seed=999)
    l0 = (dense_outputs(load_sae(out), held_out)[0] > 0).sum(1).float().mean().item()
    assert 0.9 * 4 <= l0 <= 1.1 * 4, l0
    assert l0 == (dense_outputs(sae, held_out)[0] > 0).sum(1).float().mean().item()
    if importlib.util.find_spec("sae_lens") is None:
        return
    import sae_lens

    theirs = sae_lens.SAE.load_from_disk(str(out))
    assert type(theirs).__name__ == "JumpReLUSAE"
    with torch.no_grad():
        feats = theirs.encode(held_out)
    assert (feats > 0).sum(1).float().mean().item() == l0


def jumprelu_folder(path, *, apply_b_dec: bool):
    """A peer's SAELens JumpReLU folder (one threshold per latent, some <= 0, decoder rows not
    unit-norm), and its forward in SAELens' maths: relu(pre) * (pre > threshold)."""
    g = torch.Generator().manual_seed(3)
    n, d = 64, 16
    W_enc, b_enc = torch.randn(d, n, generator=g) * 0.4, torch.randn(n, generator=g) * 0.2
    W_dec = torch.randn(n, d, generator=g) * (torch.rand(n, 1, generator=g) + 0.5) * 0.3
    b_dec = torch.randn(d, generator=g) * 0.5
    threshold = torch.rand(n, generator=g) * 1.5
    threshold[:4] = 0.0
    threshold[4:8] = -0.3
    path.mkdir()
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    save_file({**tensors, "threshold": threshold}, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": "jumprelu", "d_in": d, "d_sae": n, "dtype": "float32"}
    cfg.update(device="cpu", apply_b_dec_to_input=apply_b_dec, normalize_activations="none")
    cfg["metadata"] = {"sae_lens_version": "6.54.12", "hook_name": "blocks.4.hook_resid_post"}
    (path / "cfg.json").write_text(json.dumps(cfg))

    def forward(x):
        pre = (x - b_dec * apply_b_dec) @ W_enc + b_enc
        feats = pre.relu() * (pre > threshold)
        return feats, feats @ W_dec + b_dec

    return forward


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_a_peers_saelens_jumprelu_with_a_threshold_per_latent_loads_with_the_same_outputs(
    tmp_path, apply_b_dec
):
    forward = jumprelu_folder(tmp_path / "peer", apply_b_dec=apply_b_dec)
    sae = load_sae(tmp_path / "peer")
    assert sae.cfg.activation == "batchtopk" and sae.uses_threshold
    assert sae.threshold.shape == (64,) and sae.cfg.extra["layer"] == 4
    x = sample(512, seed=4) * 2
    want = forward(x)
    got = dense_outputs(sae, x)
    assert torch.equal(got[0] > 0, want[0] > 0) and int((want[0][:, 4:8] > 0).sum()) > 0
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    # ... and the same after a round trip through our own format and through SAELens' again.
    for fmt in ("saetrain", "saelens"):
        again = load_sae(export_sae(sae, tmp_path / fmt, fmt))
        assert again.threshold.shape == (64,)
        torch.testing.assert_close(dense_outputs(again, x)[1], want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_a_matryoshka_sae_exports_to_saelens_with_its_widths_and_loads_back_with_them(
    tmp_path, activation
):
    sae = make_sae(activation=activation, matryoshka_prefixes=[8, 24, 64], threshold_start=0)
    train(sae, steps=10)
    sae.eval()
    out = export_sae(sae, tmp_path / "sl", "saelens")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == {"topk": "topk", "batchtopk": "jumprelu"}[activation]
    meta = cfg["metadata"]
    assert meta["training_architecture"] == f"matryoshka_{activation}"
    assert meta["training_architecture_details"] == {"k": 4, "matryoshka_widths": [8, 24, 64]}
    x = sample(128, seed=8)
    for path in (out, export_sae(sae, tmp_path / "ours", "saetrain")):
        back = load_sae(path)
        assert back.cfg.matryoshka_prefixes == [8, 24, 64] and back.cfg.activation == activation
        torch.testing.assert_close(dense_outputs(back, x)[1], dense_outputs(sae, x)[1])
    # A peer's folder records only SAELens' own metadata: the widths come from it, with the
    # last one (d_sae) added where missing, as SAELens' trainer adds it.
    del meta["saetrain"]
    meta["training_architecture_details"] = {"k": 4.0, "matryoshka_widths": [8, 24]}
    (out / "cfg.json").write_text(json.dumps(cfg))
    peer = load_sae(out)
    assert peer.cfg.matryoshka_prefixes == [8, 24, 64] and peer.cfg.k == 4


def test_sae_lens_loads_our_jumprelu_export_and_its_own_jumprelu_both_ways(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    sae = trained_batchtopk(matryoshka_prefixes=[16, 64])
    x = sample(256, seed=9) * 2
    theirs = sae_lens.SAE.load_from_disk(str(export_sae(sae, tmp_path / "sl", "saelens")))
    assert isinstance(theirs, JumpReLUSAE)
    assert theirs.cfg.metadata.training_architecture == "matryoshka_batchtopk"
    with torch.no_grad():
        feats = theirs.encode(x)
        recon = theirs.decode(feats)
    want = dense_outputs(sae, x)
    assert torch.equal(feats > 0, want[0] > 0)
    assert (feats - want[0]).abs().max() < 1e-5 and (recon - want[1]).abs().max() < 1e-5
    # Theirs -> ours: a JumpReLUSAE with a threshold per latent, saved by SAELens itself.
    peer = JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=64, apply_b_dec_to_input=False))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in (peer.W_enc, peer.b_enc, peer.W_dec, peer.b_dec):
            p.normal_(0, 0.3)
        peer.threshold.uniform_(-0.1, 0.8)
        feats = peer.encode(x)
        want = (feats, peer.decode(feats))
    peer.save_model(str(tmp_path / "peer"))
    got = dense_outputs(load_sae(tmp_path / "peer"), x)
    assert torch.equal(got[0] > 0, want[0] > 0)
    assert (got[0] - want[0]).abs().max() < 1e-5 and (got[1] - want[1]).abs().max() < 1e-5


# ---------------------------------------------------------------- DDP and variants (#22)


def test_averaging_the_ranks_thresholds_when_read_equals_averaging_every_step():
    # Why SAEModule averages the thresholds only where they are read: the estimate is linear in
    # each batch's smallest kept value, so two ranks' estimates averaged at the end equal one
    # estimate fed the two ranks' average at every step.
    from saetrain.architectures import update_threshold_

    g = torch.Generator().manual_seed(0)
    ranks = [(torch.full((), -1.0), torch.zeros((), dtype=torch.long)) for _ in range(2)]
    together = (torch.full((), -1.0), torch.zeros((), dtype=torch.long))
    for _ in range(30):
        kept = [torch.rand(16, generator=g) + 0.1 for _ in ranks]
        for (t, steps), values in zip(ranks, kept, strict=True):
            update_threshold_(t, steps, values, 0.9, 5)
        mean_smallest = torch.stack([v.min() for v in kept]).mean().reshape(1)
        update_threshold_(*together, mean_smallest, 0.9, 5)
    torch.testing.assert_close((ranks[0][0] + ranks[1][0]) / 2, together[0])
    assert together[0] > 0


TWO_RANKS = """
import sys, torch, torch.distributed as dist
from saetrain.module import SAEModule
rank, rendezvous, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
variants = [{}, {"activation": "topk"}, {"k": 3, "num_latents": 32}]
module = SAEModule(d_in=8, num_latents=16, k=2, activation="batchtopk", sae_variants=variants)
saes = module.trained
saes[0].sae.threshold.fill_(1.0 + rank)
saes[2].sae.threshold.fill_(10.0 * (rank + 1))
checkpoint = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}
module.on_save_checkpoint(checkpoint)
saved = {k: v for k, v in checkpoint["state_dict"].items() if k.endswith("threshold")}
saes[0].sae.threshold.fill_(2.0 * rank)
module.on_validation_epoch_start()
torch.save({"saved": saved, "live": saes[0].sae.threshold.clone()}, out)
dist.destroy_process_group()
"""


def test_two_ranks_average_their_thresholds_in_checkpoints_and_before_validation(tmp_path):
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                TWO_RANKS,
                str(r),
                str(tmp_path / "rdv"),
                str(tmp_path / f"{r}"),
            ],
            stderr=subprocess.PIPE,
        )
        for r in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode()[-2000:]
    for r in (0, 1):
        got = torch.load(tmp_path / f"{r}")
        assert got["saved"] == {
            "saes.0_0.sae.threshold": torch.tensor(1.5),
            "saes.0_2.sae.threshold": torch.tensor(15.0),
        }
        assert got["live"] == 1.0  # (0 + 2) / 2


def test_sae_variants_may_set_activation_and_matryoshka_prefixes():
    from saetrain.module import SAEModule

    variants = [{}, {"activation": "batchtopk", "matryoshka_prefixes": [16, 64]}]
    variants.append({"num_latents": 32, "matryoshka_prefixes": [8, 32]})
    module = SAEModule(d_in=16, num_latents=64, k=4, sae_variants=variants)
    cfgs = [t.sae.cfg for t in module.trained]
    assert [c.activation for c in cfgs] == ["topk", "batchtopk", "topk"]
    assert [c.matryoshka_prefixes for c in cfgs] == [None, [16, 64], [8, 32]]
    names = [t.name for t in module.trained]
    assert names == ["sae/64-k4", "sae/64-k4-batchtopk-matryoshka", "sae/32-k4-matryoshka"]
    assert hasattr(module.trained[1].sae, "threshold")


@pytest.mark.parametrize(
    ("variant", "words"),
    [
        ({"activation": "jumprelu"}, "model.sae_variants[1].activation must be 'topk' or 'batc"),
        ({"matryoshka_prefixes": [8, 32]}, "model.sae_variants[1]: matryoshka_prefixes must be"),
        ({"num_latents": 32}, "model.sae_variants[1]: matryoshka_prefixes must be increasing"),
    ],
)
def test_a_variants_bad_activation_or_prefixes_is_refused_naming_the_variant(variant, words):
    from saetrain.module import SAEModule

    base = {"d_in": 16, "num_latents": 64, "k": 4, "matryoshka_prefixes": [16, 64]}
    with pytest.raises(UserError) as e:
        SAEModule(**base, sae_variants=[{}, variant])
    assert words in str(e.value) and "\n" not in str(e.value)
