"""The ASGI application: OpenAI-compatible endpoints, a sessions API, metrics and a live page,
all over one :class:`~edgellm.runtime.engine.Engine` whose background thread batches every request.

::

    engine = Engine(LLM(), kv_memory="256MB")
    app = create_app(engine, model_id="smollm2-135m", api_key=None, max_queue=256)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Threads. The engine steps in its own thread (started by the app's lifespan). Handlers run on the
asyncio loop: they validate, have each prompt rendered and tokenised once in a worker thread
(after a size check), and ``engine.submit`` the ids (which only enqueues); each request's
``on_event`` callback hops back into the loop with ``call_soon_threadsafe`` onto an
``asyncio.Queue`` that the handler drains, streaming tokens as the engine makes them. Anything
that takes the engine's lock (stats, retiring a session) runs in a worker thread, so the loop
never waits for a step.

Disconnects. Every generation handler watches the connection (``http.disconnect``); when the
client goes away its engine requests are cancelled, which frees their KV blocks at the next step.
Past ``request_timeout`` they are cancelled too and the client gets a 504 (or a stream's error event).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from edgellm.errors import ContextOverflowError, EdgeLLMError, InvalidParameterError
from edgellm.runtime.engine import Engine
from edgellm.runtime.session import RequestHandle
from edgellm.runtime.types import Request, TokenEvent
from edgellm.sampling import SamplingParams
from edgellm.serve import openai_api as oa
from edgellm.serve import tools as tc
from edgellm.serve.metrics import Metrics
from edgellm.serve.openai_api import ApiError, GenerationSpec

log = logging.getLogger("edgellm.serve")

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 1 << 20          # 1 MiB: a full 8k-token conversation is ~40 kB of JSON
RETRY_AFTER_S = 1
DEFAULT_MAX_SESSIONS = 256
DEFAULT_REQUEST_TIMEOUT = 600.0     # seconds from a generation's submission to its last token
DEFAULT_BODY_TIMEOUT = 30.0         # seconds to send a request body
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
PARAM_OF = {"the messages": "messages", "the prompt": "prompt", "the conversation": "content",
            "the system prompt": "system"}


@dataclass
class Choice:
    """One engine request of an HTTP request, and what it streamed so far."""

    index: int
    prompt_index: int
    handle: RequestHandle | None = None
    result: Any = None              # TurnResult once finished
    sent_chars: int = 0             # completions' text_offset


@dataclass
class Batch:
    """The engine requests of one HTTP request, their event queue, and their cancellation."""

    choices: list[Choice]
    queue: asyncio.Queue
    prompt_tokens: list[int] = field(default_factory=list)   # per prompt

    def cancel(self) -> None:
        for c in self.choices:
            if c.handle is not None and c.result is None:
                c.handle.cancel()

    @property
    def finished(self) -> bool:
        return all(c.result is not None for c in self.choices)


class ServerState:
    """What the handlers share: the engine, the served names, limits, sessions, metrics."""

    def __init__(self, engine: Engine, model_id: str, aliases: tuple[str, ...], api_keys: tuple[str, ...],
                 max_queue: int, max_body: int, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 metrics_public: bool = False, request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                 body_timeout: float | None = DEFAULT_BODY_TIMEOUT):
        self.engine = engine
        self.model_id = model_id
        self.served = {model_id, *aliases}
        self.api_keys = tuple(k.encode("utf-8", "surrogateescape") for k in api_keys)   # empty: no authentication
        self.max_queue = max_queue
        self.max_body = max_body
        self.max_sessions = max_sessions
        self.metrics_public = metrics_public or not api_keys
        self.request_timeout = request_timeout      # None: no limit
        self.body_timeout = body_timeout
        # No token is longer than this many bytes (so than this many characters): a prompt with more
        # characters than the context's tokens could hold is refused before it is rendered or tokenised.
        tok = engine.tokenizer
        self.max_token_bytes = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
        self.max_prompt_chars = self.max_token_bytes * engine.cfg.context_length
        self.in_flight = 0          # engine requests submitted and not finished (loop thread only)
        self.sessions: dict[str, Any] = {}         # API id -> engine Session
        self.session_defaults: dict[str, dict] = {}  # API id -> its sampling defaults
        self.session_owner: dict[str, str | None] = {}  # API id -> who created it (a key's fingerprint)
        self.metrics = Metrics(engine, lambda: self.in_flight, model_id)
        self.embedding_lock = asyncio.Lock()
        self.started = int(time.time())

    @functools.lru_cache(maxsize=65536)   # noqa: B019 -- one ServerState per server, alive as long as it
    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    # ---- admission -----------------------------------------------------------------------------
    def reserve(self, count: int) -> None:
        if not self.engine.running_in_background:
            raise ApiError(503, "the engine is not running (the server is starting or shutting down)",
                           code="engine_unavailable", type="server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if count > self.max_queue:
            raise ApiError(400, f"this request asks for {count} completions, more than the server ever runs at once "
                                f"({self.max_queue}, --max-queue); lower n or send fewer prompts", param="n")
        if self.in_flight + count > self.max_queue:
            raise ApiError(429, f"the server is at capacity: {self.in_flight} requests in flight, at most "
                                f"{self.max_queue} (--max-queue); retry shortly", code="rate_limit_exceeded",
                           type="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += count

    def budget(self, n_prompt: int, max_tokens: int | None, what: str) -> int:
        """``max_tokens`` for a prompt of ``n_prompt`` tokens (the engine's admission rule, strict as
        OpenAI's API is: asking for more than fits is refused), or a 400 naming the field."""
        try:
            return self.engine.input.budget(n_prompt, max_tokens, strict=True, what=what)
        except ContextOverflowError as err:
            raise ApiError(400, api_message(err), param=PARAM_OF[what], code="context_length_exceeded") from None
        except EdgeLLMError as err:
            raise oa.invalid(PARAM_OF[what], api_message(err)) from None

    def check_prompt_chars(self, chars: int, what: str) -> None:
        """Refuse, without tokenising, a prompt of more characters than the context can hold."""
        if chars > self.max_prompt_chars:
            ctx = self.engine.cfg.context_length
            raise ApiError(400, f"{what} has {chars} characters, more than the model's context window of {ctx} "
                                f"tokens can hold (no token of this model is longer than {self.max_token_bytes} "
                                f"bytes, so at most {self.max_prompt_chars} characters fit); shorten it",
                           param=PARAM_OF[what], code="context_length_exceeded")

    async def encode(self, prompt, what: str, tools: tc.ToolSpec | None = None) -> list[int]:
        """Token ids of ``prompt`` (text, token ids or chat messages), rendered and tokenised in a
        worker thread so the event loop keeps serving other requests and streams meanwhile.
        Chat messages with ``tools`` (or tool turns in their history) are rendered as
        :func:`edgellm.serve.tools.render_messages` says."""
        if isinstance(prompt, str):
            chars = len(prompt)
        elif prompt and isinstance(prompt[0], dict):
            chars = sum(len(m["content"]) for m in prompt if isinstance(m.get("content"), str))
            chars += sum(len(json.dumps(m["tool_calls"])) for m in prompt if m.get("tool_calls"))
            chars += len(json.dumps(tools.tools)) if tools is not None else 0
            if tools is not None or any(m.get("tool_calls") or m["role"] == "tool" for m in prompt):
                self.check_prompt_chars(chars, what)
                return await asyncio.to_thread(self.encode_with_tools, prompt, tools)
        else:
            chars = 0                     # token ids: budget() checks their count
        self.check_prompt_chars(chars, what)
        return await asyncio.to_thread(self.engine.input.encode, prompt)

    def encode_with_tools(self, messages: list[dict], tools: tc.ToolSpec | None) -> list[int]:
        tok = self.engine.tokenizer
        msgs, extra = tc.render_messages(messages, tools, self.template_has_tools)
        return tok.encode_chat(msgs, add_generation_prompt=True, **extra)

    @functools.cached_property
    def template_has_tools(self) -> bool:
        """Whether the model's own chat template renders tools (Qwen2.5's does, SmolLM2's does not)."""
        tok = self.engine.tokenizer
        return tok.has_chat_template and tc.template_reads_tools(tok.chat_template)

    async def compile_grammar(self, spec: GenerationSpec) -> None:
        await self.compile(spec.sampling.get("grammar"), spec.constraint_param)

    async def compile(self, grammar, param: str | None) -> None:
        """``grammar`` compiled (in a worker thread: a large schema takes milliseconds), or a 400
        naming the field that asked for it, with the compiler's message."""
        if grammar is None:
            return
        try:
            await asyncio.to_thread(self.engine.input.grammars.compile, grammar)
        except EdgeLLMError as err:
            raise oa.invalid(param, api_message(err)) from None

    # ---- submission ----------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], n: int, params: SamplingParams, session=None,
               new_messages=None) -> Batch:
        """Submit ``n`` engine requests per prompt; their events land on the batch's queue."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        batch = Batch([Choice(p * n + i, p) for p in range(len(prompts)) for i in range(n)], q,
                      [len(ids) for ids in prompts])
        self.reserve(len(batch.choices))
        submitted = 0
        try:
            for c in batch.choices:
                cb = functools.partial(self._on_event, loop, q, c.index)
                if session is not None:     # the conversation's ids, encoded once by the caller
                    c.handle = submit_turn(self.engine, session, prompts[c.prompt_index], new_messages,
                                           params, cb)
                else:
                    c.handle = self.engine.submit(Request(prompt=prompts[c.prompt_index], params=params,
                                                          sample_index=c.index % n, on_event=cb))
                submitted += 1
        except BaseException:
            self.in_flight -= len(batch.choices) - submitted
            batch.cancel()
            raise
        return batch

    def _on_event(self, loop, q: asyncio.Queue, index: int, ev: TokenEvent) -> None:
        # engine thread: hand over to the loop
        loop.call_soon_threadsafe(self._deliver, q, index, ev)

    def _deliver(self, q: asyncio.Queue, index: int, ev: TokenEvent) -> None:
        if ev.finished:
            if ev.result is not None:
                self.metrics.observe(ev.result)
            self.in_flight -= 1
        q.put_nowait((index, ev))


def submit_turn(engine: Engine, session, ids: list[int], new_messages: list[dict], params: SamplingParams,
                on_event) -> RequestHandle:
    """A session's next turn from its conversation's token ids (what ``Session.send_messages``
    does from the messages, without encoding them a second time)."""
    session.begin_turn()
    try:
        return engine.submit(Request(prompt=ids, params=params, chat=True, session=session,
                                     new_messages=list(new_messages), on_event=on_event))
    except BaseException:
        session.end_turn()
        raise


# ---------------------------------------------------------------------------------------------
# Plumbing: errors, bodies, auth, SSE
# ---------------------------------------------------------------------------------------------
def api_message(err: EdgeLLMError) -> str:
    """An engine error as one line of an API error message: the problem, then the fix."""
    return f"{err.problem}. Fix: {err.fix}." if err.fix else err.problem


def printable(text: str) -> str:
    """``text`` with lone UTF-16 surrogates (which UTF-8 cannot carry) written as ``\\udxxx``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(err: ApiError) -> JSONResponse:
    body = err.body()
    body["error"] = {k: printable(v) if isinstance(v, str) else v for k, v in body["error"].items()}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) of parsed JSON that holds a lone surrogate, or None."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return v
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


