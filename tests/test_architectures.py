"""BatchTopK (trained on the batch, used as a JumpReLU at its running threshold) and Matryoshka
SAEs (issue #22), on tiny SAEs on the CPU; and one tiny `fit` with ``activation: batchtopk``."""

from __future__ import annotations

import pytest
import torch
from lmfixtures import tiny_fit_args

from saetrain import SAE, SAEConfig, UserError, load_sae
from saetrain.cli import main


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


@pytest.mark.parametrize("format", ["saelens", "sparsify"])
def test_a_batchtopk_sae_is_not_exported_as_a_top_k_one(format, tmp_path):
    from saetrain.interop import export_sae

    sae = make_sae(activation="batchtopk", extra={"hookpoint": "layers.1"})
    with pytest.raises(UserError, match="export it as saetrain"):
        export_sae(sae, tmp_path / "out", format)
    assert not (tmp_path / "out").exists()
