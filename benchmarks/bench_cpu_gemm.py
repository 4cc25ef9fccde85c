"""The decode step's weight products on the CPU's GEMM paths, side by side in one process: divgen's
kernel (``models/cpu_gemm.cpp``), oneDNN on a prepacked weight (``mkldnn._linear_pointwise``, what
vLLM's CPU backend calls) and dense ``F.linear`` (MKL), interleaved, best of ``--repeats``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cpu_gemm.py [--rows 1 16 64 512] [--dtype float32 bfloat16]

The shapes are a real model's (default: the embedded SmolLM2-135M's q|k|v, o, gate|up, down and
LM head, from the loaded model's arguments): every layer's projections get their own random
weight, so each product streams its weight from memory as in a step. Prints GF/s per shape and
the step's total; writes ``benchmarks/results/cpu_gemm-<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from divgen.engine.models import cpu_gemm


def shapes(model: str | None) -> list[tuple[str, int, int, int]]:
    """(name, in, out, copies) of one decode step's products."""
    from divgen.engine.model import load_model

    lm = load_model(model, device="cpu", dtype="float32")
    if lm.fast is None:
        raise SystemExit(f"bench_cpu_gemm: {model} does not run on divgen's own forward")
    a = lm.fast.args
    qkv = (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
    return [("q|k|v", a.dim, qkv, a.n_layers), ("o", a.n_heads * a.head_dim, a.dim, a.n_layers),
            ("gate|up", a.dim, 2 * a.intermediate_size, a.n_layers),
            ("down", a.intermediate_size, a.dim, a.n_layers), ("lm_head", a.dim, a.vocab_size, 1)]


def best(fn, repeats: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--model", default=None, help="model whose shapes to use (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if cpu_gemm.ops() is None:
        raise SystemExit(f"bench_cpu_gemm: the native kernel is not available ({cpu_gemm.LIBRARY.state.get('error')})")
    table = shapes(args.model)
    results = []
    print(f"# torch threads {torch.get_num_threads()}; GF/s (2 flops a multiply-add), best of {args.repeats}")
    for dt_name in args.dtype:
        dt = getattr(torch, dt_name)
        paths = ["dense"]
        if torch.backends.mkldnn.is_available() and (dt == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            paths.insert(0, "onednn")
        if cpu_gemm.supports(dt):
            paths.insert(0, "divgen")
        for rows in args.rows:
            totals = dict.fromkeys(paths, 0.0)
            flops_total = 0
            for name, k, n, copies in table:
                copies = copies if rows <= 64 else min(copies, 4)       # prefill sizes: compute-bound anyway
                gen = torch.Generator().manual_seed(0)
                ws = [(torch.randn(n, k, generator=gen) * k ** -0.5).to(dt) for _ in range(copies)]
                x = torch.randn(rows, k, generator=gen).to(dt)
                fns = {}
                if "divgen" in paths:
                    packed = [cpu_gemm.pack(w) for w in ws]
                    fns["divgen"] = lambda packed=packed, n=n, x=x: [cpu_gemm.linear(x, p, n, None) for p in packed]
                if "onednn" in paths:
                    blocked = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in ws]
                    fns["onednn"] = lambda blocked=blocked, x=x: [
                        torch.ops.mkldnn._linear_pointwise(x, b, None, "none", [], "") for b in blocked]
                fns["dense"] = lambda ws=ws, x=x: [F.linear(x, w) for w in ws]
                times = dict.fromkeys(paths, float("inf"))
                for _ in range(args.repeats):                      # interleaved rounds
                    for p in paths:
                        times[p] = min(times[p], best(fns[p], 1))
                flops = 2 * rows * k * n * copies
                scale = table_copies(table, name) / copies
                flops_total += flops * scale
                for p in paths:
                    totals[p] += times[p] * scale
                row = {"dtype": dt_name, "rows": rows, "shape": name, "in": k, "out": n, "copies": copies,
                       **{f"{p}_gflops": flops / times[p] / 1e9 for p in paths}}
                results.append(row)
                print(f"{dt_name:8s} rows {rows:4d} {name:8s} {k:5d}->{n:6d}: "
                      + "  ".join(f"{p} {row[f'{p}_gflops']:6.1f}" for p in paths)
                      + (f"  divgen/oneDNN {times['onednn'] / times['divgen']:.2f}x" if {"divgen", "onednn"} <= set(paths) else ""),
                      flush=True)
            step = {"dtype": dt_name, "rows": rows, "shape": "step", **{f"{p}_ms": 1e3 * t for p, t in totals.items()},
                    **{f"{p}_gflops": flops_total / t / 1e9 for p, t in totals.items()}}
            results.append(step)
            print(f"{dt_name:8s} rows {rows:4d} step    : " + "  ".join(f"{p} {1e3 * t:7.1f} ms" for p, t in totals.items())
                  + (f"  divgen/oneDNN {totals['onednn'] / totals['divgen']:.2f}x" if {"divgen", "onednn"} <= set(paths) else ""),
                  flush=True)
    path = Path(args.output_json) if args.output_json else (
        Path(__file__).resolve().parent / "results" / f"cpu_gemm-cpu-{platform.machine()}-{os.cpu_count()}cores.json")
    from divgen.bench.common import git_sha

    record = {"benchmark": "cpu_gemm", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "git": git_sha(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_flags_avx512_bf16": _has_bf16(),
              "loadavg": os.getloadavg(), "results": results,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"# wrote {path}")


def table_copies(table, name) -> int:
    return next(c for n, _, _, c in table if n == name)


def _has_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


if __name__ == "__main__":
    main()
