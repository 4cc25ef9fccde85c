"""`divgen spa partition|adapt|sample`: SPA (Synthesize, Partition, then Adapt) from the command line.

    divgen spa partition --data train.jsonl --queries queries.jsonl --method influence --out runs/infl
    divgen spa adapt --partitions runs/infl --out runs/infl/adapters        # one LoRA per partition
    divgen spa adapt --data train.jsonl --out runs/whole                     # one LoRA on everything
    divgen spa sample --adapters runs/infl/adapters --prompts eval.jsonl --out runs/infl/samples.jsonl

Every step resumes after being killed (rerun the same command). See engine/spa/*.py for the math.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from divgen.engine.errors import DivgenError


def register(subparsers) -> None:
    """Add `spa` and its sub-subcommands to the `divgen` parser."""
    spa = subparsers.add_parser("spa", help="SPA: partition a dataset, adapt one LoRA per part, sample all at once",
                                description="Synthesize, Partition, then Adapt (Wen & Chaudhuri, NeurIPS 2024).")
    sub = spa.add_subparsers(dest="spa_command", required=True)

    p = sub.add_parser("partition", help="split (prompt, response) pairs into K parts, one per query",
                       description="Score every example against every query (random | lexical BM25 | influence), "
                                   "standardise each query's scores, give each example to its best query's part "
                                   "(balanced so that no part has fewer than floor(balance*N/K) examples).")
    p.add_argument("--data", required=True, help="JSONL of {\"prompt\", \"response\"} pairs")
    p.add_argument("--queries", required=True, help="JSONL of {\"prompt\"[, \"response\"]} or .txt, one query per "
                                                    "line; K = number of queries")
    p.add_argument("--method", required=True, choices=["random", "lexical", "influence"])
    p.add_argument("--influence", default="lissa", choices=["lissa", "gradsim"],
                   help="influence: LiSSA inverse-Hessian (default) or gradient cosine similarity")
    p.add_argument("--out", required=True, help="output directory (partitions.json, scores.jsonl)")
    p.add_argument("--balance", type=float, default=0.5,
                   help="every part gets at least floor(balance*N/K) examples, in [0, 1] (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of random scores / LiSSA mini-batches (default 0)")
    p.add_argument("--adapter", default=None, help="influence: LoRA adapter trained on the whole set (default: "
                                                   "train one into OUT/whole with the training flags below)")
    p.add_argument("--lissa-depth", type=int, default=20, help="LiSSA recursion depth (default 20)")
    p.add_argument("--lissa-repeats", type=int, default=1, help="LiSSA runs averaged (default 1)")
    p.add_argument("--lissa-batch", type=int, default=4, help="examples per Hessian-vector product (default 4)")
    p.add_argument("--lissa-damping", type=float, default=0.01, help="λ added to the Hessian (default 0.01)")
    p.add_argument("--lissa-scale", default="auto", help="LiSSA scale s > λ_max, or 'auto' (default)")
    p.add_argument("--query-max-new-tokens", type=int, default=48,
                   help="influence: length of the greedy answer given to queries without a response (default 48)")
    _model_args(p)
    _train_args(p)
    p.set_defaults(func=run_partition)

    a = sub.add_parser("adapt", help="train one LoRA adapter per partition (PEFT format)",
                       description="Train one LoRA adapter per partition of `spa partition` (or one on the whole "
                                   "--data). Finished adapters are skipped; an interrupted one resumes from its "
                                   "last checkpoint.")
    a.add_argument("--partitions", default=None, help="partitions.json (or its directory) from `spa partition`")
    a.add_argument("--data", default=None, help="JSONL pairs (default: the file the partitions were made from; "
                                                "without --partitions: train one adapter 'whole' on all of it)")
    a.add_argument("--out", required=True, help="output directory: one PEFT adapter directory per partition")
    a.add_argument("--checkpoint-every", type=int, default=10, help="steps between resumable checkpoints (default 10)")
    _model_args(a)
    _train_args(a)
    a.set_defaults(func=run_adapt)

    s = sub.add_parser("sample", help="answer every prompt with every adapter in one batch; report diversity",
                       description="Decode every prompt under every adapter (greedy by default) in one multi-LoRA "
                                   "batch, then report the Diversity Score and the adapters' pairwise KL.")
    s.add_argument("--adapters", required=True, nargs="+",
                   help="adapter directories, or an output directory of `spa adapt`")
    s.add_argument("--prompts", required=True, help="JSONL of {\"prompt\"} or .txt with one prompt per line")
    s.add_argument("--out", default=None, help="write the answers (JSONL) here and metrics to OUT.metrics.json")
    s.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (default 48)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus cutoff when sampling (default 1: off)")
    s.add_argument("--copies", type=int, default=1,
                   help="answers per adapter and prompt (seeds SEED..SEED+copies-1; default 1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-kl", action="store_true", help="skip the (teacher-forced) pairwise-KL metric")
    _model_args(s)
    s.set_defaults(func=run_sample)

    from divgen.bindings.cli_spa_run import add_run_parser     # `divgen spa run` (SPA end to end)
    add_run_parser(sub)


def _model_args(p) -> None:
    p.add_argument("--model", default=None, help="local HF model dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_args(p) -> None:
    g = p.add_argument_group("LoRA training")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    g.add_argument("--alpha", type=float, default=16.0, help="lora_alpha; scale = alpha / r (default 16)")
    g.add_argument("--target-modules", default="q_proj,v_proj",
                   help="comma-separated layer names to adapt (default q_proj,v_proj)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    g.add_argument("--steps", type=int, default=30, help="optimizer steps per adapter (default 30)")
    g.add_argument("--batch-size", type=int, default=4, help="examples per step (default 4)")
    g.add_argument("--train-seed", type=int, default=0, help="seed of A's init and the batch order (default 0)")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    g.add_argument("--max-length", type=int, default=256, help="max prompt + response tokens (default 256)")


def _train_config(args):
    from divgen.engine.spa.adapt import TrainConfig

    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, target_modules=targets, lr=args.lr, steps=args.steps,
                      batch_size=args.batch_size, seed=args.train_seed, dropout=args.dropout,
                      max_length=args.max_length, checkpoint_every=getattr(args, "checkpoint_every", 10))
    cfg.check()
    return cfg


def _progress(args) -> bool:
    return not args.quiet


# ---------------------------------------------------------------------------------------------

def run_partition(args) -> int:
    from divgen.engine.spa import partition as part
    from divgen.engine.spa.data import read_pairs, read_prompts

    examples = read_pairs(args.data)
    queries = read_prompts(args.queries)
    out = Path(args.out)
    if not 0 <= args.balance <= 1:
        raise DivgenError(f"--balance must be in [0, 1], got {args.balance}")
    if len(examples) < len(queries):
        raise DivgenError(f"{len(examples)} examples cannot fill {len(queries)} partitions: use fewer queries")
    options: dict = {"seed": args.seed}
    if args.method == "random":
        scores = part.random_scores(len(examples), len(queries), args.seed)
    elif args.method == "lexical":
        scores = part.bm25_scores([q.prompt for q in queries], [f"{e.prompt} {e.response}" for e in examples])
        options.update({"k1": 1.5, "b": 0.75, "document": "prompt + response"})
    else:
        scores, options = _influence(args, examples, queries, out, options)
    z = part.normalise(scores)
    parts = part.assign(z, args.balance)
    record = part.write_partitions(out, method=args.method, options=options, data_path=args.data, examples=examples,
                                   queries=queries, scores=scores, z=z, parts=parts, balance=args.balance)
    print(json.dumps({"method": args.method, "k": record["k"], "sizes": record["sizes"],
                      "partitions": str(out / part.PARTITIONS_FILE)}))
    return 0


def _influence(args, examples, queries, out: Path, options: dict):
    from dataclasses import asdict

    from divgen.engine.model import load_model
    from divgen.engine.spa.adapt import train_adapter
    from divgen.engine.spa.influence import LissaConfig
    from divgen.engine.spa.lora import load_adapter
    from divgen.engine.spa.partition import influence_scores

    scale = args.lissa_scale if args.lissa_scale == "auto" else _positive_float(args.lissa_scale, "--lissa-scale")
    lissa_cfg = LissaConfig(depth=args.lissa_depth, repeats=args.lissa_repeats, batch_size=args.lissa_batch,
                            damping=args.lissa_damping, scale=scale, seed=args.seed)
    lissa_cfg.check()
    cfg = _train_config(args) if args.adapter is None else None
    lm = load_model(args.model, device=args.device)
    if args.adapter is not None:
        whole = load_adapter(args.adapter, model=lm.model)
    else:
        if _progress(args):
            print(f"training the whole-set adapter on {len(examples)} examples", file=sys.stderr)
        whole = train_adapter(lm, examples, cfg, out, "whole", progress=_progress(args))
    scores = influence_scores(lm, examples, queries, whole, args.influence, lissa_cfg, out,
                              max_length=args.max_length, query_max_new_tokens=args.query_max_new_tokens,
                              progress=_progress(args))
    options.update({"influence": args.influence, "adapter": str(whole.path),
                    "lissa": asdict(lissa_cfg) if args.influence == "lissa" else None,
                    "train_config": asdict(cfg) if cfg else None})
    return scores, options


def _positive_float(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise DivgenError(f"{flag} must be a number or 'auto', got {text!r}") from exc
    if not value > 0:
        raise DivgenError(f"{flag} must be > 0, got {value}")
    return value


def run_adapt(args) -> int:
    from dataclasses import asdict

    from divgen.engine.model import load_model
    from divgen.engine.spa.adapt import adapt_partitions, train_adapter, write_manifest
    from divgen.engine.spa.data import read_pairs
    from divgen.engine.spa.partition import file_sha256, read_partitions

    cfg = _train_config(args)
    out = Path(args.out)
    if args.partitions is None:
        if args.data is None:
            raise DivgenError("give --partitions (one adapter per part) or --data (one adapter on everything)")
        examples = read_pairs(args.data)
        lm = load_model(args.model, device=args.device)
        train_adapter(lm, examples, cfg, out, "whole", progress=_progress(args))
        write_manifest(out, ["whole"], {"train_config": asdict(cfg), "sizes": [len(examples)]})
        print(json.dumps({"adapters": [str(out / "whole")]}))
        return 0
    record = read_partitions(args.partitions)
    data = args.data or record.get("data")
    if not data or not Path(data).exists():
        raise DivgenError(f"the data file {data!r} of the partitions is not there: pass --data")
    if args.data is None and record.get("data_sha256") and file_sha256(data) != record["data_sha256"]:
        raise DivgenError(f"{data} changed since it was partitioned: partition it again")
    examples = read_pairs(data)
    lm = load_model(args.model, device=args.device)
    paths = adapt_partitions(lm, examples, list(record["assignment"]), int(record["k"]), cfg, out,
                             progress=_progress(args))
    print(json.dumps({"adapters": [str(p) for p in paths]}))
    return 0


def run_sample(args) -> int:
    from tqdm import tqdm

    from divgen.engine.model import load_model
    from divgen.engine.spa.adapt import adapter_dirs
    from divgen.engine.spa.data import read_prompts, write_jsonl
    from divgen.engine.spa.multilora import MultiLora
    from divgen.engine.spa.sample import load_adapters, sample_answers, score_report

    if args.copies < 1:
        raise DivgenError(f"--copies must be >= 1, got {args.copies}")
    if args.max_new_tokens < 1:
        raise DivgenError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise DivgenError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if args.copies > 1 and args.temperature == 0:
        raise DivgenError("--copies > 1 with greedy decoding repeats the same answer: set --temperature > 0")
    prompts = [p.prompt for p in read_prompts(args.prompts)]
    paths = adapter_dirs(args.adapters)
    lm = load_model(args.model, device=args.device)
    adapters = load_adapters(lm, paths)
    bar = tqdm(total=args.max_new_tokens, desc="decoding", unit="tok", file=sys.stderr, disable=not _progress(args),
               leave=False)
    with MultiLora(lm.model, adapters) as ml:
        report = sample_answers(lm, ml, prompts, copies=args.copies, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                progress=lambda done, total: bar.update(1))
        bar.close()
        if not args.no_kl:
            score_report(lm, ml, report, progress=_progress(args))
        else:
            from divgen.engine.spa.metrics import diversity_score
            for ps in report.prompts:
                ps.diversity_score = diversity_score([a["text"] for a in ps.answers])
    summary = report.summary()
    summary["adapter_paths"] = [str(p) for p in paths]
    if args.no_kl:
        summary["pairwise_kl"] = None
    if args.out:
        rows = [{"prompt": ps.prompt, **{k: v for k, v in a.items() if k != "token_ids"}}
                for ps in report.prompts for a in ps.answers]
        write_jsonl(args.out, rows)
        summary["per_prompt"] = [{"prompt": ps.prompt, "diversity_score": ps.diversity_score,
                                  "pairwise_kl": None if args.no_kl else ps.pairwise_kl} for ps in report.prompts]
        Path(f"{args.out}.metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    else:
        for ps in report.prompts:
            print(f"## {ps.prompt}")
            for a in ps.answers:
                tag = a["adapter"] + (f" #{a['copy']}" if args.copies > 1 else "")
                print(f"[{tag}] {a['text']}")
    kl = "n/a" if args.no_kl else f"{report.pairwise_kl:.4f}"
    print(f"Diversity Score {report.diversity_score:.4f}  pairwise KL {kl}  "
          f"({len(report.adapters)} adapters x {args.copies} copies, {len(prompts)} prompts, "
          f"decode {report.decode_seconds:.1f}s)", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("diversity_score", "pairwise_kl", "adapters", "prompts")}))
    return 0
