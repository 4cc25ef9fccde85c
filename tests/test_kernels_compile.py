"""Every kernel variant the wrappers launch compiles for sm_90 and sm_80 — without a GPU — and
fits the target: shared memory within the launch limit, no register spills, bounded instruction
cost per logit. Recipe and the full table: kernels/README.md (``python -m divgen.kernels.compile_check``).

CI budget: the heaviest variant of each class on both targets (~40 compiles in two spawned
workers, ~1-2 min on 2 cores with a cold Triton cache, seconds with a warm one). The variants
left out differ from a compiled one only in a smaller tile or another pointer dtype.
"""
import json
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl

from divgen.kernels import compile_check as cc
from divgen.kernels import guided_sample_triton as gs
from divgen.kernels import lora_triton as lo
from divgen.kernels.guided_sample_triton.device import _mix
from divgen.kernels.plan import MAX_GROUP_ROWS, build_sample_plan, next_power_of_2


def _toolchain() -> bool:
    try:
        return all(os.access(cc._tool(t), os.X_OK) for t in ("cuobjdump", "nvdisasm"))
    except Exception:  # noqa: BLE001 - no triton / no NVIDIA backend
        return False


needs_toolchain = pytest.mark.skipif(not _toolchain(), reason="Triton's NVIDIA toolchain (ptxas, cuobjdump) is absent")

# the heaviest variant of each class (registers / shared memory grow with these shapes)
CI_SM90 = [
    "stats bf16",
    "sample G=1 M=1 bf16", "sample G=1 M=1 bf16 top logp", "sample G=8 M=8 bf16 top logp",
    "sample G=16 M=16 bf16 top logp", "sample G=32 M=32 bf16 top logp", "sample G=64 M=32 bf16 top logp",
    "sample G=256 M=32 fp32 top logp", "sample G=1 M=1 bf16 top round", "sample G=16 M=16 bf16 top round 1",
    "sample G=8 M=8 bf16 top round", "sample G=16 M=16 bf16",
    "verify G=1 M=1 bf16", "verify G=8 M=8 bf16", "verify G=256 M=32 fp32",
    "count G=1 M=1 bf16 top-k", "count G=1 M=1 bf16 top-p", "count G=8 M=8 bf16 top-p",
    "count G=1 M=1 bf16 top-k decide", "count G=32 M=32 bf16 top-p", "count G=64 M=32 bf16 top-p finish",
    "count G=64 M=32 bf16 top-k", "count G=256 M=32 fp32 top-p",
    "row stats R=64", "select R=64 logp",
    "shrink decode r=128 bf16", "shrink prefill r=128 bf16", "shrink prefill r=128 fp32", "shrink prefill r=8 bf16",
    "expand decode r=128 fp32", "expand prefill r=128 bf16",
]
CI_SM80 = [
    "sample G=8 M=8 bf16 top logp", "sample G=64 M=32 bf16 top logp", "sample G=256 M=32 fp32 top logp",
    "count G=256 M=32 fp32 top-p", "count G=8 M=8 bf16 top-p",
    "verify G=256 M=32 fp32", "verify G=8 M=8 bf16", "count G=4 M=4 bf16 top-k decide",
    "count G=256 M=32 bf16 top-k decide",
    "shrink prefill r=128 fp32", "shrink prefill r=128 bf16", "expand prefill r=128 bf16", "shrink decode r=128 bf16",
]


@pytest.fixture(scope="module")
def compiled():
    variants = {v.label: v for v in cc.all_variants()}
    jobs = [(variants[label], 90) for label in CI_SM90] + [(variants[label], 80) for label in CI_SM80]
    results = cc.compile_jobs(jobs)
    print("\n" + cc.format_table(results))
    return {(r.variant.label, r.arch): r for r in results}


@needs_toolchain
def test_every_variant_fits_its_target(compiled):
    problems = [line for r in compiled.values() for line in cc.violations(r)]
    assert not problems, "\n".join(problems)


@needs_toolchain
def test_instruction_cost_per_logit(compiled):
    """Stated bounds (sm_90 SASS, static loop-body counts): pass 1 ≤ 32 instructions a logit; a
    plain sample pass ≤ 130; a top-k/top-p round: its sample pass at most 1.15× and its verify
    pass at most 0.75× the plain sample pass (so a row settled in round 1 costs ≤ 1.7× a plain
    step); the bisection's top-k counting pass at most 1.5× and top-p pass at most 2.2× (per-lane
    accumulation, one reduction per chunk; it was ~15 block reductions a tile)."""
    ipl = {label: compiled[(label, 90)].instructions_per_logit for label, arch in compiled if arch == 90}
    plain = ipl["sample G=1 M=1 bf16"]
    assert ipl["stats bf16"] <= 32
    assert 0 < plain <= 130
    assert ipl["sample G=1 M=1 bf16 top round"] <= 1.15 * plain
    assert 0 < ipl["verify G=1 M=1 bf16"] <= 0.75 * plain
    settled_in_round_1 = ipl["stats bf16"] + ipl["sample G=1 M=1 bf16 top round"] + ipl["verify G=1 M=1 bf16"]
    assert settled_in_round_1 <= 1.7 * (ipl["stats bf16"] + plain)
    assert ipl["count G=1 M=1 bf16 top-k"] <= 1.5 * plain
    assert ipl["count G=1 M=1 bf16 top-p"] <= 2.2 * plain


