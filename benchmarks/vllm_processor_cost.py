"""What divgen's vLLM logits processor costs a decode step, against the step it runs in.

    .venv-vllm/bin/python benchmarks/vllm_processor_cost.py --threads 1        # both parts
    python benchmarks/vllm_processor_cost.py --threads 1 --no-vllm             # part 1 only

Batch: 16 rows, every one tagged (4 CorrSynth groups of 4, g = 2), the embedded
SmolLM2-135M-Instruct (vocabulary 49,152), fp32, on the CPU.

1. ``apply``: ``DivgenVLLMLogitsProcessor.apply`` alone, fed the model's real next-token logits of 16
   chat prompts ([16, 49152], from one transformers forward), its batch built by hand-made
   ``BatchUpdate``s as vLLM sends them; each timed step appends a token to every row (the step
   counters advance, as in decoding). Variants: T 0.8; T 0.8 with the request's min-p 0.05;
   T 0.8 with top-k 50; greedy. Median ms a step over --steps steps.
2. ``step``: the 135M model's decode step in vLLM (``LLM``, engine core in this process, its
   default CPU configuration, the processor loaded): the same 16 prompts, 64 tokens each with EOS
   ignored, untagged and tagged in turn for --repeats rounds; ms a step = wall time / tokens a
   row (the prompt's prefill included, once). The processor's share of a step: ``apply`` timed
   inside vLLM during the tagged rounds (median over its calls) over the tagged step; end to
   end, (tagged − untagged) / untagged; and part 1's median over the untagged step (measured
   minutes apart: on a shared machine the least reliable of the three).

Writes ``benchmarks/results/vllm_processor_cost-cpu-<arch>-<N>cores.json`` (``--output-json`` overrides).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")     # the engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")             # GiB
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# the script's folder is on sys.path when it runs as a script: vs_vllm is its neighbour
from vs_vllm import PROMPTS, git_sha, machine, versions  # noqa: E402

ROWS, GROUP, SCALE = 16, 4, 2.0
VARIANTS = {
    "T0.8": dict(temperature=0.8),
    "T0.8_min_p0.05": dict(temperature=0.8, min_p=0.05),
    "T0.8_top_k50": dict(temperature=0.8, top_k=50),
    "greedy": dict(temperature=0.0),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--steps", type=int, default=40, help="timed apply() steps per variant (default 40)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens a row in part 2 (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of part 2 (default 3)")
    ap.add_argument("--no-vllm", action="store_true", help="part 1 only (no vLLM needed)")
    ap.add_argument("--output-json", default=None)
    return ap.parse_args(argv)


def real_logits(lm) -> "torch.Tensor":
    """The model's next-token logits [ROWS, V] for ROWS chat prompts (one left-padded forward)."""
    import torch
    from transformers import AutoModelForCausalLM

    prompts = [lm.format_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(ROWS)]
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(str(lm.source_dir), torch_dtype=torch.float32)
    with torch.no_grad():
        return model(**enc).logits[:, -1, :].float().contiguous()


def time_apply(logits, knobs: dict, steps: int) -> dict:
    """Median / p90 ms of ``apply`` on a fully tagged batch (module docstring, part 1)."""
    import torch

    from divgen.bindings.vllm import DivgenVLLMLogitsProcessor, divgen_tag

    proc = DivgenVLLMLogitsProcessor(None, "cpu", False)
    outputs = [[] for _ in range(ROWS)]
    added = []
    for i in range(ROWS):
        params = SimpleNamespace(seed=100 + i, temperature=knobs.get("temperature", 1.0), top_k=knobs.get("top_k", 0),
                                 top_p=1.0, min_p=knobs.get("min_p", 0.0), presence_penalty=0.0,
                                 frequency_penalty=0.0, repetition_penalty=1.0,
                                 extra_args=divgen_tag(group=f"g{i // GROUP}", scale=SCALE, size=GROUP))
        added.append((i, params, [1, 2, 3], outputs[i]))
    proc.update_state(SimpleNamespace(batch_size=ROWS, removed=(), added=added, moved=()))
    assert len(proc.requests) == ROWS
    times = []
    for step in range(steps + 3):
        x = logits.clone()                 # vLLM hands a fresh logits tensor every step
        t0 = time.perf_counter()
        out = proc.apply(x)
        dt = time.perf_counter() - t0
        tokens = out.argmax(dim=1)
        assert bool(torch.isfinite(out).sum(dim=1).eq(1).all())
        for i in range(ROWS):
            outputs[i].append(int(tokens[i]))
        proc.update_state(None)            # vLLM: no batch change this step
        if step >= 3:                      # warm-up
            times.append(dt * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))], "steps": steps}


