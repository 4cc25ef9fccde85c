"""The vLLM logits processor's bookkeeping, driven by hand-made batch updates (no vLLM needed):
each tagged row is one-hot on the token of ``kernels.reference.guided_sample`` with a mix
written out by hand over the group members present; untagged rows are left bit-identical."""
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from divgen.bindings.vllm import DivgenVLLMLogitsProcessor, divgen_tag, group_gammas, parse_tag
from divgen.engine.errors import DivgenError
from divgen.kernels import reference

VOCAB = 97


@dataclass(frozen=True)
class Update:          # the fields of vLLM's BatchUpdate that the processor reads
    batch_size: int
    removed: tuple = ()
    added: tuple = ()
    moved: tuple = ()


def params(seed, tag=None, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return SimpleNamespace(seed=seed, extra_args=tag, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def chosen(out):
    finite = torch.isfinite(out)
    assert finite.sum(dim=1).eq(1).all()
    return out.argmax(dim=1).tolist()


def sample(logits, mix, seeds, step, **kw):
    """step: one int for every row, or a list (each row's own counter)."""
    step = torch.tensor(step, dtype=torch.int64) if isinstance(step, list) else step
    return reference.guided_sample(logits, mix, seeds=torch.tensor(seeds), step=step, **kw).tolist()


def corrsynth_mix(k, g):
    w = (g - 1) / (k - 1)
    return torch.full((k, k), -w) + torch.eye(k) * (1 + w * (k - 1) + w)


def test_lockstep_group_untagged_row_and_members_leaving():
    torch.manual_seed(0)
    proc = DivgenVLLMLogitsProcessor()
    outs = [[] for _ in range(5)]
    tag = divgen_tag("q", scale=3.0)
    added = [(i, params(10 + i, tag, temperature=0.9, min_p=0.05), None, outs[i]) for i in (0, 1, 2, 4)]
    added.append((3, params(99), None, outs[3]))                  # untagged
    proc.update_state(Update(5, added=tuple(added)))
    logits = torch.randn(5, VOCAB) * 2
    out = proc.apply(logits.clone())
    assert torch.equal(out[3], logits[3])                         # untouched, bit for bit
    want = sample(logits[[0, 1, 2, 4]], corrsynth_mix(4, 3.0), [10, 11, 12, 14], 0, temperature=0.9, min_p=0.05)
    assert [chosen(out[[0, 1, 2, 4]])] == [want]
    for i in range(5):
        outs[i].append(7)
    # row 4 finishes: removed, nothing to condense. Three members remain, step 1.
    proc.update_state(Update(4, removed=(4,)))
    logits = torch.randn(4, VOCAB) * 2
    out = proc.apply(logits.clone())
    assert torch.equal(out[3], logits[3])
    want = sample(logits[[0, 1, 2]], corrsynth_mix(3, 3.0), [10, 11, 12], 1, temperature=0.9, min_p=0.05)
    assert chosen(out[[0, 1, 2]]) == want
    for i in range(4):
        outs[i].append(8)
    # row 1 finishes; vLLM condenses the batch by moving the untagged row 3 into slot 1.
    proc.update_state(Update(3, removed=(1,), moved=((3, 1, "UNIDIRECTIONAL"),)))
    logits = torch.randn(3, VOCAB) * 2
    out = proc.apply(logits.clone())
    assert torch.equal(out[1], logits[1])
    want = sample(logits[[0, 2]], corrsynth_mix(2, 3.0), [10, 12], 2, temperature=0.9, min_p=0.05)
    assert chosen(out[[0, 2]]) == want
    # the last members finish; an untagged request joins: nothing is left to guide
    proc.update_state(Update(2, removed=(2, 0), added=((0, params(5), None, []),)))
    logits = torch.randn(2, VOCAB)
    assert torch.equal(proc.apply(logits.clone()), logits)


def test_guidance_really_changes_the_sample_and_one_member_is_plain_divgen_sampling():
    torch.manual_seed(1)
    logits = torch.randn(2, VOCAB) * 2
    tagged = DivgenVLLMLogitsProcessor()
    tagged.update_state(Update(2, added=tuple((i, params(i, divgen_tag("g", scale=20.0)), None, []) for i in range(2))))
    plain = sample(logits, None, [0, 1], 0)
    guided = chosen(tagged.apply(logits.clone()))
    assert guided == sample(logits, corrsynth_mix(2, 20.0), [0, 1], 0)
    alone = DivgenVLLMLogitsProcessor()
    alone.update_state(Update(1, added=((0, params(0, divgen_tag("g", scale=20.0)), None, []),)))
    assert chosen(alone.apply(logits[:1].clone())) == plain[:1]
    assert guided != plain                                        # (fixed logits: guidance moves a row)


def test_swap_and_two_groups_are_block_diagonal():
    torch.manual_seed(2)
    proc = DivgenVLLMLogitsProcessor()
    a, b = divgen_tag("a", scale=2.0), divgen_tag("b", scale=4.0)
    proc.update_state(Update(4, added=((0, params(1, a), None, []), (1, params(2, b), None, []),
                                       (2, params(3, a), None, []), (3, params(4, b), None, []))))
    proc.update_state(Update(4, moved=((0, 1, "SWAP"),)))         # rows 0 and 1 trade places
    logits = torch.randn(4, VOCAB)
    out = chosen(proc.apply(logits.clone()))
    # after the swap: row 0 = seed 2 (b), row 1 = seed 1 (a), row 2 = seed 3 (a), row 3 = seed 4 (b)
    mix = torch.zeros(4, 4)
    ga, gb = corrsynth_mix(2, 2.0), corrsynth_mix(2, 4.0)
    for i, r in enumerate((1, 2)):
        for j, c in enumerate((1, 2)):
            mix[r, c] = ga[i, j]
    for i, r in enumerate((0, 3)):
        for j, c in enumerate((0, 3)):
            mix[r, c] = gb[i, j]
    assert out == sample(logits, mix, [2, 1, 3, 4], 0)


def test_member_joining_late_uses_its_own_step_for_the_noise():
    torch.manual_seed(3)
    proc = DivgenVLLMLogitsProcessor()
    tag = divgen_tag("g", scale=2.0)
    early, late = [5, 6, 7], []
    proc.update_state(Update(2, added=((0, params(8, tag), None, early), (1, params(9, tag), None, late))))
    logits = torch.randn(2, VOCAB)
    out = chosen(proc.apply(logits.clone()))
    noise = torch.cat([reference.uniform_noise(torch.tensor([8]), 3, VOCAB),
                       reference.uniform_noise(torch.tensor([9]), 0, VOCAB)])
    assert out == reference.guided_sample(logits, corrsynth_mix(2, 2.0), seeds=torch.tensor([8, 9]), step=0,
                                          noise=noise).tolist()


def test_m_corrsynth_and_explicit_weights_follow_divgen_rules():
    mc = [parse_tag(divgen_tag("g", method="m-corrsynth", label=y, gamma=1.0, delta=0.5)) for y in "aab"]
    gam = group_gammas(mc)
    # row 0 (a): δ/1 toward row 1 (a), γ/1 toward row 2 (b); row 2 (b): γ/2 toward each a
    assert torch.allclose(gam, torch.tensor([[0, 0.5, 1.0], [0.5, 0, 1.0], [0.5, 0.5, 0]]))
    ex = [parse_tag(divgen_tag("g", method="explicit", member=m, weights=w))
          for m, w in ((0, [0, 0.3, 0.7]), (2, [1.5]))]
    assert torch.allclose(group_gammas(ex), torch.tensor([[0, 0.7], [1.5, 0]]))
    cs = [parse_tag(divgen_tag("g", scale=3.0)), parse_tag(divgen_tag("g", scale=5.0)), parse_tag(divgen_tag("g", scale=3.0))]
    assert torch.allclose(group_gammas(cs), torch.tensor([[0, 1.0, 1.0], [2.0, 0, 2.0], [1.0, 1.0, 0]]))


def test_seedless_requests_draw_a_seed_once_and_greedy_rows_take_the_guided_argmax():
    torch.manual_seed(4)
    proc = DivgenVLLMLogitsProcessor()
    tag = divgen_tag("g", scale=2.0)
    proc.update_state(Update(2, added=((0, params(None, tag, temperature=0.0), None, []),
                                       (1, params(None, tag, temperature=0.0), None, []))))
    seeds = proc.params["seeds"].tolist()
    logits = torch.randn(2, VOCAB)
    lp = torch.log_softmax(logits, -1)
    assert chosen(proc.apply(logits.clone())) == (corrsynth_mix(2, 2.0) @ lp).argmax(-1).tolist()
    proc.update_state(Update(2))                                  # no change: seeds kept
    assert proc.params["seeds"].tolist() == seeds


@pytest.mark.parametrize("fields, message", [
    ({"scale": 2.0}, "'divgen_group'"),
    ({"group": "g"}, "'divgen_scale' is required"),
    ({"group": "g", "scale": 0.5}, r"\[1, 100\]"),
    ({"group": "g", "scale": 2.0, "sclae": 1}, r"unknown key\(s\) \['divgen_sclae'\]"),
    ({"group": "g", "method": "cfg", "scale": 2.0}, "divgen_method must be one of"),
    ({"group": "g", "method": "m-corrsynth", "gamma": 1.0, "delta": 0.0}, "'divgen_label'"),
    ({"group": "g", "method": "explicit", "member": 0}, "'divgen_weights'"),
    ({"group": "g", "method": "explicit", "member": -1, "weights": [1.0]}, "'divgen_member'"),
])
def test_bad_tags_are_refused_with_the_fix(fields, message):
    flat = {"divgen_" + k: v for k, v in fields.items()}
    with pytest.raises(DivgenError, match=message):
        parse_tag(flat)
    with pytest.raises(ValueError, match=message):
        DivgenVLLMLogitsProcessor.validate_params(SimpleNamespace(extra_args=flat))
    DivgenVLLMLogitsProcessor.validate_params(SimpleNamespace(extra_args=None))
    DivgenVLLMLogitsProcessor.validate_params(SimpleNamespace(extra_args={"other": 1}))


def test_tags_are_flat_http_compatible_extra_args():
    """vLLM's HTTP vllm_xargs: dict[str, str | int | float | list[...]] — no nested values."""
    for tag in (divgen_tag("g", scale=2.0), divgen_tag(3, method="m-corrsynth", label="a", gamma=1.0, delta=0.5),
                divgen_tag("g", method="explicit", member=1, weights=[0.5, 0.0])):
        assert all(k.startswith("divgen_") and isinstance(v, (str, int, float, list)) for k, v in tag.items())
    assert parse_tag({"divgen_group": "q", "divgen_scale": 2, "other_extension": {"x": 1}}) == parse_tag(
        divgen_tag("q", scale=2.0))


def test_a_group_over_the_kernel_limit_is_contrasted_in_chunks():
    from divgen import kernels

    proc = DivgenVLLMLogitsProcessor()
    tag = divgen_tag("big", scale=2.0)
    n = kernels.MAX_GROUP_ROWS + 2
    proc.update_state(Update(n, added=tuple((i, params(i, tag), None, []) for i in range(n))))
    assert sorted(proc.plan.group_sizes) == [2, kernels.MAX_GROUP_ROWS]
    out = proc.apply(torch.randn(n, 11))
    assert torch.isfinite(out).sum(dim=1).eq(1).all()


def penalised_params(seed, tag, **penalties):
    p = params(seed, tag)
    p.presence_penalty = penalties.get("presence", 0.0)
    p.frequency_penalty = penalties.get("frequency", 0.0)
    p.repetition_penalty = penalties.get("repetition", 1.0)
    return p


def vllm_penalties(row, prompt, output, presence=0.0, frequency=0.0, repetition=1.0):
    """vLLM's penalty rule written out per token (vllm.model_executor.layers.utils.apply_penalties)."""
    row = row.clone()
    for v in range(row.shape[0]):
        if v in prompt or v in output:
            row[v] = row[v] / repetition if row[v] > 0 else row[v] * repetition
        row[v] -= frequency * output.count(v) + presence * (v in output)
    return row


def test_penalties_are_applied_to_tagged_rows_before_sampling():
    """vLLM applies penalties after the processors (to the one-hot output, where they change
    nothing), so the processor applies each member's own penalties to its row first."""
    torch.manual_seed(4)
    tag = divgen_tag("p", scale=2.0)
    prompts, outs = [[1, 2, 3], [4, 5]], [[6, 6, 7], [8]]
    pens = [dict(repetition=2.0, frequency=0.5), dict(presence=1.5)]
    logits = torch.randn(2, VOCAB) * 2
    penalised = torch.stack([vllm_penalties(logits[i], prompts[i], outs[i], **pens[i]) for i in range(2)])
    assert not torch.equal(penalised, logits)
    changed = 0
    for seed in range(0, 40, 2):
        proc = DivgenVLLMLogitsProcessor()
        proc.update_state(Update(2, added=tuple((i, penalised_params(seed + i, tag, **pens[i]), prompts[i], outs[i])
                                                for i in range(2))))
        got = chosen(proc.apply(logits.clone()))
        steps = torch.tensor([len(o) for o in outs])
        assert got == sample(penalised, corrsynth_mix(2, 2.0), [seed, seed + 1], steps)
        changed += got != sample(logits, corrsynth_mix(2, 2.0), [seed, seed + 1], steps)
    assert changed > 0                      # the penalties change what is drawn


def test_a_masked_token_in_one_member_does_not_attract_the_others():
    """The server report, offline: 4 identical rows of a group, EOS masked in member 0 (vLLM's
    min_tokens runs first). EOS was drawn 60/60 by the others under the old −100 reading; now
    the others draw what they draw without the mask."""
    eos = 2
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5))
    row[eos] = row.max() - 2.0
    tag = divgen_tag("m", scale=2.0)
    with_mask = without = 0
    for seed in range(60):
        got = []
        for masked in (True, False):
            proc = DivgenVLLMLogitsProcessor()
            proc.update_state(Update(4, added=tuple((i, params(seed * 4 + i, tag), None, []) for i in range(4))))
            logits = row.repeat(4, 1)
            if masked:
                logits[0, eos] = float("-inf")
            got.append(chosen(proc.apply(logits)))
        assert got[0][1:] == got[1][1:]
        with_mask += sum(t == eos for t in got[0][1:])
        without += sum(t == eos for t in got[1][1:])
    assert with_mask == without < 60


def test_size_and_alpha_tags():
    tag = parse_tag(divgen_tag("g", scale=2.0, size=4, alpha=0.1))
    assert tag.size == 4 and tag.alpha == 0.1
    with pytest.raises(DivgenError, match="divgen_size"):
        parse_tag({"divgen_group": "g", "divgen_scale": 2.0, "divgen_size": 0.5})
    with pytest.raises(DivgenError, match=r"divgen_size.*\[1, 4096\]"):      # 0 is not a row count
        parse_tag({"divgen_group": "g", "divgen_scale": 2.0, "divgen_size": 0})
    assert parse_tag({"divgen_group": "g", "divgen_scale": 2.0}).size == 0            # no size: no lockstep
    with pytest.raises(DivgenError, match="divgen_alpha"):
        parse_tag({"divgen_group": "g", "divgen_scale": 2.0, "divgen_alpha": 1.0})
    proc = DivgenVLLMLogitsProcessor()
    proc.update_state(Update(1, added=((0, params(3, divgen_tag("a", scale=1.0, alpha=0.3)), None, []),)))
    logits = torch.randn(1, VOCAB) * 3
    assert chosen(proc.apply(logits.clone())) == sample(logits, None, [3], 0, alpha=0.3)
