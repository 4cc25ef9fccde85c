"""The HF drop-in: transformers' generate with DivgenSampler gives the engine's exact tokens."""
import torch

from divgen.bindings.hf import DivgenSampler
from divgen.engine.decode import generate
from divgen.engine.guidance import Guidance

TOPICS = ["sports", "business", "science", "politics"]


def _hf_generate(lm, prompts, sampler, new_tokens):
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = lm.model.generate(**enc, logits_processor=[sampler], do_sample=False, max_new_tokens=new_tokens,
                            pad_token_id=lm.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def _strip(ids, lm):
    for i, t in enumerate(ids):
        if t in lm.eos_token_ids:
            return ids[:i]
    return ids


def test_hf_generate_with_divgen_sampler_equals_engine_corrsynth(embedded_lm):
    lm = embedded_lm
    prompts = [lm.format_prompt(f"Write a news headline about {t}.") for t in TOPICS]
    guidance = Guidance.corrsynth([0, 0, 0, 0], scale=2.0)
    seeds = [11, 12, 13, 14]
    engine, _ = generate(lm, prompts, max_new_tokens=12, temperature=0.9, alpha=0.02, seeds=seeds,
                         guidance=guidance)
    sampler = DivgenSampler(guidance=guidance, temperature=0.9, alpha=0.02, seeds=seeds,
                            eos_token_ids=lm.eos_token_ids)
    hf = _hf_generate(lm, prompts, sampler, 12)
    assert [_strip(ids, lm) for ids in hf] == [r.token_ids for r in engine]


def test_hf_generate_with_divgen_sampler_plain_sampling_equals_engine(embedded_lm):
    lm = embedded_lm
    prompts = [lm.format_prompt("Name a city."), lm.format_prompt("Describe a storm at sea in detail.")]
    engine, _ = generate(lm, prompts, max_new_tokens=10, temperature=1.0, top_k=20, seeds=[5, 6])
    sampler = DivgenSampler(temperature=1.0, top_k=20, seeds=[5, 6], eos_token_ids=lm.eos_token_ids)
    hf = _hf_generate(lm, prompts, sampler, 10)
    assert [_strip(ids, lm) for ids in hf] == [r.token_ids for r in engine]
    assert engine[0].token_ids != engine[1].token_ids
