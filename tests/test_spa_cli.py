"""One small end-to-end run of `divgen spa` on the embedded SmolLM2-135M-Instruct (marked slow):
partition (lexical) -> adapt (2 adapters, 2 steps) -> sample, then the adapters are opened by
PEFT's own reader (``AutoPeftModelForCausalLM``, base model found from the adapter config) and
its logits compared with the multi-LoRA path's."""
import json

import pytest

from conftest import single_thread
import torch

from divgen.bindings.cli import main as cli_main
from divgen.engine.spa.data import EVAL_FILE, QUERIES_FILE, TRAIN_FILE, write_jsonl

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow


one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _lines(path, n):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]


def test_spa_end_to_end_on_embedded_model(tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM

    from divgen.engine.model import load_model
    from divgen.engine.spa.lora import load_adapter
    from divgen.engine.spa.multilora import MultiLora

    write_jsonl(tmp_path / "train.jsonl", [{"prompt": r["prompt"], "response": r["response"]}
                                           for r in _lines(TRAIN_FILE, 8)])
    write_jsonl(tmp_path / "queries.jsonl", _lines(QUERIES_FILE, 2))
    write_jsonl(tmp_path / "eval.jsonl", _lines(EVAL_FILE, 2))
    run = tmp_path / "run"
    assert cli_main(["spa", "partition", "--data", str(tmp_path / "train.jsonl"), "--queries",
                     str(tmp_path / "queries.jsonl"), "--method", "lexical", "--out", str(run)]) == 0
    assert cli_main(["spa", "adapt", "--partitions", str(run), "--out", str(run / "adapters"), "--steps", "2",
                     "--batch-size", "2", "--lr", "0.01", "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["spa", "sample", "--adapters", str(run / "adapters"), "--prompts", str(tmp_path / "eval.jsonl"),
                     "--max-new-tokens", "4", "--out", str(run / "samples.jsonl"), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["adapters"] == ["part-0", "part-1"] and summary["prompts"] == 2
    assert 0.0 <= summary["diversity_score"] <= 1.0 and summary["pairwise_kl"] >= 0.0
    assert len((run / "samples.jsonl").read_text().splitlines()) == 4

    lm = load_model()
    prompt = lm.format_prompt(_lines(EVAL_FILE, 1)[0]["prompt"])
    ids = torch.tensor([lm.encode(prompt)] * 2)
    adapters = [load_adapter(run / "adapters" / name, model=lm.model) for name in ("part-0", "part-1")]
    with torch.no_grad():
        base = lm.model(input_ids=ids[:1]).logits[0]
        with MultiLora(lm.model, adapters) as ml:
            ml.set_row_adapters([0, 1])
            ours = lm.model(input_ids=ids).logits
    for row, name in enumerate(("part-0", "part-1")):
        reader = AutoPeftModelForCausalLM.from_pretrained(str(run / "adapters" / name), local_files_only=True).eval()
        with torch.no_grad():
            want = reader(input_ids=ids[row:row + 1]).logits[0]
        assert (want - base).abs().max() > 1e-2            # the trained adapter changes the model
        torch.testing.assert_close(ours[row], want, rtol=0, atol=2e-4)