JSON_TYPES = ("application/json",)


def check_json_content_type(request: HttpRequest) -> None:
    """A body must be declared JSON: browsers send text/plain or form bodies cross-site without a
    preflight, so accepting them would let any web page drive a server on localhost."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise ApiError(415, f"the request body must be sent as 'Content-Type: application/json', got "
                            f"{ctype or 'no content type'!r}", code="unsupported_media_type")


async def read_body(request: HttpRequest, max_body: int, timeout: float | None) -> bytes:
    """The raw body (Content-Length or chunked alike), at most ``max_body`` bytes (413), sent
    within ``timeout`` seconds (408: a client that trickles its body cannot hold a connection)."""
    too_big = ApiError(413, f"the request body is larger than this server accepts ({max_body} bytes)",
                       code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise too_big
    data = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            data.extend(chunk)
            if len(data) > max_body:
                raise too_big
    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} seconds (--body-timeout); "
                            "send the whole body at once", code="request_timeout",
                       headers={"Connection": "close"}) from None
    return bytes(data)


async def read_json(request: HttpRequest, max_body: int, timeout: float | None = DEFAULT_BODY_TIMEOUT,
                    allow_empty: bool = False) -> dict:
    """The body as a JSON object; ``allow_empty``: no body at all reads as ``{}``."""
    data = await read_body(request, max_body, timeout)
    if not data and allow_empty:
        return {}
    if not data:
        raise ApiError(400, "the request has no body: send a JSON object", code="invalid_json")
    check_json_content_type(request)
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {oa.type_name(body)}", code="invalid_json")
    bad = lone_surrogate(body)
    if bad is not None:
        raise ApiError(400, f"the request body holds a lone UTF-16 surrogate escape (in {printable(bad)[:80]!r}), "
                            "which is not text; send valid Unicode", code="invalid_json")
    return body


IGNORED_HEADER = "x-edgellm-ignored-fields"
MAX_IGNORED_LISTED = 32


def header_safe(name: str) -> str:
    """A field name as a header value can carry it: printable ASCII, commas and spaces replaced."""
    return "".join(c if c.isascii() and c.isprintable() and c not in ", " else "?" for c in name[:64])


def note_ignored(request: HttpRequest, names: list[str]) -> None:
    """Fields of the request the server does not know and ignores (vLLM's behaviour): listed in
    the response's ``x-edgellm-ignored-fields`` header (set by :func:`endpoint`) and logged."""
    if not names:
        return
    request.state.ignored_fields = names
    log.warning("%s %s: ignoring unknown request fields %s", request.method, request.url.path,
                ", ".join(repr(n[:64]) for n in names[:MAX_IGNORED_LISTED]))


def check_auth(state: ServerState, request: HttpRequest) -> str | None:
    """Who is calling: the fingerprint of the API key the request carries (None when the server
    has no key). Raises 401 without a valid key."""
    if not state.api_keys:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode("utf-8", "surrogateescape")
    # Compare with every key (no early exit), so the time taken does not say which one matched.
    matched = [hmac.compare_digest(given, k) for k in state.api_keys]
    if scheme.lower() != "bearer" or not any(matched):
        raise ApiError(401, "Incorrect or missing API key: send the server's key as 'Authorization: Bearer KEY'"
                       if header else "Missing API key: send 'Authorization: Bearer KEY' (the server's --api-key)",
                       code="invalid_api_key")
    return hashlib.sha256(state.api_keys[matched.index(True)]).hexdigest()[:16]


def check_api_keys(api_key: str | Sequence[str] | None) -> tuple[str, ...]:
    """The server's API keys, refused when empty or padded with whitespace (a client never sends
    the padding, so such a key would never match)."""
    keys = (api_key,) if isinstance(api_key, str) else tuple(api_key or ())
    for k in keys:
        if not isinstance(k, str) or not k.strip():
            raise InvalidParameterError("an API key is empty", "pass a non-empty key, or leave --api-key out")
        if k != k.strip():
            raise InvalidParameterError(f"the API key {k.strip()[:4]!r}... starts or ends with whitespace, so no "
                                        "client's 'Authorization: Bearer KEY' header could match it",
                                        "remove the whitespace from --api-key / $EDGELLM_API_KEY")
    return keys


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class EventStream:
    """A server-sent-events response that cancels its engine requests when the client disconnects."""

    def __init__(self, chunks: AsyncIterator[bytes], batch: Batch):
        self.chunks = chunks
        self.batch = batch
        self.headers: dict[str, str] = {}       # more response headers

    async def __call__(self, scope, receive, send) -> None:
        async def watch():
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    self.batch.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                                    *((k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items())]})
            async for chunk in self.chunks:
                if watcher.done():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not watcher.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:             # the socket went away mid-send
            pass
        finally:
            watcher.cancel()
            self.batch.cancel()
            with contextlib.suppress(Exception):
                await self.chunks.aclose()


