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

Layer groups and sliding windows. With a grouped KV layout (``edgellm.kv.cache.KVLayout``) a
sequence has one block table per group (``KVSequence.tables``: ``blocks`` is group 0's, ``extra``
the others'), all of the same length and all drawing on this one pool; ``windows[g]`` is group g's
sliding window (None: full attention). After every commit a sliding group gives back the pages
that lie wholly before its window (their entries become ``NULL_BLOCK``), so it holds at most
``ceil(window / block_size) + 1`` pages between steps, however long the sequence. A full page
given back is kept in the prefix cache under its group's hash like any other. A prefix hit, a cut
back (``truncate``) or a restore is taken only as far as every sliding group still has the pages
of the window it resumes from; short of that the sequence recomputes.

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

from edgellm.kv.cache import NULL_BLOCK


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
    ``hashes[i]`` is the chained hash of block ``i`` for every full block. With a grouped layout,
    ``extra`` holds the block tables of groups 1.. (``blocks`` is group 0's); ``detached`` is
    which entries held pages when the sequence's KV left the pool (offload), to restore them.
    """

    token_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    extra: list[list[int]] = field(default_factory=list)
    detached: list[list[bool]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tables(self) -> list[list[int]]:
        """Every group's block table, group 0 first."""
        return [self.blocks, *self.extra]

    def capacity(self, block_size: int) -> int:
        return len(self.blocks) * block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16,
                 copy_block: Callable[[int, int], None] | None = None,
                 windows: Sequence[int | None] = (None,)):
        """``copy_block(src, dst)`` copies a block's contents (every layer); needed for copy-on-write.
        ``windows``: the sliding window of each group of a grouped KV layout (default: one group,
        full attention)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        if not windows or any(w is not None and w < 1 for w in windows):
            raise ValueError(f"windows must name each group's window (None or >= 1), got {windows!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.copy_block = copy_block
        self.windows = tuple(windows)
        self.n_groups = len(self.windows)
        self.page_group = [0] * num_blocks    # the group a used or cached page belongs to
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

    def counters(self) -> dict:
        out = {"total": self.num_blocks, "used": self.num_used, "free": self.num_free,
               "cached": self.num_cached, "offloaded_host": self.offloaded_host,
               "offloaded_disk": self.offloaded_disk, "prefix_hits": self.hits,
               "evictions": self.evictions, "dedups": self.dedups, "cow_copies": self.cow_copies}
        if self.windows != (None,):   # pages in use by full-attention and by sliding groups
            used = [b for b in range(self.num_blocks) if self.ref[b] > 0]
            out["used_full"] = sum(self.windows[self.page_group[b]] is None for b in used)
            out["used_sliding"] = len(used) - out["used_full"]
        return out

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def pages_needed(self, seq: KVSequence, n_tokens: int) -> int:
        """Pages ``reserve(seq, n_tokens)`` takes: one per group for each block position added."""
        return max(0, self.blocks_for(n_tokens) - len(seq.blocks)) * self.n_groups

    def room(self, seq: KVSequence) -> int:
        """Tokens past ``seq``'s computed ones that its reserved blocks plus the available pages hold."""
        return (len(seq.blocks) + self.num_available // self.n_groups) * self.block_size - seq.num_tokens

    def held(self, seq: KVSequence) -> list[int]:
        """The pages ``seq`` holds, group by group, in table order (given-back entries skipped)."""
        return [b for t in self._tables(seq) for b in t if b != NULL_BLOCK]

    def pages_by_group(self, seq: KVSequence) -> list[int]:
        """How many pages ``seq`` holds in each group."""
        return [sum(b != NULL_BLOCK for b in t) for t in self._tables(seq)]

    def _tables(self, seq: KVSequence) -> list[list[int]]:
        while len(seq.extra) < self.n_groups - 1:
            seq.extra.append([NULL_BLOCK] * len(seq.blocks))
        return seq.tables

    def _key(self, group: int, h: bytes) -> bytes:
        """The prefix-cache key of a block's page in ``group`` (group 0: the hash itself)."""
        return h if group == 0 else h + group.to_bytes(2, "little")

    def _first_in_window(self, group: int, n_tokens: int) -> int:
        """The first block a sliding group needs to go on from ``n_tokens`` computed tokens (the
        next query, at position n_tokens, sees keys from n_tokens - window + 1); 0 for full groups."""
        w = self.windows[group]
        return 0 if w is None else max(0, n_tokens - w + 1) // self.block_size

    def _slide(self, seq: KVSequence) -> None:
        """Give back the pages of sliding groups that lie wholly before their window."""
        for g, table in enumerate(self._tables(seq)):
            if self.windows[g] is None:
                continue
            for i in range(min(self._first_in_window(g, seq.num_tokens), len(table))):
                if table[i] != NULL_BLOCK:
                    self.release(table[i])
                    table[i] = NULL_BLOCK

    def _window_held(self, seq: KVSequence, n_tokens: int) -> bool:
        """Whether every sliding group of ``seq`` holds the pages of its window at ``n_tokens``."""
        tables = self._tables(seq)
        return all(NULL_BLOCK not in tables[g][self._first_in_window(g, n_tokens):self.blocks_for(n_tokens)]
                   for g in range(self.n_groups) if self.windows[g] is not None)

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
        cached full blocks of ``tokens``, up to ``limit`` tokens in all. Returns tokens added. With
        sliding groups, the hit ends where their window's pages are all still cached."""
        bs = self.block_size
        if seq.num_tokens % bs or len(seq.blocks) != len(seq.hashes):
            return 0
        tables = self._tables(seq)
        start = len(seq.hashes)
        full = [g for g in range(self.n_groups) if self.windows[g] is None]
        hashes: list[bytes] = []
        parent = seq.hashes[-1] if seq.hashes else None
        while (start + len(hashes) + 1) * bs <= limit:
            i = start + len(hashes)
            h = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            if any(self._key(g, h) not in self.block_of for g in full):
                break
            hashes.append(h)
            parent = h
        n = len(hashes)
        while n and not self._window_cached(seq, hashes, n):
            n -= 1
        end = (start + n) * bs
        for j, h in enumerate(hashes[:n]):
            i = start + j
            for g, table in enumerate(tables):
                if i < self._first_in_window(g, end):     # out of the window it resumes from
                    table.append(NULL_BLOCK)
                    continue
                b = self.block_of[self._key(g, h)]
                self.acquire(b)
                self.hits += 1
                table.append(b)
            seq.hashes.append(h)
            seq.token_ids.extend(tokens[i * bs:(i + 1) * bs])
        self._slide(seq)
        return n * bs

    def _window_cached(self, seq: KVSequence, hashes: list[bytes], n: int) -> bool:
        """Whether taking ``n`` more cached blocks leaves every sliding group its window: held
        pages before the hit, cached ones within it."""
        start = len(seq.hashes)
        end = (start + n) * self.block_size
        for g, table in enumerate(seq.tables):
            if self.windows[g] is None:
                continue
            for i in range(self._first_in_window(g, end), start + n):
                if (table[i] == NULL_BLOCK if i < start else self._key(g, hashes[i - start]) not in self.block_of):
                    return False
        return True

    def reserve(self, seq: KVSequence, n_tokens: int) -> bool:
        """Make sure ``seq`` has blocks (a page in each group) for ``n_tokens`` positions; all or nothing."""
        need = self.blocks_for(n_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need * self.n_groups > self.num_available:
            return False
        for g, table in enumerate(self._tables(seq)):
            for _ in range(need):
                b = self.allocate()
                self.page_group[b] = g
                table.append(b)
        return True

    def commit(self, seq: KVSequence, tokens: Sequence[int]) -> None:
        """Record that ``tokens`` were computed into ``seq``'s next positions; register every block
        that became full under its prefix hash (merging it with an identical block computed
        concurrently by another sequence, so that a prefix is stored once). Sliding groups then
        give back what left their window."""
        seq.token_ids.extend(int(t) for t in tokens)
        bs = self.block_size
        tables = self._tables(seq)
        full = len(seq.token_ids) // bs
        while len(seq.hashes) < full:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else None
            h = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            seq.hashes.append(h)
            for g, table in enumerate(tables):
                b = table[i]
                if b == NULL_BLOCK:
                    continue
                key = self._key(g, h)
                other = self.block_of.get(key)
                if other is None:
                    self.hash_of[b] = key
                    self.block_of[key] = b
                elif other != b:
                    self.acquire(other)
                    self.release(b)
                    table[i] = other
                    self.dedups += 1
        if self.windows != (None,):
            self._slide(seq)

    def truncate(self, seq: KVSequence, n_tokens: int) -> None:
        """Cut ``seq`` back to its first ``n_tokens`` tokens (release the blocks past them). A last
        block left partly valid is made private and unhashed, since it will be written again. A
        sliding group that gave back pages of the window at ``n_tokens`` cannot resume there: then
        the whole sequence is cut (recomputed, or found again in the prefix cache)."""
        if n_tokens >= seq.num_tokens:
            self.trim(seq)
            return
        if not self._window_held(seq, n_tokens):
            n_tokens = 0
        bs = self.block_size
        keep = self.blocks_for(n_tokens)
        tables = self._tables(seq)
        for table in tables:
            for b in reversed(table[keep:]):
                if b != NULL_BLOCK:
                    self.release(b)
            del table[keep:]
        del seq.token_ids[n_tokens:]
        del seq.hashes[n_tokens // bs:]
        if n_tokens % bs:
            i = keep - 1
            shared = [g for g, t in enumerate(tables) if self.ref[t[i]] > 1]
            if shared and self.copy_block is None:
                raise RuntimeError("copy-on-write needs copy_block")
            if len(shared) > self.num_available:   # the caller reclaims and retries
                raise OutOfBlocks(f"copy-on-write needs {len(shared)} blocks, {self.num_available} available")
            for g, table in enumerate(tables):
                b = table[i]
                if g in shared:
                    nb = self.allocate()
                    self.page_group[nb] = g
                    self.copy_block(b, nb)
                    self.release(b)
                    table[i] = nb
                    self.cow_copies += 1
                else:
                    self._unregister(b)

    def trim(self, seq: KVSequence) -> None:
        """Release blocks reserved past ``seq``'s computed tokens."""
        keep = self.blocks_for(seq.num_tokens)
        for table in self._tables(seq):
            for b in reversed(table[keep:]):
                if b != NULL_BLOCK:
                    self.release(b)
            del table[keep:]

    def free_sequence(self, seq: KVSequence) -> None:
        """Release every block of ``seq`` (full ones stay in the prefix cache) and empty it. The
        last block is released first, so that it is evicted before the shareable first ones."""
        for table in self._tables(seq):
            for b in reversed(table):
                if b != NULL_BLOCK:
                    self.release(b)
            table.clear()
        seq.token_ids.clear()
        seq.hashes.clear()
        seq.detached = None

    def detach(self, seq: KVSequence) -> None:
        """Release the pages of ``seq`` whose contents were exported (``held``, for offload),
        remembering which entries held them; ``adopt`` puts restored pages back there."""
        tables = self._tables(seq)
        seq.detached = [[b != NULL_BLOCK for b in t] for t in tables]
        for table in tables:
            for b in reversed(table):
                if b != NULL_BLOCK:
                    self.release(b)
            table.clear()

    def adopt(self, seq: KVSequence, blocks: list[int]) -> None:
        """Give ``seq`` freshly allocated blocks holding its (restored) tokens, in the order
        ``held`` listed them before ``detach``; register full ones."""
        if seq.detached is None:
            seq.blocks = list(blocks)
        else:
            pages = iter(blocks)
            tables = [[next(pages) if held else NULL_BLOCK for held in mask] for mask in seq.detached]
            seq.blocks, seq.extra, seq.detached = tables[0], tables[1:], None
            for g, table in enumerate(tables):
                for b in table:
                    if b != NULL_BLOCK:
                        self.page_group[b] = g
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
