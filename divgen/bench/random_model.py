"""Real architectures' shapes with random weights, for benchmarks on machines that cannot carry a
checkpoint (a GPU host with no internet and a 64 MiB upload, say).

The tokens such a model writes are meaningless, but its cost per step is the real model's: the
same GEMM shapes, KV-cache bytes and vocabulary. The tokenizer is built in code (bytes, plus one
placeholder token per remaining id so any generated id decodes), so nothing is read from disk.
"""
from __future__ import annotations

import torch

# Public configs of real models (hidden sizes, heads, vocabulary); "tiny" is for CPU smoke runs.
RANDOM_CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
}

SPECIALS = ("<pad>", "<s>", "</s>")          # ids 0, 1, 2: pad, BOS, EOS


def byte_tokenizer(vocab_size: int):
    """A byte-level tokenizer with ``vocab_size`` ids: 3 specials, 256 byte tokens, then
    placeholders ``<tN>`` (never produced by encoding; they exist so generated ids decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(SPECIALS) + len(alphabet):
        raise ValueError(f"a byte tokenizer needs a vocabulary of at least {len(SPECIALS) + len(alphabet)}")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    vocab.update({f"<t{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def random_lm(config: str, *, device: torch.device | str, dtype: torch.dtype, seed: int = 0,
              context_length: int = 4096, layers: int | None = None):
    """A ``LoadedModel`` of ``config``'s shape (a RANDOM_CONFIGS key) with random weights;
    ``layers`` keeps only that many decoder layers (a quicker compile, the same per-layer shapes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from divgen.engine.model import LoadedModel

    if config not in RANDOM_CONFIGS:
        raise ValueError(f"unknown random config {config!r}: use one of {', '.join(RANDOM_CONFIGS)}")
    shape = dict(RANDOM_CONFIGS[config])
    if layers is not None:
        shape["num_hidden_layers"] = min(layers, shape["num_hidden_layers"])
    cfg = LlamaConfig(max_position_embeddings=context_length, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      **shape)
    device = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return LoadedModel(model=model, tokenizer=byte_tokenizer(shape["vocab_size"]), name=f"random-{config}",
                       device=device, dtype=dtype, context_length=context_length, eos_token_ids=frozenset({2}),
                       pad_token_id=0)


def weight_bytes(lm) -> int:
    """Bytes of the parameters one decode step reads: every weight once, except an untied input
    embedding, of which a step reads only its rows' vectors (a tied one is read whole as lm_head)."""
    seen, total = set(), 0
    for p in lm.model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    emb, head = lm.model.get_input_embeddings().weight, lm.model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total