async def next_event(batch: Batch, watcher: asyncio.Future | None) -> tuple[int, TokenEvent] | None:
    """The next event of the batch, or None when the client disconnected first."""
    if watcher is None:
        return await batch.queue.get()
    getter = asyncio.ensure_future(batch.queue.get())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return None


async def disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def timed_out(timeout: float) -> ApiError:
    return ApiError(504, f"the request did not finish within {timeout:g} seconds (--request-timeout) and was "
                         "cancelled; lower max_tokens or n, or retry when the server is less busy",
                    code="request_timeout", type="server_error")


async def next_event_by(batch: Batch, deadline: float | None, timeout: float | None,
                        watcher: asyncio.Future | None = None) -> tuple[int, TokenEvent] | None:
    """:func:`next_event`, cancelling the batch and raising a 504 ``ApiError`` after ``deadline``
    (the loop's clock; None: no limit)."""
    if deadline is None:
        return await next_event(batch, watcher)
    left = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(next_event(batch, watcher), max(left, 0.0))
    except asyncio.TimeoutError:
        batch.cancel()
        raise timed_out(timeout) from None


def deadline_of(timeout: float | None) -> float | None:
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


async def collect(batch: Batch, request: HttpRequest, timeout: float | None = None) -> bool:
    """Wait for every choice to finish; False (everything cancelled) if the client went away.
    After ``timeout`` seconds everything is cancelled and a 504 ``ApiError`` raised."""
    watcher = asyncio.ensure_future(disconnected(request.receive))
    deadline = deadline_of(timeout)
    try:
        while not batch.finished:
            item = await next_event_by(batch, deadline, timeout, watcher)
            if item is None:
                batch.cancel()
                return False
            index, ev = item
            if ev.finished:
                if ev.error is not None:
                    raise ev.error
                batch.choices[index].result = ev.result
        return True
    finally:
        watcher.cancel()


# ---------------------------------------------------------------------------------------------
# OpenAI endpoints
# ---------------------------------------------------------------------------------------------
def sampling_params(spec_sampling: dict, max_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, top_logprobs=top_logprobs, **spec_sampling)


async def encode_spec(state: ServerState, spec: GenerationSpec) -> tuple[list[list[int]], int]:
    """Token ids of each prompt (each encoded once, off the loop, whatever ``n``) and the
    ``max_tokens`` they all fit."""
    what = "the messages" if spec.kind == "chat" else "the prompt"
    if spec.kind == "chat":
        prompts = [await state.encode(spec.prompts[0], what, spec.tools)]
    else:
        try:
            prompts = [await state.encode(p, what) for p in spec.prompts]
        except EdgeLLMError as err:
            raise oa.invalid("prompt", api_message(err)) from None
    max_tokens = min(state.budget(len(ids), spec.max_tokens, what) for ids in prompts)
    return prompts, max_tokens


