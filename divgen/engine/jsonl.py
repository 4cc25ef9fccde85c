"""The one JSONL reader: one JSON object per line, errors that name the file and the line.

Used by synth (its own output, few-shot files), metrics and SPA (data, prompts, samples).

``read_jsonl(path, what, tail=...)`` reads the whole file and says what to do with the bytes
after the last newline (a file's last line may lack its newline):

* ``"line"``            — they are an ordinary last line (hand-written files);
* ``"torn-if-invalid"`` — a last line that parses is a record, one that does not is a torn write
                          and is ignored (``divgen metrics`` on a synth file being written/killed);
* ``"torn"``            — they are always a torn write, never parsed (``divgen synth``'s own
                          output: every record is written with its newline in one append).

A UTF-8 byte-order mark at the start is skipped; blank lines are skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from divgen.engine.errors import DivgenError

TAIL_MODES = ("line", "torn-if-invalid", "torn")


@dataclass
class JsonlContents:
    """The records of a JSONL file and where its complete part ends."""

    records: list = field(default_factory=list)   # (line number, object) in file order
    size: int = 0                                  # file size in bytes
    complete_bytes: int = 0                        # bytes up to the end of the last kept line
    torn_tail: bytes = b""                         # ignored bytes after the last newline


def read_jsonl(path: str | Path, what: str, *, tail: str = "line") -> JsonlContents:
    """Parse every line of a JSONL file (see the module docstring for ``tail``).

    ``what`` names the file in errors ("data", "few-shot", ...). A missing or unreadable file, a
    line that is not JSON or not a JSON object raises DivgenError naming the file and the line.
    """
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}")
    path = Path(path)
    if path.is_dir():
        raise DivgenError(f"{what} file {path} is a directory: pass a JSONL file")
    if not path.is_file():
        raise DivgenError(f"{what} file {path} does not exist: pass a JSONL file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DivgenError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    out = JsonlContents(size=len(data))
    end = data.rfind(b"\n") + 1
    body, rest = data[:end], data[end:]
    lines = body.split(b"\n")[:-1] if body else []
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    for n, raw in enumerate(lines, 1):
        obj = _parse(raw[start:] if n == 1 else raw, path, what, n)
        if obj is not None:
            out.records.append((n, obj))
    out.complete_bytes = end
    if rest:
        n = len(lines) + 1
        piece = rest[start:] if n == 1 else rest
        if tail == "torn":
            out.torn_tail = rest
        elif tail == "torn-if-invalid":
            try:
                obj = _parse(piece, path, what, n)
            except DivgenError:
                out.torn_tail = rest
            else:
                if obj is not None:
                    out.records.append((n, obj))
                out.complete_bytes = len(data)
        else:
            obj = _parse(piece, path, what, n)
            if obj is not None:
                out.records.append((n, obj))
            out.complete_bytes = len(data)
    return out


def _parse(raw: bytes, path: Path, what: str, n: int) -> dict | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DivgenError(f"{what} file {path} line {n} is not UTF-8 text ({exc.reason}): save it as UTF-8") from exc
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DivgenError(f"{what} file {path} line {n} is not JSON ({exc.msg}): one JSON object per line") from exc
    if not isinstance(obj, dict):
        raise DivgenError(f"{what} file {path} line {n} is not a JSON object: one object per line")
    return obj


def iter_jsonl_objects(path: str | Path, what: str):
    """(line number, object) of every non-blank line (``read_jsonl(path, what).records``)."""
    return iter(read_jsonl(path, what).records)
