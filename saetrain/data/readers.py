"""Local corpus files -> records, the part of the text source stage that reads files
(:mod:`saetrain.data.sources` picks the files and turns records into documents).

- :func:`iter_txt`: documents of a text file, separated by blank lines.
- :func:`iter_json`: records of a JSON-lines file or a top-level JSON array, streamed with
  bounded memory; a file cut off mid-record yields its whole records and a warning.
- :func:`iter_parquet`: rows of a parquet file, batch by batch.

Every file is decoded with ``errors="surrogateescape"``, so a byte that is not UTF-8 is found
with its line (``NOT_UTF8``) instead of ending the stream with a bare ``UnicodeDecodeError``.
A record that does not parse or is not UTF-8 goes to :meth:`Reading.bad_record`, which stops
with the file, format and line in one line (``on_bad_record: error``) or counts it (``skip``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

logger = logging.getLogger(__name__)

# Bytes that are not UTF-8, as surrogateescape decoding keeps them
NOT_UTF8 = re.compile("[\udc80-\udcff]")


@dataclass
class Reading:
    """One pass over a source: the files it read, and the bad records it met, which raise
    (``on_bad_record: error``) or are counted (``skip``)."""

    on_bad_record: str = "error"
    files: list[tuple[str, str]] = field(default_factory=list)
    bad: int = 0

    def bad_record(self, file: str, fmt: str, line: int, why: str) -> None:
        where = f"{file} ({fmt}), line {line}"
        if self.on_bad_record == "error":
            raise UserError(
                f"{where}: {why}; fix or remove the record, or set on_bad_record: skip to skip "
                "such records"
            )
        self.bad += 1
        if self.bad == 1:
            logger.warning("%s: %s; skipping it and any other bad record", where, why)


def _not_utf8(fmt: str) -> str:
    return f"not UTF-8 text (a binary file? a {fmt} corpus is UTF-8; set format if it is not {fmt})"


def iter_txt(file: str, reading: Reading) -> Iterator[str]:
    """Documents of a text file: runs of lines separated by blank lines."""
    lines: list[str] = []
    bad_line = None  # the first line of this document that is not UTF-8
    with open(file, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                if bad_line is None and NOT_UTF8.search(line):
                    bad_line = number
                lines.append(line)
            elif lines:
                if bad_line is None:
                    yield "".join(lines).rstrip("\n")
                else:
                    reading.bad_record(file, "txt", bad_line, _not_utf8("txt"))
                lines, bad_line = [], None
    if lines and bad_line is None:
        yield "".join(lines).rstrip("\n")
    elif lines:
        reading.bad_record(file, "txt", bad_line, _not_utf8("txt"))


def iter_json(
    file: str, chunk_chars: int = 1 << 20, reading: Reading | None = None, fmt: str = "json"
) -> Iterator[Any]:
    """Records of a JSON-lines file or a top-level JSON array, read with bounded memory.

    `raw_decode` parses one value at a time from a buffer that grows by chunks, so a file of
    any size is never held whole; a record cut off by the end of the file ends the stream
    with a warning instead of an exception. A record that does not parse or is not UTF-8 goes
    to ``reading.bad_record`` with its line; skipped, the rest of its line is passed over (in
    JSON lines; a broken record in an array always stops the stream).
    """
    reading = reading or Reading()
    decoder = json.JSONDecoder()
    buf, pos, eof, in_array = "", 0, False, None
    lines_before = 0  # newlines in the text dropped from the front of buf
    count = 0
    with open(file, encoding="utf-8", errors="surrogateescape") as f:
        while True:
            while pos < len(buf) and (buf[pos].isspace() or (in_array and buf[pos] == ",")):
                pos += 1
            if pos < len(buf) and in_array is None:
                in_array = buf[pos] == "["
                pos += 1 if in_array else 0
                continue
            if pos < len(buf) and in_array and buf[pos] == "]":
                return
            if pos == len(buf) and eof:
                if in_array:
                    logger.warning(
                        "%s: JSON array has no closing ']'; read %d records", file, count
                    )
                return
            line = lines_before + buf.count("\n", 0, pos) + 1  # where this record starts
            try:
                if pos == len(buf):
                    raise json.JSONDecodeError("Expecting value", buf, pos)
                record, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:  # a number may continue in the next chunk
                    raise json.JSONDecodeError("Expecting value", buf, end)
            except json.JSONDecodeError as e:
                cut = e.msg.startswith("Unterminated string") or e.pos >= len(buf) - 16
                if not cut:
                    end_of_line = buf.find("\n", e.pos)
                    binary = NOT_UTF8.search(buf, pos, max(e.pos + 1, end_of_line))
                    why = _not_utf8(fmt) if binary else f"invalid JSON ({e.msg})"
                    if in_array:
                        raise UserError(
                            f"{file} ({fmt}), line {line}: {why}; fix or remove the broken "
                            "record (only JSON lines, one record per line, can skip records)"
                        ) from None
                    reading.bad_record(file, fmt, line, why)
                    # skipped: the record is the rest of its line
                    while (end_of_line := buf.find("\n", pos)) < 0 and not eof:
                        chunk = f.read(chunk_chars)
                        buf, eof = buf + chunk, not chunk
                    pos = len(buf) if end_of_line < 0 else end_of_line + 1
                    continue
                if eof:
                    logger.warning(
                        "%s: file ends in the middle of a record (cut off at line %d); "
                        "stopping after %d whole records",
                        file,
                        line,
                        count,
                    )
                    return
                lines_before += buf.count("\n", 0, pos)
                chunk = f.read(max(chunk_chars, len(buf) - pos))  # doubles for huge records
                buf, pos, eof = buf[pos:] + chunk, 0, not chunk
                continue
            if NOT_UTF8.search(buf, pos, end):  # parsed, so skipped whole even in an array
                reading.bad_record(file, fmt, line, _not_utf8(fmt))
                pos = end
                continue
            count += 1
            pos = end
            yield record


def iter_parquet(file: str, columns: list[str], named: str | None) -> Iterator[dict]:
    """Records of a parquet file, one batch in memory at a time, reading only `columns`;
    ``named``: a text field the user named, which must be one of the file's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        why = " ".join(str(e).split())[:200]
        raise UserError(f"{file} (parquet) is not a readable parquet file: {why}") from None
    names = pf.schema_arrow.names
    if named is not None and named not in names:
        raise UserError(
            f"{file} (parquet) has no column {named!r} (text_field); its columns are {names}: "
            "set text_field to one of them"
        )
    present = [c for c in columns if c in pf.schema_arrow.names]
    if not present:
        logger.warning(
            "%s: none of the columns %s exist (has %s)", file, columns, pf.schema_arrow.names
        )
        return
    for batch in pf.iter_batches(batch_size=1024, columns=present):
        yield from batch.to_pylist()
