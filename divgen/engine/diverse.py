"""N diverse answers to one prompt (``divgen generate PROMPT -n N --diverse G``).

The N rows of the prompt form one guidance group and contrast each other: intra-prompt CorrSynth
with scale G, γ_{m,n} = (G − 1)/(N − 1) over the rows still running (DESIGN.md, "The math").
Every row is pushed away from the other rows' next-token distributions, which are conditioned
on their own histories, so once two rows have diverged they keep diverging — at no extra
forward cost (the same N rows are forwarded with or without it). G = 1 is plain sampling;
without ``diverse`` the rows are independent samples (the default).

    results, stats = generate_diverse(lm, lm.format_prompt("Name a cat."), n=8, diverse=2.0, seeds=0)
"""
from __future__ import annotations

from divgen.engine.errors import DivgenError

# guidance.MAX_WEIGHT, repeated so that the CLI's check imports no torch (a test ties the two)
MAX_SCALE = 100.0


def check_diverse(n: int, diverse: float | None) -> None:
    """Refuse a bad ``--diverse`` (before any slow work)."""
    if diverse is None:
        return
    diverse = float(diverse)
    if not 1.0 <= diverse <= MAX_SCALE:
        raise DivgenError(f"--diverse G must be in [1, {MAX_SCALE:g}] (the CorrSynth scale; 1 = off), got {diverse:g}")
    if n < 2:
        raise DivgenError(f"--diverse contrasts the samples with each other: give -n 2 or more (got -n {n})")


def diverse_guidance(n: int, diverse: float | None):
    """One CorrSynth ``Guidance`` over the n rows of one prompt, or None (independent samples)."""
    from divgen.engine.guidance import Guidance

    check_diverse(n, diverse)
    if diverse is None or float(diverse) == 1.0:
        return None
    return Guidance.corrsynth([0] * n, g=float(diverse))


def generate_diverse(lm, prompt, n: int, *, diverse: float | None = 2.0, **generate_kwargs):
    """``decode.generate`` of n samples of ``prompt`` (formatted text or token ids) whose rows
    contrast each other with scale ``diverse`` (None or 1: independent samples). The other
    arguments are ``generate``'s (max_new_tokens, temperature, min-p, seeds, stop, ...)."""
    from divgen.engine.decode import generate

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DivgenError(f"n must be an integer >= 1, got {n!r}")
    if "guidance" in generate_kwargs:
        raise DivgenError("generate_diverse builds the guidance itself: pass diverse=G, not guidance=")
    return generate(lm, [prompt] * n, guidance=diverse_guidance(n, diverse), **generate_kwargs)
