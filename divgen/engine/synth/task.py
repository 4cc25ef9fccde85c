"""Task files for ``divgen synth``: the schema and its validation.

A task file (YAML or JSON) says what dataset to generate. Every field, with its default:

    name: my_task                 # free text, shown in logs (not part of the fingerprint)
    model: default                # embedded SmolLM2-135M-Instruct, a HF directory, a .gguf file, or a
                                  # hub id (org/name) found in the local HF cache (never downloaded)
    dtype: null                   # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    chat: true                    # wrap prompts in the model's chat template
    system: null                  # optional system message (chat only)
    labels:                       # at least one; names unique
      - name: world               # the label written to the output
        verbalization: world news # how the prompt names it (default: the name)
        source_label: "1"         # its value in the few-shot file's label column (default: the name)
        examples: []              # optional inline few-shot examples (texts)
    prompt: "{examples}Write a news article about {verbalization}."
                                  # placeholders: {verbalization}, {label}, {examples}
    few_shot:
      file: null                  # CSV (label + text, or label,title,description) or JSONL; relative
                                  # paths resolve against the task file's folder
      every: 10                   # fixed split by data-row index: rows i with i % every == 0 are the
                                  # few-shot pool; the other rows are never shown (keep them for
                                  # evaluation). every: 1 uses every row.
      per_prompt: 2               # examples shown in each prompt
      header: "Examples of {verbalization}:\\n"   # placeholders as in prompt
      template: "- {text}\\n"      # one example; placeholders {text}, {index} (1-based) and the above
      footer: "\\n"
    per_label: 50                 # examples to generate per label (or a mapping label -> count);
                                  # at most 10,000,000 examples per job (engine/limits.py)
    max_new_tokens: 64            # 1 .. 32768
    stop: []                      # stop strings (the text is cut before them)
    ignore_eos: false
    method: corrsynth             # fewgen | cfg | corrsynth | m-corrsynth
    methods:                      # parameters of each method (the one named by `method` is used)
      corrsynth: {g: 2.0}         # g in [1, 100]: γ = (g − 1)/(K − 1) between the K rows of a group
      m-corrsynth: {gamma: 1.0, delta: 0.5, rows_per_group: 8}
                                  # cross-label γ, intra-label δ in [0, 100]; any method may set
                                  # its own rows_per_group (overrides the top-level one)
      cfg: {g: 2.0}               # g in [1, 100], the other labels' prompts are the negative prompts
      fewgen: {}
    sampling: {temperature: 1.0, top_p: 1.0, top_k: 0, alpha: 0.0, min_p: 0.0}
                                  # temperature in [0, 100] (0 greedy); top_p in (0, 1]; top_k >= 0;
                                  # alpha in [0, 1): the papers' plausibility cutoff α on each row's
                                  # own, untempered distribution; min_p in [0, 1]: transformers' /
                                  # vLLM's min-p, after temperature (on the guided distribution)
                                  # fields left out come from the model's generation_config.json
                                  # (local or cached-hub model), else the defaults shown
    rows_per_group: null          # sample rows decoded in lockstep per group (default: one per
                                  # label); labels are assigned round-robin; >= 2 for corrsynth and
                                  # m-corrsynth. CFG adds K − 1 shadow rows per sample row.
    seed: 0
    copy_guard: 0                 # n: never emit an n-token n-gram of the row's own few-shot
                                  # examples (0 off, else 2 .. 64; engine/copy_guard.py)
    own_special: false            # EOS and control tokens take the row's own log-prob, outside
                                  # the contrast (engine/own_special.py)

Unknown fields are errors (they are usually typos); every error names the field and the fix.
Values are checked once, here, with the limits of ``engine/limits.py`` (the same as the CLI's);
every method's parameters are checked, not only the active method's.

Few-shot pools are read by ``few_shot.py`` and shown by ``prompts.py``. For AG News
(../shared/data/ag_news_test.csv, 7,600 rows) ``every: 10`` gives a pool of 760 rows (data rows 0, 10, 20, ...; 171-210 per label); rows with index % 10 != 0 are the
held-out evaluation rows.
"""
from __future__ import annotations

