"""The parity checks that tests/test_mamba.py, test_mamba2.py and test_rwkv.py share.

Each test builds a tiny random transformers model, saves it as an HF folder and takes as reference
one transformers pass over the whole token sequence: position p's logits are what a prompt ending
at p predicts. edgellm runs the same tokens through its StatePool (a live slot per sequence, and
snapshots at block edges of ``BLOCK`` positions written mid-chunk): a prompt in chunks that start
mid-block and cross block edges, then decode steps one token at a time, and a second sequence
resuming from the first one's snapshot at a block edge (prefix reuse) in the same step as the
first one's decode row. Logits within ``TOLERANCE`` (float32) at every step.
"""

from __future__ import annotations

import torch

from edgellm.kv.state import StatePool, StateSlots
from edgellm.loading.load import load_model
from edgellm.runtime.model_runner import ModelRunner, SeqChunk

VOCAB, BLOCK = 64, 8
PROMPT_LEN, DECODE_STEPS, CHUNK = 40, 6, 13
TOLERANCE = 1e-3
#: slot of each block edge's snapshot in these checks (edge 8 -> slot 1, edge 16 -> slot 2, ...);
#: slot 0 is the first sequence's live state
EDGE_SLOT = {BLOCK * i: i for i in range(1, PROMPT_LEN // BLOCK + 1)}


def token_ids() -> list[int]:
    """A prompt and the tokens its decode steps are fed (ids 0-2 are pad, BOS and EOS)."""
    gen = torch.Generator().manual_seed(2)
    return torch.randint(3, VOCAB, (PROMPT_LEN + DECODE_STEPS,), generator=gen).tolist()


def reference_logits(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids]), use_cache=False).logits[0].float()


def state_runner(loaded, n_slots: int = 16) -> ModelRunner:
    pool = StatePool(loaded.model.state_shapes(), loaded.config.n_layers, n_slots, BLOCK)
    return ModelRunner(loaded.model, pool)


def chunk(ids: list[int], start: int, n: int, live: int) -> SeqChunk:
    """Tokens start..start+n-1 of a sequence whose state is in slot ``live``; the snapshots of
    the block edges strictly inside the chunk go to their ``EDGE_SLOT``."""
    edges = [(e, EDGE_SLOT[e]) for e in EDGE_SLOT if start < e < start + n]
    return SeqChunk(ids[start:start + n], start, StateSlots(live, edges))


def check_chunked_prefill_and_decode(folder, ids: list[int], expected: torch.Tensor) -> None:
    runner = state_runner(load_model(str(folder)))
    for start in range(0, PROMPT_LEN, CHUNK):
        n = min(CHUNK, PROMPT_LEN - start)
        logits = runner.run([chunk(ids, start, n, live=0)])
        torch.testing.assert_close(logits[0], expected[start + n - 1], atol=TOLERANCE, rtol=0)
    for p in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
        logits = runner.run([chunk(ids, p, 1, live=0)])
        torch.testing.assert_close(logits[0], expected[p], atol=TOLERANCE, rtol=0)


def check_resume_from_block_edge(folder, ids: list[int], expected: torch.Tensor) -> None:
    """A second sequence takes the first one's snapshot at position 16 (written in the middle of
    the first one's prompt chunk) into its own live slot and goes on from there (the prefix
    cache's case), batched with the first sequence's decode row."""
    runner = state_runner(load_model(str(folder)))
    runner.run([chunk(ids, 0, PROMPT_LEN, live=0)])
    second = 10
    runner.cache.copy_block(EDGE_SLOT[2 * BLOCK], second)
    logits = runner.run([chunk(ids, PROMPT_LEN, 1, live=0),
                         chunk(ids, 2 * BLOCK, PROMPT_LEN - 2 * BLOCK, live=second)])
    torch.testing.assert_close(logits[0], expected[PROMPT_LEN], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(logits[1], expected[PROMPT_LEN - 1], atol=TOLERANCE, rtol=0)
