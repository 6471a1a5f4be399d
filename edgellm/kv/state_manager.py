"""Who owns which slot of the state pool: one live state per sequence, and a snapshot cache.

The recurrent models' counterpart of :class:`edgellm.kv.block_manager.BlockManager`, with the
methods the scheduler and engine call on either (``reserve``, ``commit``, ``truncate``,
``match_prefix``, ``trim``, ``free_sequence``, ``adopt``, ``counters``...), so the lifecycle --
admission, offload to host/disk, preemption, follow-up turns, retiring -- runs unchanged. What
differs is what a sequence holds (see ``edgellm.kv.state`` for why):

* **one live slot per sequence**, whatever its length: ``blocks_for(n)`` is 1 for any n > 0, and
  ``KVSequence.blocks`` is ``[live slot]``. The slot always holds the state after the sequence's
  last computed token (``token_ids``), so each chunk starts from it and writes it back. Cut back
  inside its history (an edited conversation), a sequence falls back to the furthest cached
  snapshot at or before the cut (else position 0).
* **a snapshot cache**: states at block edges of prompts, keyed by the prefix hash of the tokens
  before the edge, least recently used evicted first. It holds at most ``snapshot_capacity``
  snapshots, and gives up slots to live states on demand (like the block manager's cached
  blocks): evicting one never changes a result, only what a later prompt recomputes. A sequence
  admitted with a cached prefix copies the snapshot into its live slot (or, with no free slot,
  takes the snapshot's slot itself) and computes only the rest.

Which edges are snapshotted (a long prompt must not flood the cache, and a generation's edges are
hardly ever shared -- its end is the live state), only edges inside the prompt:

* the prompt's **last** block edge: a repeated prompt, or one that extends it, resumes there;
* edges at block index 1, 2, 4, 8, ...: a prefix shared with a later prompt (a system prompt,
  few-shot examples) is then resumed at no less than half its length, for log2(prompt blocks)
  snapshots per prompt;
* **branch points**: an edge that an earlier prompt also went through (its hash is in a bounded
  table of hashes seen, 16 bytes each) while the next edge is new to this prompt -- where prompts
  with a common prefix part. From the second prompt sharing a prefix on, the third and later
  resume at its last block edge exactly.

Snapshots are taken by the step that computes the edge: the plan of a chunk (``chunk_slots``)
gives the model a slot for every wanted edge inside the chunk, and an edge at the chunk's end is
copied from the live slot when the chunk is committed. A planned snapshot becomes visible to
lookups only at commit, so a failed step leaves none behind.
"""

from __future__ import annotations

import heapq
import sys
from collections import OrderedDict
from typing import Callable, Sequence

from edgellm.errors import InvalidParameterError
from edgellm.kv.block_manager import KVSequence, OutOfBlocks, block_hash
from edgellm.kv.state import StateSlots

#: hashes of prompt edges remembered for finding branch points (16 bytes each, ~100 with the table)
SEEN_HASHES = 1 << 16
#: "as many tokens as asked": a live state takes one slot whatever the length it reaches
UNBOUNDED = sys.maxsize


def default_snapshot_capacity(num_slots: int) -> int:
    """A quarter of the pool: live states keep three quarters of the slots to themselves (they
    take the rest too while the cache holds fewer snapshots), enough prefixes stay cached."""
    return num_slots // 4


