"""bf16 against fp32 decoding on CPU, both models loaded in one process, interleaved rounds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bf16_vs_fp32.py [--repeats 3]

For each shape (rows x prompt tokens) it times ``generate`` for n + 4 and for 4 new tokens and
reports decode-only tok/s (the difference), medians over the rounds, and bf16 / fp32. Sampled at
temperature 1, min-p 0.05, EOS ignored; the embedded SmolLM2-135M-Instruct. bf16 pays off on CPUs
with AVX-512 BF16 (or AMX); elsewhere oneDNN emulates it.
"""
import argparse
import statistics
import time

import torch

from divgen.bench.suite import random_prompts
from divgen.engine import decode
from divgen.engine.model import load_model

SHAPES = ((64, 64, 32), (32, 400, 24))      # rows, prompt tokens, timed new tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lms = {d: load_model(None, device="cpu", dtype=d) for d in ("float32", "bfloat16")}
    for rows, prompt_len, n in SHAPES:
        prompts = random_prompts(lms["float32"], rows, prompt_len, 0)

        def run(lm, k):
            t = time.perf_counter()
            decode.generate(lm, prompts, max_new_tokens=k, temperature=1.0, min_p=0.05, seeds=0, ignore_eos=True)
            return time.perf_counter() - t

        for lm in lms.values():
            run(lm, 2)                                  # warm-up
        rates = {d: [] for d in lms}
        for _ in range(args.repeats):
            for d, lm in lms.items():
                rates[d].append(rows * n / (run(lm, n + 4) - run(lm, 4)))
        med = {d: statistics.median(v) for d, v in rates.items()}
        print(f"{rows} rows x {prompt_len}-token prompts: fp32 {med['float32']:.1f} tok/s, "
              f"bf16 {med['bfloat16']:.1f} tok/s, bf16/fp32 {med['bfloat16'] / med['float32']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
