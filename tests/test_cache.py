"""The activation cache: what is written comes back once per epoch, shuffled like the live stream,
with bounded memory and exact resume; ``python -m saetrain cache`` writes the live activations;
bad input gives one clear line."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
import torch
from lmfixtures import error_line, tiny_fit_args
from safetensors.torch import load_file

from saetrain.cli import main
from saetrain.data import cache as cache_mod
from saetrain.data.activations import shuffle_batches
from saetrain.data.cache import CacheReader, check_cache_matches, load_manifest, write_cache
from saetrain.data.datamodule import ActivationDataModule
from saetrain.data.sources import TextSource

ROOT = Path(__file__).resolve().parents[1]
D_IN = 6
MANIFEST = {"model": "tiny", "layer": 1, "data": {"path": "made-up.jsonl"}}


def numbered_chunks(sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Chunks (N_i, D_IN) whose column 0 numbers the rows 0, 1, ... in stream order."""
    g = torch.Generator().manual_seed(seed)
    chunks, start = [], 0
    for n in sizes:
        chunk = torch.randn(n, D_IN, generator=g)
        chunk[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
        chunks.append(chunk)
        start += n
    return chunks


def ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b[:, 0]]


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """1030 numbered rows in 11 shards of 100 (the last holds 30), with 20 validation rows."""
    out = tmp_path_factory.mktemp("cache") / "c"
    chunks = numbered_chunks([37, 250, 3, 140, 600])
    return write_cache(out, chunks, manifest=MANIFEST, shard_tokens=100, val=torch.ones(20, D_IN))


