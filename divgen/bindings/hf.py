"""Drop-in for code that already calls ``transformers``' ``model.generate``: divgen's guided
sampler as a ``transformers.LogitsProcessor``.

    from divgen.bindings.hf import DivgenHFLogitsProcessor
    proc = DivgenHFLogitsProcessor(model, guidance=Guidance.corrsynth([0, 0, 0, 0], g=2.0),
                                 temperature=0.8, alpha=0.05, seeds=[1, 2, 3, 4])
    out = model.generate(**batch, logits_processor=[proc], do_sample=False, max_new_tokens=64)

At every step the processor samples each row's next token with ``divgen.kernels.guided_sample``
(guidance mix over the rows that have not finished, the papers' α cutoff on the row's own
distribution, temperature, min-p as transformers means it (after temperature), top-k/top-p,
noise of (seed, step, token)) and returns scores that are
−inf everywhere but that token, so HF's greedy selection emits exactly divgen's choice. With the
same seeds the tokens equal those of ``divgen.engine.decode.generate``.

Rules, each enforced:

* EOS ids come from the model's ``generation_config`` (``eos_token_id``, else ``config``); pass
  ``eos_token_ids`` to override. A row whose last token is an EOS id has finished: it leaves its
  guidance group (the others' weights are recomputed, as in the engine) and is given EOS again.
* CFG (``Guidance.cfg``): the batch holds the shadow rows (negative prompts) next to their
  leaders; every shadow row takes its leader's token, so it shares the leader's history exactly
  as in the engine, and finishes with it. Drop the shadow rows from the output.
* Per-row settings (a guidance, a list of seeds/temperatures...) fix the row count; a
  ``generate`` call with another row count (``num_return_sequences``, beams, another batch)
  raises ``DivgenError`` naming the expected count.
* One processor can serve several ``generate`` calls: a call whose ids do not continue the
  previous step's ids starts afresh (step counter 0, no row finished).
* HF must not sample on top: pass ``do_sample=False`` and no repetition penalty or other score
  processor, or the scores divgen sees are not the model's.
"""
from __future__ import annotations

from typing import Iterable

import torch
from transformers import GenerationConfig, LogitsProcessor

from divgen import kernels
from divgen.engine.errors import DivgenError
from divgen.engine.guidance import Guidance, mixing_matrix
from divgen.engine.sampling import SamplingParams


def eos_ids_of(model_or_config) -> list[int]:
    """EOS ids from a model's ``generation_config`` (else its ``config``) or a GenerationConfig."""
    sources = []
    if isinstance(model_or_config, GenerationConfig):
        sources.append(model_or_config)
    else:
        sources.append(getattr(model_or_config, "generation_config", None))
        sources.append(getattr(model_or_config, "config", None))
    for source in sources:
        eos = getattr(source, "eos_token_id", None)
        if eos is None or eos == []:
            continue
        return sorted({int(eos)} if isinstance(eos, int) else {int(t) for t in eos})
    return []


