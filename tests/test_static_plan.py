"""Static sampling plans (kernels/plan.py): fixed shapes whatever the groups, refilled in place.

A compiled decode step (CUDA graphs) must see the same plan object, tensor shapes and addresses
at every step, or torch.compile recompiles and a captured graph reads stale buffers. These tests
check that a static plan samples exactly like the plain plan of the same composition (Triton ops:
the interpreter on CPU, the GPU when there is one; the reference on CPU), that every
composition of a run has the same shapes, and that ``copy_from`` refills in place."""
from __future__ import annotations

import pytest
import torch

from divgen import kernels
from divgen.engine.guidance import Guidance, mix_from_gammas

ROWS, VOCAB = 12, 160


def block_mix(groups: list[list[int]], rows: int = ROWS) -> torch.Tensor:
    """Identity for rows outside the groups, a CorrSynth mix (γ = 1.5 / (n − 1)) inside each."""
    mix = torch.eye(rows)
    for g in groups:
        if len(g) > 1:
            gam = torch.full((len(g), len(g)), 1.5 / (len(g) - 1)).fill_diagonal_(0)
            idx = torch.tensor(g)
            mix[idx[:, None], idx[None, :]] = mix_from_gammas(gam)
    return mix


COMPOSITIONS = {   # what a run of groups of 4 goes through: full, members gone, groups gone, drain
    "full": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
    "members_left": [[0, 2, 3], [4, 5, 6, 7], [9, 11]],
    "interleaved": [[0, 5, 7, 11], [1, 2]],
    "drain": [[3]],
}


def sample(plan, logits, seeds, steps, params, noise):
    return kernels.guided_sample_step(logits, plan, seeds, steps, **params, noise=noise, return_logprobs=True)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("block", [4, 16, 32])
def test_static_plan_samples_like_the_plain_plan(impl, block, kernel_device):
    device = kernel_device if impl == "triton" else torch.device("cpu")
    ops = kernels.ops_for(device, impl)
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(ROWS, VOCAB, generator=g) * 3).to(device)
    seeds = torch.arange(ROWS, dtype=torch.int64, device=device) * 7 + 1
    steps = torch.randint(0, 9, (ROWS,), generator=g).to(device)
    noise = torch.rand(ROWS, VOCAB, generator=g).clamp_min(1e-7).to(device)
    top = block == 4        # the top-k/top-p passes once (the interpreter is slow); the tile paths all
    params = dict(temperature=torch.linspace(0.0, 1.4, ROWS, device=device),
                  alpha=torch.full((ROWS,), 0.01, device=device),
                  top_k=(torch.arange(ROWS, device=device) % 5) * 3 * top,
                  top_p=torch.where((torch.arange(ROWS, device=device) % 3 == 0) & top, 0.85, 1.0))
    first = None
    names = list(COMPOSITIONS) if block < 32 else ["members_left", "drain"]
    for name in names:
        groups = COMPOSITIONS[name]
        mix = block_mix(groups).to(device)
        plain = kernels.build_sample_plan(mix, device, rows=ROWS, ops=ops)
        static = kernels.build_sample_plan(mix, device, rows=ROWS, ops=ops, static_block=block)
        assert static.g_block == block
        want = sample(plain, logits, seeds, steps, params, noise)
        got = sample(static, logits, seeds, steps, params, noise)
        assert torch.equal(got[0], want[0]), name
        assert torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-5, equal_nan=True), name   # mixing order
        shapes = {k: tuple(t.shape) for k, t in static.tensors().items()}
        if first is None:
            first, kept = shapes, static
            addresses = {k: t.data_ptr() for k, t in kept.tensors().items()}
        else:
            assert shapes == first, name                     # one shape for every composition
            assert kept.copy_from(static) is kept            # refilled in place ...
            assert {k: t.data_ptr() for k, t in kept.tensors().items()} == addresses
            again = sample(kept, logits, seeds, steps, params, noise)
            assert torch.equal(again[0], want[0]), name      # ... and samples as the new composition


def test_static_plan_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="does not fit static_block 2"):
        kernels.build_sample_plan(block_mix([[0, 1, 2]]), "cpu", rows=ROWS, static_block=2)
    with pytest.raises(ValueError, match="power of two"):
        kernels.build_sample_plan(block_mix([[0, 1, 2]]), "cpu", rows=ROWS, static_block=3)
    with pytest.raises(ValueError, match="needs rows"):
        kernels.build_sample_plan(None, "cpu", static_block=4)
    a = kernels.build_sample_plan(block_mix([[0, 1]]), "cpu", rows=ROWS, static_block=4)
    with pytest.raises(ValueError, match="same rows and block"):
        a.copy_from(kernels.build_sample_plan(block_mix([[0, 1]]), "cpu", rows=ROWS, static_block=8))
    with pytest.raises(ValueError, match="same rows and block"):
        kernels.build_sample_plan(block_mix([[0, 1]]), "cpu", rows=ROWS).copy_from(a)


