"""`spa partition`: split a (prompt, response) dataset into K parts, one per query prompt.

    scores = method(examples, queries)        [N, K] raw attribution of example i to query k
    z      = normalise(scores)                [N, K] each query's column standardised over examples
    parts  = assign(z, balance)               [N] partition of every example

Methods
* ``random``    scores ~ U(0, 1) from the seed (the SPA baseline).
* ``lexical``   BM25 (Okapi; k1 = 1.5, b = 0.75, IDF = ln(1 + (N − n + 0.5)/(n + 0.5))) of query k
  against example i's prompt + response, lower-cased word tokens.
* ``influence`` gradients over the LoRA parameters of an adapter trained on the whole set
  (``influence.py``): ``lissa`` = ∇L(q)ᵀ(H + λI)⁻¹∇L(z) (the SPA paper's influence function) or
  ``gradsim`` = cos(∇L(z), ∇L(q)) (no Hessian, cheaper). A query's loss needs a response: queries
  that come without one get the whole-set adapter's greedy answer.

Normalisation: raw scores of different queries live on different scales (a query with a large
gradient would claim every example), so each column is standardised: z = (s − mean_i s) / std_i s
(a constant column becomes 0).

Balancing (no partition starves): every example first goes to its argmax partition. Then, while a
partition has fewer than ``min_size = floor(balance · N / K)`` examples, it takes the example that
costs least to move — the smallest z[i, current] − z[i, starved] among examples whose partition
holds more than ``min_size`` — most starved partition first, ties to the lowest index.
balance = 0 is the plain argmax; balance = 1 makes every partition at least floor(N / K).

Files written to the output directory: ``partitions.json`` (method, options, data path and hash,
queries, K, assignment, sizes) and ``scores.jsonl`` (per example: raw and normalised scores and
partition). The influence method also keeps its resumable intermediate state there
(``query_responses.jsonl``, ``.influence_state.pt``; the whole-set adapter under ``whole/``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from divgen.engine.errors import DivgenError
from divgen.engine.spa.data import Example, write_jsonl

from divgen.engine.limits import INFLUENCE_KINDS  # noqa: E402,F401
from divgen.engine.spa.partition_files import (  # noqa: E402,F401  (the torch-free file side)
    PARTITIONS_FILE, SCORES_FILE, WRITTEN, check_partition_out, file_sha256, read_partitions,
)

_WORD = re.compile(r"[a-z0-9]+")


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_scores(queries: list[str], documents: list[str], k1: float = 1.5, b: float = 0.75) -> torch.Tensor:
    """BM25 score of every query against every document, [N documents, K queries] fp64."""
    docs = [Counter(words(d)) for d in documents]
    n = len(docs)
    lengths = torch.tensor([sum(d.values()) for d in docs], dtype=torch.float64)
    avg = float(lengths.mean()) if n else 0.0
    df = Counter(t for d in docs for t in d)
    out = torch.zeros(n, len(queries), dtype=torch.float64)
    for k, q in enumerate(queries):
        for term in words(q):                      # a repeated query term counts each time
            if term not in df:
                continue
            idf = math.log(1.0 + (n - df[term] + 0.5) / (df[term] + 0.5))
            tf = torch.tensor([d.get(term, 0) for d in docs], dtype=torch.float64)
            norm = k1 * (1 - b + b * lengths / avg) if avg > 0 else torch.full_like(tf, k1)
            out[:, k] += idf * tf * (k1 + 1) / (tf + norm)
    return out


def random_scores(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.rand(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Standardise every column (query) over the rows (examples)."""
    scores = scores.double()
    mean = scores.mean(0, keepdim=True)
    std = scores.std(0, unbiased=False, keepdim=True)
    return torch.where(std > 0, (scores - mean) / std.clamp(min=1e-300), torch.zeros_like(scores))


def assign(z: torch.Tensor, balance: float = 0.5) -> list[int]:
    """Argmax partition per example, then minimal-cost moves until no partition is below
    ``floor(balance · N / K)`` (module docstring)."""
    if not 0 <= balance <= 1:
        raise DivgenError(f"--balance must be in [0, 1], got {balance}")
    n, k = z.shape
    if n < k:
        raise DivgenError(f"{n} examples cannot fill {k} partitions: give at least as many examples as queries")
    parts = z.argmax(1).tolist()
    min_size = math.floor(balance * n / k)
    sizes = Counter(parts)
    while True:
        starved = [j for j in range(k) if sizes[j] < min_size]
        if not starved:
            return parts
        target = min(starved, key=lambda j: (sizes[j], j))
        best, best_cost = None, None
        for i in range(n):
            if sizes[parts[i]] <= min_size:
                continue
            cost = float(z[i, parts[i]] - z[i, target])
            if best_cost is None or cost < best_cost:
                best, best_cost = i, cost
        sizes[parts[best]] -= 1
        parts[best] = target
        sizes[target] += 1


