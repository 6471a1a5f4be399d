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

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Iterator

from edgellm.errors import InvalidParameterError
from edgellm.llm import Completion
from edgellm.sampling import SamplingParams

if TYPE_CHECKING:
    from edgellm.kv.block_manager import KVSequence
    from edgellm.runtime.engine import Engine, RequestHandle


class Phase(str, Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    INACTIVE = "inactive"
    FOLLOWUP_PREFILL = "followup_prefill"
    PREEMPTED = "preempted"
    OFFLOADED_HOST = "offloaded_host"
    OFFLOADED_DISK = "offloaded_disk"
    RETIRED = "retired"


# Where a session's KV is: in the pool, in an offload tier, or nowhere (recomputed when needed).
TIER_POOL, TIER_HOST, TIER_DISK, TIER_NONE = "pool", "host", "disk", "none"

MAX_TRANSITIONS = 10_000   # a session keeps its most recent transitions only


class PhaseClock:
    """The phase of one session, every transition timestamped, time and tokens per phase."""

    def __init__(self, phase: Phase = Phase.INACTIVE, now: float | None = None):
        now = time.perf_counter() if now is None else now
        self.phase = phase
        self.since = now
        self.created = now
        self.seconds: dict[Phase, float] = {p: 0.0 for p in Phase}
        self.tokens: Counter = Counter()   # "prefill", "followup_prefill", "decode", "generated", "reused", ...
        self.transitions: list[tuple[float, Phase, Phase]] = []

    def to(self, phase: Phase, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if phase == self.phase:
            return
        self.seconds[self.phase] += now - self.since
        self.transitions.append((now, self.phase, phase))
        if len(self.transitions) > MAX_TRANSITIONS:
            del self.transitions[: len(self.transitions) - MAX_TRANSITIONS]
        self.phase, self.since = phase, now

    def phase_seconds(self, now: float | None = None) -> dict[str, float]:
        """Seconds spent in each phase, the current one counted up to now."""
        now = time.perf_counter() if now is None else now
        out = {p.value: s for p, s in self.seconds.items()}
        if self.phase != Phase.RETIRED:
            out[self.phase.value] += now - self.since
        return out


@dataclass
class TurnResult(Completion):
    """One finished request (a session's turn or an offline prompt).

    Beyond :class:`edgellm.llm.Completion`: ``cached_tokens`` -- prompt tokens whose KV was
    already held (the session's own history or the shared prefix cache) and not computed;
    ``computed_prompt_tokens`` -- prompt tokens the forward passes actually computed (more than
    ``prompt_tokens - cached_tokens`` only after a preemption or a dropped offload);
    ``preemptions``; ``queue_s`` -- submission to first scheduled step.
    """

    cached_tokens: int = 0
    computed_prompt_tokens: int = 0
    preemptions: int = 0
    queue_s: float = 0.0
    session_id: int | None = None

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(cached_tokens=self.cached_tokens, computed_prompt_tokens=self.computed_prompt_tokens,
                 preemptions=self.preemptions, queue_s=self.queue_s, session_id=self.session_id)
        return d


class Session:
    """One conversation on an :class:`~edgellm.runtime.engine.Engine` (create with ``engine.session()``).

    ``send(text)`` queues the next user turn and returns a handle that streams the reply's text
    when iterated (``for piece in s.send("hi"): ...``); ``.result()`` waits for the whole
    :class:`TurnResult`. ``close()`` retires the session. One turn at a time.
    """

    def __init__(self, engine: "Engine", sid: int, system: str | None, sampling: SamplingParams | None,
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
        tier = self.engine.store.tier(self.key)
        if tier is not None:
            return TIER_HOST if tier == "host" else TIER_DISK
        return TIER_POOL if self.kv.blocks else TIER_NONE

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
        return self.engine.kv_bytes_per_block * self.engine.block_manager.blocks_for(self.kv.num_tokens)

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
        from edgellm.runtime.engine import Request

        with self._lock:
            if self.retired:
                raise InvalidParameterError(
                    f"session {self.id} is retired ({self.retire_reason or 'closed'})",
                    "open a new session with engine.session()")
            if self._busy:
                raise InvalidParameterError(f"session {self.id} is still answering its previous turn",
                                            "wait for (or cancel) the previous reply before sending the next turn")
            self._busy = True
        try:
            messages = self.messages + [dict(m) for m in new_messages]
            req = Request(prompt=messages, params=params or self.sampling, chat=True, session=self,
                          new_messages=list(new_messages), on_event=on_event)
            return self.engine.submit(req)
        except BaseException:
            with self._lock:
                self._busy = False
            raise

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


def iter_text(handle: "RequestHandle") -> Iterator[str]:
    for ev in handle.events():
        if ev.text:
            yield ev.text