def test_the_manifest_names_model_layer_shapes_and_token_counts(cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["format"] == "saetrain-activation-cache" and manifest["version"] == 1
    assert (manifest["model"], manifest["layer"], manifest["hookpoint"]) == ("tiny", 1, "layers.1")
    assert manifest["data"] == {"path": "made-up.jsonl"}
    assert (manifest["d_in"], manifest["dtype"]) == (D_IN, "float32")
    assert manifest["train_tokens"] == 1030 and manifest["val_tokens"] == 20
    assert [s["tokens"] for s in manifest["shards"]] == [100] * 10 + [30]
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names == sorted(
        [s["file"] for s in manifest["shards"]] + ["manifest.json", "val.safetensors"]
    )
    assert manifest["shards"][0]["file"] == "shard-00000.safetensors"


@pytest.mark.parametrize("shuffle_shards", [True, False])
def test_every_cached_token_comes_back_once_per_epoch(cache_dir, shuffle_shards):
    reader = CacheReader(
        cache_dir, batch_size=10, buffer_size=40, seed=3, shuffle_shards=shuffle_shards, read_rows=7
    )
    first = list(reader)
    assert all(b.shape == (10, D_IN) and b.dtype == torch.float32 for b in first)
    assert sorted(ids(first)) == list(range(1030))
    assert ids(first) != list(range(1030))  # shuffled
    second = list(reader)  # the next epoch: the same tokens in another order
    assert sorted(ids(second)) == list(range(1030)) and ids(second) != ids(first)
    torch.testing.assert_close(reader.val(), torch.ones(20, D_IN))
    assert reader.tokens_per_epoch == 1030


def test_shuffled_shards_are_read_in_another_order_and_mixed_in_each_buffer(cache_dir):
    shuffled = CacheReader(cache_dir, batch_size=10, buffer_size=40, seed=0, read_rows=5)
    batches = list(itertools.islice(shuffled, 4))
    shards_in_first_fill = {i // 100 for i in ids(batches[:2])}
    assert len(shards_in_first_fill) >= 3  # round robin over open_shards=4 shards
    in_order = CacheReader(
        cache_dir, batch_size=10, buffer_size=40, seed=0, read_rows=5, shuffle_shards=False
    )
    assert {i // 100 for i in ids(itertools.islice(in_order, 2))} == {0}


def test_two_ranks_split_the_shards_without_overlap_or_loss(cache_dir):
    seen = []
    for rank in range(2):
        reader = CacheReader(
            cache_dir, batch_size=10, buffer_size=40, shard_index=rank, num_shards=2
        )
        rank_ids = ids(reader)
        shards = {i // 100 for i in rank_ids}
        assert shards == set(range(rank, 11, 2))
        assert reader.tokens_per_epoch == len(rank_ids)
        seen += rank_ids
    assert sorted(seen) == list(range(1030))


def test_more_ranks_than_shards_is_refused(cache_dir):
    message = one_line_error(CacheReader, cache_dir, batch_size=10, buffer_size=40, num_shards=12)
    assert "holds 11 shards, fewer than the 12 ranks" in message


@pytest.mark.parametrize(("read_rows", "sizes"), [(7, [37, 250, 3, 140, 600]), (64, [1, 999, 5])])
def test_in_file_order_the_reader_gives_exactly_the_shuffle_batches_of_the_live_stream(
    tmp_path, read_rows, sizes
):
    chunks = numbered_chunks(sizes, seed=1)
    write_cache(tmp_path / "c", chunks, manifest=MANIFEST, shard_tokens=64)
    for seed in (0, 5):
        reader = CacheReader(
            tmp_path / "c",
            batch_size=16,
            buffer_size=48,
            seed=seed,
            shuffle_shards=False,
            read_rows=read_rows,
        )
        live = shuffle_batches(
            chunks, batch_size=16, buffer_size=48, generator=torch.Generator().manual_seed(seed)
        )
        got, expected = list(reader), list(live)
        assert len(got) == len(expected) == sum(sizes) // 16
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_the_reader_never_loads_a_whole_shard(tmp_path, monkeypatch):
    write_cache(tmp_path / "c", numbered_chunks([1000]), manifest=MANIFEST, shard_tokens=500)
    reads: list[int] = []

    class Slice:
        def __init__(self, inner):
            self.inner = inner

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, rows: slice):
            out = self.inner[rows]
            reads.append(out.shape[0])
            return out

    class File:
        def __init__(self, path, framework):
            self.inner = real_open(path, framework=framework)

        def get_slice(self, name):
            return Slice(self.inner.get_slice(name))

        def get_tensor(self, name):
            raise AssertionError("a whole shard was loaded")

    real_open = cache_mod.safe_open
    monkeypatch.setattr(cache_mod, "safe_open", File)
    reader = CacheReader(tmp_path / "c", batch_size=8, buffer_size=64, read_rows=24)
    assert sorted(ids(reader)) == list(range(1000))
    assert sum(reads) == 1000 and max(reads) <= 24  # shards of 500 > buffer + read_rows = 88
    assert reader._buf is not None and reader._buf.shape == (64, D_IN)
    assert reader.state_dict()["buffer"].shape[0] <= 64


def roundtrip(state: dict) -> dict:
    """The state as a checkpoint carries it: through torch.save and torch.load."""
    blob = io.BytesIO()
    torch.save(state, blob)
    return torch.load(io.BytesIO(blob.getvalue()), weights_only=True)


@pytest.mark.parametrize("shuffle_shards", [True, False])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 50, 102, 103])
def test_a_restored_reader_yields_exactly_the_rest_of_the_stream(cache_dir, n, shuffle_shards):
    # Buffer 40 and batch 10: each fill serves 2 batches, so n=1 and n=5 stop inside a buffer
    # refill. An epoch is 103 batches: after n=103 the restored reader starts the next one.
    kwargs = dict(
        batch_size=10, buffer_size=40, seed=7, shuffle_shards=shuffle_shards, read_rows=13
    )
    uninterrupted = CacheReader(cache_dir, **kwargs)
    expected = list(uninterrupted) + list(uninterrupted)  # two epochs
    assert len(expected) == 2 * 103
    reader = CacheReader(cache_dir, **kwargs)
    got = list(itertools.islice(iter(reader), n))
    restored = CacheReader(cache_dir, **kwargs)
    restored.load_state_dict(roundtrip(reader.state_dict()))
    got += list(restored)
    if len(got) == 103:  # that was the rest of the first epoch; now the second
        got += list(restored)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("n", [0, 3, 103])
def test_a_state_as_of_an_earlier_batch_hands_the_prefetched_batches_out_again(cache_dir, n):
    # Lightning fetches ahead of the batch it trains on: the state is taken "as of" batch n
    # after n + 2 were handed out, and the restored reader hands those 2 out again first.
    kwargs = dict(batch_size=10, buffer_size=40, seed=2, read_rows=9)
    uninterrupted = CacheReader(cache_dir, **kwargs)
    expected = list(uninterrupted) + list(uninterrupted)  # two epochs of 103 batches
    reader = CacheReader(cache_dir, **kwargs)
    handed_out = list(reader) if n == 103 else []  # n=103: 2 batches into the second epoch
    handed_out += list(itertools.islice(iter(reader), n + 2 - len(handed_out)))
    state = roundtrip(reader.state_dict(consumed=n))
    restored = CacheReader(cache_dir, **kwargs)
    restored.load_state_dict(state)
    got = handed_out[:n] + list(restored)
    if len(got) == 103:  # that was the rest of the first epoch; now the second
        got += list(restored)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert "cannot take the cache reader's state" in one_line_error(
        reader.state_dict, consumed=n - 3
    )


def test_a_state_from_other_reader_settings_is_refused(cache_dir):
    state = CacheReader(cache_dir, batch_size=10, buffer_size=40).state_dict()
    reader = CacheReader(cache_dir, batch_size=10, buffer_size=80)
    assert "buffer_size=40" in one_line_error(reader.load_state_dict, state)


def test_an_interrupted_write_leaves_no_cache_behind(tmp_path):
    def chunks():
        yield from numbered_chunks([300])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path / "c", chunks(), manifest=MANIFEST, shard_tokens=100)
    assert list(tmp_path.iterdir()) == []


