"""Drop-in for code that already calls ``transformers``' ``model.generate``: divgen's guided
sampler as a logits processor.

    from divgen.bindings.hf import DivgenSampler
    sampler = DivgenSampler(guidance=Guidance.corrsynth([0, 0, 0, 0], scale=2.0),
                            temperature=0.8, alpha=0.05, seeds=[1, 2, 3, 4], eos_token_ids=[2])
    out = model.generate(**batch, logits_processor=[sampler], do_sample=False, max_new_tokens=64)

At every step the processor samples each row's next token with ``divgen.kernels.guided_sample``
(guidance mix over the rows that have not finished, α cutoff, temperature, top-k/top-p, noise
of (seed, step, token)) and returns scores that are −inf everywhere but that token, so HF's
greedy selection emits exactly divgen's choice. With the same seeds the tokens equal those of
``divgen.engine.decode.generate``. Use one processor per ``generate`` call (it counts steps).
"""
from __future__ import annotations

from typing import Iterable

import torch

from divgen import kernels
from divgen.engine.guidance import Guidance, mixing_matrix
from divgen.engine.sampling import SamplingParams


class DivgenSampler:
    """A ``transformers`` logits processor (callable ``(input_ids, scores) -> scores``)."""

    def __init__(self, *, guidance: Guidance | None = None, temperature=1.0, top_k=0, top_p=1.0,
                 alpha=0.0, seeds=0, eos_token_ids: Iterable[int] = ()):
        self.guidance = guidance
        self.options = dict(temperature=temperature, top_k=top_k, top_p=top_p, alpha=alpha, seeds=seeds)
        self.eos = torch.tensor(sorted(set(int(t) for t in eos_token_ids)), dtype=torch.int64)
        self.prompt_width: int | None = None
        self.params: SamplingParams | None = None
        self.finished: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.shape[0]
        if self.prompt_width is None:  # first step of this generate call
            self.prompt_width = input_ids.shape[1]
            self.params = SamplingParams.make(rows, device=scores.device, **self.options)
            self.finished = torch.zeros(rows, dtype=torch.bool, device=scores.device)
            if self.guidance is not None and self.guidance.rows != rows:
                raise ValueError(f"guidance describes {self.guidance.rows} rows but generate has {rows}")
        step = input_ids.shape[1] - self.prompt_width
        if step > 0 and self.eos.numel():
            self.finished |= torch.isin(input_ids[:, -1], self.eos.to(input_ids.device))
        active = (~self.finished).nonzero(as_tuple=True)[0]                 # [A]
        out = torch.full_like(scores, float("-inf"))
        if active.numel() == 0:
            return out
        mix = mixing_matrix(self.guidance, active.tolist(), scores.device)
        tokens = kernels.guided_sample(
            scores[active], mix, seeds=self.params.seeds[active], step=step,
            temperature=self.params.temperature[active], alpha=self.params.alpha[active],
            top_k=self.params.top_k[active], top_p=self.params.top_p[active],
        )
        out[active, tokens] = 0.0
        # finished rows: HF pads them; give it a finite score so its argmax is well defined
        out[self.finished, 0] = 0.0
        return out
