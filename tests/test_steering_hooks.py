"""Steering hooks on tiny random LMs: the clamp keeps the SAE error, the KV cache changes
nothing, positions survive left padding, hooks never leak, and a gate steers only what it flags."""

from __future__ import annotations

import pytest
import torch
from lmfixtures import make_model

from saetrain import SAE, SAEConfig
from saetrain.data.lm import decoder_layers
from saetrain.errors import UserError
from saetrain.steering import (
    FeatureGate,
    Intervention,
    choose_threshold,
    edit,
    fit_probe,
    generate,
    steer,
)
from saetrain.steering.gate import (
    _gate_prompts,
    cross_fit_scores,
    gate_scores,
    pooled_activations,
    prompt_key,
)
from saetrain.steering.generate import left_pad, render
from saetrain.steering.hooks import feature_values, usable_tokens
from saetrain.steering.prompts import PromptSet, load_prompts

PROMPTS = ["the cat sat on the mat", "hi", "a red car and a blue house by the river at night"]


def tiny_sae(seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    return SAE(SAEConfig(d_in=32, num_latents=64, k=4, extra={"layer": 1})).eval()


@pytest.fixture(scope="module", params=["phi3", "llama", "gpt2"])
def lm(request, tokenizer):
    return make_model(request.param, len(tokenizer)).eval()


@pytest.fixture(scope="module")
def phi3(tokenizer):
    return make_model("phi3", len(tokenizer)).eval()


def batch(tokenizer, prompts):
    seqs = [render(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    return left_pad(seqs, tokenizer.pad_token_id)


@torch.no_grad()
def run_generate(model, tokenizer, prompts, ivs=(), *, use_cache=True, new=6, gate=None, sae=None):
    ids, mask = batch(tokenizer, prompts)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=use_cache)
    kw["pad_token_id"] = tokenizer.pad_token_id
    if not ivs and gate is None:
        return model.generate(input_ids=ids, attention_mask=mask, **kw), None
    with steer(model, sae or tiny_sae(), ivs, gate=gate) as s:
        s.prompt_lengths = mask.sum(1)
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    return out, s


@torch.no_grad()
def test_clamping_a_latent_to_its_own_value_returns_the_input_exactly():
    sae = tiny_sae()
    x = torch.randn(8, 32)
    for r in range(8):
        row = x[r : r + 1]
        acts, idx = sae.encode(row)
        r = 0
        active = Intervention([int(idx[r, 0])], "clamp", float(acts[r, 0]))
        inactive = [f for f in range(64) if f not in idx[r].tolist()][0]
        assert torch.equal(edit(sae, row, [active], [torch.ones(1, dtype=torch.bool)]), row)
        ablate = Intervention([inactive], "ablate")
        assert torch.equal(edit(sae, row, [ablate], [torch.ones(1, dtype=torch.bool)]), row)


@torch.no_grad()
def test_clamp_and_add_move_the_stream_only_along_the_decoder_row():
    sae = tiny_sae()
    x = torch.randn(5, 32)
    acts, idx = sae.encode(x)
    f = int(idx[0, 0])
    current = feature_values(acts, idx, torch.tensor([f]))[:, 0]  # (5,)
    everywhere = [torch.ones(5, dtype=torch.bool)]
    clamped = edit(sae, x, [Intervention([f], "clamp", 3.0)], everywhere)
    expected = x + (3.0 - current)[:, None] * sae.W_dec[f]
    torch.testing.assert_close(clamped, expected)
    added = edit(sae, x, [Intervention([f, 7], "add", [2.0, -1.0])], everywhere)
    torch.testing.assert_close(added, x + 2.0 * sae.W_dec[f] - sae.W_dec[7])
    only_two = edit(sae, x, [Intervention([f], "add", 2.0)], [torch.tensor([0, 1, 0, 0, 1]).bool()])
    assert torch.equal(only_two[[0, 2, 3]], x[[0, 2, 3]])


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_steered_generation_with_the_kv_cache_matches_generation_without_it(
    lm, tokenizer, positions
):
    ivs = [Intervention([3, 5], "add", 6.0, positions=positions)]
    cached, _ = run_generate(lm, tokenizer, PROMPTS, ivs, use_cache=True)
    uncached, _ = run_generate(lm, tokenizer, PROMPTS, ivs, use_cache=False)
    plain, _ = run_generate(lm, tokenizer, PROMPTS)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain), "the intervention should change the generation"


def test_generated_only_steering_spares_the_prompt_and_edits_every_generated_token(phi3, tokenizer):
    ivs = [Intervention([3], "add", 6.0, positions="generated")]
    steered, s = run_generate(phi3, tokenizer, PROMPTS, ivs, new=5)
    plain, _ = run_generate(phi3, tokenizer, PROMPTS, new=5)
    T = batch(tokenizer, PROMPTS)[0].shape[1]
    assert torch.equal(steered[:, T], plain[:, T]), "the first token comes from the unedited prompt"
    # Generated tokens 1..4 re-enter the model (the 5th never does): one edit per row and step.
    assert s.edited_tokens == len(PROMPTS) * 4


def test_positions_count_real_tokens_so_left_padding_does_not_change_the_result(phi3, tokenizer):
    ivs = [Intervention([3], "add", 6.0, start=12)]
    alone, _ = run_generate(phi3, tokenizer, PROMPTS[1:2], ivs)
    padded, _ = run_generate(phi3, tokenizer, PROMPTS, ivs)  # PROMPTS[1] is left-padded here
    assert torch.equal(alone[0, -6:], padded[1, -6:])


def test_hooks_are_removed_after_the_block_even_when_it_raises(phi3, tokenizer):
    block = decoder_layers(phi3)[1]
    before = (len(phi3._forward_hooks), len(phi3._forward_pre_hooks), len(block._forward_hooks))
    ids, mask = batch(tokenizer, PROMPTS)
    plain = phi3(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(RuntimeError, match="boom"):
        with steer(phi3, tiny_sae(), Intervention([3], "add", 6.0)):
            assert phi3(input_ids=ids, attention_mask=mask).logits.ne(plain).any()
            raise RuntimeError("boom")
    after = (len(phi3._forward_hooks), len(phi3._forward_pre_hooks), len(block._forward_hooks))
    assert after == before
    assert torch.equal(phi3(input_ids=ids, attention_mask=mask).logits, plain)


def test_the_gate_steers_only_the_prompts_it_flags(phi3, tokenizer):
    sae = tiny_sae()
    pair = [PROMPTS[0], PROMPTS[2]]
    # A feature whose largest value differs between the two prompts, threshold in between.
    for feature in range(64):
        gate = FeatureGate(sae, feature)
        scores = gate_scores(gate, phi3, tokenizer, pair, sae=sae)
        if abs(float(scores[0] - scores[1])) > 1e-3:
            break
    gate.threshold = float(scores.mean())
    flagged = int(scores.argmax())
    ivs = [Intervention([3, 5], "add", 6.0)]
    gated, s = run_generate(phi3, tokenizer, pair, ivs, gate=gate, sae=sae)
    steered, _ = run_generate(phi3, tokenizer, pair, ivs, sae=sae)
    plain, _ = run_generate(phi3, tokenizer, pair)
    assert s.gate_open.tolist() == [i == flagged for i in range(2)]
    assert torch.equal(gated[flagged], steered[flagged])
    assert torch.equal(gated[1 - flagged], plain[1 - flagged])
    assert not torch.equal(steered[1 - flagged], plain[1 - flagged])
    uncached, _ = run_generate(phi3, tokenizer, pair, ivs, gate=gate, sae=sae, use_cache=False)
    assert torch.equal(gated, uncached)
    reported = generate(
        phi3, tokenizer, pair, sae=sae, interventions=ivs, gate=gate, max_new_tokens=2
    )
    assert [g.gate_open for g in reported] == [i == flagged for i in range(2)]


def test_statistics_skip_the_first_position_special_tokens_and_massive_activations():
    acts = torch.ones(1, 6, 4)
    acts[0, 3] *= 500.0  # a massive-activation token
    ids = torch.tensor([[256, 10, 11, 12, 259, 13]])  # BOS ... <|assistant|> ...
    keep = usable_tokens(
        acts,
        torch.ones(1, 6, dtype=torch.bool),
        input_ids=ids,
        ignore_ids=torch.tensor([256, 259]),
        positions=torch.arange(6)[None],
    )
    assert keep.tolist() == [[False, True, True, False, False, True]]


def test_choose_threshold_maximises_tpr_minus_fpr_and_reports_its_rates():
    pos, neg = torch.tensor([0.9, 0.8, 0.7, 0.2]), torch.tensor([0.1, 0.3, 0.25])
    cal = choose_threshold(pos, neg)
    assert cal.threshold == pytest.approx(0.5)
    assert (cal.tpr, cal.fpr, cal.n_positive, cal.n_negative) == (0.75, 0.0, 4, 3)
    assert cal.fpr_interval[0] == 0.0 and 0.0 < cal.fpr_interval[1] < 0.8
    loose = choose_threshold(pos, neg, max_fpr=0.7)
    assert loose.tpr == 1.0 and loose.fpr == pytest.approx(2 / 3)


def test_a_fitted_probe_separates_the_labelled_prompts():
    torch.manual_seed(0)
    direction = torch.randn(32)
    pooled = torch.randn(40, 32) + torch.cat([torch.ones(20), -torch.ones(20)])[:, None] * direction
    probe = fit_probe(pooled, torch.cat([torch.ones(20), torch.zeros(20)]))
    scores = probe.score_pooled(pooled)
    assert (scores[:20] > probe.threshold).all() and (scores[20:] <= probe.threshold).all()


def test_cross_fitted_scores_are_honest_where_a_probe_scores_its_own_training_set_too_well():
    # Labels that are noise: a probe fitted on all 60 prompts separates them anyway (it
    # memorises 100 dimensions), but scores from probes that never saw the prompt do not.
    torch.manual_seed(0)
    pooled, labels = torch.randn(60, 100), (torch.arange(60) % 2).float()
    fold = torch.arange(60) % 3
    fold[:6] = -1  # always in training: no cross-fitted score

    def auc(s, y):
        return float((s[y == 1][:, None] > s[y == 0][None]).float().mean())

    inside = fit_probe(pooled, labels, l2=1e-4).score_pooled(pooled)
    honest = cross_fit_scores(pooled, labels, fold, l2=1e-4)
    assert auc(inside, labels) > 0.99
    assert honest[:6].isnan().all() and not honest[6:].isnan().any()
    assert abs(auc(honest[6:], labels[6:]) - 0.5) < 0.2


def test_gate_sets_keep_each_prompts_index_and_refuse_an_evaluated_one():
    # Folds go by a prompt's index in its own set, so a pair listed with one seed on both sides
    # stays in one fold; an evaluated prompt among them (in any spelling) is an error, never
    # silently dropped.
    spec = PromptSet("builtin:terse-unsafe", seed=0, limit=5)
    second = load_prompts(spec)[1].input
    kept, at = _gate_prompts([spec], set(), "cross_fit_positive")
    assert at == [0, 1, 2, 3, 4] and kept[1] == second
    with pytest.raises(UserError, match="1 of the 5 gate.cross_fit_positive prompts are also"):
        _gate_prompts([spec], {prompt_key(f"  {second.upper()}!")}, "cross_fit_positive")
    assert _gate_prompts([], set(), "val_negative") == ([], [])


@pytest.mark.parametrize("pool", ["mean", "last", "mean+last"])
def test_a_probe_reads_the_prompt_as_an_unpadded_forward_shows_it(phi3, tokenizer, pool):
    # What a probe gate reads during batched, left-padded generation equals what the layer
    # outputs for each prompt alone: the mean over usable tokens and the prompt's last token.
    sae = tiny_sae()
    got = pooled_activations(phi3, tokenizer, PROMPTS, sae=sae, pool=pool, batch_size=3)
    ignore = torch.tensor(tokenizer.all_special_ids)
    for i, prompt in enumerate(PROMPTS):
        ids, mask = batch(tokenizer, [prompt])
        with torch.no_grad():
            h = phi3(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        h = h.hidden_states[2]  # output of decoder layer 1, the SAE's layer
        T = ids.shape[1]
        keep = usable_tokens(
            h, mask.bool(), input_ids=ids, ignore_ids=ignore, positions=torch.arange(T)[None]
        )
        parts = []
        if pool != "last":
            parts.append(h[0][keep[0]].mean(0))
        if pool != "mean":
            parts.append(h[0, -1])
        torch.testing.assert_close(got[i], torch.cat(parts), atol=1e-4, rtol=1e-4)
    assert got.shape == (3, 64 if pool == "mean+last" else 32)


def test_a_last_token_probe_gate_opens_on_what_it_was_fitted_to_flag(phi3, tokenizer):
    sae = tiny_sae()
    feats = pooled_activations(phi3, tokenizer, PROMPTS, sae=sae, pool="last")
    probe = fit_probe(feats, torch.tensor([1.0, 0.0, 1.0]), pool="last", l2=1e-4)
    scores = gate_scores(probe, phi3, tokenizer, PROMPTS, sae=sae)
    assert (scores > probe.threshold).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="pool must be mean, last or mean\\+last"):
        fit_probe(feats, torch.tensor([1.0, 0.0, 1.0]), pool="max")
