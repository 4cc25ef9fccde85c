"""divgen guidance inside vLLM: a v1 logits processor for requests tagged with a guidance group.

    from vllm import LLM, SamplingParams
    from divgen.bindings.vllm import DivgenVLLMLogitsProcessor, divgen_tag

    llm = LLM(model=path, logits_processors=[DivgenVLLMLogitsProcessor])
    params = SamplingParams(n=8, temperature=0.8, seed=0, max_tokens=64,
                            extra_args=divgen_tag(group="q1", scale=2.0))   # 8 rows contrast each other
    outputs = llm.generate([prompt], params)

Over HTTP: ``divgen serve MODEL`` (vLLM's OpenAI-compatible server with this processor and
``vllm_scheduler.DivgenScheduler``) and ``"vllm_xargs": {"divgen_group": "q1", "divgen_scale": 2,
"divgen_size": 4}`` in each member's body (``divgen_size``: the group's row count, requests × n).

Tags are flat ``extra_args`` keys with the prefix ``divgen_`` (vLLM's HTTP ``vllm_xargs`` takes no
nested values), built and checked by ``divgen_tag``; ``divgen_group`` marks a request as tagged:

| divgen_method | divgen_* fields            | γ_{m,n} of row m over the present members n ≠ m of its group |
|---------------|----------------------------|---------------------------------------------------------------|
| corrsynth     | scale g                    | (g − 1) / (K − 1), K = members present                         |
| m-corrsynth   | label, gamma γ, delta δ    | γ / #{n: y_n ≠ y_m} across labels, δ / #{n ≠ m: y_n = y_m} within |
| explicit      | member i, weights [w_0..]  | weights[member of n] (0 past the list's end)                  |

The rule is divgen's own (``engine.guidance.Guidance``), applied with the row's *own* tag: each
row's guidance is its row of γ, so members need not agree. For every tagged row of the step the
processor computes ``s_m = Σ_n mix[m, n] · ℓ_n`` and samples it with divgen's kernels
(``kernels.guided_sample_step``, the same tokens as ``kernels.reference.guided_sample``):
the papers' α (``divgen_alpha``) on the row's *own* distribution, then the request's
``temperature``, ``min_p`` (vLLM's min-p, after temperature), ``top_k``, ``top_p``, and its
presence/frequency/repetition penalties (applied to the row's logits first: vLLM applies them
after the processors, where they would change nothing), and Gumbel noise that is a pure function of (seed, step, token) — ``seed`` is the
request's seed (a random one when None; vLLM gives the n children of a request seed + i, as divgen
does), ``step`` the number of tokens the request has generated. The processor returns logits that
are −inf except at that token, so vLLM's own sampler emits exactly divgen's choice.

Who counts as a member, step by step (vLLM's persistent batch has no lockstep):

* **present**: a tagged request in this step's batch with the same group id. Only present
  members are contrasted, and weights are recomputed over them by the rule above whenever the
  batch changes — a group with one present member is plain divgen sampling.
* **finished** (EOS, stop, length, aborted): vLLM removes it from the batch; it leaves the group
  exactly as a finished row leaves its group in divgen's engine.
* **not yet started / waiting / preempted**: not in the batch, so not contrasted until it is; a
  member that joins late starts its own step counter at 0 and is contrasted with the others'
  current distributions.
* When all members are admitted in the same step the rows are in lockstep and the tokens are
  divgen engine's tokens for the same seeds. ``DivgenScheduler`` (``--scheduler-cls``, set by
  ``divgen serve``) admits the ``divgen_size`` rows of a group together, with any engine core;
  without it, one offline ``generate`` call whose prompts fit the batch with the engine core
  in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) is admitted in one step.
* A token another mechanism masked (−inf: min_tokens, allowed ids, bad words, a grammar) in a
  contrasting member is read as agreeing with the row's own logit (``kernels.reference``, the
  mask rule): it never attracts the other members.

Untagged requests are never touched. A group with more than ``kernels.MAX_GROUP_ROWS`` (256)
present members is contrasted in chunks of 256 (batch order). Limits: a member whose prompt is
still being prefilled in chunks is contrasted with its partial-prompt logits (keep such prompts
under ``max_num_batched_tokens`` or disable chunked prefill); speculative decoding is not supported.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from divgen.engine import limits
from divgen import kernels
from divgen.engine.errors import DivgenError
from divgen.engine.guidance import MAX_WEIGHT, Guidance, mix_from_gammas
from divgen.kernels.plan import build_group_plan

try:
    from vllm.v1.sample.logits_processor import LogitsProcessor as _VllmLogitsProcessor
except ImportError:  # vLLM absent: the bookkeeping below still runs (the main suite tests it)
    _VllmLogitsProcessor = object

TAG_PREFIX = "divgen_"
TAG_FIELDS = ("group", "method", "scale", "label", "gamma", "delta", "member", "weights", "size", "alpha")
TAG_METHODS = limits.TAG_METHODS
_GREEDY_EPS = 1e-5       # vLLM treats a temperature below this as greedy


DEFAULT_GROUP_TIMEOUT_S = 30.0  # DivgenScheduler: seconds a sized group may wait for its rows


def group_timeout_s() -> float:
    """``DIVGEN_GROUP_TIMEOUT_S`` (seconds, default 30), checked: how long ``DivgenScheduler``
    holds an incomplete group before failing it."""
    import os

    from divgen.engine import limits

    raw = os.environ.get("DIVGEN_GROUP_TIMEOUT_S", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_GROUP_TIMEOUT_S
    except ValueError:
        value = float("nan")
    if not 0 < value <= limits.MAX_GROUP_TIMEOUT_S:
        raise DivgenError(f"DIVGEN_GROUP_TIMEOUT_S must be a number of seconds in (0, {limits.MAX_GROUP_TIMEOUT_S:g}], "
                          f"got {raw!r}: set it so, or unset it (default {DEFAULT_GROUP_TIMEOUT_S:g})")
    return value


# ----------------------------------------------------------------------------------------------
# Tags
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tag:
    """One request's guidance tag (validated)."""

    group: str
    method: str = "corrsynth"
    scale: float = 1.0                      # corrsynth g
    label: str | None = None                # m-corrsynth
    gamma: float = 0.0                      # m-corrsynth cross-label weight
    delta: float = 0.0                      # m-corrsynth intra-label weight
    member: int = 0                         # explicit: this request's index in weights
    weights: tuple[float, ...] = ()         # explicit: γ toward member 0, 1, ...
    size: int = 0                           # rows of the group (requests × n): the scheduler
    #                                         admits them together (0: as they come)
    alpha: float = 0.0                      # the papers' α on the row's own, untempered distribution

    def rule(self) -> tuple:
        """Rows whose tags share this key share one divgen Guidance."""
        return (self.method, self.scale, self.gamma, self.delta)


