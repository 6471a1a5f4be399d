"""The OpenAI wire format: request validation and response shaping, with no I/O.

Requests arrive as parsed JSON objects. :func:`parse_chat` and :func:`parse_completion` check
every field against what OpenAI's API accepts -- type, range, and whether this server supports it
-- and turn the body into a :class:`GenerationSpec`; anything wrong raises :class:`ApiError` with
the HTTP status, OpenAI's error ``type``/``code`` and the offending ``param``, so the server
answers 4xx and never 500 for bad input.

Fields fall in four groups:

* supported: ``model``, ``messages``/``prompt``, ``max_tokens``, ``max_completion_tokens``,
  ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``presence_penalty``,
  ``frequency_penalty``, ``logprobs``, ``top_logprobs``, ``stream``, ``stream_options``, ``logit_bias``;
* extensions (as vLLM names them): ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``;
* accepted and ignored (they change nothing in the output): ``user``, ``metadata``, ``store``,
  ``service_tier``, ``parallel_tool_calls``;
* structured output and tools: ``response_format`` (``text``, ``json_object``, ``json_schema``),
  vLLM's ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar`` (one constraint
  per request, compiled into a :class:`~edgellm.grammar.Grammar`), and on chat ``tools``,
  ``tool_choice``, ``parallel_tool_calls`` (see :mod:`edgellm.serve.tools`);
* OpenAI features this server does not implement (``audio``, ``prediction``, ...): refused with
  400 unless given their neutral value;
* anything else: ignored, as vLLM does; :func:`check_fields` returns those names, and the server
  lists them in an ``x-edgellm-ignored-fields`` response header and its log. A known field of the
  wrong type or value is still refused.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import time
import uuid
from dataclasses import dataclass, field

from edgellm.errors import EdgeLLMError
from edgellm.grammar import Grammar
from edgellm.sampling import (
    MAX_INT,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_REPETITION_PENALTY,
    MAX_STOP_LENGTH,
    MIN_REPETITION_PENALTY,
)
from edgellm.serve.tools import ToolSpec, parse_tools

MAX_N = 16                  # completions per request
MAX_STOP = 4                # stop strings, as OpenAI allows
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
MAX_PROMPTS = 64            # prompts in one /v1/completions batch

IGNORED = {"user", "metadata", "store", "service_tier"}
# field -> its neutral value(s): given anything else, the request asks for a feature we lack.
UNSUPPORTED_CHAT = {"functions": ([], None),
                    "function_call": ("none", None), "audio": (None,),
                    "modalities": (["text"], None), "prediction": (None,), "reasoning_effort": (None,),
                    "web_search_options": (None,)}
UNSUPPORTED_COMPLETION = {"suffix": (None, ""), "echo": (False, None),
                          "best_of": (1, None)}

CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
               "stop", "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "stream",
               "stream_options", "top_k", "min_p", "repetition_penalty", "ignore_eos", "logit_bias",
               "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "tools",
               "tool_choice", "parallel_tool_calls"}
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                     "presence_penalty", "frequency_penalty", "logprobs", "stream", "stream_options", "top_k",
                     "min_p", "repetition_penalty", "ignore_eos", "logit_bias", "response_format", "guided_json",
                     "guided_regex", "guided_choice", "guided_grammar"}
ROLES = {"system", "developer", "user", "assistant", "tool"}
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------
# Field readers
# ---------------------------------------------------------------------------------------------
def is_int(v) -> bool:
    """A JSON integer (not a boolean)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def type_name(v) -> str:
    """A JSON value's type as an error message names it."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


def get_int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():   # 16.0 is a fine max_tokens in JSON
        v = int(v)
    if not is_int(v):
        raise invalid(name, f"'{name}' must be an integer, got {type_name(v)} {v!r}", "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"between {lo} and {hi}")
        raise invalid(name, f"'{name}' must be {rng}, got {v}")
    return int(v)


def get_num(body: dict, name: str, default, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v) or not math.isfinite(float(v)):
        raise invalid(name, f"'{name}' must be a finite number, got {type_name(v)} {v!r}", "invalid_type")
    v = float(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise invalid(name, f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise invalid(name, f"'{name}' must be <= {hi}, got {v}")
    return v


def get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(name, f"'{name}' must be true or false, got {type_name(v)} {v!r}", "invalid_type")
    return v


def check_fields(body: dict, allowed: set[str], unsupported: dict[str, tuple]) -> list[str]:
    """The names of the fields this server does not know, which it ignores (as vLLM does: the
    server says so in a response header and its log). A known feature it lacks, asked for with
    other than its neutral value, is refused with 400."""
    unknown = []
    for name, value in body.items():
        if name in allowed or name in IGNORED:
            continue
        if name in unsupported:
            if value in unsupported[name]:
                continue
            raise invalid(name, f"'{name}' is not supported by this server (edgellm)", "unsupported_parameter")
        unknown.append(name)
    return unknown


def get_model(body: dict, served: set[str]) -> str:
    model = body.get("model")
    if model is None:
        raise invalid("model", "'model' is required: name the model to use (see GET /v1/models)", "missing_required_parameter")
    if not isinstance(model, str):
        raise invalid("model", f"'model' must be a string, got {type_name(model)}", "invalid_type")
    if model not in served:
        raise ApiError(404, f"The model '{model}' does not exist on this server; it serves "
                            f"{', '.join(sorted(served))} (see GET /v1/models)", "model", "model_not_found")
    return model


def get_stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise invalid("stop", "'stop' must be a string or an array of strings", "invalid_type")
    if len(v) > MAX_STOP:
        raise invalid("stop", f"'stop' may hold at most {MAX_STOP} strings, got {len(v)}")
    if any(s == "" for s in v):
        raise invalid("stop", "'stop' strings must not be empty")
    if sum(len(s) for s in v) > MAX_STOP_LENGTH:
        raise invalid("stop", f"'stop' strings may total at most {MAX_STOP_LENGTH} characters, got "
                              f"{sum(len(s) for s in v)}; use shorter stop strings")
    return v


def get_logit_bias(body: dict, vocab_size: int | None) -> dict[int, float]:
    """OpenAI's ``logit_bias``: an object of token id (a string of digits) -> bias in [-100, 100]."""
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise invalid("logit_bias", f"'logit_bias' must be an object mapping token ids to biases, got "
                                    f"{type_name(v)}", "invalid_type")
    if len(v) > MAX_LOGIT_BIAS_ENTRIES:
        raise invalid("logit_bias", f"'logit_bias' may bias at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(v)}")
    out = {}
    for key, bias in v.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
            raise invalid("logit_bias", f"'logit_bias' keys must be token ids such as \"50256\", got {key[:40]!r}")
        tid = int(key)
        if vocab_size is not None and tid >= vocab_size:
            raise invalid("logit_bias", f"'logit_bias' names token {tid}, outside the vocabulary (0..{vocab_size - 1}); "
                                        "use ids from this model's tokenizer (POST /tokenize)")
        if not _is_num(bias) or not math.isfinite(float(bias)):
            raise invalid("logit_bias", f"'logit_bias' values must be numbers, got {type_name(bias)} for token "
                                        f"{tid}", "invalid_type")
        if not -MAX_LOGIT_BIAS <= float(bias) <= MAX_LOGIT_BIAS:
            raise invalid("logit_bias", f"'logit_bias' values must be between -{MAX_LOGIT_BIAS:g} and "
                                        f"{MAX_LOGIT_BIAS:g}, got {bias} for token {tid}")
        out[tid] = float(bias)
    return out


