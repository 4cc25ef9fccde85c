"""The README's SPA table, end to end through the `divgen spa` CLI on the shipped synthetic data.

    python experiments/spa_evidence.py --out runs/spa-evidence      # ~23 min on a busy 2-core CPU

runs (and prints) these commands, each resumable, then writes ``table.md`` and ``table.json``:

    divgen spa adapt --data train.jsonl --out OUT/whole                               (single adapter)
    divgen spa partition --method random|lexical --out OUT/<method>
    divgen spa partition --method influence [--influence gradsim] --adapter OUT/whole/whole --out OUT/<m>
    divgen spa adapt --partitions OUT/<m> --out OUT/<m>/adapters                      (K adapters)
    divgen spa sample --adapters OUT/<m>/adapters --prompts eval_prompts.jsonl         (greedy, 1 batch)
    divgen spa sample --adapters OUT/whole --copies K --temperature 1.0                (sampling baseline)
    divgen spa sample --adapters OUT/whole                                             (greedy baseline)

"template form" is the share of answers that are exactly one of the dataset's template answers.

A sample step is skipped when its metrics file exists (delete it to re-sample).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from divgen.engine.spa.data import EVAL_FILE, QUERIES_FILE, TRAIN_FILE, template_answers

PARTITION_ROWS = (
    ("random", ["--method", "random"]),
    ("lexical (BM25)", ["--method", "lexical"]),
    ("influence (LiSSA)", ["--method", "influence", "--influence", "lissa"]),
    ("influence (grad. similarity)", ["--method", "influence", "--influence", "gradsim"]),
)
SLUG = {"random": "random", "lexical (BM25)": "lexical", "influence (LiSSA)": "influence",
        "influence (grad. similarity)": "gradsim"}


def _template_rate(samples: Path) -> float:
    """Share of answers that are exactly one of the dataset's template answers (a quality check:
    fluent, complete, in a form the data teaches)."""
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return sum(r["text"].strip() in template_answers(r["prompt"]) for r in rows) / len(rows)


def _run(cmd: list[str], log: list[str]) -> None:
    shown = "divgen " + " ".join(shlex.quote(c) for c in cmd)
    print(f"$ {shown}", file=sys.stderr, flush=True)
    log.append(shown)
    subprocess.run([sys.executable, "-m", "divgen.bindings.cli", *cmd], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/spa-evidence")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per adapter")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lissa-depth", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1.0, help="of the single-adapter sampling baseline")
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the commands (default 1: on a busy 2-core CPU, two OpenMP threads "
                        "wait on each other longer than they compute)")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    out = Path(args.out)
    train = ["--rank", str(args.rank), "--lr", str(args.lr), "--steps", str(args.steps),
             "--batch-size", str(args.batch_size)]
    model = ["--model", args.model] if args.model else []
    data = ["--data", str(TRAIN_FILE), "--queries", str(QUERIES_FILE)]
    k = sum(1 for line in QUERIES_FILE.read_text().splitlines() if line.strip())
    log: list[str] = []
    t0 = time.perf_counter()

    _run(["spa", "adapt", "--data", str(TRAIN_FILE), "--out", str(out / "whole"), *train, *model], log)
    rows = []
    for label, method in PARTITION_ROWS:
        slug = SLUG[label]
        extra = ["--adapter", str(out / "whole" / "whole"), "--lissa-depth", str(args.lissa_depth)] \
            if "influence" in method else []
        _run(["spa", "partition", *data, *method, *extra, "--out", str(out / slug), *model], log)
        _run(["spa", "adapt", "--partitions", str(out / slug), "--out", str(out / slug / "adapters"), *train, *model], log)
        samples = out / slug / "samples.jsonl"
        if not Path(f"{samples}.metrics.json").exists():
            _run(["spa", "sample", "--adapters", str(out / slug / "adapters"), "--prompts", str(EVAL_FILE),
                  "--max-new-tokens", str(args.max_new_tokens), "--prompts-per-batch", "1000", "--out", str(samples), *model], log)
        sizes = json.loads((out / slug / "partitions.json").read_text())["sizes"]
        rows.append((f"SPA, {label}", f"{k} adapters, greedy", sizes, json.loads(Path(f"{samples}.metrics.json").read_text())))
        rows[-1][3]["samples"] = str(samples)

    samples = out / "whole" / f"samples_t{args.temperature:g}.jsonl"
    if not Path(f"{samples}.metrics.json").exists():
        _run(["spa", "sample", "--adapters", str(out / "whole"), "--prompts", str(EVAL_FILE), "--copies", str(k),
              "--temperature", str(args.temperature), "--max-new-tokens", str(args.max_new_tokens),
              "--prompts-per-batch", "1000", "--out", str(samples), *model], log)
    rows.append(("single adapter on everything", f"{k} samples, T = {args.temperature:g}", None,
                 json.loads(Path(f"{samples}.metrics.json").read_text())))
    rows[-1][3]["samples"] = str(samples)
    samples = out / "whole" / "samples_greedy.jsonl"
    if not Path(f"{samples}.metrics.json").exists():
        _run(["spa", "sample", "--adapters", str(out / "whole"), "--prompts", str(EVAL_FILE),
              "--max-new-tokens", str(args.max_new_tokens), "--prompts-per-batch", "1000", "--out", str(samples), *model], log)
    greedy = json.loads(Path(f"{samples}.metrics.json").read_text())
    greedy["diversity_score"] = 0.0          # its K answers are one answer K times: every pair a duplicate
    greedy["samples"] = str(samples)
    rows.append(("single adapter on everything", "greedy (1 answer)", None, greedy))

    lines = ["| method | answers per prompt | partition sizes | Diversity Score ↑ | pairwise KL ↑ | template form |",
             "|---|---|---|---|---|---|"]
    for name, how, sizes, m in rows:
        kl = "0 (one model)" if len(m["adapters"]) < 2 else f"{m['pairwise_kl']:.3f}"
        m["template_form"] = _template_rate(Path(m["samples"]))
        lines.append(f"| {name} | {how} | {'/'.join(map(str, sizes)) if sizes else 'all'} | "
                     f"{m['diversity_score']:.3f} | {kl} | {100 * m['template_form']:.0f} % |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps({"commands": log, "rows": [
        {"method": n, "answers": h, "sizes": s, "diversity_score": m["diversity_score"], "pairwise_kl": m["pairwise_kl"],
         "template_form": m["template_form"]}
        for n, h, s, m in rows], "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
    print(table)
    print(f"({time.perf_counter() - t0:.0f}s; commands in {out / 'table.json'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
