"""Sliding-window layers keep only their window's KV (Mistral's window; Gemma 3 in test_gemma3_sliding_kv.py).

A tiny random MistralForCausalLM with a window of 8 positions, on blocks of 4 tokens: a sequence's
sliding layers may hold at most ceil(8 / 4) + 1 = 3 blocks between steps (positions p - 7 .. p of
the next query p span at most 3 blocks), however long it gets. Every comparison is with
transformers (eager attention, which applies the window): teacher-forced logits within 1e-3, or
its greedy continuation token for token. The pools are too small for the sequences unless what
leaves the window is given back, and blocks given back are filled with NaN, so a read of one shows.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgellm.kv.block_manager import BlockManager, KVSequence  # noqa: E402
from edgellm.kv.cache import NULL_BLOCK, KVCache, KVLayout  # noqa: E402
from edgellm.loading.load import load_model  # noqa: E402
from edgellm.runtime.engine import Engine  # noqa: E402
from edgellm.runtime.model_runner import ModelRunner, SeqChunk, sequence_slots  # noqa: E402
from edgellm.sampling import SamplingParams  # noqa: E402
from tiny_recurrent import hf_greedy, save_chat_folder, words  # noqa: E402

WINDOW, BLOCK, VOCAB = 8, 4, 64
BOUND = -(-WINDOW // BLOCK) + 1            # 3 blocks: worked by hand in the module docstring
PROMPT_LEN, DECODE_STEPS = 30, 16
TOLERANCE = 1e-3
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=WINDOW,
        tie_word_embeddings=False, rms_norm_eps=1e-5, initializer_range=0.2, attn_implementation="eager",
        eos_token_id=1, bos_token_id=None, pad_token_id=None)
    return transformers.MistralForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def loaded(reference, tmp_path_factory):
    return load_model(str(save_chat_folder(reference, tmp_path_factory.mktemp("mistral"), VOCAB)))


def gemma3_reference():
    """A tiny random Gemma 3 whose layers are sliding, full, sliding: a grouped layout of three
    one-layer tables (one full, two sliding) in one pool."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        initializer_range=0.3, attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module", params=["mistral", "gemma3"])
def pair(request, reference, loaded, tmp_path_factory):
    """(transformers model, edgellm LoadedModel) of each sliding-window architecture."""
    if request.param == "mistral":
        return reference, loaded
    from tiny_model import save_hf_folder

    hf = gemma3_reference()
    return hf, load_model(str(save_hf_folder(hf, tmp_path_factory.mktemp("gemma3"), VOCAB)))


@pytest.fixture(scope="module")
def ids() -> list[int]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(7, VOCAB, (PROMPT_LEN + DECODE_STEPS,), generator=gen).tolist()


def poison_unheld(bm: BlockManager, cache: KVCache) -> None:
    """NaN into every block no sequence holds: attention that read one would give NaN logits."""
    for b in range(bm.num_blocks):
        if bm.ref[b] == 0:
            cache.data[:, :, b * BLOCK:(b + 1) * BLOCK] = float("nan")


def test_the_layout_puts_mistral_on_one_sliding_table(loaded):
    layout = KVLayout.for_model(loaded.config)
    assert layout.windows == (WINDOW,) and layout.groups == ((0, 1),)
    assert layout.pages_held(1000, BLOCK) == BOUND