def test_guided_plan_keeps_a_mix_when_no_member_contrasts():
    """A guided run keeps a dense mix (identity rows) even when every group is down to one member,
    so the torch step's inputs keep one form for the whole run; unguided runs stay mix-free."""
    from divgen.engine.scheduler import Scheduler
    from divgen.kernels.plan import build_group_plan

    guidance = Guidance.corrsynth([0, 0, 1, 1], g=2.0)
    sched = Scheduler(4, guidance, slots=4)
    for unit in list(sched.pending):
        sched.admit(unit, first_step=0)
    sched.retire(1)
    sched.retire(3)
    assert guidance.weight_blocks(sched.slot_row[:4]) == []
    plan = build_group_plan(guidance.weight_blocks(sched.slot_row[:4]), 4, "cpu", guided=True)
    assert plan.mix is not None and torch.equal(plan.mix, torch.eye(4))
    assert build_group_plan([], 4, "cpu", guided=False).mix is None


@pytest.mark.parametrize("groups", [[[0, 1, 2, 3], [4, 5]], [[1, 3, 5], [0, 2]], [[7], [2, 9, 4, 11]], []])
def test_group_plan_equals_the_plan_of_the_dense_mix(groups):
    """The engine's path (blocks straight from the scheduler) and the direct callers' path (a dense
    mix searched for its groups) give the same plan, tensor for tensor."""
    from divgen.kernels.plan import build_group_plan

    mix = block_mix(groups)
    blocks = []
    for g in sorted((sorted(g) for g in groups if len(g) > 1), key=lambda g: g[0]):
        idx = torch.tensor(g)
        blocks.append((g, mix[idx[:, None], idx[None, :]]))
    for static in (None, 16):
        a = build_group_plan(blocks, ROWS, "cpu", guided=True, static_block=static)
        b = kernels.build_sample_plan(mix, "cpu", rows=ROWS, static_block=static)
        assert a.group_sizes == b.group_sizes
        ta, tb = a.tensors(), b.tensors()
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_static_plan_splits_the_vocabulary_as_for_its_full_groups():
    """R padded tiles, most of them empty: the vocabulary split (programs per tile) follows the
    tiles that work when the run's groups are full, and is the same for every composition."""
    from divgen.kernels import guided_sample_triton as gs

    ops = kernels.ops_for("cpu", "triton")
    full = kernels.build_sample_plan(block_mix(COMPOSITIONS["full"]), "cpu", rows=ROWS, ops=ops, static_block=4)
    drain = kernels.build_sample_plan(block_mix(COMPOSITIONS["drain"]), "cpu", rows=ROWS, ops=ops, static_block=4)
    plain = kernels.build_sample_plan(block_mix(COMPOSITIONS["full"]), "cpu", rows=ROWS, ops=ops)
    assert full.prepared.count == drain.prepared.count == ROWS           # one launch shape
    assert full.prepared.working == drain.prepared.working == plain.prepared.count == 3
    wide = kernels.build_sample_plan(None, "cpu", rows=ROWS, ops=ops, static_block=1)
    assert wide.prepared.working == wide.prepared.count == ROWS
    big = kernels.build_sample_plan(block_mix([list(range(12))]), "cpu", rows=ROWS, ops=ops, static_block=16)
    assert big.prepared.working == 1

def test_static_plan_launches_as_many_vocabulary_chunks_as_the_plain_plan(monkeypatch):
    """On a GPU (launch planning only: no kernel runs) 64 slots in groups of 4 get the chunks of
    16 working tiles (~4 programs an SM), not of the 64 padded ones."""
    from divgen.kernels import guided_sample_triton as gs

    monkeypatch.setattr(gs.step, "_sm_count", lambda index: 132)
    ops = kernels.ops_for("cpu", "triton")
    mix = block_mix([list(range(i, i + 4)) for i in range(0, 64, 4)], rows=64)
    chunks = {}
    for name, block in (("plain", None), ("static", 4)):
        plan = gs.prepare_plan(kernels.build_sample_plan(mix, "cpu", rows=64, ops=gs.step._NoPrepare, static_block=block))
        # planned as on a GPU (the tiles' shape is the CPU one; only the count matters here)
        chunks[name] = gs.launch_config(128256, plan.prepared, torch.device("cuda")).num_chunks
    # ⌈4 · 132 / 16⌉ = 33 asked, rounded to whole 512-token tiles: 32 (padded tiles would give 9)
    assert chunks["static"] == chunks["plain"] == 32


def test_stage_packs_the_host_values_into_one_buffer():
    """A plan's host values reach the device in one copy per dtype: ``stage`` returns views of one
    buffer holding exactly the values given (on CUDA that buffer is copied from pinned memory)."""
    from divgen.kernels.plan import stage

    parts = [[3, 1, 2], torch.tensor([7, 8]), [], [[4, 5], [6, 9]]]
    out = stage(parts, torch.int64, torch.device("cpu"))
    assert [t.tolist() for t in out] == [[3, 1, 2], [7, 8], [], [4, 5, 6, 9]]
    assert all(t.dtype == torch.int64 for t in out)
    base = out[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in out)      # one buffer, split
