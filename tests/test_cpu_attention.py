"""The native CPU decode attention (divgen/engine/models/cpu_attention.cpp) against softmax(q·k·scale) v
in float64 over exactly the positions each slot attends to, with NaN everywhere else in the cache;
the decode step's tokens with it and with the torch path; and what happens when it cannot be built."""
from __future__ import annotations

import pytest
import torch

from divgen.engine.models import cpu_attention

native = pytest.mark.skipif(cpu_attention.native_op() is None,
                            reason=f"the CPU attention kernel did not build ({cpu_attention.LIBRARY.state.get('error')})")


def reference(q, k_cache, v_cache, pos, window, scale):
    s, kv, g, hd = q.shape
    out = torch.empty(q.shape, dtype=torch.float64)
    for row in range(s):
        p = int(pos[row])
        lo = max(0, p - window + 1) if window else 0
        k, v = k_cache[row, :, lo:p + 1].double(), v_cache[row, :, lo:p + 1].double()      # [KVH, n, hd]
        probs = torch.softmax(q[row].double() @ k.transpose(1, 2) * scale, dim=-1)        # [KVH, G, n]
        out[row] = probs @ v
    return out


def poisoned_cache(s, kv, max_len, hd, pos, window, dtype, gen):
    """Random K and V where each slot attends, NaN at every other position of the slot."""
    k = torch.randn(s, kv, max_len, hd, generator=gen)
    v = torch.randn(s, kv, max_len, hd, generator=gen)
    for row in range(s):
        p = int(pos[row])
        lo = max(0, p - window + 1) if window else 0
        for t in (k, v):
            t[row, :, :lo] = float("nan")
            t[row, :, p + 1:] = float("nan")
    return k.to(dtype), v.to(dtype)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv,g,hd,window", [
    (3, 3, 64, None),      # SmolLM2-135M: the vector path
    (1, 4, 256, 7),        # Gemma 3 270M, a sliding window shorter than the rows
    (2, 8, 128, None),     # the largest group of the vector path
    (2, 9, 64, None),      # a larger group: the generic path
    (2, 2, 40, 3),         # a head size off the vector widths: the generic path
    (1, 1, 16, None),
])
def test_native_attention_matches_float64_over_exactly_the_attended_positions(dtype, kv, g, hd, window):
    gen = torch.Generator().manual_seed(hd * 31 + g)
    s, max_len = 6, 41
    pos = torch.tensor([0, 40, 17, 1, 33, 16])                # one at 0, one at the last position
    k_cache, v_cache = poisoned_cache(s, kv, max_len, hd, pos, window, dtype, gen)
    q = (torch.randn(s, kv, g, hd, generator=gen) * 2).to(dtype)
    scale = hd ** -0.5
    out = cpu_attention.decode_attention(q, k_cache, v_cache, pos, window, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), reference(q, k_cache, v_cache, pos, window, scale), **tol)


@native
def test_native_attention_takes_strided_views_and_peaked_scores():
    """q a view with gaps between rows (as the step's q|k|v split gives), the cache a slice of a larger
    buffer; scores far apart (the softmax's max and its clamp at e^-87 matter)."""
    gen = torch.Generator().manual_seed(3)
    s, kv, g, hd, max_len = 4, 2, 3, 64, 30
    pos = torch.tensor([29, 5, 12, 0])
    big_k = torch.randn(s, kv + 1, max_len + 5, hd, generator=gen)
    big_v = torch.randn(s, kv + 1, max_len + 5, hd, generator=gen)
    k_cache, v_cache = big_k[:, 1:, :max_len], big_v[:, 1:, :max_len]
    qkv = torch.randn(s, kv * g + 2 * kv, hd, generator=gen) * 40                # scores of ±hundreds
    q = qkv[:, : kv * g].view(s, kv, g, hd)
    assert not q.is_contiguous() or not k_cache.is_contiguous()
    out = cpu_attention.decode_attention(q, k_cache, v_cache, pos, None, hd ** -0.5)
    torch.testing.assert_close(out.double(), reference(q, k_cache, v_cache, pos, None, hd ** -0.5),
                               atol=2e-6, rtol=2e-6)


