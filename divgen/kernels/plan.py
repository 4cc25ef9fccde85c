"""The group plan of guided sampling: built on the host once per batch composition, read by the step.

``build_sample_plan(mix, device)`` validates the [R, R] guidance mix (None = independent rows),
splits it into guidance groups (the connected components of its non-zero pattern: rows that
``mix`` couples, anywhere in the batch) and returns a ``SamplePlan`` of small device tensors:

    order       [R] int32     row ids sorted by group (a group's rows contiguous, ascending)
    group_start [NG + 1] int32  group g owns order[group_start[g]:group_start[g + 1]]
    w_offset    [NG] int64    group g's weights W_g [n_g, n_g] start at weights[w_offset[g]]
    weights     [Σ n_g²] fp32 W_g[i, j] = mix[order[start + i], order[start + j]], row-major
    mix         [R, R] fp32 or None, the dense mix (the torch reference multiplies with it)

Storage is ragged (Σ n_g² weights, not NG · G²), so one 256-row group beside 100 single rows
costs 256² + 100 weights.

Static plans (a compiled step, CUDA graphs): ``build_sample_plan(mix, device, rows=R,
static_block=B)`` pads every tensor to a shape that depends on R and B only (B: a power of two >=
the largest group the run will have): R groups (the missing ones empty), R·B weights, and — for
the Triton ops — R launch tiles (the extra ones on an empty group do nothing). Each later batch
composition is then copied into the first plan in place (``SamplePlan.copy_from``): the step
sees the same object with the same shapes and addresses, so what ``torch.compile`` guards on and
what a captured CUDA graph reads do not change as groups come and go (tests/test_static_plan.py
checks shapes, addresses and tokens on CPU; no GPU has replayed it yet).

The plan also holds the implementation (``ops``) chosen for its device
(``divgen.kernels.ops_for``) and whatever that implementation prepares once (the Triton launch
tiles). Building a plan reads ``mix`` on the host (a sync); the step never does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from divgen.engine.limits import MAX_GROUP_ROWS  # noqa: E402  rows in one guidance group (the kernels' maximum)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class SamplePlan:
    """Everything about a batch's guidance that stays fixed while its rows decode (see module doc).

    ``build_sample_plan(None, device)`` without ``rows`` gives a plan for independent rows of any
    count (rows None): the torch reference needs nothing more, and the Triton ops derive (once,
    cached) the plan of R rows at the first step with R rows (``for_rows``); take that first step
    before capturing a CUDA graph.
    """
    rows: int | None
    device: torch.device
    mix: torch.Tensor | None          # [R, R] fp32 on device, None = independent rows
    order: torch.Tensor               # [R] int32
    group_start: torch.Tensor         # [NG + 1] int32
    w_offset: torch.Tensor            # [NG] int64
    weights: torch.Tensor             # [Σ n_g²] fp32
    group_sizes: tuple[int, ...]      # n_g on the host (launch planning)
    static_block: int = 0             # > 0: a static plan (module doc); g_block is this, whatever the groups
    masks: bool = True                # contrasting rows may hold −inf (a mask): the Triton kernels
    #                                   compile the mask rule's terms in (False: finite model logits)
    own: torch.Tensor | None = None   # [V] bool: tokens outside the contrast (reference's own-token rule)
    ops: Any = field(repr=False, default=None)      # the implementation (divgen.kernels.KernelOps)
    prepared: Any = field(repr=False, default=None)  # what ``ops`` derived once (launch tiles)
    _by_rows: dict = field(repr=False, compare=False, default_factory=dict)

    def for_rows(self, rows: int) -> "SamplePlan":
        """This plan for R rows: itself when R is fixed, else the cached plan of R independent rows."""
        if self.rows is not None:
            return self
        plan = self._by_rows.get(rows)
        if plan is None:
            plan = self._by_rows[rows] = build_sample_plan(None, self.device, rows=rows, ops=self.ops)
        return plan

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def largest_group(self) -> int:
        return max(self.group_sizes)

    @property
    def g_block(self) -> int:
        """Next power of two >= the largest group (a static plan: its fixed block)."""
        return self.static_block or next_power_of_2(self.largest_group)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every device tensor the step reads (the plan's and its prepared launch tiles')."""
        out = {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}
        if self.prepared is not None:
            out.update({f"prepared.{k}": v for k, v in self.prepared.__dict__.items() if isinstance(v, torch.Tensor)})
        return out

    def copy_from(self, other: "SamplePlan") -> "SamplePlan":
        """Copy a static plan of the same shape into this one, in place (same tensors, same
        addresses: a compiled step sees no change but the values); returns self."""
        if not self.static_block or (other.static_block, other.rows) != (self.static_block, self.rows):
            raise ValueError("copy_from needs two static plans of the same rows and block")
        mine, theirs = self.tensors(), other.tensors()
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
            raise ValueError("copy_from needs plans of the same tensor shapes")
        for k, t in mine.items():
            t.copy_(theirs[k])
        object.__setattr__(self, "group_sizes", other.group_sizes)      # host-side, informational
        return self


