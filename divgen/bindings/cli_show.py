"""`divgen show A.jsonl B.jsonl ...`: the examples of several synth outputs side by side.

Records of the same (group, slot) came from the same prompt in every method (FewGen, CorrSynth,
M-CorrSynth and CFG see the same few-shot examples slot by slot), so the columns of one row are
the methods' answers to one prompt. ``--per-label N`` rows per label, in plan order.
"""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

from divgen.engine.errors import DivgenError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "show", help="print synth outputs side by side (same prompt per row), a few examples per label",
        description="Print the examples of several synth outputs in columns, one row per prompt "
                    "(records of the same group and slot share their prompt across methods), grouped by label.",
    )
    p.add_argument("files", nargs="+", metavar="OUT.jsonl", help="synth outputs of the same task (one column each)")
    p.add_argument("--per-label", type=int, default=3, help="rows per label (default 3)")
    p.add_argument("--width", type=int, default=None, help="total width in characters (default: the terminal's)")
    p.set_defaults(func=run_show_command)


def load(path: Path) -> dict:
    from divgen.engine.jsonl import read_jsonl

    out = {}
    for n, rec in read_jsonl(path, "synth output", tail="torn").records:
        if not (isinstance(rec.get("text"), str) and isinstance(rec.get("label"), str)
                and isinstance(rec.get("group"), int) and isinstance(rec.get("slot"), int)):
            raise DivgenError(f"{path} line {n} is not a synth record (text, label, group, slot): pass divgen synth outputs")
        out[(rec["group"], rec["slot"])] = rec
    if not out:
        raise DivgenError(f"{path} holds no complete record: pass a synth output with at least one example")
    return out


def side_by_side(columns: list[tuple[str, dict]], per_label: int, width: int) -> str:
    """Rows (group, slot) present in every column, ``per_label`` per label, wrapped into columns."""
    keys = sorted(set.intersection(*(set(c) for _, c in columns)))
    if not keys:
        raise DivgenError("the files share no (group, slot): pass outputs of the same task (same prompts)")
    first = columns[0][1]
    labels = list(dict.fromkeys(first[k]["label"] for k in keys))
    n = len(columns)
    col = max(20, (width - 3 * (n - 1)) // n)
    sep = " | "
    rule = "-+-".join("-" * col for _ in range(n))
    lines = [sep.join(name.ljust(col)[:col] for name, _ in columns).rstrip(), rule]
    for label in labels:
        rows = [k for k in keys if first[k]["label"] == label][:per_label]
        lines.append(f"[{label}]")
        for k in rows:
            cells = [textwrap.wrap(c[k]["text"] or "(empty)", col) or [""] for _, c in columns]
            for i in range(max(len(x) for x in cells)):
                lines.append(sep.join((x[i] if i < len(x) else "").ljust(col) for x in cells).rstrip())
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def run_show_command(args) -> int:
    from divgen.engine import limits

    limits.count(args.per_label, "--per-label")
    if args.width is not None:
        limits.count(args.width, "--width", low=20, high=limits.MAX_WIDTH)
    width = args.width or shutil.get_terminal_size((120, 24)).columns
    columns = []
    for f in args.files:
        data = load(Path(f))
        methods = sorted({r.get("method", "?") for r in data.values()})
        columns.append((f"{Path(f).stem} ({', '.join(methods)})", data))
    print(side_by_side(columns, args.per_label, width), end="")
    return 0