def time_vllm_steps(lm, args) -> dict:
    """ms a decode step of the 135M model in vLLM, untagged and fully tagged (part 2)."""
    import torch
    from vllm import LLM, SamplingParams

    from divgen.bindings.vllm import DivgenVLLMLogitsProcessor, divgen_tag

    llm = LLM(model=str(lm.source_dir), dtype="float32", max_model_len=1024, seed=0, max_num_seqs=ROWS,
              logits_processors=[DivgenVLLMLogitsProcessor])
    torch.set_num_threads(args.threads)
    ids = [lm.encode(lm.format_prompt(PROMPTS[i % len(PROMPTS)])) for i in range(ROWS)]
    n = args.new_tokens

    def params(tagged: bool):
        return [SamplingParams(temperature=0.8, seed=100 + i, max_tokens=n, ignore_eos=True,
                               extra_args=divgen_tag(group=f"g{i // GROUP}", scale=SCALE) if tagged else None)
                for i in range(ROWS)]

    def run(tagged: bool) -> float:
        prompts = [{"prompt_token_ids": p} for p in ids]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params(tagged), use_tqdm=False)
        dt = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return dt * 1e3 / n

    # apply() timed inside vLLM (the engine core runs in this process): every call of a round
    apply_ms: list[float] = []
    inner = DivgenVLLMLogitsProcessor.apply

    def timed_apply(self, logits):
        t0 = time.perf_counter()
        out = inner(self, logits)
        if self.requests:
            apply_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    DivgenVLLMLogitsProcessor.apply = timed_apply
    try:
        run(False), run(True)              # warm-up
        apply_ms.clear()
        rounds = {"untagged": [], "tagged": []}
        for _ in range(args.repeats):
            for name in rounds:
                rounds[name].append(run(name == "tagged"))
    finally:
        DivgenVLLMLogitsProcessor.apply = inner
    med = {k: statistics.median(v) for k, v in rounds.items()}
    return {"untagged_step_ms": med["untagged"], "tagged_step_ms": med["tagged"], "rounds_ms": rounds,
            "tagged_overhead": med["tagged"] / med["untagged"] - 1, "new_tokens": n, "repeats": args.repeats,
            "apply_in_vllm_median_ms": statistics.median(apply_ms), "apply_in_vllm_calls": len(apply_ms),
            "apply_in_vllm_share_of_tagged_step": statistics.median(apply_ms) / med["tagged"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from divgen.engine.model import load_model

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    lm = load_model(None, device="cpu", dtype="float32")
    logits = real_logits(lm)
    torch.set_num_threads(args.threads)
    record = {"machine": machine(), "versions": versions(), "git": git_sha(), "threads": args.threads,
              "rows": ROWS, "groups": f"{ROWS // GROUP} CorrSynth groups of {GROUP}, g {SCALE}",
              "vocab": logits.shape[1], "apply": {}}
    for name, knobs in VARIANTS.items():
        record["apply"][name] = r = time_apply(logits, knobs, args.steps)
        print(f"apply, 16 tagged rows, {name:>15}: {r['median_ms']:7.2f} ms a step (p90 {r['p90_ms']:.2f})", flush=True)
    if not args.no_vllm:
        record["vllm_step"] = s = time_vllm_steps(lm, args)
        print(f"vLLM decode step, batch 16: untagged {s['untagged_step_ms']:.1f} ms, tagged {s['tagged_step_ms']:.1f} ms "
              f"({100 * s['tagged_overhead']:+.1f} %); apply() inside vLLM {s['apply_in_vllm_median_ms']:.2f} ms "
              f"= {100 * s['apply_in_vllm_share_of_tagged_step']:.1f} % of the tagged step", flush=True)
        for name, r in record["apply"].items():
            r["share_of_untagged_step"] = r["median_ms"] / s["untagged_step_ms"]
            print(f"apply {name:>15} = {100 * r['share_of_untagged_step']:.1f} % of the untagged step", flush=True)
    record["load_average"] = {"before": load_before, "after": os.getloadavg()}
    out = Path(args.output_json) if args.output_json else (
        Path(__file__).resolve().parent / "results"
        / f"vllm_processor_cost-cpu-{platform.machine()}-{os.cpu_count()}cores.json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
