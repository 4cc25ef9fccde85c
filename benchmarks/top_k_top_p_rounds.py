"""Rounds of the top-k / top-p sample / verify scheme on real next-token distributions.

The Triton step (``kernels/guided_sample_triton/rounds.py``, top-k / top-p by rounds) samples
over key(z) > lo, verifies the candidate with one measuring pass and either accepts it, raises
lo past it, or hands the row to the exact bisection. This script replays that rule in torch
(same decide rule as ``_decide_kernel``) on the embedded SmolLM2's next-token logits for
pool prompts of ag_news (row index % 10 == 0) and a few decode positions each, many noise
draws per distribution, and prints how many rounds rows need; every accepted token is checked
against the torch reference's token (argmax over K of z + Gumbel).

    .venv/bin/python -m benchmarks.top_k_top_p_rounds --prompts 40 --positions 2 --draws 32
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

DATA = Path("/work/shared/data/ag_news_test.csv")
# sm_90 SASS loop-body instructions a logit, bf16 logits, one row a program (python -m
# divgen.kernels.compile_check; kernels/README.md): the cost model of the printed figures
COST = dict(stats=25.6, sample=104.2, round_sample=114.4, verify=71.5, count_k=127.0, count_p=206.0)
SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 0.9), (1.0, 0, 0.95), (0.8, 0, 0.9), (0.8, 0, 0.95),
    (1.0, 50, 1.0), (0.8, 50, 1.0), (1.0, 50, 0.9), (0.8, 50, 0.95),
]


def kept_set(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """K as the reference defines it (threshold semantics, ties together), [D, V] bool."""
    vocab = z.shape[-1]
    k = top_k if top_k > 0 else vocab
    kth = torch.sort(z, dim=-1, descending=True).values[:, k - 1:k]
    z = torch.where(z >= kth, z, float("-inf"))
    if top_p >= 1:
        return z > float("-inf")
    p = torch.softmax(z.double(), dim=-1)
    order = torch.argsort(p, dim=-1, descending=True)
    ps = p.gather(1, order)
    above = torch.cumsum(ps, dim=-1) - ps                      # mass of tokens ranked higher
    # ties: mass strictly above = mass of tokens with larger p; fix ties by the first of a run
    first = torch.ones_like(ps, dtype=torch.bool)
    first[:, 1:] = ps[:, 1:] != ps[:, :-1]
    idx = torch.arange(vocab).expand_as(ps)
    run_start = torch.cummax(torch.where(first, idx, 0), dim=-1).values
    above = above.gather(1, run_start)
    keep_sorted = (above < top_p) & (ps > 0)
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep


PROBE_DEPTHS = (0.0, 1.0, 2.0, 4.0, 8.0, -1.0, -2.0, -4.0)   # guided_sample_triton.rounds._probe_levels


def probe_levels(zx, refine, center, spacing, depths=PROBE_DEPTHS):
    """``_probe_levels``: level 0 is zx; open rows zx − depth; refining rows center −
    (j − 1) · spacing, j = 1..7."""
    open_levels = torch.stack([zx - d for d in depths], dim=-1)
    j = torch.arange(len(depths), dtype=zx.dtype)
    return torch.where(refine[:, None] & (j > 0), center[:, None] - spacing[:, None] * (j - 1), open_levels)


def decide(z, zx, top_k: int, top_p: float, levels):
    """``_decide_kernel``'s rule on [D] candidates: accept, reject, the z level below which all is
    outside K, and the refine bracket (center, spacing) [D]."""
    finite = z > float("-inf")
    zmax = z.max(dim=-1, keepdim=True).values
    w = torch.where(finite, torch.exp(z - zmax), 0.0)
    gt = z > zx[:, None]
    cnt_gt, cnt_all = gt.sum(-1).float(), finite.sum(-1).float()
    mass_gt, mass_all = (w * gt).sum(-1), w.sum(-1)
    has_k, has_p = top_k > 0, top_p < 1
    k = float(min(top_k, z.shape[-1])) if has_k else 0.0
    ge = z[:, :, None] >= levels[:, None, :]
    c, m = ge.sum(1).float(), (w[:, :, None] * ge).sum(1)
    w_level = torch.exp(levels - zmax)
    m_lo = torch.maximum(torch.where(cnt_all <= k, mass_all, 0.0), torch.where(c <= k, m, 0.0).max(-1).values)
    m_hi = torch.minimum(mass_all, torch.where(c >= k, m, m + (k - c) * w_level).min(-1).values)
    in_k = (cnt_gt < k) if has_k else torch.ones_like(gt[:, 0])
    m_lo = torch.maximum(m_lo, torch.where(in_k, m[:, 0], 0.0))      # every z >= zx is in the top-k set
    if not has_k:
        m_lo = m_hi = mass_all
    in_p = (mass_gt < top_p * m_lo) if has_p else torch.ones_like(in_k)
    out_p = (mass_gt >= top_p * m_hi) if has_p else torch.zeros_like(in_k)
    below_out = torch.zeros_like(ge[:, 0, :])
    if has_k:
        below_out |= c >= k
    if has_p:
        below_out |= m >= (top_p * m_hi)[:, None]
    raise_to = torch.where(below_out, levels, float("-inf")).max(-1).values
    upper = torch.where(c <= k, levels, float("inf")).min(-1).values
    upper = torch.where(upper == float("inf"), levels.max(-1).values, upper)
    lower = torch.where(c >= k, levels, float("-inf")).max(-1).values
    lower = torch.where(lower == float("-inf"), upper - 32.0, lower)
    return in_k & in_p, (~in_k) | out_p, raise_to, upper, (upper - lower) / (levels.shape[-1] - 2)


def rounds_needed(z: torch.Tensor, gumbel: torch.Tensor, top_k: int, top_p: float, max_rounds: int = 4,
                  depths=PROBE_DEPTHS):
    """Per draw: the round (1..max_rounds) whose candidate is accepted, or 0 (bisection), and the
    numbers of rounds the draw was sampled in (open) and verified in (open or refining; states
    as ``_decide_kernel``)."""
    draws = z.shape[0]
    keep = kept_set(z[:1], top_k, top_p).expand_as(z)       # the draws share one distribution
    want = torch.argmax(torch.where(keep, z + gumbel, float("-inf")), dim=-1)
    z_min_kept = torch.where(keep, z, float("inf")).min(-1).values
    floor = torch.full((draws,), float("-inf"))       # candidates compete iff z >= floor and z > lo
    lo = torch.full((draws,), float("-inf"))
    state = torch.zeros(draws, dtype=torch.long)       # 0 open, 1 refine, 2 bisect, 3 accepted
    center = torch.zeros(draws)
    spacing = torch.zeros(draws)
    x = torch.zeros(draws, dtype=torch.long)
    out = torch.zeros(draws, dtype=torch.long)
    rounds_open = torch.zeros(draws, dtype=torch.long)
    rounds_sampled = torch.zeros(draws, dtype=torch.long)
    for r in range(1, max_rounds + 1):
        live = state <= 1
        rounds_open += live.long()
        rounds_sampled += (state == 0).long()
        allowed = (z > lo[:, None]) & (z >= floor[:, None])
        x = torch.where(state == 0, torch.argmax(torch.where(allowed, z + gumbel, float("-inf")), dim=-1), x)
        zx = z.gather(1, x[:, None])[:, 0]
        levels = probe_levels(zx, state == 1, center, spacing, depths)
        accept, reject, raise_to, c_new, s_new = decide(z, zx, top_k, top_p, levels)
        newly = live & accept
        assert torch.equal(x[newly], want[newly]), "an accepted candidate differs from the reference"
        out[newly] = r
        lo = torch.where(live & reject, torch.maximum(lo, zx), lo)
        floor = torch.where(live, torch.maximum(floor, raise_to), floor)
        assert bool((z_min_kept > lo).all() and (z_min_kept >= floor).all()), "a bound cut into K"
        center = torch.where(live, c_new, center)
        spacing = torch.where(live, s_new, spacing)
        nxt = torch.where(accept, 3, torch.where(torch.tensor(r == max_rounds), 2, torch.where(reject, 0, 1)))
        state = torch.where(live, nxt, state)
        if not (state <= 1).any():
            break
    return out, rounds_sampled, rounds_open


def load_prompts(n: int) -> list[str]:
    with DATA.open(newline="") as f:
        rows = list(csv.DictReader(f))
    pool = [r for i, r in enumerate(rows) if i % 10 == 0]
    return [f"{r['title']}. {r['description']}" for r in pool[:n]]


@torch.no_grad()
def next_token_logits(prompts: list[str], positions: int) -> torch.Tensor:
    """[prompts · positions, V] fp32 logits: the prompt's next token, then greedy continuations."""
    from divgen.engine.model import load_model

    lm = load_model(None, device="cpu", dtype="float32")
    out = []
    for text in prompts:
        ids = torch.tensor([lm.encode(lm.format_prompt(text))])
        past = None
        for _ in range(positions):
            res = lm.model(input_ids=ids, past_key_values=past, use_cache=True)
            logits = res.logits[0, -1].float()
            out.append(logits)
            past = res.past_key_values
            ids = torch.argmax(logits)[None, None]
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--positions", type=int, default=4, help="decode positions a prompt")
    ap.add_argument("--draws", type=int, default=64, help="noise draws a distribution")
    ap.add_argument("--rounds", type=int, default=4, help="sample / verify rounds before the bisection")
    ap.add_argument("--depths", default=",".join(str(d) for d in PROBE_DEPTHS),
                    help="probe levels below the candidate's z (nats; negative: above)")
    ap.add_argument("--cache", default="", help="a .pt file to keep the logits in between runs")
    args = ap.parse_args()
    depths = tuple(float(d) for d in args.depths.split(","))
    torch.manual_seed(0)
    if args.cache and Path(args.cache).exists():
        logits = torch.load(args.cache)
    else:
        logits = next_token_logits(load_prompts(args.prompts), args.positions)
        if args.cache:
            torch.save(logits, args.cache)
    print(f"{logits.shape[0]} distributions (SmolLM2-135M-Instruct, {args.prompts} ag_news pool prompts"
          f" x {args.positions} positions), {args.draws} draws each, vocab {logits.shape[1]}, "
          f"{args.rounds} rounds, probe depths {depths}")
    heads = " ".join(f"{'r' + str(r):>6}" for r in range(1, args.rounds + 1))
    print(f"{'T':>4} {'top_k':>5} {'top_p':>5} | {heads} {'bisect':>6} | {'rounds':>6} | insn/logit  x plain")
    plain = COST["stats"] + COST["sample"]
    for t, top_k, top_p in SETTINGS:
        counts = torch.zeros(args.rounds + 1, dtype=torch.long)
        opened = sampled = 0
        for row in logits:
            z = torch.log_softmax(row, -1)[None, :].expand(args.draws, -1) / t
            u = torch.rand(args.draws, row.shape[0]).clamp(2**-24, 1 - 2**-24)
            gumbel = -torch.log(-torch.log(u))
            acc, rounds_sampled, rounds_open = rounds_needed(z, gumbel, top_k, top_p, args.rounds, depths)
            counts += torch.bincount(acc, minlength=args.rounds + 1)
            opened += rounds_open.sum().item()
            sampled += rounds_sampled.sum().item()
        total = counts.sum().item()
        frac = (counts.double() / total).tolist()
        mean_rounds = opened / total
        cost = (COST["stats"] + sampled / total * COST["round_sample"] + mean_rounds * COST["verify"]
                + frac[0] * (8 * COST["count_k"] + 8 * COST["count_p"] + COST["round_sample"]))
        cells = " ".join(f"{f:6.3f}" for f in frac[1:])
        print(f"{t:4.1f} {top_k:5d} {top_p:5.2f} | {cells} {frac[0]:6.3f} | {mean_rounds:6.2f} |"
              f" {cost:10.0f} {cost / plain:6.2f}")
    worst = (COST["stats"] + args.rounds * (COST["round_sample"] + COST["verify"])
             + 8 * COST["count_k"] + 8 * COST["count_p"] + COST["round_sample"])
    print(f"plain step {plain:.0f} insn/logit; worst case (every round open, then the bisection) "
          f"{worst:.0f} = {worst / plain:.1f}x plain")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