async def generation(state: ServerState, request: HttpRequest, kind: str) -> Response:
    body = await read_json(request, state.max_body, state.body_timeout)
    parse = oa.parse_chat if kind == "chat" else oa.parse_completion
    spec = parse(body, state.served, state.engine.input.vocab_size)
    note_ignored(request, spec.ignored)
    tc.check_tools_supported(spec.tools, state.template_has_tools, state.model_id, oa.invalid)
    await state.compile_grammar(spec)
    prompts, max_tokens = await encode_spec(state, spec)
    params = sampling_params(spec.sampling, max_tokens, spec.logprobs, spec.top_logprobs)
    batch = state.submit(prompts, spec.n, params)
    rid, created = oa.new_id(kind), oa.now_s()
    if spec.stream:
        make = stream_chat if kind == "chat" else stream_completion
        return EventStream(make(state, spec, batch, rid, created), batch)
    try:
        if not await collect(batch, request, state.request_timeout):
            return Response(status_code=499)     # nobody is listening
    except BaseException:
        batch.cancel()
        raise
    shape = chat_response if kind == "chat" else completion_response
    return JSONResponse(shape(state, spec, batch, rid, created))


def batch_usage(batch: Batch) -> dict:
    completion = sum(len(c.result.token_ids) for c in batch.choices)
    firsts = {}
    for c in batch.choices:
        firsts.setdefault(c.prompt_index, c.result)
    cached = sum(r.cached_tokens for r in firsts.values())
    return oa.usage(sum(batch.prompt_tokens), completion, cached)


def _response(spec: GenerationSpec, batch: Batch, rid: str, created: int, kind: str, body) -> dict:
    """The non-streamed response of either endpoint; ``body(result)`` gives a choice's own fields."""
    choices = [{"index": c.index, "finish_reason": oa.finish_reason(c.result.finish_reason), **body(c.result)}
               for c in batch.choices]
    return {"id": rid, "object": kind, "created": created, "model": spec.model,
            "system_fingerprint": "edgellm", "choices": choices, "usage": batch_usage(batch)}


def chat_response(state: ServerState, spec: GenerationSpec, batch: Batch, rid: str, created: int) -> dict:
    def body(r) -> dict:
        lp = None
        if spec.logprobs:
            lp = {"content": oa.chat_logprob_entries(state.token_text, r.token_ids, r.logprobs,
                                                     [t[:spec.top_logprobs] for t in r.top_logprobs])}
        message = {"role": "assistant", "content": r.text}
        finish = {}
        if spec.tools is not None and spec.tools.parse_output:
            content, calls = tc.split_output(r.text, spec.tools.names)
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                if r.finish_reason == "stop":
                    finish = {"finish_reason": "tool_calls"}
        return {"message": message, "logprobs": lp, **finish}
    return _response(spec, batch, rid, created, "chat.completion", body)


def completion_response(state: ServerState, spec: GenerationSpec, batch: Batch, rid: str, created: int) -> dict:
    def body(r) -> dict:
        lp = None
        if spec.logprobs:
            lp = oa.completion_logprobs(state.token_text, r.token_ids, r.logprobs,
                                        [t[:spec.top_logprobs] for t in r.top_logprobs])
        return {"text": r.text, "logprobs": lp}
    return _response(spec, batch, rid, created, "text_completion", body)


def stream_error(err: BaseException) -> bytes:
    if isinstance(err, ApiError):
        return sse(err.body())
    return sse({"error": {"message": f"generation failed: {err}", "type": "server_error", "param": None,
                          "code": "engine_error"}})


async def stream_events(state: ServerState, batch: Batch):
    """The batch's events until every choice finished; after --request-timeout the batch is
    cancelled and a 504 ``ApiError`` raised (the stream then ends with it as an error event)."""
    deadline = deadline_of(state.request_timeout)
    while not batch.finished:
        index, ev = await next_event_by(batch, deadline, state.request_timeout)
        yield index, ev


async def stream_chat(state: ServerState, spec: GenerationSpec, batch: Batch, rid: str, created: int):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": spec.model,
            "system_fingerprint": "edgellm"}
    if spec.include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict, finish=None, logprobs=None) -> bytes:
        return sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish}]})

    # With tools, each choice's text goes through a parser: content streams as it comes, a
    # <tool_call> block is held until it closes and then sent as one tool_calls delta.
    parsers = ({c.index: tc.ToolCallParser(frozenset(spec.tools.names)) for c in batch.choices}
               if spec.tools and spec.tools.parse_output else {})
    for c in batch.choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    try:
        async for index, ev in stream_events(state, batch):
            if ev.error is not None:
                yield stream_error(ev.error)
                batch.cancel()
                return
            lp = None
            if spec.logprobs and ev.token_id is not None and ev.logprob is not None:
                lp = {"content": oa.chat_logprob_entries(state.token_text, [ev.token_id], [ev.logprob],
                                                         [(ev.top_logprobs or [])[:spec.top_logprobs]])}
            text, calls = ev.text, []
            parser = parsers.get(index)
            if parser is not None:
                text, calls = parser.feed(ev.text)
                if ev.finished:
                    rest, more = parser.finish()
                    text, calls = text + rest, calls + more
            if text or lp:
                yield chunk(index, {"content": text}, logprobs=lp)
            for call in calls:
                k = parser.calls.index(call)
                yield chunk(index, {"tool_calls": [{"index": k, **call}]})
            if ev.finished:
                batch.choices[index].result = ev.result
                reason = oa.finish_reason(ev.finish_reason)
                if parser is not None and parser.calls and reason == "stop":
                    reason = "tool_calls"
                yield chunk(index, {}, finish=reason)
    except ApiError as err:
        yield stream_error(err)
        return
    if spec.include_usage:
        yield sse({**base, "choices": [], "usage": batch_usage(batch)})
    yield SSE_DONE


async def stream_completion(state: ServerState, spec: GenerationSpec, batch: Batch, rid: str, created: int):
    base = {"id": rid, "object": "text_completion", "created": created, "model": spec.model,
            "system_fingerprint": "edgellm"}
    if spec.include_usage:
        base["usage"] = None
    try:
        async for index, ev in stream_events(state, batch):
            if ev.error is not None:
                yield stream_error(ev.error)
                batch.cancel()
                return
            c = batch.choices[index]
            lp = None
            if spec.logprobs and ev.token_id is not None and ev.logprob is not None:
                lp = oa.completion_logprobs(state.token_text, [ev.token_id], [ev.logprob],
                                            [(ev.top_logprobs or [])[:spec.top_logprobs]], c.sent_chars)
            finish = None
            if ev.finished:
                c.result = ev.result
                finish = oa.finish_reason(ev.finish_reason)
            if ev.text or lp or finish:
                c.sent_chars += len(ev.text)
                yield sse({**base, "choices": [{"index": index, "text": ev.text, "logprobs": lp,
                                                "finish_reason": finish}]})
    except ApiError as err:
        yield stream_error(err)
        return
    if spec.include_usage:
        yield sse({**base, "choices": [], "usage": batch_usage(batch)})
    yield SSE_DONE


