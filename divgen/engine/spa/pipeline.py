"""`divgen spa run`: SPA end to end on a synthesis task, judged against real labelled data.

    divgen spa run ag_news --few-shot ../shared/data/ag_news_test.csv --out runs/spa-ag

Stages (each resumes after a kill: rerun the same command; finished work is kept):

1. ``synth``     — ``divgen synth`` of the task (FewGen by default, few-shot from the pool rows) into
   ``OUT/synth.jsonl``; then the SPA data in ``OUT/data/``: ``train.jsonl`` pairs (prompt = the task's
   instruction for the example's label, without few-shot examples; response = the text),
   ``queries.jsonl`` (K partition queries: paraphrased instructions, labels in turn) and
   ``heldout.jsonl`` (paraphrased instructions no training prompt or query uses, with their label).
2. ``whole``     — one LoRA adapter on all pairs (the single-adapter baseline, and the model whose
   gradients the influence methods use): ``OUT/whole/whole``.
3. ``partition`` — K parts per method: ``random``, ``lexical`` (BM25), ``lissa`` (influence function,
   LiSSA) and ``gradsim`` (gradient cosine) (``partition.py``); both influence kinds come from one pass
   of batched per-example gradients (``partition.influence_scores_multi``), cost printed.
4. ``adapt``     — one LoRA per part and method: ``OUT/<method>/adapters``.
5. ``sample``    — per temperature, ONE multi-LoRA batch holding every held-out prompt under every
   adapter of every method (one answer each) and under the whole-set adapter (K answers, seeds
   s..s+K−1; one at T = 0): ``OUT/samples/t<T>.jsonl``.
6. ``kl``        — pairwise KL between each method's adapters along their greedy answers: ``OUT/kl.json``.
7. ``judge``     — every answer labelled by a classifier trained on real rows only (``divgen.engine.eval``'s
   ``Judge``: a probe on frozen all-MiniLM-L6-v2 embeddings of the real file's pool rows):
   ``OUT/judged.json``.
8. ``report``    — ``OUT/summary.json``, ``OUT/table.md`` and ``OUT/diversity_fidelity.png`` (matplotlib,
   optional).

Per (method, temperature) and prompt, the k = K answers give the Diversity Score (exact duplicates,
``metrics.diversity_score``), Self-BLEU-4 among the answers (``metrics.answers_self_bleu``) and the
judge's verdicts, aggregated into fidelity@1 / any@k / all@k (``metrics.fidelity_at_k``). The
single adapter's greedy row holds its one answer K times (diversity 0 by construction).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from divgen.engine import limits
from divgen.engine.errors import DivgenError

STAGES = ("synth", "whole", "partition", "adapt", "sample", "kl", "judge", "report")
METHODS = limits.SPA_RUN_METHODS
METHOD_NAMES = {"random": "random", "lexical": "lexical (BM25)", "lissa": "influence (LiSSA)",
                "gradsim": "influence (grad. similarity)"}
SINGLE = "single"
# Queries and held-out prompts paraphrase the training instruction; no string is in two lists.
QUERY_TEMPLATES = ("Write a news report about {verbalization}.", "Tell me the latest news about {verbalization}.")
HELDOUT_TEMPLATES = ("Write a brief news story about {verbalization}.",
                     "Write two sentences of news about {verbalization}.",
                     "Write a newspaper article about {verbalization}.",
                     "Report a recent event in {verbalization}.")

Judge = Callable[[list[str]], list[str]]        # texts -> predicted label names


@dataclass
class SpaRunConfig:
    """Everything a run depends on (stored in ``OUT/run.json``; a different config is refused)."""

    task: str = "ag_news"
    few_shot: str | None = None           # few-shot file of the synth job (pool rows only)
    real: str | None = None               # real labelled file the judge trains on (default: few_shot)
    synth_method: str = "fewgen"
    synth_file: str | None = None         # an existing `divgen synth` output to use instead of synthesizing
    per_label: int = 100
    synth_max_new_tokens: int | None = None
    synth_batch_rows: int = 64
    k: int = 4
    methods: tuple = METHODS
    heldout_per_label: int = 2
    temperatures: tuple = (0.0, 0.7, 1.0, 1.3)
    max_new_tokens: int = 48
    rank: int = 8
    lora_top_layers: int = 0              # LoRA on the last N layers only (0 = all): a shorter backward
    lora_alpha: float = 16.0
    lr: float = 3e-3
    steps: int = 12                       # per part adapter
    whole_steps: int = 24                 # the whole-set adapter
    batch_size: int = 4
    max_length: int = 160
    lissa_depth: int = 10
    lissa_damping: float = 0.01
    grad_batch: int = 8
    balance: float = 0.5
    seed: int = 0
    model: str | None = None

    def check(self) -> None:
        """Bad input -> one DivgenError line, before anything slow."""
        if self.k < 2:
            raise DivgenError(f"--k must be >= 2 (one adapter per part), got {self.k}")
        if self.per_label < 1:
            raise DivgenError(f"--per-label must be >= 1, got {self.per_label}")
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise DivgenError(f"--methods must be a comma-separated subset of {','.join(METHODS)}, got "
                              f"{','.join(self.methods) or 'nothing'}")
        if not 1 <= self.heldout_per_label <= len(HELDOUT_TEMPLATES):
            raise DivgenError(f"--heldout-per-label must be in 1..{len(HELDOUT_TEMPLATES)}, got {self.heldout_per_label}")
        if not self.temperatures or any(not (t >= 0 and math.isfinite(t)) for t in self.temperatures):
            raise DivgenError(f"--temperatures must be finite numbers >= 0, got {self.temperatures}")
        if 0.0 not in self.temperatures:
            raise DivgenError("--temperatures must include 0 (greedy decoding, SPA's setting)")
        for flag, value in (("--steps", self.steps), ("--whole-steps", self.whole_steps),
                            ("--batch-size", self.batch_size), ("--rank", self.rank), ("--max-new-tokens", self.max_new_tokens),
                            ("--lissa-depth", self.lissa_depth), ("--grad-batch", self.grad_batch),
                            ("--synth-batch-rows", self.synth_batch_rows)):
            if value < 1:
                raise DivgenError(f"{flag} must be >= 1, got {value}")
        if self.lora_top_layers < 0:
            raise DivgenError(f"--lora-top-layers must be >= 0 (0 = every layer), got {self.lora_top_layers}")
        if not self.lr > 0 or not self.lora_alpha > 0:
            raise DivgenError("--lr and --lora-alpha must be > 0")
        if not 0 <= self.balance <= 1:
            raise DivgenError(f"--balance must be in [0, 1], got {self.balance}")
        for flag, path in (("--few-shot", self.few_shot), ("--real", self.real), ("--synth", self.synth_file)):
            if path is not None and not Path(path).is_file():
                raise DivgenError(f"{flag} {path} is not a file: pass a labelled CSV/JSONL file")
        from divgen.engine.model_source import find_model

        find_model(self.model)                    # a missing or broken --model, before torch loads

    def train_config(self, steps: int, lm):
        from divgen.engine.spa.adapt import TrainConfig

        layers = None
        if self.lora_top_layers:
            n = int(lm.model.config.num_hidden_layers)
            layers = list(range(max(0, n - self.lora_top_layers), n))
        return TrainConfig(rank=self.rank, lora_alpha=self.lora_alpha, lr=self.lr, steps=steps, batch_size=self.batch_size,
                           seed=self.seed, max_length=self.max_length, layers=layers)

    def lissa_config(self):
        from divgen.engine.spa.influence import LissaConfig

        return LissaConfig(depth=self.lissa_depth, damping=self.lissa_damping, seed=self.seed)


def load_run_task(cfg: SpaRunConfig):
    """The synth task with the run's overrides (validated; no model loaded)."""
    from divgen.engine.synth import load_task

    task = load_task(cfg.task).with_overrides(method=cfg.synth_method, per_label=cfg.per_label,
                                              max_new_tokens=cfg.synth_max_new_tokens, model=cfg.model,
                                              few_shot_file=cfg.few_shot, seed=cfg.seed)
    labels = len(task.labels)
    if cfg.k > labels * len(QUERY_TEMPLATES):
        raise DivgenError(f"--k {cfg.k} needs more queries than the {labels * len(QUERY_TEMPLATES)} this task's "
                          f"{labels} labels give: use --k <= {labels * len(QUERY_TEMPLATES)}")
    return task


