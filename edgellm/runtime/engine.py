"""The engine: many sequences on one model, continuous batching over a paged KV pool.

::

    engine = Engine(LLM(), kv_memory="256MB", host_memory="1GB", disk_dir="/tmp/kv", idle_retire_s=600)
    s = engine.session(system="You are terse.", sampling=SamplingParams.greedy(max_tokens=64))
    for piece in s.send("Hello!"):          # streams the reply
        print(piece, end="")
    s.send("And then?").result()            # a TurnResult: text, tokens, cached/computed counts...
    s.close()                               # retire: blocks, host copy, disk file freed
    engine.generate(["a prompt", [1, 2, 3]], SamplingParams.greedy())   # offline batch
    engine.stats()                          # phases, tokens, blocks, offload, steps

Threading. All engine state is touched by whoever runs :meth:`Engine.step` (under one lock).
Without :meth:`Engine.start`, iterating a handle (or ``result()``) runs steps in the caller's
thread until that handle has news -- other requests advance in the same steps. With
``start()``, a background thread runs steps whenever there is work; :meth:`Engine.submit` (from
any thread: an asyncio server calls it and passes ``on_event`` that hops back into its loop
with ``call_soon_threadsafe``) only tokenises, validates and enqueues. A handle's events arrive
on a thread-safe queue; ``handle.cancel()`` takes effect at the start of the next step, which
frees the request's blocks.

Admission (at ``submit``, in the caller's thread, nothing else disturbed): an empty prompt or a
bad parameter raises ``InvalidParameterError``; a prompt at or beyond the model's context, or
needing more blocks than the whole pool has, raises ``ContextOverflowError``. ``max_tokens`` is
capped to what fits both (finish reason ``length``).
"""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence as Seq

import torch

from edgellm.errors import ContextOverflowError, EdgeLLMError, InvalidParameterError
from edgellm.kv.block_manager import BlockManager
from edgellm.kv.cache import BLOCK_SIZE, KVCache
from edgellm.kv.offload import OffloadStore
from edgellm.runtime.model_runner import ModelRunner, SeqChunk
from edgellm.runtime.scheduler import (DONE, PREEMPT_RECOMPUTE, PREEMPT_SWAP, RUNNING, Chunk, Scheduler,
                                       Sequence)
from edgellm.runtime.session import Phase, PhaseClock, Session, TurnResult
from edgellm.util import parse_size
from edgellm.sampling import FINISH_LENGTH, Sampler, SamplingParams, SequenceHistory, StopChecker

log = logging.getLogger("edgellm.engine")

FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"

# ---------------------------------------------------------------------------------------------
# Requests and their handles
# ---------------------------------------------------------------------------------------------
@dataclass
class Request:
    """What to generate: ``prompt`` as text, token ids or chat messages (list of dicts).

    Text is encoded plainly, or as a one-message chat when ``chat`` is true. ``session`` (set by
    ``Session.send``) makes it the session's next turn. ``sample_index`` tells apart the n
    completions of one seeded request. ``on_event(TokenEvent)`` is called from the engine's
    thread for every event (keep it short).
    """

    prompt: str | list[int] | list[dict]
    params: SamplingParams | None = None
    chat: bool = False
    session: Session | None = None
    sample_index: int = 0
    on_event: Callable[["TokenEvent"], None] | None = None
    new_messages: list[dict] | None = None   # the turn's messages (sessions)


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


class RequestHandle:
    """A submitted request: iterate for text pieces, ``events()`` for tokens, ``result()`` to wait,
    ``cancel()`` to stop it (its blocks are freed at the next step). Thread-safe."""

    def __init__(self, engine: "Engine", request: Request, n_prompt: int):
        self.engine = engine
        self.request = request
        self.prompt_tokens = n_prompt
        self._events: queue.Queue[TokenEvent] = queue.Queue()
        self._done = threading.Event()
        self._result: TurnResult | None = None
        self._error: BaseException | None = None
        self.cancel_requested = False
        self.seq: Sequence | None = None

    # engine side
    def _emit(self, ev: TokenEvent) -> None:
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
        self.engine._post(("cancel", self))


# ---------------------------------------------------------------------------------------------
# Step accounting
# ---------------------------------------------------------------------------------------------
@dataclass
class StepStats:
    steps: int = 0
    forward_s: float = 0.0
    sample_s: float = 0.0
    schedule_s: float = 0.0
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
             "schedule_s": self.schedule_s, "total_s": self.total_s, "max_batch_rows": self.max_batch_rows,
             "by_kind": {k: dict(v) for k, v in self.by_kind.items()}}
        dec = self.by_kind["decode"]
        d["decode_only_tok_s"] = dec["decode_tokens"] / dec["s"] if dec["s"] > 0 else 0.0
        return d


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, model_or_llm: Any = None, kv_memory: int | str = "256MB", block_size: int = BLOCK_SIZE,
                 max_batch_tokens: int = 512, max_batch_seqs: int = 256, host_memory: int | str | None = None,
                 disk_dir: str | None = None, disk_memory: int | str | None = None,
                 idle_retire_s: float | None = None, preemption: str = PREEMPT_RECOMPUTE,
                 kv_dtype=None, seed: int | None = None, threads: int | None = None):
        """``model_or_llm``: an :class:`edgellm.llm.LLM`, a ``LoadedModel``, or a model spec (path
        or registry name; None: the default model). ``kv_memory``: the pool's size;
        ``host_memory``: the host offload tier's budget (default: as large as the pool; 0 for
        none); ``disk_dir``: the disk tier's folder (none by default), ``disk_memory`` its budget;
        ``idle_retire_s``: retire sessions idle that long; ``preemption``: "recompute" or "swap";
        ``kv_dtype``: the pool's precision (a name or torch dtype; default: the LLM's ``kv_dtype``)."""
        from edgellm.llm import LLM, set_threads
        from edgellm.loading.load import LoadedModel

        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise InvalidParameterError(f"block_size must be a positive integer, got {block_size!r}",
                                        "use 16 (the default)")
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise InvalidParameterError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}",
                                        "use e.g. 512")
        if not isinstance(max_batch_seqs, int) or max_batch_seqs < 1:
            raise InvalidParameterError(f"max_batch_seqs must be a positive integer, got {max_batch_seqs!r}",
                                        "use e.g. 256")
        if preemption not in (PREEMPT_RECOMPUTE, PREEMPT_SWAP):
            raise InvalidParameterError(f"preemption must be 'recompute' or 'swap', got {preemption!r}",
                                        "use 'recompute' (default) or 'swap'")
        if idle_retire_s is not None and not (isinstance(idle_retire_s, (int, float)) and idle_retire_s > 0):
            raise InvalidParameterError(f"idle_retire_s must be a positive number of seconds, got {idle_retire_s!r}",
                                        "use e.g. 600, or None to keep idle sessions")
        pool_bytes = parse_size(kv_memory, "kv_memory")
        host_bytes = pool_bytes if host_memory is None else parse_size(host_memory, "host_memory")
        disk_bytes = None if disk_memory is None else parse_size(disk_memory, "disk_memory")

        if isinstance(model_or_llm, LLM):
            set_threads(threads)
            self.llm = model_or_llm
        elif isinstance(model_or_llm, LoadedModel):
            self.llm = LLM(loaded=model_or_llm, threads=threads)
        else:
            self.llm = LLM(model_or_llm, threads=threads)
        self.loaded = self.llm.loaded
        self.cfg = self.llm.cfg
        self.tokenizer = self.llm.tokenizer

        if kv_dtype is None:
            kv_dtype = getattr(self.llm, "kv_dtype", torch.float32)
        self.block_size = block_size
        self.kv_bytes_per_block = KVCache.bytes_per_block(self.cfg, block_size, kv_dtype)
        num_blocks = pool_bytes // self.kv_bytes_per_block
        if num_blocks < 1:
            raise InvalidParameterError(
                f"kv_memory={kv_memory!r} holds no KV block: one block of {block_size} tokens of this model "
                f"takes {self.kv_bytes_per_block} bytes",
                f"give kv_memory at least {self.kv_bytes_per_block} bytes (e.g. '256MB')")
        self.cache = KVCache(self.cfg, num_blocks, block_size, kv_dtype)
        self.block_manager = BlockManager(num_blocks, block_size, copy_block=self._copy_block)
        self.store = OffloadStore(host_bytes, disk_dir, disk_bytes)
        self.runner = ModelRunner(self.loaded.model, self.cache)
        self.sampler = Sampler(seed=seed)
        self.max_batch_tokens = max_batch_tokens
        self.idle_retire_s = idle_retire_s
        self.sessions: dict[int, Session] = {}      # live sessions (ephemeral ones included)
        self._reg_lock = threading.Lock()           # guards `sessions` and the id counter only
        self.scheduler = Scheduler(self.block_manager, self.cache, self.store, self.live_sessions,
                                   max_batch_tokens, max_batch_seqs, preemption)

        self._lock = threading.RLock()              # engine state; held for a whole step
        self._inbox: list[tuple] = []
        self._inbox_cv = threading.Condition()
        self._next_sid = 0
        self._arrivals = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.step_stats = StepStats()
        self.counts: Counter = Counter()
        self._retired_phase_s: Counter = Counter()
        self._retired_tokens: Counter = Counter()
        self._retired_sessions = 0
        self._retired_transitions = 0
        self._closed = False

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    @property
    def pool_tokens(self) -> int:
        return self.cache.num_blocks * self.block_size

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes_per_block / self.block_size

    def _copy_block(self, src: int, dst: int) -> None:
        self.cache.import_blocks([dst], self.cache.export_blocks([src]))

    # ---- sessions ------------------------------------------------------------------------------
    def session(self, system: str | None = None, sampling: SamplingParams | None = None) -> Session:
        """A new conversation (phase INACTIVE until its first ``send``)."""
        self._check_open()
        if system is not None and not isinstance(system, str):
            raise InvalidParameterError(f"system must be a string, got {type(system).__name__}",
                                        "pass the system message as a str, or None")
        s = self._new_session(system, sampling, ephemeral=False)
        if self.idle_retire_s is not None and not self.running_in_background:
            self.reap_idle()
        return s

    def _new_session(self, system, sampling, ephemeral: bool) -> Session:
        # No engine lock: creating a session never waits for a step (an asyncio server calls this).
        with self._reg_lock:
            self._next_sid += 1
            s = Session(self, self._next_sid, system, sampling, ephemeral=ephemeral)
            self.sessions[s.id] = s
            if not ephemeral:
                self.counts["sessions"] += 1
        return s

    def live_sessions(self) -> list[Session]:
        with self._reg_lock:
            return list(self.sessions.values())

    def retire(self, session: Session, reason: str = "closed") -> None:
        """Retire a session now: cancel its turn, free its KV in every tier."""
        if self.running_in_background and threading.current_thread() is not self._thread:
            done = threading.Event()
            self._post(("retire", session, reason, done))
            done.wait(timeout=60)
            return
        with self._lock:
            self._drain_inbox()
            self._retire(session, reason)

    def _retire(self, session: Session, reason: str) -> None:
        if session.retired:
            return
        seq = session.active_seq
        if seq is not None and seq.status != DONE:
            self._finish(seq, FINISH_CANCELLED, retire=False)
        self.scheduler.release_session(session)
        session.retire_reason = reason
        session.clock.to(Phase.RETIRED)
        with self._reg_lock:
            self.sessions.pop(session.id, None)
        self._retired_sessions += 1
        for p, sec in session.clock.phase_seconds().items():
            self._retired_phase_s[p] += sec
        self._retired_tokens.update(session.clock.tokens)
        self._retired_transitions += len(session.clock.transitions)
        self.counts[f"retired_{reason}"] += 1

    def reap_idle(self) -> int:
        """Retire sessions idle for more than ``idle_retire_s``. Returns how many."""
        if self.idle_retire_s is None:
            return 0
        now = time.perf_counter()
        with self._lock:
            idle = [s for s in self.live_sessions()
                    if not s.busy and not s.ephemeral and now - s.last_used > self.idle_retire_s]
            for s in idle:
                self._retire(s, "idle")
        return len(idle)

    def clear_prefix_cache(self) -> int:
        """Forget the unreferenced blocks of the prefix cache (they become free)."""
        with self._lock:
            return self.block_manager.clear_cache()

    # ---- submission ----------------------------------------------------------------------------
    def _encode(self, req: Request) -> list[int]:
        p = req.prompt
        if isinstance(p, str):
            if req.chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
            return self.tokenizer.encode(p)
        if isinstance(p, (list, tuple)) and p and all(isinstance(m, dict) for m in p):
            return self.tokenizer.encode_chat(list(p), add_generation_prompt=True)
        if isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = [int(t) for t in p]
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise InvalidParameterError(f"token id {bad[0]} is outside the vocabulary (0..{self.cfg.vocab_size - 1})",
                                            "pass ids produced by this model's tokenizer")
            return ids
        raise InvalidParameterError(f"a prompt must be text, token ids or chat messages, got {type(p).__name__}",
                                    "pass a str, a list of ints or a list of {'role', 'content'} dicts")

    def check_admission(self, n_prompt: int, what: str = "the prompt") -> None:
        """Raise unless a prompt of ``n_prompt`` tokens can ever run (context and pool)."""
        ctx = self.cfg.context_length
        if n_prompt == 0:
            raise InvalidParameterError(f"{what} is empty", "give at least one token of prompt")
        if n_prompt >= ctx:
            raise ContextOverflowError(f"{what} has {n_prompt} tokens but the model's context window is {ctx}",
                                       f"shorten it to fewer than {ctx} tokens (or start a new session)")
        if n_prompt >= self.pool_tokens:
            need = self.block_manager.blocks_for(n_prompt + 1)
            raise ContextOverflowError(
                f"{what} has {n_prompt} tokens, which need {need} KV blocks of {self.block_size} tokens, but the "
                f"whole KV pool holds {self.num_blocks} blocks ({self.pool_tokens} tokens, "
                f"{self.num_blocks * self.kv_bytes_per_block / 2 ** 20:.0f} MiB)",
                f"raise kv_memory to at least {math.ceil(need * self.kv_bytes_per_block / 2 ** 20) + 1}MB, "
                f"or shorten the prompt (or start a new session)")

    def submit(self, request: Request) -> RequestHandle:
        """Queue a request (thread-safe); returns its handle. Bad input raises here, nothing queued."""
        self._check_open()
        params = request.params or (request.session.sampling if request.session else SamplingParams())
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError(f"params must be SamplingParams, got {type(params).__name__}",
                                        "build them with edgellm.sampling.SamplingParams(...)")
        params.validate()
        if params.n != 1:
            raise InvalidParameterError(f"the engine runs one completion per request, got n={params.n}",
                                        "submit the prompt n times with sample_index 0..n-1")
        request.params = params
        ids = self._encode(request)
        self.check_admission(len(ids), "the conversation" if request.session else "the prompt")
        max_tokens = min(params.max_tokens, self.cfg.context_length - len(ids), self.pool_tokens - len(ids))
        handle = RequestHandle(self, request, len(ids))
        self._post(("submit", handle, ids, max_tokens, time.perf_counter()))
        return handle

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False) -> list[TurnResult]:
        """Run a batch of prompts (text, token ids or chat messages) to completion, batched together."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidParameterError(f"{len(plist)} sampling parameter sets for {len(prompts)} prompts",
                                        "pass one SamplingParams, or one per prompt")
        handles = []
        try:
            for p, sp in zip(prompts, plist):
                handles.append(self.submit(Request(prompt=p, params=sp, chat=chat)))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return [h.result() for h in handles]

    def _post(self, item: tuple) -> None:
        with self._inbox_cv:
            self._inbox.append(item)
            self._inbox_cv.notify()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidParameterError("the engine is closed", "create a new Engine")

    # ---- the inbox (runs under the lock) -------------------------------------------------------
    def _drain_inbox(self) -> bool:
        with self._inbox_cv:
            items, self._inbox = self._inbox, []
        for item in items:
            kind = item[0]
            if kind == "submit":
                self._enqueue(*item[1:])
            elif kind == "cancel":
                seq = item[1].seq
                if seq is not None and seq.status != DONE:
                    self._finish(seq, FINISH_CANCELLED)
            elif kind == "retire":
                _, session, reason, done = item
                self._retire(session, reason)
                done.set()
        return bool(items)

    def _enqueue(self, handle: RequestHandle, ids: list[int], max_tokens: int, t_submit: float) -> None:
        req = handle.request
        if handle.cancel_requested:
            handle._emit(TokenEvent(None, "", True, FINISH_CANCELLED, result=self._empty_result(handle, ids)))
            if req.session is not None:
                req.session._busy = False
            return
        session = req.session
        if session is None:
            session = self._new_session(None, req.params, ephemeral=True)
        elif session.retired:
            handle._emit(TokenEvent(None, "", True, FINISH_CANCELLED, result=self._empty_result(handle, ids)))
            session._busy = False
            return
        params = req.params
        self._arrivals += 1
        seq = Sequence(
            request=req, session=session, arrival=self._arrivals, prompt_ids=ids, params=params,
            max_tokens=max_tokens,
            history=SequenceHistory(ids, self.cfg.vocab_size, sample_index=req.sample_index),
            stop=StopChecker(params.stop, params.stop_token_ids, self.tokenizer.eog_ids, params.ignore_eos,
                             max_tokens),
            decoder=self.tokenizer.incremental_decoder(), handle=handle,
            prefill_phase=Phase.FOLLOWUP_PREFILL if session.turns > 0 else Phase.PREFILL, t_submit=t_submit)
        handle.seq = seq
        session.active_seq = seq
        session.clock.to(Phase.WAITING)
        self.scheduler.add(seq)
        self.counts["requests"] += 1

    def _empty_result(self, handle: RequestHandle, ids: list[int]) -> TurnResult:
        s = handle.request.session
        return TurnResult(text="", token_ids=[], prompt_tokens=len(ids), finish_reason=FINISH_CANCELLED,
                          ttft_s=0.0, prefill_s=0.0, decode_s=0.0, session_id=s.id if s else None)

    # ---- one step ------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        with self._inbox_cv:
            if self._inbox:
                return True
        return self.scheduler.has_work

    def step(self) -> bool:
        """Run one engine step: take in submissions/cancels, plan, one forward pass, sample,
        stream. Returns False when there was nothing to do. If the step fails, the requests it
        touched finish with reason ``error`` (their handles raise it) and the engine goes on."""
        with self._lock:
            try:
                return self._step()
            except Exception as err:
                seqs = self.scheduler.running + self.scheduler.waiting
                self._fail(seqs, err)
                if not self.running_in_background or threading.current_thread() is not self._thread:
                    raise
                return True

    def _step(self) -> bool:
        t0 = time.perf_counter()
        took = self._drain_inbox()
        if self.idle_retire_s is not None:
            self.reap_idle()
        chunks = self.scheduler.schedule()
        if not chunks:
            return took
        t1 = time.perf_counter()
        logits = self.runner.run([
            SeqChunk(c.tokens, c.start, self.cache.block_slots(c.seq.kv.blocks, c.start + len(c.tokens)),
                     c.want_logits) for c in chunks])
        t2 = time.perf_counter()
        n_decode = n_prefill = 0
        wanting: list[Chunk] = []
        for c in chunks:
            seq, n = c.seq, len(c.tokens)
            self.block_manager.commit(seq.kv, c.tokens)
            s = seq.session
            recomputed = max(0, min(c.start + n, s.kv_high_water) - c.start)
            s.kv_high_water = max(s.kv_high_water, c.start + n)
            if recomputed:
                s.clock.tokens["recomputed"] += recomputed
            if c.phase == Phase.DECODE:
                n_decode += n
                s.clock.tokens["decode"] += n
            else:
                n_prefill += n
                s.clock.tokens[c.phase.value] += n
                in_prompt = max(0, min(c.start + n, len(seq.prompt_ids)) - c.start)
                seq.computed_prompt += in_prompt
            if c.want_logits:
                wanting.append(c)
        if wanting:
            self._sample(wanting, logits)
        t3 = time.perf_counter()
        st = self.step_stats
        st.steps += 1
        st.schedule_s += t1 - t0
        st.forward_s += t2 - t1
        st.sample_s += t3 - t2
        st.total_s += t3 - t0
        st.max_batch_rows = max(st.max_batch_rows, len(chunks))
        st.add(n_decode, n_prefill, t3 - t1)
        return True

    def _sample(self, wanting: list[Chunk], logits: torch.Tensor) -> None:
        seqs = [c.seq for c in wanting]
        out = self.sampler.sample(logits, [s.params for s in seqs], [s.history for s in seqs])
        now = time.perf_counter()
        for row, seq in enumerate(seqs):
            tok = out.token_ids[row]
            seq.history.append(tok)
            seq.out_ids.append(tok)
            s = seq.session
            s.clock.tokens["generated"] += 1
            if seq.t_first_token is None:
                seq.t_first_token = now
            if s.phase != Phase.DECODE:
                s.clock.to(Phase.DECODE, now)
            lp = top = None
            if seq.params.wants_logprobs:
                lp, top = out.logprobs[row], out.top_logprobs[row] or []
                seq.logprobs.append(lp)
                seq.top_logprobs.append(top)
            upd = seq.stop.step(tok, seq.decoder.add(tok))
            if upd.text:
                seq.pieces.append(upd.text)
            if upd.finished:
                self._finish(seq, upd.finish_reason, last=(tok, upd.text, lp, top))
            else:
                seq.handle._emit(TokenEvent(tok, upd.text, logprob=lp, top_logprobs=top))

    def _finish(self, seq: Sequence, reason: str, last: tuple | None = None, retire: bool = True,
                error: BaseException | None = None) -> None:
        now = time.perf_counter()
        self.scheduler.remove(seq)
        seq.t_end = now
        s = seq.session
        if reason in (FINISH_CANCELLED, FINISH_ERROR):
            tail = seq.stop.flush()
            if tail:
                seq.pieces.append(tail)
        text = "".join(seq.pieces)
        first = seq.t_first_token
        result = TurnResult(
            text=text, token_ids=list(seq.out_ids), prompt_tokens=len(seq.prompt_ids), finish_reason=reason,
            ttft_s=(first - seq.t_submit) if first else 0.0,
            prefill_s=(first - seq.t_scheduled) if first and seq.t_scheduled else 0.0,
            decode_s=(now - first) if first else 0.0, logprobs=seq.logprobs, top_logprobs=seq.top_logprobs,
            cached_tokens=seq.cached_tokens or 0, computed_prompt_tokens=seq.computed_prompt,
            preemptions=seq.preemptions,
            queue_s=(seq.t_scheduled - seq.t_submit) if seq.t_scheduled else now - seq.t_submit,
            session_id=None if s.ephemeral else s.id)
        # The session keeps the KV of what was computed (its next turn reuses it).
        self.block_manager.trim(s.kv)
        s.active_seq = None
        s.last_used = now
        s.turns += 1
        self.counts["finished"] += 1
        self.counts[f"finish_{reason}"] += 1
        if not s.ephemeral:
            s.results.append(result)
            s.messages = s.messages + [dict(m) for m in (seq.request.new_messages or [])] + \
                [{"role": "assistant", "content": text}]
            s.clock.to(self.scheduler._idle_phase(s), now)
        s._busy = False
        if s.ephemeral and retire:
            self._retire(s, "finished")
        ev_tok, ev_text, lp, top = last if last else (None, "", None, None)
        seq.handle._emit(TokenEvent(ev_tok, ev_text, True, reason, lp, top, result=result, error=error))

    def _fail(self, seqs: list[Sequence], err: BaseException) -> None:
        log.error("engine step failed: %s", err)
        for seq in seqs:
            if seq.status != DONE:
                self.block_manager.trim(seq.kv)
                self._finish(seq, FINISH_ERROR, error=err)

    # ---- background thread ---------------------------------------------------------------------
    @property
    def running_in_background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        """Run steps in a background thread (for servers); ``stop()`` ends it."""
        self._check_open()
        if self.running_in_background:
            return self
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="edgellm-engine", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        idle_wait = 0.5 if self.idle_retire_s is None else min(0.5, self.idle_retire_s / 4)
        while not self._stopping:
            try:
                worked = self.step()
            except BaseException:   # step() already failed the requests of the bad pass
                log.exception("engine step raised")
                worked = True
            if not worked:
                with self._inbox_cv:
                    if not self._inbox and not self._stopping:
                        self._inbox_cv.wait(timeout=idle_wait)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        with self._inbox_cv:
            self._inbox_cv.notify_all()
        self._thread.join()
        self._thread = None

    def close(self) -> None:
        """Stop the thread, cancel what runs, retire every session, delete offload files."""
        if self._closed:
            return
        self.stop()
        with self._lock:
            self._drain_inbox()
            for s in self.live_sessions():
                self._retire(s, "engine closed")
            self.store.clear()
        self._closed = True

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.store.clear()
        except Exception:
            pass

    # ---- pressure and introspection --------------------------------------------------------------
    def offload_idle(self, n: int | None = None) -> int:
        """Move the KV of up to ``n`` (default all) idle sessions out of the pool, least recently
        used first -- what memory pressure does, on demand. Returns how many moved."""
        moved = 0
        with self._lock:
            self._drain_inbox()
            while n is None or moved < n:
                victim = self.scheduler._lru_idle(exclude=None)
                if victim is None:
                    break
                self.scheduler.offload(victim)
                moved += 1
        return moved

    def stats(self) -> dict:
        """Phases (seconds and tokens, over every session this engine had), blocks, offload, steps."""
        with self._lock:
            now = time.perf_counter()
            phase_s = Counter(self._retired_phase_s)
            tokens = Counter(self._retired_tokens)
            by_phase = Counter()
            live = self.live_sessions()
            for s in live:
                phase_s.update(s.clock.phase_seconds(now))
                tokens.update(s.clock.tokens)
                by_phase[s.phase.value] += 1
            bm = self.block_manager
            return {
                "sessions": {"live": sum(not s.ephemeral for s in live), "in_flight_requests": sum(s.ephemeral for s in live), "retired": self._retired_sessions,
                             "by_phase": dict(by_phase)},
                "phase_s": {p.value: phase_s.get(p.value, 0.0) for p in Phase},
                "tokens": dict(tokens),
                "blocks": bm.counters(),
                "kv": {"block_size": self.block_size, "bytes_per_block": self.kv_bytes_per_block,
                       "bytes_per_token": self.kv_bytes_per_token, "pool_bytes": self.cache.nbytes,
                       "pool_tokens": self.pool_tokens},
                "offload": self.store.counters(),
                "scheduler": {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                              "preemptions": self.scheduler.preempted_total, "offloads": self.scheduler.offloads,
                              "restores": self.scheduler.restores, "drops": self.scheduler.drops},
                "steps": self.step_stats.to_dict(),
                "requests": dict(self.counts),
            }