def _number(fields: dict, name: str, low: float, default=None) -> float:
    value = fields.get(name, default)
    if value is None:
        raise DivgenError(f"divgen tag: '{TAG_PREFIX}{name}' is required for method {fields.get('method', 'corrsynth')!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= MAX_WEIGHT:
        raise DivgenError(f"divgen tag: '{TAG_PREFIX}{name}' must be a number in [{low:g}, {MAX_WEIGHT:g}], got {value!r}")
    return float(value)


def parse_tag(extra_args) -> Tag | None:
    """The Tag of a request's ``extra_args`` (None when untagged). Raises DivgenError."""
    if not extra_args:
        return None
    fields = {k[len(TAG_PREFIX):]: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith(TAG_PREFIX)}
    if not fields:
        return None
    unknown = sorted(TAG_PREFIX + k for k in set(fields) - set(TAG_FIELDS))
    if unknown:
        raise DivgenError(f"divgen tag: unknown key(s) {unknown}; known: {[TAG_PREFIX + k for k in TAG_FIELDS]}")
    group = fields.get("group")
    if isinstance(group, bool) or not isinstance(group, (str, int)) or group == "":
        raise DivgenError("divgen tag: 'divgen_group' must be a non-empty string or an integer (the guidance group id)")
    method = fields.get("method", "corrsynth")
    if method not in TAG_METHODS:
        raise DivgenError(f"divgen tag: divgen_method must be one of {', '.join(TAG_METHODS)}, got {method!r}")
    size = fields.get("size")           # absent: no lockstep admission (0 below)
    if size is None:
        size = 0
    elif isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= limits.MAX_TAG_GROUP_SIZE:
        raise DivgenError(f"divgen tag: 'divgen_size' must be the group's row count, an integer in "
                          f"[1, {limits.MAX_TAG_GROUP_SIZE}] (requests × n), got {size!r}")
    alpha = fields.get("alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
        raise DivgenError(f"divgen tag: 'divgen_alpha' must be a number in [0, 1) (the papers' α; the "
                          f"request's min_p is transformers'/vLLM's min-p), got {alpha!r}")
    common = dict(size=size, alpha=float(alpha))
    if method == "corrsynth":
        return Tag(str(group), method, scale=_number(fields, "scale", 1.0), **common)
    if method == "m-corrsynth":
        label = fields.get("label")
        if label is None:
            raise DivgenError("divgen tag: m-corrsynth needs a 'divgen_label' per request")
        return Tag(str(group), method, label=str(label), gamma=_number(fields, "gamma", 0.0),
                   delta=_number(fields, "delta", 0.0), **common)
    member, weights = fields.get("member"), fields.get("weights")
    if isinstance(member, bool) or not isinstance(member, int) or member < 0:
        raise DivgenError("divgen tag: explicit guidance needs 'divgen_member', this request's index >= 0 in the group")
    if not isinstance(weights, (list, tuple)) or not weights:
        raise DivgenError("divgen tag: explicit guidance needs 'divgen_weights', this request's γ toward member 0, 1, ...")
    ws = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or abs(w) > MAX_WEIGHT:
            raise DivgenError(f"divgen tag: divgen_weights must be finite numbers within ±{MAX_WEIGHT:g}, got {w!r}")
        ws.append(float(w))
    return Tag(str(group), method, member=member, weights=tuple(ws), **common)


def divgen_tag(group, *, scale=None, method: str = "corrsynth", label=None, gamma=None, delta=None,
               member=None, weights=None, size=None, alpha=None) -> dict:
    """``extra_args`` for a tagged request, checked now: ``SamplingParams(extra_args=divgen_tag(...))``
    (merge it with other extra_args as a dict; over HTTP send it as ``vllm_xargs``). ``size``: the
    group's row count (requests × n), for lockstep admission by ``DivgenScheduler``; ``alpha``: the
    papers' α (the request's own ``min_p`` keeps vLLM's meaning)."""
    fields = {"group": group, "method": method}
    for name, value in (("scale", scale), ("label", label), ("gamma", gamma), ("delta", delta),
                        ("member", member), ("weights", list(weights) if weights is not None else None),
                        ("size", size), ("alpha", alpha)):
        if value is not None:
            fields[name] = value
    tag = {TAG_PREFIX + k: v for k, v in fields.items()}
    parse_tag(tag)
    return tag


# ----------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------
@dataclass
class _Request:
    """What the processor keeps of one tagged request in the persistent batch."""

    tag: Tag
    seed: int
    output: list                 # vLLM's running list of generated ids (its length is the step)
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    alpha: float
    prompt: list                 # prompt ids (repetition penalty)
    presence: float = 0.0        # vLLM's penalties, applied here as vLLM applies them to untagged rows
    frequency: float = 0.0
    repetition: float = 1.0

    @property
    def penalised(self) -> bool:
        return self.presence != 0 or self.frequency != 0 or self.repetition != 1


def _request_of(params, prompt, output: list, rng: random.Random) -> _Request | None:
    tag = parse_tag(getattr(params, "extra_args", None))
    if tag is None:
        return None
    seed = params.seed if params.seed is not None else rng.randrange(-(2 ** 63), 2 ** 63)
    temperature = float(params.temperature)
    return _Request(
        tag=tag, seed=int(seed), output=output,
        temperature=0.0 if temperature < _GREEDY_EPS else temperature,
        top_k=max(0, int(params.top_k or 0)), top_p=float(params.top_p), min_p=float(params.min_p or 0.0),
        alpha=tag.alpha, prompt=list(prompt or ()),
        presence=float(getattr(params, "presence_penalty", 0.0) or 0.0),
        frequency=float(getattr(params, "frequency_penalty", 0.0) or 0.0),
        repetition=float(getattr(params, "repetition_penalty", 1.0) or 1.0),
    )


def apply_penalties(logits: torch.Tensor, reqs: list[_Request]) -> torch.Tensor:
    """vLLM's penalties, IN PLACE on the tagged rows' logits [T, V] (the rows of ``reqs``):
    repetition (a logit of a token in the prompt or the output is divided by r when > 0, else
    multiplied by r), then frequency (− f · count in the output) and presence (− p if in it).

    vLLM applies them after the logits processors, i.e. to this processor's one-hot output,
    where they change nothing; so they are applied here first, to the scores divgen samples."""
    vocab = logits.shape[1]
    for i, r in enumerate(reqs):
        if not r.penalised:
            continue
        row = logits[i]
        out = torch.tensor([t for t in r.output if 0 <= t < vocab], dtype=torch.int64)
        counts = torch.bincount(out, minlength=vocab).to(row.device, row.dtype)        # [V]
        if r.repetition != 1:
            seen = counts > 0
            prompt = torch.tensor([t for t in r.prompt if 0 <= t < vocab], dtype=torch.int64, device=row.device)
            seen[prompt] = True
            row.copy_(torch.where(seen, torch.where(row > 0, row / r.repetition, row * r.repetition), row))
        row.sub_(r.frequency * counts + r.presence * (counts > 0).to(row.dtype))
    return logits


def group_gammas(tags: list[Tag]) -> torch.Tensor:
    """γ [K, K] of the present members of one group (their tags, batch order), zero diagonal.

    Row m follows m's own tag; rows that share a rule share one divgen ``Guidance``."""
    k = len(tags)
    gam = torch.zeros(k, k, dtype=torch.float32)
    if k < 2:
        return gam
    everyone = list(range(k))
    by_rule: dict[tuple, list[int]] = {}
    for m, tag in enumerate(tags):
        by_rule.setdefault(tag.rule(), []).append(m)
    for rule, rows in by_rule.items():
        method = rule[0]
        if method == "corrsynth":
            full = Guidance.corrsynth([0] * k, g=tags[rows[0]].scale).gamma_matrix(everyone)
        elif method == "m-corrsynth":
            labels = [t.label if t.method == "m-corrsynth" else None for t in tags]
            full = Guidance.m_corrsynth([0] * k, labels, gamma=tags[rows[0]].gamma,
                                        delta=tags[rows[0]].delta).gamma_matrix(everyone)
        else:
            full = torch.zeros(k, k)
            for m in rows:
                w = tags[m].weights
                full[m] = torch.tensor([w[t.member] if t.member < len(w) else 0.0 for t in tags])
            full.fill_diagonal_(0.0)
            full = Guidance.explicit([0] * k, full).gamma_matrix(everyone)
        gam[rows] = full[rows]
    return gam


class DivgenVLLMLogitsProcessor(_VllmLogitsProcessor):
    """vLLM v1 logits processor: divgen guidance over tagged requests (see the module docstring).

    Steps, each vLLM step: (1) ``update_state`` follows the persistent batch (removed, added,
    moved) and, when it changed, rebuilds the tagged rows' mix (block-diagonal by group) into a
    ``kernels.SamplePlan``, and their per-row parameters; (2) ``apply`` samples every tagged row
    with ``kernels.guided_sample_step`` (each row at its own step counter) and makes its logits
    one-hot on that token; untagged rows pass through unchanged.
    """

    def __init__(self, vllm_config=None, device: torch.device | str = "cpu", is_pin_memory: bool = False):
        self.device = torch.device(device)
        self.requests: dict[int, _Request] = {}      # batch index -> tagged request
        self._rng = random.Random()
        self._dirty = False
        self.order: list[int] = []                     # batch indices of tagged rows, ascending
        self.rows = torch.zeros(0, dtype=torch.int64)  # the same, [T] on the device
        self.plan: kernels.SamplePlan | None = None    # the tagged rows' groups and mix
        self.any_top_k_top_p = self.any_min_p = self.any_penalties = False
        self.reqs: list[_Request] = []
        self.params: dict[str, torch.Tensor] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        try:
            parse_tag(getattr(sampling_params, "extra_args", None))
        except DivgenError as exc:
            raise ValueError(str(exc)) from exc

    def is_argmax_invariant(self) -> bool:
        return False        # it chooses the token, greedy rows included

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._dirty |= self.requests.pop(index, None) is not None
        for index, params, prompt, output in batch_update.added:
            request = _request_of(params, prompt, output, self._rng)
            old = self.requests.pop(index, None)
            if request is not None:
                self.requests[index] = request
            self._dirty |= request is not None or old is not None
        for a, b, direction in batch_update.moved:
            ra, rb = self.requests.pop(a, None), self.requests.pop(b, None)
            swap = getattr(direction, "name", direction) == "SWAP"
            if ra is not None:
                self.requests[b] = ra
            if rb is not None and swap:
                self.requests[a] = rb
            self._dirty |= ra is not None or rb is not None
        if self._dirty:
            self._rebuild()

    def _rebuild(self) -> None:
        self._dirty = False
        order = self.order = sorted(self.requests)
        reqs = [self.requests[i] for i in order]
        if not reqs:                    # no tagged request left: apply() returns at once
            self.plan, self.params = None, {}
            return
        self.rows = torch.tensor(order, dtype=torch.int64, device=self.device)
        by_group: dict[str, list[int]] = {}
        for pos, r in enumerate(reqs):
            by_group.setdefault(r.tag.group, []).append(pos)
        blocks = []         # (positions, weights) of each coupled group, as the engine's plan takes them
        for members in by_group.values():
            # the kernels take up to MAX_GROUP_ROWS rows per group: a larger group is contrasted
            # in chunks of that many present members (batch order)
            for lo in range(0, len(members), kernels.MAX_GROUP_ROWS):
                chunk = members[lo:lo + kernels.MAX_GROUP_ROWS]
                gam = group_gammas([reqs[p].tag for p in chunk])
                if bool((gam != 0).any()):
                    blocks.append((chunk, mix_from_gammas(gam)))
        blocks.sort(key=lambda block: block[0][0])
        # masks (the default): vLLM's own masks (min_tokens, grammars) come before this processor
        self.plan = build_group_plan(blocks, len(order), self.device, guided=bool(blocks))
        self.any_top_k_top_p = any(r.top_k > 0 or r.top_p < 1 for r in reqs)
        self.any_min_p = any(r.min_p > 0 for r in reqs)
        self.any_penalties = any(r.penalised for r in reqs)
        self.reqs = reqs
        dev = self.device
        self.params = dict(
            seeds=torch.tensor([r.seed for r in reqs], dtype=torch.int64, device=dev),
            temperature=torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=dev),
            top_k=torch.tensor([r.top_k for r in reqs], dtype=torch.int64, device=dev),
            top_p=torch.tensor([r.top_p for r in reqs], dtype=torch.float32, device=dev),
            min_p=torch.tensor([r.min_p for r in reqs], dtype=torch.float32, device=dev),
            alpha=torch.tensor([r.alpha for r in reqs], dtype=torch.float32, device=dev),
        )

    def steps(self) -> list[int]:
        """Each tagged row's decode step: the tokens its request has generated so far."""
        return [len(self.requests[i].output) for i in self.order]   # host lists only: no device sync

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # logits [B, V] -> the same tensor, tagged rows one-hot (0 at divgen's token, -inf elsewhere)
        if not self.requests:
            return logits
        p = self.params
        step = torch.tensor(self.steps(), dtype=torch.int64).to(self.device, non_blocking=True)   # [T]
        tagged = logits[self.rows]                                            # [T, V] a copy
        if self.any_penalties:
            apply_penalties(tagged, self.reqs)
        tokens = kernels.guided_sample_step(
            tagged, self.plan, p["seeds"], step, p["temperature"], p["alpha"], p["top_k"], p["top_p"],
            min_p=p["min_p"] if self.any_min_p else None, any_top_k_top_p=self.any_top_k_top_p,
        )                                                                     # [T]
        logits[self.rows] = float("-inf")
        logits[self.rows, tokens.to(logits.device)] = 0.0
        return logits
