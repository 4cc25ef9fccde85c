"""The Llama-family forward (SmolLM2, Llama 2/3, Mistral, Qwen2/2.5), gpt-fast style.

    args = ModelArgs.from_config(hf_config_dict)
    model = Transformer.from_state_dict(args, state_dict)      # HF parameter names, no copy
    model.prefill(tokens [B, T], lengths [B], slots [B], cache)   # K/V of prompts into their slots
    logits = model.decode(tokens [S], pos [S], cache)             # one token per slot -> [S, V]

Modules keep the HF parameter names (``model.layers.3.self_attn.q_proj`` ...) so a safetensors
checkpoint or an HF model's ``state_dict()`` loads as is and multi-LoRA wrappers find the same
layer paths. The numerics follow the HF reference (fp32 RMSNorm, ``rotate_half`` RoPE with the
same fp32 tables, SDPA), so greedy tokens equal ``transformers.generate``.

Decode attention never copies the cache for GQA: the G = heads / kv_heads query heads of one KV
head are laid out as G query rows of that head, so one SDPA call over ``[S, kv_heads, G, D]``
against ``[S, kv_heads, max_len, D]`` with a per-slot length mask does the whole layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# model_type -> attention biases on q/k/v (Qwen2 has them always; Llama/Mistral by config).
SUPPORTED = {"llama": None, "mistral": None, "qwen2": True}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    """The shape of a Llama-family model, read from its HF ``config.json``."""

    vocab_size: int
    dim: int                      # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None     # {"rope_type": "linear"|"llama3", ...} or None
    tie_word_embeddings: bool
    qkv_bias: bool                # Qwen2 (and Llama configs with attention_bias)
    o_bias: bool                  # Llama configs with attention_bias
    mlp_bias: bool
    max_position_embeddings: int
    sliding_window: int | None    # Mistral: attend to at most this many previous positions

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        reason = unsupported_reason(cfg)
        if reason:
            raise ValueError(reason)
        model_type = cfg.get("model_type", "llama")
        heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        rope = _rope_parameters(cfg)
        attention_bias = bool(cfg.get("attention_bias", False))
        qwen = model_type == "qwen2"
        window = cfg.get("sliding_window") if (model_type == "mistral" or cfg.get("use_sliding_window")) else None
        return cls(
            vocab_size=int(cfg["vocab_size"]), dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or dim // heads),
            intermediate_size=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=None if rope.get("rope_type", "default") == "default" else rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qwen or attention_bias, o_bias=attention_bias and not qwen,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            sliding_window=int(window) if window else None,
        )


def _rope_parameters(cfg: dict) -> dict:
    """RoPE settings from either config layout: transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling``. Returns a dict with rope_type, rope_theta and the scaling keys."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    merged = {**scaling, **params}
    if "rope_theta" not in merged and "rope_theta" in cfg:
        merged["rope_theta"] = cfg["rope_theta"]
    merged["rope_type"] = merged.get("rope_type") or merged.get("type") or "default"
    return merged


