"""Tests for saetrain.data.sources: text source -> documents. Fast, offline, CPU only."""

import json
import logging

import pytest

from saetrain import UserError
from saetrain.data.sources import TextSource, iter_documents, normalize_messages, resolve_path

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny tokenizer whose chat template makes the rendered string easy to predict."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = TEMPLATE
    return fast


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def docs(path, tokenizer=None, **kwargs):
    shard = {k: kwargs.pop(k) for k in ("shard_index", "num_shards", "skip") if k in kwargs}
    return list(iter_documents(TextSource(path, **kwargs), tokenizer, **shard))


def test_jsonl_text_records_become_documents_in_order(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}, {"text": "3"}])
    assert docs(path) == ["one", "two", "3"]


def test_text_field_picks_another_column_and_records_without_it_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "x"}, {"other": 1}, {"body": "y"}])
    assert docs(path, text_field="body") == ["x", "y"]


def test_messages_records_are_rendered_with_the_chat_template(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    assert docs(path, tokenizer) == ["<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello\n"]


def test_sharegpt_records_are_normalised_before_rendering(tmp_path, tokenizer):
    conversation = [
        {"from": "gpt", "value": "leading assistant turn is dropped"},
        {"from": "human", "value": "a"},
        {"from": "human", "value": "b"},
        {"from": "tool", "value": "unknown roles are dropped"},
        {"from": "chatgpt", "value": "c"},
        {"from": "bard", "value": "d"},
    ]
    records = [{"id": "1", "conversations": conversation}, {"id": "2", "conversations": []}]
    path = write_jsonl(tmp_path / "share.jsonl", records)
    assert docs(path, tokenizer) == ["<|user|>a\n\nb\n<|assistant|>c\n\nd\n"]


def test_chat_without_a_template_falls_back_to_role_colon_content(tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    assert docs(path) == ["user: Hi\n\nassistant: Yo"]


def test_chat_never_uses_the_text_field_even_when_messages_exist(tmp_path, tokenizer):
    record = {"text": "plain", "messages": [{"role": "user", "content": "Hi"}]}
    path = write_jsonl(tmp_path / "a.jsonl", [record])
    assert docs(path, tokenizer, chat="never") == ["plain"]
    assert docs(path, tokenizer) == ["<|user|>Hi\n"]


def test_normalize_messages_keeps_system_first_and_drops_conversations_without_user():
    raw = [
        {"role": "system", "content": "S"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "u"},
        {"role": "system", "content": "late system"},
        {"role": "model", "content": "m"},
    ]
    assert normalize_messages(raw) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "m"},
    ]
    assert normalize_messages([{"from": "gpt", "value": "only an answer"}]) == []


def test_json_array_cut_off_mid_record_yields_the_whole_records_without_error(tmp_path, caplog):
    records = [
        {"id": str(i), "conversations": [{"from": "human", "value": f"q{i} \u00e9 ]}}"}]}
        for i in range(50)
    ]
    text = json.dumps(records, indent=2)
    cut = text.index('"id": "37"') + 12  # inside record 37
    path = tmp_path / "sharegpt.json"
    path.write_text(text[:cut])
    from saetrain.data import readers

    # A tiny chunk size makes records straddle chunk boundaries, as they do in big files.
    read = list(readers.iter_json(str(path), chunk_chars=64))
    assert [r["id"] for r in read] == [str(i) for i in range(37)]
    with caplog.at_level(logging.WARNING):
        assert docs(str(path)) == [f"user: q{i} \u00e9 ]}}" for i in range(37)]
    assert "middle of a record" in caplog.text


def test_complete_json_array_and_json_lines_both_read_as_json(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert docs(str(tmp_path / "arr.json")) == ["a", "b"]
    assert docs(str(tmp_path / "lines.json")) == ["a", "b"]


def test_malformed_json_in_the_middle_is_an_error_not_a_silent_stop(tmp_path):
    (tmp_path / "bad.json").write_text('[{"text": "a"}, {"text": oops}, {"text": "c"}]')
    with pytest.raises(ValueError, match="invalid JSON"):
        docs(str(tmp_path / "bad.json"))


def test_parquet_is_streamed_in_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": [f"doc {i}" for i in range(2500)], "n": list(range(2500))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=700)
    assert docs(str(tmp_path / "a.parquet")) == [f"doc {i}" for i in range(2500)]


def test_txt_file_documents_are_separated_by_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nstill first\n\n\n  \nsecond\n\nthird")
    assert docs(str(tmp_path / "a.txt")) == ["first line\nstill first", "second", "third"]


def test_directory_reads_supported_files_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("from b")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "from c"}\n')
    (tmp_path / "a.jsonl").write_text('{"text": "from a"}\n')
    (tmp_path / "notes.csv").write_text("ignored")
    assert docs(str(tmp_path)) == ["from a", "from b", "from c"]
    assert docs(str(tmp_path / "*.jsonl")) == ["from a"]


def test_shards_cover_every_document_exactly_once(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"d{i}"} for i in range(23)])
    shards = [docs(path, shard_index=r, num_shards=4) for r in range(4)]
    assert shards[1] == ["d1", "d5", "d9", "d13", "d17", "d21"]
    flat = sorted(d for shard in shards for d in shard)
    assert flat == sorted(f"d{i}" for i in range(23))


def test_skip_resumes_after_this_shards_documents(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"d{i}"} for i in range(10)])
    assert docs(path, skip=7) == ["d7", "d8", "d9"]
    assert docs(path, shard_index=1, num_shards=2, skip=2) == ["d5", "d7", "d9"]


