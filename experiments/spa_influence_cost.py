"""Cost of the per-example LoRA gradients behind influence partitions: batched vs one at a time.

    python experiments/spa_influence_cost.py --threads 1 [--examples 16] [--batch 8] [--top-layers 6]

Both variants compute ∇θ L(z) for the same examples (embedded SmolLM2-135M-Instruct, a rank-8 LoRA
on q_proj/v_proj, random B so that every gradient is non-zero): ``loop`` = one forward + backward
per example (``influence.example_gradient``), ``batched`` = one per batch of B examples with hooks +
einsums (``influence.per_example_gradients``). Rounds are interleaved; the medians are printed with
their ratio, the gradients' largest relative difference, and the memory a batch holds. Data: the
templated fixture's responses (engine/spa/data; a timing input, not evidence).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--top-layers", type=int, default=6, help="LoRA on the last N layers (0 = all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from divgen.engine.model import load_model
    from divgen.engine.spa.config import TrainConfig
    from divgen.engine.spa.data import TRAIN_FILE, read_pairs
    from divgen.engine.spa.finetune import TrainableLora, encode_example
    from divgen.engine.spa.influence import example_gradient, per_example_gradients

    lm = load_model(None)
    n_layers = int(lm.model.config.num_hidden_layers)
    layers = list(range(n_layers - args.top_layers, n_layers)) if args.top_layers else None
    lora = TrainableLora(lm.model, TrainConfig(rank=8, layers=layers).lora_config(None))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.01)
    lora.train(False)
    items = [encode_example(lm, ex, 160) for ex in read_pairs(TRAIN_FILE)[: args.examples]]
    tokens = sum(len(it.ids) for it in items)
    pad, dev = lm.pad_token_id, lm.device

    def loop():
        return torch.stack([example_gradient(lm.model, lora, it, pad, dev) for it in items])

    def batched():
        return torch.cat([per_example_gradients(lm.model, lora, items[s:s + args.batch], pad, dev)
                          for s in range(0, len(items), args.batch)])

    times = {"loop": [], "batched": []}
    for _ in range(args.rounds):
        for name, fn in (("loop", loop), ("batched", batched)):
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "loop":
                ref = out
            else:
                rel = float((out - ref).abs().max() / ref.abs().max())
    lora_width = sum(l.lora_A.shape[1] + l.lora_B.shape[0] for l in lora.layers.values())
    width = max(len(it.ids) for it in items)
    capture = args.batch * width * lora_width * 4 * 2          # inputs + output gradients, fp32
    grads = args.batch * lora.num_parameters() * 4
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(items)} examples ({tokens} tokens), {lora.num_parameters():,} LoRA parameters "
          f"({'all' if layers is None else len(layers)} layers), {args.threads} thread(s), {args.rounds} rounds")
    for name in ("loop", "batched"):
        print(f"  {name:8s} {med[name]:7.2f} s  ({med[name] / len(items):.3f} s/example)")
    print(f"  loop / batched = {med['loop'] / med['batched']:.2f}x; max |diff| / max |grad| = {rel:.2e}")
    print(f"  memory per batch of {args.batch}: captures ~{capture / 2**20:.1f} MiB + gradients {grads / 2**20:.1f} MiB")
    lora.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
