"""`divgen spa partition|adapt|sample`: SPA (Synthesize, Partition, then Adapt) from the command line.

    divgen spa partition --data train.jsonl --queries queries.jsonl --method influence --out runs/infl
    divgen spa adapt --partitions runs/infl --out runs/infl/adapters        # one LoRA per partition
    divgen spa adapt --data train.jsonl --out runs/whole                     # one LoRA on everything
    divgen spa sample --adapters runs/infl/adapters --prompts eval.jsonl --out runs/infl/samples.jsonl

Every step resumes after being killed (rerun the same command). See engine/spa/*.py for the math.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from divgen.engine import limits
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
    p.add_argument("--method", required=True, choices=list(limits.SPA_PARTITION_METHODS))
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
    s.add_argument("--out", default=None, help="append the answers (JSONL) here as they are decoded, metrics to "
                                                "OUT.metrics.json; rerun the same command to resume after a kill")
    s.add_argument("--prompts-per-batch", type=int, default=8,
                   help="prompts decoded (with every adapter) per batch, each batch appended to --out (default 8)")
    s.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=48,
                   help="answer length limit (default 48)")
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
    p.add_argument("--model", default=None, help="local HF model dir, .gguf file or hub id in the local HF cache "
                                                 "(default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_model_args(args) -> None:
    """--model and --device, checked before torch is imported."""
    from divgen.engine.model_source import find_model

    args.device = limits.device(args.device, "--device")
    find_model(args.model)


def _check_out_file(out: Path, flag: str = "--out") -> None:
    from divgen.engine.files import check_name_fits

    check_name_fits(out, flag, [f"{out.name}.metrics.json"])      # temporaries shorten long names themselves
    if out.is_symlink():
        raise DivgenError(f"{flag} {out} is a symbolic link: give the real path (divgen never writes through a link)")
    if out.is_dir():
        raise DivgenError(f"{flag} {out} is a directory: give a file path such as {out / 'samples.jsonl'}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise DivgenError(f"the folder of {flag} {out} does not exist: create {parent} first")
    import os

    for path in (out, Path(f"{out}.metrics.json")):
        if path.exists() and not os.access(path, os.W_OK):
            raise DivgenError(f"{path} is not writable: fix its permissions or choose another {flag}")
    if not os.access(parent, os.W_OK):
        raise DivgenError(f"cannot write in {parent}: choose another {flag}")


def _check_out_dir(out: Path, flag: str = "--out") -> None:
    if out.exists() and not out.is_dir():
        raise DivgenError(f"{flag} {out} is an existing file, not a directory: give a new or existing directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not out.exists() and not parent.is_dir():
        raise DivgenError(f"the folder of {flag} {out} does not exist: create {parent} first")


def _train_args(p) -> None:
    g = p.add_argument_group("LoRA training")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    g.add_argument("--lora-alpha", type=float, default=16.0,
                   help="LoRA's alpha (PEFT lora_alpha); scale = lora_alpha / r (default 16)")
    g.add_argument("--target-modules", default="q_proj,v_proj",
                   help="comma-separated layer names to adapt (default q_proj,v_proj)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    g.add_argument("--steps", type=int, default=30, help="optimizer steps per adapter (default 30)")
    g.add_argument("--batch-size", type=int, default=4, help="examples per step (default 4)")
    g.add_argument("--train-seed", type=int, default=0, help="seed of A's init and the batch order (default 0)")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    g.add_argument("--max-length", type=int, default=256, help="max prompt + response tokens (default 256)")


def _train_config(args):
    from divgen.engine.spa.config import TrainConfig

    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    return TrainConfig(rank=args.rank, lora_alpha=args.lora_alpha, target_modules=targets, lr=args.lr,
                       steps=args.steps, batch_size=args.batch_size, seed=args.train_seed, dropout=args.dropout,
                       max_length=args.max_length, checkpoint_every=getattr(args, "checkpoint_every", 10))


def _lissa_config(args):
    from divgen.engine.spa.config import LissaConfig

    scale = args.lissa_scale if args.lissa_scale == "auto" else _number_or_auto(args.lissa_scale, "--lissa-scale")
    return LissaConfig(depth=args.lissa_depth, repeats=args.lissa_repeats, batch_size=args.lissa_batch,
                       damping=args.lissa_damping, scale=scale, seed=args.seed)


def _number_or_auto(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise DivgenError(f"{flag} must be a number or 'auto', got {text!r}") from exc


def _progress(args) -> bool:
    return not args.quiet


# ---------------------------------------------------------------------------------------------
# Every command checks all of its arguments and files first, then imports torch and loads the model.

def run_partition(args) -> int:
    out = Path(args.out)
    _check_out_dir(out)
    limits.number(args.balance, "--balance", low=0.0, high=1.0)
    limits.seed(args.seed, "--seed")
    _check_model_args(args)
    lissa_cfg = _lissa_config(args)                # every flag is checked, whichever --method uses it
    cfg = _train_config(args)
    limits.max_new_tokens(args.query_max_new_tokens, "--query-max-new-tokens")
    if args.method == "influence" and args.adapter is not None:
        cfg = None                                 # the given adapter is used, none is trained
        if not Path(args.adapter).expanduser().is_dir():
            raise DivgenError(f"--adapter {args.adapter} is not a directory: pass a PEFT LoRA adapter directory "
                              "(or leave it out to train one on the whole set)")
    from divgen.engine.spa.data import read_pairs, read_prompts
    from divgen.engine.spa.partition_files import check_partition_out

    check_partition_out(out, [args.data, args.queries, args.adapter])
    examples = read_pairs(args.data)
    queries = read_prompts(args.queries)
    if len(examples) < len(queries):
        raise DivgenError(f"{len(examples)} examples cannot fill {len(queries)} partitions: use fewer queries")
    from divgen.engine.spa import partition as part

    options: dict = {"seed": args.seed}
    if args.method == "random":
        scores = part.random_scores(len(examples), len(queries), args.seed)
    elif args.method == "lexical":
        scores = part.bm25_scores([q.prompt for q in queries], [f"{e.prompt} {e.response}" for e in examples])
        options.update({"k1": 1.5, "b": 0.75, "document": "prompt + response"})
    else:
        scores, options = _influence(args, examples, queries, out, options, cfg, lissa_cfg)
    z = part.normalise(scores)
    parts = part.assign(z, args.balance)
    record = part.write_partitions(out, method=args.method, options=options, data_path=args.data, examples=examples,
                                   queries=queries, scores=scores, z=z, parts=parts, balance=args.balance)
    print(json.dumps({"method": args.method, "k": record["k"], "sizes": record["sizes"],
                      "partitions": str(out / part.PARTITIONS_FILE)}))
    return 0


def _influence(args, examples, queries, out: Path, options: dict, cfg, lissa_cfg):
    from dataclasses import asdict

    from divgen.engine.model import load_model
    from divgen.engine.spa.adapt import train_adapter
    from divgen.engine.spa.lora import load_adapter
    from divgen.engine.spa.partition import influence_scores

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


def run_adapt(args) -> int:
    cfg = _train_config(args)
    out = Path(args.out)
    _check_out_dir(out)
    _check_model_args(args)
    if args.partitions is None and args.data is None:
        raise DivgenError("give --partitions (one adapter per part) or --data (one adapter on everything)")
    _check_adapt_inputs(out, [args.data, args.partitions])
    from dataclasses import asdict

    from divgen.engine.spa.data import read_pairs

    if args.partitions is None:
        examples = read_pairs(args.data)
        from divgen.engine.model import load_model
        from divgen.engine.spa.adapt import train_adapter, write_manifest

        lm = load_model(args.model, device=args.device)
        train_adapter(lm, examples, cfg, out, "whole", progress=_progress(args))
        write_manifest(out, ["whole"], {"train_config": asdict(cfg), "sizes": [len(examples)]})
        print(json.dumps({"adapters": [str(out / "whole")]}))
        return 0
    from divgen.engine.spa.partition_files import file_sha256, read_partitions

    record = read_partitions(args.partitions)
    data = args.data or record.get("data")
    if not data or not Path(data).exists():
        raise DivgenError(f"the data file {data!r} of the partitions is not there: pass --data")
    if args.data is None and record.get("data_sha256") and file_sha256(data) != record["data_sha256"]:
        raise DivgenError(f"{data} changed since it was partitioned: partition it again")
    examples = read_pairs(data)
    from divgen.engine.model import load_model
    from divgen.engine.spa.adapt import adapt_partitions

    lm = load_model(args.model, device=args.device)
    paths = adapt_partitions(lm, examples, list(record["assignment"]), int(record["k"]), cfg, out,
                             progress=_progress(args))
    print(json.dumps({"adapters": [str(p) for p in paths]}))
    return 0


def _check_adapt_inputs(out: Path, inputs) -> None:
    """adapt writes OUT/adapters.json and one adapter folder per part (replaced whole when retrained):
    no input may live there."""
    from divgen.engine.spa.adapter_files import MANIFEST

    if not out.is_dir():
        return
    root = out.resolve()
    for inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        p = Path(inp).resolve()
        if p == root or root not in p.parents:
            continue
        rel = p.relative_to(root).parts
        if len(rel) > 1 or rel[0] == MANIFEST:
            raise DivgenError(f"--out {out} would overwrite its own input {inp} (adapt writes {MANIFEST} and one "
                              "folder per adapter there): choose another --out folder")


def _finite_or_none(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def run_sample(args) -> int:
    limits.number(args.copies, "--copies", low=1, high=limits.MAX_SAMPLES, integer=True)
    limits.max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    limits.temperature(args.temperature, "--temperature")
    limits.top_p(args.top_p, "--top-p")
    limits.seed(args.seed, "--seed")
    limits.number(args.prompts_per_batch, "--prompts-per-batch", low=1, high=limits.MAX_SAMPLES, integer=True)
    if args.copies > 1 and args.temperature == 0:
        raise DivgenError("--copies > 1 with greedy decoding repeats the same answer: set --temperature > 0")
    _check_model_args(args)
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_out_file(out)
    from divgen.engine.spa.adapter_files import adapter_dirs, check_adapter_files
    from divgen.engine.spa.data import read_prompts

    prompts = [p.prompt for p in read_prompts(args.prompts)]
    paths = adapter_dirs(args.adapters)
    for path in paths:
        check_adapter_files(path)                 # configs and weights are finite, before the model loads
    rows = len(paths) * args.copies * min(len(prompts), args.prompts_per_batch)
    if rows > limits.MAX_SAMPLES:
        raise DivgenError(f"{rows} rows per batch (adapters x copies x prompts per batch) is more than "
                          f"{limits.MAX_SAMPLES}: lower --prompts-per-batch or --copies")
    settings = {"model": str(args.model or "default"), "adapters": [_adapter_identity(p) for p in paths],
                "prompts": prompts, "copies": args.copies, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, "max_new_tokens": args.max_new_tokens}
    if out is not None:
        from divgen.engine.spa.answers import read_answers, run_fingerprint

        read_answers(out, run_fingerprint(settings))   # an --out that is not ours is refused before the load

    from tqdm import tqdm

    from divgen.engine.model import load_model
    from divgen.engine.spa.multilora import MultiLora
    from divgen.engine.spa.sample import load_adapters, sample_answers, sample_into_file, score_report

    lm = load_model(args.model, device=args.device)
    adapters = load_adapters(lm, paths)
    bar = tqdm(total=args.max_new_tokens, desc="decoding", unit="tok", file=sys.stderr, disable=not _progress(args),
               leave=False)
    with MultiLora(lm.model, adapters) as ml:
        decode = dict(copies=args.copies, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed, progress=lambda done, total: bar.update(1))
        if out is not None:
            report = sample_into_file(lm, ml, prompts, out, settings=settings, prompts_per_batch=args.prompts_per_batch,
                                      log=lambda m: print(m, file=sys.stderr), **decode)
        else:
            report = sample_answers(lm, ml, prompts, **decode)
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
    if out is not None:
        summary["per_prompt"] = [{"prompt": ps.prompt, "diversity_score": _finite_or_none(ps.diversity_score),
                                  "pairwise_kl": None if args.no_kl else _finite_or_none(ps.pairwise_kl)}
                                 for ps in report.prompts]
    summary = {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in summary.items()}
    if out is not None:
        from divgen.engine.files import write_file_atomic

        write_file_atomic(Path(f"{out}.metrics.json"), json.dumps(summary, indent=2, allow_nan=False) + "\n")
    else:
        for ps in report.prompts:
            print(f"## {ps.prompt}")
            for a in ps.answers:
                tag = a["adapter"] + (f" #{a['copy']}" if args.copies > 1 else "")
                print(f"[{tag}] {a['text']}")
    kl = "n/a" if args.no_kl or summary["pairwise_kl"] is None else f"{report.pairwise_kl:.4f}"
    ds = "n/a" if summary["diversity_score"] is None else f"{report.diversity_score:.4f}"
    print(f"Diversity Score {ds}  pairwise KL {kl}  "
          f"({len(report.adapters)} adapters x {args.copies} copies, {len(prompts)} prompts, "
          f"decode {report.decode_seconds:.1f}s)", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("diversity_score", "pairwise_kl", "adapters", "prompts")},
                     allow_nan=False))
    return 0


def _adapter_identity(path: Path) -> dict:
    """What identifies an adapter's content for the run fingerprint (path, config, weights size/mtime)."""
    from divgen.engine.spa.adapter_files import CONFIG_NAME, WEIGHTS_NAME

    st = (path / WEIGHTS_NAME).stat()
    return {"path": str(path.resolve()), "config": (path / CONFIG_NAME).read_text(encoding="utf-8", errors="replace"),
            "weights": [st.st_size, int(st.st_mtime)]}
