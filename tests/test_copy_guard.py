"""The copy guard (divgen/engine/copy_guard.py): the on-device ban against a plain-Python
reference, the engine with injected logits that force a copy (no output holds a banned n-gram;
without the guard they do), identical tokens when nothing matches, the compiled step, the real
embedded model with a prompt that invites copying, the synth wiring and the bounds."""
import pytest
import torch

from divgen.engine.copy_guard import PAD_TABLE, CopyGuard, GuardState, ban_copies, ngram_table, push
from divgen.engine.decode import Engine, _StopChecker, generate
from divgen.engine.errors import DivgenError
from divgen.engine.guidance import Guidance
from divgen.engine.sampling import SamplingParams

from test_engine_core import EOS, VOCAB, guidance_for, tiny_lm  # noqa: F401  (the tiny random Llama fixture)

N = 4


# ---- the ban itself ----------------------------------------------------------------------------
def _ban_reference(logits, tables, hists):
    out = logits.clone()
    for r, (grams, hist) in enumerate(zip(tables, hists)):
        for g in grams:
            if list(g[:-1]) == list(hist):
                out[r, g[-1]] = float("-inf")
    return out


def test_ban_equals_a_plain_python_reference():
    gen = torch.Generator().manual_seed(3)
    rows, vocab, width = 6, 40, 8
    logits = torch.randn(rows, vocab, generator=gen)
    hists = torch.randint(0, 5, (rows, N - 1), generator=gen)
    tables = []
    for r in range(rows):
        grams = []
        for t in range(int(torch.randint(0, width + 1, (1,), generator=gen))):
            prefix = hists[r].tolist() if t % 2 == 0 else torch.randint(0, 5, (N - 1,), generator=gen).tolist()
            grams.append(tuple(prefix + [int(torch.randint(0, vocab, (1,), generator=gen))]))
        tables.append(grams)
    table = torch.full((rows, width, N), PAD_TABLE, dtype=torch.int64)
    for r, grams in enumerate(tables):
        if grams:
            table[r, : len(grams)] = torch.tensor(grams)
    got = ban_copies(logits.clone(), table, hists)
    want = _ban_reference(logits, tables, hists.tolist())
    assert torch.equal(got, want)
    assert (got == float("-inf")).sum() > 0                         # the case did ban something
    assert (got == float("-inf")).sum() < rows * vocab


def test_push_appends_only_for_active_rows():
    hist = torch.tensor([[1, 2, 3], [4, 5, 6]])
    push(hist, torch.tensor([7, 8]), torch.tensor([True, False]))
    assert hist.tolist() == [[2, 3, 7], [4, 5, 6]]


def test_admission_fills_tables_and_prompt_tails():
    g = GuardState(slots=3, n=N, width=3, device="cpu")
    assert g.table.shape == (3, 4, N)                               # width rounded up to a power of two
    g.admit([2, 0], [[(1, 2, 3, 4)], []], [[9, 8, 7, 6, 5], [5]])
    assert g.table[2, 0].tolist() == [1, 2, 3, 4] and (g.table[2, 1:] == PAD_TABLE).all()
    assert (g.table[0] == PAD_TABLE).all()
    assert g.hist[2].tolist() == [7, 6, 5] and g.hist[0].tolist() == [-2, -2, 5]


# ---- the engine, with injected logits that force a copy -----------------------------------------
SEQ = list(range(20, 44))                  # the "example": distinct tokens, none an EOS id


class _Forcing:
    """The tiny model with a +40 bias on the next token of SEQ (any other token leads to SEQ[0]):
    sampled freely it copies SEQ."""

    def __init__(self, fast):
        self.fast = fast
        self.nxt = torch.full((VOCAB,), SEQ[0], dtype=torch.int64)
        for a, b in zip(SEQ, SEQ[1:]):
            self.nxt[a] = b

    def __getattr__(self, name):
        return getattr(self.fast, name)

    def decode(self, tokens, pos, k, v):
        logits = self.fast.decode(tokens, pos, k, v)
        return logits + 40.0 * torch.nn.functional.one_hot(self.nxt[tokens], VOCAB).to(logits.dtype)


def _prompts(n):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(50, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(1, 9, (n,), generator=g)]




