"""Multi-LoRA kernel benchmark: one linear layer's LoRA delta for a batch whose rows use
different adapters (SPA decodes one prompt under many adapters), measured side by side:

* ``kernel``    — Triton ``divgen.kernels.lora_triton.add_lora`` (one sort + shrink + expand launch; CUDA only)
* ``reference`` — torch ``divgen.kernels.reference.add_lora`` (a dense matmul pair per adapter,
                  row groups found on the host each call)
* ``loop``      — one adapter at a time with the row groups precomputed: for each adapter,
                  ``y[rows] += s · (x[rows] @ Aᵀ) @ Bᵀ`` (what serving without multi-LoRA kernels does)
* ``base``      — the layer's own matmul ``x @ Wᵀ``, the cost the LoRA delta adds to

    python benchmarks/bench_lora.py                         # GPU: SmolLM2-135M and Llama-3-8B layers
    python benchmarks/bench_lora.py --quick                 # CPU smoke run (reference vs loop)
    python benchmarks/bench_lora.py --output-json           # -> benchmarks/results/<device>.json

Rows use adapters round-robin (row i -> adapter i mod L, as in SPA decode). Bytes floor of the
delta: x read once, each used adapter's A and B read once, y read and written once; on CUDA the
kernel's achieved GB/s is reported against a measured device copy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from divgen.bench.common import (
    add_common_args, apply_common_args, bench, copy_bandwidth_gbs, default_results_path, result_record, write_json,
)
from divgen.kernels import reference

# (model, layer) -> (H_in, H_out), from the public configs.
LAYERS = {
    ("smollm2-135m", "q_proj"): (576, 576),
    ("smollm2-135m", "gate_proj"): (576, 1536),
    ("smollm2-135m", "down_proj"): (1536, 576),
    ("llama-3-8b", "q_proj"): (4096, 4096),
    ("llama-3-8b", "gate_proj"): (4096, 14336),
    ("llama-3-8b", "down_proj"): (14336, 4096),
}
QUICK_LAYERS = [("smollm2-135m", "q_proj"), ("smollm2-135m", "gate_proj")]


def make_layer(h_in, h_out, rows, num_adapters, rank, dtype, device, seed=0):
    """Base weight, stacked adapters and a batch; small weights so repeated in-place adds stay finite."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape, std: (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        weight=randn(h_out, h_in, std=h_in ** -0.5),
        x=randn(rows, h_in, std=1.0),
        y=torch.zeros(rows, h_out, device=device, dtype=dtype),
        lora_a=randn(num_adapters, rank, h_in, std=h_in ** -0.5),
        lora_b=randn(num_adapters, h_out, rank, std=1e-3),
        indices=(torch.arange(rows) % num_adapters).to(device),
        scales=torch.full((num_adapters,), 2.0, device=device),
    )


def one_adapter_at_a_time(p):
    """The loop baseline's call, with the row groups found once outside the timed region."""
    groups = [(j, (p["indices"] == j).nonzero(as_tuple=True)[0]) for j in p["indices"].unique().tolist()]
    y, x, a, b, s = p["y"], p["x"], p["lora_a"], p["lora_b"], p["scales"]

    def run():
        for j, rows in groups:
            y.index_add_(0, rows, ((x[rows] @ a[j].T) * s[j].to(x.dtype)) @ b[j].T)
    return run


def lora_bytes(p) -> int:
    """Bytes a multi-LoRA delta must move at least (see the module docstring)."""
    e = p["x"].element_size()
    rows, h_in = p["x"].shape
    h_out, rank = p["lora_b"].shape[1:]
    used = min(rows, p["lora_a"].shape[0])
    return e * (rows * h_in + used * rank * (h_in + h_out) + 2 * rows * h_out)


