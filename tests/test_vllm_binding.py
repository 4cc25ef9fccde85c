"""vLLM end to end (``make test-vllm``; skipped where vLLM is not installed): on the embedded
SmolLM2, guided vLLM output equals divgen's engine for rows admitted in lockstep, and untagged
requests are untouched."""
import os
from types import SimpleNamespace

import pytest
from conftest import import_vllm_dependency

import_vllm_dependency("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")           # GiB; the default reserves far more

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from divgen.bindings.vllm import divgen_tag  # noqa: E402
from divgen.engine.decode import generate  # noqa: E402
from divgen.engine.diverse import generate_diverse  # noqa: E402
from divgen.engine.guidance import Guidance  # noqa: E402

pytestmark = pytest.mark.slow
SHORT = ["Answer with one word: what colour is the sky?", "Say only yes or no: is water wet?",
         "Write a long story about a dragon.", "Reply with a single number: 2 + 2?"]
TOPICS = ["sports", "business", "science", "politics"]


@pytest.fixture(scope="module")
def readme(embedded_lm):
    """The README's vLLM snippet, run as a user would; its LLM serves every test here."""
    from readme_snippets import snippet

    scope = {}
    exec(compile(snippet("vllm"), "README.md:vllm", "exec"), scope)
    return scope


@pytest.fixture(scope="module")
def llm(readme):
    assert isinstance(readme["llm"], LLM)
    return readme["llm"]


def _ids(lm, prompts):
    return [{"prompt_token_ids": lm.encode(p)} for p in prompts]


def _tokens(lm, outputs):
    """Generated ids of every request (every child of n > 1), without the trailing EOS."""
    out = []
    for o in outputs:
        for c in o.outputs:
            ids = list(c.token_ids)
            out.append(ids[:-1] if ids and ids[-1] in lm.eos_token_ids else ids)
    return out


def test_readme_snippet_gives_the_engines_diverse_samples(readme, embedded_lm):
    lm = embedded_lm
    engine, _ = generate_diverse(lm, lm.format_prompt("Give me a name for a cat."), n=8, diverse=2.0,
                                 seeds=0, temperature=0.8, min_p=0.1, max_new_tokens=32)
    got = _tokens(lm, [SimpleNamespace(outputs=readme["outputs"])])
    assert sorted(got) == sorted(r.token_ids for r in engine)


def test_corrsynth_group_equals_engine_with_rows_finishing_at_different_steps(llm, embedded_lm):
    lm = embedded_lm
    prompts = [lm.format_prompt(p) for p in SHORT]
    seeds = [11, 12, 13, 14]
    engine, _ = generate(lm, prompts, max_new_tokens=24, temperature=0.9, alpha=0.02, seeds=seeds,
                         guidance=Guidance.corrsynth([0, 0, 0, 0], g=2.0))
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=24,                # the papers' α as a tag
                             extra_args=divgen_tag("q", scale=2.0, alpha=0.02)) for s in seeds]
    got = _tokens(lm, llm.generate(_ids(lm, prompts), params, use_tqdm=False))
    assert got == [r.token_ids for r in engine]
    assert {r.finish_reason for r in engine} == {"eos", "length"}    # members left the group mid-way


def test_n_children_of_one_prompt_form_one_group_like_diverse_generate(llm, embedded_lm):
    lm = embedded_lm
    prompt = lm.format_prompt("Give me a name for a cat.")
    engine, _ = generate(lm, [prompt] * 4, max_new_tokens=16, temperature=1.0, seeds=5,
                         guidance=Guidance.corrsynth([0] * 4, g=3.0))
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=16, extra_args=divgen_tag("cat", scale=3.0))
    got = _tokens(lm, llm.generate(_ids(lm, [prompt]), params, use_tqdm=False))
    assert sorted(got) == sorted(r.token_ids for r in engine)   # vLLM may return children in any order


def test_two_groups_m_corrsynth_and_explicit_beside_untagged_requests(llm, embedded_lm):
    lm = embedded_lm
    prompts = [lm.format_prompt(f"Write a news headline about {t}.") for t in TOPICS]
    m_guid = Guidance.m_corrsynth([0, 0, 0, 0], labels=["a", "a", "b", "b"], gamma=1.5, delta=0.5)
    gammas = [[0.0, 2.0], [0.5, 0.0]]
    e_guid = Guidance.explicit([0, 0], gammas)
    m_engine, _ = generate(lm, prompts, max_new_tokens=12, temperature=0.8, seeds=21, guidance=m_guid)
    e_engine, _ = generate(lm, prompts[:2], max_new_tokens=12, temperature=0.7, seeds=[31, 32], guidance=e_guid)
    untagged = SamplingParams(temperature=1.0, seed=77, max_tokens=12)
    m_params = [SamplingParams(temperature=0.8, seed=21 + i, max_tokens=12,
                               extra_args=divgen_tag("m", method="m-corrsynth", label=y, gamma=1.5, delta=0.5))
                for i, y in enumerate("aabb")]
    e_params = [SamplingParams(temperature=0.7, seed=31 + i, max_tokens=12,
                               extra_args=divgen_tag("e", method="explicit", member=i, weights=gammas[i]))
                for i in range(2)]
    batch_prompts = [prompts[2]] + prompts + prompts[:2]
    got = _tokens(lm, llm.generate(_ids(lm, batch_prompts), [untagged] + m_params + e_params, use_tqdm=False))
    assert got[1:5] == [r.token_ids for r in m_engine]
    assert got[5:7] == [r.token_ids for r in e_engine]
    # the untagged request: vLLM's own seeded sample, the same as when it runs alone ...
    alone = _tokens(lm, llm.generate(_ids(lm, [prompts[2]]), untagged, use_tqdm=False))
    assert got[0] == alone[0]
    # ... and not divgen's sample for that seed (it was not one-hot-ed by the processor)
    tagged_alone = SamplingParams(temperature=1.0, seed=77, max_tokens=12, extra_args=divgen_tag("solo", scale=2.0))
    divgen_alone = _tokens(lm, llm.generate(_ids(lm, [prompts[2]]), tagged_alone, use_tqdm=False))
    engine_alone, _ = generate(lm, [prompts[2]], max_new_tokens=12, temperature=1.0, seeds=77)
    assert divgen_alone[0] == engine_alone[0].token_ids
    assert got[0] != divgen_alone[0]


def test_bad_tag_is_refused_before_decoding(llm, embedded_lm):
    with pytest.raises(VLLMValidationError, match="'divgen_scale' is required"):
        llm.generate(_ids(embedded_lm, ["Hello"]), SamplingParams(max_tokens=2, extra_args={"divgen_group": "g"}),
                     use_tqdm=False)