@native
def test_native_attention_refuses_positions_outside_the_cache():
    q = torch.zeros(2, 1, 1, 16)
    cache = torch.zeros(2, 1, 8, 16)
    with pytest.raises(RuntimeError, match="slot 1 is at position 8"):
        cpu_attention.decode_attention(q, cache, cache, torch.tensor([0, 8]), None, 1.0)


@native
@pytest.mark.parametrize("window", [None, 4])
def test_decode_step_with_the_native_attention_gives_the_torch_paths_logits(monkeypatch, window):
    """A tiny Llama (head size 64: the vector path) decoding four slots of different lengths at once:
    the logits with the native kernel equal those of the two batched products (fp32, to rounding),
    and the kernel is what ran."""
    from divgen.engine.kv_cache import KVCache
    from divgen.engine.models import ModelArgs, Transformer

    torch.manual_seed(0)
    cfg = dict(vocab_size=97, hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, model_type="mistral" if window else "llama")
    if window:
        cfg["sliding_window"] = window
    args = ModelArgs.from_config(cfg)
    assert args.head_dim == 64 and args.window(0) == window
    model = Transformer(args).eval()
    for t in model.parameters():
        torch.nn.init.normal_(t, std=0.3)
    seqs = [[5, 9, 2, 7, 1, 8], [3], [4, 4, 6, 10, 11, 12, 13, 14, 15, 16], [20, 21]]

    def step_logits():
        cache = KVCache(args.n_layers, len(seqs), args.n_kv_heads, 24, args.head_dim, torch.float32, "cpu")
        for slot, seq in enumerate(seqs):
            if len(seq) > 1:
                model.prefill(torch.tensor([seq[:-1]]), torch.tensor([slot]), cache.k, cache.v)
        return model.decode(torch.tensor([seq[-1] for seq in seqs]), torch.tensor([len(seq) - 1 for seq in seqs]),
                            cache.k, cache.v)

    calls = []
    real = cpu_attention.decode_attention
    monkeypatch.setattr(cpu_attention, "decode_attention", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        native_logits = step_logits()
        assert len(calls) == args.n_layers
        monkeypatch.setattr(cpu_attention, "usable", lambda q: False)
        torch_logits = step_logits()
    assert len(calls) == args.n_layers
    torch.testing.assert_close(native_logits, torch_logits, atol=2e-5, rtol=2e-5)


def test_a_failed_build_falls_back_to_the_torch_path_with_one_line(monkeypatch, capsys):
    def broken():
        raise RuntimeError("Error building extension\nfoo.cpp:1:1: error: no compiler here\nninja: build stopped")

    monkeypatch.setattr(cpu_attention.LIBRARY, "state", {})
    monkeypatch.setattr(cpu_attention.LIBRARY, "build", broken)
    monkeypatch.delenv("DIVGEN_CPU_ATTENTION", raising=False)
    assert cpu_attention.native_op() is None
    assert cpu_attention.native_op() is None                     # said once, not tried again
    assert not cpu_attention.usable(torch.zeros(1, 1, 1, 16))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: no compiler here" in err[0] and "DIVGEN_CPU_ATTENTION=torch" in err[0]

    monkeypatch.setattr(cpu_attention.LIBRARY, "state", {})
    monkeypatch.setenv("DIVGEN_CPU_ATTENTION", "native")
    with pytest.raises(RuntimeError, match="DIVGEN_CPU_ATTENTION=native but"):
        cpu_attention.native_op()

    monkeypatch.setattr(cpu_attention.LIBRARY, "state", {})
    monkeypatch.setenv("DIVGEN_CPU_ATTENTION", "torch")
    assert cpu_attention.native_op() is None and capsys.readouterr().err == ""

    monkeypatch.setattr(cpu_attention.LIBRARY, "state", {})
    monkeypatch.setenv("DIVGEN_CPU_ATTENTION", "fast")
    with pytest.raises(ValueError, match="'fast' is not one of auto, native, torch"):
        cpu_attention.native_op()