def _decode(lm, ps, guidance, guard, *, temperature=1.0, compile=False, slots=4, new=16):
    params = SamplingParams.make(len(ps), temperature=temperature, alpha=0.0, seeds=11)
    engine = Engine(lm, slots=slots, max_len=64, compile=compile)
    engine.model = _Forcing(engine.model)
    stop = _StopChecker(lm, (), True, new)                      # ignore EOS: full-length rows
    return engine.run(ps, params, max_new_tokens=new, stopper=stop, guidance=guidance, copy_guard=guard)[0]


def _banned_hits(result, prompt, grams):
    ids = prompt[-(N - 1):] + result.token_ids
    start = len(prompt[-(N - 1):])
    return [tuple(ids[i - N + 1:i + 1]) for i in range(start, len(ids)) if i >= N - 1
            and tuple(ids[i - N + 1:i + 1]) in grams]


@pytest.mark.parametrize("method", ["fewgen", "corrsynth", "cfg"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_no_output_holds_a_banned_ngram_while_unguarded_rows_copy(tiny_lm, method, temperature):
    """12 rows through 4 slots (refilled); rows 0, 3, 6, 9 (the CFG leaders) and every other
    sample row guard SEQ, the rest guard nothing: the guarded ones never complete an n-gram of
    SEQ, the others copy it (so the forcing works and the table is per row)."""
    n_rows = 12
    ps = _prompts(n_rows)
    g = guidance_for(method, n_rows)
    sample = [r for r in range(n_rows) if g is None or not g.is_shadow(r)]
    guarded = set(sample[::2])
    guard = CopyGuard(N, [[SEQ] if r in guarded else [] for r in range(n_rows)])
    grams = set(ngram_table(None, [SEQ], N))
    with_guard = _decode(tiny_lm, ps, g, guard, temperature=temperature)
    without = _decode(tiny_lm, ps, g, None, temperature=temperature)
    for res_g, res_u in zip(with_guard, without):
        assert _banned_hits(res_u, ps[res_u.row], grams)                     # unguarded: copies
        hits = _banned_hits(res_g, ps[res_g.row], grams)
        if res_g.row in guarded:
            assert not hits, (res_g.row, hits)
        else:
            assert hits


@pytest.mark.parametrize("method", ["fewgen", "corrsynth", "cfg"])
def test_guard_that_never_matches_changes_nothing(tiny_lm, method):
    """Tables whose n-grams never occur (checked): the same tokens, token for token, as no guard."""
    n_rows = 9
    ps = _prompts(n_rows)
    g = guidance_for(method, n_rows)
    without = _decode(tiny_lm, ps, g, None)
    seen = set()
    for res in without:
        ids = ps[res.row][-(N - 1):] + res.token_ids
        seen |= {tuple(ids[i:i + N - 1]) for i in range(len(ids) - N + 2)}
    gen = torch.Generator().manual_seed(9)
    sources = []
    for _ in range(n_rows):                 # random sequences, cut where a prefix was ever seen
        src = [int(t) for t in torch.randint(12, VOCAB, (30,), generator=gen)]
        src = [t for i, t in enumerate(src) if tuple(src[max(0, i - N + 1):i]) not in seen]
        sources.append([src])
    guard = CopyGuard(N, sources)
    assert any(len(ngram_table(None, s, N)) for s in sources)
    with_guard = _decode(tiny_lm, ps, g, guard)
    assert [(r.row, r.token_ids) for r in with_guard] == [(r.row, r.token_ids) for r in without]


def test_compiled_step_with_the_guard_equals_the_eager_step(tiny_lm):
    """fullgraph=True compiles the guarded step (fixed shapes, no host sync): same tokens."""
    ps = _prompts(6)
    g = guidance_for("corrsynth", 6)
    guard = CopyGuard(N, [[SEQ]] * 6)
    eager = _decode(tiny_lm, ps, g, guard)
    compiled = _decode(tiny_lm, ps, g, guard, compile=True)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]


# ---- bounds ------------------------------------------------------------------------------------
def test_bad_guards_are_one_line_errors(tiny_lm):
    with pytest.raises(DivgenError, match="copy_guard has sources for 1 rows but 2 prompts"):
        generate(tiny_lm, [[20, 21], [22]], copy_guard=CopyGuard(N, [[SEQ]]), max_new_tokens=2)
    with pytest.raises(DivgenError, match="at least 2 tokens"):
        generate(tiny_lm, [[20, 21]], copy_guard=CopyGuard(1, [[SEQ]]), max_new_tokens=2)
    with pytest.raises(DivgenError, match=r"must be in \[0, 64\]"):
        generate(tiny_lm, [[20, 21]], copy_guard=CopyGuard(65, [[SEQ]]), max_new_tokens=2)


def test_task_file_and_flag_bounds():
    from divgen.engine.synth import task_from_dict

    base = {"labels": [{"name": "a"}, {"name": "b"}], "prompt": "Write about {label}."}
    assert task_from_dict({**base, "copy_guard": 8}).copy_guard == 8
    assert task_from_dict(base).copy_guard == 0 and not task_from_dict(base).own_special
    with pytest.raises(DivgenError, match="field 'copy_guard' must be 0 .off. or at least 2"):
        task_from_dict({**base, "copy_guard": 1})
    with pytest.raises(DivgenError, match="field 'own_special' must be true or false"):
        task_from_dict({**base, "own_special": "yes"})
    with pytest.raises(DivgenError, match="^--copy-guard must be in"):
        task_from_dict(base).with_overrides(copy_guard=100)
    # off: the fingerprint's content is what it was before the fields existed
    assert "copy_guard" not in task_from_dict(base).content()
    assert task_from_dict(base).with_overrides(copy_guard=6, own_special=True).content()["copy_guard"] == 6


def test_synth_rows_guard_their_own_examples(monkeypatch):
    """decode_batch hands each sample row its own prompt's examples, CFG shadows none."""
    import divgen.engine.decode as decode_mod
    from divgen.engine.synth import task_from_dict
    from divgen.engine.synth.job import decode_batch
    from divgen.engine.synth.plan import plan, rows_for_groups
    from divgen.engine.synth.prompts import pick_examples

    task = task_from_dict({"labels": [{"name": "a", "examples": [f"a text {i}" for i in range(5)]},
                                      {"name": "b", "examples": [f"b text {i}" for i in range(5)]}],
                           "prompt": "{examples}Write about {label}.", "method": "cfg", "copy_guard": 5,
                           "per_label": 2})
    pool = {lab.name: list(lab.examples) for lab in task.labels}
    groups = list(plan(task))
    missing = {(s.group, s.slot) for slots in groups for s in slots}
    b = rows_for_groups(task, groups, missing, lambda g, s, lab: f"prompt {g} {s} {lab}")
    seen = {}
    monkeypatch.setattr(decode_mod, "generate", lambda lm, prompts, **kw: seen.update(kw) or ([], None))
    decode_batch(task, None, b, lambda *a: None, pool=pool)
    guard = seen["copy_guard"]
    assert guard.n == 5 and len(guard.sources) == len(b.prompts)
    for sl, src in zip(b.slots, guard.sources):
        if sl is None:
            assert src == []
        else:
            assert src == pick_examples(task, pool, sl.group, sl.slot, task.labels[sl.label].name) and src


# ---- the embedded model -----------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_never_completes_a_guarded_ngram():
    """SmolLM2 asked to repeat a sentence copies 4-token runs of it; with the guard, none."""
    from divgen.engine.model import load_model

    lm = load_model()
    ex = "The quick brown fox jumps over the lazy dog while the farmer watches from the old red barn near the river."
    prompt = lm.format_prompt(f"Repeat this sentence exactly, word for word: {ex}")
    grams = set(ngram_table(lm, [ex], N))
    rows = 4
    kw = dict(max_new_tokens=40, temperature=1.0, alpha=0.05, seeds=3, guidance=Guidance.corrsynth([0, 0, 1, 1], 2.0))
    plain, _ = generate(lm, [prompt] * rows, **kw)
    guarded, _ = generate(lm, [prompt] * rows, copy_guard=CopyGuard(N, [[ex]] * rows), **kw)
    tail = lm.encode(prompt)[-(N - 1):]

    def hits(res):
        ids = tail + res.token_ids
        return [tuple(ids[i:i + N]) for i in range(len(ids) - N + 1) if tuple(ids[i:i + N]) in grams]

    assert sum(bool(hits(r)) for r in plain) >= 2               # the prompt does invite copying
    assert all(not hits(r) for r in guarded), [r.text for r in guarded]
