"""Ahead-of-time compile of every kernel variant the wrappers can launch, for sm_90 / sm_80, on a
machine without a GPU (Triton's bundled ptxas, cuobjdump and nvdisasm).

    python -m divgen.kernels.compile_check              # table: every variant, sm_90 and sm_80
    python -m divgen.kernels.compile_check --arch 90 --only sample

For each variant it reports registers a thread, local memory (spills) and shared memory bytes
from the cubin (``cuobjdump -res-usage``; Triton's own figure for shared memory), and for the
vocabulary loops the SASS instructions of the loop body per logit (``nvdisasm``: instructions
between a backward branch and its target, divided by the logits one thread handles per
iteration; a static count, every branch of the body included). ``tests/test_kernels_compile.py``
asserts the limits in CI. Variants that differ only in runtime values (vocabulary, strides,
chunk counts, the pivot shift) share one compiled kernel, so they are compiled once.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

ARCHS = (90, 80)
SHARED_LIMIT = {90: 232448, 80: 166912}    # max dynamic shared memory a block (opt-in), bytes
MAX_REGISTERS = 255


@dataclass(frozen=True)
class Variant:
    kernel: str                  # "module:function"
    label: str                   # class of the variant (for the report)
    signature: tuple             # ((arg, type), ...) with "constexpr" for compile-time args
    constexprs: tuple            # ((arg, value), ...)
    num_warps: int = 4
    logits_per_thread: float = 0.0   # logits a thread handles per vocabulary-loop iteration (0: no loop)
    max_spill: int = 0               # allowed local-memory bytes a thread (stated bound)


@dataclass
class Result:
    variant: Variant
    arch: int
    registers: int = 0
    local_bytes: int = 0
    shared_bytes: int = 0
    loop_instructions: int = 0
    error: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def instructions_per_logit(self) -> float:
        lpt = self.variant.logits_per_thread
        return self.loop_instructions / lpt if lpt else 0.0


def _ptr(dtype: str) -> str:
    return {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}[dtype]


# Stated local-memory bounds (bytes a thread) of variants that spill on some target, measured with
# Triton 3.9's bundled ptxas on sm_90 and sm_80 (the larger of the two): with the min-p threshold
# (``zcut``) and the mask rule's flag live across the vocabulary loop, some bf16 shapes spill one or
# two 8-byte values, and groups of 2-8 rows, whose mixing reads the group's rows one at a time
# (``_mix_rows``), 8-16 bytes on a few shapes. The masked variants (plans of the vLLM binding, whose
# contrasting rows may hold −inf: the mask rule's per-row loop, ``_mask_terms``) spill 8-32 bytes on
# the shapes under their " masks" label.
SPILL_BOUNDS: dict[str, int] = {
    "sample G=1 M=1 bf16": 8, "sample G=16 M=16 bf16": 16, "count G=32 M=32 bf16 top-p": 8,
    "count G=4 M=4 bf16 top-p": 8, "sample G=4 M=4 bf16 top logp": 8,
    "count G=2 M=2 bf16 top-p masks": 8, "count G=4 M=4 bf16 top-p masks": 8,
    "count G=4 M=4 bf16 top-k masks": 16, "count G=4 M=4 bf16 top-k decide masks": 16,
    "count G=4 M=4 bf16 top-p finish masks": 16, "count G=8 M=8 bf16 top-k masks": 8,
    "count G=8 M=8 bf16 top-k decide masks": 8, "verify G=2 M=2 bf16 masks": 16,
    "sample G=2 M=2 bf16 top round 1 masks": 8, "count G=2 M=2 bf16 top-p finish masks": 8,
    "sample G=4 M=4 bf16 top round masks": 16, "count G=16 M=16 bf16 top-p masks": 16,
    "count G=16 M=16 bf16 top-p finish masks": 16, "sample G=32 M=32 bf16 top masks": 8,
    "sample G=32 M=32 bf16 top logp masks": 16, "count G=32 M=32 bf16 top-k masks": 16,
    "count G=32 M=32 bf16 top-p masks": 32, "count G=32 M=32 bf16 top-k decide masks": 8,
    "count G=32 M=32 bf16 top-p finish masks": 24,
}


def sample_variants() -> list[Variant]:
    """The guided-sampling kernels at every tile shape the wrappers choose on CUDA."""
    from divgen.kernels import guided_sample_triton as gs

    pkg = "divgen.kernels.guided_sample_triton"
    stats, gumbel, rounds, bisect = (f"{pkg}.{m}" for m in ("stats", "gumbel", "rounds", "bisect"))
    out = []
    for dtype in ("fp32", "bf16", "fp16"):
        out.append(Variant(f"{stats}:_stats_kernel", f"stats {dtype}", (
            ("logits_ptr", _ptr(dtype)), ("stride_logits", "i32"), ("part_max_ptr", "*fp32"), ("part_sum_ptr", "*fp32"),
            ("vocab", "i32"), ("chunk_len", "i32"), ("num_chunks", "i32"), ("BLOCK_V", "constexpr")),
            (("BLOCK_V", gs.CUDA_STATS_BLOCK_V),), num_warps=8, logits_per_thread=gs.CUDA_STATS_BLOCK_V / 256))
    # tile shapes: (G_BLOCK, M, K) for every group block the plan can produce
    shapes = [(g, g, g) for g in (1, 2, 4, 8, 16)] + [(32, 32, 32), (64, 32, 32), (256, 32, 32)]
    plan = ("plan", ("*i32", "*i32", "*i32", "*i32", "*i64", "*fp32"))   # tile_group .. weights
    row_params = ("row_params", ("*fp32",) * 4)                          # lse, cut, inv_t, zcut
    cuts = ("cuts", ("*i64", "*fp32"))                                   # top_k, top_p
    for g_block, m, k in shapes:
        block_v, warps = gs.CUDA_TILES[m]
        count_v = max(16, 32 * warps // m)
        for dtype in (("fp32", "bf16", "fp16") if g_block in (1, 256) else ("bf16",)):
            # (top-k/top-p, log-probs, candidate round): plain; a sample / verify round; the
            # final sample after the bisection, without and with log-probs (the heaviest)
            # cand 2: round 1 (no decide; it combines the stats when the tiles are whole groups, as
            # the plain pass does); cand 1: rounds 2.. (they decide the previous round)
            flag_sets = ([(False, False, False), (True, False, 1), (True, False, 2), (True, False, False),
                          (True, True, False)]
                         if dtype == "bf16" else [(True, True, False), (True, False, 1)])
            for top, logprobs, cand in flag_sets:
                fuse = m == g_block and (not top or cand == 2)
                decide, narrow = cand == 1, top and not cand
                # a stage's pointers are one tuple argument; a stage the variant skips gets None
                stages = (("top", ("*i64", "*fp32", "*i64", "*i64") if top else None),
                          ("state_ptr", "*i32" if top else None), ("skip_from", "i32"),
                          ("decide", ("*fp32", "*fp32", "*fp32", "*i32", "*i64", "*i32", "*fp32", "*fp32", "*fp32",
                                      "*fp32") if decide else None),
                          ("narrow", ("*fp32", "*fp32") if narrow else None),
                          ("stats", ("*fp32",) * 3 if fuse else None))
                sig = (("logits_ptr", _ptr(dtype)), ("stride_logits", "i32"), ("noise", "constexpr"), plan,
                       row_params, ("draw", ("*i32", "*i64", "*i64")),
                       ("winners", ("*fp32", "*i32", "*fp32", "*fp32", "*fp32")),
                       ("vocab", "i32"), ("chunk_len", "i32"), ("num_chunks", "i32"),
                       *((n, t or "constexpr") for n, t in stages),
                       *((n, "constexpr") for n in ("M_BLOCK", "K_BLOCK", "G_BLOCK", "BLOCK_V", "HAS_NOISE",
                                                     "TOP_K_TOP_P", "RETURN_LOGPROBS", "CANDIDATE", "GUMBEL_MAX",
                                                     "DECIDE", "NARROW_P", "NUM_LEVELS", "NUM_PIVOTS",
                                                     "FUSE_STATS", "C_BLOCK", "MASKS")))
                tag = (f"sample G={g_block} M={m} {dtype}{' top' if top else ''}{' logp' if logprobs else ''}"
                       f"{' round' if cand else ''}{' 1' if cand == 2 else ''}")
                out.append(Variant(f"{gumbel}:_sample_kernel", tag, sig, (
                    ("noise", None), *((n, None) for n, t in stages if t is None),
                    ("M_BLOCK", m), ("K_BLOCK", k), ("G_BLOCK", g_block), ("BLOCK_V", block_v), ("HAS_NOISE", False),
                    ("TOP_K_TOP_P", top), ("RETURN_LOGPROBS", logprobs), ("CANDIDATE", bool(cand)),
                    ("GUMBEL_MAX", gs.GUMBEL_MAX), ("DECIDE", decide), ("NARROW_P", narrow),
                    ("NUM_LEVELS", gs.NUM_LEVELS), ("NUM_PIVOTS", gs.NUM_PIVOTS), ("FUSE_STATS", fuse),
                    ("C_BLOCK", gs.MAX_CHUNKS), ("MASKS", False)),
                    num_warps=warps, logits_per_thread=m * block_v / (32 * warps)))
            verify_v = max(16, (64 if m == 1 else 32) * warps // m)
            sig = (("logits_ptr", _ptr(dtype)), ("stride_logits", "i32"), plan, row_params, cuts,
                   ("state_ptr", "*i32"), ("winners", ("*fp32", "*i32", "*fp32", "*fp32")), ("tokens_ptr", "*i64"),
                   ("candidate", ("*fp32", "*fp32")), ("bracket", ("*fp32", "*fp32")), ("part_ptr", "*fp32"),
                   ("vocab", "i32"), ("chunk_len", "i32"), ("num_chunks", "i32"),
                   *((n, "constexpr") for n in ("M_BLOCK", "K_BLOCK", "G_BLOCK", "BLOCK_V", "NUM_LEVELS", "C_BLOCK",
                                                 "MASKS")))
            out.append(Variant(f"{rounds}:_verify_kernel", f"verify G={g_block} M={m} {dtype}", sig, (
                ("M_BLOCK", m), ("K_BLOCK", k), ("G_BLOCK", g_block), ("BLOCK_V", verify_v),
                ("NUM_LEVELS", gs.NUM_LEVELS), ("C_BLOCK", gs.MAX_CHUNKS), ("MASKS", False)),
                num_warps=warps, logits_per_thread=m * verify_v / (32 * warps)))
            # (MASS, first pass): a narrowing pass of each threshold; the first top-k pass (it
            # decides the last round) and the first top-p pass (it finishes the top-k threshold)
            for mass, first in ([(False, False), (True, False), (False, True), (True, True)] if dtype == "bf16"
                                else [(True, False)]):
                decide = first and not mass
                sig = (("logits_ptr", _ptr(dtype)), ("stride_logits", "i32"), plan, row_params, cuts,
                       ("lo_top_k_ptr", "*i64"), ("lo_prev_ptr", "*i64"), ("lo_ptr", "*i64"),
                       ("pivot_shift", "i32"), ("prev_shift", "i32"), ("state_ptr", "*i32"),
                       ("measure_in", ("*fp32", "*fp32")), ("measure_out", ("*fp32", "*fp32")),
                       ("decide", ("*fp32", "*fp32", "*fp32", "*i64", "*i32", "*fp32", "*fp32", "*i32")
                        if decide else "constexpr"),
                       ("vocab", "i32"), ("chunk_len", "i32"), ("num_chunks", "i32"),
                       *((n, "constexpr") for n in ("M_BLOCK", "K_BLOCK", "G_BLOCK", "BLOCK_V", "NUM_PIVOTS",
                                                     "MASS", "APPLY_TOP_K", "FIRST", "DECIDE", "FINISH_TOP_K",
                                                     "NUM_LEVELS", "MASKS")))
                tag = (f"count G={g_block} M={m} {dtype} {'top-p' if mass else 'top-k'}"
                       f"{(' finish' if mass else ' decide') if first else ''}")
                out.append(Variant(f"{bisect}:_threshold_count_kernel", tag, sig, (
                    *((() if decide else (("decide", None),))),
                    ("M_BLOCK", m), ("K_BLOCK", k), ("G_BLOCK", g_block), ("BLOCK_V", count_v),
                    ("NUM_PIVOTS", gs.NUM_PIVOTS), ("MASS", mass), ("APPLY_TOP_K", mass), ("FIRST", first),
                    ("DECIDE", decide), ("FINISH_TOP_K", first and mass), ("NUM_LEVELS", gs.NUM_LEVELS),
                    ("MASKS", False)),
                    num_warps=warps, logits_per_thread=m * count_v / (32 * warps)))
    # plans whose contrasting rows may hold −inf (the vLLM binding's): the mask rule's terms
    # compiled in, for the guided tile shapes (G > 1), bf16; bounds in SPILL_BOUNDS
    out = [dataclasses.replace(v, max_spill=SPILL_BOUNDS[v.label]) if v.label in SPILL_BOUNDS else v for v in out]
    masked = []
    for v in out:
        consts = dict(v.constexprs)
        if "MASKS" in consts and consts["G_BLOCK"] > 1 and " bf16" in v.label:
            label = v.label + " masks"
            masked.append(Variant(v.kernel, label, v.signature,
                                  tuple((n, True if n == "MASKS" else x) for n, x in v.constexprs),
                                  num_warps=v.num_warps, logits_per_thread=v.logits_per_thread,
                                  max_spill=SPILL_BOUNDS.get(label, 0)))
    out += masked
    c_block = gs.MAX_CHUNKS
    for block_r, logprobs in ((64, True), (64, False)):
        out.append(Variant(f"{stats}:_row_stats_kernel", f"row stats R={block_r}", (
            ("part_max_ptr", "*fp32"), ("part_sum_ptr", "*fp32"), ("cutoff_ptr", "*fp32"), ("lse_ptr", "*fp32"),
            ("cut_ptr", "*fp32"), ("rows_total", "i32"), ("num_chunks", "i32"),
            ("BLOCK_R", "constexpr"), ("C_BLOCK", "constexpr")),
            (("BLOCK_R", block_r), ("C_BLOCK", c_block)))) if logprobs else None
        out.append(Variant(f"{gumbel}:_select_kernel", f"select R={block_r}{' logp' if logprobs else ''}", (
            ("best_score_ptr", "*fp32"), ("best_token_ptr", "*i32"), ("best_z_ptr", "*fp32"), ("z_max_ptr", "*fp32"),
            ("z_sum_ptr", "*fp32"), ("state_ptr", "*i32"), ("skip_from", "i32"), ("tokens_ptr", "*i64"),
            ("logprobs_ptr", "*fp32"),
            ("rows_total", "i32"), ("vocab", "i32"), ("num_chunks", "i32"),
            ("BLOCK_R", "constexpr"), ("C_BLOCK", "constexpr"), ("RETURN_LOGPROBS", "constexpr"),
            ("SKIP_SETTLED", "constexpr")),
            (("BLOCK_R", block_r), ("C_BLOCK", c_block), ("RETURN_LOGPROBS", logprobs), ("SKIP_SETTLED", True))))
    return out


def lora_variants() -> list[Variant]:
    """Shrink / expand at decode (BLOCK_M 16) and prefill (BLOCK_M 64) shapes, ranks 8..128."""
    import torch

    from divgen.kernels import lora_triton as lo

    mod = "divgen.kernels.lora_triton"
    out = []
    tiles = (("order_ptr", "*i64"), ("tile_adapter_ptr", "*i32"), ("tile_start_ptr", "*i32"), ("tile_end_ptr", "*i32"))
    for block_m, shape in ((16, "decode"), (64, "prefill")):
        for rank in (8, 16, 32, 64, 128):
            for dtype in (("bf16", "fp32") if rank in (16, 128) else ("bf16",)):
                fp32 = dtype == "fp32"
                block_k, block_r, warps = lo.shrink_config(block_m, rank, torch.float32 if fp32 else torch.bfloat16)
                out.append(Variant(f"{mod}:_lora_shrink_kernel", f"shrink {shape} r={rank} {dtype}", (
                    ("x_ptr", _ptr(dtype)), ("a_ptr", _ptr(dtype)), ("t_ptr", "*fp32"), ("scales_ptr", "*fp32"), *tiles,
                    ("H_in", "i32"), ("R", "i32"), ("K_PER_SPLIT", "i32"),
                    ("stride_xn", "i32"), ("stride_xh", "i32"), ("stride_al", "i32"), ("stride_ar", "i32"),
                    ("stride_ah", "i32"), ("stride_ts", "i32"), ("stride_tn", "i32"), ("stride_tr", "i32"),
                    *((n, "constexpr") for n in ("BLOCK_M", "BLOCK_K", "BLOCK_R", "DOT_IN_FP32", "DOT_PRECISION"))),
                    (("BLOCK_M", block_m), ("BLOCK_K", block_k), ("BLOCK_R", block_r), ("DOT_IN_FP32", fp32),
                     ("DOT_PRECISION", "ieee" if fp32 else "tf32")), num_warps=warps,
                    # stated bound: fp32 operands at rank 128 and 64-row prefill tiles keep ~24 B
                    # of spills even at BLOCK_K 16 (models serve bf16; fp32 LoRA is the test path)
                    max_spill=32 if fp32 and rank == 128 and block_m == 64 else 0))
                out.append(Variant(f"{mod}:_lora_expand_kernel", f"expand {shape} r={rank} {dtype}", (
                    ("t_ptr", "*fp32"), ("b_ptr", _ptr(dtype)), ("y_ptr", _ptr(dtype)), *tiles,
                    ("H_out", "i32"), ("R", "i32"), ("SPLIT_K", "i32"),
                    ("stride_ts", "i32"), ("stride_tn", "i32"), ("stride_tr", "i32"), ("stride_bl", "i32"),
                    ("stride_bh", "i32"), ("stride_br", "i32"), ("stride_yn", "i32"), ("stride_yh", "i32"),
                    *((n, "constexpr") for n in ("BLOCK_M", "BLOCK_N", "BLOCK_R"))),
                    (("BLOCK_M", block_m), ("BLOCK_N", lo.expand_config(block_m, rank)[0]),
                     ("BLOCK_R", lo.expand_config(block_m, rank)[1])), num_warps=lo.expand_config(block_m, rank)[2]))
    return out


def all_variants() -> list[Variant]:
    return [v for v in sample_variants() + lora_variants() if v is not None]


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRA = re.compile(r"BRA\s+(?:`\(|)\.?(L_x_\d+)")
_LABEL = re.compile(r"^\.?(L_x_\d+):", re.M)


def loop_body_instructions(sass: str) -> int:
    """Instructions of the largest loop: from a backward branch's target label to the branch."""
    labels, lines = {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(lines)
            continue
        m = _INSN.search(line)
        if m:
            lines.append(m.group(2))
    best = 0
    for i, insn in enumerate(lines):
        m = _BRA.search(insn)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            best = max(best, i - labels[m.group(1)] + 1)
    return best


def compile_variant(variant: Variant, arch: int) -> Result:
    """Compile one variant for sm_<arch> and read its resources (runs in a worker process)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = variant.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    result = Result(variant, arch)
    try:
        src = ASTSource(fn, dict(variant.signature), constexprs=dict(variant.constexprs))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": variant.num_warps})
    except Exception as exc:  # noqa: BLE001 - reported per variant
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return result
    result.shared_bytes = int(compiled.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
        m = _RES.search(res)
        if m:   # spills live in the stack frame (LOCAL counts only local arrays)
            result.registers = int(m.group(1))
            result.local_bytes = max(int(m.group(2)), int(m.group(4)))
        if variant.logits_per_thread:
            sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True).stdout
            result.loop_instructions = loop_body_instructions(sass)
    finally:
        os.unlink(path)
    return result


def _compile_star(args):
    return compile_variant(*args)


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)     # compile for real, whatever the parent runs


def compile_jobs(jobs: list[tuple[Variant, int]], workers: int | None = None) -> list[Result]:
    """Compile (variant, arch) pairs in fresh worker processes (spawned: a parent that imported
    the kernels under TRITON_INTERPRET=1 holds interpreter functions that cannot be compiled)."""
    import multiprocessing

    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        return list(pool.map(_compile_star, jobs, chunksize=1))


def compile_all(variants=None, archs=ARCHS, workers: int | None = None) -> list[Result]:
    variants = all_variants() if variants is None else variants
    return compile_jobs([(v, a) for a in archs for v in variants], workers)


def violations(result: Result) -> list[str]:
    """Limits every variant must meet: it compiles, fits the target's shared memory, and spills
    at most its stated bound."""
    tag = f"{result.variant.label} sm_{result.arch}"
    if result.error:
        return [f"{tag}: does not compile: {result.error}"]
    out = []
    if result.shared_bytes > SHARED_LIMIT[result.arch]:
        out.append(f"{tag}: needs {result.shared_bytes} B shared memory > {SHARED_LIMIT[result.arch]} B")
    if result.local_bytes > result.variant.max_spill:
        out.append(f"{tag}: spills {result.local_bytes} B a thread (bound {result.variant.max_spill} B)")
    if result.registers > MAX_REGISTERS:
        out.append(f"{tag}: {result.registers} registers")
    return out


def format_table(results: list[Result]) -> str:
    lines = [f"{'variant':44} {'arch':>5} {'regs':>5} {'stack B':>7} {'smem B':>7} {'loop insn':>9} {'insn/logit':>10}"]
    for r in results:
        if r.error:
            lines.append(f"{r.variant.label:44} sm_{r.arch} ERROR {r.error}")
            continue
        ipl = f"{r.instructions_per_logit:10.1f}" if r.variant.logits_per_thread else f"{'-':>10}"
        lines.append(f"{r.variant.label:44} sm_{r.arch} {r.registers:5d} {r.local_bytes:7d} {r.shared_bytes:7d}"
                     f" {r.loop_instructions:9d} {ipl}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--only", default="", help="substring of the variant labels to compile")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    variants = [v for v in all_variants() if args.only in v.label]
    results = compile_all(variants, tuple(args.arch), args.workers)
    print(format_table(results))
    bad = [line for r in results for line in violations(r)]
    print("\n".join(bad) if bad else f"all {len(results)} compiles within limits")


if __name__ == "__main__":
    main()
