"""The measurements behind ``divgen bench``: decode, synth and kernel, per method and batch size.

Each runner interleaves its variants (every method at every batch size, round after round), so
load on a shared machine hits them alike, and returns one row per (method, batch size):

* throughput, the median over ``repeats`` rounds: ``tok_per_s`` (generated tokens),
  ``requests_per_s`` (sequences, i.e. engine rows that yield text), ``examples_per_s``
  (synth: records written; decode: = requests_per_s);
* latency percentiles pooled over the rounds: ``token_*`` (each decode step after the first, i.e.
  inter-token latency), ``ttft_*`` (prefill + first token), ``request_*`` (call start to the
  step that finishes the sequence).

decode: ``generate`` on ``batch`` prompts of exactly ``input_len`` random token ids, each making
exactly ``output_len`` tokens (EOS ignored). FewGen rows are independent; CorrSynth contrasts
groups of ``group_size`` rows; CFG decodes each sequence with ``group_size − 1`` negative-prompt
shadow rows (K² rows for K labels).
synth: ``run_synth`` (the code of ``divgen synth``) on the task with ``per_label`` examples per
label, ``output_len`` tokens each; the batch size is its ``batch_rows`` (rows per engine call).
kernel: one guided sampling step on ``batch`` rows (× ``group_size`` for CFG) of random logits
over ``vocab`` tokens, the kernel's per-call latency.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from divgen.engine import limits
from divgen.bench.common import latency_summary, sync

KINDS = ("decode", "synth", "kernel")
METHODS = limits.BENCH_METHODS


@dataclass
class BenchConfig:
    kind: str                                   # decode | synth | kernel
    methods: tuple[str, ...] = METHODS
    batch_sizes: tuple[int, ...] = (1, 4, 16)   # sequences per call (synth: rows per engine call)
    input_len: int = 64                         # prompt tokens (decode)
    output_len: int = 32                        # generated tokens per sequence (decode, synth)
    warmup: int = 1                             # untimed calls per variant before the rounds
    repeats: int = 3                            # interleaved timed rounds
    group_size: int = 4                         # rows per guidance group (CorrSynth), K for CFG
    scale: float = 2.0                          # guidance scale g
    per_label: int = 4                          # synth: examples per label
    task: str = "ag_news"                       # synth: task file or shipped name
    vocab: int = 49152                          # kernel: vocabulary size
    seed: int = 0
    min_p: float = 0.0                          # decode: the sampled rows' min-p (peers' rule)


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------
def random_prompts(lm, n: int, length: int, seed: int) -> list[list[int]]:
    """n prompts of exactly ``length`` ordinary token ids (special tokens excluded)."""
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    rng = random.Random(seed)
    hi = lm.vocab_size
    out = []
    for _ in range(n):
        ids = []
        while len(ids) < length:
            t = rng.randrange(100, hi)
            if t not in special:
                ids.append(t)
        out.append(ids)
    return out


def guidance_for(method: str, batch: int, cfg: BenchConfig):
    """(rows, guidance) of a call that makes ``batch`` sequences with ``method``."""
    from divgen.engine.guidance import Guidance

    if method == "fewgen":
        return batch, None
    if method == "corrsynth":
        groups = [i // cfg.group_size for i in range(batch)]
        if batch % cfg.group_size == 1:       # a last group of one row joins the one before
            groups[-1] = groups[-2]
        return batch, Guidance.corrsynth(groups=groups, scale=cfg.scale)
    if method == "cfg":
        k = cfg.group_size
        groups = [i // k for i in range(batch * k)]
        shadow_of = [None if i % k == 0 else i - i % k for i in range(batch * k)]
        return batch * k, Guidance.cfg(groups=groups, shadow_of=shadow_of, scale=cfg.scale)
    raise ValueError(f"unknown method {method!r}")


def decode_batch(lm, method: str, batch: int, cfg: BenchConfig, seed: int):
    """(prompts, guidance) of one decode call."""
    rows, guidance = guidance_for(method, batch, cfg)
    return random_prompts(lm, rows, cfg.input_len, seed), guidance


def time_decode(lm, prompts, guidance, output_len: int, seed: int, min_p: float = 0.0) -> dict:
    """One timed ``generate`` call: wall, tokens, per-step and per-request times, and (eager CPU
    engines) each step's forward / sampler / host split."""
    from divgen.engine import decode

    marks, finished_at = [], []

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        marks.append(now)
        finished_at.extend([now] * (done - len(finished_at)))

    sync(lm.device)
    steps_timed: list = []
    t0 = time.perf_counter()
    results, _ = decode.generate(lm, prompts, max_new_tokens=output_len, temperature=1.0, min_p=min_p,
                                 seeds=seed, ignore_eos=True, guidance=guidance, progress=progress,
                                 step_times=steps_timed)
    sync(lm.device)
    t1 = time.perf_counter()
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return {"wall_s": t1 - t0, "tokens": sum(len(r.token_ids) for r in results), "requests": len(results),
            "ttft": [marks[0] - t0] if marks else [], "token": steps,
            "request": [t - t0 for t in finished_at], "split": step_split(steps_timed)}


