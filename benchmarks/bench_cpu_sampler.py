"""The CPU sampling step against what the peers do, on a real model's logits, side by side.

    python benchmarks/bench_cpu_sampler.py --threads 1                 # SmolLM2-135M logits
    python benchmarks/bench_cpu_sampler.py --threads 1 --output-json   # -> results/<device>.json

The logits are the embedded model's next-token logits after 24 random tokens (a real model's
spread: at T = 1 about 95 % of its 49,152 tokens lie within the Gumbel noise's reach of the top
one, the case that decides a sampler's cost), fp32, at 16 and 64 rows. Variants, timed in
interleaved rounds (medians):

* ``divgen``    — ``divgen.kernels.cpu_sample.guided_sample_step``, the engine's CPU sampler
                  (counter-based noise: the same tokens as the reference, on any device);
* ``reference`` — ``divgen.kernels.reference.guided_sample_step``, the torch spec it equals;
* ``hf``        — what ``transformers.generate`` does for a sampled row: softmax (after the
                  temperature and min-p warpers when set) and ``torch.multinomial``;
* ``exp-race``  — the exponential-race draw vLLM's sampler uses: softmax, divide by
                  ``Exponential(1)`` noise, argmax (written here in torch; no vLLM import).

Modes: ``plain`` (T = 1, nothing cut: every token can win), ``min-p`` (T = 1, min-p 0.05),
``corrsynth`` (CorrSynth groups of 4, g = 2, no α cut: the vLLM logits processor's usual step;
peers: the HF user's recipe — log-softmax, the dense guidance mix, softmax, multinomial) and
``corrsynth-alpha`` (α = 0.05, the engine's default). Prints ms per step, ns per logit, and
divgen's ratio to the fastest peer of the mode (a ratio < 1 means divgen is faster).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The steady state: the native candidate pass (or, where it did not build, the compiled one from the
# first step: cpu_sample.prefer_steady_state); DIVGEN_CPU_SAMPLER=unfused times the torch passes.
import torch

from divgen.bench.common import default_results_path, result_record, write_json
from divgen.kernels import cpu_sample, reference

MODES = ("plain", "min-p", "corrsynth", "corrsynth-alpha")


def model_logits(rows: int, seed: int = 0) -> torch.Tensor:
    from divgen.engine.model import load_model

    lm = load_model(None)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, min(40000, lm.vocab_size), (rows, 24), generator=gen)
    with torch.no_grad():
        return lm.model(ids).logits[:, -1].float().contiguous()


def group_mix(rows: int, size: int = 4, g: float = 2.0) -> torch.Tensor:
    """CorrSynth's block-diagonal mix: (1 + γ(K−1)) on the diagonal, −γ off it, γ = (g − 1)/(K − 1)."""
    gamma = (g - 1) / (size - 1)
    block = torch.full((size, size), -gamma)
    block.fill_diagonal_(1 + gamma * (size - 1))
    return torch.block_diag(*[block] * (rows // size))


def variants(mode: str, logits: torch.Tensor) -> dict:
    r = logits.shape[0]
    mix = group_mix(r) if mode.startswith("corrsynth") else None
    alpha = torch.full((r,), 0.05 if mode == "corrsynth-alpha" else 0.0)
    min_p = torch.full((r,), 0.05) if mode == "min-p" else None
    args = (logits, mix, torch.arange(r, dtype=torch.int64) * 7919, torch.full((r,), 3, dtype=torch.int64),
            torch.ones(r), alpha, torch.zeros(r, dtype=torch.int64), torch.ones(r))
    kw = dict(any_top_k_top_p=False, min_p=min_p)

    def probs():
        if mix is None:
            p = torch.softmax(logits, dim=-1)
            if min_p is not None:                       # transformers' MinPLogitsWarper, then renormalise
                p = torch.where(p >= min_p[:, None] * p.amax(dim=-1, keepdim=True), p, 0.0)
            return p
        s = mix @ torch.log_softmax(logits, dim=-1)     # the HF user's CorrSynth recipe
        if mode == "corrsynth-alpha":                    # α on the row's own distribution
            s = torch.where(logits >= logits.amax(-1, keepdim=True) + torch.log(alpha[:, None]), s, float("-inf"))
        return torch.softmax(s, dim=-1)

    def exp_race():
        p = probs()
        return p.div_(torch.empty_like(p).exponential_()).argmax(dim=-1)

    return {
        "divgen": lambda: cpu_sample.guided_sample_step(*args, **kw),
        "reference": lambda: reference.guided_sample_step(*args, **kw),
        "hf": lambda: torch.multinomial(probs(), 1)[:, 0],
        "exp-race": exp_race,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (medians)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output-json", nargs="?", const="", default=None,
                    help="write the rows into a results JSON (default: results/<device>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logits_all = model_logits(max(args.rows))
    out = []
    cpu_sample.prefer_steady_state()
    mode_name = cpu_sample.active_path()
    print(f"bench_cpu_sampler: SmolLM2-135M logits, V = {logits_all.shape[1]}, torch threads {args.threads}, "
          f"{args.repeats} interleaved rounds (medians), CPU sampler {mode_name}")
    print(f"{'mode':16s} {'rows':>4s} " + " ".join(f"{v:>12s}" for v in ("divgen", "reference", "hf", "exp-race"))
          + "   divgen/best peer   divgen ns/logit")
    for mode in args.modes:
        for rows in args.rows:
            logits = logits_all[:rows].contiguous()
            fns = variants(mode, logits)
            want = fns["reference"]()
            if not torch.equal(fns["divgen"](), want):
                raise SystemExit(f"bench_cpu_sampler: divgen's tokens differ from the reference ({mode}, {rows} rows)")
            for fn in fns.values():
                fn()                                                    # warm-up
            times = {name: [] for name in fns}
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            peer = min(("hf", "exp-race"), key=ms.get)
            ratio = ms["divgen"] / ms[peer]
            ns = 1e6 * ms["divgen"] / logits.numel()
            print(f"{mode:16s} {rows:4d} " + " ".join(f"{ms[v]:9.2f} ms" for v in fns)
                  + f"   {ratio:5.2f}x ({peer})   {ns:6.2f}")
            out.append({"mode": mode, "rows": rows, "vocab": logits.shape[1], "ms": ms, "best_peer": peer,
                        "divgen_over_best_peer": ratio, "divgen_ns_per_logit": ns})
    if args.output_json is not None:
        path = args.output_json or default_results_path()
        write_json(path, result_record("cpu_sampler", out, threads=args.threads, repeats=args.repeats,
                                       cpu_sampler=mode_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
