"""The HF drop-in: transformers' generate with DivgenHFLogitsProcessor gives the engine's exact
tokens, per method (FewGen, CorrSynth, M-CorrSynth, CFG), with EOS ids read from the model."""
import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor

from divgen.bindings.hf import DivgenHFLogitsProcessor, eos_ids_of
from divgen.engine.decode import generate
from divgen.engine.errors import DivgenError
from divgen.engine.guidance import Guidance

TOPICS = ["sports", "business", "science", "politics"]
# Short answers, so that rows finish (EOS) at different steps inside the token budget.
SHORT = ["Answer with one word: what colour is the sky?", "Say only yes or no: is water wet?",
         "Write a long story about a dragon.", "Reply with a single number: 2 + 2?"]


def _hf_generate(lm, prompts, proc, new_tokens, **kwargs):
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = lm.model.generate(**enc, logits_processor=[proc], do_sample=False, max_new_tokens=new_tokens,
                            pad_token_id=lm.pad_token_id, **kwargs)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def _strip(ids, lm):
    for i, t in enumerate(ids):
        if t in lm.eos_token_ids:
            return ids[:i]
    return ids


def test_is_a_transformers_logits_processor_with_eos_from_generation_config(embedded_lm):
    proc = DivgenHFLogitsProcessor(embedded_lm.model)
    assert isinstance(proc, LogitsProcessor)
    assert proc.eos.tolist() == sorted(embedded_lm.model.generation_config.eos_token_id
                                       if isinstance(embedded_lm.model.generation_config.eos_token_id, list)
                                       else [embedded_lm.model.generation_config.eos_token_id])
    assert eos_ids_of(GenerationConfig(eos_token_id=[7, 3, 7])) == [3, 7]
    assert DivgenHFLogitsProcessor(GenerationConfig(eos_token_id=5)).eos.tolist() == [5]
    assert DivgenHFLogitsProcessor(embedded_lm.model, eos_token_ids=[9, 4]).eos.tolist() == [4, 9]
    with pytest.raises(DivgenError, match="no EOS token ids"):
        DivgenHFLogitsProcessor(GenerationConfig())
    with pytest.raises(DivgenError, match="min_p must be in"):       # the peers' min-p: 1 is allowed, 1.5 not
        DivgenHFLogitsProcessor(embedded_lm.model, min_p=1.5, seeds=[1, 2])
    with pytest.raises(DivgenError, match="alpha must be in"):       # the papers' α: [0, 1)
        DivgenHFLogitsProcessor(embedded_lm.model, alpha=1.0, seeds=[1, 2])


def test_fewgen_equals_engine_and_rows_finish_independently(embedded_lm):
    lm = embedded_lm
    prompts = [lm.format_prompt(p) for p in SHORT]
    seeds = [5, 6, 7, 8]
    engine, _ = generate(lm, prompts, max_new_tokens=24, temperature=1.0, top_k=20, seeds=seeds)
    proc = DivgenHFLogitsProcessor(lm.model, temperature=1.0, top_k=20, seeds=seeds)
    hf = _hf_generate(lm, prompts, proc, 24)
    assert [_strip(ids, lm) for ids in hf] == [r.token_ids for r in engine]
    assert {r.finish_reason for r in engine} == {"eos", "length"}       # the test covers both


def test_corrsynth_equals_engine_with_rows_leaving_the_group(embedded_lm):
    lm = embedded_lm
    prompts = [lm.format_prompt(p) for p in SHORT]
    guidance = Guidance.corrsynth([0, 0, 0, 0], g=2.0)
    seeds = [11, 12, 13, 14]
    engine, _ = generate(lm, prompts, max_new_tokens=24, temperature=0.9, alpha=0.02, seeds=seeds,
                         guidance=guidance)
    proc = DivgenHFLogitsProcessor(lm.model, guidance=guidance, temperature=0.9, alpha=0.02, seeds=seeds)
    hf = _hf_generate(lm, prompts, proc, 24)
    assert [_strip(ids, lm) for ids in hf] == [r.token_ids for r in engine]
    lengths = sorted(len(r.token_ids) for r in engine if r.finish_reason == "eos")
    assert lengths and lengths[0] < 23    # a row left the group while others went on
    # without guidance the same seeds give other tokens: the guidance is really applied
    plain, _ = generate(lm, prompts, max_new_tokens=24, temperature=0.9, alpha=0.02, seeds=seeds)
    assert [r.token_ids for r in plain] != [r.token_ids for r in engine]


def test_m_corrsynth_equals_engine(embedded_lm):
    lm = embedded_lm
    prompts = [lm.format_prompt(f"Write a news headline about {t}.") for t in TOPICS]
    guidance = Guidance.m_corrsynth([0, 0, 0, 0], labels=["a", "a", "b", "b"], gamma=1.5, delta=0.5)
    engine, _ = generate(lm, prompts, max_new_tokens=12, temperature=0.8, seeds=21, guidance=guidance)
    proc = DivgenHFLogitsProcessor(lm.model, guidance=guidance, temperature=0.8, seeds=21)
    hf = _hf_generate(lm, prompts, proc, 12)
    assert [_strip(ids, lm) for ids in hf] == [r.token_ids for r in engine]


