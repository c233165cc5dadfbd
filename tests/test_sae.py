"""The SAE on its own (no Lightning): shapes, the decoder constraint, AuxK, FVU, init, save/load."""

from __future__ import annotations

import pytest
import torch

from saetrain import SAE, SAEConfig, UserError, load_sae
from saetrain.sae import geometric_median


def make_sae(d_in=16, num_latents=48, k=4, **kw) -> SAE:
    torch.manual_seed(0)
    return SAE(SAEConfig(d_in=d_in, num_latents=num_latents, k=k, **kw))


def test_forward_returns_shapes_and_exactly_k_latents_per_token():
    sae = make_sae()
    x = torch.randn(10, 16)
    out = sae(x)
    assert out.x_hat.shape == (10, 16)
    assert out.latent_acts.shape == (10, 4) and out.latent_indices.shape == (10, 4)
    assert (out.latent_acts >= 0).all()
    assert all(len(set(row.tolist())) == 4 for row in out.latent_indices)
    assert out.fvu.shape == () and out.auxk_loss.shape == ()


def test_topk_picks_the_largest_preactivations():
    sae = make_sae(normalize_activations=False)
    x = torch.randn(6, 16)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    acts, idx = sae.encode(x)
    torch.testing.assert_close(acts.sort(-1).values, pre.topk(4).values.relu().sort(-1).values)
    torch.testing.assert_close(pre.gather(1, idx).relu(), acts)


def test_fvu_is_squared_error_over_total_variance():
    sae = make_sae(normalize_activations=False)
    x = torch.randn(32, 16) * 3 + 1
    out = sae(x)
    expected = (x - out.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, expected)


def test_decoder_starts_unit_norm_and_encoder_is_its_transpose():
    sae = make_sae()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))
    assert torch.equal(sae.W_enc, sae.W_dec)  # both (num_latents, d_in): W_enc.T is W_dec.T


def test_parallel_gradient_is_removed_and_rows_stay_unit_norm_after_steps():
    sae = make_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    for _ in range(5):
        out = sae(torch.randn(64, 16))
        out.fvu.backward()
        sae.remove_parallel_grad()
        dots = (sae.W_dec.grad * sae.W_dec).sum(1)
        torch.testing.assert_close(dots, torch.zeros(48), atol=1e-6, rtol=0)
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))


def test_auxk_loss_trains_only_dead_latents():
    sae = make_sae(k_aux=8)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[[1, 5, 7, 20, 33, 40]] = True
    x = torch.randn(20, 16)
    out = sae(x, dead_mask=dead)
    assert out.auxk_loss > 0
    sae.zero_grad()
    out.auxk_loss.backward()
    rows_with_grad = sae.W_dec.grad.abs().sum(1) > 0
    assert rows_with_grad.any()
    assert not rows_with_grad[~dead].any()
    assert not (sae.W_enc.grad.abs().sum(1) > 0)[~dead].any()


def test_auxk_loss_is_zero_when_no_latent_is_dead():
    sae = make_sae()
    out = sae(torch.randn(8, 16), dead_mask=torch.zeros(48, dtype=torch.bool))
    assert out.auxk_loss == 0


def test_b_dec_initialises_to_the_mean_or_geometric_median_of_the_data():
    x = torch.randn(200, 16) + 5
    sae = make_sae(normalize_activations=False)
    sae.init_from_data(x)
    torch.testing.assert_close(sae.b_dec.data, x.mean(0))
    sae = make_sae(normalize_activations=False, b_dec_init="geometric_median")
    sae.init_from_data(x)
    torch.testing.assert_close(sae.b_dec.data, geometric_median(x), atol=1e-4, rtol=0)
    # The geometric median ignores a far outlier that drags the mean.
    y = torch.cat([torch.zeros(99, 2), torch.tensor([[1000.0, 0.0]])])
    assert geometric_median(y).norm() < 1.0


def test_normalisation_scales_inputs_to_unit_mean_squared_norm():
    sae = make_sae()
    x = torch.randn(500, 16) * 40
    sae.init_from_data(x)
    assert abs((x * sae.input_scale).pow(2).sum(1).mean().item() - 1) < 1e-4


