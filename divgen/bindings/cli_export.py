"""`divgen export OUT.jsonl [MORE.jsonl ...] --to parquet|hf DIR`: a `datasets` dataset and its card.

The records of the given synth outputs (several methods may go together) become a train/validation
split with ``label`` as a ``ClassLabel``; ``DIR/README.md`` is the dataset card (engine/export.py).
"""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="turn synth outputs into a datasets dataset (parquet or save_to_disk) with a card",
        description="Export synth outputs as a Hugging Face `datasets` dataset: train/validation split "
                    "(stratified by label), `label` as a ClassLabel, and a dataset card (task, model, methods "
                    "and parameters, counts per label, diversity metrics) as DIR/README.md. Needs the datasets "
                    "package (pip install 'divgen[datasets]').",
    )
    p.add_argument("files", nargs="+", metavar="OUT.jsonl", help="synth output(s); several methods may go together")
    p.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "DIR"),
                   help="parquet DIR (train/validation.parquet, load_dataset('parquet', data_dir=DIR)) or "
                        "hf DIR (save_to_disk, load_from_disk(DIR))")
    p.add_argument("--validation", type=float, default=0.1, help="fraction of each label for validation (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--no-metrics", action="store_true", help="leave the diversity metrics out of the card")
    p.add_argument("--no-embeddings", action="store_true", help="card metrics without the embedding cosine")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR if it holds an earlier export (a folder with other files is never replaced)")
    p.set_defaults(func=run_export_command)


def run_export_command(args) -> int:
    from divgen.engine.export import check_export_args, export

    fmt, dest = args.to
    check_export_args(args.files, fmt, dest, args.validation, args.overwrite, args.seed)   # before datasets is imported
    report = export(args.files, fmt, dest, validation=args.validation, seed=args.seed, metrics=not args.no_metrics,
                    embeddings=not args.no_embeddings, overwrite=args.overwrite)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    counts = ", ".join(f"{s} {sum(c.values())}" for s, c in report.counts.items())
    print(f"{dest}: {fmt} dataset ({counts}; labels {', '.join(report.label_names)}) and README.md card",
          file=sys.stderr)
    return 0
