"""The scheduler: which tokens of which sequences go into the next forward pass, and where KV lives.

Each engine step runs *one* forward pass (``ModelRunner.run``) over a token budget
(``max_batch_tokens``). The scheduler fills it in this order:

1. **Decode rows** of running sequences, highest priority (earliest arrival) first: one token
   each, plus room for ``seq.spec_want`` proposed tokens where speculative decoding wants it
   (spare blocks only). A long prompt never delays them.
2. **Prefill chunks** of running sequences still computing their prompt (chunked prefill): as
   many prompt tokens as the rest of the budget allows, one chunk per sequence.
3. **Admission** of waiting sequences, in arrival order (a preempted sequence keeps its arrival
   and so goes first): its KV is made ready -- brought back from host/disk if it was offloaded,
   cut back to the longest prefix of the new prompt it holds, extended with cached blocks of
   the prefix cache -- and its first chunk is scheduled in the same step.

Memory. Blocks are reserved before the pass for every token it writes (for a recurrent model,
``bm`` is a :class:`~edgellm.kv.state_manager.StateManager`: one slot per sequence, whatever its
length, and cached snapshots in place of cached blocks). When the pool runs short, the scheduler
reclaims, cheapest first:

* cached blocks (unreferenced, in the prefix cache) are evicted by the block manager itself;
* the least recently used *idle* session (inactive, or queued but not yet admitted) moves its KV
  to the offload store (host memory, then disk, else dropped: recompute);
* for a decode token only: the lowest-priority running sequence (latest arrival) is
  **preempted** -- by recompute (its blocks freed; full ones stay in the prefix cache, so what
  was not evicted is found again) or by swap (its KV goes to the offload store) -- and
  re-queued; if the requester itself is the lowest, it preempts itself.

A prefill never preempts a running sequence; it waits. When no sequence can move at all (two
prompts each holding half the pool), the lowest-priority one is preempted so the others can.
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING, Callable

from edgellm.kv.block_manager import BlockManager, OutOfBlocks
from edgellm.kv.cache import KVCache
from edgellm.kv.offload import DISK, HOST, OffloadStore
from edgellm.kv.state import StatePool
from edgellm.kv.state_manager import StateManager
from edgellm.runtime.types import (
    DONE,
    PREEMPT_RECOMPUTE,
    PREEMPT_SWAP,
    RUNNING,
    TIER_DISK,
    TIER_HOST,
    TIER_NONE,
    TIER_POOL,
    WAITING,
    Chunk,
    Phase,
    Sequence,
)

if TYPE_CHECKING:
    from edgellm.runtime.session import Session


def common_prefix(a: list[int], b: list[int], limit: int | None = None) -> int:
    """How many leading tokens ``a`` and ``b`` share (at most ``limit``)."""
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    i = 0
    # compare in slices first: most of a conversation matches
    step = 256
    while i + step <= n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    def __init__(self, bm: BlockManager | StateManager, cache: KVCache | StatePool, store: OffloadStore, sessions: Callable[[], list[Session]],
                 max_batch_tokens: int = 512, max_batch_seqs: int = 256, preemption: str = PREEMPT_RECOMPUTE):
        self.bm = bm
        self.cache = cache
        self.store = store
        self.sessions = sessions            # every live session (for reclaiming idle ones)
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_seqs = max_batch_seqs
        self.preemption = preemption
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preempted_total = 0
        self.offloads = 0
        self.restores = 0
        self.drops = 0

    # ---- queues ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        bisect.insort(self.waiting, seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = DONE

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the plan of one step ------------------------------------------------------------------
    def schedule(self) -> list[Chunk]:
        preempted_before = self.preempted_total
        for _ in range(len(self.running) + 2):
            chunks = self._plan(preempted_before)
            if chunks or not self.running:
                return chunks
            # Nobody could move: free the lowest-priority sequence's blocks for the others.
            self.preempt(self.running[-1])
        return []

    def _plan(self, preempted_before: int) -> list[Chunk]:
        budget = self.max_batch_tokens
        chunks: list[Chunk] = []
        # 1. decode rows
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != RUNNING or seq.num_pending != 1:
                continue
            if not self._reserve(seq, seq.num_tokens):
                continue
            chunk = self._chunk(seq, 1)
            chunk.draft_room = self._draft_room(seq, min(seq.spec_want, budget - 1))
            chunks.append(chunk)
            budget -= 1 + chunk.draft_room
        # 2. prefill chunks of admitted sequences
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != RUNNING or seq.num_pending <= 1:
                continue
            n = self._reserve_upto(seq, min(seq.num_pending, budget))
            if n:
                chunks.append(self._chunk(seq, n))
                budget -= n
        # 3. admissions (not in a step that had to preempt: the pool is full)
        preempted_now = self.preempted_total != preempted_before
        while (not preempted_now and self.waiting and budget > 0
               and len(self.running) < self.max_batch_seqs):
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.pop(0)
            seq.status = RUNNING
            bisect.insort(self.running, seq)
            n = self._reserve_upto(seq, min(seq.num_pending, budget))
            if n:
                chunks.append(self._chunk(seq, n))
                budget -= n
        return chunks

    def _chunk(self, seq: Sequence, n: int) -> Chunk:
        start = seq.kv.num_tokens
        toks = seq.pending(n)
        if seq.t_scheduled is None:
            seq.t_scheduled = time.perf_counter()
        return Chunk(seq, toks, start, want_logits=start + n == seq.num_tokens, phase=seq.session.phase)

    # ---- blocks --------------------------------------------------------------------------------
    def _reserve(self, seq: Sequence, n_tokens: int) -> bool:
        """Blocks for ``n_tokens`` positions of a decoding sequence; may preempt lower priorities
        (or, failing that, ``seq`` itself: then False)."""
        need = self.bm.pages_needed(seq.kv, n_tokens)   # a page per layer group per new block
        if need <= 0:
            return True
        if not self._reclaim(need, seq, allow_preempt=True):
            self.preempt(seq)
            return False
        return self.bm.reserve(seq.kv, n_tokens)

    def _draft_room(self, seq: Sequence, k: int) -> int:
        """Positions for up to ``k`` proposed tokens past a decoding sequence's pending one: blocks
        it holds, then free or cached ones -- never by offloading or preempting anyone (a
        proposal is only worth what is spare)."""
        if k <= 0:
            return 0
        if not self.bm.reserve(seq.kv, seq.num_tokens + k):
            k = min(k, seq.kv.capacity(self.bm.block_size) - seq.num_tokens)
        return max(0, k)

    def _reserve_upto(self, seq: Sequence, n: int) -> int:
        """Reserve blocks for up to ``n`` more tokens of a prefilling sequence; how many fit."""
        kv = seq.kv
        start = kv.num_tokens
        need = self.bm.pages_needed(kv, start + n)
        if need > self.bm.num_available:
            self._reclaim(need, seq, allow_preempt=False)
        n = min(n, self.bm.room(kv))
        if n <= 0:
            return 0
        self.bm.reserve(kv, start + n)
        return n

    def _reclaim(self, need: int, requester: Sequence, allow_preempt: bool) -> bool:
        """Make ``need`` blocks available: offload idle sessions (LRU), then preempt running
        sequences of lower priority than ``requester`` (when allowed)."""
        while self.bm.num_available < need:
            victim = self.lru_idle(exclude=requester.session)
            if victim is not None:
                self.offload(victim)
                continue
            if allow_preempt:
                lower = [s for s in self.running if s.arrival > requester.arrival and s is not requester]
                if lower:
                    self.preempt(lower[-1])
                    continue
            return False
        return True

    def lru_idle(self, exclude: Session) -> Session | None:
        best = None
        for s in self.sessions():
            if s is exclude or self.kv_tier(s) != TIER_POOL or not s.kv.blocks or s.retired:
                continue
            seq = getattr(s, "active_seq", None)
            if seq is not None and seq.status == RUNNING:
                continue
            if best is None or s.last_used < best.last_used:
                best = s
        return best

    # ---- moving KV -----------------------------------------------------------------------------
    def offload(self, session: Session, phase: Phase | None = None) -> None:
        """Move a session's KV out of the pool into the offload store (host, disk, or dropped)."""
        kv = session.kv
        self.bm.trim(kv)
        if not kv.blocks:
            self._drop(session)
            return
        pages = self.bm.held(kv)    # every layer group's (a sliding group's window only)
        saved = self.cache.export_blocks(pages)
        n = len(pages)
        self.bm.detach(kv)
        self.offloads += 1
        dropped = self.store.put(session.key, saved, n)
        by_key = {s.key: s for s in self.sessions()}
        for key in dropped:
            if key in by_key:
                self._drop(by_key[key])
        self._sync_tiers(by_key)
        if phase is not None:
            session.clock.to(phase)
        elif session.phase in (Phase.INACTIVE, Phase.OFFLOADED_HOST, Phase.OFFLOADED_DISK):
            session.clock.to(self.idle_phase(session))

    def _sync_tiers(self, by_key: dict[str, Session]) -> None:
        """Entries that spilled from host to disk: their sessions' phase follows."""
        for key in self.store.entries:
            s = by_key.get(key)
            if s is not None and s.phase in (Phase.OFFLOADED_HOST, Phase.OFFLOADED_DISK):
                s.clock.to(self.idle_phase(s))
        self.bm.offloaded_host = self.store.blocks_in(HOST)
        self.bm.offloaded_disk = self.store.blocks_in(DISK)

    def kv_tier(self, s: Session) -> str:
        """Where a session's KV is: the pool, an offload tier, or nowhere (recomputed when needed)."""
        tier = self.store.tier(s.key)
        if tier is not None:
            return TIER_HOST if tier == HOST else TIER_DISK
        return TIER_POOL if s.kv.blocks else TIER_NONE

    def idle_phase(self, s: Session) -> Phase:
        return {TIER_HOST: Phase.OFFLOADED_HOST, TIER_DISK: Phase.OFFLOADED_DISK}.get(self.kv_tier(s), Phase.INACTIVE)

    def _drop(self, session: Session) -> None:
        """Forget a session's KV (its next turn recomputes the history)."""
        self.store.discard(session.key)
        self.bm.free_sequence(session.kv)
        self.drops += 1
        if session.phase in (Phase.OFFLOADED_HOST, Phase.OFFLOADED_DISK):
            session.clock.to(Phase.INACTIVE)

    def release_session(self, session: Session) -> None:
        """Free a session's KV in every tier (retiring)."""
        self.store.discard(session.key)
        self.bm.free_sequence(session.kv)
        self.bm.offloaded_host = self.store.blocks_in(HOST)
        self.bm.offloaded_disk = self.store.blocks_in(DISK)

    def preempt(self, seq: Sequence) -> None:
        """Take a running sequence's blocks away and re-queue it; it resumes without losing a token."""
        if seq in self.running:
            self.running.remove(seq)
        seq.preemptions += 1
        self.preempted_total += 1
        if self.preemption == PREEMPT_SWAP:
            self.offload(seq.session, Phase.PREEMPTED)
        else:
            self.bm.free_sequence(seq.kv)
            seq.session.clock.to(Phase.PREEMPTED)
        self.add(seq)

    def _restore(self, seq: Sequence) -> bool:
        s = seq.session
        key = s.key
        if key not in self.store:
            self._drop(s)
            return True
        n = self.store.entries[key].n_blocks
        if self.bm.num_available < n and not self._reclaim(n, seq, allow_preempt=False):
            return False
        saved = self.store.take(key)
        self._sync_tiers({x.key: x for x in self.sessions()})
        if saved is None:          # unreadable file: recompute
            self._drop(s)
            return True
        blocks = [self.bm.allocate() for _ in range(n)]
        self.cache.import_blocks(blocks, saved)
        self.bm.adopt(s.kv, blocks)
        self.restores += 1
        return True

    def _admit(self, seq: Sequence) -> bool:
        """Ready a waiting sequence's KV: restore it, keep the longest prefix of its tokens it
        holds, take what the prefix cache has. False when the blocks to restore are not there."""
        s = seq.session
        if self.kv_tier(s) in (TIER_HOST, TIER_DISK):
            if not self._restore(seq):
                return False
        kv = s.kv
        tokens = seq.all_tokens()
        limit = len(tokens) - 1          # at least one token is computed, for its logits
        keep = common_prefix(kv.token_ids, tokens, limit)
        if keep < kv.num_tokens and not self.cache.resumes_mid_block:
            # a recurrent state: snapshots at block edges only (truncate goes back to a cached one)
            keep -= keep % self.bm.block_size
        if keep < kv.num_tokens:
            try:
                self.bm.truncate(kv, keep)
            except OutOfBlocks:          # no block for copy-on-write: recompute from a block edge
                self.bm.truncate(kv, keep - keep % self.bm.block_size)
        else:
            self.bm.trim(kv)
        self.bm.match_prefix(kv, tokens, limit)
        if seq.cached_tokens is None:
            seq.cached_tokens = min(kv.num_tokens, len(seq.prompt_ids))
            s.clock.tokens["reused"] += seq.cached_tokens
        s.clock.to(Phase.DECODE if seq.out_ids and seq.num_pending == 1 else seq.prefill_phase)
        return True
