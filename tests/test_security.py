"""Robustness and security of the engine and the server (issue 14): one request cannot fail the
others, parameters are bounded, stop strings cost linear time, sessions are bounded and private,
chat content cannot inject control tokens. Engine tests run the real default model; server tests
talk to a real `edgellm serve` child process on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch
from api_errors import assert_error

from edgellm.errors import EdgeLLMError, InvalidParameterError
from edgellm.llm import LLM
from edgellm.runtime.engine import Engine
from edgellm.runtime.types import Request
from edgellm.sampling import SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    torch.set_num_threads(2)
    return LLM(str(smollm2_path))


# ---------------------------------------------------------------------------------------------
# 1. One request cannot fail every request
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("repetition_penalty", 1e-50), ("repetition_penalty", 0.0), ("repetition_penalty", 1e9),
    ("temperature", 1e9), ("top_k", 2 ** 40), ("max_tokens", 2 ** 40), ("n", 10 ** 6),
])
def test_sampling_parameters_are_bounded(field, value):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**{field: value})
    assert field in e.value.problem and e.value.fix


def test_sampling_parameter_bounds_accept_their_edges():
    SamplingParams(repetition_penalty=0.01, temperature=100.0, top_k=2 ** 31 - 1, max_tokens=2 ** 31 - 1)
    SamplingParams(repetition_penalty=100.0)


def alone(llm, prompt, params: SamplingParams) -> list[int]:
    with Engine(llm, kv_memory="16MB") as eng:
        return eng.submit(Request(prompt=prompt, params=params)).result().token_ids


def test_a_row_that_cannot_be_sampled_fails_only_its_request(llm):
    """A row whose logits become NaN (a repetition penalty that is 0 in float32, set after
    validation as a stand-in for any non-finite row) ends with reason "error"; the rest of its
    batch -- greedy and seeded-sampled rows -- produce exactly what they produce alone."""
    greedy = SamplingParams.greedy(max_tokens=8)
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=1234)
    want = [alone(llm, PROMPTS[0], greedy), alone(llm, PROMPTS[1], seeded)]
    bad = SamplingParams(max_tokens=8, temperature=0.7, repetition_penalty=1.5)
    with Engine(llm, kv_memory="16MB") as eng:
        good = [eng.submit(Request(prompt=PROMPTS[0], params=SamplingParams.greedy(max_tokens=8))),
                eng.submit(Request(prompt=PROMPTS[1], params=SamplingParams(max_tokens=8, temperature=0.9,
                                                                             top_p=0.95, seed=1234)))]
        failing = eng.submit(Request(prompt=PROMPTS[2], params=bad))
        bad.repetition_penalty = 1e-50      # past validation: 0.0 in float32, so x / 0 -> inf -> NaN
        with pytest.raises(EdgeLLMError) as e:
            failing.result()
        assert "NaN" in e.value.problem or "finite" in e.value.problem
        assert eng.counts["finish_error"] == 1
        assert [h.result().token_ids for h in good] == want
        assert all(h.result().finish_reason in ("stop", "length") for h in good)


def test_failed_turn_is_not_added_to_the_session(llm):
    with Engine(llm, kv_memory="16MB") as eng:
        s = eng.session(system="You are terse.")
        bad = SamplingParams(max_tokens=4, temperature=0.7, repetition_penalty=1.5)
        h = s.send("Hello!", bad)
        bad.repetition_penalty = 1e-50
        with pytest.raises(EdgeLLMError):
            h.result()
        assert s.messages == [{"role": "system", "content": "You are terse."}]
        r = s.send("Hello!", SamplingParams.greedy(max_tokens=4)).result()
        assert r.finish_reason in ("stop", "length")
        assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]
        # a cancelled turn is not added either
        h = s.send("Tell me a long story.", SamplingParams.greedy(max_tokens=64))
        h.cancel()
        assert h.result().finish_reason == "cancelled"
        assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]


# ---------------------------------------------------------------------------------------------
# 2. Stop strings: bounded length, linear-time matching
# ---------------------------------------------------------------------------------------------
def test_stop_strings_total_length_is_bounded():
    from edgellm.sampling import MAX_STOP_LENGTH
    SamplingParams(stop=["x" * (MAX_STOP_LENGTH - 1), "y"])
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(stop=["x" * (MAX_STOP_LENGTH - 1), "yy"])
    assert "stop" in e.value.problem and str(MAX_STOP_LENGTH) in e.value.problem
    with pytest.raises(InvalidParameterError):
        SamplingParams(stop=["x" * 100_000])


def reference_stop(text: str, stops: list[str]) -> tuple[str, str, str | None]:
    """(released, held, stop hit) for all of ``text`` seen at once, by brute force."""
    hits = [(text.find(s), k) for k, s in enumerate(stops) if s in text]
    if hits:
        at, k = min(hits)
        return text[:at], "", stops[k]
    hold = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[:len(text) - hold], text[len(text) - hold:], None


def test_stop_checker_matches_a_brute_force_reference():
    import random

    from edgellm.sampling import StopChecker
    rng = random.Random(0)
    for _ in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        checker = StopChecker(stops)
        seen = ""
        for _ in range(rng.randint(1, 12)):
            piece = "".join(rng.choice("abc") for _ in range(rng.randint(0, 5)))
            upd = checker.feed_text(piece)
            seen += piece
            released, held, hit = reference_stop(seen, stops)
            assert checker.emitted == released, (stops, seen)
            assert checker.pending == held and len(held) < max(map(len, stops))
            assert upd.stop_reason == hit
            if hit is not None:
                break


def test_stop_checker_never_holds_more_than_the_longest_stop():
    from edgellm.sampling import StopChecker
    stop = "a" * 200 + "b"
    checker = StopChecker([stop])
    for i in range(1, 1001):       # a held suffix that never resolves
        checker.feed_text("a")
        assert checker.pending == "a" * min(i, 200)
    assert checker.feed_text("b").stop_reason == stop
    assert checker.emitted == "a" * 800


# ---------------------------------------------------------------------------------------------
# 3, 5. The server: sessions bounded and private, bodies checked, keys, metrics, finish reasons
# ---------------------------------------------------------------------------------------------
KEY_A, KEY_B = "sk-security-a", "sk-security-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
MAX_SESSIONS = 4
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def server(smollm2_path):
    from edgellm.serve.process import ServerProcess
    with ServerProcess(["--model", MODEL, "--api-key", KEY_A, "--api-key", KEY_B, "--max-sessions",
                        str(MAX_SESSIONS), "--kv-memory", "64MB", "--threads", "2"]) as s:
        yield s
        assert s.alive, "the server died during the tests"


@pytest.fixture(scope="module")
def http(server):
    import httpx
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def post(http, path, body, headers=A, content_type="application/json"):
    import json
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    hdrs = {**headers, **({"Content-Type": content_type} if content_type else {})}
    return http.post(path, content=data, headers=hdrs)




def delete_all(http, headers):
    for sess in http.get("/v1/sessions", headers=headers).json()["data"]:
        http.delete(f"/v1/sessions/{sess['id']}", headers=headers)


def test_sessions_are_private_to_their_key_with_unguessable_ids(http):
    import re
    mine = [post(http, "/v1/sessions", {"system": "Be brief."}).json()["id"] for _ in range(2)]
    for sid in mine:
        assert re.fullmatch(r"sess_[A-Za-z0-9_-]{24,}", sid), sid    # token_urlsafe, not a counter
    assert len(set(mine)) == 2
    theirs = post(http, "/v1/sessions", {}, headers=B).json()["id"]
    sid = mine[0]
    assert_error(http.get(f"/v1/sessions/{sid}", headers=B), 404, code="session_not_found")
    assert_error(post(http, f"/v1/sessions/{sid}/messages", {"content": "hi", "stream": False}, headers=B), 404)
    assert_error(http.delete(f"/v1/sessions/{sid}", headers=B), 404)
    assert http.get(f"/v1/sessions/{sid}", headers=A).status_code == 200      # still there for its owner
    assert sorted(x["id"] for x in http.get("/v1/sessions", headers=A).json()["data"]) == sorted(mine)
    assert [x["id"] for x in http.get("/v1/sessions", headers=B).json()["data"]] == [theirs]
    delete_all(http, A)
    delete_all(http, B)


def test_session_count_is_capped(http):
    made = [post(http, "/v1/sessions", {}, headers=A if i % 2 else B) for i in range(MAX_SESSIONS)]
    assert all(r.status_code == 201 for r in made)
    full = post(http, "/v1/sessions", {})
    assert_error(full, 429, code="too_many_sessions")
    assert int(full.headers["Retry-After"]) >= 1
    http.delete(f"/v1/sessions/{made[1].json()['id']}", headers=A)
    again = post(http, "/v1/sessions", {})
    assert again.status_code == 201
    delete_all(http, A)
    delete_all(http, B)


def test_session_system_prompt_is_admitted_at_creation(http, smollm2_path):
    from edgellm.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(smollm2_path)
    system = "hello " * 9000
    assert len(tok.encode(system)) > 8192            # beyond SmolLM2's context window
    assert_error(post(http, "/v1/sessions", {"system": system}), 400, param="system", code="context_length_exceeded")
    assert http.get("/v1/sessions", headers=A).json()["data"] == []


def test_concurrent_deletes_of_one_session(server):
    import asyncio

    import httpx

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            statuses = []
            for _ in range(3):
                sid = (await c.post("/v1/sessions", json={"max_tokens": 200}, headers=A)).json()["id"]
                # a turn in progress: closing the session then waits for an engine step
                async with c.stream("POST", f"/v1/sessions/{sid}/messages", headers=A,
                                    json={"content": "Tell me a long story.", "stream": True}) as turn:
                    async for line in turn.aiter_lines():
                        if line.startswith("data: "):
                            break
                    rs = await asyncio.gather(*(c.delete(f"/v1/sessions/{sid}", headers=A) for _ in range(2)))
                statuses.append(sorted(r.status_code for r in rs))
                for r in rs:
                    assert r.headers["content-type"].startswith("application/json"), r.text
            return statuses

    assert asyncio.run(run()) == [[200, 404]] * 3


def test_lone_surrogates_are_a_json_400(http):
    body = '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'
    assert_error(post(http, "/v1/chat/completions", body), 400, code="invalid_json")
    body = '{"model": "%s", "\\udc00x": 1, "messages": [{"role": "user", "content": "hi"}]}' % MODEL
    assert_error(post(http, "/v1/chat/completions", body), 400, code="invalid_json")
    assert_error(post(http, "/v1/sessions", '{"system": "a\\udfffb"}'), 400, code="invalid_json")


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_post_bodies_must_be_json(http, ctype):
    body = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}' % MODEL
    assert_error(post(http, "/v1/chat/completions", body, content_type=ctype), 415, code="unsupported_media_type")
    assert_error(post(http, "/v1/sessions", "{}", content_type=ctype), 415)
    assert post(http, "/v1/chat/completions", body, content_type="application/json; charset=utf-8").status_code == 200


def test_metrics_need_the_key(http):
    assert_error(http.get("/metrics"), 401, code="invalid_api_key")
    r = http.get("/metrics", headers=B)
    assert r.status_code == 200 and "edgellm_engine_steps" in r.text
    assert http.get("/health").status_code == 200          # health stays open


def test_cancelled_turn_reports_abort_not_stop(http):
    import json
    import threading
    sid = post(http, "/v1/sessions", {"max_tokens": 400}).json()["id"]
    done, deleted = [], []
    body = {"content": "Write a very long story about a dragon and a knight.", "stream": True}
    with http.stream("POST", f"/v1/sessions/{sid}/messages", json=body, headers=A) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev["type"] == "delta" and not deleted:
                t = threading.Thread(target=lambda: deleted.append(http.delete(f"/v1/sessions/{sid}", headers=A)))
                t.start()
                t.join()
            elif ev["type"] == "done":
                done.append(ev)
    assert deleted[0].status_code == 200
    assert len(done) == 1 and done[0]["usage"]["completion_tokens"] < 400
    assert done[0]["finish_reason"] == "abort"


def test_api_key_with_whitespace_is_refused_at_start(capsys):
    from edgellm.cli.main import main
    assert main(["serve", "--api-key", "sk-key "]) == 2
    err = capsys.readouterr().err
    assert "whitespace" in err and "--api-key" in err
    assert main(["serve", "--api-key", " "]) == 2
    assert main(["serve", "--max-sessions", "0"]) == 2
    assert "--max-sessions" in capsys.readouterr().err


@pytest.mark.parametrize("field,value", [("repetition_penalty", 1e-50), ("repetition_penalty", 1000.0),
                                         ("top_k", 2 ** 40), ("stop", ["x" * 200, "y" * 57])])
def test_server_refuses_out_of_range_sampling(http, field, value):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    assert_error(post(http, "/v1/chat/completions", body), 400, param=field)
    sid = post(http, "/v1/sessions", {}).json()["id"]
    assert_error(post(http, f"/v1/sessions/{sid}/messages", {"content": "hi", "stream": False, field: value}),
                 400, param=field)
    http.delete(f"/v1/sessions/{sid}", headers=A)
    ok = {**body, field: {"repetition_penalty": 1.3, "top_k": 40, "stop": ["x" * 200, "y" * 56]}[field]}
    assert post(http, "/v1/chat/completions", ok).status_code == 200
