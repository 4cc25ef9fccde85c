"""Multi-LoRA shrink / expand: the Triton kernels (``divgen.kernels.lora_triton``, under the interpreter
on CPU) against the torch reference, and the reference against an independent per-row loop.

Scenarios follow Punica's ``test_sgmv.py``: adapter popularity (all distinct, all identical,
uniform, skewed, some rows without adapter, no row with an adapter) × odd batch sizes × ranks
(and mixed ranks zero-padded to the max). Shapes are not multiples of the kernels' tiles.
"""
import pytest
import torch

from divgen import kernels
from divgen.kernels import lora_triton as lora, reference

from conftest import KERNEL_DEVICE

DEVICE = KERNEL_DEVICE.type     # CUDA tensors on a GPU host, the interpreter (CPU) otherwise

SCENARIOS = ("distinct", "identical", "uniform", "skewed", "some_none", "all_none")
BATCH_SIZES = (1, 3, 7, 33)
RANKS = (4, 8, 16, 64)
DTYPES = (torch.float32, torch.bfloat16)
H_IN, H_OUT = 200, 160          # two H_in tiles and two H_out tiles of 128, both ragged
NUM_ADAPTERS = 4                # L for every scenario but "distinct" (one adapter per row)

# kernel vs reference: the same fp32 arithmetic in another summation order (H_in split in
# 64-wide fp32 K steps), then (for 16-bit y) one rounding that may land one ulp apart.
KERNEL_TOL = {
    torch.float32: dict(atol=5e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-3, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}
# reference vs the fp64 per-row loop: fp32 rounding of sums of ~H_in terms, or one 16-bit rounding.
LOOP_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-3, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}
# The LoRA delta must dwarf these tolerances, or a kernel that adds nothing would pass.
MIN_VISIBLE_DELTA = 0.1

IMPLS = {"reference": reference, "kernel": lora}


# ---------------------------------------------------------------------------------------------
# Problem construction and the independent per-row loop
# ---------------------------------------------------------------------------------------------

