"""BlockManager: ref counts, free list, prefix hashing, the LRU prefix cache, copy-on-write."""

from __future__ import annotations

import pytest

from edgellm.kv.block_manager import BlockManager, KVSequence, OutOfBlocks, block_hash, prefix_hashes

BS = 4


def filled(bm: BlockManager, tokens: list[int]) -> KVSequence:
    """A sequence that computed ``tokens`` (blocks reserved, then committed)."""
    seq = KVSequence()
    assert bm.reserve(seq, len(tokens))
    bm.commit(seq, tokens)
    return seq


def test_hash_chains_the_prefix():
    a = prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS)
    b = prefix_hashes([9, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(a) == 2
    assert a[0] != b[0]
    assert a[1] != b[1], "same tokens after a different prefix must hash differently"
    assert a[1] == block_hash(a[0], [5, 6, 7, 8])
    assert prefix_hashes([1, 2, 3], BS) == []


def test_allocate_release_counts():
    bm = BlockManager(4, BS)
    seq = filled(bm, [1, 2, 3, 4, 5, 6])       # one full block, one partial
    assert (bm.num_used, bm.num_free, bm.num_cached) == (2, 2, 0)
    bm.free_sequence(seq)
    # the full block stays cached (its KV is valid), the partial one is free again
    assert (bm.num_used, bm.num_free, bm.num_cached) == (0, 3, 1)
    bm.check()
    with pytest.raises(ValueError):
        bm.release(0)


def test_prefix_is_shared_and_counted_once():
    bm = BlockManager(8, BS)
    system = [7, 7, 7, 7, 8, 8, 8, 8]
    a = filled(bm, system + [1, 2, 3])
    b = KVSequence()
    got = bm.match_prefix(b, system + [4, 5, 6], limit=10)
    assert got == 8 and b.blocks == a.blocks[:2]
    assert bm.ref[a.blocks[0]] == 2 and bm.hits == 2
    assert bm.reserve(b, 11)
    bm.commit(b, [4, 5, 6])
    assert bm.num_used == 4      # 2 shared + 1 private tail each
    bm.check()


def test_match_never_takes_the_whole_prompt():
    bm = BlockManager(8, BS)
    a = filled(bm, [1, 2, 3, 4, 5, 6, 7, 8])
    b = KVSequence()
    # the last token must be computed for its logits: limit = len - 1 = 7 -> one block only
    assert bm.match_prefix(b, [1, 2, 3, 4, 5, 6, 7, 8], limit=7) == 4
    bm.free_sequence(a)
    bm.free_sequence(b)
    bm.check()


def test_concurrent_identical_blocks_are_merged():
    bm = BlockManager(8, BS)
    a, b = KVSequence(), KVSequence()
    assert bm.reserve(a, 6) and bm.reserve(b, 6)
    bm.commit(a, [1, 2, 3, 4, 5, 6])    # both computed the same first block in one step
    bm.commit(b, [1, 2, 3, 4, 9, 9])
    assert a.blocks[0] == b.blocks[0] and bm.dedups == 1
    assert bm.num_used == 3
    bm.check()


def test_lru_eviction_of_cached_blocks():
    bm = BlockManager(3, BS)
    x = filled(bm, [1, 1, 1, 1])
    y = filled(bm, [2, 2, 2, 2])
    bm.free_sequence(x)
    bm.free_sequence(y)
    assert bm.num_cached == 2 and bm.num_available == 3
    z = filled(bm, [3, 3, 3, 3, 3, 3, 3, 3])   # free block first, then the oldest cached (x's)
    assert bm.evictions == 1
    probe = KVSequence()
    assert bm.match_prefix(probe, [1, 1, 1, 1, 0], 4) == 0       # x's block was evicted
    assert bm.match_prefix(probe, [2, 2, 2, 2, 0], 4) == 4       # y's is still there
    bm.free_sequence(probe)
    bm.free_sequence(z)
    bm.check()
    with pytest.raises(OutOfBlocks):
        for _ in range(4):
            bm.allocate()


def test_reserve_is_all_or_nothing():
    bm = BlockManager(2, BS)
    seq = KVSequence()
    assert not bm.reserve(seq, 9)
    assert seq.blocks == [] and bm.num_free == 2
    assert bm.reserve(seq, 8) and len(seq.blocks) == 2


def test_truncate_copy_on_write_for_shared_block():
    copies = []
    bm = BlockManager(6, BS, copy_block=lambda s, d: copies.append((s, d)))
    a = filled(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = KVSequence()
    bm.match_prefix(b, [1, 2, 3, 4, 5, 6, 7, 8, 0], 8)
    shared = b.blocks[1]
    bm.truncate(b, 6)                     # cut inside the shared second block
    assert copies == [(shared, b.blocks[1])] and b.blocks[1] != shared
    assert b.token_ids == [1, 2, 3, 4, 5, 6] and len(b.hashes) == 1
    assert bm.ref[shared] == 1            # a still holds it, unchanged
    # a private full block cut inside loses its hash (it will be overwritten)
    bm.truncate(a, 5)
    assert bm.hash_of[a.blocks[1]] is None and len(a.blocks) == 2
    bm.check()


def test_trim_releases_reserved_blocks():
    bm = BlockManager(4, BS)
    seq = KVSequence()
    bm.reserve(seq, 12)
    bm.commit(seq, [1, 2, 3])
    bm.trim(seq)
    assert len(seq.blocks) == 1 and bm.num_free == 3


def test_adopt_registers_restored_blocks():
    bm = BlockManager(6, BS)
    a = filled(bm, [1, 2, 3, 4, 5])
    tokens, hashes = list(a.token_ids), list(a.hashes)
    bm.free_sequence(a)
    bm.clear_cache()
    restored = KVSequence(token_ids=tokens)
    bm.adopt(restored, [bm.allocate(), bm.allocate()])
    assert restored.hashes == hashes and bm.lookup(hashes[0]) == restored.blocks[0]
    bm.check()
