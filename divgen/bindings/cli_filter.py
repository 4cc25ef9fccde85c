"""`divgen filter IN.jsonl --out OUT.jsonl`: drop degenerate texts, copies of the prompt's examples,
exact and near duplicates and (with --real) rows a judge assigns to another label (engine/filter.py)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from divgen.engine.errors import DivgenError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "filter", help="remove degenerate, copied, duplicate and mislabelled rows from a synthetic set",
        description="Remove rows from a synthetic JSONL set, each for the first reason that applies: degenerate "
                    "(under --min-words words or only a label phrase), copy (shares a --copy-n word sequence with "
                    "the in-context examples its prompt showed), duplicate, near duplicate (word 2-gram Jaccard >= "
                    "--near-threshold with an earlier kept row), judge (with --real: a classifier trained on the "
                    "real pool rows assigns another label). Prints what it removed; kept rows are written unchanged.",
    )
    p.add_argument("file", help="synthetic JSONL file (from divgen synth)")
    p.add_argument("--out", required=True, help="where the kept rows go: a new file, or this command's own earlier "
                   "output (any other existing file is refused; the input is never changed)")
    p.add_argument("--removed", help="also write the removed rows here, each with a 'filter_reason' field")
    p.add_argument("--real", help="real labelled CSV/JSONL: train a judge on its pool rows and drop rows it "
                   "assigns to another label")
    p.add_argument("--task", help="task file or name mapping the real labels (default: the input's sidecar task)")
    p.add_argument("--text-column", help="real data text column (default: 'text', else 'title' + 'description')")
    p.add_argument("--label-column", default="label", help="real data label column (default: label)")
    p.add_argument("--few-shot", dest="few_shot_file", help="few-shot file the set's prompts drew from (default: "
                   "the one named by the input's .task.json sidecar)")
    p.add_argument("--min-words", type=int, default=None, help="degenerate below this many words (default 5)")
    p.add_argument("--copy-n", type=int, default=None, help="copy = a shared sequence of this many words (default 8)")
    p.add_argument("--near-threshold", type=float, default=None, help="near-duplicate Jaccard threshold (default 0.6)")
    for name in ("degenerate", "copies", "duplicates", "near-duplicates"):
        p.add_argument(f"--keep-{name}", action="store_true", help=f"do not remove {name.replace('-', ' ')}")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_filter_command)


def check_outputs(args) -> None:
    """--out and --removed: new files, or filter's own earlier outputs (engine/files.py)."""
    from divgen.engine.files import check_output_file
    from divgen.engine.filter import MARKER_SUFFIX, is_filter_output

    inputs = [args.file, args.real, args.few_shot_file, args.task]
    outs = [("--out", args.out)] + ([("--removed", args.removed)] if args.removed else [])
    for flag, out in outs:
        check_output_file(out, flag, inputs=inputs, ours=is_filter_output, what="divgen filter",
                          sidecars=[f".{Path(out).name}{MARKER_SUFFIX}"])
    if args.removed and os.path.abspath(args.removed) == os.path.abspath(args.out):
        raise DivgenError("--removed and --out name the same file: give two paths")


def run_filter_command(args) -> int:
    from divgen.engine.filter import DEFAULT_NEAR_THRESHOLD, FilterConfig, filter_rows, write_output
    from divgen.engine.metrics import DEFAULT_COPY_N, DEFAULT_MIN_WORDS, read_records, set_context

    src = Path(args.file)
    if not src.is_file():
        raise DivgenError(f"{src} is not a file: give a JSONL file written by `divgen synth`")
    check_outputs(args)
    if args.real and not Path(args.real).is_file():
        raise DivgenError(f"--real {args.real} is not a file: pass a labelled CSV or JSONL file")
    config = FilterConfig(
        degenerate=not args.keep_degenerate, copies=not args.keep_copies, duplicates=not args.keep_duplicates,
        near_duplicates=not args.keep_near_duplicates,
        min_words=DEFAULT_MIN_WORDS if args.min_words is None else args.min_words,
        copy_n=DEFAULT_COPY_N if args.copy_n is None else args.copy_n,
        near_threshold=DEFAULT_NEAR_THRESHOLD if args.near_threshold is None else args.near_threshold)
    config.check()
    records = read_records(src)
    context = set_context(src, records, args.few_shot_file)
    texts = [r["text"] for r in records]
    labels = [str(r.get("label", "(none)")) for r in records]
    agrees = None
    if args.real:
        from divgen.bindings.cli_eval import task_for
        from divgen.engine.eval.data import read_synthetic

        task = task_for([args.file], args.task)
        read_synthetic(src, task)                       # labels must be the task's: checked before the model
        from divgen.engine.eval.judge import Judge

        judge = Judge.from_real(args.real, task, args.text_column, args.label_column)
        agrees = judge.agrees(texts, labels)
    report = filter_rows(texts, labels, config=config, examples=context["examples"],
                         label_phrases=context["label_phrases"], judge_agrees=agrees)
    lines = [json.dumps(records[i], ensure_ascii=False) for i in report.kept]
    write_output(Path(args.out), lines, "--out")
    if args.removed:
        write_output(Path(args.removed), [json.dumps({**records[i], "filter_reason": reason}, ensure_ascii=False)
                                          for i, reason, _ in report.removed], "--removed")
    if args.json:
        print(json.dumps({"file": str(src), "out": args.out, "rows": len(records), "kept": len(report.kept),
                          "removed": report.counts(), "copy_unchecked": report.copy_unchecked}, indent=2))
    else:
        print(f"{src}: {report.summary(len(records))} -> {args.out}", file=sys.stderr)
    return 0
