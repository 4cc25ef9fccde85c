"""Synthesis throughput: FewGen vs CorrSynth vs CFG, examples/s, measured in one run.

    python benchmarks/synth_throughput.py                         # embedded SmolLM2-135M, AG News, 4 labels
    python benchmarks/synth_throughput.py --per-label 16 --max-new-tokens 32 --output-json

Every method runs the same job through ``divgen.engine.synth.run_synth`` (the code behind
``divgen synth``): the AG News task (4 labels), the same examples per label, EOS and stop strings
ignored so every example is exactly --max-new-tokens tokens, and the same row budget per engine
call (--batch-rows rows decoded together, shadow rows included). What differs is what the method
decodes: FewGen and K-CorrSynth forward K rows per group of K examples, CFG with the other labels
as negative prompts K² rows. Methods are interleaved over --repeats rounds (so load on a shared
machine hits them alike) and the median wall time of each is reported with the ratios of the
medians

    corrsynth / fewgen   (target >= 0.85: the contrast is nearly free)
    corrsynth / cfg      (target >= 3: CFG pays K − 1 extra forward rows per example)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import default_results_path, device_name, result_record, write_json  # noqa: E402

METHODS = ("fewgen", "corrsynth", "cfg")
TARGETS = {"corrsynth/fewgen": 0.85, "corrsynth/cfg": 3.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="ag_news", help="task file or shipped name (default ag_news, 4 labels)")
    p.add_argument("--per-label", type=int, default=16, help="examples per label per method (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per example (default 32)")
    p.add_argument("--batch-rows", type=int, default=64, help="rows per engine call, all methods (default 64)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved rounds; the median is reported, robust to one disturbed round (default 3)")
    p.add_argument("--g", type=float, default=2.0, help="guidance scale of CorrSynth and CFG (default 2)")
    p.add_argument("--few-shot", default=None, help="few-shot file (default: zero-shot prompts)")
    p.add_argument("--model", default=None, help="model (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output-json", nargs="?", const="default", default=None,
                   help="write results as JSON (default path: benchmarks/results/<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from divgen.engine.model import load_model
    from divgen.engine.synth import load_task, run_synth

    lm = load_model(args.model)
    base = load_task(args.task)
    base = dataclasses.replace(base, ignore_eos=True, stop=())   # the same length for every method
    tasks = {m: base.with_overrides(method=m, per_label=args.per_label, max_new_tokens=args.max_new_tokens,
                                    few_shot_file=args.few_shot, model=args.model,
                                    g=args.g if m != "fewgen" else None)
             for m in METHODS}
    k = len(base.labels)
    examples = k * args.per_label
    print(f"{device_name()}, torch threads {torch.get_num_threads()}: {k} labels x {args.per_label} examples x "
          f"{args.max_new_tokens} tokens per method, {args.batch_rows} rows per engine call", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        # warm-up (allocator, kernels) on a tiny job
        run_synth(tasks["corrsynth"].with_overrides(per_label=1, max_new_tokens=4), Path(tmp) / "warm.jsonl",
                  lm=lm, progress=False, log=lambda m: None)
        runs = {m: [] for m in METHODS}
        for rep in range(args.repeats):
            for m in METHODS:
                out = Path(tmp) / f"{m}-{rep}.jsonl"
                report = run_synth(tasks[m], out, lm=lm, batch_rows=args.batch_rows, progress=False,
                                   log=lambda msg: None)
                assert report.written == examples, (m, report.written)
                runs[m].append(report)
                print(f"  round {rep + 1} {m:10s} {report.wall_time_s:7.2f}s  "
                      f"{examples / report.wall_time_s:6.2f} examples/s", file=sys.stderr)

    rows = []
    for m in METHODS:
        wall = statistics.median(r.wall_time_s for r in runs[m])
        rep = runs[m][0]
        rows.append({
            "method": m,
            "examples": examples,
            "max_new_tokens": args.max_new_tokens,
            "median_wall_s": wall,
            "min_wall_s": min(r.wall_time_s for r in runs[m]),
            "examples_per_s": examples / wall,
            "rows_forwarded": rep.rows_forwarded,
            "rows_per_example_per_step": rep.rows_forwarded / (examples * (args.max_new_tokens - 1)),
            "wall_s_all_repeats": [r.wall_time_s for r in runs[m]],
        })
    eps = {r["method"]: r["examples_per_s"] for r in rows}
    ratios = {"corrsynth/fewgen": eps["corrsynth"] / eps["fewgen"], "corrsynth/cfg": eps["corrsynth"] / eps["cfg"]}

    print(f"\n{'method':10s} {'examples/s':>10s} {'wall s':>8s} {'rows/example/step':>18s}")
    for r in rows:
        print(f"{r['method']:10s} {r['examples_per_s']:10.2f} {r['median_wall_s']:8.2f} "
              f"{r['rows_per_example_per_step']:18.2f}")
    for name, value in ratios.items():
        verdict = "meets" if value >= TARGETS[name] else "MISSES"
        print(f"{name:17s} {value:5.2f}x  ({verdict} target >= {TARGETS[name]}x)")

    if args.output_json:
        path = default_results_path() if args.output_json == "default" else Path(args.output_json)
        write_json(path, result_record(
            "synth_throughput", rows, ratios=ratios, targets=TARGETS, labels=k, per_label=args.per_label,
            batch_rows=args.batch_rows, repeats=args.repeats, g=args.g, threads=torch.get_num_threads(),
            few_shot=args.few_shot,
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