import difflib
import json
import string
from dataclasses import dataclass, field, replace
from pathlib import Path

from divgen.engine import limits
from divgen.engine.errors import DivgenError
from divgen.engine.limits import GUIDED_METHODS, METHODS
SHIPPED_TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
PROMPT_FIELDS = ("verbalization", "label", "examples")
EXAMPLE_FIELDS = ("verbalization", "label", "text", "index")

DEFAULT_METHOD_PARAMS = {
    "fewgen": {},
    "corrsynth": {"g": 2.0},
    "m-corrsynth": {"gamma": 1.0, "delta": 0.5},
    "cfg": {"g": 2.0},
}

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p")     # the keys generation_config.json may set

# The flag that sets each overridable field (``Task.with_overrides``): an error about a value names
# the flag when the user set it on the command line, else the task-file field.
FLAG_OF = {
    "method": "--method", "per_label": "--per-label", "max_new_tokens": "--max-new-tokens", "seed": "--seed",
    "model": "--model", "few_shot.file": "--few-shot", "rows_per_group": "--rows-per-group", "stop": "--stop",
    "ignore_eos": "--ignore-eos", "sampling.temperature": "--temperature", "sampling.top_p": "--top-p",
    "sampling.top_k": "--top-k", "sampling.min_p": "--min-p", "sampling.alpha": "--alpha", "dtype": "--dtype",
    "copy_guard": "--copy-guard", "own_special": "--own-special",
}
METHOD_FLAGS = {"g": "--g", "gamma": "--gamma", "delta": "--delta", "rows_per_group": "--rows-per-group"}


# ----------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Label:
    name: str                          # written to the output
    verbalization: str                 # how prompts name the label
    source_label: str                  # value in the few-shot file's label column
    examples: tuple[str, ...] = ()     # inline few-shot examples


@dataclass(frozen=True)
class FewShot:
    file: Path | None = None           # CSV / JSONL of labelled texts, or None
    every: int = 10                    # rows i with i % every == 0 are the pool
    per_prompt: int = 2                # examples per prompt
    header: str = "Examples of {verbalization}:\n"
    template: str = "- {text}\n"
    footer: str = "\n"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0           # 0 = greedy
    top_p: float = 1.0                 # 1 = off
    top_k: int = 0                     # 0 = off
    alpha: float = 0.0                 # the papers' α in [0, 1): keep ℓ >= max ℓ + log α (own, untempered)
    min_p: float = 0.0                 # the peers' min-p in [0, 1]: keep p >= min_p · max p after temperature