class DivgenHFLogitsProcessor(LogitsProcessor):
    """divgen's guided sampler inside ``model.generate`` (see the module docstring).

    Args:
        model: the HF model (or its ``GenerationConfig``): EOS ids are read from it.
        guidance: a ``Guidance`` over the generate batch's rows, or None (independent rows).
        temperature, top_k, top_p, min_p, alpha: a scalar or one value per row; min_p is
            transformers' ``MinPLogitsWarper`` (after temperature; 1 keeps only the max), alpha
            the papers' α on the row's own untempered distribution (both may be given).
        seeds: int (row i gets seeds + i) or one per row.
        eos_token_ids: overrides the model's EOS ids.
    """

    def __init__(self, model=None, *, guidance: Guidance | None = None, temperature=1.0, top_k=0,
                 top_p=1.0, min_p=0.0, alpha=0.0, seeds=0, eos_token_ids: Iterable[int] | None = None):
        eos = list(eos_token_ids) if eos_token_ids is not None else (eos_ids_of(model) if model is not None else [])
        if not eos:
            raise DivgenError("no EOS token ids: pass the model (its generation_config names them) or eos_token_ids=[...]")
        if guidance is not None and not isinstance(guidance, Guidance):
            raise DivgenError(f"guidance must be a divgen Guidance, got {type(guidance).__name__}")
        self.guidance = guidance
        self.options = dict(temperature=temperature, top_k=top_k, top_p=top_p, alpha=alpha, min_p=min_p, seeds=seeds)
        self.rows = self._fixed_rows()
        if self.rows is not None:  # validate the per-row values now, not inside generate
            SamplingParams.make(self.rows, **self.options)
        self.eos = torch.tensor(sorted({int(t) for t in eos}), dtype=torch.int64)
        self.eos_fill = int(self.eos[0])
        self._seen: torch.Tensor | None = None      # [R, L] ids of the previous step
        self.prompt_width = 0
        self.params: SamplingParams | None = None
        self.finished: torch.Tensor | None = None   # [R] bool
        self.leader: torch.Tensor | None = None     # [R] int64: each row's leader (itself if none)

    def _fixed_rows(self) -> int | None:
        """The row count the settings imply (None: any)."""
        if self.guidance is not None:
            return self.guidance.rows
        for value in self.options.values():
            if isinstance(value, (list, tuple, torch.Tensor)):
                return len(value)
        return None

    def _continues(self, input_ids: torch.Tensor) -> bool:
        prev = self._seen
        return (prev is not None and input_ids.shape[0] == prev.shape[0]
                and input_ids.shape[1] == prev.shape[1] + 1 and torch.equal(input_ids[:, :-1], prev))

    def _start(self, input_ids: torch.Tensor, device) -> None:
        rows = input_ids.shape[0]
        if self.rows is not None and rows != self.rows:
            what = "guidance describes" if self.guidance is not None else "per-row settings give"
            raise DivgenError(
                f"{what} {self.rows} rows but generate passed {rows} (batch x num_return_sequences x beams): "
                f"build a DivgenHFLogitsProcessor for {rows} rows, or pass {self.rows} prompts")
        self.prompt_width = input_ids.shape[1]
        self.params = SamplingParams.make(rows, device=device, **self.options)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        g = self.guidance
        self.leader = torch.tensor([g.leader(r) if g is not None else r for r in range(rows)],
                                   dtype=torch.int64, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids [R, L], scores [R, V] -> [R, V]: 0 at the chosen token, -inf elsewhere
        if not self._continues(input_ids):
            self._start(input_ids, scores.device)
        self._seen = input_ids.clone()
        step = input_ids.shape[1] - self.prompt_width
        if step > 0:
            hit = torch.isin(input_ids[:, -1], self.eos.to(input_ids.device))
            self.finished |= hit[self.leader]                 # shadows finish with their leader
        active = (~self.finished).nonzero(as_tuple=True)[0]   # [A]
        out = torch.full_like(scores, float("-inf"))
        out[self.finished, self.eos_fill] = 0.0               # a finished row keeps emitting EOS
        if active.numel() == 0:
            return out
        active_list = active.tolist()
        mix = mixing_matrix(self.guidance, active_list, scores.device)
        p = self.params
        tokens = kernels.guided_sample(
            scores[active], mix, seeds=p.seeds[active], step=step, temperature=p.temperature[active],
            alpha=p.alpha[active], top_k=p.top_k[active], top_p=p.top_p[active], min_p=p.min_p[active],
        )                                                     # [A]
        if self.guidance is not None and self.guidance.shadow_of is not None:
            pos = {r: i for i, r in enumerate(active_list)}
            take = torch.tensor([pos[self.guidance.leader(r)] for r in active_list], device=tokens.device)
            tokens = tokens[take]                             # shadows take their leader's token
        out[active, tokens] = 0.0
        return out