def test_max_documents_caps_the_source_before_sharding(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"d{i}"} for i in range(10)])
    assert docs(path, max_documents=3) == ["d0", "d1", "d2"]
    assert docs(path, max_documents=5, shard_index=0, num_shards=2) == ["d0", "d2", "d4"]


def test_missing_local_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        docs(missing)


def test_source_without_documents_says_which_fields_were_expected(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    with pytest.raises(ValueError, match=r"no documents found .*'text'.*\['prompt'\]"):
        docs(path)


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="max_documents"):
        TextSource("x.jsonl", max_documents=0)
    with pytest.raises(ValueError, match="format"):
        TextSource("x.jsonl", format="csv")
    with pytest.raises(ValueError, match="shard_index"):
        list(iter_documents(TextSource("x.jsonl"), shard_index=2, num_shards=2))


def test_package_uri_resolves_inside_an_installed_package_without_importing_it():
    path = resolve_path("package://pytest/__init__.py")
    assert path.endswith("__init__.py") and "pytest" in path
    with pytest.raises(UserError, match="pip install no-such-pkg-xyz"):
        resolve_path("package://no_such_pkg_xyz/data.json")
    with pytest.raises(UserError, match="has no file"):
        resolve_path("package://pytest/missing.json")


def test_package_uri_is_read_as_a_local_file(tmp_path, monkeypatch):
    (tmp_path / "mypkg_for_sources").mkdir()
    (tmp_path / "mypkg_for_sources" / "__init__.py").write_text("raise ImportError('no')")
    write_jsonl(tmp_path / "mypkg_for_sources" / "d.jsonl", [{"text": "inside"}])
    monkeypatch.syspath_prepend(str(tmp_path))
    assert docs("package://mypkg_for_sources/d.jsonl") == ["inside"]


def test_local_hugging_face_builder_reads_data_files_offline(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"text": "hf one"}, {"text": "hf two"}])
    assert docs("json", format="hf", data_files=data) == ["hf one", "hf two"]
    assert docs("json", data_files=data, streaming=False) == ["hf one", "hf two"]


def test_unreachable_hub_dataset_is_a_one_line_error_naming_the_id(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="'someone/corpus'.*local file") as err:
        docs("someone/corpus")
    assert "\n" not in str(err.value)


def test_a_text_field_no_record_has_is_an_error_naming_the_fields_that_exist(tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}], "id": i} for i in range(3)]
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    assert len(docs(path)) == 3  # the default text_field may be absent: chat messages are read
    with pytest.raises(UserError, match=r"text_field 'body' is in none of the first 3 records, "):
        docs(path, text_field="body")
    with pytest.raises(UserError, match=r"which have the fields \['id', 'messages'\]"):
        docs(path, text_field="body")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["a"], "id": [1]}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=r"has no column 'body' .*columns are \['content', 'id'\]"):
        docs(str(tmp_path / "a.parquet"), text_field="body")


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.txt", "corpus.json"])
def test_a_binary_corpus_is_an_error_naming_the_file_and_its_format(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00\xff\xfe" * 40)
    fmt = name.rsplit(".", 1)[1]
    with pytest.raises(UserError, match=rf"{name} \({fmt}\), line 1: not UTF-8 text"):
        docs(str(path))


def test_an_empty_text_corpus_says_it_holds_no_text_not_which_json_fields_it_lacks(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match=r"no documents found in .*empty.txt \(txt\): it holds no"):
        docs(str(tmp_path / "empty.txt"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match=r"empty.jsonl \(jsonl\): it holds no records"):
        docs(str(tmp_path / "empty.jsonl"))


def bad_corpus(tmp_path) -> str:
    """JSON lines: 3 good records, a malformed one (line 4), 2 good, one that is not UTF-8
    (line 7), then enough good ones for the bad lines to lie deep in the file."""
    lines = [json.dumps({"text": f"d{i}"}) for i in range(3)] + ['{"text": oops}']
    lines += [json.dumps({"text": f"d{i}"}) for i in range(3, 5)]
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        f.write(("\n".join(lines) + "\n").encode())
        f.write(b'{"text": "caf\xe9"}\n')  # latin-1, not UTF-8
        f.write("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(5, 200)).encode())
    return str(path)


def test_a_malformed_record_deep_in_a_corpus_names_its_file_and_line_after_the_records_before(
    tmp_path,
):
    path = bad_corpus(tmp_path)
    stream = iter_documents(TextSource(path))
    assert [next(stream) for _ in range(3)] == ["d0", "d1", "d2"]  # still read lazily
    with pytest.raises(UserError, match=r"big.jsonl \(jsonl\), line 4: invalid JSON \(Expecting"):
        next(stream)
    with open(path, "rb") as f:
        fixed = f.read().replace(b"oops", b'"d3b"')
    with open(path, "wb") as f:
        f.write(fixed)
    with pytest.raises(UserError, match=r"big.jsonl \(jsonl\), line 7: not UTF-8 text"):
        docs(path)


def test_on_bad_record_skip_skips_and_counts_bad_records_and_reports_the_count(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        read = docs(bad_corpus(tmp_path), on_bad_record="skip")
    assert read == [f"d{i}" for i in range(200)]
    assert "big.jsonl (jsonl), line 4: invalid JSON (Expecting value); skipping it" in caplog.text
    assert "skipped 2 bad records (on_bad_record: skip)" in caplog.text
    with pytest.raises(ValueError, match="on_bad_record must be 'error' or 'skip', got 'ignore'"):
        TextSource("x.jsonl", on_bad_record="ignore")