def step_split(times: list) -> dict | None:
    """Per-step medians (ms) of forward, sampler (sampling + state update) and host (between a
    step's end and the next one's start, prefill excluded), and the slots computed per step."""
    if not times:
        return None
    host = [b.start - a.end - a.prefill_after for a, b in zip(times, times[1:])]
    return {"forward_ms": 1e3 * statistics.median(t.forward_end - t.start for t in times),
            "sampler_ms": 1e3 * statistics.median(t.end - t.forward_end for t in times),
            "host_ms": 1e3 * statistics.median(host) if host else 0.0,
            "slots": statistics.median(t.slots for t in times)}


def step_gemm_flops(lm, rows: int) -> int:
    """Flops (2 per multiply-add) of one decode step's weight products at ``rows`` rows."""
    a = lm.fast.args
    per_layer = (a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
                 + 3 * a.dim * a.intermediate_size)
    return 2 * rows * (a.n_layers * per_layer + a.dim * a.vocab_size)


def gemm_peak(lm, rows: int, repeats: int = 5) -> dict:
    """GF/s of the decode step's weight products alone at ``rows`` rows (every layer's q|k|v, o,
    gate|up, down and the LM head on random activations, the weights streamed as in a step), on
    the engine's GEMM path (``models.packed``) and on dense ``F.linear``; best of ``repeats``."""
    import torch.nn.functional as F

    from divgen.engine.models.packed import fused_linear

    model, a = lm.fast, lm.fast.args
    dt, dev = lm.dtype, lm.device
    x = torch.randn(rows, a.dim, dtype=dt, device=dev)
    xo = torch.randn(rows, a.n_heads * a.head_dim, dtype=dt, device=dev)
    xi = torch.randn(rows, a.intermediate_size, dtype=dt, device=dev)
    pairs = []
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        pairs += [((at.q_proj, at.k_proj, at.v_proj), x, at._qkv), ((at.o_proj,), xo, at._o),
                  ((mlp.gate_proj, mlp.up_proj), x, mlp._gate_up), ((mlp.down_proj,), xi, mlp._down)]
    pairs.append(((model.lm_head,), x, model._head))

    def engine_path():
        for mods, inp, gemm in pairs:
            fused_linear(gemm, inp, mods)

    def dense():
        for mods, inp, _ in pairs:
            for m in mods:
                F.linear(inp, m.weight, m.bias)

    flops = step_gemm_flops(lm, rows)
    out = {"rows": rows, "gflop_per_step": flops / 1e9}
    best = {"engine": float("inf"), "dense": float("inf")}
    with torch.inference_mode():
        engine_path()
        dense()
        for _ in range(repeats):
            for name, fn in (("engine", engine_path), ("dense", dense)):
                sync(dev)
                t0 = time.perf_counter()
                fn()
                sync(dev)
                best[name] = min(best[name], time.perf_counter() - t0)
    for name, t in best.items():
        out[f"{name}_ms"] = 1e3 * t
        out[f"{name}_gflops"] = flops / t / 1e9
    out["peak_gflops"] = max(out["engine_gflops"], out["dense_gflops"])
    return out


