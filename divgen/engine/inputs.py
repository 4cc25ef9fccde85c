"""The checked readers every command uses for CSV, JSON, YAML and safetensors input (JSONL: ``jsonl.py``).

Each refuses bad input with one DivgenError line naming the file, where, and the fix — never a
traceback, never a read that runs out of memory:

* ``read_csv(path, what)``        header + rows; a UTF-8 byte-order mark (Excel's "CSV UTF-8") is
                                  not part of the first column name; fields up to
                                  ``limits.MAX_CSV_FIELD`` characters; bad bytes and bad quoting
                                  name the line;
* ``read_json_object(path, what)``  one JSON object (a sidecar, a config): a list, a number or bad
                                  JSON is refused; nesting deeper than Python's recursion is refused;
* ``load_yaml(text, where)``      PyYAML's safe loader, at most ``limits.MAX_YAML_BYTES`` of text,
                                  and at most ``limits.MAX_YAML_NODES`` values once aliases are
                                  expanded (an alias bomb is refused in milliseconds, not after
                                  the memory is gone);
* ``read_safetensors_header(path, what)``  the 8-byte length, the JSON header and every tensor's
                                  offsets checked against the file size before anything is read.

No heavy imports: every reader runs before torch.
"""
from __future__ import annotations

import csv
import json
import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from divgen.engine import limits
from divgen.engine.errors import DivgenError


# ---- CSV ---------------------------------------------------------------------------------------
@dataclass
class CsvContents:
    columns: list[str]            # header names, stripped, without a byte-order mark
    rows: list[dict]              # column -> value (missing trailing fields are None)
    lines: list[int]              # the file line each row ends on


@contextmanager
def _field_limit(n: int):
    old = csv.field_size_limit()
    csv.field_size_limit(n)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read_bytes(path: Path, what: str, fix: str) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise DivgenError(f"{what} {path} is a directory: {fix}")
    if not path.is_file():
        raise DivgenError(f"{what} {path} does not exist: {fix}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DivgenError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _decode(data: bytes, path: Path, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DivgenError(f"{what} {path} line {line} is not UTF-8 text ({exc.reason}): save it as UTF-8") from exc


def read_csv(path, what: str, fix: str = "give a CSV file with a header row") -> CsvContents:
    """A CSV file with a header row (module docstring)."""
    path = Path(path)
    text = _decode(_read_bytes(path, what, fix), path, what)
    out = CsvContents([], [], [])
    import io

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        with _field_limit(limits.MAX_CSV_FIELD):
            header = next(reader, None)
            if header is None:
                raise DivgenError(f"{what} {path} is empty: {fix}")
            out.columns = [c.strip() for c in header]
            for row in reader:
                if not row:
                    continue
                out.rows.append({c: (row[i] if i < len(row) else None) for i, c in enumerate(out.columns)})
                out.lines.append(reader.line_num)
    except csv.Error as exc:
        msg = str(exc)
        if "field larger than field limit" in msg:
            raise DivgenError(f"{what} {path} near line {reader.line_num}: a field is longer than "
                              f"{limits.MAX_CSV_FIELD:,} characters (often a quote that never closes): "
                              "fix the file") from exc
        raise DivgenError(f"{what} {path} is not valid CSV near line {reader.line_num} ({msg}): check for an "
                          "unterminated quote (a field that opens \" and never closes it)") from exc
    return out


# ---- JSON --------------------------------------------------------------------------------------
def parse_json_object(text: str | bytes, where: str, fix: str) -> dict:
    """``text`` as one JSON object, else one line naming ``where`` and ``fix``."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else getattr(exc, "msg", str(exc))
        raise DivgenError(f"{where} is not valid JSON ({reason}): {fix}") from exc
    if not isinstance(data, dict):
        raise DivgenError(f"{where} is a JSON {type(data).__name__}, not an object: {fix}")
    return data


def read_json_object(path, what: str, fix: str) -> dict:
    """A file holding one JSON object (a sidecar, a config)."""
    path = Path(path)
    data = _read_bytes(path, what, fix)
    if len(data) > limits.MAX_JSON_BYTES:
        raise DivgenError(f"{what} {path} is {len(data):,} bytes, more than {limits.MAX_JSON_BYTES:,}: {fix}")
    return parse_json_object(data, f"{what} {path}", fix)


# ---- YAML --------------------------------------------------------------------------------------
def expanded_size(obj, bound: int) -> int:
    """Values in ``obj`` counted as if every shared (aliased) list or dict were copied; stops
    counting above ``bound``. Shared objects are measured once (memo by id), so this is fast even
    for a document that would expand to billions of values."""
    memo: dict[int, int] = {}

    def size(x) -> int:
        if isinstance(x, (list, tuple, dict)):
            key = id(x)
            if key in memo:
                return memo[key]
            memo[key] = bound + 1                  # a cycle counts as too big
            items = list(x.items()) if isinstance(x, dict) else [(None, v) for v in x]
            total = 1
            for k, v in items:
                total += (size(k) if k is not None else 0) + size(v)
                if total > bound:
                    break
            memo[key] = min(total, bound + 1)
            return memo[key]
        return 1

    try:
        return size(obj)
    except RecursionError:
        return bound + 1


def load_yaml(text: str, where: str):
    """PyYAML's safe loader with a size bound (module docstring)."""
    import yaml

    if len(text.encode("utf-8", "surrogateescape")) > limits.MAX_YAML_BYTES:
        raise DivgenError(f"{where} is larger than {limits.MAX_YAML_BYTES:,} bytes: a task file is a few lines of "
                          "YAML; check that this is the right file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DivgenError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError as exc:
        raise DivgenError(f"{where} is nested too deeply to be a task file: check that this is the right file") from exc
    if expanded_size(data, limits.MAX_YAML_NODES) > limits.MAX_YAML_NODES:
        raise DivgenError(f"{where} expands to more than {limits.MAX_YAML_NODES:,} values (aliases such as *a "
                          "repeat what they name): write the values out or remove the aliases")
    return data


# ---- safetensors -------------------------------------------------------------------------------
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path, what: str = "safetensors file") -> tuple[dict, int]:
    """(header, byte offset of the data) of a safetensors file, every entry checked against the
    file size: a corrupt file is one line, never a giant read."""
    path = Path(path)
    fix = "it is not a valid safetensors file (damaged or truncated copy?): write or copy it again"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DivgenError(f"{what} {path} is {size} bytes, too short for a safetensors header: {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, limits.MAX_SAFETENSORS_HEADER):
                raise DivgenError(f"{what} {path} declares a {n:,}-byte header in a {size:,}-byte file: {fix}")
            raw = f.read(n)
    except OSError as exc:
        raise DivgenError(f"cannot read {what} {path}: {exc.strerror}") from exc
    header = parse_json_object(raw, f"the header of {what} {path}", fix)
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list) \
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
        if ok:
            start, end = info["data_offsets"]
            ok = 0 <= start <= end <= data_len
            item = _ITEMSIZE.get(info["dtype"])
            if ok and item is not None:
                ok = end - start == math.prod(info["shape"]) * item
        if not ok:
            raise DivgenError(f"{what} {path}: tensor {str(name)[:80]!r} has a bad entry (dtype, shape or offsets "
                              f"outside the file): {fix}")
    return header, 8 + n
