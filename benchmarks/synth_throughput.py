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

``--batching`` compares instead, with EOS and stop strings honoured (real lengths), the engine's
continuous batching of guidance groups against fixed batches (every call one batch of at most
--batch-rows rows that shrinks as rows finish, as before the engine core), per method:

    python benchmarks/synth_throughput.py --batching --threads 1 --few-shot ../shared/data/ag_news_test.csv

and prints the mean slot occupancy (rows doing useful work / slots, per step; goal >= 90 % for
continuous batching; also split into the steps in which groups waited for slots, the steady
state, and the drain at the end of each decoder call) and examples/s for both (continuous >= 0.95x fixed on CPU, where a step
costs about what its rows cost; the gain is a GPU's, where a step costs about the same at 8 rows
as at 64). ``--variants continuous-lag`` adds continuous batching with the CUDA schedule (the
host reads each step's tokens one step late, so a finished row's slot idles one step longer).
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
import torch

from divgen.engine import limits
from divgen.bench.common import default_results_path, device_name, result_record, write_json

METHODS = limits.BENCH_METHODS
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
    p.add_argument("--batching", action="store_true",
                   help="compare continuous batching with fixed batches (EOS honoured) instead of methods")
    p.add_argument("--variants", nargs="+", default=["fixed", "continuous"],
                   choices=["fixed", "continuous", "continuous-lag"],
                   help="with --batching: what to compare (continuous-lag: continuous batching with the CUDA "
                        "schedule, each step's tokens read one step late; default fixed continuous)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="methods to run (default: all; with --batching: fewgen corrsynth)")
    p.add_argument("--output-json", nargs="?", const="default", default=None,
                   help="write results as JSON (default path: benchmarks/results/<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from divgen.engine.model import load_model
    from divgen.engine.synth import load_task, run_synth

    if args.batching:
        return batching(args)
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


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def batching(args) -> int:
    """Continuous batching vs fixed batches, EOS honoured: occupancy and examples/s."""
    from divgen.engine.model import load_model
    from divgen.engine.synth import job, load_task, run_synth

    lm = load_model(args.model)
    base = load_task(args.task)
    methods = args.methods or ["fewgen", "corrsynth"]
    k = len(base.labels)
    examples = k * args.per_label
    calls = []                                   # (useful rows, slots x steps) of each decoder call
    real_decode = job.decode_batch

    def recording(*a, **kw):
        results, stats = real_decode(*a, **kw)
        waiting = [u for u, w in zip(stats.rows_forwarded_per_step, stats.waiting_per_step) if w]
        calls.append((stats.rows_forwarded, stats.slots * len(stats.rows_forwarded_per_step), stats.slots_forwarded,
                      sum(waiting), stats.slots * len(waiting)))
        return results, stats

    job.decode_batch = recording

    # rows per decoder call (fixed: one batch) and whether the host reads each step one step late
    known = {"fixed": (1, None), "continuous": (job.ROWS_PER_CALL, None), "continuous-lag": (job.ROWS_PER_CALL, True)}
    variants = {v: known[v] for v in args.variants}
    print(f"{device_name()}, torch threads {torch.get_num_threads()}: {k} labels x {args.per_label} examples, "
          f"up to {args.max_new_tokens} tokens (EOS honoured), {args.batch_rows} slots", file=sys.stderr)
    runs = {(m, v): [] for m in methods for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        run_synth(base.with_overrides(method="fewgen", per_label=1, max_new_tokens=4), Path(tmp) / "warm.jsonl",
                  lm=lm, progress=False, log=lambda m: None)      # warm-up: weight packing, allocator
        for rep in range(args.repeats):
            for m in methods:
                task = base.with_overrides(method=m, per_label=args.per_label, max_new_tokens=args.max_new_tokens,
                                           few_shot_file=args.few_shot, model=args.model,
                                           g=args.g if m != "fewgen" else None)
                for v, (per_call, lag) in variants.items():
                    calls.clear()
                    out = Path(tmp) / f"{m}-{v}-{rep}.jsonl"
                    report = run_synth(task, out, lm=lm, batch_rows=args.batch_rows, progress=False,
                                       log=lambda msg: None, per_call=per_call, lag=lag)
                    assert report.written == examples, (m, v, report.written)
                    useful, slots = sum(c[0] for c in calls), sum(c[1] for c in calls)
                    computed = sum(c[2] for c in calls)
                    w_useful, w_slots = sum(c[3] for c in calls), sum(c[4] for c in calls)
                    steady = w_useful / w_slots if w_slots else None       # no step waited (fixed batches)
                    runs[(m, v)].append((report.wall_time_s, useful / slots, useful / computed, steady,
                                         1 - w_slots / slots, len(calls)))
                    print(f"  round {rep + 1} {m:10s} {v:10s} {report.wall_time_s:7.2f}s "
                          f"{examples / report.wall_time_s:6.2f} ex/s  occupancy {100 * useful / slots:5.1f} % "
                          f"(while groups wait {_pct(steady)}; drain {100 * (1 - w_slots / slots):4.1f} % "
                          f"of steps; {len(calls)} calls)", file=sys.stderr)
    job.decode_batch = real_decode
    rows = []
    print(f"\n{'method':10s} {'batching':10s} {'examples/s':>10s} {'occupancy':>9s} {'while waiting':>13s} "
          f"{'drain steps':>11s} {'computed-slot use':>17s}")
    for (m, v), rs in runs.items():
        wall = statistics.median(r[0] for r in rs)
        row = {"method": m, "batching": v, "examples": examples, "examples_per_s": examples / wall,
               "median_wall_s": wall, "occupancy": statistics.fmean(r[1] for r in rs),
               "computed_slot_use": statistics.fmean(r[2] for r in rs),
               "occupancy_while_waiting": None if rs[0][3] is None else statistics.fmean(r[3] for r in rs),
               "drain_step_fraction": statistics.fmean(r[4] for r in rs), "decoder_calls": rs[0][5],
               "wall_s_all_repeats": [r[0] for r in rs]}
        rows.append(row)
        print(f"{m:10s} {v:10s} {row['examples_per_s']:10.2f} {100 * row['occupancy']:8.1f}% "
              f"{_pct(row['occupancy_while_waiting']):>13s} {100 * row['drain_step_fraction']:10.1f}% "
              f"{100 * row['computed_slot_use']:16.1f}%")
    ratios = {}
    for m in methods:
        eps = {r["batching"]: r["examples_per_s"] for r in rows if r["method"] == m}
        for v in eps:
            if v != "fixed" and "fixed" in eps:
                ratios[f"{m} {v}/fixed"] = eps[v] / eps["fixed"]
                print(f"{m}: {v} / fixed = {ratios[f'{m} {v}/fixed']:.2f}x examples/s")
    if args.output_json:
        path = default_results_path() if args.output_json == "default" else Path(args.output_json)
        write_json(path, result_record(
            "synth_batching", rows, ratios=ratios, labels=k, per_label=args.per_label,
            batch_rows=args.batch_rows, max_new_tokens=args.max_new_tokens, repeats=args.repeats, g=args.g,
            threads=torch.get_num_threads(), few_shot=args.few_shot,
            note="occupancy = useful rows / slots per step (slots = the engine's batch shape); computed_slot_use "
                 "= useful rows / slots actually computed (eager CPU steps skip trailing free slots); "
                 "occupancy_while_waiting = occupancy over the steps in which groups waited for slots (the "
                 "steady state); drain_step_fraction = steps with nothing left to admit (each call's end)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
