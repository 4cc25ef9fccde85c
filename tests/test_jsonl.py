"""engine/jsonl.py: the one JSONL reader (line numbers, BOM, the three ways to treat a last line
without a newline)."""
from __future__ import annotations

import pytest

from divgen.engine.errors import DivgenError
from divgen.engine.jsonl import read_jsonl


def test_records_line_numbers_bom_and_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n')
    got = read_jsonl(p, "data")
    assert got.records == [(1, {"a": 1}), (3, {"a": 2})]
    assert got.complete_bytes == got.size == len(p.read_bytes()) and got.torn_tail == b""


@pytest.mark.parametrize("tail,records,torn", [
    ("line", None, None),                          # the last line is a line: not JSON -> error
    ("torn-if-invalid", [(1, {"a": 1})], b'{"a": '),
    ("torn", [(1, {"a": 1})], b'{"a": '),
])
def test_invalid_last_line_without_newline(tmp_path, tail, records, torn):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": ')
    if records is None:
        with pytest.raises(DivgenError, match="line 2 is not JSON"):
            read_jsonl(p, "data", tail=tail)
        return
    got = read_jsonl(p, "data", tail=tail)
    assert got.records == records and got.torn_tail == torn and got.complete_bytes == 9


@pytest.mark.parametrize("tail,n", [("line", 2), ("torn-if-invalid", 2), ("torn", 1)])
def test_valid_last_line_without_newline(tmp_path, tail, n):
    p = tmp_path / "v.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": 2}')
    got = read_jsonl(p, "data", tail=tail)
    assert len(got.records) == n and got.complete_bytes == (17 if n == 2 else 9)


@pytest.mark.parametrize("body,needle", [(b'{"a": 1}\n[1, 2]\n', "line 2 is not a JSON object"),
                                         (b'{"a": 1}\nnope\n{"a": 3}\n', "line 2 is not JSON"),
                                         (b'{"a": "\xff"}\n', "line 1 is not UTF-8")])
def test_bad_lines_name_file_and_line(tmp_path, body, needle):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(body)
    for tail in ("line", "torn-if-invalid", "torn"):
        with pytest.raises(DivgenError, match=needle):
            read_jsonl(p, "data", tail=tail)


def test_missing_and_directory(tmp_path):
    with pytest.raises(DivgenError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl", "data")
    with pytest.raises(DivgenError, match="is a directory"):
        read_jsonl(tmp_path, "data")
