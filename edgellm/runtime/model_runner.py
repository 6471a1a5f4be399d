"""ModelRunner: turns one step's work (chunks of sequences) into one forward pass.

It knows tensors and slots, nothing of sessions or scheduling: the caller says, per sequence,
which new tokens to run, where they start, and which cache slots the sequence owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.kv.cache import KVCache
from edgellm.layers.attention import AttentionBatch
from edgellm.models.llama import LlamaModel


@dataclass
class SeqChunk:
    token_ids: list[int]        # the new tokens of this sequence in this step
    start: int                  # position of the first new token (= tokens already cached)
    slots: torch.Tensor | slice  # cache slots of positions 0 .. start + len(token_ids) - 1 (or more)
    want_logits: bool = True    # False for a prefill chunk that does not end the prompt


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache):
        self.model = model
        self.cache = cache

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """One forward pass; returns logits [number of chunks wanting them, vocab], in order."""
        tokens, positions, batch, logit_rows = step_inputs(chunks)
        return self.model(tokens, positions, batch, self.cache, logit_rows)


def step_inputs(chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
    """The forward pass's inputs for one step: token ids, their positions, the attention batch
    (slots to write and read) and the rows whose logits are wanted."""
    tokens, positions, logit_rows, seqs = [], [], [], []
    row = 0
    for c in chunks:
        n = len(c.token_ids)
        tokens.extend(c.token_ids)
        positions.extend(range(c.start, c.start + n))
        seqs.append((n, c.start + n, c.slots))
        row += n
        if c.want_logits:
            logit_rows.append(row - 1)
    return (torch.tensor(tokens, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
            AttentionBatch.build(seqs), torch.tensor(logit_rows, dtype=torch.int64))
