"""`divgen spa run TASK --out DIR`: SPA end to end (synth -> partition -> adapt -> sample -> judge -> report).

    divgen spa run ag_news --few-shot ../shared/data/ag_news_test.csv --out runs/spa-ag

Resumable: killed and run again with the same arguments, it continues where it stopped. The stages
and the metrics are described in engine/spa/pipeline.py.
"""
from __future__ import annotations

import json

from divgen.engine.errors import DivgenError


def add_run_parser(sub) -> None:
    from divgen.engine.spa.pipeline import METHODS, SpaRunConfig

    d = SpaRunConfig()
    r = sub.add_parser("run", help="SPA end to end on a synth task, judged by a classifier trained on real rows",
                       description="Synthesize a dataset with `divgen synth`, partition it (random, BM25, influence "
                                   "LiSSA, gradient similarity), train one LoRA per part, answer held-out prompts "
                                   "under every adapter in one multi-LoRA batch (greedy and sampled), judge every "
                                   "answer with a classifier trained on real labelled rows, and report diversity "
                                   "and fidelity@k. Resumes after a kill.")
    r.add_argument("task", help="task file or shipped task name (e.g. ag_news)")
    r.add_argument("--out", required=True, help="run directory (created; resumed if it holds this run)")
    r.add_argument("--few-shot", default=None, help="few-shot file of the synth job (pool rows only), "
                                                    "e.g. ../shared/data/ag_news_test.csv")
    r.add_argument("--real", default=None, help="real labelled file the judge trains on (pool rows; default: --few-shot)")
    r.add_argument("--synth", default=None, dest="synth_file",
                   help="use this finished `divgen synth` output of the task instead of synthesizing (skips stage 1's "
                        "generation)")
    r.add_argument("--synth-method", default=d.synth_method, help=f"synth method (default {d.synth_method})")
    r.add_argument("--per-label", type=int, default=d.per_label, help=f"synthetic examples per label (default {d.per_label})")
    r.add_argument("--synth-max-new-tokens", type=int, default=None, help="tokens per synthetic text (default: the task's)")
    r.add_argument("--k", type=int, default=d.k, help=f"parts = adapters per method (default {d.k})")
    r.add_argument("--methods", default=",".join(METHODS), help=f"partition methods (default {','.join(METHODS)})")
    r.add_argument("--heldout-per-label", type=int, default=d.heldout_per_label,
                   help=f"held-out prompts per label (default {d.heldout_per_label})")
    r.add_argument("--temperatures", default=",".join(f"{t:g}" for t in d.temperatures),
                   help="sampling temperatures, 0 = greedy, which must be included (default "
                        f"{','.join(f'{t:g}' for t in d.temperatures)})")
    r.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"answer length (default {d.max_new_tokens})")
    r.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    r.add_argument("--lora-top-layers", type=int, default=d.lora_top_layers,
                   help="LoRA on the last N transformer layers only, 0 = all (default 0); shortens every backward")
    r.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha:g})")
    r.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr:g})")
    r.add_argument("--steps", type=int, default=d.steps, help=f"steps per part adapter (default {d.steps})")
    r.add_argument("--whole-steps", type=int, default=d.whole_steps, help=f"steps of the whole-set adapter (default {d.whole_steps})")
    r.add_argument("--batch-size", type=int, default=d.batch_size, help=f"examples per step (default {d.batch_size})")
    r.add_argument("--max-length", type=int, default=d.max_length, help=f"prompt + response tokens (default {d.max_length})")
    r.add_argument("--lissa-depth", type=int, default=d.lissa_depth, help=f"LiSSA depth (default {d.lissa_depth})")
    r.add_argument("--grad-batch", type=int, default=d.grad_batch,
                   help=f"examples per batched per-example-gradient backward (default {d.grad_batch})")
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--model", default=None, help="local HF model dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.set_defaults(func=run_spa_pipeline)


def _floats(text: str, flag: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise DivgenError(f"{flag} must be comma-separated numbers, got {text!r}") from exc


def check_flags(args) -> None:
    """Every number flag's range (engine/limits.py), before the run folder or any stage is touched."""
    from divgen.engine import limits
    from divgen.engine.spa.config import MAX_LENGTH, MAX_RANK, MAX_STEPS

    n = limits.count
    n(args.per_label, "--per-label", high=limits.MAX_JOB_EXAMPLES)
    if args.synth_max_new_tokens is not None:
        limits.max_new_tokens(args.synth_max_new_tokens, "--synth-max-new-tokens")
    n(args.k, "--k", low=2, high=limits.MAX_SAMPLES, hint=" (one adapter per part)")
    n(args.heldout_per_label, "--heldout-per-label", high=limits.MAX_SAMPLES)
    for t in _floats(args.temperatures, "--temperatures"):
        limits.temperature(t, "--temperatures")
    limits.max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    n(args.rank, "--rank", high=MAX_RANK)
    n(args.lora_top_layers, "--lora-top-layers", low=0, high=100_000, hint=" (0 = every layer)")
    limits.number(args.lora_alpha, "--lora-alpha", low=0.0, high=1e6, low_open=True)
    limits.number(args.lr, "--lr", low=0.0, high=10.0, low_open=True)
    n(args.steps, "--steps", high=MAX_STEPS)
    n(args.whole_steps, "--whole-steps", high=MAX_STEPS)
    n(args.batch_size, "--batch-size", high=limits.MAX_SAMPLES)
    n(args.max_length, "--max-length", low=2, high=MAX_LENGTH)
    n(args.lissa_depth, "--lissa-depth", high=MAX_STEPS)
    n(args.grad_batch, "--grad-batch", high=limits.MAX_SAMPLES)
    limits.seed(args.seed, "--seed")
    if args.synth_method is not None:
        limits.method(args.synth_method, "--synth-method")


def run_spa_pipeline(args) -> int:
    from divgen.engine.spa.pipeline import SpaRun, SpaRunConfig

    check_flags(args)
    cfg = SpaRunConfig(task=args.task, few_shot=args.few_shot, real=args.real, synth_method=args.synth_method, synth_file=args.synth_file,
                       per_label=args.per_label, synth_max_new_tokens=args.synth_max_new_tokens, k=args.k,
                       methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                       heldout_per_label=args.heldout_per_label,
                       temperatures=_floats(args.temperatures, "--temperatures"), max_new_tokens=args.max_new_tokens,
                       rank=args.rank, lora_top_layers=args.lora_top_layers, lora_alpha=args.lora_alpha, lr=args.lr, steps=args.steps,
                       whole_steps=args.whole_steps, batch_size=args.batch_size, max_length=args.max_length,
                       lissa_depth=args.lissa_depth, grad_batch=args.grad_batch, seed=args.seed, model=args.model)
    summary = SpaRun(cfg, args.out, progress=not args.quiet).run()
    print(json.dumps({"summary": f"{args.out}/summary.json", "targets": summary["targets"]}, indent=2))
    return 0