def run_decode(lm, cfg: BenchConfig, log=print) -> list[dict]:
    variants = [(m, b) for b in cfg.batch_sizes for m in cfg.methods]
    calls = {v: decode_batch(lm, v[0], v[1], cfg, cfg.seed) for v in variants}
    for v in variants:
        for _ in range(cfg.warmup):
            time_decode(lm, *calls[v], cfg.output_len, cfg.seed, cfg.min_p)
    samples = {v: [] for v in variants}
    peaks: dict[int, list[dict]] = {}
    for rnd in range(cfg.repeats):
        for v in variants:
            samples[v].append(time_decode(lm, *calls[v], cfg.output_len, cfg.seed, cfg.min_p))
        if lm.fast is not None:              # the GEMM peak, measured between the rounds (same load)
            for rows in sorted({len(calls[v][0]) for v in variants}):
                peaks.setdefault(rows, []).append(gemm_peak(lm, rows))
        log(f"round {rnd + 1}/{cfg.repeats} done")
    out = []
    for m, b in variants:
        row = _summarise(cfg, m, b, samples[(m, b)], examples_key="requests")
        row.update(floor_report(lm, samples[(m, b)], peaks.get(len(calls[(m, b)][0]))))
        out.append(row)
    return out


def floor_report(lm, runs: list[dict], peaks: list[dict] | None) -> dict:
    """The step split (medians over rounds) and the step's GEMM rate against the measured peak
    at the same row count (the best of the engine's GEMM path and dense F.linear, over rounds)."""
    splits = [r["split"] for r in runs if r.get("split")]
    if not splits or not peaks:
        return {}
    rep = {k: statistics.median(s[k] for s in splits) for k in ("forward_ms", "sampler_ms", "host_ms", "slots")}
    step = rep["forward_ms"] + rep["sampler_ms"] + rep["host_ms"]
    rep["step_ms"] = step
    rep["sampler_share"] = rep["sampler_ms"] / step if step else 0.0
    rep["host_share"] = rep["host_ms"] / step if step else 0.0
    flops = step_gemm_flops(lm, int(round(rep["slots"])))
    rep["forward_gflops"] = flops / (rep["forward_ms"] / 1e3) / 1e9
    rep["step_gflops"] = flops / (step / 1e3) / 1e9
    peak = max(p["peak_gflops"] for p in peaks)
    rep["gemm_peak_gflops"] = peak
    rep["gemm_peak_path"] = "engine" if max(p["engine_gflops"] for p in peaks) >= peak else "dense"
    rep["forward_peak_share"] = rep["forward_gflops"] / peak
    rep["step_peak_share"] = rep["step_gflops"] / peak
    return rep


# ----------------------------------------------------------------------------------------------
# synth
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def timed_generate():
    """Wrap ``divgen.engine.decode.generate`` (where the synth job looks it up) to record the
    times of its steps; yields the list of per-call records."""
    import divgen.engine.decode as decode

    original = decode.generate
    calls: list[dict] = []

    def wrapper(*args, progress=None, **kwargs):
        marks, finished_at = [], []
        t0 = time.perf_counter()

        def tick(done, total):
            now = time.perf_counter()
            marks.append(now)
            finished_at.extend([now] * (done - len(finished_at)))
            if progress is not None:
                progress(done, total)

        out = original(*args, progress=tick, **kwargs)
        calls.append({"ttft": [marks[0] - t0] if marks else [],
                      "token": [b - a for a, b in zip(marks, marks[1:])],
                      "request": [t - t0 for t in finished_at]})
        return out

    patched = [(decode, "generate")]
    for name, module in list(sys.modules.items()):
        if name.startswith("divgen.engine.synth") and getattr(module, "generate", None) is original:
            patched.append((module, "generate"))
    for module, attr in patched:
        setattr(module, attr, wrapper)
    try:
        yield calls
    finally:
        for module, attr in patched:
            setattr(module, attr, original)


