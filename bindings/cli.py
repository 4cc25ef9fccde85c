"""The ``divgen`` command line: ``generate`` here, ``synth``/``metrics`` and ``spa`` registered by
their own modules. A user error (DivgenError) prints one line and exits 2, never a traceback."""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from divgen.bindings import cli_bench, cli_export, cli_generate, cli_show, cli_spa, cli_synth  # noqa: E402
from divgen.engine.errors import DivgenError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="divgen", description="Fast diverse generation: CorrSynth, CFG, FewGen and SPA multi-LoRA decoding."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cli_generate.register(sub)
    cli_synth.register(sub)
    cli_spa.register(sub)
    cli_bench.register(sub)
    cli_export.register(sub)
    cli_show.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DivgenError as exc:
        print(f"divgen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("divgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
