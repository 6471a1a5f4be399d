"""`edgellm serve` end to end: the real server in a child process on 127.0.0.1, the real default
model, the real `openai` client and raw HTTP. Greedy texts and log-probabilities are checked
against ``LLM.generate`` -- the single-sequence path, run in this process -- and token counts
against the tokenizer."""

from __future__ import annotations

import json
import math
import shutil
import time

import httpx
import openai
import pytest
from api_errors import assert_error

from edgellm.sampling import SamplingParams
from edgellm.serve.process import ServerProcess, metric

KEY = "sk-edgellm-test"
MODEL = "smollm2-135m"
MAX_QUEUE = 4
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG_PROMPT = ("Here is a long story about a small robot who lived in a lighthouse by the sea and counted "
               "ships every night, writing each name in a notebook with a blue pencil. One night")


@pytest.fixture(scope="module")
def server(smollm2_path):
    with ServerProcess(["--model", MODEL, "--api-key", KEY, "--max-queue", str(MAX_QUEUE), "--kv-memory", "64MB",
                        "--threads", "2"]) as s:
        yield s
        assert s.alive, "the server died during the tests"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def post(http, path, body, headers=AUTH, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return http.post(path, content=data, headers={"Content-Type": "application/json", **headers}, **kw)


def user(text):
    return [{"role": "user", "content": text}]


def metrics(http) -> str:
    return http.get("/metrics", headers=AUTH).text


def sample(text: str, name: str, labels: str | None = None) -> float:
    """A counter's value, 0 where it has no sample yet (a label set not seen so far)."""
    try:
        return metric(text, name, labels)
    except KeyError:
        return 0.0


def wait_idle(http, timeout=120.0) -> str:
    """Metrics once no request is in flight and no KV block is in use (cached prefixes aside).
    The timeout only stops a hang (a block never freed); it is not a speed requirement."""
    deadline = time.monotonic() + timeout
    while True:
        text = metrics(http)
        if metric(text, "edgellm_requests_in_flight") == 0 and metric(text, "edgellm_kv_blocks", 'state="used"') == 0:
            return text
        if time.monotonic() > deadline:
            raise AssertionError("requests still in flight or KV blocks still used:\n" + text)
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The openai client
# ---------------------------------------------------------------------------------------------
def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").json()["status"] == "ok"


def test_chat_greedy_matches_single_sequence_path_streamed_and_not(client, llm):
    messages = user("What is the capital of France?")
    ref = llm.generate(llm.tokenizer.encode_chat(messages), SamplingParams.greedy(max_tokens=12))
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode_chat(messages))
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_streamed_and_not(client, llm):
    prompt = "The three primary colors are"
    ref = llm.generate(prompt, SamplingParams.greedy(max_tokens=10))
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == len(ref.token_ids)
    parts = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == ref.text
    assert parts[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_n_choices_seed_reproducible(client):
    kw = dict(model=MODEL, messages=user("Write a word."), max_tokens=8, temperature=1.0, seed=1234)
    a = client.chat.completions.create(n=3, **kw)
    b = client.chat.completions.create(n=3, **kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts_a = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    texts_b = [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert texts_a == texts_b                       # same seed: same samples
    assert a.usage.completion_tokens == b.usage.completion_tokens
    other = client.chat.completions.create(n=3, **{**kw, "seed": 99})
    assert [c.message.content for c in sorted(other.choices, key=lambda c: c.index)] != texts_a
    # streamed n>1: every index appears and finishes once
    finished = {}
    for ch in client.chat.completions.create(n=2, stream=True, **kw):
        for c in ch.choices:
            if c.finish_reason:
                finished[c.index] = finished.get(c.index, 0) + 1
    assert finished == {0: 1, 1: 1}


def test_stop_string(client, llm):
    prompt = "Count: one, two, three, four, five,"
    full = llm.generate(prompt, SamplingParams.greedy(max_tokens=12)).text
    words = full.split(",")
    assert len(words) >= 3, full
    stop = words[2].strip()                         # a word the greedy text reaches after two commas
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]
    streamed = "".join(p.choices[0].text for p in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_logprobs_match_single_sequence_path(client, llm):
    messages = user("Name a fruit.")
    ref = llm.generate(llm.tokenizer.encode_chat(messages),
                       SamplingParams.greedy(max_tokens=6, logprobs=True, top_logprobs=3))
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    for entry, tid, lp, top in zip(content, ref.token_ids, ref.logprobs, ref.top_logprobs):
        assert entry.token == llm.tokenizer.decode([tid])
        assert math.isclose(entry.logprob, lp, abs_tol=2e-3)
        assert len(entry.top_logprobs) == 3
        # the alternatives are the single-sequence path's (ids -> text), with its log-probabilities
        assert {t.token for t in entry.top_logprobs} == {llm.tokenizer.decode([i]) for i, _ in top}
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=2e-3)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)   # greedy = the top one
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1.0 + 1e-4
    c = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)


