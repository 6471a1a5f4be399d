"""Structured output, tool calls, embeddings and vLLM-named metrics of `edgellm serve` (issue 14,
items 9, 10, 11, 12): the real server in a child process on 127.0.0.1, the real default model, the
real `openai` client. Outputs are checked against their JSON schemas with the `jsonschema`
package; embeddings against Hugging Face transformers' hidden states of the same GGUF file."""

from __future__ import annotations

import json

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch
from api_errors import assert_error

from edgellm.grammar import Grammar
from edgellm.sampling import SamplingParams
from edgellm.serve.process import ServerProcess, metric
from edgellm.serve.tools import TOOL_MODELS, ToolCallParser, split_output, template_reads_tools

MODEL = "smollm2-135m"

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colour", "address", "tags"],
          "properties": {
              "name": {"type": "string", "maxLength": 24},
              "age": {"type": "integer", "minimum": 0, "maximum": 120},
              "colour": {"enum": ["red", "green", "blue"]},
              "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                          "properties": {"city": {"type": "string", "maxLength": 24},
                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
              "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1,
                       "maxItems": 3}}}
INVENTORY = {"type": "object", "additionalProperties": False, "required": ["items"],
             "properties": {"items": {"type": "array", "minItems": 2, "maxItems": 3, "items": {
                 "type": "object", "additionalProperties": False, "required": ["sku", "count", "ok"],
                 "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                "count": {"type": "integer", "minimum": 1, "maximum": 99},
                                "ok": {"type": "boolean"}}}}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 40},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "maxLength": 40}}}}}


@pytest.fixture(scope="module")
def server(smollm2_path):
    with ServerProcess(["--model", MODEL, "--kv-memory", "64MB", "--threads", "2"]) as s:
        yield s
        assert s.alive, "the server died during the tests"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tool_server(smollm2_path, tmp_path_factory):
    """SmolLM2 with a chat template that renders tools (tests/tool_template.py), served under the
    same name: SmolLM2's own template has none, so the server refuses tools for it."""
    from tool_template import write_smollm2_with_tools

    path = write_smollm2_with_tools(smollm2_path, tmp_path_factory.mktemp("tools") / "smollm2-tools.gguf")
    with ServerProcess(["--model", str(path), "--served-model-name", MODEL, "--kv-memory", "64MB",
                        "--threads", "2"]) as s:
        yield s
        assert s.alive, "the server died during the tests"


@pytest.fixture(scope="module")
def tool_http(tool_server):
    with httpx.Client(base_url=tool_server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tool_client(tool_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def user(text):
    return [{"role": "user", "content": text}]


def schema_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# ---------------------------------------------------------------------------------------------
# Structured output
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema,prompt", [(PERSON, "Describe a person who lives in Paris, as JSON."),
                                           (INVENTORY, "List the items in the warehouse as JSON.")])
def test_json_schema_output_validates_streamed_and_not(client, schema, prompt):
    """Greedy and sampled (n=2), streamed and not: every output parses and validates against its
    schema (nested objects, arrays with bounds, enums, patterns), and ends with "stop"."""
    kw = dict(model=MODEL, messages=user(prompt), max_tokens=200, response_format=schema_format(schema))
    r = client.chat.completions.create(temperature=0, **kw)
    outputs = [(r.choices[0].message.content, r.choices[0].finish_reason)]
    r = client.chat.completions.create(temperature=0.9, n=2, seed=7, **kw)
    outputs += [(c.message.content, c.finish_reason) for c in r.choices]
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(temperature=0.9, n=2, seed=11, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    outputs += [(texts[i], finishes[i]) for i in (0, 1)]
    for text, finish in outputs:
        assert finish == "stop", (text, finish)
        jsonschema.validate(json.loads(text), schema)
    # the same request streamed gives the same greedy text
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        temperature=0, stream=True, **kw) if c.choices)
    assert streamed == outputs[0][0]