# ---------------------------------------------------------------------------------------------
# Sessions API
# ---------------------------------------------------------------------------------------------
SESSION_FIELDS = {"system", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seed", "stop", "logit_bias", "response_format",
                  *oa.GUIDED}
MESSAGE_FIELDS = (SESSION_FIELDS - {"system"}) | {"content", "stream"}
# Chat-completion fields a session turn cannot honour: refused (400), not ignored.
SESSION_REFUSED = {"tools": "tool calls", "tool_choice": "tool calls", "parallel_tool_calls": "tool calls",
                   "messages": "a whole conversation", "n": "several choices", "logprobs": "log-probabilities",
                   "top_logprobs": "log-probabilities"}


def refuse_session_fields(body: dict) -> None:
    for name, what in SESSION_REFUSED.items():
        if body.get(name) is not None:
            raise oa.invalid(name, f"'{name}' is not supported by the sessions API, whose turns are one user message "
                                   f"answered in text: for {what}, send the conversation to POST /v1/chat/completions",
                             "unsupported_parameter")


async def session_sampling(state: ServerState, body: dict, defaults: dict | None = None) -> dict:
    """A session's (or a turn's) sampling fields over ``defaults``; an output constraint
    (``response_format`` or a ``guided_*`` field) is compiled now, so a bad one is a 400."""
    out = dict(defaults or {})
    grammar, param = oa.get_constraint(body)
    if grammar is not None:
        await state.compile(grammar, param)
        out["grammar"] = grammar
    elif body.get("response_format") == {"type": "text"}:
        out.pop("grammar", None)        # a turn may lift its session's constraint
    if body.get("logit_bias") is not None:
        out["logit_bias"] = oa.get_logit_bias(body, state.engine.input.vocab_size)
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "stop"):
        if body.get(name) is not None:
            out[name] = oa.sampling_fields({name: body[name]})[name]
    if body.get("max_tokens") is not None:
        out["max_tokens"] = oa.get_int(body, "max_tokens", None, 1)
    return out


def session_view(state: ServerState, sid: str, s) -> dict:
    st = s.stats()
    last = s.results[-1].to_dict() if s.results else None
    if last is not None:
        last.pop("token_ids", None)
        last["session_id"] = sid
    return {"id": sid, "object": "session", "phase": st["phase"], "kv_tier": st["kv_tier"], "turns": st["turns"],
            "kv_tokens": st["kv_tokens"], "kv_bytes": st["kv_bytes"], "phase_seconds": st["phase_s"],
            "phase_tokens": st["tokens"], "messages": len(s.messages), "last_turn": last}


async def locked(state: ServerState, fn: Callable, *args):
    """Run ``fn`` in a worker thread under the engine's lock (a consistent view between steps)."""
    def run():
        with state.engine._lock:
            return fn(*args)
    return await asyncio.to_thread(run)


def owner_of(request: HttpRequest) -> str | None:
    return getattr(request.state, "owner", None)


def find_session(state: ServerState, sid: str, request: HttpRequest):
    """The caller's session ``sid``; 404 if there is none -- or it belongs to another API key."""
    s = state.sessions.get(sid)
    if s is not None and state.session_owner.get(sid) != owner_of(request):
        s = None
    if s is None:
        raise ApiError(404, f"no session '{sid}': unknown, deleted, or retired after --session-idle-timeout "
                            f"(create one with POST /v1/sessions)", param="session_id", code="session_not_found")
    return s


