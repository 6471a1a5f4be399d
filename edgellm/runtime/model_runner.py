"""ModelRunner: turns one step's work (chunks of sequences) into one forward pass.

It knows tensors and slots, nothing of sessions or scheduling: the caller says, per sequence,
which new tokens to run, where they start, and which cache slots the sequence owns. It chooses,
per step, the model's path (every block in one fused native call, or block by block) and the
fused call's thread count (a :class:`~edgellm.kernels.threads.ThreadChooser`); with ``trace``
set, the model marks its ops in it (``edgellm.models.trace``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from edgellm.kernels.threads import ThreadChooser
from edgellm.kv.cache import KVCache
from edgellm.layers.attention import AttentionBatch
from edgellm.models.llama import LlamaModel
from edgellm.models.trace import Trace

#: decode batches up to this many sequences take the fused native step
FUSED_DECODE_MAX_ROWS = 16


@dataclass
class SeqChunk:
    token_ids: list[int]        # the new tokens of this sequence in this step
    start: int                  # position of the first new token (= tokens already cached)
    # cache slots of positions 0 .. start + len(token_ids) - 1 (or more); with a grouped KV layout,
    # a list of them, one per group (``sequence_slots``)
    slots: torch.Tensor | slice | list
    want_logits: bool = True    # False for a prefill chunk that does not end the prompt
    verify: bool = False        # a speculative verify pass: every token is a decode row with logits


class ModelRunner:
    """``fused_decode=False`` keeps every step on the per-layer path (a reference for the fused
    one); ``thread_chooser``: the fused step's thread policy (default: a new one for the current
    torch thread count; it learns from this runner's own step times)."""

    def __init__(self, model: LlamaModel, cache: KVCache, thread_chooser: ThreadChooser | None = None,
                 trace: Trace | None = None, fused_decode: bool = True):
        self.model = model
        self.cache = cache
        self.thread_chooser = thread_chooser or ThreadChooser(torch.get_num_threads())
        self.trace = trace
        self.fused_decode = fused_decode
        # the fused blocks' thread count in the step being run (None: not a fused step); the
        # vocabulary projection after them runs on as many (``torch_threads``)
        self.step_threads: int | None = None

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk], layers: list[int] | None = None) -> torch.Tensor:
        """One forward pass; returns logits [rows wanting them, vocab], in order (one row per chunk
        that wants logits, every row of a verify chunk). ``layers``: run only these blocks before
        the final norm and head (a speculative draft; not traced)."""
        model = self.model
        if getattr(model, "recurrent", False):   # Mamba, RWKV: states in a StatePool, no attention batch
            return model.forward_chunks(chunks, self.cache)
        tokens, positions, batch, logit_rows = step_inputs(chunks)
        trace = self.trace if layers is None else None
        if trace is not None:
            trace.begin_step(tokens.shape[0])
        h = model.embed(tokens, trace)
        rope = model.rope_tables(positions, trace)
        self.step_threads = None
        h = self.run_blocks(h, rope, batch, layers)
        with torch_threads(self.step_threads):
            logits = model.logits(h, logit_rows, trace)
        if trace is not None:
            trace.end_step()
        return logits

    def run_blocks(self, h: torch.Tensor, rope, batch: AttentionBatch, layers: list[int] | None = None) -> torch.Tensor:
        """The model's blocks over hidden states h [T, hidden], on the fused decode step or block
        by block; returns the new h. A rank of a split model runs only this part of a step
        (``edgellm.runtime.parallel_runner``)."""
        if self.uses_fused_decode(h.shape[0], batch):
            self._decode_fused(h, rope, batch, layers)
            return h
        return self.model.forward_layers(h, rope, batch, self.cache, self.trace if layers is None else None, layers)

    def uses_fused_decode(self, rows: int, batch: AttentionBatch) -> bool:
        """The fused native step streams the quantised weights once for all rows, which wins while
        the batch is small (memory-bound); with many rows the per-layer path's dequantise-then-BLAS
        matmuls do the arithmetic faster (measured 2.4x at 64 rows)."""
        return (self.fused_decode and rows <= FUSED_DECODE_MAX_ROWS
                and self.model.fused_decode_supported(batch, self.cache))

    def _decode_fused(self, h: torch.Tensor, rope, batch: AttentionBatch, layers: list[int] | None = None) -> None:
        if self.thread_chooser.max_threads != torch.get_num_threads():   # the caller changed the setting
            self.thread_chooser = ThreadChooser(torch.get_num_threads())
        rows = h.shape[0]
        threads = self.thread_chooser.threads(rows)
        self.step_threads = threads
        start = time.perf_counter()
        self.model.decode_blocks_fused(h, rope, batch, self.cache, threads, self.trace if layers is None else None,
                                       layers)
        if layers is None:      # the chooser learns from whole steps only
            self.thread_chooser.record(rows, threads, time.perf_counter() - start)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's (and so the native matmuls') thread count set to ``threads`` inside the block
    (None: left as it is), restored after.

    For the vocabulary projection after a fused decode step: when the thread chooser has moved the
    blocks to one thread because other processes keep the cores busy, a 2-thread ``parallel_for``
    over the 49k-row head stalls the same way (measured at a load average of ~10 on 2 vCPUs: the
    head of SmolLM2 took 10.3 ms on 2 threads and 2.1 ms on 1 at one row, 56 and 40 ms at 16
    rows). Each output row is computed alone, so the logits are the same bits on any count."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sequence_slots(cache, kv, length: int):
    """The slots of positions 0..length-1 of the sequence whose KV is ``kv`` (a KVSequence): one
    set for a cache with one block table, a list of them (one per group) for a grouped layout."""
    if kv.extra:
        return [cache.block_slots(table, length) for table in kv.tables]
    return cache.block_slots(kv.blocks, length)


def step_inputs(chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
    """The forward pass's inputs for one step: token ids, their positions, the attention batch
    (slots to write and read; one per group of a grouped KV layout) and the rows whose logits
    are wanted (one per chunk that wants them; every row of a verify chunk)."""
    if chunks and isinstance(chunks[0].slots, list):
        groups = [step_inputs([replace(c, slots=c.slots[g]) for c in chunks]) for g in range(len(chunks[0].slots))]
        tokens, positions, batch, logit_rows = groups[0]
        batch.groups = [b for _, _, b, _ in groups]
        return tokens, positions, batch, logit_rows
    tokens, positions, logit_rows, seqs = [], [], [], []
    row = 0
    for c in chunks:
        n = len(c.token_ids)
        tokens.extend(c.token_ids)
        positions.extend(range(c.start, c.start + n))
        if c.verify:
            # Token i of a verify pass is the decode row of position start + i, attending to the
            # positions before it (those of this pass included): the same computation a plain
            # decode step of that token would do, so its logits are the ones plain decoding gets.
            for i in range(n):
                seqs.append((1, c.start + i + 1, c.slots))
                logit_rows.append(row + i)
            row += n
            continue
        seqs.append((n, c.start + n, c.slots))
        row += n
        if c.want_logits:
            logit_rows.append(row - 1)
    return (torch.tensor(tokens, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
            AttentionBatch.build(seqs), torch.tensor(logit_rows, dtype=torch.int64))
