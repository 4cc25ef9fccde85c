"""Guidance specs: which rows are contrasted, and with what weights γ_{m,n} (DESIGN.md table).

A ``Guidance`` names a guidance group per row and a rule (the papers' g, γ, δ). For the rows
still active, ``weight_blocks`` yields each coupled group's positions and its block of weights —
diagonal 1 + Σ_n γ_{m,n}, off-diagonal −γ_{m,n} — so the guided scores of a group are
``weights @ log_softmax(logits[group])``; the scheduler hands the blocks to the kernels' plan as
they are. ``_gammas`` is the one place the rules of the table below are written. Weights are
recomputed whenever a row finishes and leaves its group; a group with one active row is plain
sampling. ``mixing_matrix`` assembles the dense [A, A] mix from the same blocks (the HF binding,
the reference and the tests).

| method      | γ_{m,n} over the active rows n ≠ m of m's group                                 |
|-------------|----------------------------------------------------------------------------------|
| corrsynth   | (g − 1) / (K − 1), K = active rows in the group                                  |
| m-corrsynth | γ / #{n: y_n ≠ y_m} across labels,  δ / #{n ≠ m: y_n = y_m} within a label       |
| cfg         | (g − 1) / #shadows of m for each active shadow n of leader m; shadows get none   |
| explicit    | the user's matrix, restricted to active rows of the same group                   |

CFG shadow rows carry a negative prompt, are forwarded every step, take their leader's sampled
token (so they share its history), and are never returned as samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from divgen.engine import limits
from divgen.engine.errors import DivgenError
from divgen.engine.limits import MAX_WEIGHT



@dataclass(frozen=True)
class Guidance:
    """How the rows of one decode batch are contrasted. Per-row lists have one entry per row."""

    method: str                                 # one of limits.GUIDANCE_RULES
    groups: tuple[int, ...]                     # guidance group id of each row
    g: float = 1.0                              # the papers' g (corrsynth, cfg)
    gamma: float = 0.0                          # cross-label weight (m-corrsynth)
    delta: float = 0.0                          # intra-label weight (m-corrsynth)
    labels: tuple | None = None                 # label of each row (m-corrsynth)
    shadow_of: tuple[int | None, ...] | None = None   # cfg: leader row of each shadow row
    gammas: torch.Tensor | None = None          # explicit [R, R] γ matrix

    # ---- constructors (validate once, with messages that name the fix) ----
    @classmethod
    def corrsynth(cls, groups, g: float) -> "Guidance":
        groups = tuple(int(g) for g in groups)
        g = limits.guidance_scale(g, "guidance scale g")
        sizes = {g: groups.count(g) for g in set(groups)}
        small = [g for g, n in sizes.items() if n < 2]
        if small:
            raise DivgenError(f"CorrSynth needs at least 2 rows per group; group {small[0]} has 1 (use fewgen for 1 row)")
        return cls("corrsynth", groups, g=g)

    @classmethod
    def m_corrsynth(cls, groups, labels, gamma: float, delta: float) -> "Guidance":
        groups = tuple(int(g) for g in groups)
        if len(labels) != len(groups):
            raise DivgenError(f"m-corrsynth needs one label per row: {len(labels)} labels for {len(groups)} rows")
        gamma = limits.weight(gamma, "gamma (cross-label weight)")
        delta = limits.weight(delta, "delta (intra-label weight)")
        for g in set(groups):
            if groups.count(g) < 2:
                raise DivgenError(f"M-CorrSynth needs at least 2 rows per group; group {g} has 1")
        return cls("m-corrsynth", groups, gamma=gamma, delta=delta, labels=tuple(labels))

    @classmethod
    def cfg(cls, groups, shadow_of, g: float) -> "Guidance":
        groups = tuple(int(g) for g in groups)
        shadow_of = tuple(None if s is None else int(s) for s in shadow_of)
        if len(shadow_of) != len(groups):
            raise DivgenError("cfg needs shadow_of with one entry per row (None for rows that are samples)")
        g = limits.guidance_scale(g, "guidance scale g")
        for row, leader in enumerate(shadow_of):
            if leader is None:
                continue
            if not (0 <= leader < len(groups)) or shadow_of[leader] is not None:
                raise DivgenError(f"row {row}: shadow_of must point at a sample row, got {leader}")
            if groups[leader] != groups[row]:
                raise DivgenError(f"row {row}: a shadow row must be in its leader's group")
        return cls("cfg", groups, g=g, shadow_of=shadow_of)

    @classmethod
    def explicit(cls, groups, gammas: torch.Tensor) -> "Guidance":
        groups = tuple(int(g) for g in groups)
        gammas = torch.as_tensor(gammas, dtype=torch.float32)
        rows = len(groups)
        if gammas.shape != (rows, rows):
            raise DivgenError(f"explicit guidance needs a [{rows}, {rows}] γ matrix, got {tuple(gammas.shape)}")
        if not torch.isfinite(gammas).all() or gammas.abs().max() > MAX_WEIGHT:
            raise DivgenError(f"explicit γ values must be finite and within ±{MAX_WEIGHT:g}")
        return cls("explicit", groups, gammas=gammas)

    # ---- derived ----
    @property
    def rows(self) -> int:
        return len(self.groups)

    def is_shadow(self, row: int) -> bool:
        return self.shadow_of is not None and self.shadow_of[row] is not None

    def leader(self, row: int) -> int:
        return self.shadow_of[row] if self.is_shadow(row) else row

    def _gammas(self, members: list[int]) -> torch.Tensor:
        """γ [n, n] fp32 (zero diagonal) among the active rows ``members`` of one group: the table
        of the module docstring, the one place it is written."""
        n = len(members)
        gam = torch.zeros(n, n, dtype=torch.float32)
        if self.method == "corrsynth":
            gam.fill_((self.g - 1.0) / (n - 1)).fill_diagonal_(0.0)
        elif self.method == "m-corrsynth":
            for i, m in enumerate(members):
                same = [j for j, r in enumerate(members) if j != i and self.labels[r] == self.labels[m]]
                cross = [j for j, r in enumerate(members) if self.labels[r] != self.labels[m]]
                if same:
                    gam[i, same] = self.delta / len(same)
                if cross:
                    gam[i, cross] = self.gamma / len(cross)
        elif self.method == "cfg":
            for i, m in enumerate(members):
                shadows = [j for j, r in enumerate(members) if self.shadow_of[r] == m]
                if shadows and not self.is_shadow(m):
                    gam[i, shadows] = (self.g - 1.0) / len(shadows)
        elif self.method == "explicit":
            idx = torch.tensor(members)
            gam = self.gammas[idx[:, None], idx[None, :]].clone().fill_diagonal_(0.0)
        else:
            raise DivgenError(f"unknown guidance method {self.method!r}: use one of {', '.join(limits.GUIDANCE_RULES)}")
        return gam

    def weight_blocks(self, active: list[int | None]) -> list[tuple[list[int], torch.Tensor]]:
        """The coupled groups of the active rows (original row ids by batch position, None where a
        position holds no row, e.g. the engine's free slots): for each, its positions
        (ascending) and its weights [n, n] fp32 (diagonal 1 + Σ_n γ_{m,n}, off-diagonal −γ_{m,n}),
        ordered by first position; the engine hands them to ``build_group_plan`` as they are.
        Rows coupled to no other row (a group with one active row, g = 1, a CFG leader without
        shadows) are left out: they sample alone."""
        from divgen.kernels.plan import guidance_groups      # the components of one small block

        by_group: dict[int, list[int]] = {}
        for pos, row in enumerate(active):
            if row is not None:
                by_group.setdefault(self.groups[row], []).append(pos)
        out = []
        for positions in by_group.values():
            if len(positions) < 2:
                continue
            gam = self._gammas([active[p] for p in positions])
            if not bool((gam != 0).any()):
                continue
            weights = mix_from_gammas(gam)
            for part in guidance_groups(weights, len(positions)):   # CFG: one part per leader
                if len(part) > 1:
                    idx = torch.tensor(part)
                    out.append(([positions[i] for i in part], weights[idx[:, None], idx[None, :]]))
        return sorted(out, key=lambda block: block[0][0])

    def gamma_matrix(self, active: list[int]) -> torch.Tensor:
        """γ over the active rows (original row ids, batch order) -> [A, A] fp32, zero diagonal."""
        from divgen.kernels.plan import dense_from_blocks

        gam = dense_from_blocks(self.weight_blocks(active), len(active)).neg_().fill_diagonal_(0.0)
        return gam + 0.0                                                  # no −0.0 entries


def mix_from_gammas(gam: torch.Tensor) -> torch.Tensor:
    """[A, A] γ (zero diagonal) -> mix with diagonal 1 + Σ_n γ_{m,n} and off-diagonal −γ_{m,n}."""
    mix = -gam.clone()
    mix += torch.diag(1.0 + gam.sum(dim=1))
    return mix


def mixing_matrix(guidance: Guidance | None, active: list[int], device=None) -> torch.Tensor | None:
    """The dense mix for the active rows, or None when no row is guided (plain sampling)."""
    if guidance is None:
        return None
    blocks = guidance.weight_blocks(active)
    if not blocks:
        return None
    from divgen.kernels.plan import dense_from_blocks

    return dense_from_blocks(blocks, len(active)).to(device if device is not None else "cpu")
