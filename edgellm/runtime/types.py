"""The runtime's shared vocabulary: what a request is, what comes back, and the state in between.

Every module of the runtime imports from here and from nowhere above it, so data can flow one
way: request -> input (encode, admit) -> scheduler -> runner -> sampler -> output -> stream.

* :class:`Request` in, :class:`TokenEvent` per generated token out, :class:`TurnResult` (a
  :class:`Completion` with the runtime's counts) at the end.
* :class:`Phase` and :class:`PhaseClock`: a conversation's explicit, timestamped phases.
* :class:`Sequence` (one request in flight) and :class:`Chunk` (its share of one forward pass):
  the scheduler's units of work.
* :class:`StepStats`: where the engine's steps spend their time.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from edgellm.sampling import SamplingParams, SequenceHistory, StopChecker

# Finish reasons beyond the sampler's "stop" and "length".
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"

# A sequence's place in the scheduler.
WAITING, RUNNING, DONE = "waiting", "running", "done"
# What happens to a running sequence's KV when the pool runs out.
PREEMPT_RECOMPUTE, PREEMPT_SWAP = "recompute", "swap"
# Where a session's KV is: in the pool, in an offload tier, or nowhere (recomputed when needed).
TIER_POOL, TIER_HOST, TIER_DISK, TIER_NONE = "pool", "host", "disk", "none"

MAX_TRANSITIONS = 10_000   # a session keeps its most recent transitions only


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


# ---------------------------------------------------------------------------------------------
# What comes back
# ---------------------------------------------------------------------------------------------
@dataclass
class Completion:
    """One generated completion with its timings (all wall clock, ``time.perf_counter``).

    ``ttft_s``: from the request's arrival (before tokenising) to the first token chosen;
    ``prefill_s``: from its first scheduled step to the first token; ``decode_s``: from the first
    token to the last (``completion_tokens - 1`` decode steps). ``speculative`` (speculative
    decoding only): ``{"method", "proposed", "accepted", "steps"}`` -- the tokens proposed and
    accepted over the request's ``steps`` verify passes.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    ttft_s: float
    prefill_s: float
    decode_s: float
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    speculative: dict | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes out of prefill; decode made the rest.
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason,
                "ttft_s": self.ttft_s, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                **({"speculative": dict(self.speculative)} if self.speculative is not None else {})}


@dataclass
class TurnResult(Completion):
    """One finished request (a session's turn or an offline prompt).

    Beyond :class:`Completion`: ``cached_tokens`` -- prompt tokens whose KV was already held (the
    session's own history or the shared prefix cache) and not computed;
    ``computed_prompt_tokens`` -- prompt tokens the forward passes actually computed (more than
    ``prompt_tokens - cached_tokens`` only after a preemption or a dropped offload);
    ``preemptions``; ``queue_s`` -- arrival to first scheduled step.
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


@dataclass
class TokenEvent:
    """One generated token (``token_id``), the text it released (maybe ""), and on the last event
    ``finished`` with ``finish_reason`` and the whole ``result``; ``error`` when the engine failed."""

    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list | None = None
    result: TurnResult | None = None
    error: BaseException | None = None


# ---------------------------------------------------------------------------------------------
# What goes in
# ---------------------------------------------------------------------------------------------
@dataclass
class Request:
    """What to generate: ``prompt`` as text, token ids or chat messages (list of dicts).

    Text is encoded plainly, or as a one-message chat when ``chat`` is true (with ``system`` as
    its system message, if given). ``session`` (set by ``Session.send``) makes it the session's
    next turn. ``sample_index`` tells apart the n completions of one seeded request.
    ``on_event(TokenEvent)`` is called from the engine's thread for every event (keep it short).
    """

    prompt: str | list[int] | list[dict]
    params: SamplingParams | None = None
    chat: bool = False
    session: Any = None                      # an edgellm.runtime.session.Session
    sample_index: int = 0
    on_event: Callable[[TokenEvent], None] | None = None
    new_messages: list[dict] | None = None   # the turn's messages (sessions)
    system: str | None = None


# ---------------------------------------------------------------------------------------------
# The scheduler's units of work
# ---------------------------------------------------------------------------------------------
@dataclass
class Sequence:
    """One request in flight: a prompt (for a session: the whole conversation rendered) and its output."""

    request: Request
    session: Any                    # the edgellm.runtime.session.Session whose KV it uses
    arrival: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    history: SequenceHistory
    stop: StopChecker
    decoder: Any                    # the tokenizer's incremental decoder
    handle: Any = None              # the edgellm.runtime.session.RequestHandle it reports to
    prefill_phase: Phase = Phase.PREFILL
    out_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    status: str = WAITING
    cached_tokens: int | None = None
    computed_prompt: int = 0
    preemptions: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    t_scheduled: float | None = None
    t_first_token: float | None = None
    t_end: float | None = None
    spec: Any = None                # its edgellm.runtime.speculative.SpecState (speculative engines)
    spec_want: int = 0              # positions to reserve for proposed tokens in the next step

    def __lt__(self, other: "Sequence") -> bool:   # bisect by priority
        return self.arrival < other.arrival

    @property
    def kv(self):
        return self.session.kv

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.out_ids)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.kv.num_tokens

    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.out_ids

    def pending(self, limit: int) -> list[int]:
        start, p = self.kv.num_tokens, len(self.prompt_ids)
        toks = self.prompt_ids[start:start + limit] if start < p else []
        rest = limit - len(toks)
        if rest > 0:
            o = max(0, start - p)
            toks = toks + self.out_ids[o:o + rest]
        return toks


@dataclass
class Chunk:
    """A sequence's share of one forward pass: ``tokens`` from position ``start``."""

    seq: Sequence
    tokens: list[int]
    start: int
    want_logits: bool
    phase: Phase
    draft_room: int = 0      # positions reserved past the pending token for proposed ones
    verify: bool = False     # tokens = the pending token + proposed ones, each a row with logits


# ---------------------------------------------------------------------------------------------
# Step accounting
# ---------------------------------------------------------------------------------------------
@dataclass
class StepStats:
    steps: int = 0
    forward_s: float = 0.0
    sample_s: float = 0.0
    schedule_s: float = 0.0
    draft_s: float = 0.0            # proposing tokens (speculative decoding with a model proposer)
    total_s: float = 0.0
    by_kind: dict = field(default_factory=lambda: {k: {"steps": 0, "s": 0.0, "decode_tokens": 0, "prefill_tokens": 0}
                                                   for k in ("decode", "prefill", "mixed")})
    max_batch_rows: int = 0

    def add(self, n_decode: int, n_prefill: int, seconds: float) -> None:
        kind = "mixed" if n_decode and n_prefill else ("decode" if n_decode else "prefill")
        k = self.by_kind[kind]
        k["steps"] += 1
        k["s"] += seconds
        k["decode_tokens"] += n_decode
        k["prefill_tokens"] += n_prefill

    def to_dict(self) -> dict:
        d = {"steps": self.steps, "forward_s": self.forward_s, "sample_s": self.sample_s,
             "schedule_s": self.schedule_s, "draft_s": self.draft_s, "total_s": self.total_s, "max_batch_rows": self.max_batch_rows,
             "by_kind": {k: dict(v) for k, v in self.by_kind.items()}}
        dec = self.by_kind["decode"]
        d["decode_only_tok_s"] = dec["decode_tokens"] / dec["s"] if dec["s"] > 0 else 0.0
        return d
