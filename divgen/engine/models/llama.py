"""The Llama-family forward (SmolLM2, Llama 2/3, Mistral, Qwen2/2.5, and Gemma 3's text model),
gpt-fast style.

    args = ModelArgs.from_config(hf_config_dict)
    model = Transformer.from_state_dict(args, state_dict)      # HF parameter names, no copy
    model.setup_rope(max_len)                                  # RoPE tables for the cache length
    model.prefill(tokens [B, T], slots [B], k_cache, v_cache)  # K/V of right-padded prompts into slots
    logits = model.decode(tokens [S], pos [S], k_cache, v_cache)   # one token per slot -> [S, V] fp32

Modules keep the HF parameter names (``model.layers.3.self_attn.q_proj`` ...) so a safetensors
checkpoint or an HF model's ``state_dict()`` loads as is and multi-LoRA wrappers find the same
layer paths. The numerics follow the HF reference (fp32 RMSNorm, ``rotate_half`` RoPE with the
same fp32 tables), so greedy tokens equal ``transformers.generate``.

Gemma 3 (``gemma3_text``) is the same skeleton with a few switches, all read from its config:
the embeddings scaled by √hidden, RMSNorm weights applied as (1 + w) in fp32, RMSNorm on each
head's queries and keys before RoPE, a norm after attention and after the MLP as well as before
each ("sandwich"), GeGLU (tanh GELU), an attention scale of ``query_pre_attn_scalar`` ** -0.5, and
per layer either full attention (RoPE base ``rope_theta``) or a sliding window (its own base).
Every layer keeps the whole cache length; a sliding layer's mask reads only its window.

Decode attention never copies the cache for GQA: the G = heads / kv_heads query heads of one KV
head are laid out as G query rows of that head, and two batched products over views of the
cache (``DecodeIndex.attend``: scores, then values, over the first max(pos) + 1 positions, with a
per-slot length mask) do the whole layer. In fp32 they read the strided views directly; oneDNN's
bf16 products take only dense batches, so they copy the live slice (scores run as k qᵀ there, which
at least avoids a second copy of K's transpose).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from divgen.engine.models import cpu_attention, cpu_gemm
from divgen.engine.models.packed import Gemm, fused_linear

# model_type -> attention biases on q/k/v (Qwen2 has them always; Llama/Mistral by config).
SUPPORTED = {"llama": None, "mistral": None, "qwen2": True, "gemma3_text": None}
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
GEMMA = ("gemma3_text",)


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
    sliding_window: int | None    # Mistral, Gemma 3: attend to at most this many previous positions
    # Per layer: True where the layer attends within ``sliding_window`` only (Mistral: every layer).
    layer_sliding: tuple = ()
    # RoPE of the sliding layers when it differs from the full layers' (Gemma 3's local base).
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None
    activation: str = "silu"
    gemma_norms: bool = False     # (1 + w) RMSNorm weights, q/k norms, sandwich norms
    embed_scale: float | None = None
    attn_scale: float | None = None   # None: head_dim ** -0.5

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_sliding and self.layer_sliding[layer] else None

    @property
    def windows(self) -> frozenset:
        """The attention windows the layers use (None: full attention)."""
        return frozenset(self.window(i) for i in range(self.n_layers))

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        reason = unsupported_reason(cfg)
        if reason:
            raise ValueError(reason)
        model_type = cfg.get("model_type", "llama")
        heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        rope, local = _rope_parameters(cfg), None
        attention_bias = bool(cfg.get("attention_bias", False))
        qwen = model_type == "qwen2"
        gemma = model_type in GEMMA
        window = cfg.get("sliding_window") if (model_type == "mistral" or cfg.get("use_sliding_window") or gemma) else None
        sliding = (True,) * layers if window else ()
        extra = {}
        if gemma:
            sliding = tuple(t == "sliding_attention" for t in _gemma_layer_types(cfg, layers))
            rope, local = _gemma_rope(cfg)
            extra = dict(activation=cfg.get("hidden_activation") or "gelu_pytorch_tanh", gemma_norms=True,
                         embed_scale=dim ** 0.5, attn_scale=float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5,
                         local_rope_theta=float(local.get("rope_theta", 10000.0)),
                         local_rope_scaling=None if local.get("rope_type", "default") == "default" else local)
        return cls(
            vocab_size=int(cfg["vocab_size"]), dim=dim, n_layers=layers, n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or dim // heads),
            intermediate_size=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=None if rope.get("rope_type", "default") == "default" else rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qwen or attention_bias, o_bias=attention_bias and not qwen,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            sliding_window=int(window) if window else None, layer_sliding=sliding if window else (),
            **extra,
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


def _gemma_layer_types(cfg: dict, layers: int) -> list[str]:
    """Gemma 3's per-layer attention kinds: ``layer_types``, or (older configs) every
    ``sliding_window_pattern``-th layer full and the rest sliding."""
    types = cfg.get("layer_types")
    if types:
        return list(types)[:layers]
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


def _gemma_rope(cfg: dict) -> tuple[dict, dict]:
    """(full layers' RoPE, sliding layers' RoPE) from either config layout: transformers 5's
    ``rope_parameters`` keyed by layer type, or ``rope_theta`` + ``rope_scaling`` (full layers) and
    ``rope_local_base_freq`` (sliding layers, unscaled)."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = _rope_parameters(cfg)
        local = {"rope_theta": float(cfg.get("rope_local_base_freq", 10000.0))}
    for p in (full, local):
        p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
        p.setdefault("rope_theta", 10000.0)
    return full, local