def test_max_tokens_stops_the_write(tmp_path):
    out = write_cache(
        tmp_path / "c", numbered_chunks([70, 70]), manifest=MANIFEST, shard_tokens=50, max_tokens=99
    )
    manifest = load_manifest(out)
    assert manifest["train_tokens"] == 99 and [s["tokens"] for s in manifest["shards"]] == [50, 49]
    reader = CacheReader(out, batch_size=11, buffer_size=22, shuffle_shards=False)
    assert sorted(ids(reader)) == list(range(99))


def test_a_folder_that_is_not_a_cache_is_refused_with_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "is not a saetrain activation cache (no manifest.json)" in one_line_error(
        load_manifest, tmp_path
    )
    assert "python -m saetrain cache --config" in one_line_error(
        CacheReader, tmp_path, batch_size=1, buffer_size=2
    )
    assert "no such folder" in one_line_error(load_manifest, tmp_path / "missing")
    assert "a file" in one_line_error(load_manifest, tmp_path / "notes.txt")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    assert "format 'something-else'" in one_line_error(load_manifest, tmp_path)


def test_a_cache_from_another_model_layer_or_width_is_refused(cache_dir, tiny_model_dir):
    manifest = load_manifest(cache_dir)
    check_cache_matches(manifest, model="tiny", layer=1, d_in=D_IN)
    message = one_line_error(check_cache_matches, manifest, model="other/model", layer=1)
    assert "'tiny'" in message and "'other/model'" in message
    assert "layer 1" in one_line_error(check_cache_matches, manifest, model="tiny", layer=2)
    assert "d_in 6" in one_line_error(check_cache_matches, manifest, model="tiny", layer=1, d_in=8)
    local = {**manifest, "model": str(tiny_model_dir)}  # one folder named two ways is one model
    check_cache_matches(local, model=str(tiny_model_dir / ".." / tiny_model_dir.name), layer=1)