# ---------------------------------------------------------------------------------------------
# Influence scores (model needed)
# ---------------------------------------------------------------------------------------------

def influence_scores(lm, examples: list[Example], queries: list[Example], whole_adapter, kind: str, lissa_cfg,
                     out_dir: Path, max_length: int = 256, query_max_new_tokens: int = 48,
                     progress: bool = True, grad_batch: int = 8) -> torch.Tensor:
    """[N, K] influence scores (``kind`` = lissa | gradsim) with resumable state in ``out_dir``."""
    return influence_scores_multi(lm, examples, queries, whole_adapter, (kind,), lissa_cfg, out_dir, max_length,
                                  query_max_new_tokens, progress, grad_batch)[kind]


def influence_scores_multi(lm, examples: list[Example], queries: list[Example], whole_adapter, kinds, lissa_cfg,
                           out_dir: Path, max_length: int = 256, query_max_new_tokens: int = 48,
                           progress: bool = True, grad_batch: int = 8, cost: dict | None = None) -> dict:
    """{kind: [N, K] scores} for every kind in ``kinds`` from one pass of batched per-example gradients
    (``influence.per_example_gradients``, ``grad_batch`` examples per backward). Resumable: the query
    vectors and every finished batch's scores are kept in ``out_dir/.influence_state.pt``. The cost
    (seconds, examples/s, bytes held) is printed and, if ``cost`` is a dict, stored in it."""
    import time

    from tqdm import tqdm

    from divgen.engine.progress import progress_bar
    from divgen.engine.spa.finetune import TrainableLora, encode_example
    from divgen.engine.spa.influence import example_gradient, lissa, per_example_gradients

    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in INFLUENCE_KINDS]
    if bad or not kinds:
        raise DivgenError(f"unknown influence kind {bad[0] if bad else None!r}: use one of {', '.join(INFLUENCE_KINDS)}")
    if grad_batch < 1:
        raise DivgenError(f"the gradient batch must be >= 1, got {grad_batch}")
    queries = _with_responses(lm, queries, whole_adapter, out_dir, query_max_new_tokens, progress)
    state_path = out_dir / ".influence_state.pt"
    key = hashlib.sha256(json.dumps([list(kinds), asdict(lissa_cfg) if "lissa" in kinds else None, max_length,
                                     str(whole_adapter.path), grad_batch,
                                     [[e.prompt, e.response] for e in examples],
                                     [[q.prompt, q.response] for q in queries]]).encode()).hexdigest()[:16]
    state = torch.load(state_path, weights_only=False) if state_path.exists() else {}
    if state.get("key") != key:
        state = {"key": key}

    items = [encode_example(lm, ex, max_length) for ex in examples]
    q_items = [encode_example(lm, q, max_length) for q in queries]
    k = len(queries)
    lora = TrainableLora(lm.model, whole_adapter.config, seed=0)
    timing = {"examples": len(items), "queries": k, "parameters": lora.num_parameters(), "grad_batch": grad_batch}
    try:
        lora.load(whole_adapter)
        lora.train(False)
        dev, pad = lm.device, lm.pad_token_id
        if "query_vectors" not in state:
            t0 = time.perf_counter()
            q_grads = torch.stack([example_gradient(lm.model, lora, it, pad, dev) for it in
                                   tqdm(q_items, desc="query gradients", file=sys.stderr, disable=not progress,
                                        leave=False)])
            vectors = []
            for kind in kinds:                                                     # [K, P] per kind
                if kind == "lissa":
                    vectors.append(lissa(lm.model, lora, items, q_grads, lissa_cfg, pad, dev, progress))
                else:
                    vectors.append(q_grads / q_grads.norm(dim=1, keepdim=True).clamp(min=1e-30))
            state["query_vectors"] = torch.cat(vectors).cpu()                     # [len(kinds)·K, P]
            state["query_seconds"] = time.perf_counter() - t0
            state["scores"] = {}
            _save_state(state_path, state)
        vectors = state["query_vectors"].to(dev)
        done: dict = state["scores"]                                             # batch start -> [b, kinds·K]
        starts = list(range(0, len(items), grad_batch))
        bar = progress_bar(len(items), "per-example gradients", "ex", enabled=progress, leave=False,
                           initial=sum(min(grad_batch, len(items) - s) for s in done))
        t0, new, peak = time.perf_counter(), 0, 0
        for start in starts:
            if start in done:
                continue
            chunk = items[start:start + grad_batch]
            g = per_example_gradients(lm.model, lora, chunk, pad, dev)          # [b, P]
            peak = max(peak, g.numel() * 4 + sum(len(it.ids) for it in chunk) * _capture_width(lora) * 8)
            s = g @ vectors.T                                                   # [b, kinds·K]
            norms = g.norm(dim=1, keepdim=True).clamp(min=1e-30)
            for j, kind in enumerate(kinds):
                if kind == "gradsim":
                    s[:, j * k:(j + 1) * k] /= norms
            done[start] = s.double().cpu()
            new += len(chunk)
            bar.update(len(chunk))
            _save_state(state_path, state)
        bar.close()
        seconds = time.perf_counter() - t0
        timing.update({"query_vector_seconds": round(state.get("query_seconds", 0.0), 2),
                       "gradient_seconds_this_run": round(seconds, 2), "examples_this_run": new,
                       "seconds_per_example": round(seconds / new, 4) if new else None,
                       "capture_bytes_per_batch": peak, "score_bytes": len(items) * len(kinds) * k * 8})
        if progress and new:
            print(f"influence: {new} per-example gradients over {timing['parameters']:,} LoRA parameters in "
                  f"{seconds:.1f}s ({seconds / new:.3f} s/example, batches of {grad_batch}; ~{peak / 2**20:.0f} MiB "
                  f"of captures + gradients per batch; query vectors {timing['query_vector_seconds']}s)",
                  file=sys.stderr)
    finally:
        lora.remove()
    if cost is not None:
        cost.update(timing)
    scores = torch.cat([done[s] for s in starts])                                # [N, kinds·K]
    return {kind: scores[:, j * k:(j + 1) * k] for j, kind in enumerate(kinds)}


