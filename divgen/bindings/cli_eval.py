"""`divgen eval SYNTH.jsonl ... --real FILE`: students trained on synthetic sets, tested on real rows
(engine/eval/evaluate.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from divgen.engine.errors import DivgenError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="train students on synthetic sets, test them on real labelled data",
        description="Train a student on each synthetic JSONL set and test it on held-out real rows: accuracy "
                    "and macro-F1 (mean ± std over seeds), label fidelity (a judge trained on real pool rows "
                    "agrees with the label), and a real-data row (the same student on as many real pool rows). "
                    "Real rows whose index %% every == 0 (the task's few_shot.every) are the pool; the others "
                    "are the test rows.",
    )
    p.add_argument("file", nargs="*", help="synthetic JSONL file(s) with 'text' and 'label' (from divgen synth)")
    p.add_argument("--real", required=True, help="real labelled CSV or JSONL, e.g. ../shared/data/ag_news_test.csv")
    p.add_argument("--task", help="task file or shipped task name whose labels' source_label map the real "
                   "label column (default: the task named by the first file's .task.json sidecar)")
    p.add_argument("--text-column", help="real data text column (default: 'text', else 'title' + 'description')")
    p.add_argument("--label-column", default="label", help="real data label column (default: label)")
    p.add_argument("--student", choices=("probe", "finetune", "both"), default="probe",
                   help="probe: linear probe on frozen MiniLM embeddings (default, fast); finetune: MiniLM + a "
                   "classification head trained end to end (minutes on CPU); both")
    p.add_argument("--seeds", type=int, default=3, help="seeds per student (default 3)")
    p.add_argument("--test-limit", type=int, help="test on at most N real test rows, evenly spaced (default: all)")
    p.add_argument("--finetune-test-limit", type=int, default=1000,
                   help="test rows for the fine-tuned student (default 1000; 0 = as many as the probe)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument("--no-real", dest="real_ceiling", action="store_false", default=True,
                   help="skip the real-data (ceiling) row")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=run_eval_command)


def task_for(files: list[str], task_arg: str | None):
    """The task: --task, else the one a synth sidecar names."""
    from divgen.engine.synth.task import load_task

    if task_arg:
        return load_task(task_arg)
    from divgen.engine.synth.output import existing_sidecar

    for f in files:
        side = existing_sidecar(Path(f))          # .FILE.task.json (or the old FILE.task.json)
        if side is not None:
            from divgen.engine.inputs import read_json_object

            named = read_json_object(side, "task sidecar", "it is not a divgen task sidecar: move it away or pass "
                                                           "--task TASK").get("task_file")
            if isinstance(named, str) and named and Path(named).is_file():
                return load_task(named)
    raise DivgenError("no task given and no .task.json sidecar names one: pass --task TASK (e.g. ag_news)")


def run_eval_command(args) -> int:
    from divgen.engine.eval.evaluate import evaluate, format_eval

    from divgen.engine import limits

    limits.count(args.seeds, "--seeds", high=limits.MAX_REPEATS)
    limits.count(args.epochs, "--epochs", high=limits.MAX_EPOCHS)
    if args.test_limit is not None:
        limits.count(args.test_limit, "--test-limit")
    limits.count(args.finetune_test_limit, "--finetune-test-limit", low=0, hint=" (0 = as many as the probe)")
    for f in args.file:
        if not Path(f).is_file():
            raise DivgenError(f"{f} is not a file: give a synthetic JSONL file written by `divgen synth`")
    if len({str(Path(f).resolve()) for f in args.file}) != len(args.file):
        raise DivgenError("a synthetic file is given twice: give each set once")
    task = task_for(args.file, args.task)
    students = ("probe", "finetune") if args.student == "both" else (args.student,)
    result = evaluate(args.file, args.real, task, students=students, seeds=range(args.seeds),
                      text_column=args.text_column, label_column=args.label_column, test_limit=args.test_limit,
                      finetune_test_limit=args.finetune_test_limit or None,
                      finetune_epochs=args.epochs, real_ceiling=args.real_ceiling)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(format_eval(result, markdown=args.markdown))
    return 0