def stage(parts, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Host values (lists or CPU tensors) -> device tensors of ``dtype``, in one copy: they are
    packed into one host buffer (pinned on CUDA, so the copy is non-blocking and does not drain
    the step's read lag) and split on the device."""
    flat = [torch.as_tensor(p, dtype=dtype).reshape(-1) for p in parts]
    host = torch.cat(flat) if flat else torch.zeros(0, dtype=dtype)
    if device.type == "cpu":
        buf = host
    else:
        buf = host.pin_memory().to(device, non_blocking=True)
    return list(torch.split(buf, [f.numel() for f in flat]))


def check_mix(mix, rows: int | None = None) -> int:
    """Shape, dtype and finiteness of a guidance mix; returns R. Reads the values (host sync)."""
    if not isinstance(mix, torch.Tensor) or mix.dim() != 2 or mix.shape[0] != mix.shape[1]:
        shape = tuple(mix.shape) if isinstance(mix, torch.Tensor) else type(mix).__name__
        raise ValueError(f"mix must be a square [R, R] tensor (rows x rows), got {shape}")
    if rows is not None and mix.shape[0] != rows:
        raise ValueError(f"mix must be a [{rows}, {rows}] tensor (rows x rows), got {tuple(mix.shape)}")
    if not mix.is_floating_point():
        raise ValueError(f"mix must be a floating tensor (fp32 guidance weights), got {mix.dtype}")
    if mix.shape[0] == 0:
        raise ValueError("mix must describe at least one row")
    if not bool(torch.isfinite(mix).all()):
        raise ValueError("mix must be finite (guidance weights γ are finite numbers)")
    return mix.shape[0]


def guidance_groups(mix: torch.Tensor | None, rows: int) -> list[list[int]]:
    """The connected components of ``mix``'s non-zero pattern, each a sorted list of row ids,
    ordered by their first row. mix None: every row alone."""
    if mix is None:
        return [[r] for r in range(rows)]
    dense = mix.detach().to("cpu", torch.float32)
    coupled = (dense != 0) | (dense != 0).T
    coupled |= torch.eye(rows, dtype=torch.bool)
    label = torch.arange(rows)
    while True:   # every row takes the smallest row id it reaches: its component's first row
        reached = torch.where(coupled, label[None, :], rows).min(dim=1).values
        new = torch.minimum(label, reached)
        new = new[new]                                                     # pointer jumping
        if torch.equal(new, label):
            break
        label = new
    return [torch.nonzero(label == first).flatten().tolist() for first in label.unique().tolist()]


def build_sample_plan(mix: torch.Tensor | None, device: torch.device | str, *, rows: int | None = None,
                      ops=None, static_block: int | None = None, masks: bool = True,
                      own: torch.Tensor | None = None) -> SamplePlan:
    """Validate ``mix`` and derive the group plan (host side, once per batch composition).

    Args:
        mix: [R, R] guidance mixing matrix (diagonal 1 + Σγ, off-diagonal −γ) or None for
            independent rows; then ``rows`` gives R (omitted: any R, see ``SamplePlan``).
        device: where the step runs; the plan's tensors live there.
        ops: the implementation; default ``divgen.kernels.ops_for(device)`` (chosen once here).
        static_block: build a static plan (module doc) for groups of up to this many rows (a
            power of two); needs ``rows``.
        masks: whether a contrasting row's logits may be −inf (another mechanism's mask: vLLM's
            min_tokens, grammars, ...). The reference applies the mask rule always; the Triton
            kernels compile its terms in only for such plans. False is a promise (the engine's
            model logits are finite) that saves those terms' registers.
        own: optional [V] bool on ``device``: tokens that take the row's own log-prob instead of
            the contrasted score (``reference``'s own-token rule; the Triton ops run the torch
            reference step for such plans).
    Raises: ValueError for a non-square / non-finite mix, a group over MAX_GROUP_ROWS rows, or
    (static) a group larger than ``static_block``.
    """
    device = torch.device(device)
    if ops is None:
        from divgen.kernels import ops_for

        ops = ops_for(device)
    if static_block is not None and rows is None and mix is None:
        raise ValueError("a static plan needs rows (its fixed row count)")
    if mix is None and rows is None:      # independent rows, any count (see SamplePlan)
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        return SamplePlan(rows=None, device=device, mix=None, order=empty, group_start=empty,
                          w_offset=empty.long(), weights=empty.float(), group_sizes=(1,),
                          masks=masks, own=own, ops=ops)
    if mix is None:
        if int(rows) < 1:
            raise ValueError(f"rows must be >= 1 (the number of independent rows), got {rows}")
        rows = int(rows)
    else:
        rows = check_mix(mix, rows)
    dense = None if mix is None else mix.detach().to("cpu", torch.float32)
    groups = [(g, None if dense is None else dense[torch.tensor(g)[:, None], torch.tensor(g)[None, :]])
              for g in guidance_groups(mix, rows)]
    return _plan(groups, rows, device, dense, ops=ops, static_block=static_block, masks=masks, own=own)


def build_group_plan(blocks, rows: int, device: torch.device | str, *, guided: bool = True, ops=None,
                     static_block: int | None = None, masks: bool = True,
                     own: torch.Tensor | None = None) -> SamplePlan:
    """The plan of ``rows`` rows from their coupled groups, as ``Guidance.weight_blocks`` yields
    them (the engine's path: no [R, R] matrix is searched for its groups).

    Args:
        blocks: [(row ids ascending, weights [n, n] fp32)] of the coupled groups, ordered by first
            row; every other row samples alone (weight 1).
        guided: keep a dense mix for the torch steps (the identity with the blocks written in), so
            a guided run keeps one form of step inputs to its end; False (no guidance): mix None.
        ops, static_block, masks, own: as ``build_sample_plan``.
    """
    device = torch.device(device)
    rows = int(rows)
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if ops is None:
        from divgen.kernels import ops_for

        ops = ops_for(device)
    coupled = {r for g, _ in blocks for r in g}
    groups = sorted([(list(g), w) for g, w in blocks] + [([r], None) for r in range(rows) if r not in coupled],
                    key=lambda gw: gw[0][0])
    dense = dense_from_blocks(blocks, rows) if guided else None
    return _plan(groups, rows, device, dense, ops=ops, static_block=static_block, masks=masks, own=own)


def dense_from_blocks(blocks, rows: int) -> torch.Tensor:
    """[rows, rows] fp32: the identity with each (row ids, weights) block written in place (the
    dense mix of the torch steps, the HF binding and the tests; the one place it is assembled)."""
    dense = torch.eye(rows, dtype=torch.float32)
    for g, w in blocks:
        idx = torch.tensor(g)
        dense[idx[:, None], idx[None, :]] = w
    return dense


def _plan(groups, rows: int, device: torch.device, dense, *, ops, static_block, masks, own=None) -> SamplePlan:
    """The plan's tensors from the groups [(row ids, weights [n, n] or None for a lone row)]."""
    largest = max(len(g) for g, _ in groups)
    if largest > MAX_GROUP_ROWS:
        raise ValueError(f"mix couples {largest} rows into one guidance group; the kernels handle up to "
                         f"{MAX_GROUP_ROWS} (split the batch into smaller groups)")
    block = 0
    if static_block is not None:
        block = int(static_block)
        if block < 1 or block & (block - 1) or block > MAX_GROUP_ROWS:
            raise ValueError(f"static_block must be a power of two in [1, {MAX_GROUP_ROWS}], got {static_block}")
        if largest > block:
            raise ValueError(f"a group of {largest} rows does not fit static_block {block}")
    order = [r for g, _ in groups for r in g]
    starts = [0]
    offsets, blocks = [], []
    for g, w in groups:
        starts.append(starts[-1] + len(g))
        offsets.append(sum(b.numel() for b in blocks))
        blocks.append(torch.ones(1) if w is None else w.reshape(-1).float())
    sizes = tuple(len(g) for g, _ in groups)
    if block:                   # pad to R groups (empty ones at the end) and R · block weights
        filled = sum(b.numel() for b in blocks)
        pad = rows - len(groups)
        starts += [rows] * pad
        offsets += [filled] * pad
        blocks.append(torch.zeros(rows * block - filled))
        sizes += (0,) * pad
    ints = stage([order, starts, offsets], torch.int64, device)
    floats = stage([torch.cat(blocks)] + ([] if dense is None else [dense.reshape(-1)]), torch.float32, device)
    plan = SamplePlan(
        rows=rows, device=device,
        mix=None if dense is None else floats[1].view(rows, rows),
        order=ints[0].to(torch.int32),
        group_start=ints[1].to(torch.int32),
        w_offset=ints[2],
        weights=floats[0],
        group_sizes=sizes,
        static_block=block,
        masks=masks,
        own=own,
        ops=ops,
    )
    return ops.prepare_plan(plan)
