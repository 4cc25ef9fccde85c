"""Task files: the shipped tasks load, bad fields are refused with a message naming the field,
the few-shot pool follows the documented split, prompts and fingerprints behave."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from divgen.engine.errors import DivgenError
from divgen.engine.synth.few_shot import clean_source_text, few_shot_pool
from divgen.engine.synth.output import fingerprint
from divgen.engine.synth.prompts import pick_examples, render_prompt
from divgen.engine.synth.task import load_task, task_from_dict

AG_NEWS_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ag_news_test.csv"

MINIMAL = {
    "labels": [{"name": "pos", "verbalization": "positive"}, {"name": "neg", "verbalization": "negative"}],
    "prompt": "Write a {verbalization} review.",
}


def make(**fields) -> dict:
    data = json.loads(json.dumps(MINIMAL))
    data.update(fields)
    return data


def write_task(tmp_path: Path, data: dict, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    return path


def test_shipped_tasks_load():
    ag = load_task("ag_news")
    assert [l.name for l in ag.labels] == ["world", "sports", "business", "sci_tech"]
    assert [l.source_label for l in ag.labels] == ["1", "2", "3", "4"]
    assert ag.few_shot.file is None and ag.few_shot.every == 10
    senti = load_task("sentiment")
    assert [l.name for l in senti.labels] == ["positive", "negative"]
    assert all(len(l.examples) >= 2 for l in senti.labels)
    # a path works as well as a name
    assert load_task(Path(__file__).resolve().parents[1] / "divgen" / "engine" / "tasks" / "ag_news.yaml").labels == ag.labels


def test_json_task_and_defaults(tmp_path):
    task = load_task(write_task(tmp_path, make(per_label=3), "t.json"))
    assert task.per_label == (3, 3) and task.method == "corrsynth" and task.params == {"g": 2.0}
    assert task.group_rows == 2 and task.sampling.alpha == 0.0


BAD_FIELDS = [
    ({"method": "beam"}, "'method'"),
    ({"methd": "cfg"}, "did you mean 'method'"),
    ({"methods": {"corrsynth": {"g": 0.5}}}, "'methods.corrsynth.g'"),
    ({"method": "cfg", "methods": {"cfg": {"g": -1}}}, "'methods.cfg.g'"),
    ({"method": "m-corrsynth", "methods": {"m-corrsynth": {"gamma": -0.1}}}, "'methods.m-corrsynth.gamma'"),
    ({"method": "m-corrsynth", "methods": {"m-corrsynth": {"delta": -1}}}, "'methods.m-corrsynth.delta'"),
    ({"methods": {"corrsynth": {"gamma": 1}}}, "'methods.corrsynth.gamma'"),
    ({"sampling": {"alpha": 1.0}}, "'sampling.alpha'"),
    ({"sampling": {"alpha": -0.1}}, "'sampling.alpha'"),
    ({"sampling": {"top_p": 0}}, "'sampling.top_p'"),
    ({"sampling": {"temperature": -1}}, "'sampling.temperature'"),
    ({"rows_per_group": 1}, "'rows_per_group'"),
    ({"method": "m-corrsynth", "methods": {"m-corrsynth": {"rows_per_group": 1}}}, "'methods.m-corrsynth.rows_per_group'"),
    ({"per_label": {"pos": 2, "neutral": 1}}, "'per_label.neutral'"),
    ({"per_label": 0}, "'per_label'"),
    ({"max_new_tokens": 0}, "'max_new_tokens'"),
    ({"prompt": "Write about {topic}."}, "'prompt'"),
    ({"prompt": "Write a review."}, "'prompt'"),
    ({"labels": []}, "'labels'"),
    ({"labels": [{"name": "a"}, {"name": "a"}]}, "'labels'"),
    ({"labels": [{"name": "a", "examples": ["x"]}, {"name": "b"}]}, "'labels[].examples'"),
    ({"labels": [{"name": "a", "verbalisation": "x"}, {"name": "b"}]}, "'labels[0].verbalisation'"),
    ({"few_shot": {"file": "no_such_file.csv"}}, "'few_shot.file'"),
    ({"few_shot": {"template": "no placeholder"}}, "'few_shot.template'"),
    ({"seed": "zero"}, "'seed'"),
]


@pytest.mark.parametrize("fields,needle", BAD_FIELDS)
def test_bad_field_is_named(tmp_path, fields, needle):
    path = write_task(tmp_path, make(**fields))
    with pytest.raises(DivgenError) as err:
        load_task(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_cfg_needs_two_labels_and_corrsynth_two_rows():
    with pytest.raises(DivgenError, match="cfg needs at least 2 labels"):
        task_from_dict({"labels": ["only"], "prompt": "about {label}", "method": "cfg"})
    with pytest.raises(DivgenError, match="at least 2 rows"):
        task_from_dict({"labels": ["only"], "prompt": "about {label}", "method": "corrsynth"})
    # one label is fine for fewgen, and corrsynth with two rows of the same label is allowed
    assert task_from_dict({"labels": ["only"], "prompt": "about {label}", "method": "fewgen"}).group_rows == 1
    assert task_from_dict({"labels": ["only"], "prompt": "about {label}", "rows_per_group": 2}).group_rows == 2


@pytest.mark.parametrize("overrides,needle", [
    ({"method": "beam"}, "--method"),
    ({"g": 0.9}, "--g"),
    ({"min_p": 1.5}, "--min-p"), ({"alpha": 1.0}, "--alpha"),
    ({"per_label": 0}, "--per-label"),
    ({"rows_per_group": 1}, "--rows-per-group"),
    ({"method": "m-corrsynth", "delta": -2.0}, "--delta"),
    ({"few_shot_file": "/nonexistent/x.csv"}, "--few-shot"),
])
def test_bad_override_names_the_flag(overrides, needle):
    with pytest.raises(DivgenError) as err:
        task_from_dict(make()).with_overrides(**overrides)
    assert needle in str(err.value)


def test_rows_per_group_per_method():
    task = load_task("ag_news")
    assert task.method == "m-corrsynth" and task.own_special and task.copy_guard == 8   # the measured defaults
    assert task.params == {"gamma": 0.0, "delta": 1.0, "rows_per_group": 8} and task.group_rows == 8   # intra only
    task = task.with_overrides(method="corrsynth")
    assert task.group_rows == 4 and task.params == {"g": 1.5}     # corrsynth: one row per label
    assert task.with_overrides(method="m-corrsynth").group_rows == 8
    assert task.with_overrides(method="m-corrsynth", rows_per_group=12).group_rows == 12
    assert task.with_overrides(method="cfg").group_rows == 4


def test_overrides_apply():
    task = task_from_dict(make()).with_overrides(method="m-corrsynth", per_label=7, gamma=2.0, seed=5,
                                                 max_new_tokens=9, alpha=0.1)
    assert task.method == "m-corrsynth" and task.per_label == (7, 7) and task.params["gamma"] == 2.0
    assert task.seed == 5 and task.max_new_tokens == 9 and task.sampling.alpha == 0.1


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(rows)


def test_few_shot_pool_uses_rows_with_index_multiple_of_every(tmp_path):
    rows = [("p" if i % 3 else "n", f"text number {i}") for i in range(40)]
    _write_csv(tmp_path / "fs.csv", rows)
    task = task_from_dict(make(
        labels=[{"name": "pos", "source_label": "p"}, {"name": "neg", "source_label": "n"}],
        few_shot={"file": "fs.csv", "every": 10, "per_prompt": 2}, prompt="{examples}About {label}."),
        path=tmp_path / "task.yaml")
    pool = few_shot_pool(task)
    # rows 0, 10, 20, 30: labels n, p, p, n
    assert pool == {"pos": ["text number 10", "text number 20"], "neg": ["text number 0", "text number 30"]}


def test_few_shot_file_missing_a_label_is_refused(tmp_path):
    _write_csv(tmp_path / "fs.csv", [("p", f"t{i}") for i in range(20)])
    task = task_from_dict(make(
        labels=[{"name": "pos", "source_label": "p"}, {"name": "neg", "source_label": "n"}],
        few_shot={"file": str(tmp_path / "fs.csv"), "every": 1}))
    with pytest.raises(DivgenError, match="no pool rows for label 'neg'"):
        few_shot_pool(task)


@pytest.mark.skipif(not AG_NEWS_CSV.exists(), reason="needs ../shared/data/ag_news_test.csv")
def test_ag_news_pool_split():
    task = load_task("ag_news").with_overrides(few_shot_file=str(AG_NEWS_CSV))
    pool = few_shot_pool(task)
    with AG_NEWS_CSV.open(newline="") as f:
        data = list(csv.DictReader(f))
    for lab in task.labels:
        expected = [r["title"] for i, r in enumerate(data) if i % 10 == 0 and r["label"] == lab.source_label]
        assert len(pool[lab.name]) == len(expected)
        assert all(text.startswith(clean_source_text(title)) for text, title in zip(pool[lab.name], expected))
    assert sum(len(v) for v in pool.values()) == 760


def test_clean_source_text_fixes_ag_news_entities():
    raw = "Fed #39;s rate &lt;b&gt;hike&lt;/b&gt; said  quot;now quot; \\costs  #36;5 at AT amp;T"
    assert clean_source_text(raw) == "Fed's rate hike said \"now\" costs $5 at AT&T"


def test_prompts_are_deterministic_per_group_and_label(tmp_path):
    task = load_task("sentiment")
    pool = few_shot_pool(task)
    a = pick_examples(task, pool, 3, 0, "positive")
    assert a == pick_examples(task, pool, 3, 0, "positive") and len(a) == 2
    assert set(a) <= set(pool["positive"])
    groups = {tuple(pick_examples(task, pool, g, 0, "positive")) for g in range(20)}
    slots = {tuple(pick_examples(task, pool, 3, s, "positive")) for s in range(20)}
    assert len(groups) > 1 and len(slots) > 1    # different rows see different examples
    text = render_prompt(task, task.labels[0], a)
    assert all(e in text for e in a) and "positive review" in text
    zero = task_from_dict(make(prompt="{examples}Write a {verbalization} review."))
    assert render_prompt(zero, zero.labels[1], []) == "Write a negative review."


def test_fingerprint_tracks_what_changes_the_texts():
    base = task_from_dict(make())
    pool = few_shot_pool(base)
    fp = fingerprint(base, pool)
    assert fingerprint(base.with_overrides(per_label=99), pool) == fp    # more examples: same task
    for change in ({"seed": 1}, {"method": "cfg"}, {"g": 3.0}, {"alpha": 0.2}, {"max_new_tokens": 5}):
        assert fingerprint(base.with_overrides(**change), pool) != fp, change
    assert fingerprint(base, {"pos": ["x"], "neg": ["y"]}) != fp


def test_alpha_and_min_p_are_two_fields():
    """The papers' α and the peers' min-p are separate knobs (DESIGN.md, "Cutoffs"): each field
    sets its own, both may be set, and they are different fingerprint inputs."""
    by_min_p = task_from_dict(make(sampling={"min_p": 0.05}))
    by_alpha = task_from_dict(make(sampling={"alpha": 0.05}))
    assert (by_min_p.sampling.min_p, by_min_p.sampling.alpha) == (0.05, 0.0)
    assert (by_alpha.sampling.alpha, by_alpha.sampling.min_p) == (0.05, 0.0)
    assert by_alpha.content() != by_min_p.content()
    both = task_from_dict(make(sampling={"alpha": 0.05, "min_p": 1.0}))       # min-p 1: only the max
    assert (both.sampling.alpha, both.sampling.min_p) == (0.05, 1.0)
    assert task_from_dict(make()).with_overrides(alpha=0.2).sampling.alpha == 0.2
    assert task_from_dict(make()).with_overrides(min_p=0.2).sampling.min_p == 0.2


def test_every_methods_parameters_are_checked_and_named_by_field(tmp_path):
    """YAML `gamma: -1` under m-corrsynth is refused at load, naming the field (not --gamma), even
    when another method is active; a bad flag value names the flag."""
    path = write_task(tmp_path, make(method="corrsynth", methods={"m-corrsynth": {"gamma": -1}}))
    with pytest.raises(DivgenError) as err:
        load_task(path)
    assert "field 'methods.m-corrsynth.gamma'" in str(err.value) and "--gamma" not in str(err.value)
    with pytest.raises(DivgenError) as err:
        task_from_dict(make()).with_overrides(method="m-corrsynth", gamma=-1)
    assert str(err.value).startswith("--gamma")


@pytest.mark.parametrize("value,needle", [(float("inf"), "finite"), (101, "[0, 100]"), (-0.5, "[0, 100]")])
def test_temperature_limits_are_the_same_in_file_and_flag(value, needle):
    with pytest.raises(DivgenError, match="field 'sampling.temperature'") as err:
        task_from_dict(make(sampling={"temperature": value}))
    assert needle in str(err.value)
    with pytest.raises(DivgenError, match="^--temperature") as err:
        task_from_dict(make()).with_overrides(temperature=value)
    assert needle in str(err.value)


def test_job_size_is_bounded():
    with pytest.raises(DivgenError, match="maximum is 10,000,000"):
        task_from_dict(make(per_label=10 ** 9))
    assert sum(task_from_dict(make(per_label=5 * 10 ** 6)).per_label) == 10 ** 7


def test_bom_csv_reads_its_label_column(tmp_path):
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes("\ufefflabel,text\npos,good one\nneg,bad one\n".encode("utf-8"))
    task = task_from_dict(make(few_shot={"file": str(csv_path), "every": 1},
                               labels=[{"name": "pos"}, {"name": "neg"}], prompt="{label}"))
    assert few_shot_pool(task) == {"pos": ["good one"], "neg": ["bad one"]}


def test_sampling_constructor_keeps_alpha_and_min_p_apart():
    from divgen.engine.synth.task import Sampling

    assert Sampling(alpha=0.1).alpha == 0.1 and Sampling(alpha=0.1).min_p == 0.0
    assert Sampling(min_p=0.1).min_p == 0.1 and Sampling(min_p=0.1).alpha == 0.0
    assert Sampling(alpha=0.1) != Sampling(min_p=0.1)


def test_unset_sampling_fields_come_from_the_models_generation_config(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")   # an empty but whole file
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 40}))
    base = make(model=str(model))
    task = task_from_dict({**base, "sampling": {"top_p": 0.5}}).with_generation_defaults()
    assert (task.sampling.temperature, task.sampling.top_p, task.sampling.top_k, task.sampling.min_p) == (0.6, 0.5, 40, 0.0)
    flagged = task_from_dict(base).with_overrides(temperature=1.3).with_generation_defaults()
    assert flagged.sampling.temperature == 1.3 and flagged.sampling.top_k == 40
    assert task_from_dict(make()).with_generation_defaults() == task_from_dict(make())   # embedded model: unchanged
    (model / "generation_config.json").write_text(json.dumps({"temperature": 500}))
    with pytest.raises(DivgenError, match="generation_config.json"):
        task_from_dict(base).with_generation_defaults()


def test_own_special_is_in_the_fingerprint_only_where_it_acts():
    """own_special changes guided methods' texts (and fingerprints), not FewGen's: a FewGen set made
    before a task turned it on resumes under the new task file."""
    task = load_task("ag_news")
    assert task.own_special
    fewgen = task.with_overrides(method="fewgen")
    assert fewgen.content() == fewgen.with_overrides(own_special=False).content()
    guided = task.with_overrides(method="corrsynth")
    assert guided.content() != guided.with_overrides(own_special=False).content()
    assert guided.content()["own_special"] is True
