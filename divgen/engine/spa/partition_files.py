"""The files of ``spa partition``, read and checked without torch (the CLI checks them first).

``partitions.json`` (method, options, data path and hash, queries, K, assignment, sizes) and
``scores.jsonl`` (per example: raw and normalised scores and partition) are written by
``partition.write_partitions``; ``check_partition_out`` refuses an ``--out`` where writing them
would overwrite an input or a file the command did not write.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from divgen.engine.errors import DivgenError

PARTITIONS_FILE = "partitions.json"
SCORES_FILE = "scores.jsonl"


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_partitions(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / PARTITIONS_FILE
    if not path.exists():
        raise DivgenError(f"{path} does not exist: run `divgen spa partition` first and pass its {PARTITIONS_FILE}")
    from divgen.engine.inputs import read_json_object

    fix = "pass a partitions.json written by `divgen spa partition` (or choose another folder)"
    record = read_json_object(path, "partitions file", fix)
    assignment, k = record.get("assignment"), record.get("k")
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1 and isinstance(assignment, list)
            and all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < k for a in assignment)):
        raise DivgenError(f"{path} is not a partitions file written by `divgen spa partition` (its k or assignment "
                          f"is missing or out of range): {fix}")
    return record


WRITTEN = (PARTITIONS_FILE, SCORES_FILE, "query_responses.jsonl", ".influence_state.pt", "whole")


def _looks_like_scores(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            first = json.loads(f.readline() or b"null")
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and {"index", "partition", "scores"} <= set(first)


def check_partition_out(out_dir: Path, inputs) -> None:
    """``--out`` of ``spa partition`` before any work: no input is a file this command writes there,
    and the files it would replace are its own (a partitions record, a scores file)."""
    from divgen.engine.files import _inside

    out_dir = Path(out_dir)
    for inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        for name in WRITTEN:
            if _inside(Path(inp), out_dir / name):
                raise DivgenError(f"--out {out_dir} would overwrite its own input {inp} (it writes {name} there): "
                                  "choose another --out folder")
    if not out_dir.is_dir():
        return
    part_file, scores_file = out_dir / PARTITIONS_FILE, out_dir / SCORES_FILE
    if part_file.exists():
        read_partitions(part_file)          # not ours: refused with its own line
    if scores_file.exists() and not (_looks_like_scores(scores_file)):
        raise DivgenError(f"--out {out_dir} holds a {SCORES_FILE} that spa partition did not write: choose another "
                          "--out folder; it is left as it is")
