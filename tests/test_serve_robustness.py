"""Robustness of the engine and the server (issue 14, items 5-7): every submitted request ends,
the event loop stays free while big requests are read and tokenised, the final text keeps a
trailing partial character, slow clients and foreign Host headers are refused. Engine tests run
the real default model; server tests talk to a real `edgellm serve` child process on 127.0.0.1."""

from __future__ import annotations

import pytest
from api_errors import assert_error

from edgellm.runtime.engine import Engine
from edgellm.runtime.types import Request
from edgellm.sampling import SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):"]


# ---------------------------------------------------------------------------------------------
# 6. A submission that cannot be queued fails only itself
# ---------------------------------------------------------------------------------------------
def test_a_submission_that_fails_to_enqueue_fails_only_itself(llm):
    """Three submissions land in one inbox drain; the middle one's stop strings are made
    unusable after validation (a stand-in for any failure while it is queued). It ends with
    reason "error" and its handle raises; the others complete as they do alone."""
    params = SamplingParams.greedy(max_tokens=6)
    with Engine(llm, kv_memory="16MB") as eng:
        want = [eng.submit(Request(prompt=p, params=params)).result().token_ids for p in (PROMPTS[0], PROMPTS[2])]
    with Engine(llm, kv_memory="16MB") as eng:       # not started: nothing drains until a step
        bad_params = SamplingParams.greedy(max_tokens=6, stop=["x"])
        handles = [eng.submit(Request(prompt=PROMPTS[0], params=params)),
                   eng.submit(Request(prompt=PROMPTS[1], params=bad_params)),
                   eng.submit(Request(prompt=PROMPTS[2], params=SamplingParams.greedy(max_tokens=6)))]
        bad_params.stop = [17]          # not a string: building its stop checker raises
        assert handles[0].result().token_ids == want[0]
        assert handles[2].result().token_ids == want[1]
        with pytest.raises(TypeError):
            handles[1].result()
        assert handles[1].done
        assert eng.live_sessions() == []        # no ephemeral session left behind
        s = eng.session()                       # the engine goes on
        assert s.send("Hi", SamplingParams.greedy(max_tokens=2)).result().finish_reason in ("length", "stop")


# ---------------------------------------------------------------------------------------------
# 7. The decoder is flushed at the finish
# ---------------------------------------------------------------------------------------------
def test_a_length_finish_inside_a_character_keeps_it(llm):
    """The model writes emoji, each several byte tokens; cut after the second token (inside the
    first emoji), the result and the streamed pieces hold what decoding the tokens gives: a
    U+FFFD for the unfinished character, as a non-streaming decode writes it."""
    tok = llm.loaded.tokenizer
    with Engine(llm, kv_memory="16MB") as eng:
        h = eng.submit(Request(prompt="Emoji for happy: 😀😀", params=SamplingParams.greedy(max_tokens=2)))
        pieces = list(h)
        r = h.result()
    assert r.finish_reason == "length" and len(r.token_ids) == 2
    assert tok.decode(r.token_ids).endswith("\ufffd")         # the cut is inside a character
    assert r.text == tok.decode(r.token_ids) == "".join(pieces)



def test_a_stop_token_inside_a_character_keeps_what_came_before_it(llm):
    """A stop token (never shown) arriving while a character is unfinished: the text is what
    decoding the tokens before it gives, the partial character as U+FFFD."""
    tok = llm.loaded.tokenizer
    prompt = "Emoji for happy: 😀😀"
    with Engine(llm, kv_memory="16MB") as eng:
        ids = eng.submit(Request(prompt=prompt, params=SamplingParams.greedy(max_tokens=2))).result().token_ids
        assert ids[0] != ids[1] and tok.decode(ids[:1]).endswith("\ufffd")
        h = eng.submit(Request(prompt=prompt, params=SamplingParams.greedy(max_tokens=8, stop_token_ids=[ids[1]])))
        pieces = list(h)
        r = h.result()
    assert r.finish_reason == "stop" and r.token_ids == ids
    assert r.text == tok.decode(ids[:1]) == "".join(pieces)


