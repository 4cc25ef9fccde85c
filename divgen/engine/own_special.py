"""Special tokens outside the contrast (``generate(..., own_special=True)``, ``divgen synth
--own-special``, task files ``own_special: true``).

CorrSynth's guided score s_m(v) = ℓ_m(v) + Σ_n γ_{m,n}(ℓ_m(v) − ℓ_n(v)) also applies to EOS: when
the other rows are about to stop, a row is pushed to continue, and when they are not, it is
pushed to stop. With own-special, EOS and the tokenizer's other special (control) tokens take the
row's own log-probability ℓ_m(v) instead (the own-token rule of ``divgen.kernels.reference``), so
the contrast decides what a row says, not when it stops. The α cut, temperature and the other
cutoffs apply as before. Without guidance (FewGen) it changes nothing.
"""
from __future__ import annotations

import torch


def special_token_ids(lm) -> list[int]:
    """EOS ids and the tokenizer's special and added control tokens, within the model's vocabulary."""
    tok = lm.tokenizer
    ids = set(lm.eos_token_ids)
    ids.update(int(i) for i in (getattr(tok, "all_special_ids", None) or []))
    for i, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    vocab = lm.vocab_size
    return sorted(i for i in ids if 0 <= i < vocab)


def special_token_mask(lm) -> torch.Tensor:
    """[V] bool on the model's device: True at ``special_token_ids``."""
    mask = torch.zeros(lm.vocab_size, dtype=torch.bool)
    mask[special_token_ids(lm)] = True
    return mask.to(lm.device)
