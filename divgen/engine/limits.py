"""The one validation layer: every user value's range, and the one list of methods.

User values are checked once, where they enter — the task file (``engine/synth/task.py``), the
command line (``bindings/cli_*.py``) and the Python API's constructors (``Guidance.*``) — with the
limits below and a message that names what the user set (``name``: a flag such as
``--temperature`` or a task-file field). Lower layers (decode loop, kernels) check only shapes
and dtypes. This module imports nothing heavy: the CLI validates before importing torch.

Stated maximum job sizes (each refused with one line before any slow work):

* ``generate -n``: at most ``MAX_SAMPLES`` rows of one prompt;
* ``--max-new-tokens``: at most ``MAX_NEW_TOKENS`` (and the model's context, checked at load);
* ``synth``: at most ``MAX_JOB_EXAMPLES`` examples per job (sum over labels), ``MAX_GROUP_ROWS``
  rows per guidance group, ``MAX_BATCH_ROWS`` rows per engine call;
* ``spa sample``: at most ``MAX_SAMPLES`` rows (prompts × adapters × copies) per decode batch;
* ``bench``: ``MAX_VOCAB``, ``MAX_BENCH_ROWS``, ``MAX_BENCH_LEN``, ``MAX_REPEATS``, ``MAX_THREADS``;
* inputs (``engine/inputs.py``): CSV fields up to ``MAX_CSV_FIELD`` characters, task files up to
  ``MAX_YAML_BYTES`` and ``MAX_YAML_NODES`` values with aliases expanded, JSON sidecars/configs up
  to ``MAX_JSON_BYTES``, safetensors headers up to ``MAX_SAFETENSORS_HEADER`` bytes.

``count`` and ``fraction`` check the integer and [0, 1] flags of the newer commands (filter,
export, eval, show, bench, spa run); ``device_present`` checks, once torch is imported and before
a model loads, that an asked-for CUDA device exists.
"""
from __future__ import annotations

import math

# ---- the one list of methods ---------------------------------------------------------------------
METHODS = ("fewgen", "cfg", "corrsynth", "m-corrsynth")     # synth methods (task files, --method)
GUIDED_METHODS = ("cfg", "corrsynth", "m-corrsynth")        # the ones that build a Guidance
GUIDANCE_RULES = GUIDED_METHODS + ("explicit",)              # Guidance rules (explicit: the user's γ)
BENCH_METHODS = ("fewgen", "corrsynth", "cfg")              # divgen bench's default comparison
TAG_METHODS = ("corrsynth", "m-corrsynth", "explicit")      # vLLM request tags (divgen_method)
SPA_PARTITION_METHODS = ("random", "lexical", "influence")  # spa partition --method
INFLUENCE_KINDS = ("lissa", "gradsim")                      # spa partition --influence
SPA_RUN_METHODS = ("random", "lexical") + INFLUENCE_KINDS   # spa run --methods

# ---- limits --------------------------------------------------------------------------------------
MAX_TEMPERATURE = 100.0          # higher is uniform sampling for any logits that fit in bf16
MAX_WEIGHT = 100.0               # g, γ, δ: above this the guided scores are meaningless (and overflow bf16)
MAX_NEW_TOKENS = 32768
MAX_SAMPLES = 4096               # rows in one decode call from the CLI (generate -n, spa sample)
MAX_JOB_EXAMPLES = 10_000_000    # synth: examples per job, all labels together
MAX_GROUP_ROWS = 256             # rows in one guidance group (CFG's shadows included): the sampling
#                                  kernels' maximum (divgen/kernels/plan.py takes it from here)
MAX_BATCH_ROWS = 65536           # synth: rows per engine call
MAX_SEED = 2 ** 62               # seeds within ±2^62 (row seeds are derived by hashing)
MAX_TOP_K = 2 ** 31 - 1
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
MAX_VOCAB = 1 << 20              # bench kernel --vocab (real vocabularies are <= 256k)
MAX_BENCH_ROWS = 65536           # bench --batch-sizes
MAX_BENCH_LEN = 32768            # bench --input-len / --output-len
MAX_REPEATS = 10_000             # bench --repeats / --warmup, eval --seeds
MAX_THREADS = 4096               # --threads
MAX_PORT = 65535                 # serve --port
MAX_TAG_GROUP_SIZE = 4096        # serve: divgen_size, rows of one group the scheduler holds for
MAX_GROUP_TIMEOUT_S = 86400.0    # serve: DIVGEN_GROUP_TIMEOUT_S, seconds a lockstep group may wait for its rows
MAX_EPOCHS = 1000                # eval --epochs
MAX_WIDTH = 100_000              # show --width
MAX_ROWS = 10_000_000            # row counts a user may ask for (show --per-label, eval --test-limit)

# ---- input sizes (engine/inputs.py) --------------------------------------------------------------
MAX_CSV_FIELD = 16 * 1024 * 1024            # characters in one CSV field (Python's default is 131072)
MAX_JSON_BYTES = 64 * 1024 * 1024           # a sidecar or config file
MAX_YAML_BYTES = 4 * 1024 * 1024            # a task file
MAX_YAML_NODES = 1_000_000                  # values in a task file once aliases are expanded
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the JSON header of a safetensors file



def _fail(msg: str):
    from divgen.engine.errors import DivgenError

    return DivgenError(msg)


def number(value, name: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
           integer: bool = False, hint: str = "") -> float | int:
    """``value`` as a finite float (or int with ``integer``) within the bounds, else DivgenError
    "NAME must be ... got VALUE". ``hint`` follows the range, e.g. " (0 is greedy)"."""
    if integer:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(f"{name} must be an integer{hint}, got {value!r}")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(f"{name} must be a finite number{_range(low, high, low_open, high_open)}{hint}, got {value!r}")
        value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        raise _fail(f"{name} must be{_range(low, high, low_open, high_open, integer)}{hint}, got {shown}")
    return value