def unsupported_reason(cfg: dict) -> str | None:
    """Why this config cannot run on the own forward (None when it can)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        return f"architecture {model_type!r} is not in the Llama family ({', '.join(SUPPORTED)})"
    rope_type = _rope_parameters(cfg)["rope_type"]
    if rope_type not in ROPE_TYPES:
        return f"rope type {rope_type!r} is not supported by the own forward ({', '.join(ROPE_TYPES)})"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"activation {cfg.get('hidden_act')!r} is not SwiGLU's silu"
    return None


def fast_forward_for(cfg: dict) -> bool:
    """True when this HF config runs on divgen's own forward."""
    return unsupported_reason(cfg) is None


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] fp32, with the config's scaling (as transformers does)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = args.rope_scaling
    if sc is None:
        return inv_freq
    if sc["rope_type"] == "linear":
        return inv_freq / float(sc["factor"])
    # llama3: long wavelengths divided by the factor, short ones kept, a smooth blend between.
    factor, low, high = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(args: ModelArgs, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] in the model dtype, computed in fp32 like transformers."""
    inv_freq = rope_inv_freq(args).to(device)
    t = torch.arange(max_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)                                   # [L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)                            # [L, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, hd = args.dim, args.head_dim
        self.q_proj = nn.Linear(d, args.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(d, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(d, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * hd, d, bias=args.o_bias)
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.n_kv_heads, hd
        self.window = args.sliding_window

    def prefill(self, x, cos, sin, k_cache, v_cache, slots):
        # x [B, T, dim]; cos/sin [T, hd]; k/v_cache [S, KVH, L, hd] (this layer); slots [B]
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)     # [B, H, T, hd]
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)        # [B, KVH, T, hd]
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache[slots, :, :t] = k
        v_cache[slots, :, :t] = v
        g = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)    # [B, H, T, hd]
        if self.window is not None and t > self.window:
            i = torch.arange(t, device=x.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))

    def decode(self, x, cos, sin, k_cache, v_cache, pos, mask):
        # x [S, dim]; cos/sin [S, hd]; k/v_cache [S, KVH, L, hd]; pos [S]; mask [S, 1, 1, L] bool
        s = x.shape[0]
        g = self.n_heads // self.n_kv
        q = self.q_proj(x).view(s, self.n_kv, g, self.hd)                        # [S, KVH, G, hd]
        k = self.k_proj(x).view(s, self.n_kv, 1, self.hd)
        v = self.v_proj(x).view(s, self.n_kv, 1, self.hd)
        q, k = apply_rope(q, cos[:, None, None], sin[:, None, None]), apply_rope(k, cos[:, None, None], sin[:, None, None])
        rows = torch.arange(s, device=x.device)
        k_cache[rows, :, pos] = k[:, :, 0]
        v_cache[rows, :, pos] = v[:, :, 0]
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)  # [S, KVH, G, hd]
        return self.o_proj(out.reshape(s, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)


class Body(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    """A Llama-family causal LM over a slot-based KV cache (module docstring)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Body(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self._rope_len = 0
        self.cos = self.sin = None

    @classmethod
    def from_state_dict(cls, args: ModelArgs, state_dict: dict) -> "Transformer":
        """Build the model on the tensors of an HF state dict (no copy: the tensors are shared)."""
        with torch.device("meta"):
            model = cls(args)
        sd = dict(state_dict)
        if args.tie_word_embeddings or "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        model.load_state_dict(sd, assign=True, strict=True)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    @classmethod
    def from_pretrained(cls, folder, *, device="cpu", dtype=torch.float32) -> "Transformer":
        """Load from an HF folder (config.json + *.safetensors), e.g. divgen's converted GGUF cache."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        folder = Path(folder)
        args = ModelArgs.from_config(json.loads((folder / "config.json").read_text()))
        sd = {}
        for f in sorted(folder.glob("*.safetensors")):
            sd.update(load_file(str(f), device=str(device)))
        sd = {k: v.to(dtype) for k, v in sd.items()}
        return cls.from_state_dict(args, sd)

    def setup_rope(self, max_len: int) -> None:
        """Precompute RoPE tables for positions [0, max_len)."""
        if max_len <= self._rope_len:
            return
        w = self.model.embed_tokens.weight
        self.cos, self.sin = rope_tables(self.args, max_len, w.device, w.dtype)
        self._rope_len = max_len

    def prefill(self, tokens: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Write the K/V of right-padded prompts ``tokens`` [B, T] (positions 0..T-1) into cache
        slots ``slots`` [B] of ``k_cache``/``v_cache`` [layers, S, KVH, L, hd]. Padding positions
        write values that the decode length mask never reads and later decode steps overwrite."""
        t = tokens.shape[1]
        self.setup_rope(t)
        cos, sin = self.cos[:t], self.sin[:t]
        h = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn.prefill(layer.input_layernorm(h), cos, sin, k_cache[i], v_cache[i], slots)
            h = h + layer.mlp(layer.post_attention_layernorm(h))

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """One token per slot: ``tokens`` [S] at positions ``pos`` [S] -> logits [S, V] fp32.
        Slot s attends over its cache positions [0, pos[s]] (and within the sliding window)."""
        max_len = k_cache.shape[3]
        self.setup_rope(max_len)
        pos = pos.clamp(max=max_len - 1)
        cos, sin = self.cos[pos], self.sin[pos]                          # [S, hd]
        span = torch.arange(max_len, device=tokens.device)
        mask = span[None, :] <= pos[:, None]                               # [S, L]
        if self.args.sliding_window is not None:
            mask = mask & (span[None, :] > pos[:, None] - self.args.sliding_window)
        mask = mask[:, None, None, :]                                      # [S, 1, 1, L]
        h = self.model.embed_tokens(tokens)                                # [S, dim]
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn.decode(layer.input_layernorm(h), cos, sin, k_cache[i], v_cache[i], pos, mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.model.norm(h)).float()