class StateManager:
    #: one slot per sequence (not per block of tokens): the scheduler reclaims a slot before
    #: admitting a sequence that holds none
    per_sequence = True

    def __init__(self, num_slots: int, block_size: int, copy_slot: Callable[[int, int], None],
                 snapshot_capacity: int | None = None):
        """``copy_slot(src, dst)`` copies one slot's state (every layer); ``snapshot_capacity``:
        most snapshots kept (default :func:`default_snapshot_capacity`; 0: no prefix reuse)."""
        if num_slots < 1 or block_size < 1:
            raise ValueError(f"need at least one slot and a block of at least one token, got {num_slots} x {block_size}")
        if snapshot_capacity is None:
            snapshot_capacity = default_snapshot_capacity(num_slots)
        if isinstance(snapshot_capacity, bool) or not isinstance(snapshot_capacity, int) or snapshot_capacity < 0:
            raise InvalidParameterError(f"state_snapshots must be a non-negative integer, got {snapshot_capacity!r}",
                                        "use e.g. 64 (snapshots of prompt prefixes kept), or 0 for none")
        self.num_blocks = num_slots            # the block manager's name: the engine reads it for sizes
        self.block_size = block_size
        self.copy_slot = copy_slot
        self.snapshot_capacity = snapshot_capacity
        self.free: list[int] = list(range(num_slots))     # a heap: lowest id first
        self.live: set[int] = set()
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()    # hash -> slot, least recent first
        self.pending: dict[int, list[tuple[int, int, bytes]]] = {}  # id(seq) -> (edge, slot, hash)
        self.pending_hashes: set[bytes] = set()
        self.seen: OrderedDict[bytes, None] = OrderedDict()
        # running counters (for stats)
        self.hits = 0            # sequences resumed from a snapshot
        self.evictions = 0       # snapshots dropped to make room
        self.snapshots_taken = 0
        self.offloaded_host = 0  # set by the scheduler from the offload store (states)
        self.offloaded_disk = 0

    # ---- counts ---------------------------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        return sum(len(p) for p in self.pending.values())

    @property
    def num_used(self) -> int:
        """Slots held by sequences (live states, and snapshots being taken this step)."""
        return len(self.live) + self.num_pending

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached(self) -> int:
        return len(self.snapshots)

    @property
    def num_available(self) -> int:
        """Slots a live state can get now: free ones plus snapshots (evicted on demand)."""
        return len(self.free) + len(self.snapshots)

    def counters(self) -> dict[str, int]:
        return {"total": self.num_blocks, "used": self.num_used, "free": self.num_free, "cached": self.num_cached,
                "live": len(self.live), "snapshot_capacity": self.snapshot_capacity,
                "snapshots_taken": self.snapshots_taken, "offloaded_host": self.offloaded_host,
                "offloaded_disk": self.offloaded_disk, "prefix_hits": self.hits, "evictions": self.evictions,
                "dedups": 0, "cow_copies": 0}

    def blocks_for(self, n_tokens: int) -> int:
        """Slots a sequence of ``n_tokens`` tokens needs: one, whatever its length."""
        return 1 if n_tokens > 0 else 0

    def pages_needed(self, seq: KVSequence, n_tokens: int) -> int:
        """Slots ``reserve(seq, n_tokens)`` takes: one if ``seq`` has none yet."""
        return max(0, self.blocks_for(n_tokens) - len(seq.blocks))

    def room(self, seq: KVSequence) -> int:
        """Tokens ``seq`` can go on by with its slot or one it could get: any, or none (the
        block manager answers by its free blocks; a state does not grow)."""
        return UNBOUNDED if seq.blocks or self.num_available else 0

    def held(self, seq: KVSequence) -> list[int]:
        """The slots ``seq`` holds (its live state): what offload exports."""
        return list(seq.blocks)

    def detach(self, seq: KVSequence) -> None:
        """Give up ``seq``'s live slot after offload exported it; ``adopt`` gives a restored one."""
        for slot in reversed(seq.blocks):
            self.release(slot)
        seq.blocks = []

    # ---- slots ----------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A live slot: a free one, else the least recently used snapshot's."""
        if self.free:
            slot = heapq.heappop(self.free)
        elif self.snapshots:
            _, slot = self.snapshots.popitem(last=False)
            self.evictions += 1
        else:
            raise OutOfBlocks("the state pool has no free slot")
        self.live.add(slot)
        return slot

    def release(self, slot: int) -> None:
        """A live slot is given up (its sequence offloaded, freed or retired)."""
        if slot not in self.live:
            raise ValueError(f"slot {slot} is not a live state")
        self.live.discard(slot)
        heapq.heappush(self.free, slot)

    def _snapshot_slot(self) -> int | None:
        """A slot for a new snapshot within the capacity, evicting the least recently used one
        when the cache is full or no slot is free; None when every slot is a live or new state."""
        if self.snapshot_capacity == 0:
            return None
        if self.free and len(self.snapshots) + self.num_pending < self.snapshot_capacity:
            return heapq.heappop(self.free)
        if self.snapshots:
            _, slot = self.snapshots.popitem(last=False)
            self.evictions += 1
            return slot
        return None

    def clear_cache(self) -> int:
        """Forget every snapshot (their slots become free). Returns how many."""
        n = len(self.snapshots)
        for slot in self.snapshots.values():
            heapq.heappush(self.free, slot)
        self.snapshots.clear()
        return n

    # ---- sequences ------------------------------------------------------------------------------
    def reserve(self, seq: KVSequence, n_tokens: int) -> bool:
        """Make sure ``seq`` holds its live slot when it will hold ``n_tokens`` > 0 tokens."""
        if n_tokens <= 0 or seq.blocks:
            return True
        if not self.num_available:
            return False
        seq.blocks.append(self.allocate())
        return True

    def commit(self, seq: KVSequence, tokens: Sequence[int]) -> None:
        """``tokens`` were computed into ``seq``'s live state: record them, extend the prefix
        hashes, and publish the snapshots this step took of ``seq``'s edges."""
        seq.token_ids.extend(int(t) for t in tokens)
        self._extend_hashes(seq)
        n, keep = seq.num_tokens, []
        for edge, slot, h in self.pending.pop(id(seq), []):
            if edge > n:            # not computed (yet)
                keep.append((edge, slot, h))
                continue
            self.pending_hashes.discard(h)
            if edge == n:           # the chunk ended on the edge: the model wrote the live slot only
                self.copy_slot(seq.blocks[0], slot)
            if h in self.snapshots:  # another sequence published the same prefix meanwhile
                heapq.heappush(self.free, slot)
            else:
                self.snapshots[h] = slot
                self.snapshots_taken += 1
        if keep:
            self.pending[id(seq)] = keep

    def truncate(self, seq: KVSequence, n_tokens: int) -> None:
        """Cut ``seq`` back to at most ``n_tokens`` tokens: to the furthest cached snapshot at or
        before them (loaded into the live slot), else to nothing."""
        if n_tokens >= seq.num_tokens:
            self.trim(seq)
            return
        self._drop_pending(seq)
        bs = self.block_size
        edges = min(n_tokens // bs, len(seq.hashes))
        keep = 0
        for i in range(edges, 0, -1):
            slot = self.snapshots.get(seq.hashes[i - 1])
            if slot is not None:
                self.snapshots.move_to_end(seq.hashes[i - 1])
                self.copy_slot(slot, seq.blocks[0])
                self.hits += 1
                keep = i
                break
        del seq.token_ids[keep * bs:]
        del seq.hashes[keep:]

    def match_prefix(self, seq: KVSequence, tokens: Sequence[int], limit: int) -> int:
        """Move ``seq`` (whose tokens are a prefix of ``tokens``) forward to the furthest cached
        snapshot of ``tokens`` past its own end and within ``limit`` tokens. Returns tokens added."""
        bs, have = self.block_size, seq.num_tokens
        hashes = list(seq.hashes[:have // bs])
        while (len(hashes) + 1) * bs <= limit:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))
        for i in range(len(hashes), have // bs, -1):     # every edge i * bs here is past ``have``
            slot = self.snapshots.get(hashes[i - 1])
            if slot is None:
                continue
            if seq.blocks:
                self.snapshots.move_to_end(hashes[i - 1])
                self.copy_slot(slot, seq.blocks[0])
            elif self.free:
                self.snapshots.move_to_end(hashes[i - 1])
                seq.blocks.append(self.allocate())
                self.copy_slot(slot, seq.blocks[0])
            else:                   # no slot to copy into: the snapshot becomes the live state
                del self.snapshots[hashes[i - 1]]
                self.live.add(slot)
                seq.blocks.append(slot)
            self.hits += 1
            seq.token_ids[:] = tokens[:i * bs]
            seq.hashes[:] = hashes[:i]
            return i * bs - have
        return 0

    def trim(self, seq: KVSequence) -> None:
        """Forget snapshots planned past ``seq``'s computed tokens; a sequence with no token
        computed gives its slot back."""
        self._drop_pending(seq, beyond=seq.num_tokens)
        if seq.num_tokens == 0 and seq.blocks:
            for slot in seq.blocks:
                self.release(slot)
            seq.blocks.clear()

    def free_sequence(self, seq: KVSequence) -> None:
        """Give up ``seq``'s live slot (its snapshots stay in the cache) and empty it."""
        self._drop_pending(seq)
        for slot in seq.blocks:
            self.release(slot)
        seq.blocks.clear()
        seq.token_ids.clear()
        seq.hashes.clear()

    def adopt(self, seq: KVSequence, blocks: list[int]) -> None:
        """Give ``seq`` a freshly allocated slot holding its (restored) state."""
        seq.blocks = list(blocks)
        seq.hashes = []
        self._extend_hashes(seq)

    def _extend_hashes(self, seq: KVSequence) -> None:
        bs = self.block_size
        while len(seq.hashes) < seq.num_tokens // bs:
            i = len(seq.hashes)
            seq.hashes.append(block_hash(seq.hashes[-1] if seq.hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))

    def _drop_pending(self, seq: KVSequence, beyond: int = -1) -> None:
        keep = []
        for edge, slot, h in self.pending.pop(id(seq), []):
            if edge <= beyond:
                keep.append((edge, slot, h))
            else:
                self.pending_hashes.discard(h)
                heapq.heappush(self.free, slot)
        if keep:
            self.pending[id(seq)] = keep

    # ---- planning a step ------------------------------------------------------------------------
    def chunk_slots(self, seq: KVSequence, tokens: Sequence[int], prompt: Sequence[int]) -> StateSlots:
        """Where the chunk ``tokens`` (``seq``'s next ones) reads and writes its state, snapshots
        of the wanted prompt edges inside it included. ``prompt``: the sequence's prompt tokens
        (edges past it are not snapshotted)."""
        slots = StateSlots(seq.blocks[0])
        bs, start = self.block_size, seq.num_tokens
        end = start + len(tokens)
        last_edge = len(prompt) - len(prompt) % bs
        first = start // bs + 1
        if first * bs > min(end, last_edge):
            return slots
        # hashes of the edges from the sequence's last full block to one edge past the chunk
        upto = min(end + bs, last_edge) // bs
        hashes = list(seq.hashes[:start // bs])
        all_tokens = list(seq.token_ids) + list(tokens)
        while len(hashes) < upto:
            i = len(hashes)
            part = all_tokens[i * bs:(i + 1) * bs] if (i + 1) * bs <= len(all_tokens) else prompt[i * bs:(i + 1) * bs]
            hashes.append(block_hash(hashes[-1] if hashes else None, part))
        for i in range(first, min(end, last_edge) // bs + 1):
            h = hashes[i - 1]
            branch = h in self.seen and (i * bs == last_edge or hashes[i] not in self.seen)
            self._remember(h)
            wanted = i * bs == last_edge or i & (i - 1) == 0 or branch
            if not wanted or h in self.pending_hashes:
                continue
            if h in self.snapshots:
                self.snapshots.move_to_end(h)
                continue
            slot = self._snapshot_slot()
            if slot is None:
                break
            self.pending.setdefault(id(seq), []).append((i * bs, slot, h))
            self.pending_hashes.add(h)
            if i * bs < end:
                slots.snapshots.append((i * bs, slot))
        return slots

    def _remember(self, h: bytes) -> None:
        self.seen[h] = None
        self.seen.move_to_end(h)
        if len(self.seen) > SEEN_HASHES:
            self.seen.popitem(last=False)

    def check(self) -> None:
        """Consistency of the books (for tests): every slot in exactly one state."""
        free, live = set(self.free), set(self.live)
        cached = set(self.snapshots.values())
        pending = {slot for p in self.pending.values() for _, slot, _ in p}
        assert len(self.free) == len(free) and len(cached) == len(self.snapshots)
        for a, b in ((free, live), (free, cached), (free, pending), (live, cached), (live, pending), (cached, pending)):
            assert not a & b, (a & b)
        assert free | live | cached | pending == set(range(self.num_blocks))
        assert len(self.snapshots) + len(pending) <= self.snapshot_capacity
