"""divgen's own Llama-family forward against transformers: logits of tiny random-weight models
of each covered family (Llama 3 with llama3 RoPE scaling, Mistral, Qwen2 with qkv bias), built
offline from configs, and the path each architecture takes."""
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
}


def build(name):
    import transformers

    cfg_cls, model_cls, extra = CONFIGS[name]
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra)
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(cfg).eval()
    if name == "qwen2-bias":  # random init leaves biases at 0: make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
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
    assert fast_forward_for({"model_type": "mistral"})
    assert not fast_forward_for({"model_type": "gemma3_text"})
    assert not fast_forward_for({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("name", ["llama3-rope-scaling", "mistral"])     # mistral: a window of 8 < prefix
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
