"""Hostile clients while normal ones stream (issue 14, "What it must show"): a real `edgellm serve`
on 127.0.0.1 with the default model; 16 normal clients stream greedy chat replies through the real
`openai` client while hostile clients send NaN-inducing and out-of-range parameters, huge stop
strings, a session flood, oversized, malformed, wrongly typed and unfinished bodies and headers,
and streams dropped mid-way. Every normal reply must equal the same prompt served alone, every
hostile request must get its expected status (written out in edgellm.serve.hostile), nothing may
wait past its timeout, and afterwards nothing is in flight, no KV block used, no session left.

Latency under attack is a wall-clock figure: `python -m edgellm.serve.hostile` prints it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from edgellm.serve.hostile import Target, attack_plan, check_run, one_run, server_args, solo_replies
from edgellm.serve.loadtest import PROMPTS, after_state
from edgellm.serve.process import ServerProcess

MODEL = "smollm2-135m"
MAX_SESSIONS = 4
BODY_TIMEOUT = 2.0
CLIENTS = 16


@pytest.fixture(scope="module")
def server(smollm2_path):
    with ServerProcess(server_args(MODEL, MAX_SESSIONS, BODY_TIMEOUT, 2, "64MB")) as s:
        yield s
        assert s.alive, "the server died during the tests"


def hostile_round(server, max_tokens: int, hostile: int):
    target = Target("127.0.0.1", server.port, MODEL, MAX_SESSIONS, BODY_TIMEOUT)
    prompts = [c % len(PROMPTS) for c in range(CLIENTS)]
    solo = asyncio.run(solo_replies(server.url, MODEL, prompts, max_tokens, None))
    run = asyncio.run(one_run(server.url, target, prompts, max_tokens, hostile))
    return target, solo, run


def check_after(server) -> None:
    after = after_state(server.url, {})
    assert server.alive and after["health"] == 200
    assert after["in_flight"] == 0 and after["kv_used"] == 0
    assert httpx.get(server.url + "/v1/sessions", timeout=30).json()["data"] == []


def test_normal_clients_are_unharmed_and_every_attack_gets_its_answer(server):
    target, solo, run = hostile_round(server, max_tokens=8, hostile=4)
    assert check_run(run, solo, CLIENTS) == []
    assert len(run.replies) == CLIENTS
    assert all(r.finish in ("stop", "length") and r.text for r in run.replies)
    sent = {v.attack for v in run.verdicts}
    # every attack of the plan was made (the flood under its verdicts' names)
    assert {name for name, _ in attack_plan(target)} - {"session_flood"} <= sent
    assert {"session_flood_cap", "session_delete"} <= sent
    statuses = {v.attack: v.got for v in run.verdicts}
    assert statuses["nan_repetition_penalty"] == 400 and statuses["oversized_body"] == 413
    assert statuses["slow_body"] == 408 and statuses["session_flood_cap"] == 429
    check_after(server)


@pytest.mark.slow
def test_longer_replies_under_two_rounds_of_attacks(server):
    for _ in range(2):
        _, solo, run = hostile_round(server, max_tokens=48, hostile=6)
        assert check_run(run, solo, CLIENTS) == []
        check_after(server)
