"""The LM side of the data path: layer lists, the residual-stream hook, the truncated forward,
packing and the exclusion of special tokens and outliers."""

from __future__ import annotations

import itertools

import pytest
import torch
from lmfixtures import make_model

from saetrain.data.activations import (
    ActivationProducer,
    MassiveActivationFilter,
    pack_documents,
    shuffle_batches,
    shuffle_documents,
)
from saetrain.data.lm import (
    LMLoadError,
    capture_layers,
    decoder_layers,
    hidden_size,
    load_lm,
    load_lm_config,
    residual_stream,
)


@pytest.mark.parametrize("arch", ["phi3", "llama", "gpt2"])
def test_decoder_layers_are_found_for_each_family(arch, tokenizer):
    model = make_model(arch, len(tokenizer), num_layers=3)
    layers = decoder_layers(model)
    assert len(layers) == 3
    assert hidden_size(model.config) == 32


@pytest.mark.parametrize("arch", ["phi3", "llama", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_hook_returns_exactly_the_hidden_state_of_that_layer(arch, layer, tokenizer):
    model = make_model(arch, len(tokenizer), num_layers=3).eval()
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
        with capture_layers(model, [layer], stop=False) as store:
            model(ids)
    # hidden_states[L + 1] is the output of layer L, except the last entry, which has the
    # final norm applied by most families; compare the raw layer output there.
    if layer < 2:
        torch.testing.assert_close(store[layer], full[layer + 1])
    truncated = residual_stream(model, ids, [layer])[layer]
    torch.testing.assert_close(truncated, store[layer])


def test_truncated_forward_stops_after_the_deepest_layer(tokenizer):
    model = make_model("phi3", len(tokenizer), num_layers=3).eval()
    ran = []
    for i, block in enumerate(decoder_layers(model)):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    out = residual_stream(model, torch.randint(0, 256, (1, 5)), [0, 1])
    assert ran == [0, 1]
    assert set(out) == {0, 1}


def test_hooks_are_removed_even_when_the_forward_fails(tokenizer):
    model = make_model("phi3", len(tokenizer), num_layers=2)
    with pytest.raises(RuntimeError):
        with capture_layers(model, [1]):
            raise RuntimeError("boom")
    assert all(not b._forward_hooks for b in decoder_layers(model))


def test_a_wrong_layer_index_is_refused_with_the_valid_range(tokenizer):
    model = make_model("phi3", len(tokenizer), num_layers=3)
    with pytest.raises(ValueError, match="choose a layer from 0 to 2"):
        residual_stream(model, torch.zeros(1, 3, dtype=torch.long), [3])


def test_a_model_that_cannot_be_loaded_gives_one_clear_line(tmp_path):
    with pytest.raises(LMLoadError, match="cannot load model") as e:
        load_lm_config(str(tmp_path / "nope"))
    assert "\n" not in str(e.value)


def test_load_lm_reads_a_saved_model_and_tokenizer(tiny_model_dir):
    model, tok = load_lm(str(tiny_model_dir))
    assert len(decoder_layers(model)) == 3
    assert tok.chat_template


def test_packing_gives_full_sequences_with_document_boundaries(tokenizer):
    docs = ["hello world", "a b c", "the cat sat on the mat"] * 10
    seqs = list(pack_documents(docs, tokenizer, ctx_len=16))
    total = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 2 for d in docs)
    assert len(seqs) == total // 16
    assert all(s.shape == (16,) for s in seqs)
    flat = torch.cat(seqs)
    assert flat[0] == tokenizer.bos_token_id
    assert (flat == tokenizer.eos_token_id).sum() >= len(seqs) - 1


def test_special_tokens_and_first_position_are_excluded(tokenizer):
    model = make_model("phi3", len(tokenizer), num_layers=2).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yo"}],
        tokenize=False,
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    prod = ActivationProducer(
        model, tokenizer, 1, ctx_len=ids.shape[1], lm_batch_size=1, outlier_multiple=None
    )
    acts = prod.activations(ids)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert special.sum() >= 4  # <|user|>, <|end|>, <|assistant|>, <|end|>
    expected = (~special).sum() - (0 if special[0, 0] else 1)
    assert acts.shape == (expected, 32)
    hidden = residual_stream(model, ids, [1])[1][0]
    keep = ~special[0]
    keep[0] = False
    torch.testing.assert_close(acts, hidden[keep])


def test_massive_activations_are_dropped_and_counted():
    f = MassiveActivationFilter(multiple=10.0)
    acts = torch.randn(1000, 8)
    acts[[3, 500]] *= 100
    keep = f(acts)
    assert keep.sum() == 998 and not keep[3] and not keep[500]
    assert f.dropped == 2 and f.seen == 1000


def test_shuffle_buffer_yields_every_token_once_and_mixes_documents():
    chunks = [torch.full((100, 1), float(i)) for i in range(20)]  # 20 "documents"
    batches = list(
        shuffle_batches(
            iter(chunks), batch_size=50, buffer_size=400, generator=torch.Generator().manual_seed(0)
        )
    )
    flat = torch.cat(batches).flatten()
    assert flat.numel() == 2000
    assert sorted(flat.tolist()) == sorted(torch.cat(chunks).flatten().tolist())
    # An early batch already mixes several documents.
    assert len(set(batches[0].flatten().tolist())) >= 3


def test_shuffle_buffer_is_reproducible_with_a_seed():
    def run(seed):
        chunks = (torch.randn(64, 4, generator=torch.Generator().manual_seed(i)) for i in range(8))
        g = torch.Generator().manual_seed(seed)
        return list(
            itertools.islice(shuffle_batches(chunks, batch_size=16, buffer_size=64, generator=g), 5)
        )

    for a, b in zip(run(1), run(1), strict=True):
        assert torch.equal(a, b)


def test_document_shuffle_keeps_every_document_and_mixes_their_order():
    docs = [f"doc {i}" for i in range(100)]
    out = list(shuffle_documents(iter(docs), 20, torch.Generator().manual_seed(0)))
    assert sorted(out) == sorted(docs)
    assert out != docs
    # Bounded: a document can come out at most buffer_size places early.
    assert all(out.index(f"doc {i}") >= i - 20 for i in range(100))