def run_case(model, layer, rows, args, device, dtype, use_kernel, copy_gbs) -> dict:
    h_in, h_out = LAYERS[(model, layer)]
    p = make_layer(h_in, h_out, rows, args.adapters, args.rank, dtype, device)
    timing = dict(warmup=args.warmup, repeats=args.repeats, device=device)
    lora_args = (p["y"], p["x"], p["lora_a"], p["lora_b"], p["indices"], p["scales"])

    row = dict(model=model, layer=layer, h_in=h_in, h_out=h_out, rows=rows, adapters=args.adapters,
               rank=args.rank, dtype=str(dtype).removeprefix("torch."))
    row["base_s"] = bench(lambda: torch.nn.functional.linear(p["x"], p["weight"]), **timing)["median_s"]
    ref_plan = reference.build_lora_plan(p["indices"], p["lora_a"].shape[0])      # once per batch, as the engine
    row["reference_s"] = bench(lambda: reference.add_lora(*lora_args, plan=ref_plan), **timing)["median_s"]
    row["loop_s"] = bench(one_adapter_at_a_time(p), **timing)["median_s"]
    row["lora_bytes"] = lora_bytes(p)
    if use_kernel:
        from divgen.kernels import lora_triton as lora

        plan = lora.build_lora_plan(p["indices"], p["lora_a"].shape[0])
        row["kernel_s"] = bench(lambda: lora.add_lora(*lora_args, plan=plan), **timing)["median_s"]
        row["kernel_gbs"] = row["lora_bytes"] / row["kernel_s"] / 1e9
        if copy_gbs:
            row["floor_s"] = row["lora_bytes"] / (copy_gbs * 1e9)
            row["kernel_of_copy_bw"] = row["kernel_gbs"] / copy_gbs
        row["reference_over_kernel"] = row["reference_s"] / row["kernel_s"]
        row["loop_over_kernel"] = row["loop_s"] / row["kernel_s"]
        row["kernel_over_base"] = row["kernel_s"] / row["base_s"]
    row["loop_over_reference"] = row["loop_s"] / row["reference_s"]
    row["reference_over_base"] = row["reference_s"] / row["base_s"]
    return row


def print_table(rows: list[dict], use_kernel: bool) -> None:
    us = lambda s: f"{s * 1e6:10.1f}"  # noqa: E731
    head = f"{'model':13} {'layer':9} {'N':>4} {'base us':>10} {'ref us':>10} {'loop us':>10}"
    if use_kernel:
        head += f" {'kernel us':>10} {'floor us':>9} {'GB/s':>7} {'ref/ker':>8} {'loop/ker':>8} {'ker/base':>8}"
    else:
        head += f" {'loop/ref':>8} {'ref/base':>8}"
    print(head)
    for r in rows:
        line = f"{r['model']:13} {r['layer']:9} {r['rows']:>4} {us(r['base_s'])} {us(r['reference_s'])} {us(r['loop_s'])}"
        if use_kernel:
            floor = f"{r['floor_s'] * 1e6:9.1f}" if "floor_s" in r else f"{'-':>9}"
            line += (f" {us(r['kernel_s'])} {floor} {r['kernel_gbs']:7.0f} {r['reference_over_kernel']:8.2f}"
                     f" {r['loop_over_kernel']:8.2f} {r['kernel_over_base']:8.2f}")
        else:
            line += f" {r['loop_over_reference']:8.2f} {r['reference_over_base']:8.2f}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CPU-sized smoke run")
    ap.add_argument("--models", nargs="+", default=None, choices=sorted({m for m, _ in LAYERS}))
    ap.add_argument("--rows", type=int, nargs="+", default=None, help="N, tokens in the batch (default 1 8 64 256)")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    add_common_args(ap)
    args = ap.parse_args()
    device = apply_common_args(args)
    use_kernel = device.type == "cuda"
    dtype = torch.bfloat16 if use_kernel else torch.float32
    layers = QUICK_LAYERS if args.quick else [k for k in LAYERS if args.models is None or k[0] in args.models]
    rows_list = args.rows or ([1, 8] if args.quick else [1, 8, 64, 256])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 50)
    if not use_kernel:
        print("note: the Triton kernel needs CUDA; on CPU only the torch reference and the "
              "one-adapter-at-a-time loop are timed", file=sys.stderr)
    copy_gbs = copy_bandwidth_gbs() if use_kernel else None

    results = [run_case(model, layer, n, args, device, dtype, use_kernel, copy_gbs)
               for model, layer in layers for n in rows_list]
    print(f"device {device} ({dtype}), {args.adapters} adapters of rank {args.rank}, rows round-robin"
          + (f", device copy {copy_gbs:.0f} GB/s" if copy_gbs else ""))
    print_table(results, use_kernel)

    if args.output_json:
        path = default_results_path() if args.output_json == "auto" else Path(args.output_json)
        write_json(path, result_record("bench_lora", results, copy_gbs=copy_gbs, quick=args.quick))


if __name__ == "__main__":
    main()
