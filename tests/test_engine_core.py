"""The engine core on a tiny random-weight Llama: compiled step = eager step token for token per
method, batch invariance across admission time and slot reuse, the scheduler's γ recompute, and
the errors of requests that do not fit. Several EOS ids make rows finish at different steps so
slots are freed and refilled while others decode."""
import dataclasses
import os
import random

import pytest
import torch

from torch._dynamo.utils import counters

from divgen.engine import limits
from divgen.engine.decode import Engine, _StopChecker, distinct_prompts, generate
from divgen.engine.errors import DivgenError
from divgen.engine.guidance import Guidance, mix_from_gammas
from divgen.engine.model import LoadedModel
from divgen.engine.sampling import SamplingParams
from divgen.engine.scheduler import Scheduler

VOCAB = 97
EOS = frozenset(range(6, 12))          # ~6 % per step: rows end at scattered steps
NEW = 14
SAMPLING = dict(temperature=1.0, min_p=0.02, seeds=7)


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf = LlamaForCausalLM(cfg).eval()
    lm = LoadedModel(model=hf, tokenizer=None, name="tiny", device=torch.device("cpu"), dtype=torch.float32,
                     context_length=256, eos_token_ids=EOS, pad_token_id=0)
    lm.decode = lambda ids: " ".join(map(str, ids))      # no tokenizer: ids as text
    return lm


def prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(12, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(1, 12, (n,), generator=g)]


