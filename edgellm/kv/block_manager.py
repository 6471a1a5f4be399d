"""Who owns which block of the KV pool: reference counts, a free list and a prefix cache.

The pool (:class:`edgellm.kv.cache.KVCache`) is ``num_blocks`` blocks of ``block_size`` token
slots. A sequence's KV lives in the blocks of its :class:`KVSequence` (its block table), in order:
position ``p`` is slot ``p % block_size`` of block ``blocks[p // block_size]``.

Prefix hashing. Once a block is full (``block_size`` computed tokens), it is identified by a hash
of its tokens chained with the hash of the block before it -- so the hash names the tokens of the
block *and every token before it*, which fixes the block's keys and values. A table maps hashes to
blocks; a new sequence whose first full blocks have hashes in the table takes those blocks
(reference count + 1) instead of computing them. Sessions that share a system prompt thus share
its blocks, and a follow-up turn reuses every block of its conversation.

Block states::

    free     ref == 0, no hash          on the free list, handed out first (lowest id first)
    used     ref >= 1                   in at least one block table
    cached   ref == 0, hash registered  nobody holds it, but its KV is still valid: a later
                                        sequence with the same prefix takes it back; evicted
                                        (least recently released first) when the free list is
                                        empty and a block is needed

Copy-on-write. Only full blocks are ever shared, and a full block is never written again, except
when a sequence is cut back (:meth:`BlockManager.truncate`) to a length inside a block: then a
shared last block is copied to a private one first, and a private one loses its hash.

This module knows nothing of sessions or scheduling; ``edgellm.runtime.scheduler`` decides who
gets blocks, and ``edgellm.kv.offload`` holds KV that left the pool.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Hash of a full block: its token ids chained with the hash of the block before (None: first)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\x00" * 16)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def prefix_hashes(tokens: Sequence[int], block_size: int, n_blocks: int | None = None) -> list[bytes]:
    """Chained hashes of the first ``n_blocks`` full blocks of ``tokens`` (default: all full blocks)."""
    full = len(tokens) // block_size
    n = full if n_blocks is None else min(n_blocks, full)
    out: list[bytes] = []
    parent = None
    for i in range(n):
        parent = block_hash(parent, tokens[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class OutOfBlocks(RuntimeError):
    """No free or cached block is left; the scheduler reclaims (offload, preempt) and retries."""


@dataclass
class KVSequence:
    """The KV a sequence holds in the pool: the tokens whose keys/values are computed, their blocks.

    ``blocks`` may run ahead of ``token_ids`` (blocks reserved for tokens about to be computed);
    ``hashes[i]`` is the chained hash of block ``i`` for every full block.
    """

    token_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def capacity(self, block_size: int) -> int:
        return len(self.blocks) * block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16,
                 copy_block: Callable[[int, int], None] | None = None):
        """``copy_block(src, dst)`` copies a block's contents (every layer); needed for copy-on-write."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.copy_block = copy_block
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.block_of: dict[bytes, int] = {}
        # A min-heap: the lowest free id is handed out first, so a sequence alone in the pool gets
        # consecutive blocks and the runner reads its history as one slice instead of through an
        # index (KVCache.block_slots).
        self.free: list[int] = list(range(num_blocks))
        self.cached: OrderedDict[int, None] = OrderedDict()   # ref 0 + hashed, oldest release first
        # Running counters (for stats)
        self.hits = 0          # blocks taken from the prefix cache (by hash)
        self.evictions = 0     # cached blocks reused for other contents
        self.dedups = 0        # blocks computed twice concurrently, merged on registration
        self.cow_copies = 0
        self.offloaded_host = 0  # set by the engine from the offload store (blocks' worth of KV)
        self.offloaded_disk = 0

    # ---- counts ----------------------------------------------------------------------------
    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free) - len(self.cached)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    @property
    def num_available(self) -> int:
        """Blocks a sequence can get now: free ones plus cached ones (evicted on demand)."""
        return len(self.free) + len(self.cached)

    def counters(self) -> dict[str, int]:
        return {"total": self.num_blocks, "used": self.num_used, "free": self.num_free,
                "cached": self.num_cached, "offloaded_host": self.offloaded_host,
                "offloaded_disk": self.offloaded_disk, "prefix_hits": self.hits,
                "evictions": self.evictions, "dedups": self.dedups, "cow_copies": self.cow_copies}

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def tokens_room(self, seq: KVSequence) -> int:
        """Positions ``seq`` can reach with its blocks and every available one (the state
        manager of a recurrent model answers differently: its states do not grow)."""
        return (len(seq.blocks) + self.num_available) * self.block_size

    # ---- single blocks ---------------------------------------------------------------------
    def allocate(self) -> int:
        """A block with ref 1 and no hash: from the free list, else the least recently cached."""
        if self.free:
            b = heapq.heappop(self.free)
        elif self.cached:
            b, _ = self.cached.popitem(last=False)
            h = self.hash_of[b]
            if h is not None and self.block_of.get(h) == b:
                del self.block_of[h]
            self.hash_of[b] = None
            self.evictions += 1
        else:
            raise OutOfBlocks("the KV pool has no free block")
        self.ref[b] = 1
        return b

    def acquire(self, b: int) -> None:
        """One more holder of block ``b`` (a cached block becomes used again)."""
        if self.ref[b] == 0:
            if b in self.cached:
                del self.cached[b]
            else:   # a free block has no contents anyone could want
                raise ValueError(f"block {b} is free; allocate() it instead")
        self.ref[b] += 1

    def release(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise ValueError(f"block {b} released more often than acquired")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.hash_of[b] is not None:
                self.cached[b] = None          # newest at the end
            else:
                heapq.heappush(self.free, b)

    def lookup(self, h: bytes) -> int | None:
        return self.block_of.get(h)

    def _unregister(self, b: int) -> None:
        h = self.hash_of[b]
        if h is not None and self.block_of.get(h) == b:
            del self.block_of[h]
        self.hash_of[b] = None

    def clear_cache(self) -> int:
        """Forget every cached (unreferenced) block: they become free. Returns how many."""
        n = len(self.cached)
        for b in list(self.cached):
            self._unregister(b)
            heapq.heappush(self.free, b)
        self.cached.clear()
        return n

    # ---- sequences -------------------------------------------------------------------------
    def match_prefix(self, seq: KVSequence, tokens: Sequence[int], limit: int) -> int:
        """Extend an empty-or-block-aligned ``seq`` (whose tokens are a prefix of ``tokens``) with
        cached full blocks of ``tokens``, up to ``limit`` tokens in all. Returns tokens added."""
        bs = self.block_size
        if seq.num_tokens % bs or len(seq.blocks) != len(seq.hashes):
            return 0
        added = 0
        i = len(seq.hashes)
        parent = seq.hashes[-1] if seq.hashes else None
        while (i + 1) * bs <= limit:
            chunk = tokens[i * bs:(i + 1) * bs]
            h = block_hash(parent, chunk)
            b = self.block_of.get(h)
            if b is None:
                break
            self.acquire(b)
            self.hits += 1
            seq.blocks.append(b)
            seq.hashes.append(h)
            seq.token_ids.extend(chunk)
            added += bs
            parent = h
            i += 1
        return added

    def reserve(self, seq: KVSequence, n_tokens: int) -> bool:
        """Make sure ``seq`` has blocks for ``n_tokens`` positions; all or nothing."""
        need = self.blocks_for(n_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.num_available:
            return False
        for _ in range(need):
            seq.blocks.append(self.allocate())
        return True

    def commit(self, seq: KVSequence, tokens: Sequence[int]) -> None:
        """Record that ``tokens`` were computed into ``seq``'s next positions; register every block
        that became full under its prefix hash (merging it with an identical block computed
        concurrently by another sequence, so that a prefix is stored once)."""
        seq.token_ids.extend(int(t) for t in tokens)
        bs = self.block_size
        full = len(seq.token_ids) // bs
        while len(seq.hashes) < full:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else None
            h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            seq.hashes.append(h)
            b = seq.blocks[i]
            other = self.block_of.get(h)
            if other is None:
                self.hash_of[b] = h
                self.block_of[h] = b
            elif other != b:
                self.acquire(other)
                self.release(b)
                seq.blocks[i] = other
                self.dedups += 1

    def truncate(self, seq: KVSequence, n_tokens: int) -> None:
        """Cut ``seq`` back to its first ``n_tokens`` tokens (release the blocks past them). A last
        block left partly valid is made private and unhashed, since it will be written again."""
        if n_tokens >= seq.num_tokens:
            self.trim(seq)
            return
        bs = self.block_size
        keep = self.blocks_for(n_tokens)
        for b in reversed(seq.blocks[keep:]):
            self.release(b)
        del seq.blocks[keep:]
        del seq.token_ids[n_tokens:]
        del seq.hashes[n_tokens // bs:]
        if n_tokens % bs:
            i = keep - 1
            b = seq.blocks[i]
            if self.ref[b] > 1:
                if self.copy_block is None:
                    raise RuntimeError("copy-on-write needs copy_block")
                nb = self.allocate()   # may raise OutOfBlocks: the caller reclaims and retries
                self.copy_block(b, nb)
                self.release(b)
                seq.blocks[i] = nb
                self.cow_copies += 1
            else:
                self._unregister(b)

    def trim(self, seq: KVSequence) -> None:
        """Release blocks reserved past ``seq``'s computed tokens."""
        keep = self.blocks_for(seq.num_tokens)
        for b in reversed(seq.blocks[keep:]):
            self.release(b)
        del seq.blocks[keep:]

    def free_sequence(self, seq: KVSequence) -> None:
        """Release every block of ``seq`` (full ones stay in the prefix cache) and empty it. The
        last block is released first, so that it is evicted before the shareable first ones."""
        for b in reversed(seq.blocks):
            self.release(b)
        seq.blocks.clear()
        seq.token_ids.clear()
        seq.hashes.clear()

    def adopt(self, seq: KVSequence, blocks: list[int]) -> None:
        """Give ``seq`` freshly allocated blocks holding its (restored) tokens; register full ones."""
        seq.blocks = list(blocks)
        tokens = list(seq.token_ids)
        seq.token_ids, seq.hashes = [], []
        self.commit(seq, tokens)

    def check(self) -> None:
        """Consistency of the books (for tests): every block in exactly one state."""
        free, cached = set(self.free), set(self.cached)
        assert not free & cached
        for b in range(self.num_blocks):
            if b in free:
                assert self.ref[b] == 0 and self.hash_of[b] is None, b
            elif b in cached:
                assert self.ref[b] == 0 and self.hash_of[b] is not None, b
            else:
                assert self.ref[b] > 0, b
        for h, b in self.block_of.items():
            assert self.hash_of[b] == h