def get_stream_options(body: dict, stream: bool) -> bool:
    """Whether the stream ends with a usage chunk."""
    v = body.get("stream_options")
    if v is None:
        return False
    if not stream:
        raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true")
    if not isinstance(v, dict):
        raise invalid("stream_options", f"'stream_options' must be an object, got {type_name(v)}", "invalid_type")
    for k in v:
        if k not in ("include_usage", "continuous_usage_stats", "include_obfuscation"):
            raise invalid("stream_options", f"Unrecognized stream option: '{k}'", "unknown_parameter")
    return get_bool(v, "include_usage", False) if "include_usage" in v else False


# ---------------------------------------------------------------------------------------------
# What to generate
# ---------------------------------------------------------------------------------------------
@dataclass
class GenerationSpec:
    """A validated request: the prompts (chat messages or text/token ids), sampling and output options."""

    kind: str                               # "chat" or "completion"
    model: str
    prompts: list                           # chat: one list of messages; completion: str or list[int] each
    max_tokens: int | None
    sampling: dict = field(default_factory=dict)   # SamplingParams keyword arguments (no max_tokens)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    ignored: list[str] = field(default_factory=list)   # unknown fields of the request, ignored
    tools: ToolSpec | None = None           # chat with tools: how to render and parse them
    constraint_param: str | None = None     # the field that asked for a grammar (for a 400 naming it)


