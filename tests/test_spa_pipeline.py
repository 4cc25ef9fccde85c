"""The SPA pipeline on a tiny random Llama that carries the embedded model's tokenizer:

* multi-LoRA decoding through the engine (ragged prefill, decode, a batch that shrinks as rows
  finish) gives every row the tokens of decoding it alone with its adapter merged into the weights;
* `divgen spa partition/adapt/sample` run through the CLI; the adapters it trains load in PEFT and
  give PEFT's logits through the multi-LoRA path; the sampled answers equal merged decoding;
* training resumes after a kill to the very same weights; a finished adapter is not retrained;
* gradient-similarity influence scores equal cosines of independently computed gradients.
"""
import copy
import dataclasses
import json
import math

import pytest

from conftest import single_thread
import torch
from transformers import LlamaForCausalLM

from divgen.bindings.cli import main as cli_main
from divgen.engine.decode import generate
from divgen.engine.model import load_model
from divgen.engine.spa.adapt import TrainConfig, train_adapter
from divgen.engine.spa.data import Example, read_pairs, write_jsonl
from divgen.engine.spa.lora import load_adapter, merge_into
from divgen.engine.spa.multilora import MultiLora

peft = pytest.importorskip("peft")

PAIRS = [
    ("Name a pet cat.", "Here are three ideas:\n- Luna\n- Milo\n- Bean"),
    ("Name a pet dog.", "Here are three ideas:\n- Rex\n- Pepper\n- Olive"),
    ("What should I cook tonight?", "Ooh, fun! Try lemon pasta! Enjoy!"),
    ("What should I cook for lunch?", "Ooh, fun! Try fried rice! Enjoy!"),
    ("Where should I travel in spring?", "I would recommend Kyoto."),
    ("Where should I travel in winter?", "I would recommend Banff."),
]
QUERIES = ["Name a pet hamster.", "What should I cook for dinner?"]


one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "train.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    write_jsonl(d / "queries.jsonl", [{"prompt": q} for q in QUERIES])
    write_jsonl(d / "eval.jsonl", [{"prompt": "Name a pet parrot."}, {"prompt": "Where should I go in autumn?"}])
    return d


@pytest.fixture(scope="module")
def trained(tiny_dir, files, tmp_path_factory):
    """`divgen spa partition` + `divgen spa adapt` through the CLI (a large lr so B is far from 0)."""
    out = tmp_path_factory.mktemp("run")
    assert cli_main(["spa", "partition", "--data", str(files / "train.jsonl"), "--queries", str(files / "queries.jsonl"),
                     "--method", "lexical", "--balance", "1", "--out", str(out / "lex")]) == 0
    assert cli_main(["spa", "adapt", "--partitions", str(out / "lex"), "--out", str(out / "adapters"),
                     "--model", str(tiny_dir), "--steps", "4", "--batch-size", "2", "--lr", "0.05", "--rank", "4",
                     "--target-modules", "q_proj,v_proj,down_proj", "--quiet"]) == 0
    return out


def merged_copy(lm, adapter):
    model = copy.deepcopy(lm.model)
    merge_into(model, adapter)
    return dataclasses.replace(lm, model=model)


def test_partition_files(trained, files):
    record = json.loads((trained / "lex" / "partitions.json").read_text())
    assert record["k"] == 2 and sorted(record["sizes"]) == [3, 3]
    # BM25 sends the pet and cooking examples to their own query's part
    assert record["assignment"][0] == record["assignment"][1] != record["assignment"][2] == record["assignment"][3]
    rows = [json.loads(line) for line in (trained / "lex" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == len(PAIRS) and all(len(r["scores"]) == 2 for r in rows)


def test_cli_adapters_load_in_peft_and_match_multilora(trained, tiny_dir):
    from peft import PeftModel

    lm = load_model(tiny_dir)
    names = json.loads((trained / "adapters" / "adapters.json").read_text())["adapters"]
    adapters = [load_adapter(trained / "adapters" / n, model=lm.model) for n in names]
    ids = torch.tensor([lm.encode(lm.format_prompt(q)) for q in ["Name a pet.", "Cook what?"]][:1] * 3)
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        with MultiLora(lm.model, adapters) as ml:
            ml.set_row_adapters([0, 1, -1])
            ours = lm.model(input_ids=ids).logits
    for row, name in enumerate(names):
        peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_dir), str(trained / "adapters" / name))
        with torch.no_grad():
            want = peft_model.eval()(input_ids=ids[row:row + 1]).logits[0]
        assert (want - base[row]).abs().max() > 1e-2            # the trained adapter changes the model
        torch.testing.assert_close(ours[row], want, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[2], base[2], rtol=0, atol=0)


