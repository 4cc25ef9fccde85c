"""The CPU decode step's structure: fused q|k|v and gate|up products on packed weights that follow
in-place weight changes, wrapped layers (multi-LoRA) still called, attention that reads only the
live prefix of the cache, the bf16 option against fp32 (teacher-forced, stated tolerance), and
the bench's GEMM accounting against the model's own parameter count."""
import pytest
import torch
from torch import nn

from divgen.engine.kv_cache import KVCache
from divgen.engine.models import ModelArgs, Transformer

VOCAB = 97


def tiny(bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    hf = (Qwen2ForCausalLM(Qwen2Config(**common)) if bias else LlamaForCausalLM(LlamaConfig(**common))).eval()
    if bias:
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                nn.init.normal_(proj.bias, std=0.5)
    ours = Transformer.from_state_dict(ModelArgs.from_config(hf.config.to_dict()), hf.state_dict())
    return hf, ours


def last_logits(model, seq, max_len=32, poison=False):
    """Prefill seq[:-1] into slot 0, decode seq[-1]: [V] logits."""
    a = model.args
    cache = KVCache(a.n_layers, 1, a.n_kv_heads, max_len, a.head_dim, torch.float32, "cpu")
    if poison:                                   # every position the step must not read
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
    model.prefill(torch.tensor([seq[:-1]]), torch.tensor([0]), cache.k, cache.v)
    return model.decode(torch.tensor([seq[-1]]), torch.tensor([len(seq) - 1]), cache.k, cache.v)[0]


@pytest.mark.parametrize("bias", [False, True])
def test_packed_fused_weights_follow_in_place_changes(bias):
    """A merged adapter changes the HF weights in place: the next step repacks and matches HF."""
    hf, ours = tiny(bias)
    seq = [5, 17, 42, 8, 63, 2]
    with torch.no_grad():
        before = last_logits(ours, seq)
        torch.testing.assert_close(before, hf(torch.tensor([seq])).logits[0, -1], atol=2e-4, rtol=1e-4)
        g = torch.Generator().manual_seed(3)
        for layer in hf.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight += 0.2 * torch.randn(lin.weight.shape, generator=g)
        after = last_logits(ours, seq)
        ref = hf(torch.tensor([seq])).logits[0, -1]
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, ref, atol=2e-4, rtol=1e-4)


