"""Sessions: a conversation's phases, their clocks, and the user-facing handle.

A conversation moves through phases with very different costs; each is explicit here::

    INACTIVE ──send──▶ WAITING ──admitted──▶ PREFILL / FOLLOWUP_PREFILL ──first token──▶ DECODE
       ▲   │                ▲                      │        ▲                              │
       │   │ memory         │ next turn            │ out of blocks                         │
       │   ▼ pressure       │                      ▼        │ re-admitted                  │
       │ OFFLOADED_HOST ──▶ OFFLOADED_DISK     PREEMPTED ───┘                              │
       │                                                                                   │
       └───────────────────────────────────── reply done ◀─────────────────────────────────┘
    any phase ──close() / idle too long──▶ RETIRED

* WAITING: a turn is queued, not yet scheduled (no token of it computed).
* PREFILL: the first turn's prompt is being computed (compute-bound).
* FOLLOWUP_PREFILL: a later turn: only the tokens after the longest prefix whose KV the session
  still holds are computed.
* DECODE: one token per engine step (memory-bound).
* INACTIVE: the reply is done; the user reads or types; the KV stays in the pool.
* OFFLOADED_HOST / OFFLOADED_DISK: an inactive session whose KV moved out of the pool under
  memory pressure; it comes back on the next turn.
* PREEMPTED: a running turn lost its blocks (the pool ran out); it resumes where it was.
* RETIRED: closed or idle too long; every tier is freed.

Every transition is timestamped; each session keeps wall time and token counts per phase, and the
engine sums them over all sessions (``Engine.stats()``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Iterator

from edgellm.errors import InvalidParameterError
from edgellm.runtime.types import Phase, PhaseClock, Request, TokenEvent, TurnResult
from edgellm.sampling import SamplingParams

if TYPE_CHECKING:
    from edgellm.kv.block_manager import KVSequence

log = logging.getLogger("edgellm.engine")


class Session:
    """One conversation on an :class:`~edgellm.runtime.engine.Engine` (create with ``engine.session()``).

    ``send(text)`` queues the next user turn and returns a handle that streams the reply's text
    when iterated (``for piece in s.send("hi"): ...``); ``.result()`` waits for the whole
    :class:`TurnResult`. ``close()`` retires the session. One turn at a time.

    The engine keeps the conversation's state here (``kv``, ``clock``, ``messages``, ...); the
    handle talks to the engine only through its public methods.
    """

    def __init__(self, engine, sid: int, system: str | None, sampling: SamplingParams | None,
                 ephemeral: bool = False):
        from edgellm.kv.block_manager import KVSequence

        self.engine = engine
        self.id = sid
        self.key = f"s{sid}"
        self.system = system
        self.sampling = sampling or SamplingParams()
        self.ephemeral = ephemeral          # a one-shot request's session: retired with its request
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.clock = PhaseClock()
        self.kv: KVSequence = KVSequence()
        self.kv_high_water = 0              # longest KV this conversation ever had computed
        self.last_used = self.clock.created
        self.turns = 0
        self.results: list[TurnResult] = []
        self.retire_reason: str | None = None
        self.active_seq = None              # the turn in flight (engine side)
        self._busy = False
        self._lock = threading.Lock()

    # ---- state -------------------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self.clock.phase

    @property
    def retired(self) -> bool:
        return self.clock.phase == Phase.RETIRED

    @property
    def kv_tier(self) -> str:
        """Where the KV is: "pool", "host", "disk", or "none" (nothing held: recomputed if needed)."""
        return self.engine.kv_tier(self)

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def kv_tokens(self) -> int:
        """Tokens whose KV this session holds (in the pool or an offload tier)."""
        return self.kv.num_tokens

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV this session's tokens take (shared prefix blocks counted in full)."""
        return self.engine.kv_bytes(self.kv.num_tokens)

    @property
    def transitions(self) -> list[tuple[float, Phase, Phase]]:
        return self.clock.transitions

    def stats(self) -> dict:
        return {"id": self.id, "phase": self.phase.value, "kv_tier": self.kv_tier, "turns": self.turns,
                "kv_tokens": self.kv_tokens, "kv_bytes": self.kv_bytes,
                "phase_s": self.clock.phase_seconds(), "tokens": dict(self.clock.tokens),
                "transitions": len(self.clock.transitions)}

    # ---- turns -------------------------------------------------------------------------------
    def send(self, text: str, params: SamplingParams | None = None, *, on_event=None) -> "RequestHandle":
        """Queue the next user turn; iterate the handle for the reply's text pieces."""
        if not isinstance(text, str):
            raise InvalidParameterError(f"a turn's text must be a string, got {type(text).__name__}",
                                        "pass the user's message as a str")
        return self.send_messages([{"role": "user", "content": text}], params, on_event=on_event)

    def send_messages(self, new_messages: list[dict], params: SamplingParams | None = None, *,
                      on_event=None) -> "RequestHandle":
        """Append messages (user, tool...) to the conversation and generate the assistant's reply."""
        self.begin_turn()
        try:
            messages = self.messages + [dict(m) for m in new_messages]
            req = Request(prompt=messages, params=params or self.sampling, chat=True, session=self,
                          new_messages=list(new_messages), on_event=on_event)
            return self.engine.submit(req)
        except BaseException:
            self.end_turn()
            raise

    def begin_turn(self) -> None:
        """Mark a turn in flight (one at a time); raises if the session is retired or busy."""
        with self._lock:
            if self.retired:
                raise InvalidParameterError(
                    f"session {self.id} is retired ({self.retire_reason or 'closed'})",
                    "open a new session with engine.session()")
            if self._busy:
                raise InvalidParameterError(f"session {self.id} is still answering its previous turn",
                                            "wait for (or cancel) the previous reply before sending the next turn")
            self._busy = True

    def end_turn(self) -> None:
        """The turn in flight is over (finished, cancelled or refused): the next may be sent."""
        with self._lock:
            self._busy = False

    def chat(self, text: str, params: SamplingParams | None = None) -> TurnResult:
        """Send a turn and wait for the whole reply."""
        return self.send(text, params).result()

    def close(self) -> None:
        """Retire the session: its blocks, host copy and disk file are freed."""
        self.engine.retire(self)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(id={self.id}, phase={self.phase.value}, kv_tokens={self.kv_tokens}, tier={self.kv_tier})"