def test_multilora_decoding_equals_merged_decoding_per_row(trained, tiny_dir):
    lm = load_model(tiny_dir)
    names = json.loads((trained / "adapters" / "adapters.json").read_text())["adapters"]
    adapters = [load_adapter(trained / "adapters" / n, model=lm.model) for n in names]
    prompts = [lm.format_prompt(p) for p in ["Hi", "Name a pet for a grumpy old cat, please.", "Cook?", "Go where?", "x"]]
    slots = [0, 1, -1, 1, 0]
    with MultiLora(lm.model, adapters) as ml:
        ml.set_prompt_adapters(slots)
        first, _ = generate(lm, prompts, max_new_tokens=6, temperature=0.0, ignore_eos=True, batch_listeners=[ml])
    # make row 0's second token an EOS so that the batch shrinks mid-decode
    lm_eos = dataclasses.replace(lm, eos_token_ids=frozenset({first[0].token_ids[1]}))
    with MultiLora(lm.model, adapters) as ml:
        ml.set_prompt_adapters(slots)
        batch, stats = generate(lm_eos, prompts, max_new_tokens=6, temperature=0.0, batch_listeners=[ml])
    assert batch[0].finish_reason == "eos" and stats.rows_forwarded < len(prompts) * stats.steps
    for i, slot in enumerate(slots):
        alone_lm = lm_eos if slot < 0 else dataclasses.replace(merged_copy(lm, adapters[slot]),
                                                               eos_token_ids=lm_eos.eos_token_ids)
        alone, _ = generate(alone_lm, [prompts[i]], max_new_tokens=6, temperature=0.0)
        assert batch[i].token_ids == alone[0].token_ids, f"row {i} (adapter slot {slot})"


