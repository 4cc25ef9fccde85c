"""`divgen synth TASK --out FILE` and `divgen metrics FILE`.

synth: generate a labelled dataset from a task file (engine/synth/task.py) with FewGen, CFG, CorrSynth or
M-CorrSynth; flags override the task file. Append-only and resumable (engine/synth/).
metrics: intrinsic diversity of a generated JSONL file, per label and overall (engine/metrics.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from divgen.bindings import cli_ray
from divgen.bindings.cli_args import add_sampling_args, check_sampling_args
from divgen.engine import limits
from divgen.engine.errors import DivgenError
from divgen.engine.limits import METHODS



def register(subparsers) -> None:
    """Add this module's subcommands to the `divgen` parser."""
    p = subparsers.add_parser(
        "synth", help="generate a labelled dataset from a task file",
        description="Generate a labelled dataset from a task file (YAML/JSON, or a shipped task name: "
                    "ag_news, sentiment). Writes one JSON line per example; killed and run again with the "
                    "same arguments, it resumes where it stopped.",
    )
    p.add_argument("task", help="task file (YAML or JSON) or shipped task name")
    p.add_argument("--out", required=True, help="output JSONL file (appended to; resumed if it exists)")
    p.add_argument("--method", help=f"override the task's method: {', '.join(METHODS)}")
    p.add_argument("--per-label", type=int,
                   help=f"examples per label (at most {limits.MAX_JOB_EXAMPLES:,} examples per job)")
    add_sampling_args(p, defaults="default: the task file's value")
    p.add_argument("--few-shot", dest="few_shot_file", help="few-shot file (CSV/JSONL with labels), e.g. "
                   "../shared/data/ag_news_test.csv")
    p.add_argument("--rows-per-group", type=int, help="sample rows decoded in lockstep per group")
    p.add_argument("--g", type=float, help="guidance scale g in [1, 100] (corrsynth, cfg)")
    p.add_argument("--gamma", type=float, help="cross-label weight γ in [0, 100] (m-corrsynth)")
    p.add_argument("--delta", type=float, help="intra-label weight δ in [0, 100] (m-corrsynth)")
    p.add_argument("--copy-guard", type=int, default=None, metavar="N",
                   help="never emit an N-token n-gram of the row's own few-shot examples; 0 is off, else "
                        f"2 .. {limits.MAX_COPY_GUARD} (default: the task file's copy_guard, 0)")
    p.add_argument("--own-special", action=argparse.BooleanOptionalAction, default=None,
                   help="EOS and control tokens take the row's own log-prob, outside the contrast "
                        "(default: the task file's own_special, off)")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="rows decoded per engine call (default 64); does not change the texts")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar (default: a bar with examples/s on stderr)")
    cli_ray.add_arguments(p)
    p.set_defaults(func=run_synth_command)

    m = subparsers.add_parser(
        "metrics", help="diversity metrics of a generated JSONL file",
        description="Intrinsic diversity of a generated set, per label and overall: Self-BLEU (n = 1..4, "
                    "on a fixed-size random subset), distinct-n, mean pairwise embedding cosine similarity "
                    "(all-MiniLM-L6-v2), label counts, mean length, exact-duplicate rate, copy rate (8-word "
                    "sequences shared with the prompt's in-context examples) and degenerate rate (under 5 "
                    "words or only a label phrase).",
    )
    m.add_argument("file", nargs="+", help="JSONL file(s) with 'text' and 'label' fields (e.g. from divgen synth); "
                   "several files are compared side by side, one row each")
    m.add_argument("--json", action="store_true", help="print the metrics as JSON (a list for several files)")
    m.add_argument("--markdown", action="store_true", help="with several files: a Markdown table")
    m.add_argument("--self-bleu-sample", type=int, default=None,
                   help="texts per Self-BLEU subset (default 200; 0 = all texts)")
    m.add_argument("--sample-seed", type=int, default=0, help="seed of the Self-BLEU subset (default 0)")
    m.add_argument("--no-embeddings", action="store_true", help="skip the embedding cosine similarity")
    m.set_defaults(func=run_metrics_command)


def run_synth_command(args) -> int:
    from divgen.engine.synth import DEFAULT_BATCH_ROWS, load_task, run_synth

    check_sampling_args(args)
    if args.copy_guard is not None:
        limits.copy_guard(args.copy_guard, "--copy-guard")
    cli_ray.check_arguments(args)
    batch_rows = DEFAULT_BATCH_ROWS if args.batch_rows is None else limits.batch_rows(args.batch_rows, "--batch-rows")
    task = load_task(args.task).with_overrides(
        method=args.method, per_label=args.per_label, max_new_tokens=args.max_new_tokens, seed=args.seed,
        model=args.model, few_shot_file=args.few_shot_file, rows_per_group=args.rows_per_group,
        g=args.g, gamma=args.gamma, delta=args.delta, alpha=args.alpha, min_p=args.min_p, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, stop=args.stop, ignore_eos=args.ignore_eos, dtype=args.dtype,
        copy_guard=args.copy_guard, own_special=args.own_special,
    )
    if args.ray is not None:
        return cli_ray.run(task, args, batch_rows)
    report = run_synth(task, args.out, batch_rows=batch_rows, progress=args.progress, device=args.device,
                       compile=args.compile)
    counts = ", ".join(f"{k} {v}" for k, v in report.counts.items())
    if report.written:
        print(f"{report.out}: wrote {report.written} examples in {report.wall_time_s:.1f}s "
              f"({report.examples_per_s:.2f} examples/s, {task.method}); file now holds {counts}",
              file=sys.stderr)
    return 0


def run_metrics_command(args) -> int:
    from pathlib import Path

    from divgen.engine.metrics import (
        DEFAULT_SELF_BLEU_SAMPLE, compute_metrics, format_comparison, format_table, read_records, set_context,
    )

    sample = DEFAULT_SELF_BLEU_SAMPLE if args.self_bleu_sample is None else args.self_bleu_sample
    if sample < 0:
        raise DivgenError(f"--self-bleu-sample must be >= 0 (0 = all texts), got {sample}")
    loaded = []                      # every file is checked first
    for path in args.file:
        records = read_records(path)
        loaded.append((path, records, set_context(path, records)))
    results = []
    for path, records, context in loaded:
        texts, labels = [r["text"] for r in records], [str(r.get("label", "(none)")) for r in records]
        result = compute_metrics(texts, labels, self_bleu_sample=sample, sample_seed=args.sample_seed,
                                 embeddings=not args.no_embeddings, **context)
        result["file"] = str(path)
        results.append(result)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2, ensure_ascii=False))
    elif len(results) == 1:
        print(format_table(results[0]))
    else:
        print(format_comparison([(Path(r["file"]).stem, r) for r in results], markdown=args.markdown))
        print(f"\nOverall columns over all texts; '(label)' columns averaged over labels. Self-BLEU on at most "
              f"{sample or 'all'} texts per set (seed {args.sample_seed}); dup = exact-duplicate rate.")
    return 0