# ---------------------------------------------------------------------------------------------
# The server (no API key, on 127.0.0.1: the Host check is on)
# ---------------------------------------------------------------------------------------------
MODEL = "smollm2-135m"
ALLOWED = "my-box.test"
REQUEST_TIMEOUT_S = 1       # generations are cut at 1 s: the long ones below run far longer
BODY_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def server(smollm2_path):
    from edgellm.serve.process import ServerProcess
    with ServerProcess(["--model", MODEL, "--kv-memory", "64MB", "--threads", "2",
                        "--request-timeout", str(REQUEST_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
                        "--allow-host", ALLOWED]) as s:
        yield s
        assert s.alive, "the server died during the tests"


@pytest.fixture(scope="module")
def http(server):
    import httpx
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def post(http, path, body, **kw):
    import json
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return http.post(path, content=data, headers={"Content-Type": "application/json"}, **kw)




def raw_request(server, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    import socket
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
    head = {"Host": f"127.0.0.1:{server.port}", "Connection": "close", **(headers or {})}
    if body:
        head.setdefault("Content-Type", "application/json")
        head.setdefault("Content-Length", str(len(body)))
    text = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    return sock, text.encode()


def read_all(sock) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


def long_prompt(n_chars: int) -> str:
    import random
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "token", "engine", "server", "loop"]
    text = " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(n_chars // 6 + 1))
    return text[:n_chars]


# ---- 5. the event loop stays free -----------------------------------------------------------
def test_health_answers_while_a_huge_prompt_is_tokenised(server):
    """A chat request whose one message is 200k characters (within the character bound, so it
    is rendered and tokenised -- most of a second of work -- before its token count refuses
    it): a /health sent once the big body is sent answers first, because rendering and
    tokenising run in a worker thread (and the tokenizer releases the GIL), not on the event
    loop. The body fits one read of the server's socket, so it is read whole before /health
    arrives, and the old code could not answer /health before its tokenising ended."""
    import json
    import selectors
    n_chars = 200_000
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": long_prompt(n_chars)}],
                       "max_tokens": 1}).encode()
    big, head = raw_request(server, "POST", "/v1/chat/completions", body)
    big.sendall(head + body)            # the server now renders and tokenises it
    health, head = raw_request(server, "GET", "/health")
    health.sendall(head)
    sel = selectors.DefaultSelector()
    sel.register(big, selectors.EVENT_READ, "big")
    sel.register(health, selectors.EVENT_READ, "health")
    ready = sel.select(timeout=120)     # only to catch a hang
    sel.close()
    assert ready, "neither request answered"
    first = {key.data for key, _ in ready}
    big_reply, health_reply = read_all(big), read_all(health)
    assert first == {"health"}, f"/health waited for the big request ({first})"
    assert health_reply.startswith(b"HTTP/1.1 200")
    assert big_reply.startswith(b"HTTP/1.1 400") and b"context_length_exceeded" in big_reply


def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_tokenising(http):
    """More characters than context_length times the longest token's bytes: refused at once,
    naming the bound (the body limit still comes first: 413 before parsing)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a" * 900_000}], "max_tokens": 1}
    err = assert_error(post(http, "/v1/chat/completions", body), 400, param="messages",
                       code="context_length_exceeded")
    assert "characters" in err["message"]
    err = assert_error(post(http, "/v1/completions", {"model": MODEL, "prompt": "a" * 900_000}), 400,
                       param="prompt", code="context_length_exceeded")
    assert_error(post(http, "/v1/completions", {"model": MODEL, "prompt": "a" * (1 << 20)}), 413,
                 code="request_too_large")


# ---- 6. every accepted request ends ----------------------------------------------------------
COUNTING = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 1400, "temperature": 0}


def wait_idle(http) -> None:
    import time
    for _ in range(600):                # bounded: 60 s
        if http.get("/v1/runtime").json()["in_flight"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("requests still in flight after their timeout")


def test_a_request_past_its_timeout_is_cancelled_and_answered_504(http):
    err = assert_error(post(http, "/v1/completions", COUNTING), 504, code="request_timeout")
    assert "--request-timeout" in err["message"]
    wait_idle(http)                     # its engine request was cancelled, not left running


def test_a_stream_past_its_timeout_ends_with_an_error_event(http):
    import json
    events = []
    with http.stream("POST", "/v1/completions", content=json.dumps({**COUNTING, "stream": True}),
                     headers={"Content-Type": "application/json"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert events and "error" in events[-1], events[-3:]
    assert events[-1]["error"]["code"] == "request_timeout"
    wait_idle(http)


# ---- 7. slow bodies, foreign Host names, chunked bodies --------------------------------------
def test_a_body_that_does_not_arrive_gets_408(server):
    sock, head = raw_request(server, "POST", "/v1/chat/completions", headers={
        "Content-Type": "application/json", "Content-Length": "100"})
    sock.sendall(head + b'{"model": ')        # and nothing more
    reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply


@pytest.mark.parametrize("host,status", [
    ("127.0.0.1", 200), ("localhost", 200), ("[::1]", 200), (ALLOWED, 200),
    ("evil.example", 403), ("127.0.0.1.evil.example", 403), ("", 403),
])
def test_without_a_key_only_local_host_names_are_answered(server, http, host, status):
    """DNS rebinding: a page on evil.example that points its name at 127.0.0.1 still sends
    'Host: evil.example'; without an API key the server answers only its local names (and
    --allow-host ones), whatever the port."""
    for path in ("/health", "/v1/models"):
        r = http.get(path, headers={"Host": f"{host}:{server.port}" if host else ""})
        assert r.status_code == status, (host, path, r.text)
        if status == 403:
            assert r.json()["error"]["code"] == "host_not_allowed"


def test_a_chunked_session_create_body_is_read(http):
    """POST /v1/sessions with 'Transfer-Encoding: chunked' (no Content-Length) is read like any
    other body: its system prompt is kept and its bad fields are refused."""
    def chunked(text: str):
        yield text.encode()

    r = http.post("/v1/sessions", content=chunked('{"system": "Be brief."}'),
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    assert r.json()["messages"] == 1            # the system message
    r = http.post("/v1/sessions", content=chunked('{"system": 5}'), headers={"Content-Type": "application/json"})
    assert_error(r, 400, "system")
    r = http.post("/v1/sessions", content=chunked('{"bogus": 1}'), headers={"Content-Type": "application/json"})
    assert r.status_code == 201 and r.headers["x-edgellm-ignored-fields"] == "bogus"      # ignored, and said so
    assert http.post("/v1/sessions").status_code == 201      # no body at all: defaults


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1"])
def test_headers_that_do_not_arrive_get_408_and_the_connection_closed(server, sent):
    """A connection that sends nothing, or only part of its headers, is answered 408 and closed
    after --body-timeout (uvicorn alone would hold it open for ever)."""
    import socket
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)   # only to catch a hang
    sock.sendall(sent)
    reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply
