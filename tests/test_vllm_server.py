"""A real OpenAI-compatible vLLM server started by ``divgen serve`` (``make test-vllm``; skipped
where vLLM or the openai client is absent), with vLLM's default multiprocess engine core, on a
free loopback port, driven by the official ``openai`` client and stopped by its PID.

What it holds: members of a sized group sent as concurrent HTTP requests are admitted together
(``DivgenScheduler``), so a seeded group gives the same texts on every repeat, equal to divgen's
engine; a mask in one member (min_tokens) does not pull the others to it; json_object groups close
their JSON as untagged requests do; penalties apply to tagged requests as to untagged ones; bad tags get HTTP 400; an incomplete group fails
after the timeout instead of hanging.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import import_vllm_dependency

import_vllm_dependency("vllm")
openai = import_vllm_dependency("openai")

from divgen.engine.decode import generate  # noqa: E402
from divgen.engine.guidance import Guidance  # noqa: E402

pytestmark = pytest.mark.slow
HOST = "127.0.0.1"                       # loopback only
STARTUP_S = 600
GROUP_TIMEOUT_S = 8
REPEATS = 20
PROMPTS = ["Write a news headline about sports.", "Write a news headline about science.",
           "Write a news headline about business.", "Write a news headline about politics."]
SEEDS = [11, 12, 13, 14]
SAMPLING = dict(temperature=0.9, max_tokens=16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               DIVGEN_GROUP_TIMEOUT_S=str(GROUP_TIMEOUT_S))
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)           # vLLM's default: the multiprocess core
    cmd = [sys.executable, "-m", "divgen.bindings.cli", "serve", "--host", HOST, "--port", str(port),
           "--vllm-args", "--dtype float32 --max-model-len 1024 --max-num-seqs 16 --enforce-eager"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="none", timeout=120, max_retries=0)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"divgen serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer within {STARTUP_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        yield client, log
    finally:                            # stop it by its PID (its own session: the engine core too)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _complete(client, prompt_ids, seed, tag=None, **kw):
    body = {"return_token_ids": True}
    if tag is not None:
        body["vllm_xargs"] = tag
    args = {**SAMPLING, **kw}
    r = client.completions.create(model="default", prompt=prompt_ids, seed=seed, extra_body=body, **args)
    choice = r.choices[0]
    return list(choice.token_ids), choice.text, choice.finish_reason


def _group(client, prompts_ids, seeds, tag, **kw):
    """One group as concurrent HTTP requests (one member each): [(token ids, text, finish)]."""
    with ThreadPoolExecutor(len(seeds)) as pool:
        jobs = [pool.submit(_complete, client, p, s, dict(tag), **kw) for p, s in zip(prompts_ids, seeds)]
        return [j.result() for j in jobs]


def _strip_eos(ids, eos):
    return ids[:-1] if ids and ids[-1] in eos else ids


@pytest.fixture(scope="module")
def prompt_ids(embedded_lm):
    return [embedded_lm.encode(embedded_lm.format_prompt(p)) for p in PROMPTS]


def test_seeded_group_over_http_repeats_and_equals_the_engine(server, embedded_lm, prompt_ids):
    client, _ = server
    lm = embedded_lm
    engine, _ = generate(lm, prompt_ids, max_new_tokens=SAMPLING["max_tokens"], temperature=SAMPLING["temperature"],
                         seeds=SEEDS, guidance=Guidance.corrsynth([0, 0, 0, 0], g=2.0))
    want = [r.token_ids for r in engine]
    eos = set(lm.eos_token_ids)
    runs = []
    for i in range(REPEATS):
        tag = {"divgen_group": f"rep{i}", "divgen_scale": 2.0, "divgen_size": 4}
        runs.append([_strip_eos(ids, eos) for ids, _, _ in _group(client, prompt_ids, SEEDS, tag)])
    identical = sum(run == runs[0] for run in runs)
    equal_engine = sum(run == want for run in runs)
    print(f"\nrepeats identical to the first: {identical}/{REPEATS}; equal to the engine: {equal_engine}/{REPEATS}")
    assert identical == REPEATS
    assert equal_engine == REPEATS
    # without the group (each member alone) the tokens differ: the contrast is applied over HTTP
    alone = [_strip_eos(_complete(client, p, s, {"divgen_group": f"solo{j}", "divgen_scale": 2.0,
                                                   "divgen_size": 1})[0], eos)
             for j, (p, s) in enumerate(zip(prompt_ids, SEEDS))]
    assert alone != runs[0]


def test_min_tokens_on_one_member_does_not_end_the_others(server, embedded_lm, prompt_ids):
    client, _ = server
    eos = set(embedded_lm.eos_token_ids)
    same = [prompt_ids[0]] * 4
    tag = {"divgen_group": "mintok", "divgen_scale": 2.0, "divgen_size": 4}
    plain = _group_min_tokens(client, same, SEEDS, tag, min_tokens_member0=0)
    masked = _group_min_tokens(client, same, SEEDS, {**tag, "divgen_group": "mintok2"}, min_tokens_member0=15)
    assert len(masked[0][0]) >= 15
    lengths = [len(_strip_eos(ids, eos)) for ids, _, _ in masked[1:]]
    print(f"\nmin_tokens=15 on member 0: members 1-3 generated {lengths} tokens "
          f"(without min_tokens: {[len(_strip_eos(ids, eos)) for ids, _, _ in plain[1:]]})")
    assert min(lengths) > 0          # the old −100 floor made every other member end at once
    # step 0: the four rows are identical but for member 0's mask, so (the mask rule) members 1-3
    # draw exactly their tokens of the group without min_tokens
    assert [ids[0] for ids, _, _ in masked[1:]] == [ids[0] for ids, _, _ in plain[1:]]


def _group_min_tokens(client, prompts_ids, seeds, tag, min_tokens_member0):
    body_tag = dict(tag)

    def one(i, p, s):
        body = {"return_token_ids": True, "vllm_xargs": body_tag}
        if i == 0 and min_tokens_member0:
            body["min_tokens"] = min_tokens_member0
        r = client.completions.create(model="default", prompt=p, seed=s, extra_body=body, temperature=0.9,
                                      max_tokens=24)
        c = r.choices[0]
        return list(c.token_ids), c.text, c.finish_reason

    with ThreadPoolExecutor(len(seeds)) as pool:
        jobs = [pool.submit(one, i, p, s) for i, (p, s) in enumerate(zip(prompts_ids, seeds))]
        return [j.result() for j in jobs]


def _chat_json(client, seed, tag=None):
    body = {"vllm_xargs": tag} if tag else {}
    r = client.chat.completions.create(
        model="default", seed=seed, temperature=0.7, max_tokens=64, extra_body=body,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give a JSON object with a name and an age of a person."}])
    return r.choices[0].message.content


def _closed(text) -> bool:
    try:
        json.loads(text)
        return True
    except (TypeError, ValueError):
        return False


def test_json_object_group_closes_its_json_as_untagged_requests_do(server):
    """Three 4-member json_object groups (their grammars compile while the group waits: the
    scheduler must still admit them) against the same 12 seeds untagged."""
    client, _ = server
    tagged, untagged = [], []
    with ThreadPoolExecutor(4) as pool:
        for g in range(3):
            seeds = [21 + 4 * g + i for i in range(4)]
            tag = {"divgen_group": f"json{g}", "divgen_scale": 1.5, "divgen_size": 4}
            tagged += pool.map(lambda s: _chat_json(client, s, tag), seeds)
            untagged += pool.map(lambda s: _chat_json(client, s), seeds)
    closed_tagged, closed_untagged = sum(map(_closed, tagged)), sum(map(_closed, untagged))
    print(f"\njson_object closed: tagged groups {closed_tagged}/12, untagged {closed_untagged}/12")
    assert closed_tagged >= closed_untagged - 2 and closed_tagged >= 6


def test_penalties_apply_to_tagged_requests_as_to_untagged_ones(server, prompt_ids):
    """A tagged group of one with g = 1 is plain divgen sampling: greedy, it must give vLLM's own
    tokens under every penalty (vLLM applies penalties after the logits processors, so the
    processor applies them first), and the penalties must change the text at all (EOS ignored,
    32 tokens: the greedy text repeats itself)."""
    client, _ = server
    outs = {}
    for name, (kw, extra) in {"none": ({}, {}), "repetition": ({}, {"repetition_penalty": 2.0}),
                              "frequency": ({"frequency_penalty": 2.0}, {}),
                              "presence": ({"presence_penalty": 2.0}, {})}.items():
        for tagged in (False, True):
            body = {"return_token_ids": True, "ignore_eos": True, **extra}   # vLLM's extensions
            if tagged:
                body["vllm_xargs"] = {"divgen_group": f"pen-{name}", "divgen_scale": 1.0, "divgen_size": 1}
            r = client.completions.create(model="default", prompt=prompt_ids[1], seed=3, temperature=0.0,
                                          max_tokens=32, extra_body=body, **kw)
            outs[name, tagged] = list(r.choices[0].token_ids)
    for name in ("none", "repetition", "frequency", "presence"):
        assert outs[name, True] == outs[name, False], name
    assert outs["repetition", True] != outs["none", True]
    assert outs["frequency", True] != outs["none", True]
    # greedy with a frequency penalty repeats fewer tokens than greedy without
    assert len(set(outs["frequency", True])) > len(set(outs["none", True]))


@pytest.mark.parametrize("tag,message", [
    ({"divgen_group": "b", "divgen_method": "nope"}, "divgen_method must be one of"),
    ({"divgen_group": "b", "divgen_scale": -1}, "'divgen_scale' must be a number"),
    ({"divgen_group": "b", "divgen_scael": 2}, "unknown key"),
    ({"divgen_group": "b", "divgen_scale": 2, "divgen_size": -3}, "'divgen_size' must be"),
])
def test_bad_tags_get_400_and_the_server_stays_healthy(server, prompt_ids, tag, message):
    client, _ = server
    with pytest.raises(openai.BadRequestError, match=message):
        _complete(client, prompt_ids[0], 1, tag)
    assert _complete(client, prompt_ids[0], 1, max_tokens=2)[0]            # still serving


def test_incomplete_group_fails_after_the_timeout(server, prompt_ids):
    client, log = server
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError):
        _complete(client, prompt_ids[0], 1, {"divgen_group": "lonely", "divgen_scale": 2.0, "divgen_size": 2})
    waited = time.monotonic() - t0
    assert GROUP_TIMEOUT_S - 1 <= waited < GROUP_TIMEOUT_S + 60
    assert "group 'lonely' waited" in Path(log).read_text()
    assert _complete(client, prompt_ids[0], 1, max_tokens=2)[0]
