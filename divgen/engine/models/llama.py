"""The Llama-family forward (SmolLM2, Llama 2/3, Mistral, Qwen2/2.5), gpt-fast style.

    args = ModelArgs.from_config(hf_config_dict)
    model = Transformer.from_state_dict(args, state_dict)      # HF parameter names, no copy
    model.setup_rope(max_len)                                  # RoPE tables for the cache length
    model.prefill(tokens [B, T], slots [B], k_cache, v_cache)  # K/V of right-padded prompts into slots
    logits = model.decode(tokens [S], pos [S], k_cache, v_cache)   # one token per slot -> [S, V] fp32

Modules keep the HF parameter names (``model.layers.3.self_attn.q_proj`` ...) so a safetensors
checkpoint or an HF model's ``state_dict()`` loads as is and multi-LoRA wrappers find the same
layer paths. The numerics follow the HF reference (fp32 RMSNorm, ``rotate_half`` RoPE with the
same fp32 tables), so greedy tokens equal ``transformers.generate``.

Decode attention never copies the cache for GQA: the G = heads / kv_heads query heads of one KV
head are laid out as G query rows of that head, and two batched products over views of the
cache (``DecodeIndex.attend``: scores, then values, over the first max(pos) + 1 positions, with a
per-slot length mask) do the whole layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from divgen.engine.models.packed import Gemm, fused_linear

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
        # HF's x * rsqrt(mean(x²) + eps) in fp32, as one kernel (the same bits on CPU in fp32)
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


def _plain(*modules) -> bool:
    """True when every module is a plain ``nn.Linear`` (not wrapped, e.g. by multi-LoRA): then
    their products may run fused on one packed matrix."""
    return all(type(m) is nn.Linear for m in modules)


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
        self._qkv, self._o = Gemm(), Gemm()

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q|k|v side by side [..., (H + 2·KVH)·hd]: one product when the layers are plain."""
        mods = (self.q_proj, self.k_proj, self.v_proj)
        if _plain(*mods):
            return fused_linear(self._qkv, x, mods)
        return torch.cat([m(x) for m in mods], dim=-1)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return fused_linear(self._o, x, (self.o_proj,)) if _plain(self.o_proj) else self.o_proj(x)

    def prefill(self, x, cos, sin, k_cache, v_cache, slots, start: int = 0):
        # x [B, T, dim] at positions start..start+T-1; cos/sin [T, hd]; k/v_cache [S, KVH, L, hd]
        # (this layer), whose slots already hold positions [0, start); slots [B]
        b, t, _ = x.shape
        h, kv, hd = self.n_heads, self.n_kv, self.hd
        qkv = self.qkv(x).view(b, t, h + 2 * kv, hd).transpose(1, 2)          # [B, H+2KVH, T, hd]
        qk = apply_rope(qkv[:, : h + kv], cos, sin)
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv:]
        k_cache[slots, :, start:start + t] = k
        v_cache[slots, :, start:start + t] = v
        if start:                                     # the cached prefix's keys and values too
            k, v = k_cache[slots, :, :start + t], v_cache[slots, :, :start + t]
        g = h // kv
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)    # [B, H, start+T, hd]
        if start or (self.window is not None and t > self.window):
            i = torch.arange(start, start + t, device=x.device)[:, None]       # query positions
            j = torch.arange(start + t, device=x.device)[None, :]              # key positions
            mask = j <= i
            if self.window is not None:
                mask &= j > i - self.window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(out.transpose(1, 2).reshape(b, t, h * hd))

    def decode(self, x, cos, sin, k_cache, v_cache, step):
        # x [S, dim]; cos/sin [S, 1, hd]; k/v_cache [S, KVH, L, hd]; step: the step's DecodeIndex
        s = x.shape[0]
        h, kv, hd = self.n_heads, self.n_kv, self.hd
        qkv = self.qkv(x).view(s, h + 2 * kv, hd)
        qk = apply_rope(qkv[:, : h + kv], cos, sin)                          # q and k in one pass
        q = qk[:, :h].view(s, kv, h // kv, hd)                               # [S, KVH, G, hd]
        step.write(k_cache, qk[:, h:])
        step.write(v_cache, qkv[:, h + kv:])
        out = step.attend(q, k_cache, v_cache)                               # [S, KVH, G, hd]
        return self.out(out.reshape(s, h * hd))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)
        self.inter = args.intermediate_size
        self._gate_up, self._down = Gemm(), Gemm()

    def forward(self, x):
        if _plain(self.gate_proj, self.up_proj):
            gu = fused_linear(self._gate_up, x, (self.gate_proj, self.up_proj))
            gate, up = gu[..., : self.inter], gu[..., self.inter:]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        y = F.silu(gate) * up
        if _plain(self.down_proj):
            return fused_linear(self._down, y, (self.down_proj,))
        return self.down_proj(y)


