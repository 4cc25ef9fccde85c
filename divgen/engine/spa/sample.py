"""`spa sample`: every prompt answered once by every adapter, all adapters in one decode batch.

    rows = [(prompt p, adapter i, copy c) for p in prompts for i in adapters for c in range(copies)]
    generate(lm, rows, batch_listeners=[MultiLora])      # each row decodes with its own adapter

Greedy by default (SPA's setting: the diversity comes from the adapters, not from sampling).
``copies`` > 1 with a temperature > 0 gives the sampling baseline (one adapter, several seeds).
Then, per prompt, ``metrics`` computes the Diversity Score of the answers and the pairwise KL of
the adapters' next-token distributions along them (teacher-forced; every answer through every
adapter, one forward per answer with the adapters as the batch rows).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch

from divgen.engine.model import LoadedModel
from divgen.engine.spa.answers import answer_record, read_answers, run_fingerprint
from divgen.engine.spa.lora import LoraAdapter
from divgen.engine.spa.metrics import diversity_score, mean_ignoring_nan, pairwise_kl_sum
from divgen.engine.spa.multilora import MultiLora


@dataclass
class PromptSamples:
    """The answers to one prompt and their metrics."""

    prompt: str
    answers: list[dict]                     # {"adapter", "copy", "seed", "text", "finish_reason", "token_ids"}
    diversity_score: float = math.nan
    pairwise_kl: float = 0.0
    kl_terms: int = 0


@dataclass
class SampleReport:
    adapters: list[str]
    prompts: list[PromptSamples]
    settings: dict = field(default_factory=dict)
    decode_seconds: float = 0.0
    rows_forwarded: int = 0

    @property
    def diversity_score(self) -> float:
        return mean_ignoring_nan([p.diversity_score for p in self.prompts])

    @property
    def pairwise_kl(self) -> float:
        return mean_ignoring_nan([p.pairwise_kl for p in self.prompts])

    def summary(self) -> dict:
        return {"adapters": self.adapters, "prompts": len(self.prompts), "diversity_score": self.diversity_score,
                "pairwise_kl": self.pairwise_kl, "decode_seconds": round(self.decode_seconds, 3),
                "rows_forwarded": self.rows_forwarded, **self.settings}


def sample_answers(lm: LoadedModel, ml: MultiLora, prompts: list[str], *, copies: int = 1, max_new_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, progress=None) -> SampleReport:
    """Decode every (prompt, adapter, copy) row in one batch through ``ml``."""
    from divgen.engine.decode import generate

    formatted = [lm.format_prompt(p) for p in prompts]
    rows = [(p, i, c) for p in range(len(prompts)) for i in range(len(ml.names)) for c in range(copies)]
    ml.set_prompt_adapters([i for _, i, _ in rows])
    seeds = [seed + c for _, _, c in rows]   # copy c of every prompt and adapter uses seed + c
    results, stats = generate(lm, [formatted[p] for p, _, _ in rows], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seeds=seeds, batch_listeners=[ml],
                              progress=progress)
    out = [PromptSamples(prompt=p, answers=[]) for p in prompts]
    for (p, i, c), r in zip(rows, results):
        out[p].answers.append({"adapter": ml.names[i], "copy": c, "seed": r.seed, "text": r.text,
                               "finish_reason": r.finish_reason, "token_ids": r.token_ids})
    return SampleReport(adapters=list(ml.names), prompts=out, decode_seconds=stats.wall_time_s,
                        rows_forwarded=stats.rows_forwarded,
                        settings={"copies": copies, "temperature": temperature, "top_p": top_p, "seed": seed,
                                  "max_new_tokens": max_new_tokens})


@torch.inference_mode()
def adapter_logprobs(lm: LoadedModel, ml: MultiLora, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """log p_i(answer[t] position's next token | prompt, answer[:t]) for every adapter i: [A, T, V] fp32."""
    n_adapters, t = len(ml.names), len(answer_ids)
    ids = torch.tensor([prompt_ids + answer_ids] * n_adapters, dtype=torch.int64, device=lm.device)
    ml.set_row_adapters(list(range(n_adapters)))
    logits = lm.model(input_ids=ids, use_cache=False, logits_to_keep=t + 1).logits[:, -(t + 1):-1, :]
    return torch.log_softmax(logits.float(), dim=-1)


def score_report(lm: LoadedModel, ml: MultiLora, report: SampleReport, progress: bool = True) -> SampleReport:
    """Fill in every prompt's Diversity Score and pairwise KL (module docstring of ``metrics``)."""
    from tqdm import tqdm

    for ps in tqdm(report.prompts, desc="KL", unit="prompt", file=sys.stderr, disable=not progress, leave=False):
        ps.diversity_score = diversity_score([a["text"] for a in ps.answers])
        if len(ml.names) < 2:
            ps.pairwise_kl, ps.kl_terms = 0.0, 0
            continue
        prompt_ids = lm.encode(lm.format_prompt(ps.prompt))
        total, terms = 0.0, 0
        for a in ps.answers:
            if not a["token_ids"]:
                continue
            s, n = pairwise_kl_sum(adapter_logprobs(lm, ml, prompt_ids, a["token_ids"]))
            total, terms = total + s, terms + n
        ps.pairwise_kl, ps.kl_terms = (total / terms if terms else 0.0), terms
    return report


def load_adapters(lm: LoadedModel, paths, names=None) -> list[LoraAdapter]:
    from divgen.engine.spa.lora import adapter_names, load_adapter

    names = names or adapter_names(paths)
    return [load_adapter(p, name=n, model=lm.model) for p, n in zip(paths, names)]


# ---------------------------------------------------------------------------------------------
# Sampling into a file: appended as it goes, resumed after a kill (file format: answers.py)
# ---------------------------------------------------------------------------------------------
def sample_into_file(lm: LoadedModel, ml: MultiLora, prompts: list[str], out, *, settings: dict,
                     prompts_per_batch: int, copies: int = 1, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, progress=None, log=None) -> SampleReport:
    """Answer every prompt with every adapter, ``prompts_per_batch`` prompts per decode batch, each
    batch appended to ``out`` (one write + fsync); a rerun after a kill decodes only the prompts
    that are missing. Returns the report over all answers in the file (metrics not yet scored)."""
    import fcntl
    import json
    import os
    from pathlib import Path

    from divgen.engine.errors import DivgenError

    out = Path(out)
    fp = run_fingerprint(settings)
    done, good = read_answers(out, fp)
    todo = [i for i in range(len(prompts)) if i not in done]
    created = not out.exists()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    decode_seconds, rows_forwarded, written = 0.0, 0, 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            created = False
            raise DivgenError(f"another process is writing {out}: wait for it or choose another --out") from exc
        if os.fstat(fd).st_size > good:                     # a torn last line from a killed run
            os.ftruncate(fd, good)
            if log:
                log(f"note: cut a torn last line off {out}")
        for start in range(0, len(todo), prompts_per_batch):
            chunk = todo[start:start + prompts_per_batch]
            part = sample_answers(lm, ml, [prompts[i] for i in chunk], copies=copies, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed, progress=progress)
            decode_seconds += part.decode_seconds
            rows_forwarded += part.rows_forwarded
            lines = []
            for i, ps in zip(chunk, part.prompts):
                recs = [answer_record(i, ps.prompt, a, fp) for a in ps.answers]
                done[i] = recs
                lines += [json.dumps(r, ensure_ascii=False) + "\n" for r in recs]
            data = "".join(lines).encode("utf-8")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            written += len(lines)
    except BaseException:
        if created and written == 0 and os.fstat(fd).st_size == 0:
            out.unlink(missing_ok=True)       # a failed first run leaves no empty --out behind
        raise
    finally:
        os.close(fd)
    report = [PromptSamples(prompt=prompts[i], answers=[
        {k: r[k] for k in ("adapter", "copy", "seed", "text", "finish_reason", "token_ids")} for r in done[i]])
        for i in range(len(prompts))]
    return SampleReport(adapters=list(ml.names), prompts=report, decode_seconds=decode_seconds,
                        rows_forwarded=rows_forwarded,
                        settings={"copies": copies, "temperature": temperature, "top_p": top_p, "seed": seed,
                                  "max_new_tokens": max_new_tokens})
