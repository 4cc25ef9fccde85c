"""Progress of long jobs off a terminal (engine/progress.py): periodic lines with rate and ETA,
and the transformers GGUF conversion bar kept out of logs."""
from __future__ import annotations

import io
import sys

import pytest

from divgen.engine import progress as prog


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_line_progress_prints_every_interval_with_rate_and_eta():
    clock, out = FakeClock(), io.StringIO()
    bar = prog.LineProgress(100, "synth corrsynth", "ex", interval=5, file=out, clock=clock)
    clock.t += 2
    bar.update(10)                   # 2 s < 5 s: nothing yet
    assert out.getvalue() == ""
    clock.t += 3
    bar.update(10)                   # 5 s, 20 done: 4 ex/s, 80 left -> 20 s
    assert out.getvalue().splitlines() == ["synth corrsynth: 20/100 ex (20%), 4.00 ex/s, ETA 20s"]
    clock.t += 1
    bar.update(5)                    # 1 s after the last line: still quiet
    assert len(out.getvalue().splitlines()) == 1
    clock.t += 69
    bar.update(5)                    # 75 s, 30 done: 0.4 ex/s, 70 left -> 175 s
    assert out.getvalue().splitlines()[-1] == "synth corrsynth: 30/100 ex (30%), 0.40 ex/s, ETA 2m55s"
    bar.close()
    bar.close()                      # idempotent: one final line
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1] == "synth corrsynth: 30/100 ex (30%), 0.40 ex/s, done in 1m15s"


def test_line_progress_rate_counts_only_this_runs_work():
    """A resumed job starts at `initial`: its rate and ETA come from what this run did."""
    clock, out = FakeClock(), io.StringIO()
    bar = prog.LineProgress(200, "job", "ex", initial=150, interval=0, file=out, clock=clock)
    clock.t += 10
    bar.update(10)                   # 10 new in 10 s -> 1 ex/s, 40 left
    assert out.getvalue().strip() == "job: 160/200 ex (80%), 1.00 ex/s, ETA 40s"


def test_line_progress_without_total_and_postfix():
    clock, out = FakeClock(), io.StringIO()
    bar = prog.LineProgress(None, "decode", "tok", interval=0, file=out, clock=clock)
    bar.set_postfix(done="3/8")
    bar.update(1)                    # no time passed: rate 0, no ETA
    assert out.getvalue().strip() == "decode: 1 tok, 0.00 tok/s, ETA ?, done=3/8"


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (3599, "59m59s"), (3725, "1h02m")])
def test_format_duration(seconds, text):
    assert prog.format_duration(seconds) == text


def test_interval_from_env(monkeypatch):
    monkeypatch.setenv("DIVGEN_PROGRESS_INTERVAL", "2.5")
    assert prog.interval_from_env() == 2.5
    for bad in ("x", "-1"):
        monkeypatch.setenv("DIVGEN_PROGRESS_INTERVAL", bad)
        assert prog.interval_from_env() == prog.DEFAULT_INTERVAL_S


def test_progress_bar_picks_lines_off_a_terminal_and_a_bar_on_one(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(prog, "stderr_is_terminal", lambda: False)
    assert isinstance(prog.progress_bar(10, "x"), prog.LineProgress)
    monkeypatch.setattr(prog, "stderr_is_terminal", lambda: True)
    bar = prog.progress_bar(10, "x")
    assert isinstance(bar, tqdm)
    bar.close()
    off = prog.progress_bar(10, "x", enabled=False)
    off.update(3)
    assert off.n == 3 and not isinstance(off, (tqdm, prog.LineProgress))


def test_gguf_conversion_bar_is_silenced_off_a_terminal(monkeypatch, capsys):
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    # The bar lives in this module attribute: if transformers renames it, this test says so.
    assert hasattr(gguf_utils, "tqdm")
    original = gguf_utils.tqdm
    monkeypatch.setattr(prog, "stderr_is_terminal", lambda: False)
    notes = []
    with prog.quiet_gguf_conversion(notes.append):
        assert list(gguf_utils.tqdm(range(5), desc="Converting and de-quantizing GGUF tensors...", file=sys.stderr)) \
            == list(range(5))
    assert gguf_utils.tqdm is original
    assert "Converting" not in capsys.readouterr().err
    assert len(notes) == 1
    # The same loop with the original bar does write to stderr: the check above can fail.
    list(original(range(5), desc="Converting and de-quantizing GGUF tensors...", file=sys.stderr))
    assert "Converting" in capsys.readouterr().err


def test_gguf_bar_kept_on_a_terminal(monkeypatch):
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    original = gguf_utils.tqdm
    monkeypatch.setattr(prog, "stderr_is_terminal", lambda: True)
    with prog.quiet_gguf_conversion():
        assert gguf_utils.tqdm is original


def test_synth_cli_prints_progress_lines_into_a_log(tmp_path):
    """`divgen synth` with stderr redirected to a file (not a terminal) logs plain progress lines."""
    import os
    import re
    import subprocess

    out = tmp_path / "s.jsonl"
    log = tmp_path / "err.log"
    env = {**os.environ, "DIVGEN_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "divgen.bindings.cli", "synth", "sentiment", "--out", str(out),
                               "--method", "fewgen", "--per-label", "1", "--max-new-tokens", "2"],
                              stderr=err, stdout=subprocess.DEVNULL, env=env, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text                               # no bar frames in the log
    lines = [ln for ln in text.splitlines() if ln.startswith("synth fewgen: ")]
    n = len(out.read_text().splitlines())
    assert lines and re.fullmatch(rf"synth fewgen: {n}/{n} ex \(100%\), [0-9.]+ ex/s, done in \d+s", lines[-1])
    assert all(re.search(r"ex/s, (ETA|done in) ", ln) for ln in lines)
