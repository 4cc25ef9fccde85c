"""Copy guard and own-special on AG News: generate, score and tabulate (experiments/README.md,
"copy guard and special tokens").

    OMP_NUM_THREADS=1 python experiments/copy_guard.py --data ../shared/data/ag_news_test.csv \
        --out runs/copy_guard --per-label 50 --seeds 0 1

For each seed it runs ``divgen synth ag_news`` for FewGen, CorrSynth (the task's g = 2),
CorrSynth + ``--copy-guard 8``, CorrSynth + ``--own-special`` and CorrSynth with both (each file
resumes after a kill), then ``divgen metrics`` and ``divgen eval`` (the linear probe) on every
file, and prints one Markdown row per set: words, EOS rate, copy rate (an 8-word run of the
row's own examples), degenerate rate, per-label Self-BLEU-4, fidelity and probe accuracy.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {   # name: synth flags
    "fewgen": ["--method", "fewgen"],
    "corrsynth": ["--method", "corrsynth"],
    "corrsynth+guard8": ["--method", "corrsynth", "--copy-guard", "8"],
    "corrsynth+own": ["--method", "corrsynth", "--own-special"],
    "corrsynth+guard8+own": ["--method", "corrsynth", "--copy-guard", "8", "--own-special"],
}
DIVGEN = [sys.executable, "-m", "divgen.bindings.cli"]


def run(cmd: list[str], capture: bool = False) -> str:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return done.stdout or ""


def eos_rate(path: Path) -> float:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(r["finish_reason"] == "eos" for r in rows) / len(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="AG News CSV (few-shot pool and real test rows)")
    ap.add_argument("--out", default="runs/copy_guard", help="folder for the generated sets")
    ap.add_argument("--per-label", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--no-eval", action="store_true", help="skip divgen eval (no probe accuracy, no fidelity)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for seed in args.seeds:
        for name in args.variants:
            path = out / f"{name}_s{seed}.jsonl"
            run([*DIVGEN, "synth", "ag_news", "--few-shot", args.data, "--out", str(path), "--per-label",
                 str(args.per_label), "--seed", str(seed), "--no-progress", *VARIANTS[name]])
            files[(name, seed)] = path
    metrics = json.loads(run([*DIVGEN, "metrics", *map(str, files.values()), "--json", "--no-embeddings"],
                             capture=True))
    metrics = metrics if isinstance(metrics, list) else [metrics]
    evals = {}
    if not args.no_eval:
        ev = json.loads(run([*DIVGEN, "eval", *map(str, files.values()), "--real", args.data, "--task", "ag_news",
                             "--seeds", "1", "--no-real", "--json"], capture=True))
        for row in ev["rows"]:
            if not row.get("real"):
                evals[row["file"]] = row
    print("| set | seed | n | words | EOS % | copy % | degen % | sBLEU-4 (label) | fidelity % | probe acc % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ((name, seed), path), m in zip(files.items(), metrics):
        o = m["overall"]
        per_label = [lab["self_bleu"]["4"] for lab in m["labels"].values() if lab["self_bleu"]]
        sb4 = f"{sum(per_label) / len(per_label):.3f}" if per_label else ""    # needs 2+ texts per label
        e = evals.get(str(path), {})
        fid = e.get("fidelity")
        acc = e.get("students", {}).get("probe", {}).get("accuracy", {}).get("mean")
        print(f"| {name} | {seed} | {o['count']} | {o['mean_words']:.1f} | {100 * eos_rate(path):.1f} | "
              f"{100 * o['copy_rate']:.1f} | {100 * o['degenerate_rate']:.1f} | {sb4} | "
              f"{'' if fid is None else f'{100 * fid:.1f}'} | {'' if acc is None else f'{100 * acc:.1f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
