"""The answer file of ``spa sample --out``: one JSON line per (prompt, adapter, copy), appended a
batch of prompts at a time, so a killed run resumes (read without torch: the CLI checks an
existing ``--out`` before the model loads).

Each line: ``{"prompt", "prompt_index", "adapter", "copy", "seed", "text", "finish_reason",
"token_ids", "run"}``; ``run`` is the fingerprint of what decides the answers (model, adapters,
prompts, decoding settings): a file of another run is refused, never changed.
"""
from __future__ import annotations

RECORD_START = b'{"prompt": '     # every answer line starts so (see ``answer_record``)


def run_fingerprint(settings: dict) -> str:
    """Hash of what decides the answers (model, adapters, prompts, decoding settings)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def answer_record(prompt_index: int, prompt: str, answer: dict, fingerprint: str) -> dict:
    return {"prompt": prompt, "prompt_index": prompt_index, "adapter": answer["adapter"], "copy": answer["copy"],
            "seed": answer["seed"], "text": answer["text"], "finish_reason": answer["finish_reason"],
            "token_ids": answer["token_ids"], "run": fingerprint}


def read_answers(out, fingerprint: str) -> tuple[dict, int]:
    """Answers already in ``out`` by prompt index, and the length of its complete part. A file that
    is not an answer file of this run is refused (never changed); a torn last line is reported by
    ``complete_bytes`` < size and cut off by the caller."""
    from pathlib import Path

    from divgen.engine.errors import DivgenError
    from divgen.engine.jsonl import read_jsonl

    out = Path(out)
    if not out.exists() or out.stat().st_size == 0:
        return {}, 0
    try:
        contents = read_jsonl(out, "--out", tail="torn")
    except DivgenError as exc:
        raise DivgenError(f"{exc}; --out {out} is not a `spa sample` answer file, so it is left as it is: "
                          "write to a new --out") from exc
    done: dict[int, list[dict]] = {}
    for n, rec in contents.records:
        if not isinstance(rec.get("prompt_index"), int) or "run" not in rec or "token_ids" not in rec:
            raise DivgenError(f"--out {out} line {n} is not a `spa sample` answer: the file is not ours, so it is "
                              "left as it is; write to a new --out")
        if rec["run"] != fingerprint:
            raise DivgenError(f"--out {out} holds answers of a different run (other adapters, prompts, model or "
                              "decoding settings): rerun with the same arguments to resume, or write to a new --out")
        done.setdefault(rec["prompt_index"], []).append(rec)
    if contents.torn_tail and not (contents.torn_tail.startswith(RECORD_START) and done):
        raise DivgenError(f"--out {out} ends with bytes that are not a `spa sample` answer: the file is not ours, "
                          "so it is left as it is; write to a new --out")
    if not done and not contents.torn_tail:
        raise DivgenError(f"--out {out} holds no `spa sample` answer: it is not ours, so it is left as it is; "
                          "write to a new --out")
    return done, contents.complete_bytes