def unsupported_reason(cfg: dict) -> str | None:
    """Why this config cannot run on the own forward (None when it can)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        return f"architecture {model_type!r} is not in the Llama family or Gemma 3 ({', '.join(SUPPORTED)})"
    ropes = _gemma_rope(cfg) if model_type in GEMMA else (_rope_parameters(cfg),)
    for rope in ropes:
        if rope["rope_type"] not in ROPE_TYPES:
            return f"rope type {rope['rope_type']!r} is not supported by the own forward ({', '.join(ROPE_TYPES)})"
    if model_type in GEMMA:
        act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in ACTIVATIONS:
            return f"activation {act!r} is not supported by the own forward ({', '.join(ACTIVATIONS)})"
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if cfg.get(cap) is not None:
                return f"{cap} is not supported by the own forward"
        if cfg.get("use_bidirectional_attention"):
            return "bidirectional attention is not a causal LM's decode"
    elif cfg.get("hidden_act", "silu") != "silu":
        return f"activation {cfg.get('hidden_act')!r} is not SwiGLU's silu"
    return None


def fast_forward_for(cfg: dict) -> bool:
    """True when this HF config runs on divgen's own forward."""
    return unsupported_reason(cfg) is None


def rope_inv_freq(args: ModelArgs, local: bool = False) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] fp32, with the config's scaling (as transformers does);
    ``local``: the sliding layers' RoPE where the model has its own for them (Gemma 3)."""
    d = args.head_dim
    theta, sc = (args.local_rope_theta, args.local_rope_scaling) if local else (args.rope_theta, args.rope_scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
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


def rope_tables(args: ModelArgs, max_len: int, device, dtype, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] in the model dtype, computed in fp32 like transformers."""
    inv_freq = rope_inv_freq(args, local).to(device)
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
    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype and cpu_gemm.norm_usable(x, self.weight):
            return cpu_gemm.rms_norm(x, self.weight, self.eps, self.unit_offset)     # one pass, same math
        # HF's x * rsqrt(mean(x²) + eps) in fp32, as one kernel (the same bits on CPU in fp32)
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:              # Gemma: (x̂ · (1 + w)) in fp32, then the model dtype
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def _plain(*modules) -> bool:
    """True when every module is a plain ``nn.Linear`` (not wrapped, e.g. by multi-LoRA): then
    their products may run fused on one packed matrix."""
    return all(type(m) is nn.Linear for m in modules)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        d, hd = args.dim, args.head_dim
        self.q_proj = nn.Linear(d, args.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(d, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(d, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * hd, d, bias=args.o_bias)
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.n_kv_heads, hd
        self.window = args.window(layer)
        self.scale = args.scale
        self.qk_norm = args.gemma_norms
        if self.qk_norm:                  # Gemma 3: RMSNorm over each head's q and k, before RoPE
            self.q_norm = RMSNorm(hd, args.norm_eps, unit_offset=True)
            self.k_norm = RMSNorm(hd, args.norm_eps, unit_offset=True)
        self._qkv, self._o = Gemm(), Gemm()

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q|k|v side by side [..., (H + 2·KVH)·hd]: one product when the layers are plain."""
        mods = (self.q_proj, self.k_proj, self.v_proj)
        if _plain(*mods):
            return fused_linear(self._qkv, x, mods)
        return torch.cat([m(x) for m in mods], dim=-1)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return fused_linear(self._o, x, (self.o_proj,)) if _plain(self.o_proj) else self.o_proj(x)

    def rope_qk(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_axis: int) -> torch.Tensor:
        """RoPE on q|k side by side (heads on ``head_axis``: H query heads, then KVH key heads),
        after the per-head q/k norms where the model has them."""
        if self.qk_norm:
            h = self.n_heads
            qk = torch.cat((self.q_norm(qk.narrow(head_axis, 0, h)),
                            self.k_norm(qk.narrow(head_axis, h, self.n_kv))), dim=head_axis)
        return apply_rope(qk, cos, sin)

    def prefill(self, x, cos, sin, k_cache, v_cache, slots, start: int = 0):
        # x [B, T, dim] at positions start..start+T-1; cos/sin [T, hd]; k/v_cache [S, KVH, L, hd]
        # (this layer), whose slots already hold positions [0, start); slots [B]
        b, t, _ = x.shape
        h, kv, hd = self.n_heads, self.n_kv, self.hd
        qkv = self.qkv(x).view(b, t, h + 2 * kv, hd).transpose(1, 2)          # [B, H+2KVH, T, hd]
        qk = self.rope_qk(qkv[:, : h + kv], cos, sin, 1)
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
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.out(out.transpose(1, 2).reshape(b, t, h * hd))

    def decode(self, x, cos, sin, k_cache, v_cache, step):
        # x [S, dim]; cos/sin [S, 1, hd]; k/v_cache [S, KVH, L, hd]; step: the step's DecodeIndex
        s = x.shape[0]
        h, kv, hd = self.n_heads, self.n_kv, self.hd
        qkv = self.qkv(x).view(s, h + 2 * kv, hd)
        qk = self.rope_qk(qkv[:, : h + kv], cos, sin, 1)                     # q and k in one pass
        q = qk[:, :h].view(s, kv, h // kv, hd)                               # [S, KVH, G, hd]
        step.write(k_cache, qk[:, h:])
        step.write(v_cache, qkv[:, h + kv:])
        out = step.attend(q, k_cache, v_cache, self.scale, self.window)      # [S, KVH, G, hd]
        return self.out(out.reshape(s, h * hd))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)
        self.inter = args.intermediate_size
        self.act = ACTIVATIONS[args.activation]
        self._gate_up, self._down = Gemm(), Gemm()

    def forward(self, x):
        if _plain(self.gate_proj, self.up_proj):
            gu = fused_linear(self._gate_up, x, (self.gate_proj, self.up_proj))
            gate, up = gu[..., : self.inter], gu[..., self.inter:]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        y = self.act(gate) * up
        if _plain(self.down_proj):
            return fused_linear(self._down, y, (self.down_proj,))
        return self.down_proj(y)


class DecodeIndex:
    """What every layer of one decode step shares, computed once per step: where each slot's new
    K/V goes, how many cache positions attention reads (``span``) and which of them (``masks``: one
    for the full layers, one for the sliding window when some layer has one)."""

    def __init__(self, pos: torch.Tensor, kv_heads: int, max_len: int, windows: frozenset):
        s = pos.shape[0]
        if torch.compiler.is_compiling():
            span = max_len                        # one fixed shape for a compiled step
        else:
            span = min(int(pos.max()) + 1, max_len) if s else 1   # rows read only their live prefix
        self.span = span
        idx = torch.arange(span, device=pos.device)
        causal = idx[None, :] <= pos[:, None]                                 # [S, span]
        # one mask per attention kind the layers use (None: full; Mistral builds only its window's)
        self.masks = {w: self._additive(causal if w is None else causal & (idx[None, :] > pos[:, None] - w))
                      for w in windows}
        heads = torch.arange(s * kv_heads, device=pos.device).view(s, kv_heads)
        self.flat = (heads * max_len + pos[:, None]).reshape(-1)              # [S·KVH] rows of the cache
        self.pos, self.rows = pos, torch.arange(s, device=pos.device)

    @staticmethod
    def _additive(mask: torch.Tensor) -> torch.Tensor:
        """0 where read, -inf elsewhere, [S, 1, 1, span] fp32."""
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, float("-inf"))[:, None, None, :]

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
               window: int | None = None) -> torch.Tensor:
        """softmax(q kᵀ · scale + mask) v over each slot's positions: q [S, KVH, G, hd] against the
        cache [S, KVH, L, hd] -> [S, KVH, G, hd]. On CPU the native kernel (``cpu_attention``: each
        slot's own positions, K and V read once, fp32 softmax); elsewhere, and where it is not built,
        two batched products over the first ``span`` positions on views of the cache (no copy in
        fp32) with the mask and an fp32 softmax (2x faster than SDPA's CPU kernel with a mask for
        decode shapes, 3 query rows a KV head)."""
        if cpu_attention.usable(q):
            return cpu_attention.decode_attention(q, k_cache, v_cache, self.pos, window, scale)
        s, kv, g, hd = q.shape
        k = k_cache[:, :, : self.span].reshape(s * kv, self.span, hd)
        v = v_cache[:, :, : self.span].reshape(s * kv, self.span, hd)
        if q.device.type == "cpu" and q.dtype != torch.float32:
            # bf16/fp16 on CPU: for q kᵀ oneDNN's batched product copied K's transposed view (slow);
            # k qᵀ takes K untransposed (attention 117 -> 66 ms a step at 32 rows x 400
            # positions); the [span, G] result is read back transposed
            scores = torch.bmm(k, q.reshape(s * kv, g, hd).transpose(1, 2)).view(s, kv, self.span, g)
            scores = scores.transpose(2, 3)
        else:
            scores = torch.bmm(q.reshape(s * kv, g, hd), k.transpose(1, 2)).view(s, kv, g, self.span)
        probs = torch.softmax(scores.float().mul_(scale).add_(self.masks[window]), dim=-1).to(q.dtype)
        return torch.bmm(probs.view(s * kv, g, self.span), v).view(s, kv, g, hd)

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """cache [S, KVH, L, hd] at (slot, head, pos[slot]) <- new [S, KVH, hd]."""
        if cache.is_contiguous():
            cache.view(-1, cache.shape[-1]).index_copy_(0, self.flat, new.reshape(-1, cache.shape[-1]))
        else:
            cache[self.rows, :, self.pos] = new


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        g = args.gemma_norms
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps, g)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps, g)
        self.sandwich = g                 # Gemma: norms after attention and the MLP as well as before
        if g:
            self.pre_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps, g)
            self.post_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps, g)

    def attn_residual(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """h + the attention's output (Gemma: normed first)."""
        return h + (self.post_attention_layernorm(attn_out) if self.sandwich else attn_out)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """h + the MLP of the normed h (Gemma: its output normed too)."""
        if self.sandwich:
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.gemma_norms)