def test_json_object_mode_and_completions(client):
    r = client.chat.completions.create(model=MODEL, messages=user("Reply in JSON: what is 2+2?"), max_tokens=120,
                                       temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    c = client.completions.create(model=MODEL, prompt="A city and its country, as JSON:", max_tokens=120,
                                  temperature=0, extra_body={"response_format": schema_format(
                                      {"type": "object", "required": ["city", "country"], "additionalProperties": False,
                                       "properties": {"city": {"type": "string", "maxLength": 20},
                                                      "country": {"type": "string", "maxLength": 20}}})})
    assert c.choices[0].finish_reason == "stop"
    assert set(json.loads(c.choices[0].text)) == {"city", "country"}


def test_guided_regex_and_choice(client):
    r = client.completions.create(model=MODEL, prompt="The year the first moon landing happened:", max_tokens=10,
                                  temperature=0.8, seed=3, n=3, extra_body={"guided_regex": "(19|20)[0-9]{2}"})
    for c in r.choices:
        assert len(c.text) == 4 and c.text[:2] in ("19", "20") and c.text.isdigit(), c.text
    r = client.chat.completions.create(model=MODEL, messages=user("Is the sky green? Answer yes or no."),
                                       max_tokens=5, temperature=1.0, seed=5, n=4,
                                       extra_body={"guided_choice": ["yes", "no", "maybe not"]})
    assert all(c.message.content in ("yes", "no", "maybe not") for c in r.choices)


def test_bad_schemas_are_400_and_harm_no_one(http, client):
    base = {"model": MODEL, "messages": user("hi"), "max_tokens": 4}
    cases = [
        ({"response_format": schema_format({"type": "objekt"})}, "response_format", "objekt"),
        ({"response_format": schema_format({"type": "string", "pattern": "[a-"})}, "response_format", "regex"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
         "response_format.json_schema.name", "name"),
        ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
        ({"guided_choice": []}, "guided_choice", "choices"),
        ({"guided_grammar": "start: nothere"}, "guided_grammar", "grammar"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, None, "at most one"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ]
    for extra, param, word in cases:
        r = http.post("/v1/chat/completions", json={**base, **extra})
        err = assert_error(r, 400, param=param)
        assert word.lower() in err["message"].lower(), (extra, err)
    # the server is unharmed: a normal request and a constrained one still answer
    ok = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=4, temperature=0)
    assert ok.choices[0].message.content
    ok = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=40, temperature=0,
                                        response_format={"type": "json_object"})
    assert ok.choices[0].message.content.startswith("{")


def test_constrained_row_leaves_its_batch_neighbours_unchanged(llm):
    """The sampler masks only the constrained row: greedy prompts batched with a constrained one
    give exactly their solo output, and the constrained one's output fits its regex."""
    from edgellm.runtime.engine import Engine

    prompts = ["The capital of Italy is", "Once upon a time", "def add(a, b):"]
    solo = [llm.generate(p, SamplingParams.greedy(max_tokens=12)).text for p in prompts]
    with Engine(llm, kv_memory="32MB") as engine:
        out = engine.generate(prompts + ["My phone number is"],
                              [SamplingParams.greedy(max_tokens=12)] * 3 +
                              [SamplingParams.greedy(max_tokens=20, grammar=Grammar.regex(r" \d{3}-\d{4}"))])
    assert [o.text for o in out[:3]] == solo
    import re
    assert re.fullmatch(r" \d{3}-\d{4}", out[3].text) and out[3].finish_reason == "stop", out[3].text


