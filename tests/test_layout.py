"""The repository layout cannot shadow an installed distribution (README, "Layout").

Any Python started in the checkout has the repository root on ``sys.path``. A root folder with an
``__init__.py`` named like an installed distribution's top-level module wins over it: a root
``kernels/`` once hid Hugging Face's ``kernels``, which transformers >= 5.25 imports, and no model
could load. These tests run Python from the root, as a user in the checkout would.
"""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from readme_snippets import snippet

ROOT = Path(__file__).resolve().parents[1]


def _importable_from_root() -> set[str]:
    """Top-level names the root makes importable as a regular module or package (a folder without
    ``__init__.py`` is at most a namespace portion, which never hides a regular package)."""
    names = set()
    for entry in ROOT.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
    return names


def _normalized(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def test_only_divgen_is_importable_from_the_root():
    assert _importable_from_root() == {"divgen"}


def test_no_root_name_is_another_distributions_module():
    owners = importlib.metadata.packages_distributions()      # top-level module -> distributions
    installed = {_normalized(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    for name in _importable_from_root():
        others = [d for d in owners.get(name, []) if _normalized(d) != "divgen"]
        assert not others, f"root {name!r} shadows the installed module of {others}"
        assert name == "divgen" or _normalized(name) not in installed, f"root {name!r} is a distribution's name"


def _run_in_root(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_transformers_and_divgen_import_together_from_the_root():
    done = _run_in_root(
        "import importlib.util, transformers.modeling_utils, divgen.engine.model\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else 'absent')\n")
    assert done.returncode == 0, done.stderr[-2000:]
    where = done.stdout.strip().splitlines()[-1]
    # Hugging Face's `kernels` (a transformers >= 5.25 dependency) resolves to the installed one.
    assert where == "absent" or {"site-packages", "dist-packages"} & set(Path(where).parts), where


def test_hf_kernels_is_installed_where_transformers_needs_it():
    """The lock installs what transformers needs; with >= 5.25 that includes `kernels`, which the
    other tests here then exercise (skipped on an older transformers, as with the minimum set)."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.25"):
        pytest.skip(f"transformers {transformers.__version__} does not use HF kernels")
    assert importlib.metadata.version("kernels")


@pytest.mark.slow
def test_readme_python_example_runs_from_the_root(embedded_lm):
    """The README's "From Python" block, run as a user would paste it in the checkout."""
    code = snippet("python")
    done = _run_in_root(code)
    assert done.returncode == 0, done.stderr[-2000:]
    # The same call in this process prints the same texts: the example shows the engine's output.
    from divgen.engine.decode import generate
    from divgen.engine.guidance import Guidance

    lm = embedded_lm
    prompts = [lm.format_prompt(f"Write a news headline about {t}.") for t in ("sports", "business")]
    results, _ = generate(lm, prompts, max_new_tokens=32, temperature=0.8, alpha=0.05, seeds=7,
                          guidance=Guidance.corrsynth(groups=[0, 0], g=2.0))
    expected = "".join(f"{r.text} {r.finish_reason}\n" for r in results)
    assert done.stdout.startswith(expected), (done.stdout, expected)
    forwarded, tok_s = done.stdout[len(expected):].split()
    assert int(forwarded) > 0 and float(tok_s) > 0


@pytest.mark.slow
def test_a_built_wheel_works_outside_the_checkout(tmp_path):
    """`pip install .` (not editable): the wheel holds only divgen (with its task files and SPA data),
    and from another folder the CLI runs and the kernels import from the installed copy."""
    import zipfile

    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "whl"),
                            str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "whl").glob("divgen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"divgen", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "divgen/engine/tasks/ag_news.yaml" in names and "divgen/engine/spa/data/train.jsonl" in names
    site = tmp_path / "site"
    done = subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    code = ("import divgen, divgen.kernels\n"
            "from divgen.engine.synth.task import load_task\n"
            "print(divgen.__file__)\n"
            "print(len(load_task('ag_news').labels))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    where, labels = done.stdout.split()
    assert Path(where).resolve().is_relative_to(site.resolve()) and int(labels) == 4
    cli = subprocess.run([str(site / "bin" / "divgen"), "--help"], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and "synth" in cli.stdout, cli.stderr[-2000:]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_every_benchmark_script_starts_from_the_root(script):
    """Each script imports the installed package (no sys.path edits) and parses its arguments."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr[-2000:]


def test_no_sys_path_edits_in_the_project():
    offenders = [str(p.relative_to(ROOT)) for folder in ("divgen", "benchmarks", "tests", "experiments")
                 for p in (ROOT / folder).rglob("*.py")
                 if p.name != "test_layout.py" and "sys.path." in p.read_text(encoding="utf-8")]
    assert not offenders, offenders