class Transformer(nn.Module):
    """A Llama-family causal LM over a slot-based KV cache (module docstring)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Body(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self._rope_len = 0
        self.cos = self.sin = self.cos_local = self.sin_local = None
        self.embed_mult = None            # Gemma: √hidden rounded to the model dtype, as HF does
        self._windows = args.windows      # the attention masks a decode step builds
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
        self.cos_local, self.sin_local = self.cos, self.sin
        if self.args.local_rope_theta is not None:
            self.cos_local, self.sin_local = rope_tables(self.args, max_len, w.device, w.dtype, local=True)
        if self.args.embed_scale is not None:
            self.embed_mult = float(torch.tensor(self.args.embed_scale, dtype=torch.float32).to(w.dtype))
        self._rope_len = max_len

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(tokens)
        return h * self.embed_mult if self.embed_mult is not None else h

    def _local_rope(self, layer: int) -> bool:
        """True when this layer uses the sliding layers' own RoPE tables (Gemma 3's local base)."""
        return self.args.local_rope_theta is not None and self.args.window(layer) is not None

    def prefill(self, tokens: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                start: int = 0) -> None:
        """Write the K/V of right-padded prompts ``tokens`` [B, T] (positions start..start+T-1)
        into cache slots ``slots`` [B] of ``k_cache``/``v_cache`` [layers, S, KVH, L, hd]; with
        start > 0 the slots already hold positions [0, start) (a shared prefix), which the new
        positions attend to. Padding positions write values that the decode length mask never
        reads and later decode steps overwrite."""
        t = tokens.shape[1]
        self.setup_rope(start + t)
        h = self.embed(tokens)
        for i, layer in enumerate(self.model.layers):
            cos, sin = (self.cos_local, self.sin_local) if self._local_rope(i) else (self.cos, self.sin)
            a = layer.self_attn.prefill(layer.input_layernorm(h), cos[start:start + t], sin[start:start + t],
                                        k_cache[i], v_cache[i], slots, start)
            h = layer.feed_forward(layer.attn_residual(h, a))

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """One token per slot: ``tokens`` [S] at positions ``pos`` [S] -> logits [S, V] fp32.
        Slot s attends over its cache positions [0, pos[s]] (and within the sliding window); in
        eager mode attention reads only the first max(pos) + 1 positions of the cache."""
        max_len = k_cache.shape[3]
        self.setup_rope(max_len)
        pos = pos.clamp(max=max_len - 1)
        full = (self.cos[pos][:, None], self.sin[pos][:, None])              # [S, 1, hd]
        local = (self.cos_local[pos][:, None], self.sin_local[pos][:, None]) if self.args.local_rope_theta else full
        step = DecodeIndex(pos, self.args.n_kv_heads, max_len, self._windows)
        h = self.embed(tokens)                                             # [S, dim]
        for i, layer in enumerate(self.model.layers):
            cos, sin = local if self._local_rope(i) else full
            a = layer.self_attn.decode(layer.input_layernorm(h), cos, sin, k_cache[i], v_cache[i], step)
            h = layer.feed_forward(layer.attn_residual(h, a))
        return self.head(self.model.norm(h)).float()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's logits in the model dtype."""
        if type(self.lm_head) is nn.Linear:
            return fused_linear(self._head, h, (self.lm_head,))
        return self.lm_head(h)