def _range(low, high, low_open, high_open, integer=False) -> str:
    f = (lambda v: str(v)) if integer else (lambda v: f"{v:g}")
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{f(low)}, {f(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {f(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {f(high)}"
    return ""


# ---- one checker per knob (the same limits wherever the value enters) ------------------------------
def temperature(value, name: str = "temperature") -> float:
    return number(value, name, low=0.0, high=MAX_TEMPERATURE, hint=" (0 is greedy)")


def top_p(value, name: str = "top_p") -> float:
    return number(value, name, low=0.0, high=1.0, low_open=True, hint=" (1 disables it)")


def top_k(value, name: str = "top_k") -> int:
    return number(value, name, low=0, high=MAX_TOP_K, integer=True, hint=" (0 disables it)")


def alpha(value, name: str = "alpha") -> float:
    """The papers' plausibility cutoff α (on the row's own, untempered distribution)."""
    return number(value, name, low=0.0, high=1.0, high_open=True, hint=" (plausibility cutoff α; 0 disables it)")


def min_p(value, name: str = "min_p") -> float:
    """transformers' / vLLM's min-p (on the tempered distribution): 1 keeps only the most likely."""
    return number(value, name, low=0.0, high=1.0, hint=" (min-p after temperature; 0 disables it)")


def seed(value, name: str = "seed") -> int:
    return number(value, name, low=-MAX_SEED, high=MAX_SEED, high_open=True, integer=True)


def max_new_tokens(value, name: str = "max_new_tokens") -> int:
    return number(value, name, low=1, high=MAX_NEW_TOKENS, integer=True)


def samples(value, name: str = "-n") -> int:
    return number(value, name, low=1, high=MAX_SAMPLES, integer=True)


def guidance_scale(value, name: str = "guidance scale g") -> float:
    return number(value, name, low=1.0, high=MAX_WEIGHT, hint=" (1 is no guidance)")


def weight(value, name: str) -> float:
    """γ (cross-label) or δ (intra-label) of M-CorrSynth."""
    return number(value, name, low=0.0, high=MAX_WEIGHT)


def group_rows(value, name: str = "rows_per_group") -> int:
    return number(value, name, low=1, high=MAX_GROUP_ROWS, integer=True)


def batch_rows(value, name: str = "--batch-rows") -> int:
    return number(value, name, low=1, high=MAX_BATCH_ROWS, integer=True)


def job_examples(total: int, name: str = "per_label") -> int:
    if total > MAX_JOB_EXAMPLES:
        raise _fail(f"{name} asks for {total:,} examples in one job; the maximum is {MAX_JOB_EXAMPLES:,}: "
                    "split the job (several --out files with different --seed)")
    return total


def stop_strings(value, name: str = "stop") -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        raise _fail(f"{name} must be a list of non-empty strings")
    return tuple(value)


def method(value, name: str = "--method") -> str:
    if value not in METHODS:
        import difflib

        close = difflib.get_close_matches(str(value), METHODS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise _fail(f"{name} {value!r} is not a method: use one of {', '.join(METHODS)}{hint}")
    return value


def device(value, name: str = "--device") -> str | None:
    """A device name's syntax (cpu, cuda, cuda:N), checked without importing torch; whether it
    exists is ``device_present`` (after torch is imported, before the model loads)."""
    import re

    if value is None:
        return None
    if isinstance(value, str) and value.strip() == "mps":
        raise _fail(f"{name} mps is not supported (divgen's kernels are Triton: CUDA or the CPU interpreter): "
                    "use cpu or cuda")
    if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", value.strip()):
        raise _fail(f"{name} {value!r} is not a device: use cpu, cuda or cuda:N")
    return value.strip()


def device_present(value, name: str = "--device") -> str | None:
    """``device(value)``, and a CUDA device must exist (imports torch: call it just before the load)."""
    value = device(value, name)
    if value is None or value == "cpu":
        return value
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise _fail(f"{name} {value}: torch sees no CUDA GPU on this machine: use --device cpu")
    index = int(value.split(":")[1]) if ":" in value else 0
    if index >= count:
        raise _fail(f"{name} {value}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}): "
                    "choose one of them")
    return value


def count(value, name: str, *, low: int = 1, high: int = MAX_ROWS, hint: str = "") -> int:
    """An integer flag such as a row count or a number of seeds, within [low, high]."""
    return number(value, name, low=low, high=high, integer=True, hint=hint)


def fraction(value, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    return number(value, name, low=0.0, high=1.0, low_open=low_open, high_open=high_open)


def dtype(value, name: str = "--dtype") -> str | None:
    if value is None or value == "auto":
        return None
    if value not in DTYPES:
        raise _fail(f"{name} {value!r} is not a dtype: use auto, {', '.join(DTYPES)}")
    return value


# ---- the copy guard (engine/copy_guard.py) -----------------------------------------------------
MAX_COPY_GUARD = 64              # --copy-guard: n-gram length in tokens (0 is off)


def copy_guard(value, name: str = "--copy-guard") -> int:
    """The copy guard's n-gram length in tokens: 0 (off) or 2 .. MAX_COPY_GUARD."""
    n = number(value, name, low=0, high=MAX_COPY_GUARD, integer=True,
               hint=" (n-gram length in tokens; 0 turns the guard off)")
    if n == 1:
        raise _fail(f"{name} must be 0 (off) or at least 2 tokens, got 1: a 1-gram guard would ban every "
                    "token of the examples")
    return n