def test_writing_over_a_non_empty_folder_is_refused(cache_dir):
    before = (cache_dir / "manifest.json").read_text()
    message = one_line_error(write_cache, cache_dir, numbered_chunks([10]), manifest=MANIFEST)
    assert "already exists and is not empty" in message
    assert (cache_dir / "manifest.json").read_text() == before


# The `cache` command on the tiny recipe ----------------------------------------------------


def cache_args(model_dir, data, *extra) -> list[str]:
    recipe = str(ROOT / "recipes" / "tiny.yaml")
    data_args = ["--data.model", str(model_dir), "--data.source.path", str(data)]
    return ["cache", "--config", recipe, *data_args, *extra]


def tiny_datamodule(model_dir, data, document_buffer: int = 0) -> ActivationDataModule:
    """The data module recipes/tiny.yaml builds, set up on CPU."""
    dm = ActivationDataModule(
        model=str(model_dir),
        source=TextSource(path=str(data)),
        layer=1,
        ctx_len=64,
        lm_batch_size=8,
        batch_size=128,
        buffer_size=1024,
        lm_dtype="float32",
        val_documents=20,
        val_tokens=1024,
        document_buffer=document_buffer,
    )
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir, chat_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny-cache"
    assert (
        main(cache_args(tiny_model_dir, chat_jsonl, "--out", str(out), "--shard_tokens", "3000"))
        == 0
    )
    return out


