"""Every kernel variant the wrappers launch compiles for sm_90 and sm_80 — without a GPU — and
fits the target: shared memory within the launch limit, no register spills, bounded instruction
cost per logit. Recipe and the full table: kernels/README.md (``python -m divgen.kernels.compile_check``).

CI budget: the heaviest variant of each class on both targets (~40 compiles in two spawned
workers, ~1-2 min on 2 cores with a cold Triton cache, seconds with a warm one). The variants
left out differ from a compiled one only in a smaller tile or another pointer dtype.
"""
import os

import pytest

from divgen.kernels import compile_check as cc
from divgen.kernels import guided_sample_triton as gs
from divgen.kernels import lora_triton as lo
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

