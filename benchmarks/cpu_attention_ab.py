"""The CPU decode step with the native attention kernel against the torch batched products, in one
process, interleaved rounds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_attention_ab.py [--dtype float32] [--repeats 3]

For each shape (rows x prompt tokens) it times ``generate`` for n + 4 and for 4 new tokens with each
attention path and reports decode-only tok/s (the difference), medians over the rounds, and native /
torch. Sampled at temperature 1, min-p 0.05, EOS ignored; the embedded SmolLM2-135M-Instruct. Long
prompts are where the kernel matters (attention reads every cached position each step).
"""
import argparse
import statistics
import time

import torch

from divgen.bench.suite import random_prompts
from divgen.engine import decode
from divgen.engine.model import load_model
from divgen.engine.models import cpu_attention

SHAPES = ((32, 400, 32), (64, 64, 32), (16, 64, 32))      # rows, prompt tokens, timed new tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_attention.native_op() is None:
        raise SystemExit(f"cpu_attention_ab: the native kernel is not available ({cpu_attention.LIBRARY.state.get('error')})")
    native = cpu_attention.usable
    paths = (("torch", lambda q: False), ("native", native))
    lm = load_model(None, device="cpu", dtype=args.dtype)
    for rows, prompt_len, n in SHAPES:
        prompts = random_prompts(lm, rows, prompt_len, 0)

        def run(tokens: int) -> float:
            start = time.perf_counter()
            decode.generate(lm, prompts, max_new_tokens=tokens, temperature=1.0, min_p=0.05, seeds=0, ignore_eos=True)
            return time.perf_counter() - start

        got = {name: [] for name, _ in paths}
        for name, use in paths:                    # warm both paths
            cpu_attention.usable = use
            run(2)
        for _ in range(args.repeats):
            for name, use in paths:
                cpu_attention.usable = use
                got[name].append(rows * n / (run(n + 4) - run(4)))
        cpu_attention.usable = native
        med = {name: statistics.median(v) for name, v in got.items()}
        print(f"{args.dtype} {rows} rows x {prompt_len}-token prompts: torch {med['torch']:.1f} tok/s, native "
              f"{med['native']:.1f} tok/s, native / torch {med['native'] / med['torch']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