def scenario_indices(scenario: str, rows: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Adapter slot per row [rows] int64 and the number of stacked adapters L."""
    if scenario == "distinct":
        return torch.randperm(rows, generator=gen), rows
    num = NUM_ADAPTERS
    if scenario == "identical":
        j = int(torch.randint(0, num, (1,), generator=gen))
        return torch.full((rows,), j, dtype=torch.int64), num
    if scenario == "uniform":
        return torch.randint(0, num, (rows,), generator=gen), num
    if scenario == "skewed":  # Zipf-like: adapter 0 takes most rows
        probs = 1.0 / torch.arange(1, num + 1, dtype=torch.float64) ** 2
        return torch.multinomial(probs, rows, replacement=True, generator=gen), num
    if scenario == "some_none":
        idx = torch.randint(0, num, (rows,), generator=gen)
        none = torch.rand(rows, generator=gen) < 0.4
        none[0] = True
        if rows > 1:
            none[-1] = False
        return torch.where(none, -1, idx), num
    if scenario == "all_none":
        return torch.full((rows,), -1, dtype=torch.int64), num
    raise AssertionError(scenario)


def make_problem(rows, indices, num_adapters, ranks, dtype, *, h_in=H_IN, h_out=H_OUT, seed=0):
    """Random x, y and stacked adapters; adapter j has rank ranks[j], zero-padded to max(ranks)."""
    gen = torch.Generator().manual_seed(seed)
    max_rank = max(ranks)
    x = torch.randn(rows, h_in, generator=gen)
    y = torch.randn(rows, h_out, generator=gen)
    lora_a = torch.zeros(num_adapters, max_rank, h_in)
    lora_b = torch.zeros(num_adapters, h_out, max_rank)
    for j, r in enumerate(ranks):
        lora_a[j, :r] = torch.randn(r, h_in, generator=gen) / h_in ** 0.5
        lora_b[j, :, :r] = torch.randn(h_out, r, generator=gen) / r ** 0.5
    alpha = 2.0 * max_rank
    scales = torch.tensor([alpha / r for r in ranks], dtype=torch.float32) * (0.5 + torch.rand(num_adapters, generator=gen))
    cast = lambda t: t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return dict(y=cast(y), x=cast(x), lora_a=cast(lora_a), lora_b=cast(lora_b),
                indices=indices.to(DEVICE), scales=scales.to(DEVICE))


def per_row_loop(y, x, lora_a, lora_b, indices, scales, ranks) -> torch.Tensor:
    """The semantics, one row at a time in fp64 on each adapter's true (unpadded) rank."""
    out = y.double().clone()
    for i in range(x.shape[0]):
        j = int(indices[i])
        if j < 0:
            continue
        r = ranks[j]
        down = lora_a[j, :r].double() @ x[i].double()                     # [r]
        out[i] += float(scales[j]) * (lora_b[j, :, :r].double() @ down)   # [H_out]
    return out


def run_add_lora(impl, p):
    y = p["y"].clone()
    out = impl.add_lora(y, p["x"], p["lora_a"], p["lora_b"], p["indices"], p["scales"])
    assert out is y, "add_lora must return the y it was given"
    return y


def check_add_lora(p, ranks, dtype):
    """Kernel vs reference, reference vs per-row loop, rows without adapter bit-for-bit."""
    y_ref = run_add_lora(reference, p)
    y_ker = run_add_lora(lora, p)
    expected = per_row_loop(p["y"], p["x"], p["lora_a"], p["lora_b"], p["indices"], p["scales"], ranks)
    torch.testing.assert_close(y_ker.float(), y_ref.float(), **KERNEL_TOL[dtype])
    torch.testing.assert_close(y_ref.double(), expected.to(dtype).double(), **LOOP_TOL[dtype])

    none = p["indices"] < 0
    assert torch.equal(y_ker[none], p["y"][none]), "rows with index -1 must be untouched"
    assert torch.equal(y_ref[none], p["y"][none]), "rows with index -1 must be untouched"
    if (~none).any():
        delta = (expected - p["y"].double())[~none].abs().max()
        assert delta > MIN_VISIBLE_DELTA, "test problem too weak: the LoRA delta is below tolerance"


# ---------------------------------------------------------------------------------------------
# add_lora: popularity scenarios × batch sizes × dtypes, ranks, mixed ranks, prefill, split-K
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", BATCH_SIZES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_add_lora_scenarios(scenario, rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    indices, num_adapters = scenario_indices(scenario, rows, gen)
    ranks = [8] * num_adapters
    p = make_problem(rows, indices, num_adapters, ranks, dtype, seed=rows)
    check_add_lora(p, ranks, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", RANKS)
def test_add_lora_ranks(rank, dtype):
    gen = torch.Generator().manual_seed(rank)
    indices, num_adapters = scenario_indices("some_none", 33, gen)
    ranks = [rank] * num_adapters
    check_add_lora(make_problem(33, indices, num_adapters, ranks, dtype, seed=rank), ranks, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_lora_mixed_ranks_padded(dtype):
    ranks = [4, 16, 8, 64, 2]
    indices = torch.tensor([3, 0, -1, 4, 1, 1, 2, 3, 0, 4, -1, 2, 3])
    check_add_lora(make_problem(13, indices, len(ranks), ranks, dtype, seed=5), ranks, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_lora_prefill_sized_batch(dtype):
    """N = 300 takes the larger row block and splits each adapter's segment over several blocks."""
    gen = torch.Generator().manual_seed(300)
    indices, num_adapters = scenario_indices("skewed", 300, gen)
    indices[::7] = -1
    ranks = [16] * num_adapters
    check_add_lora(make_problem(300, indices, num_adapters, ranks, dtype, h_in=72, h_out=40, seed=3), ranks, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [1, 2, 3, 8])
def test_add_lora_split_k_matches_reference(split_k, dtype):
    """Decode path: H_in split over programs, partials summed by the expand kernel."""
    ranks = [16, 16, 16]
    indices = torch.tensor([2, -1, 0, 2, 1])
    p = make_problem(5, indices, 3, ranks, dtype, h_in=520, h_out=40, seed=split_k)
    y = p["y"].clone()
    lora._add_lora(y, p["x"], p["lora_a"], p["lora_b"], p["indices"], p["scales"], split_k=split_k)
    torch.testing.assert_close(y.float(), run_add_lora(reference, p).float(), **KERNEL_TOL[dtype])
    assert torch.equal(y[1], p["y"][1])


def test_add_lora_fp16():
    ranks = [8, 8, 8]
    indices = torch.tensor([0, 2, -1, 1, 0, 2, 2])
    check_add_lora(make_problem(7, indices, 3, ranks, torch.float16, seed=9), ranks, torch.float16)


# ---------------------------------------------------------------------------------------------
# The halves: shrink and expand on their own
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scenario", ["distinct", "skewed", "some_none", "all_none"])
def test_lora_shrink(scenario, dtype):
    gen = torch.Generator().manual_seed(11)
    indices, num_adapters = scenario_indices(scenario, 7, gen)
    ranks = [16] * num_adapters
    p = make_problem(7, indices, num_adapters, ranks, dtype, seed=11)
    args = (p["x"], p["lora_a"], p["indices"], p["scales"])
    t_ref = reference.lora_shrink(*args)
    t_ker = lora.lora_shrink(*args)
    assert t_ker.shape == (7, 16) and t_ker.dtype == torch.float32
    torch.testing.assert_close(t_ker, t_ref, **KERNEL_TOL[torch.float32])
    expected = torch.zeros(7, 16, dtype=torch.float64)
    for i, j in enumerate(indices.tolist()):
        if j >= 0:
            expected[i] = float(p["scales"][j]) * (p["lora_a"][j].double() @ p["x"][i].double()).cpu()
    torch.testing.assert_close(t_ref.double().cpu(), expected, **LOOP_TOL[torch.float32])
    none = p["indices"] < 0
    assert (t_ker[none] == 0).all() and (t_ref[none] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scenario", ["identical", "uniform", "some_none"])
def test_lora_expand(scenario, dtype):
    gen = torch.Generator().manual_seed(12)
    indices, num_adapters = scenario_indices(scenario, 33, gen)
    ranks = [8] * num_adapters
    p = make_problem(33, indices, num_adapters, ranks, dtype, seed=12)
    t = torch.randn(33, 8, generator=gen).to(DEVICE)
    y_ref = reference.lora_expand(p["y"].clone(), t, p["lora_b"], p["indices"])
    y_ker = p["y"].clone()
    assert lora.lora_expand(y_ker, t, p["lora_b"], p["indices"]) is y_ker
    torch.testing.assert_close(y_ker.float(), y_ref.float(), **KERNEL_TOL[dtype])
    expected = p["y"].double().clone()
    for i, j in enumerate(indices.tolist()):
        if j >= 0:
            expected[i] += p["lora_b"][j].double() @ t[i].double()
    torch.testing.assert_close(y_ref.double(), expected.to(dtype).double(), **LOOP_TOL[dtype])
    none = p["indices"] < 0
    assert torch.equal(y_ker[none], p["y"][none])


# ---------------------------------------------------------------------------------------------
# In-place semantics, strides, empty batches, dispatch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_add_lora_writes_through_strided_views(impl):
    """y a column slice of a wider buffer, x a transposed view: y is updated in place and the
    rest of the buffer is left alone bit-for-bit."""
    ranks = [8, 8]
    indices = torch.tensor([1, -1, 0, 1, 0])
    p = make_problem(5, indices, 2, ranks, torch.float32, h_in=48, h_out=40, seed=21)
    buffer = torch.randn(5, 100, device=DEVICE)
    before = buffer.clone()
    buffer[:, 30:70] = p["y"]
    y_view = buffer[:, 30:70]
    x_t = p["x"].t().contiguous().t()                       # same values, strides (1, N)
    out = IMPLS[impl].add_lora(y_view, x_t, p["lora_a"], p["lora_b"], p["indices"], p["scales"])
    assert out.data_ptr() == y_view.data_ptr()
    expected = per_row_loop(p["y"], p["x"], p["lora_a"], p["lora_b"], indices, p["scales"], ranks)
    torch.testing.assert_close(buffer[:, 30:70].double(), expected, **LOOP_TOL[torch.float32])
    assert torch.equal(buffer[:, :30], before[:, :30]) and torch.equal(buffer[:, 70:], before[:, 70:])
    assert torch.equal(buffer[1, 30:70], p["y"][1])


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    p = make_problem(0, torch.zeros(0, dtype=torch.int64), 2, [4, 4], torch.float32, seed=1)
    y = p["y"]
    assert IMPLS[impl].add_lora(y, p["x"], p["lora_a"], p["lora_b"], p["indices"], p["scales"]) is y
    t = IMPLS[impl].lora_shrink(p["x"], p["lora_a"], p["indices"], p["scales"])
    assert t.shape == (0, 4) and t.dtype == torch.float32


def test_dispatch_matches_reference():
    """``divgen.kernels.add_lora`` (the engine's entry point) gives the reference result."""
    indices = torch.tensor([0, -1, 1])
    p = make_problem(3, indices, 2, [4, 4], torch.float32, seed=2)
    y = p["y"].clone()
    assert kernels.add_lora(y, p["x"], p["lora_a"], p["lora_b"], p["indices"], p["scales"]) is y
    torch.testing.assert_close(y, run_add_lora(reference, p), **KERNEL_TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# Bad arguments: one clear ValueError naming the problem, from both implementations
# ---------------------------------------------------------------------------------------------

def _good():
    return make_problem(4, torch.tensor([0, 1, -1, 1]), 2, [4, 4], torch.float32, h_in=32, h_out=24, seed=4)


BAD_ADD_LORA = {
    "x_not_2d": (lambda p: p.update(x=p["x"][0]), "x must be a 2-D tensor"),
    "x_int": (lambda p: p.update(x=p["x"].long()), "x must be fp32, bf16 or fp16"),
    "h_in_mismatch": (lambda p: p.update(lora_a=p["lora_a"][:, :, :16]), "H_in = 32"),
    "a_dtype": (lambda p: p.update(lora_a=p["lora_a"].bfloat16()), "dtype mismatch: lora_a"),
    "b_dtype": (lambda p: p.update(lora_b=p["lora_b"].half()), "dtype mismatch: lora_b"),
    "y_dtype": (lambda p: p.update(y=p["y"].bfloat16()), "dtype mismatch: y"),
    "y_rows": (lambda p: p.update(y=p["y"][:3]), r"y must be a 2-D tensor \[4, H_out\]"),
    "h_out_mismatch": (lambda p: p.update(lora_b=p["lora_b"][:, :20]), "H_out = 24"),
    "adapter_count": (lambda p: p.update(lora_b=p["lora_b"][:1]), "lora_a stacks 2 adapters but lora_b stacks 1"),
    "rank_mismatch": (lambda p: p.update(lora_b=p["lora_b"][:, :, :2]), "rank mismatch"),
    "index_too_large": (lambda p: p.update(indices=torch.tensor([0, 2, -1, 1], device=DEVICE)), r"indices must be in \[-1, 2\)"),
    "index_below_minus_one": (lambda p: p.update(indices=torch.tensor([0, -2, -1, 1], device=DEVICE)), r"indices must be in \[-1, 2\)"),
    "indices_length": (lambda p: p.update(indices=p["indices"][:3]), r"indices must be a 1-D integer tensor \[4\]"),
    "indices_float": (lambda p: p.update(indices=p["indices"].float()), "indices must be int64"),
    "scales_shape": (lambda p: p.update(scales=p["scales"][:1]), r"scales must be a 1-D tensor \[2\]"),
    "scales_int": (lambda p: p.update(scales=p["scales"].long()), "scales must be a floating tensor"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", BAD_ADD_LORA)
def test_add_lora_rejects_bad_arguments(case, impl):
    p = _good()
    mutate, message = BAD_ADD_LORA[case]
    mutate(p)
    y_before = p["y"].clone() if isinstance(p["y"], torch.Tensor) else None
    with pytest.raises(ValueError, match=message):
        IMPLS[impl].add_lora(p["y"], p["x"], p["lora_a"], p["lora_b"], p["indices"], p["scales"])
    assert torch.equal(p["y"], y_before), "a rejected call must not modify y"


@pytest.mark.parametrize("rows", [3, 40])
def test_plan_built_once_serves_every_layer_call(rows):
    """A plan built once per batch composition gives the plan-less result, launches only tiles
    that hold rows (2 of 64 adapters used: no 64-wide grid), and is refused for another batch."""
    gen = torch.Generator().manual_seed(rows)
    indices = torch.where(torch.rand(rows, generator=gen) < 0.3, -1, torch.randint(5, 7, (rows,), generator=gen))
    p = make_problem(rows, indices, 64, [8] * 64, torch.float32, h_in=48, h_out=40, seed=rows)
    for impl in (reference, lora):
        plan = impl.build_lora_plan(p["indices"], 64)
        assert plan.used == tuple(sorted(set(indices[indices >= 0].tolist())))
        for _ in range(2):                                       # two "layers" reuse the plan
            y = p["y"].clone()
            impl.add_lora(y, p["x"], p["lora_a"], p["lora_b"], p["indices"], p["scales"], plan=plan)
            torch.testing.assert_close(y, run_add_lora(reference, p), **KERNEL_TOL[torch.float32])
        with pytest.raises(ValueError, match="rebuild it"):
            impl.add_lora(p["y"][:2].clone(), p["x"][:2], p["lora_a"], p["lora_b"], p["indices"][:2], p["scales"],
                          plan=plan)
    tiles = lora.build_lora_plan(p["indices"], 64).tiles
    block_m = tiles.block_m
    counts = [int((indices == j).sum()) for j in range(64)]
    assert tiles.count == sum(-(-c // block_m) for c in counts)       # one tile per BLOCK_M rows used
    assert tiles.count <= 2 + rows // block_m


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_expand_rejects_bad_t(impl):
    p = _good()
    with pytest.raises(ValueError, match="t must be fp32"):
        IMPLS[impl].lora_expand(p["y"], torch.zeros(4, 4, dtype=torch.bfloat16, device=DEVICE), p["lora_b"], p["indices"])
    with pytest.raises(ValueError, match=r"t must be a \[4, 4\] tensor"):
        IMPLS[impl].lora_expand(p["y"], torch.zeros(4, 8, device=DEVICE), p["lora_b"], p["indices"])
    with pytest.raises(ValueError, match=r"indices must be in \[-1, 2\)"):
        IMPLS[impl].lora_expand(p["y"], torch.zeros(4, 4, device=DEVICE), p["lora_b"],
                                torch.tensor([0, 5, 0, 0], device=DEVICE))


def test_kernel_rejects_rank_above_one_tile():
    p = make_problem(2, torch.tensor([0, -1]), 1, [130], torch.float32, h_in=16, h_out=16, seed=6)
    with pytest.raises(ValueError, match="ranks up to 128"):
        lora.add_lora(p["y"].clone(), p["x"], p["lora_a"], p["lora_b"], p["indices"], p["scales"])