def test_saved_sae_with_folded_normalisation_reproduces_outputs(tmp_path):
    sae = make_sae()
    x = torch.randn(64, 16) * 25 + 3
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_()
    out = sae(x)
    sae.save(tmp_path / "run", metadata={"model": "tiny"})
    loaded = load_sae(tmp_path / "run")
    assert float(loaded.input_scale) == 1.0  # the scale was folded into the weights
    out2 = loaded(x)
    torch.testing.assert_close(out2.x_hat, out.x_hat, atol=1e-4, rtol=1e-4)
    assert torch.equal(out2.latent_indices, out.latent_indices)
    torch.testing.assert_close(out2.latent_acts, out.latent_acts / sae.input_scale)
    assert loaded.cfg.extra["model"] == "tiny"


def test_k_larger_than_num_latents_is_refused_clearly():
    with pytest.raises(ValueError, match="k=64 is larger than num_latents=32"):
        SAEConfig(d_in=8, num_latents=32, k=64)


def test_loading_a_folder_without_an_sae_says_what_is_expected(tmp_path):
    with pytest.raises(UserError, match="cfg.json and sae.safetensors"):
        load_sae(tmp_path)


def test_sae_trains_without_lightning_and_lowers_fvu():
    torch.manual_seed(0)
    # Data that is k-sparse in a random dictionary: a Top-k SAE can fit it well.
    dictionary = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)

    def sample(n):
        idx = torch.randint(0, 64, (n, 3))
        return (torch.rand(n, 3, 1) * dictionary[idx]).sum(1)

    sae = make_sae(num_latents=64, k=3)
    sae.init_from_data(sample(512))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    first = sae(sample(512)).fvu.item()
    for _ in range(300):
        out = sae(sample(256))
        out.fvu.backward()
        sae.remove_parallel_grad()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
    assert sae(sample(2048)).fvu.item() < 0.5 * first


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_the_learning_rate_warms_up_then_decays_to_zero_at_the_last_step(decay):
    from saetrain.module import lr_factor

    f = lr_factor(total=100, warmup=10, decay=decay, decay_start=0.5)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == f(49) == f(50) == 1.0  # constant until half the run
    if decay == "constant":
        assert f(99) == f(100) == 1.0
    else:
        assert 0 < f(75) < 1 and f(100) == pytest.approx(0.0, abs=1e-12)
        assert f(75) == pytest.approx(0.5)  # halfway through the decay, for both shapes
        assert all(f(s) >= f(s + 1) for s in range(10, 100))
    assert lr_factor(total=5, warmup=10)(4) == 1.0  # warm-up never outlasts the run


def test_a_save_killed_between_its_two_renames_loads_the_new_weights_with_their_own_config(
    tmp_path, monkeypatch
):
    from pathlib import Path

    old = SAE(SAEConfig(d_in=8, num_latents=16, k=2))
    old.save(tmp_path / "sae", {"step": 1})
    new = SAE(SAEConfig(d_in=8, num_latents=16, k=3))
    real_replace = Path.replace

    def killed_after_the_weights(self, target):
        if Path(target).name == "cfg.json":
            raise KeyboardInterrupt  # the kill, between the two renames
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", killed_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "sae", {"step": 2})
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="save was interrupted"):
        loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.k == 3 and loaded.cfg.extra["step"] == 2  # the new save, whole
    torch.testing.assert_close(loaded.W_dec, new.W_dec)
    new.save(tmp_path / "sae", {"step": 2})  # the next save ends the torn state
    assert not (tmp_path / "sae" / ".saving").exists()
    # without the marker, cfg.json is the config: hand edits of it count
    edited = (tmp_path / "sae" / "cfg.json").read_text().replace('"step": 2', '"step": 7')
    (tmp_path / "sae" / "cfg.json").write_text(edited)
    assert load_sae(tmp_path / "sae").cfg.extra["step"] == 7