class RequestHandle:
    """A submitted request: iterate for text pieces, ``events()`` for tokens, ``result()`` to wait,
    ``cancel()`` to stop it (its blocks are freed at the next step). Thread-safe.

    Without a background thread in the engine, waiting on a handle runs engine steps in the
    caller's thread (other requests advance in the same steps)."""

    def __init__(self, engine, request: Request, n_prompt: int):
        self.engine = engine
        self.request = request
        self.prompt_tokens = n_prompt
        self._events: queue.Queue[TokenEvent] = queue.Queue()
        self._done = threading.Event()
        self._result: TurnResult | None = None
        self._error: BaseException | None = None
        self.cancel_requested = False
        self.seq = None          # the engine's Sequence for it, once queued

    # engine side
    def deliver(self, ev: TokenEvent) -> None:
        """Called by the engine for each event of this request, in order."""
        if ev.finished:
            self._result, self._error = ev.result, ev.error
        self._events.put(ev)
        cb = self.request.on_event
        if cb is not None:
            try:
                cb(ev)
            except Exception:   # a consumer's bug must not stop the engine
                log.exception("on_event callback failed")
        if ev.finished:
            self._done.set()

    # caller side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Every event in order, until the finishing one (raises the engine's error, if any)."""
        while True:
            ev = self._next_event(timeout)
            if ev.error is not None:
                raise ev.error
            yield ev
            if ev.finished:
                return

    def __iter__(self) -> Iterator[str]:
        for ev in self.events():
            if ev.text:
                yield ev.text

    def _next_event(self, timeout: float | None) -> TokenEvent:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._events.get_nowait()
            except queue.Empty:
                pass
            if self.engine.running_in_background:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    return self._events.get(timeout=left if left is not None else 0.5)
                except queue.Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError("no event from the engine in time") from None
                    continue
            if not self.engine.step() and self._events.empty():
                if self.done:
                    continue
                raise RuntimeError("the engine has no work but this request is not finished")
            if deadline is not None and time.monotonic() >= deadline and self._events.empty():
                raise TimeoutError("no event from the engine in time")

    def result(self, timeout: float | None = None) -> TurnResult:
        """Wait for the end (driving the engine when it has no thread of its own)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if self.engine.running_in_background:
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError("the request did not finish in time")
                self._done.wait(left)
            else:
                if not self.engine.step() and not self._done.is_set():
                    raise RuntimeError("the engine has no work but this request is not finished")
                if deadline is not None and time.monotonic() >= deadline and not self._done.is_set():
                    raise TimeoutError("the request did not finish in time")
        if self._error is not None:
            raise self._error
        return self._result

    def text(self) -> str:
        return self.result().text

    def cancel(self) -> None:
        """Stop generating; the request finishes with reason ``cancelled`` within a step."""
        self.cancel_requested = True
        self.engine.cancel(self)