def guidance_for(method, n):
    if method == "fewgen":
        return None
    if method == "corrsynth":
        return Guidance.corrsynth([i // 3 for i in range(n)], g=2.5)
    if method == "m-corrsynth":
        return Guidance.m_corrsynth([i // 4 for i in range(n)], labels=[i % 2 for i in range(n)], gamma=1.0, delta=0.5)
    # cfg: leader + 2 shadows per sample
    return Guidance.cfg([i // 3 for i in range(n)], shadow_of=[None if i % 3 == 0 else i - i % 3 for i in range(n)],
                        g=3.0)


def texts(results):
    return [(r.row, r.token_ids, r.finish_reason) for r in results]


METHODS = list(limits.METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_compiled_step_equals_eager_step_token_for_token(tiny_lm, method):
    """torch.compile(decode_step, fullgraph=True) on CPU: no graph break, same tokens as eager,
    with slots freed and refilled (12 rows through 6 slots, EOS at scattered steps)."""
    ps = prompts(12)
    kw = dict(max_new_tokens=NEW, guidance=guidance_for(method, 12), max_batch_rows=6, **SAMPLING)
    eager, stats = generate(tiny_lm, ps, compile=False, **kw)
    graphs = counters["stats"]["unique_graphs"]
    compiled, _ = generate(tiny_lm, ps, compile=True, **kw)
    assert texts(compiled) == texts(eager)
    # at most one new graph for the run (none after its first step): on CPU the step reads the
    # plan's dense [S, S] mix only; tests/test_static_plan.py checks the Triton plan's fixed shapes
    assert counters["stats"]["unique_graphs"] - graphs <= 1
    assert {r.finish_reason for r in eager} == {"eos", "length"}       # the schedule did change
    assert stats.steps > NEW                                            # groups waited for slots


@pytest.mark.parametrize("method", ["fewgen", "corrsynth", "cfg"])
def test_group_in_a_refilled_batch_equals_the_group_alone(tiny_lm, method):
    """On CPU (results read at once) and with the CUDA schedule (read one step late)."""
    for lag in (False, True):
        _group_alone(tiny_lm, method, lag)


def _group_alone(tiny_lm, method, lag):
    ps = prompts(18, seed=2)
    g = guidance_for(method, 18)
    together, stats = _run(tiny_lm, ps, g, 6, lag)
    by_row = {r.row: r for r in together}
    assert stats.rows_forwarded < stats.slots_forwarded or stats.steps > NEW
    seeds = [SAMPLING["seeds"] + i for i in range(18)]
    for first in (6, 15):                  # admitted late, after other groups finished
        rows = list(range(first, first + 3))
        sub = None if g is None else _restrict(g, rows)
        alone, _ = _run(tiny_lm, [ps[r] for r in rows], sub, 3, lag, seeds=[seeds[r] for r in rows])
        for res in alone:
            ref = by_row[rows[res.row]]
            assert (res.token_ids, res.finish_reason) == (ref.token_ids, ref.finish_reason)


def _run(lm, ps, guidance, slots, lag, seeds=SAMPLING["seeds"]):
    params = SamplingParams.make(len(ps), temperature=1.0, alpha=SAMPLING["min_p"], seeds=seeds)
    engine = Engine(lm, slots=slots, max_len=64, compile=False, lag=lag)
    return engine.run(ps, params, max_new_tokens=NEW, stopper=_StopChecker(lm, (), False, NEW), guidance=guidance)


def _restrict(g, rows):
    from divgen.engine.models.hf_loop import _restrict as restrict

    return restrict(g, rows)


def test_reused_slot_equals_fresh_cache(tiny_lm):
    ps = prompts(6, seed=3)
    params = SamplingParams.make(3, temperature=1.0, alpha=0.02, seeds=11)
    stop = _StopChecker(tiny_lm, (), False, NEW)
    used = Engine(tiny_lm, slots=3, max_len=64, compile=False)
    used.run(ps[:3], params, max_new_tokens=NEW, stopper=stop)            # fills every slot
    second, _ = used.run(ps[3:], params, max_new_tokens=NEW, stopper=stop)
    fresh, _ = Engine(tiny_lm, slots=3, max_len=64, compile=False).run(ps[3:], params, max_new_tokens=NEW, stopper=stop)
    assert texts(second) == texts(fresh)


def test_streamed_results_arrive_as_rows_finish(tiny_lm):
    seen = []
    results, _ = generate(tiny_lm, prompts(8, seed=4), max_new_tokens=NEW, max_batch_rows=3,
                          on_result=seen.append, **SAMPLING)
    assert sorted(r.row for r in seen) == list(range(8))
    assert {r.row: r.token_ids for r in seen} == {r.row: r.token_ids for r in results}
    assert [r.row for r in seen] != list(range(8)) or len({r.finish_reason for r in seen}) == 1


def test_stop_string_found_one_step_late_is_cut_exactly(tiny_lm):
    ps = prompts(4, seed=5)
    full, _ = generate(tiny_lm, ps, max_new_tokens=NEW, ignore_eos=True, **SAMPLING)
    word = str(full[2].token_ids[4])                     # a token of row 2's text
    cut, _ = generate(tiny_lm, ps, max_new_tokens=NEW, ignore_eos=True, stop=[word], **SAMPLING)
    text = full[2].text
    assert cut[2].finish_reason == "stop" and cut[2].text == text[: text.index(word)]
    for f, c in zip(full, cut):           # rows without the stop string are unaffected
        if word not in f.text:
            assert c.token_ids == f.token_ids


def test_gamma_recomputed_over_the_members_left():
    g = Guidance.corrsynth([0, 0, 0, 1, 1], g=3.0)
    sched = Scheduler(5, g, slots=6)
    for unit in list(sched.pending):
        sched.admit(unit, first_step=0)
    (slots_a, wa), (slots_b, wb) = g.weight_blocks(sched.slot_row[:6])     # slot 5 is free: in no block
    assert slots_a == [0, 1, 2] and slots_b == [3, 4]
    assert torch.allclose(wa, mix_from_gammas(torch.full((3, 3), 1.0).fill_diagonal_(0)))   # γ = (3-1)/2
    assert torch.allclose(wb, torch.tensor([[3.0, -2.0], [-2.0, 3.0]]))
    sched.retire(1)
    (slots_a, wa), _ = g.weight_blocks(sched.slot_row[:6])
    assert slots_a == [0, 2]
    assert torch.allclose(wa, torch.tensor([[3.0, -2.0], [-2.0, 3.0]]))  # γ = (g-1)/1 over the two left


def test_request_that_cannot_fit_names_the_knob(tiny_lm):
    with pytest.raises(DivgenError, match="max_batch_rows"):
        generate(tiny_lm, prompts(6), max_new_tokens=4, guidance=guidance_for("corrsynth", 6), max_batch_rows=2)
    params = SamplingParams.make(1, temperature=0.0)
    engine = Engine(tiny_lm, slots=2, max_len=16, compile=False)
    with pytest.raises(DivgenError, match="raise max_len to at least 20"):
        engine.run([[20] * 10], params, max_new_tokens=10, stopper=_StopChecker(tiny_lm, (), False, 10))


def test_slow_path_gives_the_same_tokens(tiny_lm):
    """The HF forward (architectures without the own forward) decodes the same rows alike."""
    ps = prompts(6, seed=6)
    kw = dict(max_new_tokens=NEW, guidance=guidance_for("corrsynth", 6), temperature=0.0, ignore_eos=True)
    fast, _ = generate(tiny_lm, ps, **kw)
    slow_lm = dataclasses.replace(tiny_lm, fast_path=False)
    slow_lm.decode = tiny_lm.decode
    slow, _ = generate(slow_lm, ps, **kw)
    assert [r.token_ids for r in slow] == [r.token_ids for r in fast]


def test_waiting_steps_cover_exactly_the_steps_before_the_last_admission(tiny_lm):
    """RunStats.waiting_per_step (the benchmark's steady state vs drain split): True while a group
    waits for slots, False from the step in which the last group decodes with nothing left."""
    ps = prompts(12, seed=8)
    _, alone = generate(tiny_lm, ps, max_new_tokens=NEW, guidance=guidance_for("corrsynth", 12), **SAMPLING)
    assert alone.waiting_per_step == [False] * alone.steps            # every group admitted at once
    _, stats = generate(tiny_lm, ps, max_new_tokens=NEW, guidance=guidance_for("corrsynth", 12),
                        max_batch_rows=6, **SAMPLING)
    waiting = stats.waiting_per_step
    assert len(waiting) == stats.steps == len(stats.rows_forwarded_per_step)
    first_drain = waiting.index(False)
    assert waiting[0] and not any(waiting[first_drain:])              # waiting, then only the drain
    # while groups waited, at most group size − 1 = 2 of the 6 slots idled; in the drain, more may
    assert all(used >= 4 for used, w in zip(stats.rows_forwarded_per_step, waiting) if w)
    slow_lm = dataclasses.replace(tiny_lm, fast_path=False)
    slow_lm.decode = tiny_lm.decode
    _, slow = generate(slow_lm, ps, max_new_tokens=NEW, guidance=guidance_for("corrsynth", 12),
                       max_batch_rows=6, **SAMPLING)
    assert len(slow.waiting_per_step) == slow.steps and slow.waiting_per_step[0] and not slow.waiting_per_step[-1]



def _assert_slots_hold_whole_prefills(engine, ps, slots):
    """Each slot holds the K/V that prefilling its prompt (but the last token) whole, alone, writes."""
    for p, s in zip(ps, slots):
        k = torch.zeros_like(engine.cache.k[:, :1])
        v = torch.zeros_like(engine.cache.v[:, :1])
        engine.model.prefill(torch.tensor([p[:-1]]), torch.tensor([0]), k, v)
        n = len(p) - 1
        torch.testing.assert_close(engine.cache.k[:, s, :, :n], k[:, 0, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(engine.cache.v[:, s, :, :n], v[:, 0, :, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("listeners", [False, True])
@pytest.mark.parametrize("repeats", [False, True])
@torch.inference_mode()
def test_admission_prefill_writes_the_cache_of_whole_prompt_prefills(tiny_lm, listeners, repeats):
    """Admission (decode.Engine._prefill) computes the prompts' common prefix once, copies it,
    computes a prompt several rows share once and copies it, and prefills the rest in length
    batches; with multi-LoRA listeners it shares nothing. Either way every slot's cache holds what
    prefilling each prompt whole, alone, writes."""
    class Listener:
        def set_batch(self, rows):
            seen.append(rows.tolist())

    seen = []
    head = [13 + i % 80 for i in range(12)]
    ps = [head + p for p in prompts(7, seed=11)]
    if repeats:     # row 3 repeats row 0; rows 5 and 6 repeat row 1 but for the last token (not prefilled)
        ps[3] = list(ps[0])
        ps[5] = ps[1][:-1] + [ps[1][-1] + 1]
        ps[6] = list(ps[5])
    engine = Engine(tiny_lm, slots=8, max_len=64, compile=False)
    slots = [5, 0, 7, 2, 1, 3, 6]
    engine._prompts = cache = engine._prompt_cache()
    cache.clear()
    engine._prefill(ps, slots, list(range(7)), [Listener()] if listeners else [])
    _assert_slots_hold_whole_prefills(engine, ps, slots)
    if listeners:       # each prefill batch told its rows; the prompt cache is not written
        assert sorted(r for rows in seen for r in rows) == list(range(7))
    assert (len(cache.entries) == 0) == listeners


def _distinct_reference(body, start, dedup):
    todo, copies = [], {}
    for i, b in enumerate(body):
        if len(b) <= start:
            continue
        same = [j for j in range(i) if len(body[j]) > start and body[j][start:] == b[start:]] if dedup else []
        if same:
            copies.setdefault(same[0], []).append(i)
        else:
            todo.append(i)
    return todo, copies


@pytest.mark.parametrize("seed", range(30))
def test_distinct_prompts_computes_each_distinct_tail_once(seed):
    rng = random.Random(seed)
    start = rng.randrange(3)
    body = [[1] * start + [rng.randrange(2) for _ in range(rng.randrange(4))] for _ in range(rng.randrange(1, 12))]
    for dedup in (True, False):
        todo, copies = distinct_prompts(body, start, dedup)
        assert (todo, copies) == _distinct_reference(body, start, dedup)
        covered = todo + [i for d in copies.values() for i in d]
        assert sorted(covered) == [i for i, b in enumerate(body) if len(b) > start]


@torch.inference_mode()
def test_admission_reuses_the_prompt_cache_and_writes_what_a_whole_prefill_writes(tiny_lm, monkeypatch):
    """A second admission takes from the prompt cache the positions its prompts share with earlier
    ones (the common header, a repeated prompt, a prompt that extends an earlier one) and computes
    the rest from there: every slot holds what prefilling its prompt whole, alone, writes."""
    monkeypatch.delenv("DIVGEN_PREFIX_CACHE_MB", raising=False)
    tiny_lm.prefix_cache = None
    head = [17 + i % 70 for i in range(10)]
    first = [head + p for p in prompts(5, seed=21)]
    second = [list(first[0]), first[1][:-1] + [40, 41, 42, 43], head + [55], head + [56, 57, 58], [90, 91, 92]]
    engine = Engine(tiny_lm, slots=6, max_len=64, compile=False)
    engine._prompts = engine._prompt_cache()
    engine._prefill(first, list(range(5)), list(range(5)), [])
    cache = tiny_lm.prefix_cache
    assert cache.reused_tokens == 0 and len(cache.entries) == 6              # the header and 5 prompts
    engine._prefill(second, [4, 2, 0, 5, 1], list(range(5)), [])
    # no common prefix this time (the last prompt): each row takes the longest prefix it shares with
    # anything computed before (the header, the first admission's prompts but their last tokens)
    computed = [head] + [p[:-1] for p in first]
    assert cache.reused_tokens == sum(max(len(os.path.commonprefix([p[:-1], c])) for c in computed) for p in second)
    assert cache.reused_tokens >= len(first[0]) - 1 + len(first[1]) - 1 + 2 * len(head)
    _assert_slots_hold_whole_prefills(engine, second, [4, 2, 0, 5, 1])


def test_generate_gives_the_same_tokens_with_and_without_the_prompt_cache(tiny_lm, monkeypatch):
    """Calls that repeat and extend earlier prompts decode the tokens they decode with the cache
    off, greedy and sampled, and the second call takes positions from the cache."""
    ps = prompts(6, seed=31)
    ps = [[20, 21, 22, 23, 24, 25, 26, 27] + p for p in ps]
    again = ps[:3] + [p + [33, 34] for p in ps[3:]]
    monkeypatch.setenv("DIVGEN_PREFIX_CACHE_MB", "0")
    tiny_lm.prefix_cache = None
    want = [generate(tiny_lm, x, max_new_tokens=6, **kw)[0] for x in (ps, again)
            for kw in (dict(temperature=0.0), SAMPLING)]
    assert tiny_lm.prefix_cache is None
    monkeypatch.setenv("DIVGEN_PREFIX_CACHE_MB", "64")
    got = [generate(tiny_lm, x, max_new_tokens=6, **kw)[0] for x in (ps, again)
           for kw in (dict(temperature=0.0), SAMPLING)]
    assert [[r.token_ids for r in res] for res in got] == [[r.token_ids for r in res] for res in want]
    assert tiny_lm.prefix_cache.reused_tokens > sum(len(p) - 1 for p in ps)
