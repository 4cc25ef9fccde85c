"""Reading user JSONL files: one JSON object per line, errors that name the file and line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from divgen.engine.errors import DivgenError


def iter_jsonl_objects(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for every non-blank line of a JSONL file.

    ``what`` names the file in errors ("data", "few-shot", ...). A missing or unreadable file, a
    line that is not JSON, or a line that is not a JSON object raises DivgenError.
    """
    path = Path(path)
    if not path.is_file():
        raise DivgenError(f"{what} file {path} does not exist: pass a JSONL file")
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DivgenError(f"{what} file {path} line {n} is not JSON ({exc.msg}): "
                                      "one JSON object per line") from exc
                if not isinstance(obj, dict):
                    raise DivgenError(f"{what} file {path} line {n} is not a JSON object: one object per line")
                yield n, obj
    except (OSError, UnicodeDecodeError) as exc:
        raise DivgenError(f"cannot read {what} file {path}: {exc}") from exc