def test_wrapped_layers_are_called_not_fused_around():
    """A wrapper on q_proj or up_proj (what multi-LoRA installs) sees every call and its output
    reaches the logits; the other projections keep their fused products."""
    hf, ours = tiny()
    seq = [9, 4, 33, 71]
    calls = []

    class Shift(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            calls.append(tuple(x.shape))
            return self.base(x) + 0.5

    with torch.no_grad():
        plain = last_logits(ours, seq)
        attn, mlp = ours.model.layers[1].self_attn, ours.model.layers[0].mlp
        attn.q_proj, mlp.up_proj = Shift(attn.q_proj), Shift(mlp.up_proj)
        wrapped = last_logits(ours, seq)
        hf.model.layers[1].self_attn.q_proj = Shift(hf.model.layers[1].self_attn.q_proj)
        hf.model.layers[0].mlp.up_proj = Shift(hf.model.layers[0].mlp.up_proj)
        calls.clear()
        wrapped_again = last_logits(ours, seq)
        assert len(calls) == 4                   # prefill + decode, two wrapped layers
        ref = hf(torch.tensor([seq])).logits[0, -1]
    assert (wrapped - plain).abs().max() > 1e-2
    torch.testing.assert_close(wrapped_again, ref, atol=2e-4, rtol=1e-4)


def test_decode_reads_only_the_live_prefix_of_the_cache():
    """Positions past the longest row are never read: NaN there leaves the logits unchanged."""
    _, ours = tiny()
    seq = [3, 14, 15, 92, 65]
    with torch.no_grad():
        clean = last_logits(ours, seq, max_len=64)
        poisoned = last_logits(ours, seq, max_len=64, poison=True)
    assert torch.isfinite(poisoned).all()
    torch.testing.assert_close(poisoned, clean, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_attention_matches_a_float64_softmax_over_each_rows_positions(dtype, monkeypatch):
    """The step's torch attention path (the fallback where the native kernel is not built, and the
    compiled step's; both product orientations: fp32 runs q kᵀ, bf16/fp16 on CPU k qᵀ) against
    softmax(q·k/√d) v in float64 over positions 0..pos of each row, grouped query heads; positions
    past the longest row hold NaN and must not be read. The native kernel: test_cpu_attention.py."""
    from divgen.engine.models import cpu_attention
    from divgen.engine.models.llama import DecodeIndex

    monkeypatch.setattr(cpu_attention, "usable", lambda q: False)

    s, kv, g, hd, max_len = 5, 2, 3, 16, 24
    gen = torch.Generator().manual_seed(7)
    pos = torch.tensor([0, 6, 11, 3, 9])
    k_cache = torch.randn(s, kv, max_len, hd, generator=gen).to(dtype)
    v_cache = torch.randn(s, kv, max_len, hd, generator=gen).to(dtype)
    k_cache[:, :, 12:] = float("nan")
    v_cache[:, :, 12:] = float("nan")
    q = torch.randn(s, kv, g, hd, generator=gen).to(dtype)
    scale = hd ** -0.5
    out = DecodeIndex(pos, kv, max_len, frozenset({None})).attend(q, k_cache, v_cache, scale)
    assert out.shape == (s, kv, g, hd) and out.dtype == dtype
    for row in range(s):
        n = int(pos[row]) + 1
        k, v = k_cache[row, :, :n].double(), v_cache[row, :, :n].double()          # [KVH, n, hd]
        probs = torch.softmax(q[row].double() @ k.transpose(1, 2) * scale, dim=-1)   # [KVH, G, n]
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(out[row].double(), probs @ v, **tol)


def test_step_gemm_flops_count_every_weight_product(embedded_lm):
    from divgen.bench import suite

    params = sum(m.weight.numel() for m in embedded_lm.model.modules() if isinstance(m, nn.Linear))
    if embedded_lm.model.config.tie_word_embeddings:
        assert embedded_lm.model.lm_head in list(embedded_lm.model.modules())
    assert suite.step_gemm_flops(embedded_lm, 16) == 2 * 16 * params
    peak = suite.gemm_peak(embedded_lm, 2, repeats=1)
    assert peak["engine_gflops"] > 0 and peak["dense_gflops"] > 0
    assert peak["peak_gflops"] == max(peak["engine_gflops"], peak["dense_gflops"])


def test_bench_splits_each_step_into_forward_sampler_host(embedded_lm):
    from divgen.bench import suite

    rec = suite.time_decode(embedded_lm, [[300, 301, 302, 303]] * 3, None, 4, seed=0, min_p=0.05)
    split = rec["split"]
    assert split["slots"] == 3 and split["forward_ms"] > 0 and split["sampler_ms"] > 0 and split["host_ms"] >= 0
    # a step's parts fit inside the time between two progress marks (one step each)
    assert split["forward_ms"] + split["sampler_ms"] <= 1e3 * max(rec["token"]) * 1.01
    report = suite.floor_report(embedded_lm, [rec], [suite.gemm_peak(embedded_lm, 3, repeats=1)])
    assert 0 < report["sampler_share"] < 1 and report["forward_peak_share"] > 0


# bf16 against fp32, teacher-forced: at every position of fp32's greedy continuation, bf16's top
# token must equal fp32's in at least AGREE of the positions, and wherever they differ fp32 itself
# must have found the two close (logit gap at most GAP): bf16 changes near-ties only.
AGREE, GAP = 0.90, 1.0
PROMPTS = ["What is the capital of France?", "Write one sentence about autumn leaves.",
           "Name three fruits.", "Explain why the sky is blue."]


@pytest.mark.slow
def test_bf16_tokens_within_tolerance_of_fp32(embedded_lm):
    from divgen.engine.decode import generate
    from divgen.engine.model import load_model

    bf16 = load_model(None, device="cpu", dtype="bfloat16")
    assert bf16.fast.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    prompts = [embedded_lm.format_prompt(p) for p in PROMPTS]
    fp32_out, _ = generate(embedded_lm, prompts, max_new_tokens=24, temperature=0.0, ignore_eos=True)
    agree = total = 0
    with torch.inference_mode():
        for prompt, res in zip(prompts, fp32_out):
            ids = embedded_lm.encode(prompt)
            seq = ids + res.token_ids
            for model_lm, logits_out in ((embedded_lm, []), (bf16, [])):
                m, a = model_lm.fast, model_lm.fast.args
                cache = KVCache(a.n_layers, 1, a.n_kv_heads, 128, a.head_dim, model_lm.dtype, "cpu")
                m.prefill(torch.tensor([ids[:-1]]), torch.tensor([0]), cache.k, cache.v)
                for pos in range(len(ids) - 1, len(seq) - 1):
                    logits_out.append(m.decode(torch.tensor([seq[pos]]), torch.tensor([pos]), cache.k, cache.v)[0])
                if model_lm is embedded_lm:
                    ref = logits_out
                else:
                    got = logits_out
            for want_logits, have_logits, token in zip(ref, got, res.token_ids):
                assert int(want_logits.argmax()) == token        # teacher forcing reproduces fp32's greedy run
                pick = int(have_logits.argmax())
                total += 1
                if pick == token:
                    agree += 1
                else:
                    assert float(want_logits[token] - want_logits[pick]) <= GAP
    assert agree / total >= AGREE, f"bf16 top token equals fp32's at {agree}/{total} positions"