@pytest.mark.parametrize("chunk", [PROMPT_LEN, 5, 13])
def test_every_step_matches_transformers_while_blocks_leave_the_window(pair, ids, chunk):
    """Prefill in chunks, then decode, on a pool too small to keep the sliding layers' history
    (Mistral: 8 blocks of 4 slots for a 45-token sequence): after every step each sliding table
    holds at most 3 blocks, a full one (Gemma 3's) all, and every logit row is transformers'."""
    reference, loaded = pair
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    cfg = loaded.config
    layout = KVLayout.for_model(cfg)
    full = sum(w is None for w in layout.windows)
    per_block = len(layout.windows)   # a new block position takes a page in every table
    n_blocks = full * -(-len(ids) // BLOCK) + (len(layout.windows) - full) * (BOUND + -(-chunk // BLOCK) + 1)
    n_blocks = min(n_blocks, per_block * -(-len(ids) // BLOCK) - 1)   # never room for everything
    cache = KVCache(cfg, n_blocks, BLOCK, layout=layout)
    bm = BlockManager(n_blocks, BLOCK, cache.copy_block, windows=layout.windows)
    runner = ModelRunner(loaded.model, cache)
    kv = KVSequence()
    held = []

    def step(tokens: list[int], want_logits: bool):
        start = kv.num_tokens
        assert bm.reserve(kv, start + len(tokens)), f"no block for positions {start}..{start + len(tokens) - 1}"
        poison_unheld(bm, cache)
        out = runner.run([SeqChunk(tokens, start, sequence_slots(cache, kv, start + len(tokens)), want_logits)])
        bm.commit(kv, tokens)
        held.append([n for n, w in zip(bm.pages_by_group(kv), layout.windows) if w is not None])
        assert all(n == -(-kv.num_tokens // BLOCK) for n, w in zip(bm.pages_by_group(kv), layout.windows)
                   if w is None)
        bm.check()
        return out

    with torch.inference_mode():
        for start in range(0, PROMPT_LEN, chunk):
            part = ids[start:min(start + chunk, PROMPT_LEN)]
            out = step(part, start + len(part) == PROMPT_LEN)
        got = [out[0]]
        for pos in range(PROMPT_LEN, len(ids) - 1):
            got.append(step([ids[pos]], True)[0])
    for i, logits in enumerate(got):
        pos = PROMPT_LEN - 1 + i
        err = (logits - want[pos]).abs().max().item()
        assert err < TOLERANCE, f"chunks of {chunk}, position {pos}: logits differ by {err:.2e}"
    assert max(max(h) for h in held) == BOUND


def test_two_groups_hold_all_blocks_and_the_window(loaded):
    """The block manager alone, a full group and a sliding one (Gemma 3's shape): one token at a
    time to 50, the full group holds ceil(n / 4) blocks, the sliding one the blocks of positions
    n - 7 .. n - 1 (what the next query, at n, reads besides itself): never more than 3."""
    bm = BlockManager(40, BLOCK, windows=(None, WINDOW))
    kv = KVSequence()
    sliding = []
    for n in range(1, 51):
        assert bm.reserve(kv, n)
        bm.commit(kv, [n % 50])
        window_blocks = (n - 1) // BLOCK - max(0, n - WINDOW + 1) // BLOCK + 1
        assert bm.pages_by_group(kv) == [-(-n // BLOCK), window_blocks], n
        sliding.append(window_blocks)
        bm.check()
    assert max(sliding) == BOUND
    assert bm.counters()["used_full"] == 13 and bm.counters()["used_sliding"] == BOUND
    bm.free_sequence(kv)
    assert bm.num_used == 0


def test_cutting_back_into_a_given_back_window_recomputes_or_rematches():
    """40 tokens held: cut back to 20, the window at 20 (positions 13..19, blocks 3 and 4) was given
    back, so the sequence is emptied -- then the prefix cache gives the 20 tokens back, since the
    given-back blocks kept their hashes and nobody evicted them."""
    bm = BlockManager(20, BLOCK, windows=(WINDOW,))
    kv = KVSequence()
    tokens = list(range(100, 140))
    assert bm.reserve(kv, 40)
    bm.commit(kv, tokens)
    assert bm.pages_by_group(kv) == [2]       # positions 33..39: blocks 8 and 9
    bm.truncate(kv, 20)
    assert kv.num_tokens == 0 and bm.num_used == 0
    assert bm.match_prefix(kv, tokens, 20) == 20
    # blocks 0..2 are out of the window at 20: not taken, their entries empty
    assert kv.blocks[:3] == [NULL_BLOCK] * 3 and NULL_BLOCK not in kv.blocks[3:]
    bm.check()


def greedy(**overrides) -> SamplingParams:
    return SamplingParams.greedy(max_tokens=NEW_TOKENS, **overrides)


def pool_of(loaded, blocks: int) -> int:
    return blocks * KVCache.bytes_per_block(loaded.config, BLOCK, layout=KVLayout.for_model(loaded.config))


SYSTEM = words(1, 30, VOCAB)


def test_engine_sessions_prefix_hits_and_offload_match_transformers(loaded, reference, tmp_path):
    """Through the engine on a pool of 12 blocks (48 tokens), chunked prefill of 5 tokens: a
    reply (prompt ~40 tokens + 12), a second session sharing the system prompt (a prefix hit on
    blocks the first session gave back as its window moved), a follow-up turn after the first
    session's KV went to disk and back. Each is transformers' greedy continuation."""
    with Engine(loaded, kv_memory=pool_of(loaded, 12), block_size=BLOCK, max_batch_tokens=5,
                host_memory=0, disk_dir=str(tmp_path)) as eng:
        assert eng.stats()["kv"]["sliding_blocks_per_sequence_max"] == BOUND
        a = eng.session(system=SYSTEM, sampling=greedy(ignore_eos=True))
        handle = a.send(words(2, 6, VOCAB))
        held = []
        for _ in handle:
            held.append(eng.block_manager.pages_by_group(a.kv)[0])
        first = handle.result()
        conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": words(2, 6, VOCAB)}]
        ids = eng.input.encode(conv, chat=True)
        assert len(ids) + NEW_TOKENS > 12 * BLOCK        # more than the pool: only a window fits
        assert first.token_ids == hf_greedy(reference, ids, NEW_TOKENS, eos=None)
        assert max(held) <= BOUND

        b = eng.session(system=SYSTEM, sampling=greedy(ignore_eos=True))
        other = b.chat(words(3, 5, VOCAB))
        assert other.cached_tokens >= WINDOW            # a prefix hit on given-back blocks
        conv_b = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": words(3, 5, VOCAB)}]
        assert other.token_ids == hf_greedy(reference, eng.input.encode(conv_b, chat=True), NEW_TOKENS, eos=None)
        b.close()

        history = a.kv.num_tokens
        assert eng.offload_idle() == 1 and eng.kv_tier(a) == "disk"
        second = a.chat(words(4, 4, VOCAB))
        assert eng.store.counters()["restored_disk"] == 1
        assert second.cached_tokens == history          # the window came back: nothing recomputed
        conv += [{"role": "assistant", "content": first.text}, {"role": "user", "content": words(4, 4, VOCAB)}]
        assert second.token_ids == hf_greedy(reference, eng.input.encode(conv, chat=True), NEW_TOKENS, eos=None)
        assert eng.block_manager.pages_by_group(a.kv)[0] <= BOUND
        a.close()
        assert eng.block_manager.num_used == 0
        eng.block_manager.check()


def test_kv_memory_figures_count_a_window_only(pair):
    """A 100-token sequence's KV, worked by hand (2 KV heads of 16 floats, fp32): Mistral's two
    sliding layers hold 8 positions each, Gemma 3's one full layer 100 and two sliding ones 8 each
    (the roofline's kv_cache_bytes); the engine's block-granular figure with blocks of 4: a
    1-layer page is k|v x 4 tokens x 2 heads x 16 x 4 bytes = 1024 bytes, the full table holds 25
    pages and each sliding one 3."""
    _, loaded = pair
    gemma = loaded.config.architecture == "gemma3"
    per_position = 2 * 2 * 16 * 4
    assert loaded.config.kv_bytes(100, 4) == per_position * ((100 + 8 + 8) if gemma else (8 + 8))
    with Engine(loaded, kv_memory="1MB", block_size=BLOCK) as eng:
        page = eng.kv_bytes_per_block
        assert page == (1 if gemma else 2) * 1024
        assert eng.kv_bytes(100) == page * ((25 + 3 + 3) if gemma else 3)


def test_fused_decode_on_a_windowed_gguf_reads_only_held_blocks(smollm2_path, tmp_path):
    """A quantised GGUF with a window of 8 (its decode steps take the fused native kernel, which
    reads the one table of all layers): the engine, on blocks of 4 and a pool of 6 blocks for a
    30-token prompt plus 12 tokens, gives the greedy tokens of the unbounded path (a pool holding
    every position, the window only masked: test_sliding_window.py checks it against the per-layer
    path and the window's effect)."""
    from tiny_model import run_chunks, write_tiny_llama

    loaded = load_model(str(write_tiny_llama(tmp_path / "w.gguf", smollm2_path, context=128,
                                             overrides={"llama.attention.sliding_window": WINDOW})))
    if not loaded.model.has_fused_decode:
        pytest.skip("native kernels unavailable on this machine")
    prompt = list(range(300, 330))
    want = []
    ids = list(prompt)
    for _ in range(NEW_TOKENS):   # the unbounded path's greedy continuation, one token at a time
        want.append(int(run_chunks(loaded.model, loaded.config, ids + [0], len(ids), 16)[0].argmax()))
        ids.append(want[-1])
    with Engine(loaded, kv_memory=pool_of(loaded, 6), block_size=BLOCK, host_memory=0) as eng:
        got = eng.generate([prompt], greedy(ignore_eos=True))[0].token_ids
        assert eng.stats()["steps"]["steps"] > NEW_TOKENS - 1
    assert got == want


def test_copy_on_write_copies_the_shared_block_of_every_table():
    """Two sequences share 12 tokens (3 blocks) from the prefix cache, in a full table and a
    sliding one (window 8: the sharer, starting at 12, takes blocks 1 and 2 only -- positions
    5..11). Cut back to 11 tokens (window at 11: positions 4..10, blocks 1 and 2, still held), the
    sharer's last block, shared in both tables, is copied once per table."""
    copies = []
    bm = BlockManager(20, BLOCK, copy_block=lambda src, dst: copies.append((src, dst)), windows=(None, WINDOW))
    a, b = KVSequence(), KVSequence()
    tokens = list(range(200, 212))
    assert bm.reserve(a, 12)
    bm.commit(a, tokens)
    assert bm.match_prefix(b, tokens + [7], 12) == 12
    assert b.blocks == a.blocks and b.extra[0] == [NULL_BLOCK] + a.extra[0][1:]
    bm.truncate(b, 11)
    assert b.num_tokens == 11 and bm.cow_copies == 2
    assert sorted(src for src, _ in copies) == sorted([a.blocks[2], a.extra[0][2]])
    assert b.blocks[2] != a.blocks[2] and b.extra[0][2] != a.extra[0][2]
    bm.check()