@dataclass(frozen=True)
class Task:
    labels: tuple[Label, ...]
    prompt: str
    name: str = "task"
    path: Path | None = None           # the file it was read from (relative paths resolve here)
    model: str = "default"
    chat: bool = True
    system: str | None = None
    few_shot: FewShot = field(default_factory=FewShot)
    per_label: tuple[int, ...] = ()    # target count per label, in label order
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    method: str = "corrsynth"
    methods: dict = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_METHOD_PARAMS.items()})
    sampling: Sampling = field(default_factory=Sampling)
    rows_per_group: int | None = None  # None = one row per label
    seed: int = 0
    dtype: str | None = None           # model dtype (None = auto: bf16 on CUDA, fp32 on CPU)
    copy_guard: int = 0                # n-gram length of the copy guard in tokens (0 = off)
    own_special: bool = False          # special tokens outside the contrast
    # sampling fields the task file or a flag set; the others may come from the model's
    # generation_config.json (``with_generation_defaults``). Python-built tasks set all of them.
    sampling_set: frozenset = frozenset(SAMPLING_KEYS)

    # ---- derived ----
    @property
    def label_names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    @property
    def params(self) -> dict:
        """The active method's parameters."""
        return dict(self.methods.get(self.method, {}))

    @property
    def group_rows(self) -> int:
        """Sample rows per group (CFG adds shadow rows on top of these)."""
        per_method = self.methods.get(self.method, {}).get("rows_per_group")
        if per_method is not None:
            return per_method
        return self.rows_per_group if self.rows_per_group is not None else len(self.labels)

    def target(self) -> dict[str, int]:
        return dict(zip(self.label_names, self.per_label))

    def content(self) -> dict:
        """Everything that decides the generated texts (the fingerprint's input), JSON-ready.

        Not included: name, per-label counts (a larger count extends a file) and batch size
        (texts do not depend on batch layout)."""
        return {
            "model": self.model,
            "chat": self.chat,
            "system": self.system,
            "labels": [{"name": l.name, "verbalization": l.verbalization, "source_label": l.source_label}
                       for l in self.labels],
            "prompt": self.prompt,
            "few_shot": {"every": self.few_shot.every, "per_prompt": self.few_shot.per_prompt,
                         "header": self.few_shot.header, "template": self.few_shot.template,
                         "footer": self.few_shot.footer},
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
            "ignore_eos": self.ignore_eos,
            "method": self.method,
            "params": self.params,
            "sampling": {"temperature": self.sampling.temperature, "top_p": self.sampling.top_p,
                         "top_k": self.sampling.top_k, "alpha": self.sampling.alpha,
                         "min_p": self.sampling.min_p},
            "rows_per_group": self.group_rows,
            "seed": self.seed,
            **({"dtype": self.dtype} if self.dtype else {}),   # only when set: older fingerprints stay valid
            **({"copy_guard": self.copy_guard} if self.copy_guard else {}),        # likewise
            # only where it acts (a guided method): FewGen's texts, and so its fingerprint, do not
            # depend on it
            **({"own_special": True} if self.own_special and self.method in GUIDED_METHODS else {}),
        }

    def with_generation_defaults(self) -> "Task":
        """The task with its unset sampling fields taken from the model's ``generation_config.json``
        (a local or cached-hub model directory; the embedded/GGUF models ship no sampling defaults).
        Called by ``run_synth`` before the fingerprint, so the values used are the values recorded."""
        from divgen.engine.model_source import find_model, generation_defaults

        unset = [k for k in SAMPLING_KEYS if k not in self.sampling_set]
        source = find_model(self.model)
        if not unset or source.kind not in ("dir", "hub"):
            return self
        found = generation_defaults(source.path)
        values = {}
        for key in unset:
            if key in found:
                values[key] = getattr(limits, key)(found[key], f"{key} in {source.path}/generation_config.json")
        if not values:
            return self
        return replace(self, sampling=replace(self.sampling, **values), sampling_set=self.sampling_set | set(values))

    def with_overrides(self, **overrides) -> "Task":
        """A copy with command-line (or Python) overrides applied (None = keep), validated again.

        Keys: method, per_label, max_new_tokens, seed, model, few_shot_file, rows_per_group, stop,
        ignore_eos, g, gamma, delta, temperature, top_p, top_k, alpha, min_p.
        Errors about an overridden value name its flag; about the file's values, their field."""
        o = {k: v for k, v in overrides.items() if v is not None}
        task, flagged = self, set()
        if "method" in o:
            task, flagged = replace(task, method=limits.method(o.pop("method"), "--method")), {"method"}
        if "per_label" in o:
            n = limits.number(o.pop("per_label"), "--per-label", low=1, integer=True)
            task, flagged = replace(task, per_label=tuple(n for _ in task.labels)), flagged | {"per_label"}
        for key in ("max_new_tokens", "seed", "ignore_eos", "copy_guard", "own_special"):
            if key in o:
                task, flagged = replace(task, **{key: o.pop(key)}), flagged | {key}
        if "stop" in o:
            task, flagged = replace(task, stop=o.pop("stop")), flagged | {"stop"}
        if "model" in o:
            task = replace(task, model=str(o.pop("model")))
        if "dtype" in o:
            task, flagged = replace(task, dtype=o.pop("dtype")), flagged | {"dtype"}
        if "few_shot_file" in o:
            task = replace(task, few_shot=replace(task.few_shot, file=Path(o.pop("few_shot_file")).expanduser()))
            flagged.add("few_shot.file")
        methods = {k: dict(v) for k, v in task.methods.items()}
        for key in ("g", "gamma", "delta", "rows_per_group"):
            if key in o:
                methods.setdefault(task.method, {})[key] = o.pop(key)
                flagged.add(f"methods.{task.method}.{key}")
        task = replace(task, methods=methods)
        sampling = {k: o.pop(k) for k in (*SAMPLING_KEYS, "alpha") if k in o}
        if sampling:
            task = replace(task, sampling=replace(task.sampling, **sampling),
                           sampling_set=task.sampling_set | set(sampling))
            flagged |= {f"sampling.{k}" for k in sampling}
        if o:
            raise DivgenError(f"unknown override(s): {', '.join(sorted(o))}")
        return validate(task, flagged=flagged)