def test_ci_subset_covers_every_shape_the_wrappers_launch():
    """Each tile shape chosen for group sizes 1..256 and each LoRA config (decode / prefill,
    ranks 8..128) is a compiled variant; the CI subset includes the largest of each."""
    labels = {v.label for v in cc.all_variants()}
    for group in range(1, MAX_GROUP_ROWS + 1):
        g_block = next_power_of_2(group)
        m, k = gs.tile_shape(g_block, on_cuda=True)
        shown = {1, 2, 4, 8, 16, 32, 64, 256}
        if g_block in shown:
            assert f"sample G={g_block} M={m} bf16 top logp" in labels
            assert f"sample G={g_block} M={m} bf16 top round" in labels and f"verify G={g_block} M={m} bf16" in labels
        else:   # 128: the loop path, identical code to 64 and 256 (G_BLOCK picks the branch only)
            assert (m, k) == gs.tile_shape(256, on_cuda=True)
    for shape in ("decode", "prefill"):
        for rank in (8, 16, 32, 64, 128):
            assert f"shrink {shape} r={rank} bf16" in labels and f"expand {shape} r={rank} bf16" in labels
    assert set(CI_SM90) <= labels and set(CI_SM80) <= labels


def test_large_groups_spread_over_many_programs(monkeypatch):
    """A 256-row group runs as 8 row tiles × up to 64 vocabulary chunks on a 132-SM GPU (it was
    one program a chunk: ≤ 64 programs), and a 64-row group as 2 tiles."""
    monkeypatch.setattr(gs.step, "_sm_count", lambda index: 132)
    import torch

    for group, tiles_expected in ((256, 8), (64, 2), (8, 1)):
        plan = build_sample_plan(torch.ones(group, group), "cpu", ops=cc_stub_ops())
        tiles = gs.prepare_plan(plan, *gs.tile_shape(plan.g_block, on_cuda=True)).prepared
        assert tiles.count == tiles_expected
        cfg = gs.launch_config(128256, tiles, torch.device("cuda"))
        programs = tiles.count * cfg.num_chunks
        assert programs > (64 if group >= 64 else 60)


def cc_stub_ops():
    class Ops:
        @staticmethod
        def prepare_plan(plan):
            return plan
    return Ops


def test_lora_configs_match_the_checked_variants():
    import torch

    assert lo.shrink_config(64, 128, torch.float32) == (16, 128, 8)
    assert lo.expand_config(64, 128) == (64, 32, 8)
    assert lo.shrink_config(16, 8, torch.bfloat16) == (128, 16, 4)


def test_no_kernel_takes_a_float_scalar():
    """Inside torch.compile (the engine's CUDA-graph step) a Python float argument reaches a kernel
    typed fp64, not fp32 as in a plain launch (on an H200 an fp64 log-prob floor once turned the
    scores fp64 and the step failed to compile). Every threshold is now a per-row fp32 tensor
    (α's cut, min-p's zcut), so no kernel signature has a float scalar that could be retyped."""
    variants = cc.all_variants()
    assert len(variants) > 100
    scalars = sorted({f"{v.label}: {name}" for v in variants for name, kind in v.signature
                      if kind in ("fp32", "fp64", "fp16", "bf16")})
    assert not scalars, scalars



# ---- the mixing sums in one order at every tile width -------------------------------------------
@triton.jit
def _mix_probe(logits_ptr, order_ptr, weights_ptr, out_ptr, size, stride,
               M_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr):
    """_mix of one whole-group tile (nothing else), for reading its compiled code."""
    pos = tl.arange(0, M_BLOCK)
    pos_mask = pos < size
    cols = tl.arange(0, BLOCK_V)
    col_mask = cols < stride
    rows = tl.load(order_ptr + pos, mask=pos_mask, other=0)
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :],
                mask=pos_mask[:, None] & col_mask[None, :], other=float("-inf")).to(tl.float32)
    s = _mix(x, x, pos, pos_mask, weights_ptr, 0, 0, size, order_ptr, weights_ptr, logits_ptr, stride,
             cols, col_mask, M_BLOCK, M_BLOCK, M_BLOCK, BLOCK_V, False)
    tl.store(out_ptr + pos[:, None] * BLOCK_V + cols[None, :], s, mask=pos_mask[:, None] & col_mask[None, :])


def _mix_probe_ptx(group: int, width: int, warps: int) -> str:
    """PTX of _mix_probe for sm_90 (run in a process without TRITON_INTERPRET, as compile_check)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(_mix_probe, {"logits_ptr": "*bf16", "order_ptr": "*i32", "weights_ptr": "*fp32",
                                 "out_ptr": "*fp32", "size": "i32", "stride": "i32"},
                    constexprs={"M_BLOCK": group, "BLOCK_V": width})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]


@needs_toolchain
@pytest.mark.parametrize("group", [2, 8, 16])
def test_mixing_has_no_cross_thread_reduction_at_any_tile_width(group):
    """The sample, verify and counting passes tile a group's vocabulary at different widths, and
    each must round a token's score the same way (kernels/README.md, "One score, one rounding"):
    the compiled mixing, at each width a pass uses on a GPU, has no warp shuffle, and below 16
    rows no barrier either (a tl.sum over the group's axis reduced across threads at 32 tokens a
    tile and within a thread at 256, a different order)."""
    tile_v, warps = gs.device.CUDA_TILES[group]
    widths = sorted({tile_v, max(16, 32 * warps // group)})     # sample; counting and verify (launch_config)
    assert len(widths) == 2
    code = ("import importlib.util, json, sys; spec = importlib.util.spec_from_file_location('probe', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "ptx = [m._mix_probe_ptx(*map(int, a.split(','))) for a in sys.argv[2:]]; "
            "print(json.dumps([[p.count('shfl.sync'), p.count('bar.sync')] for p in ptx]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code, __file__, *(f"{group},{w},{warps}" for w in widths)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for width, (shuffles, barriers) in zip(widths, json.loads(done.stdout.strip().splitlines()[-1])):
        assert shuffles == 0, (group, width)
        if group < 16:
            assert barriers == 0, (group, width)
