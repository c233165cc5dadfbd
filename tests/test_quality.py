"""SAE quality in the LM (saetrain.evals.quality, issue #22): loss recovered, KL and the
reconstruction figures on a tiny random Phi-3, with SAEs whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from saetrain import SAE, SAEConfig
from saetrain.data.lm import decoder_layers, load_lm
from saetrain.evals.quality import SCOPES, TokenRules, measure

D, LAYER = 32, 1


def identity_sae() -> SAE:
    """An exact identity: latent i carries max(x_i, 0), latent D + i carries max(-x_i, 0), and
    Top-k with k = D keeps every non-zero one."""
    eye = torch.eye(D)
    w = torch.cat([eye, -eye])  # (2D, D)
    cfg = SAEConfig(d_in=D, num_latents=2 * D, k=D, normalize_activations=False)
    tensors = {"W_enc": w, "b_enc": torch.zeros(2 * D), "W_dec": w.clone(), "b_dec": torch.zeros(D)}
    return SAE.from_tensors(cfg, tensors)


def constant_sae(value: torch.Tensor) -> SAE:
    """An SAE whose reconstruction is ``value`` for every input (its decoder is zero)."""
    cfg = SAEConfig(d_in=D, num_latents=2 * D, k=4, normalize_activations=False)
    tensors = {
        "W_enc": torch.randn(2 * D, D),
        "b_enc": torch.zeros(2 * D),
        "W_dec": torch.zeros(2 * D, D),
        "b_dec": value.clone(),
    }
    return SAE.from_tensors(cfg, tensors)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    model, _ = load_lm(str(tiny_model_dir))
    return model


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (5, 24))
    ids[:, 0] = 256  # BOS: a special token, at position 0
    ids[2, 11] = 257  # EOS inside a packed sequence
    return ids


RULES = TokenRules(special_ids=(256, 257), exclude_first_position=True, outlier_multiple=10.0)


def test_the_identity_recovers_all_the_loss_with_zero_kl_and_fvu(lm, ids):
    out = measure(lm, {"id": identity_sae()}, ids, LAYER, RULES, batch_size=2)["id"]
    for scope in SCOPES:
        f = out[scope]
        assert f["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-5)
        assert f["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-5)
        assert f["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
        assert f["delta_loss"] == pytest.approx(0.0, abs=1e-6)
        assert f["fvu"] == pytest.approx(0.0, abs=1e-10) and f["explained_variance"] == 1.0
        assert f["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
        assert f["kl_zero_ablated"] > 0 and f["ce_zero_ablated"] != f["ce_clean"]


def test_an_sae_that_outputs_the_ablation_value_recovers_none_of_the_loss(lm, ids):
    zero = constant_sae(torch.zeros(D))
    f = measure(lm, {"zero": zero}, ids, LAYER, RULES)["zero"]["all_tokens"]
    assert f["loss_recovered_zero"] == pytest.approx(0.0, abs=1e-6)
    assert f["kl_spliced"] == pytest.approx(f["kl_zero_ablated"], rel=1e-6)
    # The mean ablation's value is the mean activation of the scope's evaluated tokens.
    model_dtype = next(lm.parameters()).dtype
    from saetrain.data.lm import residual_stream

    hidden = residual_stream(lm, ids, [LAYER])[LAYER].to(model_dtype)
    for scope, mask in (
        ("all_tokens", torch.ones(ids.shape, dtype=torch.bool)),
        ("trained_tokens", RULES.mask(ids, hidden.float().norm(dim=-1))),
    ):
        mean = constant_sae(hidden[mask].float().mean(0))
        g = measure(lm, {"mean": mean}, ids, LAYER, RULES, scopes=(scope,))["mean"][scope]
        assert g["loss_recovered_mean"] == pytest.approx(0.0, abs=1e-5)
        assert g["ce_spliced"] == pytest.approx(g["ce_mean_ablated"], rel=1e-6)
        assert g["fvu"] == pytest.approx(1.0, rel=1e-5)  # the mean explains no variance


def test_the_clean_loss_is_the_lms_own_cross_entropy_and_no_hook_is_left(lm, ids):
    f = measure(lm, {"id": identity_sae()}, ids, LAYER, RULES)["id"]["all_tokens"]
    logits = lm(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert f["ce_clean"] == pytest.approx(float(ce), abs=1e-5)
    assert f["tokens"] == ids.numel() and f["predictions"] == ids.shape[0] * (ids.shape[1] - 1)
    assert not any(block._forward_hooks for block in decoder_layers(lm))


def test_trained_tokens_leave_out_special_tokens_and_position_zero(lm, ids):
    sae = SAE(SAEConfig(d_in=D, num_latents=64, k=4))
    f = measure(lm, {"r": sae}, ids, LAYER, RULES)["r"]
    kept = ids.numel() - ids.shape[0] - 1  # BOS at position 0 of each row, one EOS
    assert f["trained_tokens"]["tokens"] <= kept  # massive activations may drop a few more
    assert f["trained_tokens"]["tokens"] >= kept - 3
    assert f["all_tokens"]["tokens"] == ids.numel()
    assert f["trained_tokens"]["l0"] == pytest.approx(4.0)  # Top-k: exactly k per token
    assert 0 <= f["trained_tokens"]["unfired_fraction"] < 1


def test_a_random_sae_sits_between_clean_and_ablated_and_figures_are_consistent(lm, ids):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D, num_latents=64, k=8))
    f = measure(lm, {"r": sae}, ids, LAYER, RULES)["r"]["trained_tokens"]
    for name in ("zero", "mean"):
        ablated = f[f"ce_{name}_ablated"]
        expected = (ablated - f["ce_spliced"]) / (ablated - f["ce_clean"])
        assert f[f"loss_recovered_{name}"] == pytest.approx(expected)
    assert f["delta_loss"] == pytest.approx(f["ce_spliced"] - f["ce_clean"])
    assert f["kl_spliced"] > 0 and math.isfinite(f["fvu"])


def test_several_saes_in_one_call_get_the_figures_each_gets_alone(lm, ids):
    torch.manual_seed(0)
    a, b = SAE(SAEConfig(d_in=D, num_latents=64, k=4)), identity_sae()
    both = measure(lm, {"a": a, "b": b}, ids, LAYER, RULES, batch_size=3)
    alone = measure(lm, {"a": a}, ids, LAYER, RULES, batch_size=3)
    for key, value in alone["a"]["trained_tokens"].items():
        assert both["a"]["trained_tokens"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_a_batchtopk_sae_is_measured_with_its_threshold_and_keeps_it(lm, ids):
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=D, num_latents=64, k=4, activation="batchtopk", threshold_start=0)
    sae = SAE(cfg)
    sae.threshold.fill_(0.05)
    sae.train()  # as in the training callback: measured in eval mode, handed back training
    before = sae.threshold.clone()
    measure(lm, {"b": sae}, ids, LAYER, RULES)
    assert sae.training and torch.equal(sae.threshold, before)