async def create_session(state: ServerState, request: HttpRequest) -> Response:
    body = await read_json(request, state.max_body, state.body_timeout, allow_empty=True)   # chunked too
    refuse_session_fields(body)
    note_ignored(request, oa.check_fields(body, SESSION_FIELDS | {"model"}, {}))
    if "model" in body:
        oa.get_model(body, state.served)
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise oa.invalid("system", f"'system' must be a string, got {oa.type_name(system)}", "invalid_type")
    defaults = await session_sampling(state, body)
    if system:      # tokenised and admitted now, not at the first message
        ids = await state.encode([{"role": "system", "content": system}], "the system prompt")
        state.budget(len(ids), None, "the system prompt")
    for old in [k for k, v in state.sessions.items() if v.retired]:   # retired while idle: forget them
        forget_session(state, old)
    if len(state.sessions) >= state.max_sessions:
        raise ApiError(429, f"the server holds its maximum of {state.max_sessions} sessions (--max-sessions); "
                            "delete sessions you no longer need, or retry after idle ones retire "
                            "(--session-idle-timeout)", code="too_many_sessions", type="rate_limit_exceeded",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    s = state.engine.session(system=system)
    sid = "sess_" + secrets.token_urlsafe(18)     # unguessable: 144 random bits
    state.sessions[sid] = s
    state.session_defaults[sid] = defaults
    state.session_owner[sid] = owner_of(request)
    return JSONResponse(await locked(state, session_view, state, sid, s), status_code=201)


def forget_session(state: ServerState, sid: str):
    state.session_defaults.pop(sid, None)
    state.session_owner.pop(sid, None)
    return state.sessions.pop(sid, None)


async def post_message(state: ServerState, request: HttpRequest) -> Response:
    sid = request.path_params["sid"]
    s = find_session(state, sid, request)
    body = await read_json(request, state.max_body, state.body_timeout)
    refuse_session_fields(body)
    note_ignored(request, oa.check_fields(body, MESSAGE_FIELDS, {}))
    content = body.get("content")
    if not isinstance(content, str) or not content:
        raise oa.invalid("content", "'content' must be a non-empty string: the user's message",
                         "invalid_type" if not isinstance(content, str) else "invalid_value")
    stream = oa.get_bool(body, "stream", True)
    if s.retired:
        raise ApiError(409, f"session '{sid}' is retired ({s.retire_reason}); create a new one",
                       param="session_id", code="session_retired")
    if s.busy:
        raise ApiError(409, f"session '{sid}' is still answering its previous message; wait for it",
                       param="session_id", code="session_busy")
    sampling = await session_sampling(state, body, state.session_defaults.get(sid))
    new = [{"role": "user", "content": content}]
    ids = await state.encode(s.messages + new, "the conversation")
    if s.retired or s.busy:     # changed while it was being tokenised
        raise ApiError(409, f"session '{sid}' is retired or answering another message; retry",
                       param="session_id", code="session_busy")
    max_tokens = state.budget(len(ids), sampling.pop("max_tokens", None), "the conversation")
    sampling.setdefault("temperature", 0.0)
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    batch = state.submit([ids], 1, params, session=s, new_messages=new)
    if stream:
        return EventStream(stream_session(state, sid, s, batch), batch)
    if not await collect(batch, request, state.request_timeout):
        return Response(status_code=499)
    return JSONResponse(await turn_summary(state, sid, s, batch.choices[0].result))


async def turn_summary(state: ServerState, sid: str, s, r) -> dict:
    turn = r.to_dict()
    turn.pop("token_ids", None)
    turn["session_id"] = sid
    return {"type": "done", "message": {"role": "assistant", "content": r.text},
            "finish_reason": oa.finish_reason(r.finish_reason),
            "usage": oa.usage(r.prompt_tokens, len(r.token_ids), r.cached_tokens), "turn": turn,
            "session": await locked(state, session_view, state, sid, s)}


async def stream_session(state: ServerState, sid: str, s, batch: Batch):
    try:
        async for _, ev in stream_events(state, batch):
            if ev.error is not None:
                yield stream_error(ev.error)
                return
            if ev.text:
                yield sse({"type": "delta", "content": ev.text})
            if ev.finished:
                batch.choices[0].result = ev.result
                yield sse(await turn_summary(state, sid, s, ev.result))
    except ApiError as err:
        yield stream_error(err)
        return
    yield SSE_DONE


async def get_session(state: ServerState, request: HttpRequest) -> Response:
    sid = request.path_params["sid"]
    s = find_session(state, sid, request)
    return JSONResponse(await locked(state, session_view, state, sid, s))


async def list_sessions(state: ServerState, request: HttpRequest) -> Response:
    """The caller's live sessions (with an API key, only those its key created)."""
    owner = owner_of(request)
    items = [(sid, s) for sid, s in state.sessions.items()
             if state.session_owner.get(sid) == owner and not s.retired]
    data = await locked(state, lambda: [session_view(state, sid, s) for sid, s in items])
    return JSONResponse({"object": "list", "data": data})


async def delete_session(state: ServerState, request: HttpRequest) -> Response:
    sid = request.path_params["sid"]
    s = find_session(state, sid, request)
    forget_session(state, sid)          # before any await: a second DELETE now finds nothing (404)
    await asyncio.to_thread(s.close)
    view = await locked(state, session_view, state, sid, s)
    return JSONResponse({"id": sid, "object": "session.deleted", "deleted": True, "session": view})


# ---------------------------------------------------------------------------------------------
# Tokenizer endpoints (vLLM's shapes)
# ---------------------------------------------------------------------------------------------
TOKENIZE_FIELDS = {"model", "prompt", "messages"}
DETOKENIZE_FIELDS = {"model", "tokens"}


async def tokenize(state: ServerState, request: HttpRequest) -> Response:
    """``{"prompt": text}`` or ``{"messages": [...]}`` (rendered with the chat template, ready for
    the assistant's answer) -> ``{"tokens", "count", "max_model_len"}``, as vLLM answers."""
    body = await read_json(request, state.max_body, state.body_timeout)
    note_ignored(request, oa.check_fields(body, TOKENIZE_FIELDS, {}))
    if "model" in body:
        oa.get_model(body, state.served)
    if ("prompt" in body) == ("messages" in body):
        raise oa.invalid("prompt", "give exactly one of 'prompt' (text) or 'messages' (a chat)",
                         "missing_required_parameter" if "prompt" not in body else "invalid_value")
    if "messages" in body:
        ids = await state.encode(oa.parse_messages(body["messages"]), "the messages")
    else:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise oa.invalid("prompt", f"'prompt' must be a string, got {oa.type_name(prompt)}", "invalid_type")
        ids = await state.encode(prompt, "the prompt") if prompt else []
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.engine.cfg.context_length})


async def detokenize(state: ServerState, request: HttpRequest) -> Response:
    """``{"tokens": [ids]}`` -> ``{"prompt": text}``, as vLLM answers."""
    body = await read_json(request, state.max_body, state.body_timeout)
    note_ignored(request, oa.check_fields(body, DETOKENIZE_FIELDS, {}))
    if "model" in body:
        oa.get_model(body, state.served)
    tokens = body.get("tokens")
    if tokens is None:
        raise oa.invalid("tokens", "'tokens' is required: an array of token ids", "missing_required_parameter")
    if not isinstance(tokens, list) or not all(oa.is_int(t) for t in tokens):
        raise oa.invalid("tokens", "'tokens' must be an array of integer token ids", "invalid_type")
    vocab = state.engine.input.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise oa.invalid("tokens", f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1}); "
                                   "pass ids produced by this model's tokenizer (POST /tokenize)")
    text = await asyncio.to_thread(state.engine.tokenizer.decode, [int(t) for t in tokens])
    return JSONResponse({"prompt": text})


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions"}
MAX_EMBEDDING_INPUTS = 256


def embedding_inputs(v) -> list:
    """``input``: a string, an array of strings, an array of token ids, or an array of such arrays."""
    if isinstance(v, str):
        v = [v]
    elif isinstance(v, list) and v and all(oa.is_int(t) for t in v):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) or (isinstance(x, list) and all(
            oa.is_int(t) for t in x)) for x in v):
        raise oa.invalid("input", "'input' must be a string, an array of strings, an array of token ids or an "
                                  "array of token-id arrays", "invalid_type" if not isinstance(v, list) or v
                         else "invalid_value")
    if len(v) > MAX_EMBEDDING_INPUTS:
        raise oa.invalid("input", f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(v)}")
    for i, x in enumerate(v):
        if not x:
            raise oa.invalid("input", f"input {i} is empty; every input needs at least one token")
    return v


def pooled_embedding(state: ServerState, ids: list[int]) -> list[float]:
    """Mean of the final hidden states (after the final norm) over every token, L2-normalised.
    Runs under the engine's lock (from ``locked``): one forward pass like a prefill, between steps."""
    import torch

    h = state.engine.loaded.model.hidden_states(torch.tensor(ids, dtype=torch.int64))
    return torch.nn.functional.normalize(h.mean(dim=0), dim=0).tolist()