def instruction(task, label) -> str:
    """The task's instruction for a label, without few-shot examples (the training prompt)."""
    from divgen.engine.synth.prompts import render_prompt

    return render_prompt(task, label, []).strip()


def queries_for(task, k: int) -> list[dict]:
    """K queries: query template ⌊j / L⌋ for label j mod L."""
    labels = task.labels
    return [{"prompt": QUERY_TEMPLATES[j // len(labels)].format(verbalization=labels[j % len(labels)].verbalization),
             "label": labels[j % len(labels)].name} for j in range(k)]


def heldout_for(task, per_label: int) -> list[dict]:
    return [{"prompt": HELDOUT_TEMPLATES[t].format(verbalization=lab.verbalization), "label": lab.name}
            for lab in task.labels for t in range(per_label)]


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _atomic_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def temp_tag(t: float) -> str:
    return f"t{t:g}"


@dataclass
class SpaRun:
    """One run directory; ``run()`` executes the stages that are not finished."""

    cfg: SpaRunConfig
    out: Path
    judge: Judge | None = None
    progress: bool = True
    lm: object = None
    cost: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise DivgenError(f"--out {self.out} is an existing file, not a directory: give a new or existing run "
                              "directory")
        self.cfg.check()
        self.task = load_run_task(self.cfg)

    # ---- helpers ----
    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[spa run] {msg}", file=sys.stderr, flush=True)

    def model(self):
        if self.lm is None:
            from divgen.engine.model import load_model

            self.lm = load_model(self.cfg.model)
        return self.lm

    def check_config(self) -> None:
        """A run directory belongs to one config: refuse another before any work."""
        path = self.out / "run.json"
        mine = asdict(self.cfg)
        mine["methods"], mine["temperatures"] = list(mine["methods"]), list(mine["temperatures"])
        if path.exists():
            theirs = json.loads(path.read_text()).get("config")
            if theirs != mine:
                diff = sorted(k for k in mine if theirs is None or theirs.get(k) != mine[k])
                raise DivgenError(f"{self.out} holds a run with other settings ({', '.join(diff)}): "
                                  "use another --out or the original settings")
        else:
            _atomic_json(path, {"config": mine})

    def run(self, stop_after: str | None = None) -> dict | None:
        if stop_after is not None and stop_after not in STAGES:
            raise DivgenError(f"unknown stage {stop_after!r}: one of {', '.join(STAGES)}")
        self.check_config()
        result = None
        for stage in STAGES:
            t0 = time.perf_counter()
            result = getattr(self, f"stage_{stage}")()
            self.log(f"{stage} done ({time.perf_counter() - t0:.1f}s)")
            if stage == stop_after:
                return None
        return result

    # ---- 1. synth ----
    def stage_synth(self) -> None:
        from divgen.engine.synth import run_synth

        synth = self.out / "synth.jsonl"
        by_name = {lab.name: lab for lab in self.task.labels}
        if self.cfg.synth_file is not None:
            self._take_synth_file(synth, by_name)
        else:
            report = run_synth(self.task, synth, lm=self.model(), batch_rows=self.cfg.synth_batch_rows,
                               progress=self.progress)
            self.cost["synth_seconds_this_run"] = round(report.wall_time_s, 1)
        pairs = []
        for rec in _read_jsonl(synth):
            text = rec["text"].strip()
            if text:
                pairs.append({"prompt": instruction(self.task, by_name[rec["label"]]), "response": text,
                              "label": rec["label"]})
        if len(pairs) < self.cfg.k:
            raise DivgenError(f"the synth output holds {len(pairs)} non-empty texts, fewer than --k {self.cfg.k}")
        _atomic_jsonl(self.out / "data" / "train.jsonl", pairs)
        _atomic_jsonl(self.out / "data" / "queries.jsonl", queries_for(self.task, self.cfg.k))
        _atomic_jsonl(self.out / "data" / "heldout.jsonl", heldout_for(self.task, self.cfg.heldout_per_label))

    def _take_synth_file(self, synth: Path, by_name: dict) -> None:
        """Copy a finished `divgen synth` output of this task into the run (checked: text + a label of
        the task on every line)."""
        from divgen.engine.metrics import read_examples

        source = Path(self.cfg.synth_file)
        texts, labels = read_examples(source)
        unknown = sorted(set(labels) - set(by_name))
        if unknown:
            raise DivgenError(f"--synth {source}: labels {unknown} are not labels of task {self.task.name} "
                              f"({', '.join(by_name)}): pass an output of `divgen synth {self.cfg.task}`")
        data = source.read_bytes()
        if not synth.exists() or synth.read_bytes() != data:
            synth.parent.mkdir(parents=True, exist_ok=True)
            tmp = synth.with_name(".synth.jsonl.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, synth)
        self.log(f"synth: {len(texts)} examples from {source} (sha256 {hashlib.sha256(data).hexdigest()[:16]})")

    def examples(self):
        from divgen.engine.spa.data import Example

        return [Example(r["prompt"], r["response"]) for r in _read_jsonl(self.out / "data" / "train.jsonl")]

    def queries(self):
        from divgen.engine.spa.data import Example

        return [Example(r["prompt"], "") for r in _read_jsonl(self.out / "data" / "queries.jsonl")]

    def heldout(self) -> list[dict]:
        return _read_jsonl(self.out / "data" / "heldout.jsonl")

    # ---- 2. whole ----
    def whole_dir(self) -> Path:
        return self.out / "whole"

    def stage_whole(self):
        from divgen.engine.spa.adapt import train_adapter

        self.log(f"whole-set adapter on {len(self.examples())} pairs")
        return train_adapter(self.model(), self.examples(), self.cfg.train_config(self.cfg.whole_steps, self.model()),
                             self.whole_dir(), "whole", progress=self.progress)

    # ---- 3. partition ----
    def data_hash(self) -> str:
        return hashlib.sha256((self.out / "data" / "train.jsonl").read_bytes()
                              + (self.out / "data" / "queries.jsonl").read_bytes()).hexdigest()[:16]

    def stage_partition(self) -> None:
        from divgen.engine.spa import partition as part

        examples, queries = self.examples(), self.queries()
        todo = [m for m in self.cfg.methods if not self._partition_done(m)]
        scores = {}
        if "random" in todo:
            scores["random"] = part.random_scores(len(examples), len(queries), self.cfg.seed)
        if "lexical" in todo:
            scores["lexical"] = part.bm25_scores([q.prompt for q in queries],
                                                 [f"{e.prompt} {e.response}" for e in examples])
        kinds = [m for m in ("lissa", "gradsim") if m in todo]
        if kinds:
            from divgen.engine.spa.lora import load_adapter

            lm = self.model()
            whole = load_adapter(self.whole_dir() / "whole", model=lm.model)
            cost: dict = {}
            got = part.influence_scores_multi(lm, examples, queries, whole, kinds, self.cfg.lissa_config(),
                                              self.out / "influence", max_length=self.cfg.max_length,
                                              progress=self.progress, grad_batch=self.cfg.grad_batch, cost=cost)
            scores.update(got)
            if cost.get("examples_this_run"):
                _atomic_json(self.out / "influence" / "cost.json", cost)
        for m in todo:
            z = part.normalise(scores[m])
            parts = part.assign(z, self.cfg.balance)
            part.write_partitions(self.out / m, method=m, options={"data_hash": self.data_hash(), "seed": self.cfg.seed},
                                  data_path=str(self.out / "data" / "train.jsonl"), examples=examples,
                                  queries=queries, scores=scores[m], z=z, parts=parts, balance=self.cfg.balance)
            self.log(f"partition {m}: sizes {[parts.count(j) for j in range(self.cfg.k)]}")

    def _partition_done(self, method: str) -> bool:
        path = self.out / method / "partitions.json"
        if not path.exists():
            return False
        return json.loads(path.read_text()).get("options", {}).get("data_hash") == self.data_hash()

    def partitions(self, method: str) -> dict:
        return json.loads((self.out / method / "partitions.json").read_text())

    # ---- 4. adapt ----
    def stage_adapt(self) -> None:
        from divgen.engine.spa.adapt import adapt_partitions

        examples = self.examples()
        for m in self.cfg.methods:
            rec = self.partitions(m)
            adapt_partitions(self.model(), examples, rec["assignment"], self.cfg.k,
                             self.cfg.train_config(self.cfg.steps, self.model()), self.out / m / "adapters", progress=self.progress,
                             names=[f"{m}-{j}" for j in range(self.cfg.k)])

    def adapter_paths(self) -> list[tuple[str, Path]]:
        """(name, path) of every adapter: each method's K, then the whole-set one."""
        out = [(f"{m}-{j}", self.out / m / "adapters" / f"{m}-{j}") for m in self.cfg.methods for j in range(self.cfg.k)]
        return out + [("whole", self.whole_dir() / "whole")]

    # ---- 5. sample ----
    def stage_sample(self) -> None:
        from divgen.engine.decode import generate
        from divgen.engine.spa.lora import load_adapter
        from divgen.engine.spa.multilora import MultiLora

        todo = [t for t in self.cfg.temperatures if not (self.out / "samples" / f"{temp_tag(t)}.jsonl").exists()]
        if not todo:
            return
        lm = self.model()
        named = self.adapter_paths()
        adapters = [load_adapter(p, name=n, model=lm.model) for n, p in named]
        heldout = self.heldout()
        k, seed = self.cfg.k, self.cfg.seed
        with MultiLora(lm.model, adapters) as ml:
            for t in todo:
                rows = []                                # (prompt index, group, adapter slot, copy)
                for p in range(len(heldout)):
                    for m in self.cfg.methods:
                        rows += [(p, m, ml.slot_of(f"{m}-{j}"), 0) for j in range(k)]
                    rows += [(p, SINGLE, ml.slot_of("whole"), c) for c in range(k if t > 0 else 1)]
                ml.set_prompt_adapters([slot for _, _, slot, _ in rows])
                t0 = time.perf_counter()
                self.log(f"sampling T = {t:g}: {len(rows)} rows ({len(heldout)} prompts x "
                         f"{len(self.cfg.methods)}x{k} adapters + the whole-set adapter) in one batch")
                results, stats = generate(lm, [lm.format_prompt(heldout[p]["prompt"]) for p, _, _, _ in rows],
                                          max_new_tokens=self.cfg.max_new_tokens, temperature=t,
                                          seeds=[seed + c for _, _, _, c in rows], batch_listeners=[ml])
                out = [{"prompt": heldout[p]["prompt"], "label": heldout[p]["label"], "group": g,
                        "adapter": ml.names[slot], "copy": c, "temperature": t, "text": r.text.strip(),
                        "token_ids": r.token_ids, "finish_reason": r.finish_reason}
                       for (p, g, slot, c), r in zip(rows, results)]
                _atomic_jsonl(self.out / "samples" / f"{temp_tag(t)}.jsonl", out)
                self.log(f"T = {t:g}: {stats.rows_forwarded} rows forwarded in {time.perf_counter() - t0:.1f}s")

    def samples(self, t: float) -> list[dict]:
        return _read_jsonl(self.out / "samples" / f"{temp_tag(t)}.jsonl")

    # ---- 6. kl ----
    def stage_kl(self) -> None:
        from divgen.engine.spa.lora import load_adapter
        from divgen.engine.spa.metrics import pairwise_kl_sum
        from divgen.engine.spa.multilora import MultiLora
        from divgen.engine.spa.sample import adapter_logprobs

        path = self.out / "kl.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        todo = [m for m in self.cfg.methods if m not in done]
        if not todo:
            return
        lm = self.model()
        greedy = self.samples(0.0)
        for m in todo:
            adapters = [load_adapter(self.out / m / "adapters" / f"{m}-{j}", name=f"{m}-{j}", model=lm.model)
                        for j in range(self.cfg.k)]
            per_prompt = {}
            with MultiLora(lm.model, adapters) as ml:
                for row in (r for r in greedy if r["group"] == m):
                    if not row["token_ids"]:
                        continue
                    s, n = pairwise_kl_sum(adapter_logprobs(lm, ml, lm.encode(lm.format_prompt(row["prompt"])),
                                                            row["token_ids"]))
                    tot = per_prompt.setdefault(row["prompt"], [0.0, 0])
                    tot[0], tot[1] = tot[0] + s, tot[1] + n
            values = [s / n for s, n in per_prompt.values() if n]
            done[m] = sum(values) / len(values) if values else 0.0
            _atomic_json(path, done)
            self.log(f"pairwise KL {m}: {done[m]:.4f}")

    # ---- 7. judge ----
    def stage_judge(self) -> None:
        path = self.out / "judged.json"
        verdicts = json.loads(path.read_text()) if path.exists() else {}
        texts = sorted({r["text"] for t in self.cfg.temperatures for r in self.samples(t)} - set(verdicts))
        if not texts:
            return
        judge = self.judge or default_judge(self.cfg, self.task, self.out)
        predicted = judge(texts)
        if len(predicted) != len(texts):
            raise DivgenError(f"the judge returned {len(predicted)} labels for {len(texts)} texts")
        verdicts.update(zip(texts, predicted))
        _atomic_json(path, verdicts)

    # ---- 8. report ----
    def stage_report(self) -> dict:
        from divgen.engine.spa.metrics import answers_self_bleu, diversity_score, fidelity_at_k, mean_ignoring_nan

        verdicts = json.loads((self.out / "judged.json").read_text())
        kl = json.loads((self.out / "kl.json").read_text())
        k = self.cfg.k
        rows = []
        for t in self.cfg.temperatures:
            samples = self.samples(t)
            for g in (*self.cfg.methods, SINGLE):
                by_prompt: dict[str, list[dict]] = {}
                for r in samples:
                    if r["group"] == g:
                        by_prompt.setdefault(r["prompt"], []).append(r)
                answers = {p: [r["text"] for r in rs] * (k if len(rs) == 1 else 1) for p, rs in by_prompt.items()}
                labels = {p: rs[0]["label"] for p, rs in by_prompt.items()}
                judged = [[verdicts[a] == labels[p] for a in answers[p]] for p in answers]
                fid = fidelity_at_k(judged)
                rows.append({
                    "group": g, "name": f"SPA, {METHOD_NAMES[g]}" if g != SINGLE else "single adapter on everything",
                    "temperature": t, "answers_per_prompt": k,
                    "diversity_score": mean_ignoring_nan([diversity_score(a) for a in answers.values()]),
                    "self_bleu4": mean_ignoring_nan([answers_self_bleu(a) for a in answers.values()]),
                    "pairwise_kl": (kl.get(g) if t == 0 else None) if g != SINGLE else 0.0,
                    "fidelity_at1": fid["at1"], "fidelity_any": fid["any"], "fidelity_all": fid["all"],
                    "prompts": fid["prompts"],
                    "sizes": self.partitions(g)["sizes"] if g != SINGLE else None,
                })
        summary = {"config": {**asdict(self.cfg), "methods": list(self.cfg.methods),
                              "temperatures": list(self.cfg.temperatures)},
                   "examples": len(self.examples()), "heldout_prompts": len(self.heldout()),
                   "rows": rows, "targets": targets(rows, self.cfg.methods)}
        judge_file = self.out / "judge.json"
        if judge_file.exists():
            summary["judge"] = json.loads(judge_file.read_text())
        cost = self.out / "influence" / "cost.json"
        if cost.exists():
            summary["influence_cost"] = json.loads(cost.read_text())
        _atomic_json(self.out / "summary.json", summary)
        (self.out / "table.md").write_text(markdown_table(rows) + "\n")
        plot(rows, self.out / "diversity_fidelity.png", log=self.log)
        if self.progress:
            print(markdown_table(rows))
        return summary


def default_judge(cfg: SpaRunConfig, task, out: Path | None = None, test_rows: int = 400) -> Judge:
    """``divgen.engine.eval``'s judge, trained on the pool rows of the real file. With ``out``, its
    accuracy on ``test_rows`` real test rows (evenly spaced, never shown to it) goes to
    ``out/judge.json``, so the fidelity figures come with the judge's own error rate."""
    real = cfg.real or cfg.few_shot
    if real is None:
        raise DivgenError("the judge needs real labelled rows: pass --real FILE (e.g. ../shared/data/ag_news_test.csv)")
    try:
        from divgen.engine.eval.data import read_real, split, thin
        from divgen.engine.eval.judge import Judge as EvalJudge
    except ImportError as exc:
        raise DivgenError(f"the judge (divgen.engine.eval) is not available ({exc}): update divgen") from exc
    pool, test = split(read_real(real, task), task.few_shot.every)
    judge = EvalJudge.train(pool.texts, [pool.label_names[i] for i in pool.labels], pool.label_names)
    if out is not None:
        test = thin(test, test_rows)
        gold = [test.label_names[i] for i in test.labels]
        accuracy = sum(p == g for p, g in zip(judge.predict(test.texts), gold)) / len(gold)
        _atomic_json(out / "judge.json", {"real": str(real), "trained_on_pool_rows": len(pool),
                                          "test_rows": len(gold), "test_accuracy": accuracy})
    return judge.predict


def interpolate(points: list[tuple[float, float]], x: float) -> tuple[float, bool]:
    """y at x on the piecewise-linear curve through ``points`` (sorted by x); outside its range the
    nearest end's y and False."""
    pts = sorted(points)
    if x <= pts[0][0] or x >= pts[-1][0]:
        end = pts[0] if x <= pts[0][0] else pts[-1]
        return end[1], x == end[0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return (y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)), True
    raise AssertionError("unreachable")


def targets(rows: list[dict], methods) -> dict:
    """The issue's targets, from the rows: per method, its greedy diversity (1 − Self-BLEU-4) and
    fidelity@1 against the single adapter sampled at a temperature that matches that fidelity
    (interpolated along the single adapter's temperatures > 0) and against random partitions."""
    def at(g, t):
        return next(r for r in rows if r["group"] == g and r["temperature"] == t)

    single = [(r["fidelity_at1"], 1 - r["self_bleu4"]) for r in rows if r["group"] == SINGLE and r["temperature"] > 0]
    out = {}
    for m in methods:
        g = at(m, 0.0)
        div = 1 - g["self_bleu4"]
        entry = {"diversity": div, "fidelity_at1": g["fidelity_at1"]}
        if single:
            matched, inside = interpolate(single, g["fidelity_at1"])
            entry.update({"single_matched_diversity": matched, "matched_within_range": inside,
                          "beats_single_at_matched_fidelity": div > matched})
        if "random" in methods and m != "random":
            r = at("random", 0.0)
            entry["beats_random"] = div > 1 - r["self_bleu4"] and g["fidelity_at1"] >= r["fidelity_at1"]
        out[m] = entry
    order = sorted(methods, key=lambda m: -out[m]["diversity"])
    out["order_by_diversity"] = order
    if {"lissa", "lexical", "random"} <= set(methods):
        d = {m: out[m]["diversity"] for m in methods}
        out["influence_gt_lexical_gt_random"] = d["lissa"] > d["lexical"] > d["random"]
    return out


def _f(v, digits=3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| method | T | answers / prompt | partition sizes | Diversity Score ↑ | Self-BLEU-4 ↓ | pairwise KL ↑ | "
            "fidelity@1 | fidelity any@k | fidelity all@k |")
    lines = [head, "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["temperature"], r["group"] == SINGLE)):
        how = (f"{r['answers_per_prompt']} adapters" if r["group"] != SINGLE else
               (f"1 answer (×{r['answers_per_prompt']})" if r["temperature"] == 0 else f"{r['answers_per_prompt']} samples"))
        kl = "0 (one model)" if r["group"] == SINGLE else _f(r["pairwise_kl"])
        lines.append(f"| {r['name']} | {r['temperature']:g} | {how} | "
                     f"{'/'.join(map(str, r['sizes'])) if r['sizes'] else 'all'} | {_f(r['diversity_score'])} | "
                     f"{_f(r['self_bleu4'])} | {kl} | {_f(r['fidelity_at1'])} | {_f(r['fidelity_any'])} | "
                     f"{_f(r['fidelity_all'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, log=print) -> bool:
    """Diversity (1 − Self-BLEU-4) against fidelity@1, one curve per method over the temperatures."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'divgen[plot]'): no PNG")
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    for g in groups:
        pts = sorted((r["temperature"], r["fidelity_at1"], 1 - r["self_bleu4"]) for r in rows if r["group"] == g)
        name = METHOD_NAMES.get(g, "single adapter")
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="s" if g == SINGLE else "o",
                linestyle="--" if g == SINGLE else "-", label=name)
        for t, x, y in pts:
            ax.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("fidelity@1 (share of answers judged the intended label)")
    ax.set_ylabel("diversity across a prompt's answers (1 − Self-BLEU-4)")
    ax.set_title("SPA on AG News: diversity vs fidelity (labels: temperature)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
