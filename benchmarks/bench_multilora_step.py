"""Decode-step time of a batch whose rows use 8 different LoRA adapters, in one run:

    base      the batch (B rows) on the base model                       1 forward
    multi     the same batch, row i through adapter i (MultiLora)        1 forward
    serial    the adapters one after another, each on its own rows       L forwards of B/L rows

Targets (issue 5): multi <= 1.5 x base, serial >= 3 x multi.

Every variant times one decode step (one new token per row on top of a prefilled KV cache of
``--context`` tokens); the cache is cut back after each step so every repeat sees the same length.
Floor: a decode step must read every weight once (plus the KV cache); the adapters add
L · Σ_layers (r·H_in + H_out·r) parameters. The achieved GB/s is reported against a measured
copy bandwidth of the device.

    python benchmarks/bench_multilora_step.py                     # embedded SmolLM2-135M, CPU or GPU
    python benchmarks/bench_multilora_step.py --json              # also write benchmarks/results/<device>.json
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from divgen.bench.common import bench, default_results_path, result_record, sync, write_json


def random_adapters(model, count: int, rank: int, targets: list[str], seed: int = 0):
    from divgen.engine.spa.lora import LoraAdapter, LoraConfig, base_probe, target_module_paths

    config = LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=targets)
    paths = target_module_paths(model, config)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    probe = base_probe(model)
    out = []
    for j in range(count):
        weights = {p: (torch.randn(rank, modules[p].in_features, generator=gen) * 0.01,
                       torch.randn(modules[p].out_features, rank, generator=gen) * 0.01) for p in paths}
        out.append(LoraAdapter(f"adapter-{j}", config, weights, probe))
    return out


class DecodeStep:
    """One decode step of ``rows`` rows over a prefilled cache, repeatable (the cache is cut back)."""

    def __init__(self, model, prompt_ids: torch.Tensor):
        self.model = model
        b, t = prompt_ids.shape
        self.mask = torch.ones(b, t + 1, dtype=torch.int64, device=prompt_ids.device)
        self.pos = torch.full((b, 1), t, dtype=torch.int64, device=prompt_ids.device)
        self.token = prompt_ids[:, -1:].clone()
        with torch.inference_mode():
            self.cache = model(input_ids=prompt_ids, use_cache=True).past_key_values

    @torch.inference_mode()
    def __call__(self):
        out = self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache.crop(-1)
        return out.logits


def cpu_copy_gbs(nbytes: int = 256 << 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), warmup=2, repeats=5)
    return 2 * nbytes / t["median_s"] / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model dir / .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rows-per-adapter", type=int, default=1, help="batch = adapters x rows-per-adapter")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated target modules, or all-linear")
    p.add_argument("--context", type=int, default=64, help="prefilled tokens per row")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", nargs="?", const=str(default_results_path()), default=None,
                   help="write the record to this JSON file (default benchmarks/results/<device>.json)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from divgen.engine.model import load_model
    from divgen.engine.spa.multilora import MultiLora
    from divgen.kernels import uses_triton

    lm = load_model(args.model, device=args.device)
    model, dev = lm.model, lm.device
    targets = "all-linear" if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    n_ad, per = args.adapters, args.rows_per_adapter
    batch = n_ad * per
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, lm.vocab_size - 100, (batch, args.context), generator=gen).to(dev)
    adapters = random_adapters(model, n_ad, args.rank, targets)
    slots = torch.arange(n_ad).repeat_interleave(per)                       # rows of adapter j are contiguous

    timings = {}
    base_step = DecodeStep(model, prompt)
    timings["base"] = bench(base_step, warmup=args.warmup, repeats=args.repeats, device=dev)
    with MultiLora(model, adapters) as ml:
        ml.set_row_adapters(slots.to(dev))
        multi_step = DecodeStep(model, prompt)
        timings["multi"] = bench(multi_step, warmup=args.warmup, repeats=args.repeats, device=dev)
        # serial: adapter j alone on its rows, one forward per adapter, each with its own cache
        serial_steps = []
        for j in range(n_ad):
            ml.set_row_adapters([j] * per)
            serial_steps.append(DecodeStep(model, prompt[j * per:(j + 1) * per]))

        def serial():
            for j, step in enumerate(serial_steps):
                ml.set_row_adapters([j] * per)
                step()

        timings["serial"] = bench(serial, warmup=args.warmup, repeats=args.repeats, device=dev)
        # exactness check of the benchmarked path: multi rows == serial rows
        ml.set_row_adapters(slots.to(dev))
        multi_logits = multi_step()
        serial_logits = []
        for j, step in enumerate(serial_steps):
            ml.set_row_adapters([j] * per)
            serial_logits.append(step())
        max_diff = float((multi_logits - torch.cat(serial_logits)).abs().max())
    sync(dev)

    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    lora_params = sum(a.numel() + b.numel() for ad in adapters for a, b in ad.weights.values())
    lora_bytes = lora_params * torch.finfo(lm.dtype).bits // 8
    copy_gbs = cpu_copy_gbs() if dev.type == "cpu" else None
    if dev.type == "cuda":
        from divgen.bench.common import copy_bandwidth_gbs
        copy_gbs = copy_bandwidth_gbs()
    base_s, multi_s, serial_s = (timings[k]["median_s"] for k in ("base", "multi", "serial"))
    rows = []
    for name, bytes_read in (("base", weight_bytes), ("multi", weight_bytes + lora_bytes),
                             ("serial", n_ad * weight_bytes + lora_bytes)):
        t = timings[name]
        rows.append({"variant": name, "median_ms": round(1e3 * t["median_s"], 3), "min_ms": round(1e3 * t["min_s"], 3),
                     "weight_bytes_read": bytes_read, "achieved_gbs": round(bytes_read / t["median_s"] / 1e9, 2)})
    record = result_record(
        "multilora_decode_step", rows,
        model=lm.name, dtype=str(lm.dtype), batch=batch, adapters=n_ad, rank=args.rank, targets=args.targets,
        context=args.context, threads=torch.get_num_threads(), kernel="triton" if uses_triton(dev) else "torch reference",
        copy_bandwidth_gbs=round(copy_gbs, 2) if copy_gbs else None,
        ratio_multi_over_base=round(multi_s / base_s, 3), ratio_serial_over_multi=round(serial_s / multi_s, 3),
        target_multi_over_base=1.5, target_serial_over_multi=3.0, max_abs_logit_diff_multi_vs_serial=max_diff,
        lora_params=lora_params,
    )
    print(f"device {record['device']}  model {lm.name} {lm.dtype}  batch {batch} = {n_ad} adapters x {per} rows, "
          f"rank {args.rank} on {args.targets}, context {args.context}, threads {record['threads']}, "
          f"add_lora: {record['kernel']}")
    print(f"{'variant':8s} {'median ms':>10s} {'min ms':>9s} {'GB/s':>7s}")
    for r in rows:
        print(f"{r['variant']:8s} {r['median_ms']:10.2f} {r['min_ms']:9.2f} {r['achieved_gbs']:7.2f}")
    print(f"multi / base   = {multi_s / base_s:.3f}   (target <= 1.5)")
    print(f"serial / multi = {serial_s / multi_s:.3f}   (target >= 3)")
    if copy_gbs:
        print(f"copy bandwidth {copy_gbs:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB, "
              f"adapters {lora_bytes / 1e6:.1f} MB; multi vs serial max |logit diff| {max_diff:.2e}")
    if args.json:
        write_json(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
