"""divgen's own Llama-family forward against transformers: logits of tiny random-weight models
of each covered family (Llama 3 with llama3 RoPE scaling, Mistral, Qwen2 with qkv bias, Gemma 3's
text model with sliding and full layers), built offline from configs, and the path each
architecture takes."""
import pytest
import torch

from divgen.engine.kv_cache import KVCache
from divgen.engine.models import ModelArgs, Transformer, fast_forward_for

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    "llama-linear-rope-untied": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=8)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # Gemma 3: a window of 8 < the longest prompt on 3 of 4 layers, the full layer with linear
    # RoPE scaling and its own base, an attention scale from query_pre_attn_scalar != head_dim
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=8, query_pre_attn_scalar=24, tie_word_embeddings=True,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"])),
}


def _gemma_rope_kwargs(config_cls) -> dict:
    """The same RoPE in either config layout: transformers 5's ``rope_parameters`` per layer type,
    or 4.x's ``rope_theta`` + ``rope_scaling`` (full layers) and ``rope_local_base_freq``."""
    import inspect

    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        return dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    return dict(rope_theta=100000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_local_base_freq=10000.0)


def build(name):
    import transformers

    cfg_cls, model_cls, extra = CONFIGS[name]
    config_cls = getattr(transformers, cfg_cls)
    if name == "gemma3":
        extra = {**extra, **_gemma_rope_kwargs(config_cls)}
    cfg = config_cls(**{**COMMON, **extra})
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(cfg).eval()
    if name == "qwen2-bias":  # random init leaves biases at 0: make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    if name == "gemma3":      # norm weights start at 0 (a scale of 1 + 0): make the (1 + w) matter
        for n, w in hf.named_parameters():
            if n.endswith("norm.weight"):
                torch.nn.init.normal_(w, std=0.3)
    ours = Transformer.from_state_dict(ModelArgs.from_config(hf.config.to_dict()), hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.inference_mode()
def test_prefill_then_decode_logits_match_transformers(name):
    hf, ours = build(name)
    torch.manual_seed(1)
    lengths = [13, 5, 20]                       # ragged prompts, in 3 of 4 slots; decode 6 steps each
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]
    a = ours.args
    cache = KVCache(a.n_layers, 4, a.n_kv_heads, 32, a.head_dim, torch.float32, "cpu")
    slots = torch.tensor([3, 0, 1])
    width = max(lengths) - 1
    padded = torch.tensor([p[:-1] + [0] * (width - len(p) + 1) for p in prompts])
    ours.prefill(padded, slots, cache.k, cache.v)
    tokens = torch.zeros(4, dtype=torch.int64)
    pos = torch.zeros(4, dtype=torch.int64)
    tokens[slots] = torch.tensor([p[-1] for p in prompts])
    pos[slots] = torch.tensor(lengths) - 1
    seqs = [list(p) for p in prompts]
    for _ in range(6):
        logits = ours.decode(tokens, pos, cache.k, cache.v)                 # [4, V]
        for i, s in enumerate(slots.tolist()):
            ref = hf(torch.tensor([seqs[i]])).logits[0, -1]
            torch.testing.assert_close(logits[s], ref, atol=2e-4, rtol=1e-4)
            nxt = int(ref.argmax())
            seqs[i].append(nxt)
            tokens[s] = nxt
        pos[slots] += 1


def test_which_architectures_take_the_own_forward():
    assert fast_forward_for({"model_type": "llama"}) and fast_forward_for({"model_type": "qwen2"})
    assert fast_forward_for({"model_type": "mistral"}) and fast_forward_for({"model_type": "gemma3_text"})
    assert not fast_forward_for({"model_type": "gemma2"})
    assert not fast_forward_for({"model_type": "gemma3_text", "final_logit_softcapping": 30.0})
    assert not fast_forward_for({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("name", ["llama3-rope-scaling", "mistral", "gemma3"])   # window of 8 < prefix
@torch.inference_mode()
def test_prefill_after_a_cached_prefix_matches_transformers(name):
    """A prefix prefilled once and copied to other slots, then each row's rest at start > 0 (the
    engine's shared-prefix admission): the next-token logits equal transformers' on the whole prompt."""
    hf, ours = build(name)
    torch.manual_seed(2)
    prefix = torch.randint(0, VOCAB, (11,)).tolist()
    prompts = [prefix + torch.randint(0, VOCAB, (n,)).tolist() for n in (4, 9, 1)]
    a = ours.args
    cache = KVCache(a.n_layers, 4, a.n_kv_heads, 32, a.head_dim, torch.float32, "cpu")
    ours.prefill(torch.tensor([prefix]), torch.tensor([2]), cache.k, cache.v)
    slots = torch.tensor([2, 0, 3])
    cache.k[:, slots[1:], :, :11] = cache.k[:, 2:3, :, :11]
    cache.v[:, slots[1:], :, :11] = cache.v[:, 2:3, :, :11]
    width = max(len(p) for p in prompts) - 1 - 11
    rest = torch.tensor([p[11:-1] + [0] * (width - len(p) + 12) for p in prompts])
    ours.prefill(rest, slots, cache.k, cache.v, start=11)
    tokens = torch.zeros(4, dtype=torch.int64)
    pos = torch.zeros(4, dtype=torch.int64)
    tokens[slots] = torch.tensor([p[-1] for p in prompts])
    pos[slots] = torch.tensor([len(p) - 1 for p in prompts])
    logits = ours.decode(tokens, pos, cache.k, cache.v)
    for i, s in enumerate(slots.tolist()):
        torch.testing.assert_close(logits[s], hf(torch.tensor([prompts[i]])).logits[0, -1], atol=2e-4, rtol=1e-4)


@torch.inference_mode()
def test_gemma3_through_the_engine_equals_the_hf_forward_eager_and_compiled():
    """A tiny Gemma 3 (sliding window 8 < prompt + new tokens) through ``generate``: CorrSynth rows
    sampled with slots freed and refilled give the same tokens on the own forward (eager, and the
    compiled step without a graph break) as on the HF forward."""
    import dataclasses

    from divgen.engine.decode import generate
    from divgen.engine.guidance import Guidance
    from divgen.engine.model import LoadedModel

    hf, _ = build("gemma3")
    lm = LoadedModel(model=hf, tokenizer=None, name="tiny-gemma3", device=torch.device("cpu"), dtype=torch.float32,
                     context_length=256, eos_token_ids=frozenset(range(6, 10)), pad_token_id=0)
    lm.decode = lambda ids: " ".join(map(str, ids))
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(12, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(4, 20, (9,), generator=g)]
    kw = dict(max_new_tokens=12, guidance=Guidance.corrsynth([i // 3 for i in range(9)], g=2.0), temperature=1.0,
              min_p=0.02, seeds=5, max_batch_rows=6)
    assert lm.fast is not None
    eager, stats = generate(lm, ps, compile=False, **kw)
    compiled, _ = generate(lm, ps, compile=True, **kw)
    slow_lm = dataclasses.replace(lm, fast_path=False)
    slow_lm.decode = lm.decode
    slow, _ = generate(slow_lm, ps, **kw)
    ids = lambda rs: [(r.row, r.token_ids, r.finish_reason) for r in rs]     # noqa: E731
    assert ids(eager) == ids(slow)
    assert ids(compiled) == ids(eager)
    assert stats.steps > 12                                    # groups waited for freed slots
