"""Guided sampling benchmark: one decode step's sampler for CorrSynth groups, measured side by side:

* ``kernel``    — the capturable step ``divgen.kernels.guided_sample_step`` on a plan built once
                  (``build_sample_plan``; Triton, CUDA only), launched eagerly from Python, and
                  ``graph``: the same step replayed as a CUDA graph (what a captured decode step
                  pays; no Python launch overhead; the step counter advances on the device)
* ``wrapper``   — ``divgen.kernels.guided_sample_triton.guided_sample``: argument checks (NaN
                  scan, host syncs) + the group plan + the step, what a direct caller pays
* ``reference`` — torch ``divgen.kernels.reference.guided_sample`` (dense ``mix @ logp``, sorts
                  for top-k/top-p, counter noise)
* ``hf``        — what a transformers user writes: the guidance mix in torch (log_softmax, clamp,
                  dense ``mix @``), then TemperatureLogitsWarper, [TopKLogitsWarper, TopPLogitsWarper,]
                  MinPLogitsWarper (min_p = α, the nearest HF cut to the α rule; it tests the guided
                  distribution, not the row's own) and ``torch.multinomial``

    python benchmarks/bench_guided_sample.py                  # GPU: R × V × group grid below
    python benchmarks/bench_guided_sample.py --quick          # CPU smoke run (reference vs hf)
    python benchmarks/bench_guided_sample.py --output-json    # -> benchmarks/results/<device>.json

Grid: R ∈ {4, 16, 64, 256} rows, V ∈ {32000, 128256, 151936}, bf16 logits, K-CorrSynth groups of
4 and 16 rows (block-diagonal ``mix``, γ = (g − 1)/(K − 1), g = 2), T = 0.8; modes ``basic``
(α = 0.05), ``top`` (α = 0.05, top_k = 50, top_p = 0.9) and ``alpha0`` (α = 0: every token is
sampled, the kernel's compute-bound worst case).

Bytes and floor. Each pass of the kernel reads every logit of the rows it works on once: V·2
bytes a row (bf16). The basic path makes 2 passes over every row. With top-k/top-p a row makes
the stats pass, then a sample and a verify pass each round it is open or refining in, and only
rows left unsettled after the rounds add the bisection's counting passes and the final sample
(``kernels/guided_sample_triton/``, the module docstrings); a tile (here: a group) reads all of
its rows while any of them works. ``passes`` is that count, averaged over the rows, from one
traced step on the benchmark's logits (the step's ``trace=``: rounds and final state per row; a
refining row's skipped sample is counted as read, so it is a slight upper bound). ``GB/s`` is
passes · R·V·2 / graph time, next to a measured device-to-device copy (read + write bytes / s);
the second pass may partly hit L2 on small problems. ``launches`` is the step's fixed Triton
launch count (``guided_sample_triton.launch_count``: 3 basic, 27 with top-k/top-p; 4 and 28 with
groups over 16 rows), paid in every step whatever the rows need.

Targets on H100/H200 (basic mode): ≥ 10× the torch reference at R = 64, V = 128256 (eager kernel
vs eager reference); ≥ 50% of copy bandwidth where R·V·2 ≥ 16 MB and ≤ 20 µs for R ≤ 64 at
V = 128256 (graph time: the device work, as in a captured decode step). The ``wrapper`` column
additionally pays the argument checks (a NaN scan) and host syncs, which no target covers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from divgen.bench.common import (
    add_common_args, apply_common_args, bench, copy_bandwidth_gbs, default_results_path, profile_or_error, result_record,
    sync, write_json,
)
from divgen.kernels import reference

ROWS = (4, 16, 64, 256)
VOCABS = (32000, 128256, 151936)
GROUPS = (4, 16)
QUICK_ROWS, QUICK_VOCABS, QUICK_GROUPS = (4, 16), (32000,), (4,)
GUIDANCE_SCALE = 2.0
TEMPERATURE = 0.8
# α = 0.05 leaves a few dozen tokens a row in the α set (logits ~ N(0, 3²)): most tiles are skipped
# after their load. α = 0 samples every token: the sample pass is then compute-bound (hash, logs).
MODES = {"basic": dict(alpha=0.05), "top": dict(alpha=0.05, top_k=50, top_p=0.9), "alpha0": dict(alpha=0.0)}
BASIC_PASSES = 2


def traced_passes(gs, logits, plan, seeds, per_row, group: int) -> float:
    """Passes over the logits a row of one top-k/top-p step makes, on average: stats, then per
    tile (= group here) 2 a round while a row of it is live, and the bisection's counting passes
    + the final sample when a row of it is bisected (from the step's trace)."""
    trace = {}
    step = torch.zeros_like(seeds)
    gs.guided_sample_step(logits, plan, seeds, step, **per_row, any_top_k_top_p=True, trace=trace)
    rounds = trace["rounds"].view(-1, group).amax(dim=1).float()                    # [groups]
    bisect = (trace["state"] == gs.STATE_BISECT).view(-1, group).any(dim=1).float()
    per_group = 2 * rounds + bisect * (2 * gs.THRESHOLD_PASSES + 1)
    return 1 + per_group.mean().item()


def corrsynth_mix(rows: int, group: int, device) -> torch.Tensor:
    """Block-diagonal K-CorrSynth mix: diagonal 1 + Σγ, off-diagonal −γ, γ = (g − 1)/(K − 1).
    Groups of 1 are FewGen rows: the identity (plain sampling)."""
    if group == 1:
        return torch.eye(rows, device=device)
    gamma = (GUIDANCE_SCALE - 1) / (group - 1)
    block = torch.full((group, group), -gamma) + torch.eye(group) * (1 + gamma * group)
    return torch.block_diag(*[block] * (rows // group)).to(device)


def hf_chain(logits, mix, mode: dict, input_ids):
    """The transformers way: mix in torch, the logits-processor chain, then multinomial."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = [TemperatureLogitsWarper(TEMPERATURE)]
    if "top_k" in mode:
        processors += [TopKLogitsWarper(mode["top_k"]), TopPLogitsWarper(mode["top_p"])]
    if mode["alpha"] > 0:
        processors.append(MinPLogitsWarper(mode["alpha"]))

    def run():
        logp = torch.log_softmax(logits.float(), dim=-1)                 # [R, V]
        scores = mix @ logp                                              # [R, V] (finite logits)
        for proc in processors:
            scores = proc(input_ids, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0]

    return run


def graphed(fn):
    """Capture fn (kernel launches only, no host syncs) in a CUDA graph; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):                      # compile and warm the allocator outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def back_to_back_us(fn, repeats: int, device) -> float:
    """µs a call of ``repeats`` calls launched back to back with one sync at the end: the device
    time a step adds to a captured decode step, without ``bench``'s host round trip per call."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats * 1e6


def where_the_time_goes(step_once, replay, device) -> dict:
    """The step's kernels (µs a call, eager launches) and the device's busy time in a graph replay
    (``common.device_profile``); a profiler failure is recorded, never raised."""
    eager = profile_or_error(step_once, repeats=5, device=device, top=8)
    graph = profile_or_error(replay, repeats=5, device=device, top=8)
    if "error" in eager or "error" in graph:
        return {"profile_error": eager.get("error") or graph["error"]}
    return {"kernels_us": [[t["name"][:80], round(t["us"], 2), t["calls"]] for t in eager["top"]],
            "eager_busy_us": eager["busy_us"], "graph_busy_us": graph["busy_us"]}


def run_case(rows, vocab, group, mode_name, args, device, use_kernel, copy_gbs) -> dict:
    mode = MODES[mode_name]
    gen = torch.Generator().manual_seed(rows * 7 + vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(device=device, dtype=torch.bfloat16)
    mix = corrsynth_mix(rows, group, device)
    seeds = torch.arange(rows, dtype=torch.int64, device=device)
    kwargs = dict(seeds=seeds, step=0, temperature=TEMPERATURE, **mode)
    timing = dict(warmup=args.warmup, repeats=args.repeats, device=device)

    result = dict(rows=rows, vocab=vocab, group=group, mode=mode_name, dtype="bfloat16",
                  logits_mb=rows * vocab * 2 / 2**20)
    result["reference_us"] = bench(lambda: reference.guided_sample(logits, mix, **kwargs), **timing)["median_s"] * 1e6
    input_ids = torch.zeros(rows, 1, dtype=torch.int64, device=device)
    result["hf_us"] = bench(hf_chain(logits, mix, mode, input_ids), **timing)["median_s"] * 1e6
    if use_kernel:
        from divgen import kernels
        from divgen.kernels import guided_sample_triton as gs

        plan = kernels.build_sample_plan(mix, device, ops=kernels.ops_for(device, "triton"))
        step = torch.zeros(rows, dtype=torch.int64, device=device)
        per_row = dict(temperature=torch.full((rows,), TEMPERATURE, device=device),
                       alpha=torch.full((rows,), mode["alpha"], device=device),
                       top_k=torch.full((rows,), mode.get("top_k", 0), dtype=torch.int64, device=device),
                       top_p=torch.full((rows,), mode.get("top_p", 1.0), device=device))
        cut = "top_k" in mode

        def step_once():
            tokens = kernels.guided_sample_step(logits, plan, seeds, step, **per_row, any_top_k_top_p=cut)
            step.add_(1)                                   # the engine's device-side counter
            return tokens

        result["kernel_us"] = bench(step_once, **timing)["median_s"] * 1e6
        replay = graphed(step_once)
        result["graph_us"] = bench(replay, **timing)["median_s"] * 1e6
        result["graph_loop_us"] = back_to_back_us(replay, args.repeats, device)
        result.update(where_the_time_goes(step_once, replay, device))
        result["wrapper_us"] = bench(lambda: gs.guided_sample(logits, mix, **kwargs), **timing)["median_s"] * 1e6
        passes = traced_passes(gs, logits, plan, seeds, per_row, group) if cut else BASIC_PASSES
        result["passes"] = passes
        result["launches"] = gs.launch_count(cut, fused_stats=gs.fuses_stats(plan.prepared, cut, False))
        result["kernel_gbs"] = passes * rows * vocab * 2 / (result["graph_us"] * 1e-6) / 1e9
        result["copy_fraction"] = result["kernel_gbs"] / copy_gbs
        result["reference_over_kernel"] = result["reference_us"] / result["kernel_us"]
        result["hf_over_kernel"] = result["hf_us"] / result["kernel_us"]
        result["reference_over_wrapper"] = result["reference_us"] / result["wrapper_us"]
    result["hf_over_reference"] = result["hf_us"] / result["reference_us"]
    return result


def print_table(results, use_kernel: bool) -> None:
    head = f"{'mode':>6} {'R':>4} {'V':>7} {'K':>3} {'MB':>6} {'ref µs':>9} {'hf µs':>9}"
    if use_kernel:
        head += (f" {'kern µs':>8} {'graph µs':>8} {'wrap µs':>8} {'ref/kern':>8} {'hf/kern':>8}"
                 f" {'ref/wrap':>8} {'passes':>6} {'launch':>6} {'GB/s':>7} {'%copy':>6}")
    else:
        head += f" {'hf/ref':>7}"
    print(head)
    for r in results:
        line = (f"{r['mode']:>6} {r['rows']:>4} {r['vocab']:>7} {r['group']:>3} {r['logits_mb']:>6.1f}"
                f" {r['reference_us']:>9.1f} {r['hf_us']:>9.1f}")
        if use_kernel:
            line += (f" {r['kernel_us']:>8.1f} {r['graph_us']:>8.1f} {r['wrapper_us']:>8.1f}"
                     f" {r['reference_over_kernel']:>8.1f}"
                     f" {r['hf_over_kernel']:>8.1f} {r['reference_over_wrapper']:>8.1f}"
                     f" {r['passes']:>6.2f} {r['launches']:>6d}"
                     f" {r['kernel_gbs']:>7.0f} {100 * r['copy_fraction']:>5.0f}%")
        else:
            line += f" {r['hf_over_reference']:>7.2f}"
        print(line)


def profile_lines(results) -> list[str]:
    """Per case: graph replays back to back, the device's busy time in a replay, and the largest
    kernels of an eager step (µs a call)."""
    lines = []
    for r in results:
        if "graph_loop_us" not in r:
            continue
        tag = f"{r['mode']:>6} R={r['rows']} V={r['vocab']} K={r['group']}"
        busy = r.get("graph_busy_us")
        kernels = ", ".join(f"{name.split('(')[0][-28:]} {us:.1f}" for name, us, _ in r.get("kernels_us", [])[:4])
        lines.append(f"{tag}: back-to-back {r['graph_loop_us']:.1f} µs, device busy "
                     f"{'-' if busy is None else f'{busy:.1f}'} µs a replay; {kernels or r.get('profile_error', '')}")
    return lines


def check_targets(results) -> list[str]:
    """The docstring's targets, as lines saying met / missed (basic mode)."""
    lines = []
    for r in results:
        if r["mode"] != "basic" or "kernel_us" not in r:
            continue
        tag = f"R={r['rows']} V={r['vocab']} K={r['group']}"
        if r["rows"] == 64 and r["vocab"] == 128256:
            ok = r["reference_over_kernel"] >= 10
            lines.append(f"{'met   ' if ok else 'MISSED'} ≥10× reference   {tag}: {r['reference_over_kernel']:.1f}×")
        if r["rows"] * r["vocab"] * 2 >= 16 * 2**20:
            ok = r["copy_fraction"] >= 0.5
            lines.append(f"{'met   ' if ok else 'MISSED'} ≥50% copy GB/s   {tag}: {100 * r['copy_fraction']:.0f}%")
        if r["rows"] <= 64 and r["vocab"] == 128256:
            ok = r["graph_us"] <= 20
            lines.append(f"{'met   ' if ok else 'MISSED'} ≤20 µs (graph)   {tag}: {r['graph_us']:.1f} µs"
                         f" (eager {r['kernel_us']:.1f} µs)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (CPU: reference and hf only)")
    ap.add_argument("--rows", type=int, nargs="+", default=None)
    ap.add_argument("--vocabs", type=int, nargs="+", default=None)
    ap.add_argument("--groups", type=int, nargs="+", default=None)
    ap.add_argument("--modes", nargs="+", default=sorted(MODES), choices=sorted(MODES))
    add_common_args(ap)
    args = ap.parse_args()
    device = apply_common_args(args)
    use_kernel = device.type == "cuda"
    rows_list = args.rows or (QUICK_ROWS if args.quick else ROWS)
    vocabs = args.vocabs or (QUICK_VOCABS if args.quick else VOCABS)
    groups = args.groups or (QUICK_GROUPS if args.quick else GROUPS)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 10)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 100)
    if not use_kernel:
        print("note: the Triton kernel needs CUDA; on CPU only the torch reference and the HF "
              "logits-processor chain are timed", file=sys.stderr)
    copy_gbs = copy_bandwidth_gbs() if use_kernel else None

    results = [run_case(rows, vocab, group, mode, args, device, use_kernel, copy_gbs)
               for mode in args.modes for vocab in vocabs for rows in rows_list for group in groups
               if rows % group == 0]
    print(f"device {device}, bf16 logits, K-CorrSynth g={GUIDANCE_SCALE}, T={TEMPERATURE}, modes {MODES}"
          + (f", device copy {copy_gbs:.0f} GB/s" if copy_gbs else ""))
    print_table(results, use_kernel)
    for line in profile_lines(results):
        print(line)
    for line in check_targets(results):
        print(line)

    if args.output_json:
        path = default_results_path() if args.output_json == "auto" else Path(args.output_json)
        write_json(path, result_record("bench_guided_sample", results, copy_gbs=copy_gbs, quick=args.quick))


if __name__ == "__main__":
    main()
