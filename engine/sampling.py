"""Per-row sampling parameters and the sampling entry points of the engine.

``SamplingParams`` is a dataclass of per-row tensors with short-circuit flags (vLLM's
SamplingMetadata habit). ``Sampler`` turns the logits of one decode step into tokens:

1. all rows greedy and no guidance  -> argmax (no noise, no softmax);
2. otherwise                        -> ``divgen.kernels.guided_sample`` (Triton on CUDA, the torch
   reference elsewhere), with the guidance ``mix`` of the rows now in the batch.

min-p is the α cutoff: keeping v with p(v) ≥ min_p · max p is keeping ℓ(v) ≥ max ℓ + log α.

The compiled decode step calls the capturable API instead (``build_sample_plan`` once per batch
change on the host, ``guided_sample_step`` inside the step: no host sync, fixed shapes, per-row
step counters on the device).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from divgen import kernels
from divgen.engine.errors import DivgenError
from divgen.kernels import reference as _ref

try:  # the capturable sampling API of divgen.kernels (COMMON.md interface)
    from divgen.kernels import build_sample_plan, guided_sample_step
except ImportError:  # TEMPORARY twin with the same signature until it lands on main
    @dataclass
    class _Plan:
        mix: torch.Tensor | None      # [R, R] fp32 on the device, None = independent rows

    def build_sample_plan(mix, device):
        if mix is not None:
            mix = mix.to(device=device, dtype=torch.float32)
            if not bool(torch.isfinite(mix).all()):
                raise ValueError("mix must be finite")
        return _Plan(mix)

    def _noise(seeds, step, vocab):
        lo = seeds & _ref._MASK32
        hi = (seeds >> 32) & _ref._MASK32
        s = step & _ref._MASK32
        k1 = _ref._fmix32(lo ^ _ref._fmix32((s * _ref._GOLDEN + hi) & _ref._MASK32))
        k2 = _ref._fmix32(((k1 + _ref._GOLDEN) & _ref._MASK32) ^ hi)
        v = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
        return _ref.uniform_from_hash(_ref.hash_tokens(k1[:, None], k2[:, None], v[None, :]))

    def guided_sample_step(logits, plan, seeds, step, temperature, min_p, top_k, top_p,
                           any_top_k_top_p: bool = True):
        x = logits.float()
        vocab = x.shape[-1]
        lp = torch.log_softmax(x, dim=-1)
        s = lp if plan.mix is None else plan.mix @ lp.clamp(min=_ref.LOGP_FLOOR)
        keep = torch.isfinite(x) & (x >= x.max(dim=-1, keepdim=True).values + torch.log(min_p)[:, None])
        greedy = temperature == 0
        t_safe = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
        z = torch.where(keep, s / t_safe, float("-inf"))
        if any_top_k_top_p:
            k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
            kth = torch.sort(z, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            z = torch.where(z >= kth, z, float("-inf"))
            p = torch.softmax(z, dim=-1)
            p_asc = torch.sort(p, dim=-1).values
            cum_asc = torch.cumsum(p_asc, dim=-1)
            n_le = torch.searchsorted(p_asc, p, right=True)
            mass_above = cum_asc[:, -1:] - cum_asc.gather(1, n_le - 1)
            drop = (mass_above >= top_p[:, None]) & (top_p[:, None] < 1)
            z = torch.where(drop, float("-inf"), z)
        u = _noise(seeds, step, vocab)
        gumbel = u.log().neg().log().neg()
        return torch.argmax(torch.where(greedy[:, None], z, z + gumbel), dim=-1)


def _as_list(value, rows: int, name: str) -> list:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != rows:
            raise DivgenError(f"{name} has {len(value)} values but there are {rows} rows: give one per row or a scalar")
        return list(value)
    return [value] * rows


@dataclass
class SamplingParams:
    """Per-row sampling parameters, all tensors of shape [R] on the decode device."""

    temperature: torch.Tensor   # [R] fp32, 0 = greedy
    top_k: torch.Tensor         # [R] int64, 0 = off
    top_p: torch.Tensor         # [R] fp32, 1 = off
    alpha: torch.Tensor         # [R] fp32 plausibility cutoff (min-p), 0 = off
    seeds: torch.Tensor         # [R] int64
    all_greedy: bool            # short-circuit: every row is greedy
    no_cutoffs: bool            # short-circuit: no top-k / top-p / α on any row

    @classmethod
    def make(cls, rows: int, *, temperature=1.0, top_k=0, top_p=1.0, alpha=0.0, seeds=0,
             device: torch.device | str = "cpu") -> "SamplingParams":
        """Validate user values (scalars or one per row) and build the tensors.

        ``seeds`` as an int gives row i the seed ``seeds + i``.
        """
        temps = [float(t) for t in _as_list(temperature, rows, "temperature")]
        ks = [int(k) for k in _as_list(top_k, rows, "top_k")]
        ps = [float(p) for p in _as_list(top_p, rows, "top_p")]
        alphas = [float(a) for a in _as_list(alpha, rows, "alpha")]
        if isinstance(seeds, int):
            seed_list = [seeds + i for i in range(rows)]
        else:
            seed_list = [int(s) for s in _as_list(seeds, rows, "seeds")]
        for t in temps:
            if not (t >= 0 and t != float("inf")):
                raise DivgenError(f"temperature must be >= 0 (0 is greedy), got {t}")
        for k in ks:
            if k < 0:
                raise DivgenError(f"top_k must be >= 0 (0 disables it), got {k}")
        for p in ps:
            if not (0 < p <= 1):
                raise DivgenError(f"top_p must be in (0, 1] (1 disables it), got {p}")
        for a in alphas:
            if not (0 <= a < 1):
                raise DivgenError(f"alpha (min-p) must be in [0, 1) (0 disables it), got {a}")
        for s in seed_list:
            if not (-(2 ** 63) <= s < 2 ** 63):
                raise DivgenError(f"seed must fit in a signed 64-bit integer, got {s}")
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_k=torch.tensor(ks, dtype=torch.int64, device=device),
            top_p=torch.tensor(ps, dtype=torch.float32, device=device),
            alpha=torch.tensor(alphas, dtype=torch.float32, device=device),
            seeds=torch.tensor(seed_list, dtype=torch.int64, device=device),
            all_greedy=all(t == 0 for t in temps),
            no_cutoffs=all(k == 0 for k in ks) and all(p == 1 for p in ps) and all(a == 0 for a in alphas),
        )

    def select(self, index: torch.Tensor) -> "SamplingParams":
        """The parameters of a subset of rows (index [R'] int64, in the new batch order)."""
        temperature = self.temperature[index]
        top_k, top_p, alpha = self.top_k[index], self.top_p[index], self.alpha[index]
        return SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, alpha=alpha, seeds=self.seeds[index],
            all_greedy=self.all_greedy, no_cutoffs=self.no_cutoffs,
        )


class Sampler:
    """Logits of one decode step -> next tokens.

    Steps: (1) all-greedy without guidance and cutoffs short-circuits to argmax; (2) otherwise
    ``divgen.kernels.guided_sample`` applies the guidance mix, the α cutoff, temperature,
    top-k/top-p and Gumbel-max with counter-based noise of (seed, step, token).
    """

    def __call__(self, logits: torch.Tensor, params: SamplingParams, step: int,
                 mix: torch.Tensor | None = None) -> torch.Tensor:
        # logits [R, V] -> tokens [R] int64
        if params.all_greedy and params.no_cutoffs and mix is None:
            return torch.argmax(logits, dim=-1)
        return kernels.guided_sample(
            logits, mix, seeds=params.seeds, step=step, temperature=params.temperature,
            alpha=params.alpha, top_k=params.top_k, top_p=params.top_p,
        )