def session_turn(http, sid: str, body: dict) -> dict:
    """One turn of a session, streamed: the done event, checked against the deltas."""
    deltas, done = [], None
    with http.stream("POST", f"/v1/sessions/{sid}/messages", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                deltas.append(ev.get("content", "")) if ev["type"] == "delta" else None
                done = ev if ev["type"] == "done" else done
    assert done["message"]["content"] == "".join(deltas)
    return done


def test_session_turns_take_response_format_and_refuse_tools(http):
    """The sessions API takes response_format (per turn, or as the session's default) like chat
    completions, streamed and not; tools, n and logprobs are refused with 400, not ignored."""
    sid = http.post("/v1/sessions", json={"system": "You answer in JSON.", "max_tokens": 120,
                                          "response_format": schema_format(INVENTORY)}).json()["id"]
    first = session_turn(http, sid, {"content": "List the items in the warehouse."})
    jsonschema.validate(json.loads(first["message"]["content"]), INVENTORY)
    assert first["finish_reason"] == "stop"
    second = http.post(f"/v1/sessions/{sid}/messages", json={
        "content": "Now describe a person who lives in Paris.", "stream": False,
        "response_format": schema_format(PERSON)}).json()
    jsonschema.validate(json.loads(second["message"]["content"]), PERSON)
    # {"type": "text"} lifts the session's constraint for a turn; logit_bias is honoured (+100 on
    # one token: greedy picks it at every step)
    (banana,) = http.post("/tokenize", json={"prompt": " banana"}).json()["tokens"][:1]
    piece = http.post("/detokenize", json={"tokens": [banana]}).json()["prompt"]
    free = http.post(f"/v1/sessions/{sid}/messages", json={"content": "Thanks!", "stream": False, "max_tokens": 2,
                                                          "response_format": {"type": "text"},
                                                          "logit_bias": {str(banana): 100}}).json()
    assert free["message"]["content"] == piece * 2 and free["finish_reason"] == "length"
    for extra, param in [({"tools": [WEATHER]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"), ({"n": 2}, "n"),
                         ({"logprobs": True}, "logprobs"),
                         ({"response_format": schema_format({"type": "objekt"})}, "response_format"),
                         ({"response_format": {"type": "xml"}}, "response_format.type")]:
        assert_error(http.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", **extra}), 400, param=param)
        assert_error(http.post("/v1/sessions", json=extra), 400, param=param)
    assert http.get(f"/v1/sessions/{sid}").json()["turns"] == 3
    assert http.delete(f"/v1/sessions/{sid}").status_code == 200


# ---------------------------------------------------------------------------------------------
# Tool calls
# ---------------------------------------------------------------------------------------------
def test_forced_tool_call_returns_parseable_arguments(tool_client):
    client = tool_client
    r = client.chat.completions.create(model=MODEL, messages=user("What is the weather in Paris?"), max_tokens=80,
                                       temperature=0, tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    # "required": any of the tools, at least one call, each valid for its own function
    r = client.chat.completions.create(model=MODEL, messages=user("What time is it in Tokyo?"), max_tokens=120,
                                       temperature=0.7, seed=2, n=2, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])


def test_streamed_tool_calls(tool_client):
    client = tool_client
    kw = dict(model=MODEL, messages=user("What is the weather in Oslo?"), max_tokens=80, temperature=0,
              tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls, finish, content = {}, None, ""
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    for ch in chunks:
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.function.arguments)


def test_tool_results_in_the_history(tool_client, client):
    """A conversation holding the assistant's tool call and the tool's result is accepted and
    answered -- through the tool-aware template, and with tool_choice "none" by SmolLM2's own
    template (the tool turns written as text)."""
    first = tool_client.chat.completions.create(model=MODEL, messages=user("What is the weather in Rome?"), max_tokens=80,
                                           temperature=0, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = user("What is the weather in Rome?") + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 24, "sky": "clear"})}]
    for c in (tool_client, client):
        r = c.chat.completions.create(model=MODEL, messages=history, max_tokens=24, temperature=0, tools=[WEATHER],
                                      tool_choice="none")
        assert r.choices[0].message.content and r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason in ("stop", "length")


def test_tools_are_refused_for_a_model_whose_template_has_none(http, client):
    """SmolLM2's template does not render tools: 400 naming the registry's models that do, for
    every tool_choice but "none", which is answered as text (the tools dropped)."""
    for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        err = assert_error(http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": user("Weather in Oslo?"), "max_tokens": 4, "tools": [WEATHER],
            "tool_choice": choice}), 400, param="tools", code="unsupported_parameter")
        assert "qwen2.5-coder-0.5b" in err["message"] and "tool_choice" in err["message"]
    plain = client.chat.completions.create(model=MODEL, messages=user("Weather in Oslo?"), max_tokens=8,
                                           temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=user("Weather in Oslo?"), max_tokens=8, temperature=0,
                                       tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content == plain.choices[0].message.content     # the tools were not shown
    assert r.choices[0].message.tool_calls is None


def registry_template(name: str) -> str | None:
    """The chat template of an installed registry model ('' without one); None if not installed."""
    from edgellm.errors import ModelNotFoundError
    from edgellm.loading.gguf import read_gguf
    from edgellm.loading.resolve import resolve_model

    try:
        path = resolve_model(name).path
    except ModelNotFoundError:
        return None
    return read_gguf(path).metadata.get("tokenizer.chat_template") or ""


def test_tool_models_are_the_registry_models_whose_template_renders_tools():
    """TOOL_MODELS (named in the refusal) against the templates of the registry's models that are
    installed; a template whose text merely says "tools" does not count."""
    from edgellm.loading.resolve import REGISTRY

    seen = 0
    for name in REGISTRY:
        template = registry_template(name)
        if template is not None:
            assert template_reads_tools(template) == (name in TOOL_MODELS), name
            seen += 1
    assert registry_template("smollm2-135m") is not None and seen >= 1
    assert not template_reads_tools("{% for m in messages %}Tools: none. {{ m.content }}{% endfor %}")
    assert template_reads_tools("{% if tools %}{{ tools | tojson }}{% endif %}")


def test_bad_tool_requests_are_400(tool_http):
    http = tool_http
    base = {"model": MODEL, "messages": user("hi"), "max_tokens": 4}
    cases = [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
          "tool_choice": "required"}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
    ]
    for extra, param in cases:
        assert_error(http.post("/v1/chat/completions", json={**base, **extra}), 400, param=param)


