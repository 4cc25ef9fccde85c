"""The ``divgen`` command line: ``generate``, ``synth``/``metrics`` and ``spa``, each registered by its
own module. Those modules import nothing heavy at import time (torch, transformers and the model
load inside the command, after its arguments and files are checked), so a bad invocation is
answered in well under a second.

A user error prints one line ``divgen: error: ...`` that names the fix and exits 2, never a
traceback: a DivgenError from a command, an argument that argparse refuses, or an OSError the
checks could not foresee (a full disk). Every command follows one output discipline
(``engine/files.py``) and reads its input through the checked readers (``engine/jsonl.py``,
``engine/inputs.py``); its flags are checked with ``engine/limits.py`` before anything slow.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # its warnings are not the user's to act on

from divgen.bindings import cli_bench, cli_eval, cli_export, cli_filter, cli_generate, cli_show, cli_spa, cli_synth  # noqa: E402,E501
from divgen.bindings import serve as cli_serve  # noqa: E402
from divgen.engine.errors import DivgenError  # noqa: E402

# Flags that were renamed: an old name is answered with the new one.
RENAMED_FLAGS = {
    "--alpha": "renamed in spa: --lora-alpha (LoRA's alpha, spa); --alpha is the plausibility cutoff of generate/synth",
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) that points at --help."""

    def error(self, message: str):
        hints = [f"{old} was {new}" for old, new in RENAMED_FLAGS.items() if old in message.split()]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise _UsageError(f"{message}{hint}; see `{self.prog} --help`")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="divgen", description="Fast diverse generation: CorrSynth, CFG, FewGen and SPA multi-LoRA decoding."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    cli_generate.register(sub)
    cli_synth.register(sub)
    cli_spa.register(sub)
    cli_eval.register(sub)
    cli_filter.register(sub)
    cli_bench.register(sub)
    cli_export.register(sub)
    cli_show.register(sub)
    cli_serve.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"divgen: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:              # --help / --version: argparse printed what was asked
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return int(args.func(args) or 0)
    except DivgenError as exc:
        print(f"divgen: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except MemoryError as exc:   # torch.OutOfMemoryError is not a MemoryError: matched by name below
        print(f"divgen: error: out of memory ({exc.__class__.__name__}): use fewer rows (-n, --batch-rows) "
              "or fewer --max-new-tokens", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if exc.__class__.__name__ != "OutOfMemoryError":
            raise
        print("divgen: error: out of GPU memory: use fewer rows (-n, --batch-rows) or fewer --max-new-tokens",
              file=sys.stderr)
        return 1
    except OSError as exc:
        # A file-system refusal the checks could not foresee (a full disk, a permission denied to
        # root-squashed NFS, a name too long): one line naming the file, never a traceback.
        where = f" ({str(exc.filename)[:120]})" if exc.filename else ""
        print(f"divgen: error: {exc.strerror or exc}{where}: check the path, its permissions and free space, "
              "or choose another path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("divgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