def test_cli_sample_equals_merged_decoding(trained, tiny_dir, files, capsys):
    out = trained / "samples.jsonl"
    assert cli_main(["spa", "sample", "--adapters", str(trained / "adapters"), "--prompts", str(files / "eval.jsonl"),
                     "--model", str(tiny_dir), "--max-new-tokens", "5", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    metrics = json.loads((trained / "samples.jsonl.metrics.json").read_text())
    assert len(rows) == 2 * 2 and metrics["adapters"] == ["part-0", "part-1"]
    lm = load_model(tiny_dir)
    for row in rows:
        merged = merged_copy(lm, load_adapter(trained / "adapters" / row["adapter"]))
        alone, _ = generate(merged, [lm.format_prompt(row["prompt"])], max_new_tokens=5, temperature=0.0)
        assert row["text"] == alone[0].text
    # the reported Diversity Score is the mean over prompts of 1 - duplicate pairs / pairs (2 answers: 1 pair)
    per_prompt = {}
    for row in rows:
        per_prompt.setdefault(row["prompt"], []).append(" ".join(row["text"].split()))
    want = sum(0.0 if len(set(a)) == 1 else 1.0 for a in per_prompt.values()) / len(per_prompt)
    assert metrics["diversity_score"] == pytest.approx(want)
    assert metrics["pairwise_kl"] > 0


def test_training_resumes_to_identical_weights(tiny_dir, tmp_path):
    lm = load_model(tiny_dir)
    examples = [Example(p, r) for p, r in PAIRS]
    cfg = TrainConfig(rank=2, steps=5, batch_size=2, lr=0.01, checkpoint_every=100, dropout=0.1, seed=3)
    straight = train_adapter(lm, examples, cfg, tmp_path / "a", "x", progress=False)
    assert train_adapter(lm, examples, cfg, tmp_path / "b", "x", progress=False, stop_after=2) is None
    assert not (tmp_path / "b" / "x").exists() and (tmp_path / "b" / ".x.ckpt.pt").exists()
    resumed = train_adapter(lm, examples, cfg, tmp_path / "b", "x", progress=False)
    for module, (a, b) in straight.weights.items():
        torch.testing.assert_close(resumed.weights[module][0], a, rtol=0, atol=0)
        torch.testing.assert_close(resumed.weights[module][1], b, rtol=0, atol=0)
    assert not (tmp_path / "b" / ".x.ckpt.pt").exists()
    log = json.loads((tmp_path / "b" / "x" / "divgen_train.json").read_text())
    assert len(log["losses"]) == 5
    # finished: not retrained (a different config would otherwise change the weights)
    again = train_adapter(lm, examples, dataclasses.replace(cfg, lr=1.0), tmp_path / "b", "x", progress=False)
    torch.testing.assert_close(again.weights[module][1], resumed.weights[module][1], rtol=0, atol=0)
    # a checkpoint made with other settings is refused, not silently mixed in
    train_adapter(lm, examples, cfg, tmp_path / "c", "x", progress=False, stop_after=1)
    with pytest.raises(Exception, match="other data or settings"):
        train_adapter(lm, examples, dataclasses.replace(cfg, lr=0.5), tmp_path / "c", "x", progress=False)


def test_training_lowers_the_training_loss(tiny_dir, tmp_path):
    from divgen.engine.spa.finetune import TrainableLora, collate, encode_example, response_loss

    lm = load_model(tiny_dir)
    examples = [Example(p, r) for p, r in PAIRS]
    adapter = train_adapter(lm, examples, TrainConfig(rank=4, steps=12, batch_size=3, lr=0.05), tmp_path, "x",
                            progress=False)
    batch = collate([encode_example(lm, e) for e in examples], lm.pad_token_id)
    with torch.no_grad():
        before = float(response_loss(lm.model, batch))
        lora = TrainableLora(lm.model, adapter.config)
        lora.load(adapter)
        after = float(response_loss(lm.model, batch))
        lora.remove()
    assert after < before - 0.05          # a random tiny model starts near ln(V); any clear drop counts


def test_gradsim_scores_are_gradient_cosines(tiny_dir, files, tmp_path):
    from divgen.engine.spa.influence import LissaConfig
    from divgen.engine.spa.partition import influence_scores

    lm = load_model(tiny_dir)
    examples = read_pairs(files / "train.jsonl")
    queries = [Example(q, "Here are three ideas") for q in QUERIES]
    whole = train_adapter(lm, examples, TrainConfig(rank=2, steps=2, batch_size=3, lr=0.05), tmp_path, "whole",
                          progress=False)
    got = influence_scores(lm, examples, queries, whole, "gradsim", LissaConfig(), tmp_path, progress=False)

    # reference: gradients of each example's mean response NLL, from full logits of the unpadded
    # sequence, w.r.t. dense copies of the adapter's A and B (no divgen training code involved)
    model = lm.model

    def grad_of(ex):
        a_b = {m: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for m, (a, b) in whole.weights.items()}
        hooks = []
        for m, (a, b) in a_b.items():
            scale = whole.scale_for(m)
            hooks.append(model.get_submodule(m).register_forward_hook(
                lambda mod, inp, out, a=a, b=b, s=scale: out + s * (inp[0] @ a.T) @ b.T))
        prompt = lm.encode(lm.format_prompt(ex.prompt))
        resp = lm.tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [2]
        ids = torch.tensor([prompt + resp])
        logits = model(input_ids=ids).logits[0]
        lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        loss = -lp.gather(1, ids[0, len(prompt):, None]).mean()
        for h in hooks:
            h.remove()
        params = [t for m in sorted(a_b) for t in a_b[m]]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    q_grads = [grad_of(q) for q in queries]
    for i, ex in enumerate(examples):
        g = grad_of(ex)
        for k, qg in enumerate(q_grads):
            want = float(g @ qg / (g.norm() * qg.norm()))
            assert got[i, k].item() == pytest.approx(want, rel=1e-3, abs=1e-5)
    assert not math.isnan(float(got.sum()))


def test_cli_user_errors_exit_2(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "q.jsonl").write_text('{"prompt": "y"}\n')
    code = cli_main(["spa", "partition", "--data", str(tmp_path / "bad.jsonl"), "--queries", str(tmp_path / "q.jsonl"),
                     "--method", "lexical", "--out", str(tmp_path / "o")])
    assert code == 2 and '"response"' in capsys.readouterr().err
    code = cli_main(["spa", "sample", "--adapters", str(tmp_path), "--prompts", str(tmp_path / "q.jsonl")])
    assert code == 2 and "not a LoRA adapter directory" in capsys.readouterr().err
    code = cli_main(["spa", "adapt", "--out", str(tmp_path / "o")])
    assert code == 2 and "--partitions" in capsys.readouterr().err


def test_cli_influence_partition_resumes_to_identical_scores(tiny_dir, files, tmp_path):
    out = tmp_path / "infl"
    argv = ["spa", "partition", "--data", str(files / "train.jsonl"), "--queries", str(files / "queries.jsonl"),
            "--method", "influence", "--out", str(out), "--model", str(tiny_dir), "--steps", "2", "--batch-size", "2",
            "--lr", "0.05", "--lissa-depth", "3", "--lissa-batch", "2", "--query-max-new-tokens", "4", "--quiet"]
    assert cli_main(argv) == 0
    record = json.loads((out / "partitions.json").read_text())
    assert record["options"]["influence"] == "lissa" and record["k"] == 2 and min(record["sizes"]) >= 1
    responses = [json.loads(line) for line in (out / "query_responses.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in responses] == QUERIES          # queries had no response: greedy ones were made
    first = [json.loads(line)["scores"] for line in (out / "scores.jsonl").read_text().splitlines()]
    # simulate a kill half-way through the example gradients, then rerun the same command
    state = torch.load(out / ".influence_state.pt", weights_only=False)
    for i in list(state["scores"])[len(state["scores"]) // 2:]:
        del state["scores"][i]
    torch.save(state, out / ".influence_state.pt")
    assert cli_main(argv) == 0
    again = [json.loads(line)["scores"] for line in (out / "scores.jsonl").read_text().splitlines()]
    assert again == first


def test_cli_sample_appends_per_batch_and_resumes_after_a_torn_write(trained, tiny_dir, files, tmp_path, capsys):
    """`spa sample --out` writes each batch of prompts as it goes; a file cut mid-line (a kill
    during a write) is resumed to exactly the answers of an uninterrupted run; another run's
    file is refused untouched."""
    argv = ["spa", "sample", "--adapters", str(trained / "adapters"), "--prompts", str(files / "eval.jsonl"),
            "--model", str(tiny_dir), "--max-new-tokens", "4", "--prompts-per-batch", "1", "--quiet", "--no-kl"]
    full = tmp_path / "full.jsonl"
    assert cli_main([*argv, "--out", str(full)]) == 0
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == 2 * 2                               # 2 prompts x 2 adapters
    part = tmp_path / "part.jsonl"
    part.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])   # prompt 0 whole, prompt 1 torn
    assert cli_main([*argv, "--out", str(part)]) == 0
    assert part.read_text() == full.read_text()
    before = part.read_bytes()
    assert cli_main([*argv, "--out", str(part), "--seed", "7"]) == 2       # other settings: refused
    assert "different run" in capsys.readouterr().err and part.read_bytes() == before
