"""The native CPU GEMM kernel (divgen/engine/models/cpu_gemm.cpp) against x·Wᵀ + b in float64: every
row-block and column-panel tail, odd K for bf16's pairs, batched inputs, bias, two threads; its
clear refusals; the decode step's path choice (native, oneDNN, dense) and what happens when the
kernel cannot be built."""
from __future__ import annotations

import pytest
import torch

from divgen.engine.models import cpu_gemm, packed

built = pytest.mark.skipif(cpu_gemm.ops() is None,
                           reason=f"the CPU GEMM kernel did not build ({cpu_gemm.LIBRARY.state.get('error')})")


def need(dtype):
    if not cpu_gemm.supports(dtype):
        pytest.skip(f"this CPU build has no {dtype} kernel")


def reference(x, w, b):
    """float64 product of the (already rounded) inputs."""
    out = x.double() @ w.double().T
    return out + b.double() if b is not None else out


def check(y, ref, dtype, k):
    assert y.dtype == dtype and y.shape == ref.shape
    scale = ref.abs().max().item() + 1e-30
    if dtype == torch.float32:
        # fp32 accumulation over k terms of unit size: error ~ k·2⁻²⁴ of the largest partial sum
        tol = 4 * k * 2.0 ** -24
    else:
        # fp32 accumulation, then one rounding of the output to bf16 (relative 2⁻⁹ of each value)
        tol = 4 * k * 2.0 ** -24
        torch.testing.assert_close(y.double(), ref, atol=scale * tol, rtol=2.0 ** -8)
        return
    assert ((y.double() - ref).abs().max().item()) <= scale * tol


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 5, 3), (3, 17, 33), (7, 64, 31), (8, 64, 32), (9, 576, 960),
                                   (16, 129, 64), (17, 1535, 70), (64, 33, 95), (130, 64, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(dtype, m, k, n, with_bias):
    need(dtype)
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y = cpu_gemm.linear(x, cpu_gemm.pack(w), n, b)
    check(y, reference(x, w, b), dtype, k)


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_and_strided_inputs_and_two_threads(dtype):
    need(dtype)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(100, 48, generator=g).to(dtype)
    p = cpu_gemm.pack(w)
    x3 = torch.randn(2, 5, 96, generator=g).to(dtype)[..., ::2]          # [2, 5, 48], not contiguous
    y = cpu_gemm.linear(x3, p, 100, None)
    assert y.shape == (2, 5, 100)
    check(y.reshape(10, 100), reference(x3.reshape(10, 48), w, None), dtype, 48)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemm.linear(x3, p, 100, None)
        torch.set_num_threads(2)
        two = cpu_gemm.linear(x3, p, 100, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)                      # a panel is one thread's, in K order either way
    assert cpu_gemm.linear(x3[:0], p, 100, None).shape == (0, 5, 100)


@built
def test_refuses_mismatched_inputs_in_one_line():
    need(torch.float32)
    w = torch.randn(40, 24)
    p = cpu_gemm.pack(w)
    with pytest.raises(RuntimeError, match="activations have 25 features but the weight was packed for 24"):
        cpu_gemm.linear(torch.randn(2, 25), p, 40, None)
    with pytest.raises(RuntimeError, match="40 output columns|do not match"):
        cpu_gemm.linear(torch.randn(2, 24), p, 70, None)
    with pytest.raises(RuntimeError, match="was not packed by gemm_pack"):
        cpu_gemm.linear(torch.randn(2, 24), w, 40, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        cpu_gemm.linear(torch.randn(2, 24), p, 40, torch.zeros(3))
    with pytest.raises(RuntimeError, match="no kernel for Half"):
        cpu_gemm.pack(w.half())
    if cpu_gemm.supports(torch.bfloat16):
        with pytest.raises(RuntimeError, match="activations are BFloat16 but the packed weight is Float"):
            cpu_gemm.linear(torch.randn(2, 24).bfloat16(), p, 40, None)


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_class_takes_the_native_path_and_repacks_on_change(dtype):
    need(dtype)
    if packed.FORCED not in (None, "native"):
        pytest.skip(f"DIVGEN_GEMM={packed.FORCED}")
    assert packed.path_for(dtype) == "native"
    g = torch.Generator().manual_seed(1)
    lins = [torch.nn.Linear(32, 48, bias=True).to(dtype), torch.nn.Linear(32, 16, bias=False).to(dtype)]
    gemm = packed.Gemm()
    x = torch.randn(5, 32, generator=g).to(dtype)
    ref = torch.cat([torch.nn.functional.linear(x.double(), m.weight.double(),
                                                m.bias.double() if m.bias is not None else None) for m in lins], -1)
    with torch.no_grad():
        check(packed.fused_linear(gemm, x, lins), ref, dtype, 32)
        assert gemm._native
        lins[1].weight.mul_(-2)                       # in place: the version counter moves
        ref[:, 48:] *= -2
        check(packed.fused_linear(gemm, x, lins), ref, dtype, 32)


def test_a_failed_build_falls_back_to_onednn_with_one_line(monkeypatch, capsys):
    def broken():
        raise RuntimeError("Error building extension\nfoo.cpp:1:1: error: no compiler here\nninja: build stopped")

    monkeypatch.setattr(cpu_gemm.LIBRARY, "state", {})
    monkeypatch.setattr(cpu_gemm.LIBRARY, "build", broken)
    monkeypatch.setattr(packed, "_PATHS", {})
    monkeypatch.setattr(packed, "FORCED", None)
    assert cpu_gemm.ops() is None and cpu_gemm.ops() is None          # said once, not tried again
    assert not cpu_gemm.supports(torch.float32)
    expected = "packed" if torch.backends.mkldnn.is_available() else "dense"
    assert packed.path_for(torch.float32) == expected
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: no compiler here" in err[0] and "DIVGEN_GEMM=packed" in err[0]

    lin = torch.nn.Linear(24, 10)                     # and the products still come out right
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(packed.fused_linear(packed.Gemm(), x, [lin]), lin(x), atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(packed, "_PATHS", {})
    monkeypatch.setattr(packed, "FORCED", "native")
    with pytest.raises(RuntimeError, match="DIVGEN_GEMM=native but the CPU GEMM kernel did not build"):
        packed.path_for(torch.float32)


def test_forced_paths(monkeypatch):
    monkeypatch.setattr(packed, "_PATHS", {})
    monkeypatch.setattr(packed, "FORCED", "dense")
    assert packed.path_for(torch.float32) == "dense" and not packed.packing_available(torch.zeros(2, 2))
    monkeypatch.setattr(packed, "_PATHS", {})
    monkeypatch.setattr(packed, "FORCED", "packed")
    if torch.backends.mkldnn.is_available():
        assert packed.path_for(torch.float32) == "packed"
    assert packed.path_for(torch.float16) == "dense"
    monkeypatch.setenv("DIVGEN_GEMM", "fast")
    with pytest.raises(ValueError, match="'fast' is not a GEMM path: use native or packed or dense"):
        packed._forced_path()


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("shape", [(1, 7), (3, 576), (2, 5, 640), (16, 33)])
def test_rms_norm_matches_the_torch_code(dtype, unit_offset, shape):
    """The native RMSNorm against llama.RMSNorm's torch code (its autograd path): fp32 to a few
    ulps, bf16 to one rounding step of the output."""
    from divgen.engine.models.llama import RMSNorm

    g = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], 1e-6, unit_offset).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    with torch.no_grad():
        assert cpu_gemm.norm_usable(x, norm.weight)
        ours = norm(x)
    ref = norm(x)                                     # grad enabled: the torch code runs
    assert not cpu_gemm.norm_usable(x, norm.weight)
    assert ours.dtype == ref.dtype == dtype and ours.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref.detach(), atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(ours.float(), ref.detach().float(), atol=2e-2, rtol=2 ** -7)