def test_tool_call_parser_across_chunk_boundaries():
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n' \
           '{"name": "g", "arguments": {}}\n</tool_call>'
    for size in (1, 3, 7, len(text)):
        p = ToolCallParser()
        content = ""
        for i in range(0, len(text), size):
            content += p.feed(text[i:i + size])[0]
        rest, more = p.finish()
        content += rest
        assert content.strip() == "Let me check." and more == []
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in p.calls] == \
            [("f", {"x": 1}), ("g", {})]
    # not a call: given back as text; a cut-off block: text too
    assert split_output("a <tool_call>oops</tool_call> b") == ("a <tool_call>oops</tool_call> b", [])
    assert split_output('x <tool_call>\n{"name": "f"') == ('x <tool_call>\n{"name": "f"', [])
    assert split_output("1 < 2 <tool") == ("1 < 2 <tool", [])
    # a call written as bare JSON (Qwen2.5-Coder-0.5B's habit) counts only for a tool of the request
    bare = '{"name": "f", "arguments": {"x": 2}}'
    content, calls = split_output(bare, {"f"})
    assert content == "" and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("f", {"x": 2})]
    assert split_output(bare, {"g"}) == (bare, [])
    assert split_output(bare) == (bare, [])
    assert len(split_output(bare + "\n" + bare, {"f"})[1]) == 2
    assert split_output('{"a": 1} and more', {"f"}) == ('{"a": 1} and more', [])
    p = ToolCallParser(frozenset({"f"}))
    assert p.feed("  ") == ("", []) and p.feed(bare[:9]) == ("", []) and p.feed(bare[9:]) == ("", [])
    rest, calls = p.finish()
    assert rest == "" and calls[0]["function"]["name"] == "f"
    p = ToolCallParser(frozenset({"f"}))
    assert p.feed("Hello") == ("Hello", [])          # not a bare call: streams at once


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------
def test_embeddings_shape_determinism_and_transformers_parity(client, llm, smollm2_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "The quick brown fox jumps over the lazy dog.",
             "Quantum chromodynamics describes the strong force."]
    r = client.embeddings.create(model=MODEL, input=texts)      # the client asks for base64 and decodes it
    assert [d.index for d in r.data] == [0, 1, 2]
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, llm.cfg.hidden_size)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vecs[0], vecs[1])                       # identical inputs, identical vectors
    assert vecs[0] @ vecs[2] < 0.999
    ids = [llm.tokenizer.encode(t) for t in texts]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    again = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    assert np.array_equal(np.array(again.data[0].embedding), vecs[0])     # deterministic, float == base64
    by_ids = client.embeddings.create(model=MODEL, input=ids[2], encoding_format="float")
    assert np.allclose(by_ids.data[0].embedding, vecs[2], atol=1e-6)

    # Independently: transformers' final hidden states of the same GGUF, mean-pooled, normalised.
    transformers = pytest.importorskip("transformers")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                                  dtype=torch.float32)
    for text, vec in ((texts[0], vecs[0]), (texts[2], vecs[2])):
        with torch.no_grad():
            out = ref_model(torch.tensor([llm.tokenizer.encode(text)]), output_hidden_states=True)
        ref = torch.nn.functional.normalize(out.hidden_states[-1][0].mean(0), dim=0).numpy()
        assert np.abs(ref - vec).max() < 1e-3


def test_embeddings_errors(http):
    cases = [({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [[]]}, "input"),
             ({"input": 5}, "input"), ({"input": [10 ** 9]}, "input"), ({"input": "x", "encoding_format": "hex"},
                                                                         "encoding_format"),
             ({"input": "x", "dimensions": 3}, "dimensions"), ({"input": "x", "model": "gpt-4"}, "model")]
    for body, param in cases:
        body = {"model": MODEL, **body}
        assert_error(http.post("/v1/embeddings", json=body), 404 if param == "model" else 400, param=param)


# ---------------------------------------------------------------------------------------------
# Metrics with vLLM's names
# ---------------------------------------------------------------------------------------------
def test_vllm_metric_names(client, http):
    label = f'model_name="{MODEL}"'
    before = http.get("/metrics").text
    r = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=5, temperature=0)
    after = http.get("/metrics").text
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:e2e_request_latency_seconds_count",
                 "vllm:time_to_first_token_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:request_prompt_tokens_count"):
        was = metric(before, name, label) if f"{name}{{{label}}}" in before else 0.0
        assert metric(after, name, label) > was, name
    assert metric(after, "vllm:generation_tokens_total", label) - metric(before, "vllm:generation_tokens_total", label) \
        == r.usage.completion_tokens
    assert metric(after, "vllm:prompt_tokens_total", label) - metric(before, "vllm:prompt_tokens_total", label) \
        == r.usage.prompt_tokens
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                  "vllm:num_preemptions_total"):
        assert 0 <= metric(after, gauge, label) <= (1 if "perc" in gauge else 10 ** 6)
    assert metric(after, "process_resident_memory_bytes") > 50e6
    assert metric(after, "edgellm_steps_total") > metric(before, "edgellm_steps_total")
    # the existing edgellm_ names are still there
    assert metric(after, "edgellm_generation_tokens_total") >= metric(after, "vllm:generation_tokens_total", label)
