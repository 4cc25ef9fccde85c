"""Per-row sampling parameters and the sampling entry points of the engine.

``SamplingParams`` is a dataclass of per-row tensors with short-circuit flags (vLLM's
SamplingMetadata habit), built and checked once by ``SamplingParams.make`` (the Python entry).

``Sampler`` is the slow path's sampler (``models/hf_loop.py``, models without divgen's forward):
one call per step with the dense guidance mix of the rows now in the batch,

1. all rows greedy and no guidance  -> argmax (no noise, no softmax);
2. otherwise                        -> ``divgen.kernels.guided_sample`` (Triton on CUDA, the torch
   reference elsewhere).

Two cutoffs, two names: ``alpha`` is the papers' plausibility cutoff α on the row's own,
untempered distribution (keep ℓ(v) ≥ max ℓ + log α); ``min_p`` is transformers' and vLLM's
min-p, on the distribution being sampled (guided, after temperature; 1 keeps only the max).

The engine's decode step calls the capturable API instead (``build_group_plan`` once per batch
change on the host, ``guided_sample_step`` inside the step: no host sync, fixed shapes, per-row
step counters on the device).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from divgen import kernels
from divgen.engine.errors import DivgenError
from divgen.kernels import build_sample_plan, guided_sample_step  # noqa: F401  (the capturable API)
from divgen.kernels import reference


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
    alpha: torch.Tensor         # [R] fp32 the papers' α (own, untempered distribution), 0 = off
    min_p: torch.Tensor         # [R] fp32 the peers' min-p (tempered, guided distribution), 0 = off
    seeds: torch.Tensor         # [R] int64
    all_greedy: bool            # short-circuit: every row is greedy
    no_cutoffs: bool            # short-circuit: no top-k / top-p / α on any row

    @classmethod
    def make(cls, rows: int, *, temperature=1.0, top_k=0, top_p=1.0, alpha=0.0, min_p=0.0, seeds=0,
             device: torch.device | str = "cpu") -> "SamplingParams":
        """Validate user values (scalars or one per row) and build the tensors.

        ``seeds`` as an int gives row i the seed ``seeds + i``.
        """
        temps = [float(t) for t in _as_list(temperature, rows, "temperature")]
        ks = [int(k) for k in _as_list(top_k, rows, "top_k")]
        ps = [float(p) for p in _as_list(top_p, rows, "top_p")]
        alphas = [float(a) for a in _as_list(alpha, rows, "alpha")]
        min_ps = [float(a) for a in _as_list(min_p, rows, "min_p")]
        if isinstance(seeds, int):
            seed_list = [seeds + i for i in range(rows)]
        else:
            seed_list = [int(s) for s in _as_list(seeds, rows, "seeds")]
        from divgen.engine import limits   # the one set of limits (task files and the CLI use the same)

        temps = [limits.temperature(t, "temperature") for t in temps]
        ks = [limits.top_k(k, "top_k") for k in ks]
        ps = [limits.top_p(p, "top_p") for p in ps]
        alphas = [limits.alpha(a, "alpha") for a in alphas]
        min_ps = [limits.min_p(a, "min_p") for a in min_ps]
        if isinstance(seeds, int):
            limits.seed(seeds, "seeds")
        else:
            seed_list = [limits.seed(s, "seeds") for s in seed_list]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_k=torch.tensor(ks, dtype=torch.int64, device=device),
            top_p=torch.tensor(ps, dtype=torch.float32, device=device),
            alpha=torch.tensor(alphas, dtype=torch.float32, device=device),
            min_p=torch.tensor(min_ps, dtype=torch.float32, device=device),
            seeds=torch.tensor(seed_list, dtype=torch.int64, device=device),
            all_greedy=all(t == 0 for t in temps),
            no_cutoffs=all(k == 0 for k in ks) and all(p == 1 for p in ps) and all(a == 0 for a in alphas)
            and all(a == 0 for a in min_ps),
        )

    def select(self, index: torch.Tensor) -> "SamplingParams":
        """The parameters of a subset of rows (index [R'] int64, in the new batch order)."""
        temperature = self.temperature[index]
        top_k, top_p, alpha = self.top_k[index], self.top_p[index], self.alpha[index]
        return SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, alpha=alpha, min_p=self.min_p[index],
            seeds=self.seeds[index],
            all_greedy=self.all_greedy, no_cutoffs=self.no_cutoffs,
        )


class Sampler:
    """Logits of one decode step -> next tokens.

    Steps: (1) all-greedy without guidance and cutoffs short-circuits to argmax; (2) otherwise
    ``divgen.kernels.guided_sample`` applies the guidance mix, the α cutoff, temperature, min-p,
    top-k/top-p and Gumbel-max with counter-based noise of (seed, step, token). Both pick the
    same token for a greedy row (the sampler compares each row's own logits exactly).
    """

    def __call__(self, logits: torch.Tensor, params: SamplingParams, step: int,
                 mix: torch.Tensor | None = None, own: torch.Tensor | None = None) -> torch.Tensor:
        """logits [R, V] -> tokens [R] int64. own: [V] bool, tokens that take the row's own
        log-prob instead of the contrasted score (the engine's own-special rule; only with a mix)."""
        if params.all_greedy and params.no_cutoffs and mix is None:
            return kernels.greedy_tokens(logits)
        sampling = dict(seeds=params.seeds, step=step, temperature=params.temperature, alpha=params.alpha,
                        top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)
        if own is None or mix is None:
            return kernels.guided_sample(logits, mix, **sampling)
        plan = kernels.build_sample_plan(mix, logits.device, rows=logits.shape[0], own=own)
        return kernels.guided_sample_step(logits, plan, **reference.step_arguments(logits, mix, **sampling))
