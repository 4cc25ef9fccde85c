"""Lockstep admission of divgen guidance groups in vLLM's v1 scheduler (``--scheduler-cls``).

    vllm serve MODEL --logits-processors divgen.bindings.vllm:DivgenVLLMLogitsProcessor \\
        --scheduler-cls divgen.bindings.vllm_scheduler.DivgenScheduler       (``divgen serve`` does this)

vLLM admits waiting requests as they arrive and as the token budget allows, so the members of a
group sent as separate HTTP requests (or the n children of one) may enter the batch steps apart,
and the first tokens of the early ones are never contrasted. ``DivgenScheduler`` is vLLM's
``Scheduler`` with one rule added in front of each ``schedule()`` call:

* A tagged request whose tag names the group's row count (``divgen_size``) waits until all
  ``size`` rows of its group are waiting, unstarted; then the whole group is admitted in one
  step, alone among the waiting requests of that step and only when the running batch leaves it
  room for every member and every prompt token (so no member is split by chunked prefill).
  Decoding rows are never held back; untagged requests and tags without a size pass as before.
* A group still incomplete ``DIVGEN_GROUP_TIMEOUT_S`` seconds (default 30) after its first member
  arrived fails as a whole: its waiting members finish with an error (HTTP 500 to the client)
  and the server logs one line naming the group, the rows that came and the fix. A group that
  can never fit (more rows than ``max_num_seqs``, more prompt tokens than the step's budget)
  fails at once the same way.

The processor then sees the members from the same step on, with equal step counters: the
tokens are divgen engine's for the same prompts and seeds (up to the two forwards' rounding).
A member preempted under KV-cache pressure rejoins late (vLLM's rule); run with room to spare.
"""
from __future__ import annotations

import logging
import time

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from divgen.bindings.vllm import group_timeout_s, parse_tag
from divgen.engine.errors import DivgenError

logger = logging.getLogger("divgen.vllm")
# a member not yet started: waiting, or waiting for its structured-output grammar to compile
_UNSTARTED = (RequestStatus.WAITING, RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR)


def _group_of(request) -> tuple[str, int] | None:
    """(group id, size) of a request waiting for lockstep admission, else None."""
    params = getattr(request, "sampling_params", None)
    try:
        tag = parse_tag(getattr(params, "extra_args", None))
    except DivgenError:
        return None                      # refused at validation; never here
    if tag is None or tag.size < 1:
        return None
    return tag.group, tag.size


class DivgenScheduler(Scheduler):
    """vLLM's scheduler, admitting each sized divgen group in one step (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.divgen_timeout_s = group_timeout_s()
        self._first_seen: dict[str, float] = {}

    def _fails(self, requests, why: str) -> None:
        ids = [r.request_id for r in requests]
        logger.error("divgen: %s; its %d waiting request(s) fail", why, len(ids))
        # the scheduler's own path for failing requests before they run: finished with
        # FINISHED_ERROR and reported to their clients in this step's update_from_output
        self.grammar_compile_error_reqs.update(ids)

    @staticmethod
    def _grammar_ready(request) -> bool:
        """False while a member's structured-output grammar compiles. A held request is out of
        ``self.waiting``, where vLLM would promote it once its grammar is ready, so the promotion
        is made here, by vLLM's rule (a failed compilation is left to vLLM, which fails it)."""
        if request.status != RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR:
            return True
        grammar = getattr(getattr(request, "structured_output_request", None), "grammar", None)
        if grammar is None:
            return False
        if not isinstance(grammar, Exception):
            request.status = RequestStatus.WAITING
        return True

    def _hold(self) -> list:
        """Requests taken out of ``self.waiting`` for this step (put back after it)."""
        now = time.monotonic()
        groups: dict[str, list] = {}
        sizes: dict[str, int] = {}
        for request in list(self.waiting):
            key = _group_of(request)
            if key is None or request.status not in _UNSTARTED or request.num_computed_tokens:
                continue
            if request.request_id in self.grammar_compile_error_reqs:
                continue
            groups.setdefault(key[0], []).append(request)
            sizes[key[0]] = key[1]
        for gone in set(self._first_seen) - set(groups):
            del self._first_seen[gone]
        ready, held = None, []
        budget = self.max_num_scheduled_tokens - len(self.running)      # decoding rows take one each
        for group, members in groups.items():
            first = self._first_seen.setdefault(group, now)
            size = sizes[group]
            prompt_tokens = sum(r.num_tokens for r in members)
            if len(members) > size:
                self._fails(members, f"group {group!r} has {len(members)} waiting rows but divgen_size {size}: "
                                     "send divgen_size = requests × n")
            elif size > self.max_num_running_reqs or prompt_tokens > self.max_num_scheduled_tokens:
                self._fails(members, f"group {group!r} ({size} rows, {prompt_tokens} prompt tokens) can never be "
                                     f"admitted in one step (max_num_seqs {self.max_num_running_reqs}, "
                                     f"max_num_batched_tokens {self.max_num_scheduled_tokens}): raise them or "
                                     "send a smaller group")
            elif len(members) < size:
                if now - first > self.divgen_timeout_s:
                    self._fails(members, f"group {group!r} waited {now - first:.0f} s with {len(members)} of its "
                                         f"{size} rows (DIVGEN_GROUP_TIMEOUT_S = {self.divgen_timeout_s:g}): send "
                                         "all members together, or fix divgen_size")
                else:
                    held += members
            elif (ready is None and all(map(self._grammar_ready, members))
                  and len(self.running) + size <= self.max_num_running_reqs and prompt_tokens <= budget):
                ready = members
            else:
                held += members                                # complete: admitted in a later step
        if ready is not None:   # the group alone among this step's waiting requests
            chosen = {id(r) for r in ready}
            held = [r for r in self.waiting if id(r) not in chosen]
        if held:
            self.waiting.remove_requests(held)
        return held

    def schedule(self, *args, **kwargs):
        held = self._hold()
        try:
            return super().schedule(*args, **kwargs)
        finally:
            if held:
                self.waiting.prepend_requests(held)
                if not self.running and len(self.waiting) == len(held):
                    time.sleep(0.002)          # only incomplete groups wait: do not spin the core