async def embeddings(state: ServerState, request: HttpRequest) -> Response:
    """OpenAI's ``/v1/embeddings``: one vector per input, the mean-pooled final hidden states,
    normalised to length 1 (as llama-server's ``--pooling mean``); ``encoding_format`` float or
    base64 (little-endian float32, what the ``openai`` client asks for by default)."""
    import base64
    import struct

    body = await read_json(request, state.max_body, state.body_timeout)
    note_ignored(request, oa.check_fields(body, EMBEDDING_FIELDS, {}))
    model = oa.get_model(body, state.served)
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise oa.invalid("encoding_format", f"'encoding_format' must be \"float\" or \"base64\", got {fmt!r}")
    width = state.engine.cfg.hidden_size
    dims = oa.get_int(body, "dimensions", None, 1)
    if dims is not None and dims != width:
        raise oa.invalid("dimensions", f"this model's embeddings have {width} dimensions and cannot be shortened; "
                                       f"leave 'dimensions' out or pass {width}")
    inputs = embedding_inputs(body.get("input"))
    ctx = state.engine.cfg.context_length
    data, total = [], 0
    async with state.embedding_lock:      # one embedding request at a time: each pass is a prefill
        for i, x in enumerate(inputs):
            try:
                ids = await state.encode(x if isinstance(x, str) else [int(t) for t in x], "the prompt")
            except EdgeLLMError as err:
                raise oa.invalid("input", f"input {i}: {api_message(err)}") from None
            if not ids:
                raise oa.invalid("input", f"input {i} encodes to no token")
            if len(ids) > ctx:
                raise ApiError(400, f"input {i} has {len(ids)} tokens, more than the model's context window of "
                                    f"{ctx}; shorten it", param="input", code="context_length_exceeded")
            vec = await locked(state, pooled_embedding, state, ids)
            total += len(ids)
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if fmt == "base64" else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
    state.metrics.embedding_tokens.inc(total)
    return JSONResponse({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": total, "total_tokens": total}})


# ---------------------------------------------------------------------------------------------
# Introspection
# ---------------------------------------------------------------------------------------------
async def models(state: ServerState, request: HttpRequest) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_id, "object": "model", "created": state.started, "owned_by": "edgellm",
         "context_length": state.engine.cfg.context_length}]})


async def health(state: ServerState, request: HttpRequest) -> Response:
    ok = state.engine.running_in_background
    return JSONResponse({"status": "ok" if ok else "unavailable", "model": state.model_id},
                        status_code=200 if ok else 503)


async def metrics(state: ServerState, request: HttpRequest) -> Response:
    """Prometheus text; with an API key, only for callers that send it (unless --metrics-public)."""
    data = await asyncio.to_thread(state.metrics.render)
    return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")


async def runtime(state: ServerState, request: HttpRequest) -> Response:
    """What the live page shows: phases, KV blocks, queue, token totals (the page derives tok/s)."""
    st = await asyncio.to_thread(state.engine.stats)
    return JSONResponse({"model": state.model_id, "time": time.time(), "sessions_by_phase": st["sessions"]["by_phase"],
                         "sessions": len(state.sessions), "kv_blocks": st["blocks"], "kv": st["kv"],
                         "queue_depth": st["scheduler"]["waiting"], "running": st["scheduler"]["running"],
                         "in_flight": state.in_flight, "tokens": st["tokens"], "requests": st["requests"],
                         "offload": {k: st["offload"][k] for k in ("host_bytes", "disk_bytes")},
                         "steps": st["steps"]})


async def index(state: ServerState, request: HttpRequest) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html")


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------
def endpoint(state: ServerState, handler, name: str, auth: bool = True):
    async def wrapped(request: HttpRequest) -> Response:
        try:
            if auth:
                request.state.owner = check_auth(state, request)
            response = await handler(state, request)
        except ApiError as err:
            response = error_response(err)
        except ContextOverflowError as err:
            response = error_response(ApiError(400, str(err), code="context_length_exceeded"))
        except EdgeLLMError as err:
            response = error_response(ApiError(400, str(err), code="invalid_value"))
        except Exception:
            log.exception("internal error on %s", name)
            response = error_response(ApiError(500, "internal server error (see the server's log)",
                                               code="internal_error", type="server_error"))
        ignored = getattr(request.state, "ignored_fields", None)
        if ignored:
            response.headers[IGNORED_HEADER] = ",".join(header_safe(n) for n in ignored[:MAX_IGNORED_LISTED])
        state.metrics.http.labels(name, str(getattr(response, "status_code", 200))).inc()
        return response

    return wrapped


