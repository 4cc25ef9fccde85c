"""The record schema of synth outputs: the same fields and types for every method.

Every line of every output, whatever its method, has these fields, so that ``datasets`` loads
files of several methods together (Arrow infers one schema; a field that is a number in one file
and missing or null in another does not load):

    text            str    the generated example
    label           str    its label name
    method          str    fewgen | corrsynth | m-corrsynth | cfg
    params          dict   PARAM_KEYS, always all of them, each of a fixed type; a knob that the
                           method does not read holds its neutral value (NEUTRAL_PARAMS: g = 1 is
                           no guidance scaling, γ = δ = 0 no cross-/intra-label weight)
    seed            int    the row's seed (a hash of job seed, group, slot)
    group, slot     int    the record's place in the plan (its identity on resume and in shards)
    finish_reason   str    eos | stop | length
    tokens          int    generated tokens
    task            str    the task fingerprint
    model           str    the model the text came from (MODEL_FIELD)
    divgen_version  str    the divgen version that wrote it (VERSION_FIELD)
    examples        list   the few-shot examples its prompt showed: rows of the task's few-shot file
                           (int) or inline examples (str); [] for zero-shot. Same type for every
                           method of one task, so one task's outputs load together.
"""
from __future__ import annotations

from divgen.engine.synth.task import Task

MODEL_FIELD = "model"
VERSION_FIELD = "divgen_version"
# key -> type; every record's params has exactly these keys with values of these types.
PARAM_KEYS = {"g": float, "gamma": float, "delta": float, "rows_per_group": int, "temperature": float,
              "top_p": float, "top_k": int, "alpha": float, "min_p": float, "max_new_tokens": int}
NEUTRAL_PARAMS = {"g": 1.0, "gamma": 0.0, "delta": 0.0}


def record_params(task: Task) -> dict:
    """The uniform ``params`` of the task's records (module docstring)."""
    method = task.params
    s = task.sampling
    values = {
        "g": method.get("g", NEUTRAL_PARAMS["g"]),
        "gamma": method.get("gamma", NEUTRAL_PARAMS["gamma"]),
        "delta": method.get("delta", NEUTRAL_PARAMS["delta"]),
        "rows_per_group": task.group_rows,
        "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "alpha": s.alpha, "min_p": s.min_p,
        "max_new_tokens": task.max_new_tokens,
    }
    return {k: PARAM_KEYS[k](values[k]) for k in PARAM_KEYS}


def divgen_version() -> str:
    from divgen import __version__

    return __version__


def model_id(task: Task) -> str:
    """What the records name as their model: the task's model path or id as given, or the file
    name of the embedded default (e.g. ``SmolLM2-135M-Instruct.Q4_1.gguf``)."""
    if task.model == "default":
        from divgen.engine.model import default_model_file

        return default_model_file().name
    return str(task.model)