class DecodeIndex:
    """What every layer of one decode step shares, computed once per step: where each slot's new
    K/V goes, how many cache positions attention reads (``span``) and which of them (``mask``)."""

    def __init__(self, pos: torch.Tensor, kv_heads: int, max_len: int, window: int | None):
        s = pos.shape[0]
        if torch.compiler.is_compiling():
            span = max_len                        # one fixed shape for a compiled step
        else:
            span = min(int(pos.max()) + 1, max_len) if s else 1   # rows read only their live prefix
        self.span = span
        idx = torch.arange(span, device=pos.device)
        mask = idx[None, :] <= pos[:, None]                                   # [S, span]
        if window is not None:
            mask = mask & (idx[None, :] > pos[:, None] - window)
        # additive: 0 where read, -inf elsewhere, [S, 1, 1, span] fp32
        self.mask = torch.zeros(mask.shape, dtype=torch.float32, device=pos.device).masked_fill_(
            ~mask, float("-inf"))[:, None, None, :]
        heads = torch.arange(s * kv_heads, device=pos.device).view(s, kv_heads)
        self.flat = (heads * max_len + pos[:, None]).reshape(-1)              # [S·KVH] rows of the cache
        self.pos, self.rows = pos, torch.arange(s, device=pos.device)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ / √hd + mask) v over the first ``span`` positions: q [S, KVH, G, hd] against
        the cache [S, KVH, L, hd] -> [S, KVH, G, hd]. Two batched products on views of the cache
        (no copy) and an fp32 softmax; measured 2x faster than SDPA's CPU kernel with a mask for
        decode shapes (3 query rows a KV head)."""
        s, kv, g, hd = q.shape
        k = k_cache[:, :, : self.span].reshape(s * kv, self.span, hd)
        v = v_cache[:, :, : self.span].reshape(s * kv, self.span, hd)
        scores = torch.bmm(q.reshape(s * kv, g, hd), k.transpose(1, 2)).view(s, kv, g, self.span)
        probs = torch.softmax(scores.float().mul_(hd ** -0.5).add_(self.mask), dim=-1).to(q.dtype)
        return torch.bmm(probs.view(s * kv, g, self.span), v).view(s, kv, g, hd)

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """cache [S, KVH, L, hd] at (slot, head, pos[slot]) <- new [S, KVH, hd]."""
        if cache.is_contiguous():
            cache.view(-1, cache.shape[-1]).index_copy_(0, self.flat, new.reshape(-1, cache.shape[-1]))
        else:
            cache[self.rows, :, self.pos] = new


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
        self._head = Gemm()

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

    def prefill(self, tokens: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                start: int = 0) -> None:
        """Write the K/V of right-padded prompts ``tokens`` [B, T] (positions start..start+T-1)
        into cache slots ``slots`` [B] of ``k_cache``/``v_cache`` [layers, S, KVH, L, hd]; with
        start > 0 the slots already hold positions [0, start) (a shared prefix), which the new
        positions attend to. Padding positions write values that the decode length mask never
        reads and later decode steps overwrite."""
        t = tokens.shape[1]
        self.setup_rope(start + t)
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        h = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn.prefill(layer.input_layernorm(h), cos, sin, k_cache[i], v_cache[i], slots,
                                            start)
            h = h + layer.mlp(layer.post_attention_layernorm(h))

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """One token per slot: ``tokens`` [S] at positions ``pos`` [S] -> logits [S, V] fp32.
        Slot s attends over its cache positions [0, pos[s]] (and within the sliding window); in
        eager mode attention reads only the first max(pos) + 1 positions of the cache."""
        max_len = k_cache.shape[3]
        self.setup_rope(max_len)
        pos = pos.clamp(max=max_len - 1)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]          # [S, 1, hd]
        step = DecodeIndex(pos, self.args.n_kv_heads, max_len, self.args.sliding_window)
        h = self.model.embed_tokens(tokens)                                # [S, dim]
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn.decode(layer.input_layernorm(h), cos, sin, k_cache[i], v_cache[i], step)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.head(self.model.norm(h)).float()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's logits in the model dtype."""
        if type(self.lm_head) is nn.Linear:
            return fused_linear(self._head, h, (self.lm_head,))
        return self.lm_head(h)