def sampling_fields(body: dict, vocab_size: int | None = None) -> dict:
    return dict(
        temperature=get_num(body, "temperature", 1.0, 0.0, 2.0),
        top_p=get_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=get_int(body, "top_k", 0, 0, MAX_INT) if body.get("top_k") != -1 else 0,   # vLLM's -1 = off
        min_p=get_num(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=get_num(body, "repetition_penalty", 1.0, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
        presence_penalty=get_num(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=get_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=get_int(body, "seed", None, -(2 ** 63), 2 ** 64 - 1),
        stop=get_stop(body),
        ignore_eos=get_bool(body, "ignore_eos", False),
        logit_bias=get_logit_bias(body, vocab_size),
    )


def grammar_or_400(param: str, build, value) -> Grammar:
    try:
        return build(value)
    except EdgeLLMError as err:
        raise invalid(param, f"'{param}': {err.problem}" + (f"; {err.fix}" if err.fix else "")) from None


def get_constraint(body: dict) -> tuple[Grammar | None, str | None]:
    """The grammar the output must match, and the field that asked for it: OpenAI's
    ``response_format`` or one of vLLM's ``guided_*`` fields (at most one of them)."""
    asked = [k for k in ("response_format", *GUIDED) if body.get(k) is not None
             and not (k == "response_format" and body[k] == {"type": "text"})]
    if len(asked) > 1:
        raise invalid(asked[1], f"give at most one output constraint, got {' and '.join(repr(a) for a in asked)}")
    if not asked:         # none, or response_format {"type": "text"}
        return None, None
    name = asked[0]
    v = body[name]
    if name == "response_format":
        if not isinstance(v, dict):
            raise invalid(name, f"'response_format' must be an object such as {{\"type\": \"json_object\"}}, got "
                                f"{type_name(v)}", "invalid_type")
        kind = v.get("type")
        if kind == "json_object":
            return Grammar.json_object(), name
        if kind != "json_schema":
            raise invalid("response_format.type", "'response_format.type' must be \"text\", \"json_object\" or "
                                                  f"\"json_schema\", got {kind!r}")
        js = v.get("json_schema")
        if not isinstance(js, dict):
            raise invalid("response_format.json_schema", "'response_format' of type json_schema needs "
                          "'json_schema': {\"name\": ..., \"schema\": {...}, \"strict\": true}",
                          "missing_required_parameter" if js is None else "invalid_type")
        jname = js.get("name")
        if not isinstance(jname, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", jname):
            raise invalid("response_format.json_schema.name", "'json_schema.name' must be 1-64 letters, digits, "
                                                              f"'_' or '-', got {jname!r}")
        if "strict" in js and not isinstance(js["strict"], (bool, type(None))):
            raise invalid("response_format.json_schema.strict", "'json_schema.strict' must be true or false",
                          "invalid_type")
        schema = js.get("schema", {})        # OpenAI: absent means any JSON object
        if not isinstance(schema, (dict, bool)):
            raise invalid("response_format.json_schema.schema", "'json_schema.schema' must be a JSON schema object, "
                          f"got {type_name(schema)}", "invalid_type")
        return grammar_or_400("response_format.json_schema.schema", Grammar.json_schema, schema), name
    if name == "guided_json":
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError as err:
                raise invalid(name, f"'guided_json' is a string that is not JSON ({err})") from None
        return grammar_or_400(name, Grammar.json_schema, v), name
    if name == "guided_regex":
        return grammar_or_400(name, Grammar.regex, v), name
    if name == "guided_choice":
        return grammar_or_400(name, Grammar.choice, v), name
    return grammar_or_400(name, Grammar.lark, v), name


def _message_text(i: int, content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type_name(part)
                raise invalid(f"messages[{i}].content[{j}]",
                              f"only text content parts are supported, got {kind!r}: this model reads text only")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{i}].content", f"a message's content must be a string or an array of text parts, "
                                             f"got {type_name(content)}", "invalid_type")


def parse_messages(v) -> list[dict]:
    if v is None:
        raise invalid("messages", "'messages' is required: a non-empty array of {role, content} objects",
                      "missing_required_parameter")
    if not isinstance(v, list):
        raise invalid("messages", f"'messages' must be an array, got {type_name(v)}", "invalid_type")
    if not v:
        raise invalid("messages", "'messages' must not be empty: give at least one user message")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", f"each message must be an object, got {type_name(m)}", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role", f"role must be one of {sorted(ROLES)}, got {role!r}")
        for k in m:
            if k not in ("role", "content", "name", "tool_calls", "tool_call_id", "refusal"):
                raise invalid(f"messages[{i}].{k}", f"message field '{k}' is not supported by this server")
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise invalid(f"messages[{i}].tool_calls", "only assistant messages carry 'tool_calls'")
        if calls:
            msg = {"role": "assistant", "content": _message_text(i, m["content"]) if m.get("content") else "",
                   "tool_calls": parse_history_calls(i, calls)}
            out.append(msg)
            continue
        if "content" not in m or m["content"] is None:
            raise invalid(f"messages[{i}].content", "a message needs 'content'", "missing_required_parameter")
        msg = {"role": "system" if role == "developer" else role, "content": _message_text(i, m["content"])}
        if role == "tool":
            tid = m.get("tool_call_id")
            if tid is not None and not isinstance(tid, str):
                raise invalid(f"messages[{i}].tool_call_id", "'tool_call_id' must be a string", "invalid_type")
            if tid:
                msg["tool_call_id"] = tid
        out.append(msg)
    return out


def parse_history_calls(i: int, calls) -> list[dict]:
    """An assistant message's ``tool_calls``, with each call's ``arguments`` (OpenAI sends a JSON
    string) parsed into an object, as chat templates read them."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise invalid(where, "'tool_calls' must be an array", "invalid_type")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise invalid(f"{where}[{j}]", 'a tool call must be {"id", "type": "function", "function": {"name", '
                                           '"arguments"}}')
        args = f.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise invalid(f"{where}[{j}].function.arguments", "'arguments' must be a JSON object "
                                                                   "(as a string)") from None
        out.append({"id": c.get("id") if isinstance(c.get("id"), str) else "", "type": "function",
                    "function": {"name": f["name"], "arguments": args}})
    return out


def parse_chat(body: dict, served: set[str], vocab_size: int | None = None) -> GenerationSpec:
    ignored = check_fields(body, CHAT_FIELDS, UNSUPPORTED_CHAT)
    model = get_model(body, served)
    messages = parse_messages(body.get("messages"))
    max_tokens = get_int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", None, 1)
    stream = get_bool(body, "stream", False)
    logprobs = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS_CHAT)
    if top and not logprobs:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    sampling = sampling_fields(body, vocab_size)
    tools = parse_tools(body, invalid)
    grammar, param = get_constraint(body)
    forced = tools.grammar() if tools is not None else None
    if forced is not None:
        if grammar is not None:
            raise invalid(param, f"'{param}' cannot be combined with tool_choice \"{tools.choice}\", which already "
                                 "constrains the output to tool calls; drop one of them")
        grammar, param = forced, "tools"
    if grammar is not None:
        if sampling["ignore_eos"]:
            raise invalid("ignore_eos", f"'ignore_eos' cannot be combined with '{param}': a complete output must end")
        sampling["grammar"] = grammar
    return GenerationSpec("chat", model, [messages], max_tokens, sampling,
                          n=get_int(body, "n", 1, 1, MAX_N), stream=stream,
                          include_usage=get_stream_options(body, stream), logprobs=logprobs, top_logprobs=top,
                          ignored=ignored, tools=tools, constraint_param=param)


def parse_prompts(v) -> list:
    """``prompt``: a string, an array of strings, an array of token ids, or an array of such arrays."""
    if v is None:
        raise invalid("prompt", "'prompt' is required", "missing_required_parameter")
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(isinstance(p, str) for p in v):
            prompts = list(v)
        elif all(is_int(t) for t in v):
            prompts = [[int(t) for t in v]]
        elif all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in v):
            prompts = [[int(t) for t in p] for p in v]
        else:
            raise invalid("prompt", "'prompt' must be a string, an array of strings, an array of token ids, "
                                    "or an array of token-id arrays", "invalid_type")
        if len(prompts) > MAX_PROMPTS:
            raise invalid("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        return prompts
    if isinstance(v, list):
        raise invalid("prompt", "'prompt' must not be empty")
    raise invalid("prompt", f"'prompt' must be a string or an array, got {type_name(v)}", "invalid_type")


def parse_completion(body: dict, served: set[str], vocab_size: int | None = None) -> GenerationSpec:
    ignored = check_fields(body, COMPLETION_FIELDS, UNSUPPORTED_COMPLETION)
    model = get_model(body, served)
    prompts = parse_prompts(body.get("prompt"))
    stream = get_bool(body, "stream", False)
    top = get_int(body, "logprobs", None, 0, MAX_LOGPROBS_COMPLETION)
    sampling = sampling_fields(body, vocab_size)
    grammar, param = get_constraint(body)
    if grammar is not None:
        if sampling["ignore_eos"]:
            raise invalid("ignore_eos", f"'ignore_eos' cannot be combined with '{param}': a complete output must end")
        sampling["grammar"] = grammar
    return GenerationSpec("completion", model, prompts, get_int(body, "max_tokens", 16, 1), sampling,
                          n=get_int(body, "n", 1, 1, MAX_N), stream=stream,
                          include_usage=get_stream_options(body, stream), logprobs=top is not None,
                          top_logprobs=top or 0, ignored=ignored, constraint_param=param)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


def finish_reason(reason: str) -> str:
    """The engine's finish reason as the API reports it. A request cancelled while its client
    still listens (its session deleted, the server shutting down) reports ``"abort"`` (vLLM's
    name), never a normal ``"stop"``."""
    return FINISH_REASONS.get(reason, reason)


def chat_logprob_entries(token_text, ids: list[int], lps: list[float], tops: list) -> list[dict]:
    out = []
    for tid, lp, top in zip(ids, lps, tops):
        t = token_text(tid)
        out.append({"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                    "top_logprobs": [{"token": (a := token_text(i)), "logprob": v, "bytes": list(a.encode("utf-8"))}
                                     for i, v in (top or [])]})
    return out


def completion_logprobs(token_text, ids: list[int], lps: list[float], tops: list, offset0: int = 0) -> dict:
    tokens = [token_text(t) for t in ids]
    offsets, pos = [], offset0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": list(lps),
            "top_logprobs": [{token_text(i): v for i, v in (top or [])} for top in tops],
            "text_offset": offsets}
