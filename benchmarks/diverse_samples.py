"""N = 8 samples of one prompt with and without ``--diverse G``, at equal temperature.

For every prompt and every seed base, the variants (off, G = 2, G = 4 by default) draw the same
N rows with the same seeds, interleaved, and the script reports per variant, averaged over
prompts x seed bases:

* distinct answers: distinct texts among the N (lower-cased, whitespace collapsed, trailing
  punctuation dropped), out of N;
* Self-BLEU-4 of the N texts (``engine.metrics.self_bleu``; lower = more diverse);
* distinct-2 (distinct bigrams / bigrams over the N texts);
* mean words per sample and the share of samples that ended with EOS (not the length limit),
  so that diversity bought with rambling shows.

    .venv/bin/python benchmarks/diverse_samples.py --threads 1          # the README table
    .venv/bin/python benchmarks/diverse_samples.py --quick               # 2 prompts, 1 seed base
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import torch

from divgen.bench.common import default_results_path, result_record, write_json
from divgen.engine.diverse import generate_diverse
from divgen.engine.metrics import distinct_n, self_bleu, tokenize
from divgen.engine.model import load_model

PROMPTS = [
    "Give me a name for a cat.",
    "Name a fruit.",
    "Suggest a title for a mystery novel.",
    "Write a one-sentence slogan for a bicycle shop.",
    "Name a city to visit in Europe.",
    "Give me an idea for a birthday present.",
]


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!?,;: ")


def measure(results) -> dict:
    texts = [r.text for r in results]
    tokens = [tokenize(t) for t in texts]
    return {
        "distinct_answers": len({normalise(t) for t in texts}),
        "self_bleu4": self_bleu(tokens, orders=(4,))[4],
        "distinct2": distinct_n(tokens, orders=(2,))[2] or 0.0,
        "mean_words": statistics.fmean(len(t.split()) for t in texts),
        "eos_share": sum(r.finish_reason == "eos" for r in results) / len(results),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=8, help="samples per prompt (default 8)")
    ap.add_argument("--scales", type=float, nargs="+", default=[2.0, 4.0], help="--diverse values to compare with off")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--min-p", type=float, default=0.1, help="α cutoff on each row's own distribution (all variants)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed-bases", type=int, nargs="+", default=[0, 1000, 2000])
    ap.add_argument("--quick", action="store_true", help="2 prompts, 1 seed base")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--model", default=None, help="model (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--output-json", nargs="?", const="auto", default=None,
                    help="write results (default path: benchmarks/results/<device>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = PROMPTS[:2] if args.quick else PROMPTS
    bases = args.seed_bases[:1] if args.quick else args.seed_bases
    variants = [None] + list(args.scales)
    lm = load_model(args.model)
    per_variant = {v: [] for v in variants}
    examples = {}
    start, done, total = time.perf_counter(), 0, len(prompts) * len(bases) * len(variants)
    for prompt in prompts:
        formatted = lm.format_prompt(prompt)
        for base in bases:
            for v in variants:          # interleaved: every variant sees the same prompt and seeds
                results, _ = generate_diverse(lm, formatted, args.n, diverse=v, seeds=base,
                                              temperature=args.temperature, alpha=args.min_p, max_new_tokens=args.max_new_tokens)
                per_variant[v].append(measure(results))
                if base == bases[0]:
                    examples[(prompt, v)] = [r.text for r in results]
                done += 1
                print(f"[{done}/{total}] {time.perf_counter() - start:.0f}s  {prompt!r} seed {base} "
                      f"diverse {v}: {per_variant[v][-1]['distinct_answers']} distinct", file=sys.stderr)

    keys = ["distinct_answers", "self_bleu4", "distinct2", "mean_words", "eos_share"]
    rows = []
    for v in variants:
        row = {"diverse": v if v is not None else "off"}
        row.update({k: statistics.fmean(m[k] for m in per_variant[v]) for k in keys})
        rows.append(row)
    print(f"\nN = {args.n}, temperature {args.temperature}, min-p {args.min_p}, {args.max_new_tokens} new tokens, "
          f"{len(prompts)} prompts x {len(bases)} seed bases (means)\n")
    print(f"| --diverse | distinct answers (of {args.n}) | Self-BLEU-4 ↓ | distinct-2 ↑ | words/sample | ended by EOS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['diverse']} | {r['distinct_answers']:.2f} | {r['self_bleu4']:.3f} | {r['distinct2']:.3f} | "
              f"{r['mean_words']:.1f} | {r['eos_share']:.0%} |")
    print("\nper prompt (distinct answers / Self-BLEU-4, mean over seed bases):")
    for i, prompt in enumerate(prompts):
        cells = []
        for v in variants:
            ms = per_variant[v][i * len(bases):(i + 1) * len(bases)]
            cells.append(f"{v or 'off'}: {statistics.fmean(m['distinct_answers'] for m in ms):.1f} / "
                         f"{statistics.fmean(m['self_bleu4'] for m in ms):.3f}")
        print(f"  {prompt!r}: " + ", ".join(cells))
    print("\nexamples (first seed base, first 4 samples):")
    for prompt in prompts[:2]:
        for v in variants:
            shown = " | ".join(t.replace("\n", " ")[:50] for t in examples[(prompt, v)][:4])
            print(f"  {prompt!r} diverse {v or 'off'}: {shown}")
    if args.output_json:
        path = default_results_path() if args.output_json == "auto" else args.output_json
        write_json(path, result_record("diverse_samples", rows, n=args.n, temperature=args.temperature, min_p=args.min_p,
                                       max_new_tokens=args.max_new_tokens, prompts=prompts, seed_bases=bases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