def host_name(host: str) -> str:
    """The name of a Host header, without its port: ``[::1]:8000`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if ":" in host else host


class HostCheck:
    """Refuse (403) requests whose Host header is not one of ``allowed`` (any port): a web page
    that rebinds its own DNS name to 127.0.0.1 still sends its name, so it cannot drive a server
    on localhost that has no API key."""

    def __init__(self, app, allowed: Sequence[str]):
        self.app = app
        self.allowed = frozenset(host_name(h) for h in allowed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed:
                names = ", ".join(sorted(self.allowed))
                err = ApiError(403, f"the Host header {host!r} is not one this server answers ({names}); "
                                    "use one of those names, or start the server with --allow-host NAME "
                                    "(or --api-key)", code="host_not_allowed")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, model_id: str, aliases: tuple[str, ...] = (),
               api_key: str | Sequence[str] | None = None, max_queue: int = 256, max_body: int = DEFAULT_MAX_BODY,
               close_engine: bool = True, max_sessions: int = DEFAULT_MAX_SESSIONS,
               metrics_public: bool = False, request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               body_timeout: float | None = DEFAULT_BODY_TIMEOUT, allowed_hosts: Sequence[str] | None = None,
               cors_origins: Sequence[str] = (), stats_interval: float | None = None):
    """The server over ``engine`` (started by the app's lifespan; closed at shutdown if ``close_engine``).

    ``api_key``: one key or several (each client's sessions are private to its key); None: no
    authentication. ``max_sessions``: live sessions at most (429 beyond). ``metrics_public``:
    serve /metrics without a key (it always is when there is no key). ``request_timeout``:
    seconds a generation may take before it is cancelled and answered 504 (None: no limit);
    ``body_timeout``: seconds to send a body (408 after). ``allowed_hosts``: the Host names
    answered (any port; others get 403); None: any (see :func:`default_allowed_hosts`).
    ``cors_origins``: web origins (``https://app.example:8080``, or ``*``) whose pages may call the
    API from a browser (CORS); none by default. ``stats_interval``: log one line of throughput,
    queue and KV figures this often (seconds) while there is activity (None: never)."""
    if not isinstance(max_sessions, int) or max_sessions < 1:
        raise InvalidParameterError(f"max_sessions must be a positive integer, got {max_sessions!r}",
                                    "pass e.g. --max-sessions 256")
    for name, t in (("request_timeout", request_timeout), ("body_timeout", body_timeout)):
        if t is not None and not (isinstance(t, (int, float)) and t > 0):
            raise InvalidParameterError(f"{name} must be a positive number of seconds or None, got {t!r}",
                                        f"pass e.g. --{name.replace('_', '-')} 600 (0 on the command line: none)")
    state = ServerState(engine, model_id, tuple(a for a in aliases if a), check_api_keys(api_key), max_queue,
                        max_body, max_sessions, metrics_public, request_timeout, body_timeout)

    def ep(handler, name, auth=True):
        return endpoint(state, handler, name, auth)

    routes = [
        Route("/v1/chat/completions", ep(lambda s, r: generation(s, r, "chat"), "chat"), methods=["POST"]),
        Route("/v1/completions", ep(lambda s, r: generation(s, r, "completion"), "completions"), methods=["POST"]),
        Route("/v1/models", ep(models, "models"), methods=["GET"]),
        Route("/v1/embeddings", ep(embeddings, "embeddings"), methods=["POST"]),
        Route("/v1/sessions", ep(create_session, "sessions_create"), methods=["POST"]),
        Route("/v1/sessions", ep(list_sessions, "sessions_list"), methods=["GET"]),
        Route("/v1/sessions/{sid}", ep(get_session, "sessions_get"), methods=["GET"]),
        Route("/v1/sessions/{sid}", ep(delete_session, "sessions_delete"), methods=["DELETE"]),
        Route("/v1/sessions/{sid}/messages", ep(post_message, "sessions_message"), methods=["POST"]),
        Route("/v1/runtime", ep(runtime, "runtime"), methods=["GET"]),
        Route("/tokenize", ep(tokenize, "tokenize"), methods=["POST"]),
        Route("/detokenize", ep(detokenize, "detokenize"), methods=["POST"]),
        Route("/health", ep(health, "health", auth=False), methods=["GET"]),
        Route("/metrics", ep(metrics, "metrics", auth=not state.metrics_public), methods=["GET"]),
        Route("/", ep(index, "index", auth=False), methods=["GET"]),
    ]

    async def http_error(request: HttpRequest, exc: HTTPException) -> Response:
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(ApiError(exc.status_code, what.get(exc.status_code, str(exc.detail)),
                                       code="not_found" if exc.status_code == 404 else None))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        logger = asyncio.ensure_future(log_stats(state, stats_interval)) if stats_interval else None
        try:
            yield
        finally:
            if logger is not None:
                logger.cancel()
            if close_engine:
                await asyncio.to_thread(engine.close)
            else:
                await asyncio.to_thread(engine.stop)

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.server = state
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    if allowed_hosts is not None:       # added last: outermost, so it checks preflights too
        app.add_middleware(HostCheck, allowed=tuple(allowed_hosts))
    return app


async def log_stats(state: ServerState, interval: float) -> None:
    """Every ``interval`` seconds, one line like vLLM's: prompt and generation throughput since the
    last line, requests running and waiting, KV cache use, preemptions -- only when something ran
    since the last line or is still in flight (an idle server stays quiet)."""
    def totals() -> tuple[float, dict]:
        st = state.engine.stats()
        tok = st["tokens"]
        return time.monotonic(), {"prompt": tok.get("prefill", 0) + tok.get("followup_prefill", 0),
                                  "generated": tok.get("generated", 0), "running": st["scheduler"]["running"],
                                  "waiting": st["scheduler"]["waiting"], "preemptions": st["scheduler"]["preemptions"],
                                  "kv": st["blocks"]["used"] / max(1, st["blocks"]["total"])}
    t0, last = await asyncio.to_thread(totals)
    while True:
        await asyncio.sleep(interval)
        try:
            t1, now = await asyncio.to_thread(totals)
        except Exception:            # the engine closing under us: no line this time
            continue
        dt = max(t1 - t0, 1e-9)
        busy = now["running"] or now["waiting"] or now["generated"] != last["generated"] or now["prompt"] != last["prompt"]
        if busy:
            log.info("prompt throughput %.1f tok/s, generation throughput %.1f tok/s, running %d, waiting %d, "
                     "in flight %d, KV cache usage %.1f%%, preemptions %d",
                     (now["prompt"] - last["prompt"]) / dt, (now["generated"] - last["generated"]) / dt,
                     now["running"], now["waiting"], state.in_flight, 100 * now["kv"], now["preemptions"])
        t0, last = t1, now


def header_timeout_protocol(timeout: float):
    """uvicorn's h11 protocol, answering 408 and closing a connection whose request headers have
    not all arrived ``timeout`` seconds after it opened (or after its previous response): uvicorn
    has no such timer, so a client sending nothing, or trickling its headers, held a connection
    for ever. Pass it to ``uvicorn.run(..., http=...)``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    late = json.dumps(ApiError(408, f"the request headers did not arrive within {timeout:g} seconds "
                                    "(--body-timeout); send the whole request at once",
                               code="request_timeout").body()).encode()
    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: " + str(len(late)).encode() + b"\r\n\r\n" + late)

    class HeaderTimeoutProtocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm_header_timer()

        def connection_lost(self, exc) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def arm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(timeout, self.headers_late)

        def headers_late(self) -> None:
            self.header_timer = None
            between_requests = self.cycle is None or self.cycle.response_complete
            if between_requests and not self.transport.is_closing():
                self.transport.write(reply)
                self.transport.close()

    return HeaderTimeoutProtocol


def check_cors_origins(origins: Sequence[str]) -> tuple[str, ...]:
    """``--cors-origin`` values: ``*`` or a scheme and host with an optional port, as a browser
    sends ``Origin`` (no path, no trailing slash, so it can match)."""
    import re
    for o in origins:
        if o != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", o):
            raise InvalidParameterError(f"--cors-origin {o!r} is not an origin", "pass a scheme and host as a browser "
                                        "sends them, e.g. --cors-origin https://app.example:8080 (no path, no "
                                        "trailing slash), or * for any")
    return tuple(origins)


def is_loopback(host: str) -> bool:
    import ipaddress
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str, api_keys: Sequence[str], extra: Sequence[str] = ()) -> tuple[str, ...] | None:
    """The Host names a server answers: without an API key on a loopback address, only
    ``localhost``, ``127.0.0.1`` and ``[::1]`` (and ``extra``, the --allow-host names), against
    DNS rebinding; with a key or on another address, any (None) -- unless ``extra`` is given."""
    if extra or (not api_keys and is_loopback(bind_host)):
        return (*LOOPBACK_HOSTS, *extra)
    return None