def run_synth_bench(lm, cfg: BenchConfig, log=print) -> list[dict]:
    import json

    from divgen.engine.synth import run_synth
    from divgen.engine.synth import load_task

    base = dataclasses.replace(load_task(cfg.task), ignore_eos=True, stop=())   # same length for all
    tasks = {m: base.with_overrides(method=m, per_label=cfg.per_label, max_new_tokens=cfg.output_len,
                                    seed=cfg.seed, g=None if m == "fewgen" else cfg.scale)
             for m in cfg.methods}
    variants = [(m, b) for b in cfg.batch_sizes for m in cfg.methods]
    samples = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        def one(v, tag):
            out = Path(tmp) / f"{v[0]}-{v[1]}-{tag}.jsonl"
            with timed_generate() as calls:
                t0 = time.perf_counter()
                report = run_synth(tasks[v[0]], out, lm=lm, batch_rows=v[1], progress=False, log=lambda m: None)
                wall = time.perf_counter() - t0
            tokens = sum(json.loads(line)["tokens"] for line in out.read_text().splitlines())
            return {"wall_s": wall, "tokens": tokens, "requests": report.written, "examples": report.written,
                    **{k: [x for c in calls for x in c[k]] for k in ("ttft", "token", "request")}}

        for v in variants:
            for w in range(cfg.warmup):
                one(v, f"warm{w}")
        for rnd in range(cfg.repeats):
            for v in variants:
                samples[v].append(one(v, f"r{rnd}"))
            log(f"round {rnd + 1}/{cfg.repeats} done")
    return [_summarise(cfg, m, b, samples[(m, b)], examples_key="examples") for m, b in variants]


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
def kernel_call(method: str, batch: int, cfg: BenchConfig, device):
    """A zero-argument function running one guided sampling step on the rows of ``batch``
    sequences, with the kernel interface of this checkout."""
    from divgen import kernels
    from divgen.engine.guidance import mixing_matrix

    rows, guidance = guidance_for(method, batch, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    logits = (torch.randn(rows, cfg.vocab, generator=gen) * 3).to(device)          # [R, V]
    seeds = torch.arange(rows, dtype=torch.int64, device=device)
    mix = mixing_matrix(guidance, list(range(rows)), device)                        # [R, R] or None
    if hasattr(kernels, "guided_sample_step"):
        plan = kernels.build_sample_plan(mix, device, rows=rows)
        step = torch.zeros(rows, dtype=torch.int64, device=device)
        temp = torch.ones(rows, dtype=torch.float32, device=device)
        alpha = torch.full((rows,), 0.05, dtype=torch.float32, device=device)
        top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        top_p = torch.ones(rows, dtype=torch.float32, device=device)
        return lambda: kernels.guided_sample_step(logits, plan, seeds, step, temp, alpha, top_k, top_p,
                                                  any_top_k_top_p=False)
    return lambda: kernels.guided_sample(logits, mix, seeds=seeds, step=0, alpha=0.05)


def run_kernel(cfg: BenchConfig, device, log=print) -> list[dict]:
    variants = [(m, b) for b in cfg.batch_sizes for m in cfg.methods]
    fns = {v: kernel_call(v[0], v[1], cfg, device) for v in variants}
    calls_per_round = 20
    for v in variants:
        for _ in range(cfg.warmup * 3):
            fns[v]()
    sync(device)
    samples = {v: [] for v in variants}
    for rnd in range(cfg.repeats):
        for v in variants:
            fn, seqs = fns[v], v[1]
            times = []
            for _ in range(calls_per_round):
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t0)
            samples[v].append({"wall_s": sum(times), "tokens": seqs * calls_per_round,
                               "requests": seqs * calls_per_round, "ttft": [], "token": times, "request": []})
        log(f"round {rnd + 1}/{cfg.repeats} done")
    return [_summarise(cfg, m, b, samples[(m, b)], examples_key="requests") for m, b in variants]


# ----------------------------------------------------------------------------------------------
def _summarise(cfg: BenchConfig, method: str, batch: int, runs: list[dict], examples_key: str) -> dict:
    """One result row: median throughputs over the rounds, latency percentiles pooled."""
    def med(key):
        return statistics.median(r[key] / r["wall_s"] for r in runs)

    row = {"kind": cfg.kind, "method": method, "batch_size": batch, "input_len": cfg.input_len,
           "output_len": cfg.output_len, "rounds": len(runs),
           "wall_s": statistics.median(r["wall_s"] for r in runs),
           "tok_per_s": med("tokens"), "requests_per_s": med("requests"), "examples_per_s": med(examples_key)}
    for key in ("token", "ttft", "request"):
        row.update(latency_summary([x for r in runs for x in r[key]], key))
    return row


def ratios(rows: list[dict], key: str = "tok_per_s") -> list[tuple[int, str, float]]:
    """(batch, 'a / fewgen', ratio) of each method against FewGen at the same batch size."""
    out = []
    for b in dict.fromkeys(r["batch_size"] for r in rows):
        at = {r["method"]: r[key] for r in rows if r["batch_size"] == b}
        if at.get("fewgen"):
            for m, v in at.items():
                if m != "fewgen":
                    out.append((b, f"{m} / fewgen", v / at["fewgen"]))
    return out