def _capture_width(lora) -> int:
    """Floats captured per token by the gradient hooks: every LoRA layer's input and output width."""
    return sum(layer.lora_A.shape[1] + layer.lora_B.shape[0] for layer in lora.layers.values())


def _save_state(path: Path, state: dict) -> None:
    from divgen.engine.files import clean_stale, temp_path

    clean_stale(path, [f"{path.name}.tmp"])
    tmp = temp_path(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _with_responses(lm, queries, whole_adapter, out_dir: Path, max_new_tokens: int, progress: bool):
    """Queries with responses: their own, else the whole-set adapter's greedy answer (cached)."""
    from divgen.engine.decode import generate
    from divgen.engine.spa.multilora import MultiLora

    if all(q.response for q in queries):
        return queries
    cache = out_dir / "query_responses.jsonl"
    if cache.exists():
        from divgen.engine.jsonl import read_jsonl

        rows = [r for _, r in read_jsonl(cache, "query answer cache", tail="torn").records]
        if rows and [r.get("prompt") for r in rows] == [q.prompt for q in queries] and \
                rows[0].get("adapter") == str(whole_adapter.path) and all(isinstance(r.get("response"), str) for r in rows):
            return [Example(r["prompt"], r["response"]) for r in rows]
    missing = [i for i, q in enumerate(queries) if not q.response]
    if progress:
        print(f"answering {len(missing)} queries with the whole-set adapter (greedy)", file=sys.stderr)
    with MultiLora(lm.model, [whole_adapter]) as ml:
        ml.set_prompt_adapters([0] * len(missing))
        results, _ = generate(lm, [lm.format_prompt(queries[i].prompt) for i in missing], max_new_tokens=max_new_tokens,
                              temperature=0.0, batch_listeners=[ml])
    answers = dict(zip(missing, [r.text.strip() or r.text for r in results]))
    out = [Example(q.prompt, q.response or answers[i] or ".") for i, q in enumerate(queries)]
    write_jsonl(cache, [{"prompt": q.prompt, "response": q.response, "adapter": str(whole_adapter.path)} for q in out])
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def write_partitions(out_dir: Path, *, method: str, options: dict, data_path: str, examples: list[Example],
                     queries: list[Example], scores: torch.Tensor, z: torch.Tensor, parts: list[int],
                     balance: float) -> dict:
    k = scores.shape[1]
    record = {
        "method": method,
        "options": options,
        "data": str(Path(data_path).resolve()),
        "data_sha256": file_sha256(data_path),
        "queries": [q.prompt for q in queries],
        "k": k,
        "balance": balance,
        "min_size": math.floor(balance * len(examples) / k),
        "sizes": [parts.count(j) for j in range(k)],
        "assignment": parts,
    }
    from divgen.engine.files import write_file_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"index": i, "prompt": ex.prompt, "partition": parts[i], "scores": [float(v) for v in scores[i]],
                         "normalised": [round(float(v), 6) for v in z[i]]}, ensure_ascii=False) + "\n"
             for i, ex in enumerate(examples)]
    # each file is replaced whole (a kill leaves the old or the new one); the record names the
    # scores it was written with, so a scores file from another run is recognisable
    scores_text = "".join(lines)
    record["scores_sha256"] = hashlib.sha256(scores_text.encode("utf-8")).hexdigest()
    write_file_atomic(out_dir / SCORES_FILE, scores_text, legacy=[f".{SCORES_FILE}.tmp"])
    write_file_atomic(out_dir / PARTITIONS_FILE, json.dumps(record, indent=2) + "\n", legacy=[f".{PARTITIONS_FILE}.tmp"])
    return record