def test_follow_up_chat_reuses_cached_prefix(client, llm):
    first = user("Tell me one fact about owls. Keep it short, please.")
    r1 = client.chat.completions.create(model=MODEL, messages=first, max_tokens=10, temperature=0)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And one about cats?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=second, max_tokens=4, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # at least every full 16-token block of the first prompt is found again
    assert cached >= (r1.usage.prompt_tokens // 16) * 16 > 0
    assert cached < r2.usage.prompt_tokens


def test_sessions_api(http):
    s = post(http, "/v1/sessions", {"system": "You are terse.", "max_tokens": 6})
    assert s.status_code == 201, s.text
    sid = s.json()["id"]
    assert s.json()["phase"] == "inactive"
    deltas, done = [], None
    with http.stream("POST", f"/v1/sessions/{sid}/messages", json={"content": "Name a colour."}, headers=AUTH) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if ev["type"] == "delta":
                    deltas.append(ev["content"])
                else:
                    done = ev
    assert done["message"]["content"] == "".join(deltas)
    assert done["usage"]["completion_tokens"] <= 6
    view = http.get(f"/v1/sessions/{sid}", headers=AUTH).json()
    assert view["phase"] == "inactive" and view["turns"] == 1 and view["kv_tier"] == "pool"
    # the first token comes from the prefill, every further one from a decode step of one token
    n_out = done["usage"]["completion_tokens"]
    assert n_out > 1, done                          # so there was at least one decode step
    assert view["phase_seconds"]["prefill"] > 0 and view["phase_seconds"]["decode"] > 0
    assert view["phase_tokens"]["prefill"] == done["usage"]["prompt_tokens"]
    assert view["phase_tokens"]["decode"] == n_out - 1
    r2 = post(http, f"/v1/sessions/{sid}/messages", {"content": "Another.", "stream": False}).json()
    assert r2["turn"]["cached_tokens"] >= done["usage"]["prompt_tokens"]   # the follow-up reuses the first turn
    assert r2["session"]["phase_tokens"]["followup_prefill"] == r2["turn"]["computed_prompt_tokens"]
    assert r2["turn"]["computed_prompt_tokens"] < r2["usage"]["prompt_tokens"]
    gone = http.delete(f"/v1/sessions/{sid}", headers=AUTH)
    assert gone.json()["session"]["phase"] == "retired" and gone.json()["session"]["kv_tokens"] == 0
    assert http.get(f"/v1/sessions/{sid}", headers=AUTH).status_code == 404
    assert post(http, "/v1/sessions/sess_999999/messages", {"content": "x"}).status_code == 404


# ---------------------------------------------------------------------------------------------
# Bad input: the right status and OpenAI's error shape, never a 500
# ---------------------------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip(http, llm):
    """vLLM's /tokenize and /detokenize: the engine's ids for a text (and for a chat, rendered with
    the chat template), and the text back from them."""
    text = "Hello, world! Tokenizers split text into pieces: caf\u00e9, 123, \u6f22\u5b57."
    r = post(http, "/tokenize", {"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == llm.tokenizer.encode(text) and out["count"] == len(out["tokens"]) > 5
    assert out["max_model_len"] == 8192
    back = post(http, "/detokenize", {"model": MODEL, "tokens": out["tokens"]})
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": llm.tokenizer.decode(out["tokens"])}
    assert back.json()["prompt"].endswith(text)
    chat = post(http, "/tokenize", {"model": MODEL, "messages": user("hi")}).json()
    assert chat["tokens"] == llm.tokenizer.encode_chat(user("hi")) and chat["count"] == len(chat["tokens"])


def test_tokenize_count_matches_transformers(http, smollm2_path):
    """The reference tokenizer (transformers, reading the same GGUF) gives the same ids and count."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    for text in ("Hello, world!", "Ελληνικά and 日本語 🍣, https://example.com/a?b=c", "  indented\n\tcode"):
        out = post(http, "/tokenize", {"model": MODEL, "prompt": text}).json()
        assert out["tokens"] == ref.encode(text) and out["count"] == len(ref.encode(text))
        assert post(http, "/detokenize", {"model": MODEL, "tokens": out["tokens"]}).json()["prompt"] == text


def test_tokenize_and_detokenize_refuse_bad_input(http, llm):
    vocab = llm.loaded.tokenizer.vocab_size
    assert_error(post(http, "/tokenize", {"model": "gpt-4o", "prompt": "x"}), 404, "model", "model_not_found")
    assert_error(post(http, "/tokenize", {"model": MODEL, "prompt": 5}), 400, "prompt", "invalid_type")
    assert_error(post(http, "/tokenize", {"model": MODEL}), 400, "prompt")
    assert_error(post(http, "/tokenize", {"model": MODEL, "prompt": "x", "messages": user("x")}), 400, "prompt")
    assert_error(post(http, "/tokenize", {"model": MODEL, "messages": "hi"}), 400, "messages")
    assert_error(post(http, "/tokenize", {"model": MODEL, "prompt": "x"}, headers={}), 401)
    assert_error(post(http, "/detokenize", {"model": "gpt-4o", "tokens": [1]}), 404, "model")
    assert_error(post(http, "/detokenize", {"model": MODEL, "tokens": [1, vocab]}), 400, "tokens")
    assert_error(post(http, "/detokenize", {"model": MODEL, "tokens": [-1]}), 400, "tokens")
    for bad in ("12", [1.5], [True], None, {"a": 1}):
        assert_error(post(http, "/detokenize", {"model": MODEL, "tokens": bad}), 400, "tokens")
    assert post(http, "/detokenize", {"model": MODEL, "tokens": [vocab - 1]}).status_code == 200


def test_logit_bias_forces_and_bans_tokens(http, llm):
    """OpenAI's logit_bias, checked against the logits the engine computes without it: -100 on the
    greedy token makes the runner-up come first (its reported log-probability still the raw one),
    +100 on any token makes greedy decoding repeat it."""
    prompt = "The capital of France is"
    ref = llm.generate(prompt, SamplingParams.greedy(max_tokens=1, logprobs=True, top_logprobs=2))
    (t0, _), (t1, lp1) = ref.top_logprobs[0][:2]
    assert ref.token_ids == [t0] and t1 != t0
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1}
    r = post(http, "/v1/completions", {**body, "logit_bias": {str(t0): -100}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == llm.tokenizer.decode([t1])
    assert choice["logprobs"]["token_logprobs"][0] == pytest.approx(lp1, abs=1e-4)
    unbiased = post(http, "/v1/completions", body).json()["choices"][0]
    assert unbiased["text"] == llm.tokenizer.decode([t0]) != choice["text"]
    forced = llm.tokenizer.encode(" banana")[0]
    assert forced not in (t0, t1)
    r = post(http, "/v1/chat/completions", {"model": MODEL, "messages": user("hi"), "max_tokens": 3, "temperature": 0,
                                            "logit_bias": {str(forced): 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == llm.tokenizer.decode([forced] * 3)
    assert llm.generate(prompt, SamplingParams.greedy(max_tokens=3, logit_bias={forced: 100})).token_ids == [forced] * 3
    vocab = llm.loaded.tokenizer.vocab_size
    for bad in ({"abc": 1}, {str(vocab): 1}, {"-1": 1}, {"5": 101}, {"5": "x"}, {"5": True}, [5],
                {str(i): 1 for i in range(301)}):
        assert_error(post(http, "/v1/completions", {**body, "logit_bias": bad}), 400, "logit_bias")


def test_auth(http, server):
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 1}
    assert_error(post(http, "/v1/chat/completions", body, headers={}), 401, code="invalid_api_key")
    assert_error(post(http, "/v1/chat/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_malformed_and_invalid_bodies(http):
    ok = {"model": MODEL, "messages": user("hi"), "max_tokens": 1}
    assert_error(post(http, "/v1/chat/completions", b'{"model": "x", "messages": ['), 400, code="invalid_json")
    assert_error(post(http, "/v1/chat/completions", b"[1, 2]"), 400, code="invalid_json")
    assert_error(post(http, "/v1/chat/completions", b""), 400)
    assert_error(post(http, "/v1/chat/completions", {**ok, "tools": [{"type": "function"}]}), 400, "tools[0]")
    assert_error(post(http, "/v1/chat/completions", {**ok, "model": "gpt-4o"}), 404, "model", "model_not_found")
    wrong = {"max_tokens": "ten", "temperature": "hot", "top_p": 0, "n": 0, "stop": 5, "seed": 1.5,
             "presence_penalty": 3, "frequency_penalty": [1], "logprobs": "yes", "top_logprobs": 21,
             "stream": "true", "messages": "hi", "stream_options": {"include_usage": True}}
    for name, value in wrong.items():
        assert_error(post(http, "/v1/chat/completions", {**ok, name: value}), 400, name)
    assert_error(post(http, "/v1/chat/completions", {**ok, "messages": [{"role": "robot", "content": "x"}]}), 400,
                 "messages[0].role")
    assert_error(post(http, "/v1/chat/completions", {**ok, "messages": [{"role": "user"}]}), 400)
    assert_error(post(http, "/v1/completions", {"model": MODEL, "prompt": {"a": 1}}), 400, "prompt")
    assert_error(post(http, "/v1/completions", {"model": MODEL, "prompt": ""}), 400, "prompt")
    assert_error(post(http, "/v1/completions", {"model": MODEL, "prompt": [10 ** 9]}), 400, "prompt")
    assert_error(post(http, "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 6}), 400, "logprobs")
    # every field of the chat request with values of every JSON type: 400 or 200, never 500
    for name in ["model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs",
                 "top_logprobs", "presence_penalty", "frequency_penalty", "stream_options"]:
        for value in [True, -1, 1e308, "x", [None], {"a": None}]:
            status = post(http, "/v1/chat/completions", {**ok, name: value}).status_code
            assert status in (200, 400, 404), (name, value, status)


def test_unknown_fields_are_ignored_and_reported(http, server, llm):
    """A field the server does not know is ignored, as vLLM does: the answer is what it is without
    it, an x-edgellm-ignored-fields header names it and the server logs it. A known field of the
    wrong type is still refused."""
    ok = {"model": MODEL, "messages": user("hi"), "max_tokens": 3, "temperature": 0}
    plain = post(http, "/v1/chat/completions", ok)
    assert plain.status_code == 200 and "x-edgellm-ignored-fields" not in plain.headers
    r = post(http, "/v1/chat/completions", {**ok, "bogus": 1, "chat_template_kwargs": {"x": 1}})
    assert r.status_code == 200, r.text
    assert r.headers["x-edgellm-ignored-fields"] == "bogus,chat_template_kwargs"
    assert r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    with http.stream("POST", "/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "hi", "max_tokens": 2,
                                                                    "stream": True, "weird field\n": 1}) as s:
        assert s.status_code == 200 and s.headers["x-edgellm-ignored-fields"] == "weird?field?"
        assert list(s.iter_lines())[-2] == "data: [DONE]"
    r = post(http, "/tokenize", {"model": MODEL, "prompt": "hi", "add_special_tokens": False})
    assert r.status_code == 200 and r.headers["x-edgellm-ignored-fields"] == "add_special_tokens"
    assert "ignoring unknown request fields 'bogus', 'chat_template_kwargs'" in server.output()
    assert_error(post(http, "/v1/chat/completions", {**ok, "bogus": 1, "max_tokens": "3"}), 400, "max_tokens")
    assert_error(post(http, "/v1/chat/completions", {**ok, "bogus": 1, "tools": [{"type": "function"}]}), 400, "tools[0]")


def test_oversized_body_and_context_overflow(http):
    big = {"model": MODEL, "messages": user("x" * (2 << 20))}
    assert_error(post(http, "/v1/chat/completions", big), 413, code="request_too_large")
    r = post(http, "/v1/chat/completions", {"model": MODEL, "messages": user("hi"), "max_tokens": 100_000})
    assert_error(r, 400, code="context_length_exceeded")
    assert "8192" in r.json()["error"]["message"]
    long = {"model": MODEL, "prompt": "word " * 5000, "max_tokens": 16}    # fits the context, not the 64MB pool
    r = post(http, "/v1/completions", long)
    assert_error(r, 400, code="context_length_exceeded")
    assert "--kv-memory" in r.json()["error"]["message"]


def test_queue_full_then_disconnect_frees_blocks(http, server):
    cancelled = sample(wait_idle(http), "edgellm_completions_total", 'finish_reason="cancelled"')
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "n": MAX_QUEUE, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as other:
        with other.stream("POST", "/v1/completions", json=body, headers=AUTH) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")          # tokens are flowing
            text = metrics(http)
            # (one CI run saw 0 here, not reproduced in 10 reruns: the message keeps what a rerun needs)
            finished = [ln for ln in text.splitlines() if ln.startswith("edgellm_completions_total{")]
            assert metric(text, "edgellm_requests_in_flight") == MAX_QUEUE, (first, finished)
            assert metric(text, "edgellm_kv_blocks", 'state="used"') > 0
            full = post(http, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
            assert_error(full, 429, code="rate_limit_exceeded")
            assert int(full.headers["retry-after"]) >= 1
        never = post(http, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1, "n": MAX_QUEUE + 1})
        assert_error(never, 400, "n")                       # more than the server ever runs: not worth a retry
        # the stream is closed: its four requests are cancelled and their blocks freed
    text = wait_idle(http)
    assert metric(text, "edgellm_completions_total", 'finish_reason="cancelled"') == cancelled + MAX_QUEUE


def test_non_streamed_disconnect_cancels(http, server):
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    before = sample(wait_idle(http), "edgellm_completions_total", 'finish_reason="cancelled"')
    with pytest.raises(httpx.ReadTimeout):
        post(http, "/v1/completions", body, timeout=1.0)
    text = wait_idle(http)
    assert metric(text, "edgellm_completions_total", 'finish_reason="cancelled"') == before + 1


def test_metrics_count_this_tests_own_requests(http, llm):
    """Three requests made here, counted by every counter: the deltas equal their usage (checked
    against the tokenizer) -- no reliance on traffic left by other tests."""
    prompts = ["The sky is", "Two plus two is", "My favourite fruit is"]
    names = ["edgellm_time_to_first_token_seconds_count", "edgellm_time_per_output_token_seconds_count",
             "edgellm_generation_tokens_total", "edgellm_prompt_tokens_total"]
    stop, http_ok = 'finish_reason="length"', 'endpoint="completions",status="200"'

    def counters(text):
        return ({n: sample(text, n) for n in names}, sample(text, "edgellm_completions_total", stop),
                sample(text, "edgellm_http_requests_total", http_ok))

    before, lengths_before, ok_before = counters(wait_idle(http))
    usages = []
    for p in prompts:
        r = post(http, "/v1/completions", {"model": MODEL, "prompt": p, "max_tokens": 3, "temperature": 0,
                                           "ignore_eos": True})
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    assert [u["prompt_tokens"] for u in usages] == [len(llm.tokenizer.encode(p)) for p in prompts]
    assert [u["completion_tokens"] for u in usages] == [3, 3, 3]
    text = wait_idle(http)
    after, lengths_after, ok_after = counters(text)
    delta = {n: after[n] - before[n] for n in names}
    assert delta == {"edgellm_time_to_first_token_seconds_count": 3,
                     "edgellm_time_per_output_token_seconds_count": 3,
                     "edgellm_generation_tokens_total": 9,
                     "edgellm_prompt_tokens_total": sum(u["prompt_tokens"] for u in usages)}
    assert lengths_after - lengths_before == 3 and ok_after - ok_before == 3
    for name in ["edgellm_time_to_first_token_seconds_bucket", "edgellm_time_per_output_token_seconds_count",
                 "edgellm_generation_tokens_total", "edgellm_prompt_tokens_total", 'edgellm_sessions{phase="decode"}',
                 'edgellm_kv_blocks{state="offloaded_host"}', "edgellm_queue_depth", "edgellm_http_requests_total"]:
        assert name in text, name
    used, free, cached = (metric(text, "edgellm_kv_blocks", f'state="{s}"') for s in ("used", "free", "cached"))
    assert used + free + cached == metric(text, "edgellm_kv_blocks_total")


def test_live_page_served(http):
    page = http.get("/")
    assert page.status_code == 200 and "/v1/runtime" in page.text
    rt = http.get("/v1/runtime", headers=AUTH).json()
    assert rt["model"] == MODEL and rt["kv_blocks"]["total"] > 0


# ---------------------------------------------------------------------------------------------
# The live page in headless Chromium (Selenium); skipped where no Chromium is installed
# ---------------------------------------------------------------------------------------------
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="no chromium/chromedriver binary on PATH (Debian: apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    yield driver
    driver.quit()


def wait_for(fn, timeout=60.0, what="condition"):
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = fn()
        except StaleElementReferenceException:   # the page re-rendered it between find and read
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@needs_chromium
def test_live_page_in_chromium_chat_streams_and_phases_change(browser, server):
    """Headless Chromium: send a message, watch the reply stream in and the phase counts change."""
    browser.get(server.url + "/")
    by_id = browser.find_element

    def shown(element_id: str) -> str:   # the runtime view re-renders every 500 ms: read it fresh
        return wait_for(lambda: by_id("id", element_id).text or " ", 5, element_id)

    by_id("id", "key").send_keys(KEY)
    wait_for(lambda: by_id("id", "model").text == "smollm2-135m", 30, "the runtime view's first refresh")
    assert shown("phase-inactive") == "0"
    assert int(shown("kv-used-n")) == 0

    maxtok = by_id("id", "maxtok")
    maxtok.clear()
    maxtok.send_keys("24")
    by_id("id", "input").send_keys("Write a short poem about the sea.")
    by_id("id", "send").click()
    reply = wait_for(lambda: browser.find_elements("css selector", ".msg.assistant"), 10, "the reply bubble")[0]
    lengths = set()
    while reply.get_attribute("data-done") != "1":
        lengths.add(len(reply.text))
        time.sleep(0.02)
    text = reply.text
    assert "[error" not in text, text
    assert "prompt tokens" in text and "phase now inactive" in text     # the turn's figures
    assert len(lengths - {0}) >= 2, "the reply did not arrive in pieces"
    # the session finished its turn: the runtime view counts it as inactive, holding KV blocks
    wait_for(lambda: by_id("id", "phase-inactive").text == "1", 5, "phase count inactive = 1")
    assert int(shown("kv-used-n")) > 0
    assert int(shown("generated")) > 0
    assert server.alive


def test_cli_refuses_bad_options_before_loading(capsys):
    from edgellm.cli.main import main

    assert main(["serve", "--max-queue", "0"]) == 2
    assert "--max-queue" in capsys.readouterr().err
    assert main(["serve", "--max-body", "lots"]) == 2
    assert "--max-body" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
