"""Pure-torch references for every divgen kernel, with the same signatures as the Triton ops.

They are the ground truth of the tests and the CPU path of the engine (DESIGN.md, "Kernels").

Guided sampling (DESIGN.md, "The math")
---------------------------------------
For rows r with logits l_r [V] and log-probs ℓ_r = log_softmax(l_r), and a mixing matrix
``mix`` [R, R] (diagonal 1 + Σ_n γ_{m,n}, off-diagonal −γ_{m,n}; identity = no guidance):

    s_m(v) = Σ_n mix[m, n] · g_{m,n}(v)                    guided scores
    g_{m,n}(v) = ℓ_n(v) if ℓ_n(v) is finite (or n = m), else l_m(v) − lse_n    the mask rule
    A_m    = { v : l_m(v) > −inf  and  l_m(v) ≥ max_u l_m(u) + log α }     α cutoff, own logits
    z_m(v) = s_m(v) / T_m on A_m (T_m < 1e-6: T_m = 1), −inf elsewhere
    P_m    = { v ∈ A_m : z_m(v) ≥ max_u z_m(u) + log min_p }             min-p, tempered
    x_m    = argmax_{v ∈ K_m} ( z_m(v) + G_m(v) )          Gumbel-max; T_m < 1e-6: argmax z_m

The own-token rule (optional, ``own``: a set O of token ids, e.g. EOS and other control tokens):
for v ∈ O, s_m(v) = ℓ_m(v), the row's own log-prob, whatever the other rows say (as if every
contrasting row masked v). The contrast then never decides when a row stops.

The mask rule: a contrasting row's −inf log-prob is a mask set by another mechanism (min_tokens,
allowed ids, bad words, a grammar, another request's cut), not the model's opinion, so row n is
read as agreeing with row m on such v: its logit l_n(v) is read as l_m(v) (under its own
normaliser lse_n), and the term γ_{m,n} · (ℓ_m(v) − ℓ_n(v)) becomes γ_{m,n} · (lse_n − lse_m), the
term of every token on which the two rows' logits agree. So the token is exactly as attractive
to row m as a token the rows agree on: members identical but for a mask draw exactly what they
draw without it. (Reading ℓ_n(v) as ℓ_m(v) would not do that: a mask moves lse_n, and a token
masked in a member holding most of the mass, e.g. EOS under min_tokens, would gain
γ · (lse_m − lse_n); the old −100 floor gave s_m(v) += 100·γ.) A row of a group whose logits are
all −inf (a slot not in use) is masked everywhere.

Two knobs, two names: α (``alpha``) is the papers' plausibility cutoff on the row's own,
untempered distribution; ``min_p`` is transformers' and vLLM's min-p, on the distribution being
sampled (guided, after temperature; 1.0 keeps only the most likely tokens). K_m ⊆ P_m applies
top-k then top-p to softmax(z_m) restricted to P_m (vLLM's order: min-p, top-k, top-p;
transformers applies min-p after top-p, which differs only when top-p and min-p are both set),
all by threshold so ties are kept or dropped together: top-k keeps v iff fewer than k kept
tokens score strictly higher; top-p keeps v iff the probability mass of tokens strictly more
likely than v is < top_p. G_m(v) = −log(−log u_m(v)) with u_m(v) = ``uniform_noise(seed_m,
step, v)`` unless ``noise`` is injected. Ties in an argmax go to the smallest token id
(torch.argmax's rule; the kernel matches it).

Values that keep distinct logits distinct: ℓ_n = l_n − lse_n in fp32 rounds to the ulp of lse
(~5e-7 at lse ≈ 8), which merges logits 1e-7 apart. Every comparison (argmax, cuts) is made on
ŝ_m(v) = s_m(v) + c_m, c_m a constant of the row (so the same order, cut sets and log-probs):

    ŝ_m = mix @ L + L_m ⊙ (W @ Mk)                        (L = l with −inf read as 0; Mk = [l = −inf];
                                                          W = mix off the diagonal; c_m = Σ_n mix[m, n] lse_n)

so a row without guidance compares its raw logits (the same token as ``argmax(logits)`` for a
greedy row, alone or in any batch) and a group without masks compares mix @ l. Log-probs are
taken relative to the row's max z first, so large z (+inf read as 65504) keep their −log k.
Non-finite input (the same rules in this reference, the Triton interpreter and on a GPU):
* ``guided_sample`` (direct callers) refuses NaN and +inf logits with a ValueError naming the fix.
  The capturable ``guided_sample_step`` checks nothing (no host sync); there +inf is read as
  ``LOGIT_MAX`` (65,504, the fp16 maximum: +inf logits come from fp16 overflow; the value is
  small enough that the Gumbel noise still separates equal +inf tokens in fp32 and guided sums
  stay finite), which gives the limit distribution: the +inf tokens of a row share
  all its probability mass. NaN logits give an unspecified token for their own row only (a row
  not coupled to others by ``mix``), and a row whose logits are all −inf (a slot not in use)
  gives token 0.
* Temperature: a row with T < ``MIN_SAMPLING_TEMPERATURE`` (1e-6; T = 0 included) samples
  greedily (argmax of s on the cut set, log-prob at T = 1). Below it s/T can overflow fp32 (a
  1e-40 temperature used to give token 0 with log-prob NaN); above it |s/T| stays finite for
  |s| < 3e32, and the draw is the argmax anyway unless two scores lie within 17·T of each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows with 0 <= T < this sample greedily (T = 0 is greedy; below 1e-6 s/T could overflow fp32,
# and the Gumbel-max draw equals the argmax anyway unless two scores lie within ~2e-5 of each other).
MIN_SAMPLING_TEMPERATURE = 1e-6
FLT_MAX = torch.finfo(torch.float32).max
LOGIT_MAX = 65504.0       # +inf logits are read as this in the capturable step (module docstring)

_MASK32 = 0xFFFFFFFF
_FMIX_C1 = 0x85EBCA6B
_FMIX_C2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser (a bijection on uint32), IN PLACE on an int64 tensor holding
    uint32 values; returns h.

    Products of two uint32 values overflow int64; torch wraps them modulo 2^64, which keeps the
    low 32 bits exact, and the mask restores a non-negative uint32. In-place ops keep the CPU
    cost of hashing a whole vocabulary per step low (this is the engine's CPU sampler).
    """
    h.bitwise_xor_(h >> 16)
    h.mul_(_FMIX_C1).bitwise_and_(_MASK32)
    h.bitwise_xor_(h >> 13)
    h.mul_(_FMIX_C2).bitwise_and_(_MASK32)
    h.bitwise_xor_(h >> 16)
    return h


def noise_keys(seeds: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 32-bit keys (k1, k2) [R] int64 derived from (seed, step).

    seed is an int64 (both 32-bit halves are used); step is the decode step (tokens generated so
    far by the row): a Python int for every row, or an [R] int64 tensor of per-row counters (the
    capturable step reads it on the device). Only the low 32 bits of step count.
    """
    seeds = seeds.to(torch.int64)
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32
    if isinstance(step, torch.Tensor):
        s = step.to(device=seeds.device, dtype=torch.int64) & _MASK32
    else:
        s = torch.full_like(lo, int(step) & _MASK32)
    k1 = _fmix32(lo ^ _fmix32((s * _GOLDEN + hi) & _MASK32))
    k2 = _fmix32(((k1 + _GOLDEN) & _MASK32) ^ hi)
    return k1, k2


def hash_tokens(k1: torch.Tensor, k2: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Counter-based hash of (row key, token id) -> uint32 held in int64.

    h = fmix32(fmix32(v ^ k1) ^ k2): for a fixed row this is a bijection of v, so two tokens never
    share noise. Shapes: k1, k2 [R, 1] (or broadcastable), token_ids [..., V].
    """
    h = _fmix32(token_ids ^ k1)                       # a fresh tensor: safe to hash in place
    return _fmix32(h.bitwise_xor_(k2))


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """uint32 -> uniform in (0, 1): (2·(h >> 9) + 1) / 2^24, exact in fp32, never 0 or 1."""
    return (h >> 9).mul_(2).add_(1).to(torch.float32).mul_(1.0 / 16777216.0)


def uniform_noise(seeds: torch.Tensor, step, vocab_size: int) -> torch.Tensor:
    """The uniforms u[r, v] of the randomness contract, [R, V] fp32 in (0, 1).

    A pure function of (seeds[r], step[r], v): independent of batch layout and device. step: an
    int (all rows) or an [R] int64 tensor.
    """
    k1, k2 = noise_keys(seeds, step)
    v = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    return uniform_from_hash(hash_tokens(k1[:, None], k2[:, None], v[None, :]))


def _per_row(value, rows: int, dtype: torch.dtype, device, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(rows)
    if t.shape != (rows,):
        raise ValueError(f"{name} must be a scalar or a tensor of shape [{rows}] (one per row), got {tuple(t.shape)}")
    return t


def check_guided_sample_args(logits, mix, seeds, temperature, alpha, top_k, top_p, noise, min_p=0.0):
    """Validate arguments once, for the reference and the kernel alike. Returns per-row tensors
    (temperature, alpha, top_k, top_p, min_p).

    This is the direct callers' layer (it reads values: host syncs). The capturable step
    (``guided_sample_step``) checks nothing and follows the rules in the module docstring.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits must be a 2-D tensor [rows, vocab]")
    rows, vocab = logits.shape
    if rows == 0 or vocab == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be fp32, fp16 or bf16, got {logits.dtype}")
    if torch.isnan(logits).any():
        raise ValueError("logits contain NaN: the model produced invalid scores (check the model weights and dtype)")
    if torch.isposinf(logits).any():
        raise ValueError("logits contain +inf (an fp16 overflow?): compute the logits in fp32 or bf16, "
                         "or clamp them to a finite range")
    if mix is not None and (not isinstance(mix, torch.Tensor) or mix.shape != (rows, rows)):
        shape = tuple(mix.shape) if isinstance(mix, torch.Tensor) else type(mix).__name__
        raise ValueError(f"mix must be a [{rows}, {rows}] tensor (rows x rows), got {shape}")
    if mix is not None and not torch.isfinite(mix).all():
        raise ValueError("mix must be finite (guidance weights γ are finite numbers)")
    if seeds is None or not isinstance(seeds, torch.Tensor) or seeds.shape != (rows,):
        raise ValueError(f"seeds must be an int64 tensor of shape [{rows}]")
    dev = logits.device
    temperature = _per_row(temperature, rows, torch.float32, dev, "temperature")
    alpha = _per_row(alpha, rows, torch.float32, dev, "alpha")
    top_k = _per_row(top_k, rows, torch.int64, dev, "top_k")
    top_p = _per_row(top_p, rows, torch.float32, dev, "top_p")
    min_p = _per_row(0.0 if min_p is None else min_p, rows, torch.float32, dev, "min_p")
    if not torch.isfinite(temperature).all() or (temperature < 0).any():
        raise ValueError("temperature must be >= 0 (0 means greedy)")
    if not ((alpha >= 0) & (alpha < 1)).all():
        raise ValueError("alpha must be in [0, 1) (0 keeps every finite-logit token)")
    if not ((min_p >= 0) & (min_p <= 1)).all():
        raise ValueError("min_p must be in [0, 1] (0 disables it, 1 keeps only the most likely tokens)")
    if (top_k < 0).any():
        raise ValueError("top_k must be >= 0 (0 disables top-k)")
    if not ((top_p > 0) & (top_p <= 1)).all():
        raise ValueError("top_p must be in (0, 1] (1 disables top-p)")
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or noise.shape != (rows, vocab):
            raise ValueError(f"noise must be a [{rows}, {vocab}] tensor of uniforms in (0, 1)")
        if not ((noise > 0) & (noise < 1)).all():
            raise ValueError("noise must hold uniforms strictly inside (0, 1)")
    if torch.isneginf(logits).all(dim=-1).any():
        raise ValueError("a row has no finite logit: nothing can be sampled from it")
    return temperature, alpha, top_k, top_p, min_p


def sampling_temperature(temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy [R] bool, T used for dividing [R] fp32): the greedy rule of the module docstring."""
    greedy = temperature < MIN_SAMPLING_TEMPERATURE                            # T = 0 and tiny T
    return greedy, torch.where(greedy, torch.ones_like(temperature), temperature)


def guided_scores(x: torch.Tensor, mix: torch.Tensor | None, lse: torch.Tensor | None = None,
                  own: torch.Tensor | None = None) -> torch.Tensor:
    """ŝ [R, V] fp32 of the module docstring from fp32 logits x [R, V] (+inf already clamped):
    the guided scores up to a constant per row, with the mask rule, on values that keep distinct
    logits distinct (raw logits, not log-probs). mix None: x itself. Column by column: the
    columns of ŝ are those of x (the CPU sampler passes only the columns it needs). own:
    optional [V] bool, the columns outside the contrast (the own-token rule of the module
    docstring: there ŝ_m(v) = ℓ_m(v) − c_m, the row's own log-prob in ŝ's units); it needs each
    row's logsumexp over the whole vocabulary, ``lse`` [R] when x holds only some columns."""
    if mix is None:
        return x
    finite = x > float("-inf")                                                # NaN counts as masked
    lf = torch.where(finite, x, 0.0)                                          # [R, V] L
    masked = (~finite).float()                                                # [R, V] Mk
    mix = mix.float()
    off = mix - torch.diag_embed(torch.diagonal(mix))                         # [R, R] W
    s = mix @ lf + lf * (off @ masked)                                       # [R, V]
    if own is not None:
        # s = ŝ + c_m, c_m = −Σ_n mix[m, n] lse_n; with Σ_n mix[m, n] = 1, ℓ_m(v) − c_m is
        # x_m(v) + Σ_n W[m, n] (lse_n − lse_m)
        lse = torch.logsumexp(x, dim=-1) if lse is None else lse              # [R]
        lse = torch.where(torch.isfinite(lse), lse, 0.0)                      # a row not in use: 0
        d = lse[None, :] - lse[:, None]                                       # [R, R] D[m, n]
        s = torch.where(own[None, :], x + (off * d).sum(dim=-1, keepdim=True), s)
    return s


def guided_sample_step(logits: torch.Tensor, mix: torch.Tensor | None, seeds: torch.Tensor, step: torch.Tensor,
                       temperature: torch.Tensor, alpha: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       *, min_p: torch.Tensor | None = None, any_top_k_top_p: bool = True,
                       noise: torch.Tensor | None = None, return_logprobs: bool = False,
                       own: torch.Tensor | None = None):
    """The capturable step, in torch: no checks, no host sync, no data-dependent Python branch.

    Args (all on the logits' device; R fixed):
        logits [R, V] fp32/fp16/bf16; mix [R, R] fp32 or None; seeds [R] int64; step [R] int64
        (each row's noise counter); temperature [R] fp32; alpha [R] fp32 (the papers' α, on the
        row's own untempered distribution); top_k [R] int64; top_p [R] fp32; min_p: [R] fp32
        (the peers' min-p, tempered) or None (off; a host choice fixed per plan);
        any_top_k_top_p: run the top-k/top-p cut (a host flag fixed per plan; with False,
        top_k/top_p are ignored); noise: optional [R, V] uniforms (tests); own: optional [V]
        bool, tokens outside the contrast (the own-token rule; None: none).
    Returns: tokens [R] int64 (and log-probs [R] fp32). Compiles with torch.compile(fullgraph=True).
    """
    rows, vocab = logits.shape
    x = logits.float().clamp(max=LOGIT_MAX)                                   # +inf read as LOGIT_MAX
    s = guided_scores(x, mix, own=own)                                        # [R, V] ŝ

    row_max = x.max(dim=-1, keepdim=True).values                              # [R, 1]
    log_alpha = torch.log(alpha)[:, None]                                     # -inf for alpha = 0
    keep = torch.isfinite(x) & (x >= row_max + log_alpha)                     # [R, V]

    greedy, t_div = sampling_temperature(temperature)                         # [R]
    z = torch.where(keep, s / t_div[:, None], float("-inf"))                  # [R, V] tempered
    if min_p is not None:            # min-p on the tempered, guided distribution (p ≥ min_p · max p)
        z_max = z.max(dim=-1, keepdim=True).values                            # [R, 1]
        z = torch.where(z >= z_max + torch.log(min_p.float())[:, None], z, float("-inf"))

    if any_top_k_top_p:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        kth = torch.sort(z, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [R, 1]
        z = torch.where(z >= kth, z, float("-inf"))
        p = torch.softmax(z, dim=-1)                                           # [R, V]
        p_asc = torch.sort(p, dim=-1).values
        cum_asc = torch.cumsum(p_asc, dim=-1)                                  # mass of tokens <= p
        n_le = torch.searchsorted(p_asc, p, right=True)                        # [R, V], >= 1
        mass_le = cum_asc.gather(1, n_le - 1)
        mass_above = cum_asc[:, -1:] - mass_le                                 # strictly more likely
        drop = (mass_above >= top_p[:, None]) & (top_p[:, None] < 1)
        z = torch.where(drop, float("-inf"), z)

    u = uniform_noise(seeds, step, vocab) if noise is None else noise.float()
    gumbel = u.log().neg_().log_().neg_()                                     # [R, V] −log(−log u)
    scores = torch.where(greedy[:, None], z, z + gumbel)
    tokens = torch.argmax(scores, dim=-1)                                     # [R]
    if not return_logprobs:
        return tokens
    z_max = z.max(dim=-1).values                          # relative to the max first: z may be huge
    logprobs = (z.gather(1, tokens[:, None])[:, 0] - z_max) - torch.log(torch.exp(z - z_max[:, None]).sum(-1))
    return tokens, logprobs


def step_tensor(step, rows: int, device) -> torch.Tensor:
    """An int decode step (or [R] tensor) as the step's [R] int64 counter tensor."""
    if isinstance(step, torch.Tensor):
        if step.dim() == 0:
            return step.to(device=device, dtype=torch.int64).expand(rows)
        if step.shape != (rows,):
            raise ValueError(f"step must be an int or a tensor of shape [{rows}] (one counter per row), "
                             f"got {tuple(step.shape)}")
        return step.to(device=device, dtype=torch.int64)
    if int(step) < 0:
        raise ValueError(f"step must be >= 0 (the decode step), got {step}")
    return torch.full((rows,), int(step) & _MASK32, dtype=torch.int64, device=device)


def guided_sample(
    logits: torch.Tensor,
    mix: torch.Tensor | None,
    *,
    seeds: torch.Tensor,
    step: int,
    temperature=1.0,
    alpha=0.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    noise: torch.Tensor | None = None,
    return_logprobs: bool = False,
):
    """Guided sampling from logits, the reference (checked entry point for direct callers).

    Semantics:
        x = logits.float()
        s = mix @ g(log_softmax(x))                            # [R, V]; g: the mask rule; mix None = identity
        keep = isfinite(x) & (x >= x.max(-1) + log(alpha))     # the papers' α, untempered
        z = where(keep, s / T, -inf)                           # T < 1e-6: T = 1 (greedy)
        keep &= z >= z.max(-1) + log(min_p)                    # the peers' min-p, tempered
        keep &= top_k/top_p masks of softmax(z) over keep
        tokens = argmax(where(keep, z - log(-log(u)), -inf))   # greedy rows: argmax(where(keep, z))
        (every comparison on ŝ = s + a constant per row: module docstring)
    Args:
        logits: [R, V] fp32/fp16/bf16 next-token logits (finite or −inf; +inf is refused).
        mix: [R, R] fp32 guidance mixing matrix, or None for plain per-row sampling.
        seeds: [R] int64 per-row seeds; step: decode step (the noise counter; int or [R] int64).
        temperature, alpha, top_k, top_p, min_p: scalar or [R] tensors.
        noise: optional [R, V] uniforms in (0, 1) replacing the counter-based noise.
        return_logprobs: also return [R] fp32, log-prob of each chosen token under the tempered,
            cut distribution (for greedy rows, under the cut distribution at T = 1).
    Returns: tokens [R] int64 (and logprobs [R] fp32). Nothing is modified in place.
    """
    args = step_arguments(logits, mix, seeds=seeds, step=step, temperature=temperature, alpha=alpha, top_k=top_k,
                          top_p=top_p, min_p=min_p, noise=noise, return_logprobs=return_logprobs)
    return guided_sample_step(logits, None if mix is None else mix.float(), **args)


def step_arguments(logits, mix, *, seeds, step, temperature=1.0, alpha=0.0, top_k=0, top_p=1.0, min_p=0.0,
                   noise=None, return_logprobs=False) -> dict:
    """The direct callers' layer, shared by ``guided_sample`` and the kernels' twin: checks the
    arguments of ``guided_sample`` (``check_guided_sample_args``: host syncs) and returns the
    keyword arguments of a capturable step (``guided_sample_step``, either implementation) after
    ``logits`` and the mix or plan: per-row tensors on the logits' device, min_p None when no
    row uses it, any_top_k_top_p read from the values."""
    temperature, alpha, top_k, top_p, min_p = check_guided_sample_args(
        logits, mix, seeds, temperature, alpha, top_k, top_p, noise, min_p
    )
    rows, device = logits.shape[0], logits.device
    return dict(
        seeds=seeds.to(device=device, dtype=torch.int64).contiguous(), step=step_tensor(step, rows, device),
        temperature=temperature.contiguous(), alpha=alpha.contiguous(), top_k=top_k.contiguous(),
        top_p=top_p.contiguous(), min_p=min_p.contiguous() if bool((min_p > 0).any()) else None,
        any_top_k_top_p=bool((top_k > 0).any() or (top_p < 1).any()), noise=noise,
        return_logprobs=return_logprobs,
    )


# ----------------------------------------------------------------------------------------------
# Multi-LoRA (BGMV/SGMV style). Owned by the LoRA kernel work; the signature below is fixed.
# ----------------------------------------------------------------------------------------------
# Every row i of a batch may use its own adapter j = indices[i] (or none, j = -1):
#
#     t[i] = scales[j] · lora_a[j] @ x[i]          shrink: [H_in] -> [R], fp32
#     y[i] += lora_b[j] @ t[i]                     expand: [R] -> [H_out], in place
#
# Adapters of different ranks are stacked by zero-padding A's rows and B's columns to the max
# rank R; the padding adds exact zeros. The reference groups rows by adapter (Punica's
# ``sgmv_ref_impl`` habit: one dense matmul per segment) and computes in fp32, rounding y once.

LORA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)} {t.dtype}"
    return type(t).__name__


def _check_lora_indices(indices, rows: int, device) -> None:
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.shape[0] != rows:
        raise ValueError(f"indices must be a 1-D integer tensor [{rows}] (one adapter slot per row, -1 = "
                         f"no adapter), got {_describe(indices)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices must be int64 (or int32), got {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"indices are on {indices.device} but x/y are on {device}; move them to {device}")


def check_lora_index_range(indices: torch.Tensor, num_adapters: int) -> None:
    """Raise unless every index is in [-1, num_adapters). Reads the values: a host sync on CUDA."""
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < -1 or hi >= num_adapters:
        raise ValueError(f"indices must be in [-1, {num_adapters}) (adapter slot, -1 = no adapter; "
                         f"{num_adapters} adapters are stacked), got values in [{lo}, {hi}]")


def check_lora_shrink_args(x, lora_a, indices, scales) -> None:
    """Shapes, dtypes and devices of ``lora_shrink``'s arguments (not index values)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [N, H_in] (tokens x hidden), got {_describe(x)}")
    if x.dtype not in LORA_DTYPES:
        raise ValueError(f"x must be fp32, bf16 or fp16, got {x.dtype}")
    if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 3:
        raise ValueError(f"lora_a must be a 3-D tensor [L, R, H_in] (stacked lora_A.weight), got {_describe(lora_a)}")
    if lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"lora_a is [L, R, H_in] = {list(lora_a.shape)} but x has H_in = {x.shape[1]}: "
                         "the adapters were trained for a layer of another input size")
    if lora_a.dtype != x.dtype:
        raise ValueError(f"dtype mismatch: lora_a is {lora_a.dtype} but x is {x.dtype}; cast the adapter "
                         "weights to the model dtype")
    if lora_a.device != x.device:
        raise ValueError(f"lora_a is on {lora_a.device} but x is on {x.device}; move it to {x.device}")
    _check_lora_indices(indices, x.shape[0], x.device)
    num_adapters = lora_a.shape[0]
    if not isinstance(scales, torch.Tensor) or scales.shape != (num_adapters,):
        raise ValueError(f"scales must be a 1-D tensor [{num_adapters}] (lora_alpha / r per adapter), "
                         f"got {_describe(scales)}")
    if not scales.is_floating_point():
        raise ValueError(f"scales must be a floating tensor (fp32), got {scales.dtype}")
    if scales.device != x.device:
        raise ValueError(f"scales are on {scales.device} but x is on {x.device}; move them to {x.device}")


def _check_lora_output(y, lora_b) -> None:
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ValueError(f"y must be a 2-D tensor [N, H_out] (tokens x hidden), got {_describe(y)}")
    if y.dtype not in LORA_DTYPES:
        raise ValueError(f"y must be fp32, bf16 or fp16, got {y.dtype}")
    if not isinstance(lora_b, torch.Tensor) or lora_b.dim() != 3:
        raise ValueError(f"lora_b must be a 3-D tensor [L, H_out, R] (stacked lora_B.weight), got {_describe(lora_b)}")
    if lora_b.shape[1] != y.shape[1]:
        raise ValueError(f"lora_b is [L, H_out, R] = {list(lora_b.shape)} but y has H_out = {y.shape[1]}: "
                         "the adapters were trained for a layer of another output size")
    if lora_b.dtype != y.dtype:
        raise ValueError(f"dtype mismatch: lora_b is {lora_b.dtype} but y is {y.dtype}; cast the adapter "
                         "weights to the model dtype")
    if lora_b.device != y.device:
        raise ValueError(f"lora_b is on {lora_b.device} but y is on {y.device}; move it to {y.device}")


def check_lora_expand_args(y, t, lora_b, indices) -> None:
    """Shapes, dtypes and devices of ``lora_expand``'s arguments (not index values)."""
    _check_lora_output(y, lora_b)
    rows, rank = y.shape[0], lora_b.shape[2]
    if not isinstance(t, torch.Tensor) or t.shape != (rows, rank):
        raise ValueError(f"t must be a [{rows}, {rank}] tensor (N x R, the output of lora_shrink), got {_describe(t)}")
    if t.dtype != torch.float32:
        raise ValueError(f"t must be fp32 (lora_shrink's output), got {t.dtype}")
    if t.device != y.device:
        raise ValueError(f"t is on {t.device} but y is on {y.device}; move it to {y.device}")
    _check_lora_indices(indices, rows, y.device)


def check_add_lora_args(y, x, lora_a, lora_b, indices, scales) -> None:
    """Shapes, dtypes and devices of ``add_lora``'s arguments (not index values)."""
    check_lora_shrink_args(x, lora_a, indices, scales)
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be a 2-D tensor [{x.shape[0]}, H_out] (one row per row of x), got {_describe(y)}")
    if y.dtype != x.dtype:
        raise ValueError(f"dtype mismatch: y is {y.dtype} but x is {x.dtype}; both must be the layer's dtype")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}; move it to {x.device}")
    _check_lora_output(y, lora_b)
    if lora_b.shape[0] != lora_a.shape[0]:
        raise ValueError(f"lora_a stacks {lora_a.shape[0]} adapters but lora_b stacks {lora_b.shape[0]}")
    if lora_b.shape[2] != lora_a.shape[1]:
        raise ValueError(f"rank mismatch: lora_a is [L, R, H_in] = {list(lora_a.shape)} but lora_b is "
                         f"[L, H_out, R] = {list(lora_b.shape)}; pad both to the same max rank")


@dataclass(frozen=True)
class LoraPlan:
    """Rows grouped by adapter, built once per batch composition (``build_lora_plan``).

    order [N] int64: row ids sorted by adapter (stable), rows with -1 last; seg_start [L + 1]
    int64: adapter j owns order[seg_start[j]:seg_start[j + 1]]; used: the adapters with rows, in
    slot order (host ints). Triton's plan adds its launch tiles (``lora_triton.build_lora_plan``).
    """
    rows: int
    num_adapters: int
    order: torch.Tensor
    seg_start: torch.Tensor
    bounds: tuple[int, ...]      # seg_start on the host
    used: tuple[int, ...]
    tiles: object = None


def build_lora_plan(indices: torch.Tensor, num_adapters: int) -> LoraPlan:
    """Group rows by adapter (host side: reads the indices once; never called in the step)."""
    _check_lora_indices(indices, indices.shape[0] if isinstance(indices, torch.Tensor) else 0,
                        indices.device if isinstance(indices, torch.Tensor) else None)
    check_lora_index_range(indices, num_adapters)
    sorted_idx, order = torch.sort(indices.to(torch.int64), stable=True)
    bounds = torch.arange(num_adapters + 1, dtype=torch.int64, device=indices.device)
    seg_start = torch.searchsorted(sorted_idx, bounds)
    counts = (seg_start[1:] - seg_start[:-1]).tolist()
    used = tuple(j for j, c in enumerate(counts) if c > 0)
    # rows with -1 sort first: move them behind the adapters' segments
    none = int((indices < 0).sum())
    order = torch.cat([order[none:], order[:none]])
    seg_start = seg_start - none
    return LoraPlan(rows=indices.shape[0], num_adapters=num_adapters, order=order, seg_start=seg_start,
                    bounds=tuple(seg_start.tolist()), used=used)


def _check_plan(plan: LoraPlan | None, indices: torch.Tensor, num_adapters: int) -> None:
    if plan is not None and (plan.rows != indices.shape[0] or plan.num_adapters != num_adapters):
        raise ValueError(f"the LoRA plan was built for {plan.rows} rows and {plan.num_adapters} adapters, but the "
                         f"call has {indices.shape[0]} rows and {num_adapters} adapters: rebuild it with "
                         "build_lora_plan(indices, L) when the batch changes")


def _rows_by_adapter(indices: torch.Tensor, plan: LoraPlan | None = None):
    """Yield (adapter j, row ids [n_j]) for every adapter used in the batch (host sync without a plan)."""
    if plan is not None:
        for j in plan.used:
            yield j, plan.order[plan.bounds[j]:plan.bounds[j + 1]]
        return
    for j in torch.unique(indices[indices >= 0]).tolist():
        yield j, (indices == j).nonzero(as_tuple=True)[0]


# Up to this many rows (decode steps), gathering each row's adapter and doing one batched matmul
# beats a loop of small per-adapter matmuls on CPU; above it (prefill) the gathered weights
# would be large, so rows are grouped per adapter instead.
GATHER_MAX_ROWS = 64


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor,
                plan: LoraPlan | None = None) -> torch.Tensor:
    """Per-row adapter down-projection, scaled.

    Semantics:
        t = zeros(N, R, fp32)
        for i in range(N):
            j = indices[i]
            if j >= 0:
                t[i] = scales[j] * (lora_a[j] @ x[i])

    Args:
        x:       [N, H_in]     fp32 / bf16 / fp16
        lora_a:  [L, R, H_in]  same dtype as x (stacked lora_A.weight, rank zero-padded to R)
        indices: [N] int64     adapter slot per row, -1 = no adapter
        scales:  [L] fp32      lora_alpha / r per adapter
    Returns:
        t: [N, R] fp32, new tensor (rows with index -1 are 0). Nothing is modified in place.
    """
    check_lora_shrink_args(x, lora_a, indices, scales)
    _check_plan(plan, indices, lora_a.shape[0])
    if plan is None:
        check_lora_index_range(indices, lora_a.shape[0])
    if x.shape[0] <= GATHER_MAX_ROWS:  # decode: one batched matmul over gathered adapters
        slot, used = indices.clamp(min=0), (indices >= 0)
        a = lora_a[slot].float()                                                     # [N, R, H_in]
        t = torch.bmm(a, x.float()[:, :, None])[:, :, 0]                             # [N, R]
        return t * (scales.float()[slot] * used)[:, None]
    t = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)  # [N, R]
    for j, rows in _rows_by_adapter(indices, plan):
        t[rows] = scales[j].float() * (x[rows].float() @ lora_a[j].float().T)
    return t


def lora_expand(y: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor,
                plan: LoraPlan | None = None) -> torch.Tensor:
    """Per-row adapter up-projection, added into y in place.

    Semantics:
        for i in range(N):
            j = indices[i]
            if j >= 0:
                y[i] += lora_b[j] @ t[i]          # in fp32, rounded to y's dtype once

    Args:
        y:       [N, H_out]     fp32 / bf16 / fp16, modified IN PLACE
        t:       [N, R] fp32    output of ``lora_shrink``
        lora_b:  [L, H_out, R]  same dtype as y (stacked lora_B.weight, rank zero-padded to R)
        indices: [N] int64      adapter slot per row, -1 = no adapter (row left untouched)
    Returns:
        y (the same tensor).
    """
    check_lora_expand_args(y, t, lora_b, indices)
    _check_plan(plan, indices, lora_b.shape[0])
    if plan is None:
        check_lora_index_range(indices, lora_b.shape[0])
    if y.shape[0] <= GATHER_MAX_ROWS:  # decode: one batched matmul over gathered adapters
        slot, used = indices.clamp(min=0), (indices >= 0)
        b = lora_b[slot].float()                                                     # [N, H_out, R]
        updated = (y.float() + torch.bmm(b, t[:, :, None])[:, :, 0]).to(y.dtype)     # [N, H_out]
        y.copy_(torch.where(used[:, None], updated, y))   # rows with -1 keep their exact bits
        return y
    for j, rows in _rows_by_adapter(indices, plan):
        y[rows] = (y[rows].float() + t[rows] @ lora_b[j].float().T).to(y.dtype)
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             indices: torch.Tensor, scales: torch.Tensor, plan: LoraPlan | None = None) -> torch.Tensor:
    """Multi-LoRA delta of one linear layer, every row with its own adapter (or none).

    Semantics:
        for i in range(N):
            j = indices[i]
            if j >= 0:
                y[i] += scales[j] * (lora_b[j] @ (lora_a[j] @ x[i]))

    Args:
        y:       [N, H_out]     same dtype as x, modified IN PLACE
        x:       [N, H_in]      fp32 / bf16 / fp16 (N = rows x new positions, flattened)
        lora_a:  [L, R, H_in]   stacked lora_A.weight, rank zero-padded to the max rank R
        lora_b:  [L, H_out, R]  stacked lora_B.weight
        indices: [N] int64      adapter slot per row, -1 = no adapter (row left untouched)
        scales:  [L] fp32       lora_alpha / r per adapter
        plan:    optional ``build_lora_plan(indices, L)``, built once per batch composition (it
                 skips the per-call grouping and index check)
    Returns:
        y (the same tensor). The intermediate x @ Aᵀ stays in fp32; y is rounded once.
    """
    check_add_lora_args(y, x, lora_a, lora_b, indices, scales)
    return lora_expand(y, lora_shrink(x, lora_a, indices, scales, plan), lora_b, indices, plan)