def test_the_cache_command_writes_the_live_activations(tiny_cache, tiny_model_dir, chat_jsonl):
    manifest = load_manifest(tiny_cache)
    assert manifest["model"] == str(tiny_model_dir) and manifest["layer"] == 1
    assert manifest["d_in"] == 32 and manifest["data"]["path"] == str(chat_jsonl)
    assert manifest["seed"] == 0 and manifest["data_module"]["ctx_len"] == 64
    dm = tiny_datamodule(tiny_model_dir, chat_jsonl)
    val = torch.cat(dm.val_batches())
    live = torch.cat(list(dm.train_chunks()))
    assert manifest["train_tokens"] == live.shape[0] and manifest["val_tokens"] == val.shape[0]
    assert len(manifest["shards"]) == -(-live.shape[0] // 3000) > 1
    reader = CacheReader(tiny_cache, batch_size=128, buffer_size=1024)
    assert torch.equal(reader.val(), val)
    cached = [load_file(tiny_cache / s["file"])["activations"] for s in manifest["shards"]]
    assert torch.equal(torch.cat(cached), live)


def test_training_batches_from_the_cache_equal_the_live_stream(
    tiny_cache, tiny_model_dir, chat_jsonl
):
    dm = tiny_datamodule(tiny_model_dir, chat_jsonl)
    live = list(dm.train_dataloader())
    reader = CacheReader(tiny_cache, batch_size=128, buffer_size=1024, shuffle_shards=False)
    cached = list(reader)
    assert len(cached) == len(live) > 10
    assert all(torch.equal(a, b) for a, b in zip(cached, live, strict=True))


def test_with_a_document_shuffle_the_cache_still_equals_the_live_stream(
    tiny_model_dir, chat_jsonl, tmp_path
):
    args = ["--out", str(tmp_path / "c"), "--data.document_buffer", "16"]
    assert main(cache_args(tiny_model_dir, chat_jsonl, *args)) == 0
    live = list(tiny_datamodule(tiny_model_dir, chat_jsonl, document_buffer=16).train_dataloader())
    reader = CacheReader(tmp_path / "c", batch_size=128, buffer_size=1024, shuffle_shards=False)
    cached = list(reader)
    assert len(cached) == len(live) > 10
    assert all(torch.equal(a, b) for a, b in zip(cached, live, strict=True))


def test_the_cache_command_stops_at_tokens_and_defaults_the_folder(
    tiny_model_dir, chat_jsonl, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(cache_args(tiny_model_dir, chat_jsonl, "--tokens", "500", "--data.layer", "0")) == 0
    out = tmp_path / "checkpoints" / "tiny-cache"  # <out_dir>/<run_name>-cache of the recipe
    manifest = load_manifest(out)
    assert manifest["train_tokens"] == 500 and manifest["layer"] == 0
    printed = capsys.readouterr().err.splitlines()[-1]
    relative = Path("checkpoints") / "tiny-cache"
    assert printed.endswith(
        f"wrote {relative}: 500 training tokens in 1 shard(s), 1024 validation tokens"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.layer", "7"], "layer 7 does not exist"),
        (["--model.k", "3"], "--data.KEY VALUE overrides"),
        (["--data.bogus", "1"], "bogus"),
        (["--data.source.path", "/nonexistent/chats.jsonl"], "/nonexistent/chats.jsonl"),
    ],
)
def test_bad_cache_command_input_gives_one_line_and_status_2(
    extra, message, tiny_model_dir, chat_jsonl, tmp_path, capsys
):
    assert main(cache_args(tiny_model_dir, chat_jsonl, "--out", str(tmp_path / "c"), *extra)) == 2
    assert message in error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # no cache, no partial folder


def test_the_cache_command_refuses_a_bad_recipe_or_a_used_folder(
    tiny_cache, tiny_model_dir, chat_jsonl, tmp_path, capsys
):
    assert main(cache_args(tiny_model_dir, chat_jsonl, "--out", str(tiny_cache))) == 2
    assert "already exists and is not empty" in error_line(capsys)
    no_data = tmp_path / "no-data.yaml"
    no_data.write_text("model:\n  k: 4\n")
    assert main(["cache", "--config", str(no_data)]) == 2
    assert "has no `data:` section" in error_line(capsys)
    assert main(["cache", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in error_line(capsys)


# ---------------------------------------------------------------- fit from the cache


def fit_args(model_dir, data, out_dir, run_name, *extra) -> list[str]:
    return tiny_fit_args(model_dir, data, out_dir, "--run_name", run_name, *extra)


def test_fit_from_the_cache_trains_the_same_weights_as_fit_live(
    tiny_model_dir, chat_jsonl, tmp_path
):
    # One shard: the reader's shard order is then the file order, and its shuffle is the
    # live stream's (same seed), so the two runs see the same batches and validation data.
    cache = tmp_path / "one-shard"
    assert main(cache_args(tiny_model_dir, chat_jsonl, "--out", str(cache))) == 0
    assert len(load_manifest(cache)["shards"]) == 1
    assert main(fit_args(tiny_model_dir, chat_jsonl, tmp_path, "live")) == 0
    assert (
        main(fit_args(tiny_model_dir, chat_jsonl, tmp_path, "cached", "--data.cache", str(cache)))
        == 0
    )
    live, cached = (load_file(tmp_path / run / "sae.safetensors") for run in ("live", "cached"))
    assert live.keys() == cached.keys()
    assert all(torch.equal(live[name], cached[name]) for name in live)
    extra = json.loads((tmp_path / "cached" / "cfg.json").read_text())["extra"]
    assert extra["cache"] == str(cache) and extra["layer"] == 1 and "val_fvu" in extra


def test_fit_refuses_a_cache_of_another_layer_in_one_line(
    tiny_cache, tiny_model_dir, chat_jsonl, tmp_path, capsys
):
    args = fit_args(tiny_model_dir, chat_jsonl, tmp_path, "x", "--data.cache", str(tiny_cache))
    assert main(args + ["--data.layer", "0"]) == 2
    assert "layer" in error_line(capsys)


def test_a_written_cache_is_readable_by_others_as_the_umask_allows(tmp_path):
    import os
    import stat

    out = write_cache(tmp_path / "c", [torch.randn(10, 4)], manifest={"model": "m", "layer": 0})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask
