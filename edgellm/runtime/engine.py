"""The engine: many sequences on one model, continuous batching over a paged KV pool.

::

    engine = Engine("smollm2-135m", kv_memory="256MB", host_memory="1GB", disk_dir="/tmp/kv", idle_retire_s=600)
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

The engine is split the way its data flows: ``input.py`` (encode, admit), this module's core
(schedule -> run -> sample), ``output.py`` (detokenise, stop strings, logprobs, results); the
types they share are in ``types.py`` and the user's handles (``Session``, ``RequestHandle``) in
``session.py``.

Admission (at ``submit``, in the caller's thread, nothing else disturbed): an empty prompt or a
bad parameter raises ``InvalidParameterError``; a prompt at or beyond the model's context, or
needing more blocks than the whole pool has, raises ``ContextOverflowError``. ``max_tokens`` is
capped to what fits both (finish reason ``length``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from edgellm.errors import InvalidParameterError
from edgellm.kv.block_manager import BlockManager
from edgellm.kv.cache import BLOCK_SIZE, KVCache, KVLayout
from edgellm.kv.offload import OffloadStore
from edgellm.kv.state import StatePool, check_state_dtype
from edgellm.kv.state_manager import StateManager
from edgellm.quant.activations import activations_name, set_activations
from edgellm.runtime.input import InputProcessor
from edgellm.runtime.model_runner import ModelRunner, SeqChunk, sequence_slots
from edgellm.runtime.output import append_token, build_result, stop_checker
from edgellm.runtime.scheduler import Scheduler
from edgellm.runtime.session import RequestHandle, Session
from edgellm.runtime.speculative import SpeculativeConfig, Speculator, parse_speculative
from edgellm.runtime.types import (
    DONE,
    FINISH_CANCELLED,
    FINISH_ERROR,
    PREEMPT_RECOMPUTE,
    PREEMPT_SWAP,
    Chunk,
    Phase,
    Request,
    Sequence,
    StepStats,
    TokenEvent,
    TurnResult,
)
from edgellm.sampling import Sampler, SamplingParams, SequenceHistory
from edgellm.util import parse_size, set_threads

log = logging.getLogger("edgellm.engine")


def resolve_model(model: Any) -> tuple[Any, str]:
    """(LoadedModel, KV dtype name) from an ``LLM`` (anything with ``.loaded``), a ``LoadedModel``,
    or a model spec (a path or registry name; None: the default model)."""
    from edgellm.loading.load import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model, "fp32"
    if hasattr(model, "loaded"):
        return model.loaded, getattr(model, "kv_dtype", "fp32")
    return load_model(model), "fp32"


def is_recurrent(loaded) -> bool:
    """Whether the model keeps a recurrent state (Mamba, RWKV) instead of a KV cache."""
    return getattr(loaded.model, "recurrent", False)


def pool_bytes_per_block(loaded, block_size: int, kv_dtype, split: bool = False) -> int:
    """Bytes of one block of the model's pool: the KV of ``block_size`` tokens (with sliding-window
    layers, of one group of layers: ``KVLayout.for_model``), or for a recurrent model one slot --
    one sequence's whole state, whatever its length (``edgellm.kv.state``). ``split``: a model split
    across ranks (one table, all layers)."""
    if is_recurrent(loaded):
        check_state_dtype(kv_dtype)
        return StatePool.bytes_per_state(loaded.model.state_shapes(), loaded.config.n_layers)
    layout = None if split else KVLayout.for_model(loaded.config)
    return KVCache.bytes_per_block(loaded.config, block_size, kv_dtype, layout)


def pool_blocks_for(loaded, n_tokens: int, block_size: int, chunk: int = 0) -> int:
    """Blocks of the pool one sequence of ``n_tokens`` tokens needs, prefilled in chunks of
    ``chunk`` tokens: a sliding-window group's are bounded by its window (``KVLayout.pages_held``);
    a recurrent model's sequence needs one slot, whatever its length."""
    if is_recurrent(loaded):
        return 1
    return KVLayout.for_model(loaded.config).pages_held(n_tokens, block_size, chunk)


def refuse_speculation(loaded, speculative) -> None:
    """Speculative decoding verifies proposals and keeps the accepted ones' KV; a recurrent state
    cannot drop the rejected tokens it has absorbed, so it is refused for such models."""
    if speculative is not None and is_recurrent(loaded):
        raise InvalidParameterError(
            f"speculative decoding is not supported for the recurrent model '{loaded.config.architecture}' "
            "(its state cannot take back rejected proposals)", "drop --speculative for this model")


class Engine:
    def __init__(self, model_or_llm: Any = None, kv_memory: int | str = "256MB", block_size: int = BLOCK_SIZE,
                 max_batch_tokens: int = 512, max_batch_seqs: int = 256, host_memory: int | str | None = None,
                 disk_dir: str | None = None, disk_memory: int | str | None = None,
                 idle_retire_s: float | None = None, preemption: str = PREEMPT_RECOMPUTE,
                 kv_dtype=None, seed: int | None = None, threads: int | None = None,
                 speculative: str | SpeculativeConfig | None = None, draft_tokens: int | None = None,
                 state_snapshots: int | None = None, activations: str | None = None):
        """``model_or_llm``: an :class:`edgellm.llm.LLM`, a ``LoadedModel``, or a model spec (path
        or registry name; None: the default model). ``kv_memory``: the pool's size;
        ``host_memory``: the host offload tier's budget (default: as large as the pool; 0 for
        none); ``disk_dir``: the disk tier's folder (none by default), ``disk_memory`` its budget;
        ``idle_retire_s``: retire sessions idle that long; ``preemption``: "recompute" or "swap";
        ``kv_dtype``: the pool's precision (a name or torch dtype; default: the LLM's ``kv_dtype``);
        ``speculative``: speculative decoding -- "ngram", "early-exit:L" or "draft:MODEL" (see
        ``edgellm.runtime.speculative``), with at most ``draft_tokens`` proposed per step; the
        tokens are those of plain decoding (greedy: identical; sampled: the same distribution).
        ``state_snapshots`` (recurrent models only): most block-edge snapshots of prompts kept for
        prefix reuse (default: a quarter of the pool's slots; ``edgellm.kv.state_manager``);
        ``activations``: "int8" or "fp32" sets the model's activation precision (see
        ``edgellm.quant.activations``; it is the model's, so engines sharing a model share it),
        None leaves it as it is."""
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
        if speculative is None:           # an LLM's own setting, if it has one
            speculative = getattr(model_or_llm, "speculative", None)
        spec_config = parse_speculative(speculative, draft_tokens)
        pool_bytes = parse_size(kv_memory, "kv_memory")
        host_bytes = pool_bytes if host_memory is None else parse_size(host_memory, "host_memory")
        disk_bytes = None if disk_memory is None else parse_size(disk_memory, "disk_memory")

        set_threads(threads)
        self.loaded, default_kv_dtype = resolve_model(model_or_llm)
        if activations is not None:
            if getattr(model_or_llm, "parallel", None) is not None and activations_name(activations) == "int8":
                raise InvalidParameterError("int8 activations do not run on a model split across ranks",
                                            "drop activations=, or use a model in one process")
            set_activations(self.loaded.model, activations)
        self.cfg = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        if kv_dtype is None:
            kv_dtype = default_kv_dtype
        self.block_size = block_size
        refuse_speculation(self.loaded, spec_config)
        if state_snapshots is not None and not is_recurrent(self.loaded):
            raise InvalidParameterError(
                f"state_snapshots was given for '{self.cfg.architecture}', which keeps a KV cache, not a recurrent "
                "state", "drop state_snapshots / --state-snapshots (it applies to Mamba, Mamba-2 and RWKV only)")
        split = getattr(model_or_llm, "parallel", None)   # an LLM split across ranks (runtime.parallel_runner)
        self.kv_bytes_per_block = pool_bytes_per_block(self.loaded, block_size, kv_dtype, split is not None)
        num_blocks = pool_bytes // self.kv_bytes_per_block
        if num_blocks < 1 and is_recurrent(self.loaded):
            raise InvalidParameterError(
                f"kv_memory={kv_memory!r} holds no recurrent state: one sequence's state of this model takes "
                f"{self.kv_bytes_per_block} bytes",
                f"give kv_memory at least {self.kv_bytes_per_block} bytes (e.g. '256MB')")
        if num_blocks < 1:
            raise InvalidParameterError(
                f"kv_memory={kv_memory!r} holds no KV block: one block of {block_size} tokens of this model "
                f"takes {self.kv_bytes_per_block} bytes",
                f"give kv_memory at least {self.kv_bytes_per_block} bytes (e.g. '256MB')")
        if split is not None:   # each rank holds its share of every block's KV; the pool's bytes are for all ranks
            check_split_engine(spec_config, disk_dir, preemption, host_memory)
            host_bytes = 0          # KV moved out of the pool is dropped (recomputed when needed)
            self.runner = split.runner(num_blocks, block_size, kv_dtype)
            self.cache = self.runner.cache
        else:
            if is_recurrent(self.loaded):   # a slot holds one sequence's state, not block_size tokens of KV
                self.cache = StatePool(self.loaded.model.state_shapes(), self.cfg.n_layers, num_blocks, block_size)
            else:
                # sliding-window layers on block tables of their own, which give back what leaves the window
                self.cache = KVCache(self.cfg, num_blocks, block_size, kv_dtype, KVLayout.for_model(self.cfg))
            self.runner = ModelRunner(self.loaded.model, self.cache)
        self.layout = getattr(self.cache, "layout", None) or KVLayout.single(self.cfg.n_layers)
        if isinstance(self.cache, StatePool):   # one live slot per sequence, and a snapshot cache
            self.block_manager = StateManager(num_blocks, block_size, self.cache.copy_block, state_snapshots)
        else:
            self.block_manager = BlockManager(num_blocks, block_size, copy_block=self.cache.copy_block,
                                              windows=self.layout.windows)
        self.store = OffloadStore(host_bytes, disk_dir, disk_bytes)
        self.speculator = None if spec_config is None else Speculator(spec_config, self.runner, self.loaded)
        # a recurrent state does not grow: the pool bounds how many sequences, not how long
        pool_tokens = (self.cfg.context_length if self.per_sequence_state
                       else self.layout.max_tokens(num_blocks, block_size, self.cfg.context_length))
        self.input = InputProcessor(self.tokenizer, self.cfg.context_length, self.cfg.vocab_size,
                                    pool_tokens, block_size, self.kv_bytes_per_block)
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
        self._step_seqs: list[Sequence] | None = None   # the sequences of the step in progress
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
    def per_sequence_state(self) -> bool:
        """Whether the pool holds a fixed-size state per sequence (a recurrent model) rather than
        KV per token."""
        return isinstance(self.cache, StatePool)

    @property
    def pool_tokens(self) -> int:
        """The longest sequence the pool holds (sliding-window layers hold only their window; a
        recurrent model: its whole context)."""
        return self.input.pool_tokens

    @property
    def kv_bytes_per_token(self) -> float:
        """What one more token of a long sequence costs: the full-attention layers' KV only, once
        the sliding-window layers hold their whole window (a recurrent state: nothing)."""
        if self.per_sequence_state:
            return 0.0
        full_groups = sum(w is None for w in self.layout.windows)
        return self.kv_bytes_per_block * full_groups / self.block_size

    def kv_bytes(self, n_tokens: int) -> int:
        """Bytes of KV that ``n_tokens`` tokens take in whole blocks (a sliding-window layer's bounded)."""
        if self.per_sequence_state:
            return self.kv_bytes_per_block * self.block_manager.blocks_for(n_tokens)
        return self.kv_bytes_per_block * self.layout.pages_held(n_tokens, self.block_size)

    def kv_tier(self, session: Session) -> str:
        """Where a session's KV is: "pool", "host", "disk", or "none"."""
        return self.scheduler.kv_tier(session)

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
    def submit(self, request: Request) -> RequestHandle:
        """Queue a request (thread-safe); returns its handle. Bad input raises here, nothing queued."""
        t_submit = time.perf_counter()   # the request's arrival: TTFT counts tokenising too
        self._check_open()
        params = request.params or (request.session.sampling if request.session else SamplingParams())
        request.params = self.input.check_params(params)
        ids = self.input.encode(request.prompt, request.chat, request.system)
        max_tokens = self.input.budget(len(ids), params.max_tokens,
                                       what="the conversation" if request.session else "the prompt")
        handle = RequestHandle(self, request, len(ids))
        self._post(("submit", handle, ids, max_tokens, t_submit))
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Stop a request; it finishes with reason ``cancelled`` at the start of the next step."""
        self._post(("cancel", handle))

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
        for item in items:       # each on its own: one that fails fails only its own request
            kind = item[0]
            try:
                if kind == "submit":
                    self._enqueue(*item[1:])
                elif kind == "cancel":
                    seq = item[1].seq
                    if seq is not None and seq.status != DONE:
                        self._finish(seq, FINISH_CANCELLED)
                elif kind == "retire":
                    _, session, reason, done = item
                    try:
                        self._retire(session, reason)
                    finally:
                        done.set()
            except Exception as err:
                log.error("engine inbox item %r failed: %s", kind, err)
                if kind == "submit":
                    self._refuse(item[1], item[2], err)
        return bool(items)

    def _refuse(self, handle: RequestHandle, ids: list[int], err: BaseException) -> None:
        """End a submitted request that could not be queued: its handle raises ``err``."""
        seq = handle.seq
        if seq is not None and seq.status != DONE:     # queued before it failed
            self._finish(seq, FINISH_ERROR, error=err)
            return
        if seq is None:
            session = handle.request.session
            if session is not None and session.active_seq is None:
                session.end_turn()
            handle.deliver(TokenEvent(None, "", True, FINISH_ERROR,
                                      result=self._empty_result(handle, ids, FINISH_ERROR), error=err))

    def _enqueue(self, handle: RequestHandle, ids: list[int], max_tokens: int, t_submit: float) -> None:
        req = handle.request
        session = req.session
        if handle.cancel_requested or (session is not None and session.retired):
            handle.deliver(TokenEvent(None, "", True, FINISH_CANCELLED, result=self._empty_result(handle, ids)))
            if session is not None:
                session.end_turn()
            return
        params = req.params
        # What can fail is built first, before anything is registered (see _refuse).
        history = SequenceHistory(ids, self.cfg.vocab_size, sample_index=req.sample_index,
                                  constraint=self.input.constraint(params))
        stop = stop_checker(params, self.tokenizer.eog_ids, max_tokens)
        decoder = self.tokenizer.incremental_decoder()
        if session is None:
            session = self._new_session(None, req.params, ephemeral=True)
        self._arrivals += 1
        seq = Sequence(
            request=req, session=session, arrival=self._arrivals, prompt_ids=ids, params=params,
            max_tokens=max_tokens, history=history, stop=stop, decoder=decoder, handle=handle,
            prefill_phase=Phase.FOLLOWUP_PREFILL if session.turns > 0 else Phase.PREFILL, t_submit=t_submit)
        if self.speculator is not None:
            seq.spec = self.speculator.new_state()
        handle.seq = seq
        session.active_seq = seq
        session.clock.to(Phase.WAITING)
        self.scheduler.add(seq)
        self.counts["requests"] += 1

    def _empty_result(self, handle: RequestHandle, ids: list[int], reason: str = FINISH_CANCELLED) -> TurnResult:
        s = handle.request.session
        return TurnResult(text="", token_ids=[], prompt_tokens=len(ids), finish_reason=reason,
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
        stream. Returns False when there was nothing to do.

        A row that cannot be sampled (its logits NaN or infinite) or whose output fails ends only
        its own request, with reason ``error``; the rest of the batch goes on. If the step itself
        fails (the forward pass), the requests it ran finish with reason ``error`` (their handles
        raise it) and the engine goes on; a failure before anything was scheduled fails every
        queued request."""
        with self._lock:
            self._step_seqs = None
            try:
                return self._step()
            except Exception as err:
                seqs = self._step_seqs
                if seqs is None:
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
        spec = self.speculator
        if spec is not None:
            spec.plan([s for s in self.scheduler.running if s.num_pending == 1 and s.out_ids], self.cfg.vocab_size)
        chunks = self.scheduler.schedule()
        if not chunks:
            return took
        self._step_seqs = [c.seq for c in chunks]
        t_draft = time.perf_counter()
        if spec is not None:
            spec.propose(chunks, lambda kv, length: sequence_slots(self.cache, kv, length))
        t1 = time.perf_counter()
        logits = self.runner.run([SeqChunk(c.tokens, c.start, self._slots(c), c.want_logits, c.verify)
                                  for c in chunks])
        t2 = time.perf_counter()
        n_decode = n_prefill = 0
        wanting: list[Chunk] = []
        for c in chunks:
            if c.want_logits:
                wanting.append(c)
            if c.verify:        # its KV is committed once the sampler has said how much was accepted
                continue
            n = len(c.tokens)
            self._commit(c, n)
            if c.phase == Phase.DECODE:
                n_decode += n
            else:
                n_prefill += n
        if wanting:
            n_decode += self._sample(wanting, logits)
        t3 = time.perf_counter()
        if spec is not None and n_prefill == 0:
            spec.record_step(sum(len(c.tokens) for c in chunks), t2 - t1)
        st = self.step_stats
        st.steps += 1
        st.schedule_s += t_draft - t0
        st.draft_s += t1 - t_draft
        st.forward_s += t2 - t1
        st.sample_s += t3 - t2
        st.total_s += t3 - t0
        st.max_batch_rows = max(st.max_batch_rows, len(chunks))
        st.add(n_decode, n_prefill, t3 - t1)
        return True

    def _slots(self, c: Chunk):
        """Where chunk ``c`` reads and writes: its cache slots, or for a recurrent model its live
        state slot and the prompt-edge snapshots it takes (planned by the state manager)."""
        if self.per_sequence_state:
            return self.block_manager.chunk_slots(c.seq.kv, c.tokens, c.seq.prompt_ids)
        return sequence_slots(self.cache, c.seq.kv, c.start + len(c.tokens))

    def _commit(self, c: Chunk, n: int) -> None:
        """The first ``n`` tokens of chunk ``c`` are computed: record them in the block manager and
        in the session's counts."""
        seq = c.seq
        self.block_manager.commit(seq.kv, c.tokens[:n])
        s = seq.session
        recomputed = max(0, min(c.start + n, s.kv_high_water) - c.start)
        s.kv_high_water = max(s.kv_high_water, c.start + n)
        if recomputed:
            s.clock.tokens["recomputed"] += recomputed
        if c.phase == Phase.DECODE:
            s.clock.tokens["decode"] += n
        else:
            s.clock.tokens[c.phase.value] += n
            seq.computed_prompt += max(0, min(c.start + n, len(seq.prompt_ids)) - c.start)

    def _sample(self, wanting: list[Chunk], logits) -> int:
        """Choose the next token(s) of every chunk that wants logits, and stream them. A verify
        chunk has a row per token; its proposals are accepted while the target's choice equals
        them, and its KV is committed up to the last accepted one. Returns the decode tokens
        committed by verify chunks."""
        first_row, row = [], 0
        for c in wanting:
            first_row.append(row)
            row += len(c.tokens) if c.verify else 1
        # Rows whose choice does not depend on the tokens accepted before them are sampled in one
        # call; a verify chunk whose choices read the history as it grows (penalties, a grammar's
        # state) row by row.
        batched = [i for i, c in enumerate(wanting)
                   if not (c.verify and (c.seq.params.has_penalties or c.seq.history.constraint is not None))]
        rows, params, hists, drafts = [], [], [], []
        for i in batched:
            c = wanting[i]
            for j in range(len(c.tokens) if c.verify else 1):
                rows.append(first_row[i] + j)
                params.append(c.seq.params)
                hists.append(c.seq.history)
                drafts.append(c.tokens[j + 1] if c.verify and j + 1 < len(c.tokens) else None)
        out, where = None, {}
        if rows:
            sub = logits if len(rows) == logits.shape[0] else logits[rows]
            out = self.sampler.sample(sub, params, hists, errors="row",
                                      drafts=drafts if any(d is not None for d in drafts) else None)
            where = {r: j for j, r in enumerate(rows)}
        committed = 0
        in_batch = set(batched)
        for i, c in enumerate(wanting):
            if i in in_batch:
                picks = (_pick(out, where[first_row[i] + j]) for j in range(len(c.tokens) if c.verify else 1))
            else:
                picks = self._sample_in_turn(c, logits, first_row[i])
            committed += self._emit(c, picks)
        return committed

    def _sample_in_turn(self, c: Chunk, logits, first_row: int):
        """The rows of a verify chunk sampled one at a time, each after the previous token was
        appended to the history (penalties see it)."""
        seq = c.seq
        for j in range(len(c.tokens)):
            draft = [c.tokens[j + 1]] if j + 1 < len(c.tokens) else None
            out = self.sampler.sample(logits[first_row + j:first_row + j + 1], [seq.params], [seq.history],
                                      errors="row", drafts=draft)
            yield _pick(out, 0)

    def _emit(self, c: Chunk, picks) -> int:
        """Append a chunk's chosen tokens to its sequence and stream them. For a verify chunk: stop
        at the first token that differs from the proposal (it replaces it) or that ends the
        request; commit the KV of the tokens plain decoding would hold by then; account the
        proposal. Returns the decode tokens committed (verify chunks only)."""
        seq = c.seq
        drafts = c.tokens[1:] if c.verify else []
        now = time.perf_counter()
        events, failed, accepted = [], None, 0
        for j, (tok, lp, top, why) in enumerate(picks):
            if why is not None:
                failed = why
                break
            try:
                upd = append_token(seq, tok, lp, top, now)
            except Exception as err:        # this request's output failed; the others go on
                failed = err
                break
            events.append((tok, upd, lp, top))
            hit = j < len(drafts) and tok == drafts[j]
            accepted += hit
            if upd.finished or not hit:
                break
        committed = 0
        if c.verify:
            # The pending token and the accepted proposals before the last token: what plain
            # decoding would hold in KV now. The blocks reserved past them are released.
            committed = max(1, len(events))
            self._commit(c, committed)
            self.block_manager.trim(seq.kv)
            self.speculator.record(seq, len(drafts), accepted, len(events))
        s = seq.session
        for tok, upd, lp, top in events:
            s.clock.tokens["generated"] += 1
            if s.phase != Phase.DECODE:
                s.clock.to(Phase.DECODE, now)
            if upd.finished:
                self._finish(seq, upd.finish_reason, last=(tok, upd.text, lp, top))
                return committed
            seq.handle.deliver(TokenEvent(tok, upd.text, logprob=lp, top_logprobs=top))
        if failed is not None:
            err = failed if isinstance(failed, BaseException) else InvalidParameterError(
                f"this request's next token could not be sampled: {failed}",
                "lower repetition_penalty / presence_penalty / frequency_penalty, or retry; "
                "other requests were not affected")
            self._fail([seq], err)
        return committed

    def _finish(self, seq: Sequence, reason: str, last: tuple | None = None, retire: bool = True,
                error: BaseException | None = None) -> None:
        now = time.perf_counter()
        self.scheduler.remove(seq)
        if self.speculator is not None:
            self.speculator.release(seq)
        seq.t_end = now
        s = seq.session
        result = build_result(seq, reason, now, None if s.ephemeral else s.id)
        # The session keeps the KV of what was computed (its next turn reuses it).
        self.block_manager.trim(s.kv)
        s.active_seq = None
        s.last_used = now
        s.turns += 1
        self.counts["finished"] += 1
        self.counts[f"finish_{reason}"] += 1
        if not s.ephemeral:
            s.results.append(result)
            if reason not in (FINISH_CANCELLED, FINISH_ERROR):   # a failed or cancelled turn is not history
                s.messages = s.messages + [dict(m) for m in (seq.request.new_messages or [])] + \
                    [{"role": "assistant", "content": result.text}]
            s.clock.to(self.scheduler.idle_phase(s), now)
        s.end_turn()
        if s.ephemeral and retire:
            self._retire(s, "finished")
        ev_tok, ev_text, lp, top = last if last else (None, "", None, None)
        seq.handle.deliver(TokenEvent(ev_tok, ev_text, True, reason, lp, top, result=result, error=error))

    def _fail(self, seqs: list[Sequence], err: BaseException) -> None:
        log.error("engine step failed: %s", err)
        for seq in seqs:
            if seq.status != DONE:
                self.block_manager.trim(seq.kv)
                self._finish(seq, FINISH_ERROR, error=err)

    # ---- background thread ---------------------------------------------------------------------
    @property
    def running_in_background(self) -> bool:
        # a split model whose rank died is not running either (the server answers 503)
        return self._thread is not None and self._thread.is_alive() and getattr(self.runner, "healthy", True)

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
                victim = self.scheduler.lru_idle(exclude=None)
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
                "kv": self._pool_stats(),
                "offload": self.store.counters(),
                "scheduler": {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                              "preemptions": self.scheduler.preempted_total, "offloads": self.scheduler.offloads,
                              "restores": self.scheduler.restores, "drops": self.scheduler.drops},
                "steps": self.step_stats.to_dict(),
                "speculative": self.speculator.stats() if self.speculator is not None else None,
                "requests": dict(self.counts),
            }

    def _pool_stats(self) -> dict:
        out = {"block_size": self.block_size, "bytes_per_block": self.kv_bytes_per_block,
               "bytes_per_token": self.kv_bytes_per_token, "pool_bytes": self.cache.nbytes,
               "pool_tokens": self.pool_tokens, **self._window_stats()}
        if self.per_sequence_state:   # a "block" is one sequence's state; snapshots are a bounded cache
            bm = self.block_manager
            out.update(per_sequence=True, bytes_per_sequence=self.kv_bytes_per_block,
                       snapshot_capacity=bm.snapshot_capacity, snapshot_bytes=bm.num_cached * self.kv_bytes_per_block)
        return out

    def _window_stats(self) -> dict:
        """The bounded cost of sliding-window layers (none for a model without them)."""
        windows = [w for w in self.layout.windows if w is not None]
        if not windows:
            return {}
        # what a sequence's sliding layers hold at most, whatever its length
        most = sum(-(-w // self.block_size) + 1 for w in windows)
        return {"layers_per_block": self.layout.width, "groups": len(self.layout.windows),
                "sliding_groups": len(windows), "windows": sorted(set(windows)),
                "sliding_blocks_per_sequence_max": most,
                "sliding_bytes_per_sequence_max": self.kv_bytes_per_block * most}


def check_split_engine(speculative, disk_dir, preemption: str, host_memory) -> None:
    """Refuse the engine options a model split across ranks does not support."""
    if speculative is not None:
        raise InvalidParameterError("speculative decoding cannot run on a model split across ranks yet",
                                    "drop --speculative, or drop --pipeline-parallel/--tensor-parallel")
    if disk_dir is not None or preemption == PREEMPT_SWAP or host_memory:
        raise InvalidParameterError("KV offload (--host-memory, --offload-dir, --preemption swap) is not available "
                                    "on a model split across ranks", "drop those options: preempted KV is recomputed")


def _pick(out, j: int) -> tuple:
    """(token, logprob, top logprobs, why it failed or None) of row ``j`` of a sampler output."""
    why = out.failed.get(j)
    lp = out.logprobs[j]
    return out.token_ids[j], lp, (out.top_logprobs[j] or []) if lp is not None else None, why