# ----------------------------------------------------------------------------------------------
# Reading and validating
# ----------------------------------------------------------------------------------------------
TOP_FIELDS = {"name", "model", "dtype", "chat", "system", "labels", "prompt", "few_shot", "per_label",
              "max_new_tokens", "stop", "ignore_eos", "method", "methods", "sampling",
              "rows_per_group", "seed", "copy_guard", "own_special"}
LABEL_FIELDS = {"name", "verbalization", "source_label", "examples"}
FEW_SHOT_FIELDS = {"file", "every", "per_prompt", "header", "template", "footer"}
SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "alpha", "min_p"}
METHOD_FIELDS = {"fewgen": {"rows_per_group"}, "corrsynth": {"g", "rows_per_group"},
                 "m-corrsynth": {"gamma", "delta", "rows_per_group"}, "cfg": {"g", "rows_per_group"}}


class _Where:
    """Prefixes error messages with the task file, so every message says where to look."""

    def __init__(self, source: str):
        self.source = source

    def error(self, field_name: str, msg: str) -> DivgenError:
        return DivgenError(f"task {self.source}: field '{field_name}' {msg}")


def resolve_task_path(spec: str | Path) -> Path:
    """A task argument -> a file: a path, or the name of a shipped task (``ag_news``)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    shipped = SHIPPED_TASKS_DIR / f"{spec}.yaml"
    if not p.suffix and shipped.is_file():
        return shipped
    names = ", ".join(sorted(f.stem for f in SHIPPED_TASKS_DIR.glob("*.yaml")))
    if p.exists():
        raise DivgenError(f"task {p} is not a file: pass a YAML or JSON task file")
    raise DivgenError(f"task file {p} does not exist: pass a YAML/JSON task file or a shipped task ({names})")


def load_task(spec: str | Path) -> Task:
    """Read and validate a task file (YAML or JSON) or a shipped task name."""
    path = resolve_task_path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DivgenError(f"cannot read task file {path}: {exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DivgenError(f"task file {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        except RecursionError as exc:
            raise DivgenError(f"task file {path} is nested too deeply to be a task file") from exc
    else:
        from divgen.engine.inputs import load_yaml

        data = load_yaml(text, f"task file {path}")     # safe loader, size and alias-expansion bounds
    return task_from_dict(data, path=path)


def task_from_dict(data, path: Path | None = None) -> Task:
    """Build and validate a Task from parsed YAML/JSON. Errors name the field."""
    w = _Where(str(path) if path else "(inline)")
    if not isinstance(data, dict):
        raise DivgenError(f"task {w.source} must be a mapping of fields (name, labels, prompt, ...)")
    _no_unknown(data, TOP_FIELDS, "", w)
    labels = _labels(data.get("labels"), w)
    if "prompt" not in data:
        raise w.error("prompt", "is missing: give a template such as 'Write a news article about {verbalization}.'")
    few_shot = _few_shot(data.get("few_shot"), path, w)
    method = data.get("method", "corrsynth")
    if not isinstance(method, str) or method not in METHODS:
        raise w.error("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    methods = {k: dict(v) for k, v in DEFAULT_METHOD_PARAMS.items()}
    raw_methods = data.get("methods") or {}
    if not isinstance(raw_methods, dict):
        raise w.error("methods", "must be a mapping of method name -> parameters")
    for name, params in raw_methods.items():
        if name not in METHODS:
            raise w.error(f"methods.{name}", f"is not a method: use one of {', '.join(METHODS)}")
        params = params or {}
        if not isinstance(params, dict):
            raise w.error(f"methods.{name}", "must be a mapping of parameters")
        _no_unknown(params, METHOD_FIELDS[name], f"methods.{name}.", w)
        methods[name].update(params)
    raw_sampling = data.get("sampling") or {}
    if not isinstance(raw_sampling, dict):
        raise w.error("sampling", "must be a mapping (temperature, top_p, top_k, alpha, min_p)")
    _no_unknown(raw_sampling, SAMPLING_FIELDS, "sampling.", w)
    raw_sampling = dict(raw_sampling)
    stop = data.get("stop") or []
    per_label = _per_label(data.get("per_label", 50), labels, w)
    task = Task(
        labels=labels,
        prompt=data["prompt"],
        name=str(data.get("name", path.stem if path else "task")),
        path=path,
        model=str(data.get("model", "default") or "default"),
        chat=data.get("chat", True),
        system=data.get("system"),
        few_shot=few_shot,
        per_label=per_label,
        max_new_tokens=data.get("max_new_tokens", 64),
        stop=stop,
        ignore_eos=data.get("ignore_eos", False),
        method=method,
        methods=methods,
        sampling=Sampling(**{**Sampling().__dict__, **raw_sampling}),
        sampling_set=frozenset(raw_sampling),
        rows_per_group=data.get("rows_per_group"),
        seed=data.get("seed", 0),
        dtype=data.get("dtype"),
        copy_guard=data.get("copy_guard", 0),
        own_special=data.get("own_special", False),
    )
    return validate(task, where=w)


def validate(task: Task, where: _Where | None = None, flagged: set = frozenset()) -> Task:
    """Check every value once with the limits of ``engine/limits.py``; return the task with numbers
    normalised. ``flagged``: fields set on the command line (errors name their flag)."""
    w = where or _Where(str(task.path) if task.path else "(inline)")

    def name(field_name: str) -> str:
        if field_name in flagged:
            short = field_name.split(".")[-1] if field_name.startswith("methods.") else field_name
            return METHOD_FLAGS.get(short, "") if field_name.startswith("methods.") else FLAG_OF[field_name]
        return f"task {w.source}: field '{field_name}'"

    def err(field_name: str, msg: str) -> DivgenError:
        return DivgenError(f"{name(field_name)} {msg}")

    if not isinstance(task.chat, bool):
        raise err("chat", f"must be true or false, got {task.chat!r}")
    if task.system is not None and not isinstance(task.system, str):
        raise err("system", "must be a string or null")
    if not isinstance(task.ignore_eos, bool):
        raise err("ignore_eos", f"must be true or false, got {task.ignore_eos!r}")
    if not isinstance(task.own_special, bool):
        raise err("own_special", f"must be true or false, got {task.own_special!r}")
    copy_guard = limits.copy_guard(task.copy_guard, name("copy_guard"))
    stop = limits.stop_strings(task.stop, name("stop"))
    dtype = limits.dtype(task.dtype, name("dtype"))
    _check_template(task.prompt, PROMPT_FIELDS, "prompt", w)
    used = _template_fields(task.prompt)
    if not used & {"verbalization", "label"} and not (task.few_shot.file or any(l.examples for l in task.labels)):
        raise w.error("prompt", "must mention {verbalization} or {label} (or show label-specific {examples}): "
                                "otherwise every label gets the same prompt")
    limits.job_examples(sum(task.per_label), name("per_label"))
    max_new = limits.max_new_tokens(task.max_new_tokens, name("max_new_tokens"))
    seed = limits.seed(task.seed, name("seed"))
    rows = task.rows_per_group
    if rows is not None:
        rows = limits.group_rows(rows, name("rows_per_group"))
    # Every method's parameters are checked (not only the active one's), each under its own field.
    methods = {}
    for method_name, params in task.methods.items():
        checked = {}
        for key, value in params.items():
            field_name = f"methods.{method_name}.{key}"
            if key == "rows_per_group":
                checked[key] = None if value is None else limits.group_rows(value, name(field_name))
            elif key == "g":
                checked[key] = limits.guidance_scale(value, f"{name(field_name)} (guidance scale g)")
            else:
                what = "γ (cross-label weight)" if key == "gamma" else "δ (intra-label weight)"
                checked[key] = limits.weight(value, f"{name(field_name)} ({what})")
        methods[method_name] = checked
    params = methods.get(task.method, {})
    rows_field = "rows_per_group"
    if params.get("rows_per_group") is not None:
        rows_field = f"methods.{task.method}.rows_per_group"
    k = len(task.labels)
    group_rows = params.get("rows_per_group") or (rows if rows is not None else k)
    if task.method in ("corrsynth", "m-corrsynth") and group_rows < 2:
        raise err(rows_field, f"is {group_rows}: {task.method} contrasts rows decoded together and needs at least "
                              "2 rows per group (add a label, set rows_per_group >= 2, or use method fewgen)")
    if task.method == "cfg" and k < 2:
        raise DivgenError(f"{name('method')} cfg needs at least 2 labels: the other labels' "
                          "prompts are the negative prompts")
    # the rows one kernel group couples: CFG couples each sample row with its K − 1 shadow rows only
    if task.method == "cfg" and k > limits.MAX_GROUP_ROWS:
        raise DivgenError(f"{name('method')} cfg couples each sample row with one shadow row per other label: "
                          f"{k} labels make groups of {k} rows, and the sampling kernels take at most "
                          f"{limits.MAX_GROUP_ROWS}: use corrsynth or fewer labels")
    s = task.sampling
    sampling = Sampling(
        temperature=limits.temperature(s.temperature, name("sampling.temperature")),
        top_p=limits.top_p(s.top_p, name("sampling.top_p")),
        top_k=limits.top_k(s.top_k, name("sampling.top_k")),
        alpha=limits.alpha(s.alpha, name("sampling.alpha")),
        min_p=limits.min_p(s.min_p, name("sampling.min_p")),
    )
    fs = task.few_shot
    if fs.file is not None and not Path(fs.file).is_file():
        raise err("few_shot.file", f"names {fs.file}, which is not a file: give the path of a CSV or JSONL "
                                   "few-shot file (e.g. ../shared/data/ag_news_test.csv)")
    return replace(task, max_new_tokens=max_new, seed=seed, rows_per_group=rows, methods=methods, stop=stop,
                   sampling=sampling, dtype=dtype, copy_guard=copy_guard)


def _no_unknown(data: dict, allowed: set, prefix: str, w: _Where) -> None:
    for key in data:
        if key not in allowed:
            close = [f"{prefix}{c}" for c in difflib.get_close_matches(str(key), sorted(allowed), n=1)]
            if not close and not prefix:       # a sampling knob written at the top level
                close = [f"sampling.{c}" for c in difflib.get_close_matches(str(key), sorted(SAMPLING_FIELDS), n=1)]
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(allowed)) or 'none'})"
            raise w.error(f"{prefix}{key}", f"is not a task field{hint}")


def _labels(raw, w: _Where) -> tuple[Label, ...]:
    if not isinstance(raw, list) or not raw:
        raise w.error("labels", "must be a non-empty list of labels, e.g. [{name: positive}, {name: negative}]")
    labels = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise w.error(f"labels[{i}]", "must be a label name or a mapping with 'name'")
        _no_unknown(item, LABEL_FIELDS, f"labels[{i}].", w)
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise w.error(f"labels[{i}].name", "must be a non-empty string")
        verbal = item.get("verbalization", name)
        if not isinstance(verbal, str) or not verbal.strip():
            raise w.error(f"labels[{i}].verbalization", "must be a non-empty string")
        source = item.get("source_label", name)
        if isinstance(source, bool) or not isinstance(source, (str, int)):
            raise w.error(f"labels[{i}].source_label", "must be a string or an integer")
        examples = item.get("examples") or []
        if not isinstance(examples, list) or not all(isinstance(e, str) and e.strip() for e in examples):
            raise w.error(f"labels[{i}].examples", "must be a list of non-empty texts")
        labels.append(Label(name=name.strip(), verbalization=verbal.strip(), source_label=str(source),
                            examples=tuple(e.strip() for e in examples)))
    names = [l.name for l in labels]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise w.error("labels", f"has duplicate label name(s) {', '.join(dup)}: names must be unique")
    with_examples = [l.name for l in labels if l.examples]
    if with_examples and len(with_examples) != len(labels):
        missing = [l.name for l in labels if not l.examples]
        raise w.error("labels[].examples", f"are given for {', '.join(with_examples)} but not for "
                                           f"{', '.join(missing)}: give inline examples for every label or none")
    return tuple(labels)


def _few_shot(raw, path: Path | None, w: _Where) -> FewShot:
    if raw is None:
        return FewShot()
    if not isinstance(raw, dict):
        raise w.error("few_shot", "must be a mapping (file, every, per_prompt, header, template, footer)")
    _no_unknown(raw, FEW_SHOT_FIELDS, "few_shot.", w)
    file = raw.get("file")
    if file is not None:
        if not isinstance(file, str) or not file.strip():
            raise w.error("few_shot.file", "must be a path or null")
        p = Path(file).expanduser()
        if not p.is_absolute() and path is not None:
            p = path.parent / p
        if not p.is_file():
            raise w.error("few_shot.file", f"names {p}, which is not a file: fix the path (relative paths "
                                           "resolve against the task file's folder) or set it to null")
        file = p
    every = _int(raw.get("every", 10), "few_shot.every", low=1, where=w)
    per_prompt = _int(raw.get("per_prompt", 2), "few_shot.per_prompt", low=0, where=w)
    out = {"file": file, "every": every, "per_prompt": per_prompt}
    for key, fields in (("header", PROMPT_FIELDS[:2]), ("template", EXAMPLE_FIELDS), ("footer", PROMPT_FIELDS[:2])):
        value = raw.get(key, getattr(FewShot, key))
        if not isinstance(value, str):
            raise w.error(f"few_shot.{key}", "must be a string")
        _check_template(value, fields, f"few_shot.{key}", w)
        out[key] = value
    if "{text}" not in out["template"]:
        raise w.error("few_shot.template", "must contain {text} (where the example goes)")
    return FewShot(**out)


def _per_label(raw, labels: tuple[Label, ...], w: _Where) -> tuple[int, ...]:
    names = [l.name for l in labels]
    if isinstance(raw, dict):
        for key in raw:
            if key not in names:
                raise w.error(f"per_label.{key}", f"names an unknown label: labels are {', '.join(names)}")
        return tuple(_int(raw.get(n, 0), f"per_label.{n}", low=0, where=w) for n in names)
    n = _int(raw, "per_label", low=1, where=w)
    return tuple(n for _ in names)


def _template_fields(template: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError:
        return set()


def _check_template(template, allowed, name: str, w: _Where) -> None:
    if not isinstance(template, str) or not template.strip() and name == "prompt":
        raise w.error(name, "must be a non-empty string")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise w.error(name, f"is not a valid template ({exc}): write literal braces as {{{{ and }}}}") from exc
    for _, f, spec, conv in parsed:
        if f is None:
            continue
        if f not in allowed or spec or conv:
            raise w.error(name, f"uses the placeholder {{{f}}}: allowed are {', '.join('{' + a + '}' for a in allowed)}")


def _int(value, name: str, low: int | None = None, where: _Where | None = None) -> int:
    label = where.error(name, "").args[0].rstrip() if where else name
    return limits.number(value, label, low=low, integer=True)