def test_cfg_shadow_rows_take_their_leaders_token_and_leaders_equal_engine(embedded_lm):
    lm = embedded_lm
    # rows 0, 1 are samples; rows 2, 3 their negative prompts (shadows)
    prompts = [lm.format_prompt("Write a news headline about sports."),
               lm.format_prompt("Write a news headline about science."),
               lm.format_prompt("Write a news headline about business."),
               lm.format_prompt("Write a news headline about politics.")]
    guidance = Guidance.cfg([0, 1, 0, 1], shadow_of=[None, None, 0, 1], g=3.0)
    engine, _ = generate(lm, prompts, max_new_tokens=16, temperature=0.7, seeds=[3, 4, 5, 6], guidance=guidance)
    assert [r.row for r in engine] == [0, 1]
    proc = DivgenHFLogitsProcessor(lm.model, guidance=guidance, temperature=0.7, seeds=[3, 4, 5, 6])
    hf = _hf_generate(lm, prompts, proc, 16)
    assert hf[2] == hf[0] and hf[3] == hf[1]
    assert [_strip(hf[0], lm), _strip(hf[1], lm)] == [r.token_ids for r in engine]


def test_row_count_change_is_a_clear_error_and_a_new_call_starts_afresh(embedded_lm):
    lm = embedded_lm
    prompts = [lm.format_prompt(f"Write a news headline about {t}.") for t in TOPICS[:2]]
    proc = DivgenHFLogitsProcessor(lm.model, guidance=Guidance.corrsynth([0, 0], g=2.0), seeds=[1, 2])
    first = _hf_generate(lm, prompts, proc, 6)
    assert _hf_generate(lm, prompts, proc, 6) == first          # reused: the step counter restarted
    with pytest.raises(DivgenError, match="guidance describes 2 rows but generate passed 4"):
        _hf_generate(lm, prompts * 2, proc, 6)
    with pytest.raises(DivgenError, match="per-row settings give 3 rows but generate passed 2"):
        _hf_generate(lm, prompts, DivgenHFLogitsProcessor(lm.model, seeds=[1, 2, 3]), 4)
    # scalar settings fit any row count
    free = DivgenHFLogitsProcessor(lm.model, seeds=1)
    assert len(_hf_generate(lm, prompts, free, 3)) == 2
    assert len(_hf_generate(lm, prompts[:1], free, 3)) == 1


def test_scores_are_one_hot_on_the_reference_sample():
    """The processor alone, on random logits: its one finite score sits on the reference's token
    (kernels.reference.guided_sample with the mix written out by hand), finished rows emit EOS."""
    from divgen.kernels import reference

    torch.manual_seed(0)
    rows, vocab = 3, 101
    scores = torch.randn(rows, vocab) * 3
    proc = DivgenHFLogitsProcessor(GenerationConfig(eos_token_id=7), guidance=Guidance.corrsynth([0, 0, 0], g=3.0),
                                 temperature=0.9, seeds=[1, 2, 3])
    ids = torch.tensor([[5, 6], [5, 6], [5, 6]])
    out = proc(ids, scores)
    mix = torch.tensor([[3.0, -1.0, -1.0], [-1.0, 3.0, -1.0], [-1.0, -1.0, 3.0]])   # γ = (3 - 1) / 2
    want = reference.guided_sample(scores, mix, seeds=torch.tensor([1, 2, 3]), step=0, temperature=0.9)
    assert torch.isfinite(out).sum(dim=1).tolist() == [1, 1, 1]
    assert out.argmax(dim=1).tolist() == want.tolist()
    # step 1: row 1 emitted EOS (7); rows 0 and 2 now form a 2-row group, γ = 2
    ids = torch.cat([ids, torch.tensor([[4], [7], [9]])], dim=1)
    out = proc(ids, scores)
    mix2 = torch.tensor([[3.0, -2.0], [-2.0, 3.0]])
    want2 = reference.guided_sample(scores[[0, 2]], mix2, seeds=torch.tensor([1, 3]), step=1, temperature=0.9)
    assert out.argmax(dim=1).tolist() == [want2[0].item(), 7, want2[1].item()]


def test_readme_snippet_runs_and_gives_the_engines_tokens(embedded_lm, capsys):
    from readme_snippets import snippet

    scope = {}
    exec(compile(snippet("hf"), "README.md:hf", "exec"), scope)
    printed = capsys.readouterr().out
    assert printed.startswith("[") and len(scope["out"]) == 2
    lm = embedded_lm
    prompts = [lm.format_prompt(f"Write a news headline about {t}.") for t in ("sports", "science")]
    engine, _ = generate(lm, prompts, max_new_tokens=32, temperature=0.8, alpha=0.05, seeds=[1, 2],
                         guidance=Guidance.corrsynth([0, 0], g=2.0))
    width = scope["batch"]["input_ids"].shape[1]
    assert [_strip(ids, lm) for ids in scope["out"][:, width:].tolist()] == [r.token_ids for r in engine]
