"""What every recurrent (attention-free) model shares: the plan of one engine step over a
:class:`~edgellm.kv.state.StatePool`, and the forward pass built on it.

A step's chunks (``SeqChunk``: new tokens, first position, the block ids covering the sequence)
are laid end to end as for attention models ([T] tokens). Each chunk reads the state snapshot
left by the token before it and writes snapshots after some of its own tokens:

* a **decode row** (one token after history): reads the snapshot of the block of position
  ``start - 1``, writes the one of position ``start``'s block. All decode rows of a step are
  updated together, batched over sequences;
* a **segment** (a prefill chunk, or a sequence's very first token): starts from that snapshot,
  or from zeros at position 0, and writes a snapshot at every block edge it crosses and after its
  last token, so later sequences can resume at any full block (prefix reuse) and the sequence
  itself at its end. A model scans a segment in pieces that end at those writes
  (:func:`scan_pieces`), vectorised within a piece -- no Python loop per token.

The models (``mamba``, ``mamba2``, ``rwkv``) implement ``embed``, ``block`` and ``final_norm``
over this plan; :class:`RecurrentModel` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgellm.kv.state import StatePool

#: longest piece a segment is scanned in: a piece materialises [L, L, ...] decay factors, so its
#: cost and memory grow with L squared; 16 positions keep both small and the Python loop short
SCAN_PIECE = 16


@dataclass
class Segment:
    rows: slice                     # this chunk's rows in the step's flat token batch
    start: int                      # position of its first token
    source: int | None              # block whose snapshot it starts from; None: zeros (position 0)
    writes: list[tuple[int, int]]   # (row offset in the chunk, block): store the state after that row

    @property
    def length(self) -> int:
        return self.rows.stop - self.rows.start


@dataclass
class RecurrentStep:
    tokens: torch.Tensor                            # [T]
    logit_rows: torch.Tensor                        # rows whose next-token logits are wanted
    segments: list[Segment] = field(default_factory=list)
    decode_rows: torch.Tensor | None = None         # [B] rows of the decode tokens
    decode_source: torch.Tensor | None = None       # [B] block each reads its state from
    decode_target: torch.Tensor | None = None       # [B] block each writes its new state to

    @classmethod
    def plan(cls, chunks, block_size: int) -> "RecurrentStep":
        """``chunks``: objects with ``token_ids``, ``start``, ``slots`` (the block ids covering
        the sequence through this chunk) and ``want_logits``."""
        tokens, logit_rows, segments = [], [], []
        rows, sources, targets = [], [], []
        row = 0
        for c in chunks:
            if getattr(c, "verify", False):
                raise ValueError("a recurrent model cannot verify speculative tokens: its state would "
                                 "advance past rejected ones")
            n, start = len(c.token_ids), c.start
            blocks = [int(b) for b in c.slots]
            tokens.extend(c.token_ids)
            source = blocks[(start - 1) // block_size] if start > 0 else None
            if n == 1 and source is not None:
                rows.append(row)
                sources.append(source)
                targets.append(blocks[start // block_size])
            else:
                writes = [(t, blocks[(start + t) // block_size]) for t in range(n)
                          if (start + t + 1) % block_size == 0 or t == n - 1]
                segments.append(Segment(slice(row, row + n), start, source, writes))
            row += n
            if c.want_logits:
                logit_rows.append(row - 1)
        step = cls(torch.tensor(tokens, dtype=torch.int64), torch.tensor(logit_rows, dtype=torch.int64), segments)
        if rows:
            step.decode_rows = torch.tensor(rows, dtype=torch.int64)
            step.decode_source = torch.tensor(sources, dtype=torch.int64)
            step.decode_target = torch.tensor(targets, dtype=torch.int64)
        return step


def scan_pieces(segment: Segment, longest: int = SCAN_PIECE) -> list[tuple[int, int, int | None]]:
    """A segment's rows cut into pieces ``(lo, hi, block)``: each at most ``longest`` rows, each
    snapshot write ending one (``block``: where the state after row hi - 1 goes, else None)."""
    ends = {t + 1: b for t, b in segment.writes}
    pieces, lo = [], 0
    for hi in range(1, segment.length + 1):
        if hi in ends or hi - lo == longest:
            pieces.append((lo, hi, ends.get(hi)))
            lo = hi
    return pieces


class RecurrentModel:
    """The forward pass of a recurrent model over a step; subclasses give ``embed(tokens)``,
    ``block(h, layer, step, pool)``, ``final_norm(h)``, ``state_shapes()`` and ``weights``
    (with ``lm_head`` and ``nbytes``)."""

    #: the runtime keeps a StatePool (not a KV cache) for models that say so
    recurrent = True
    has_fused_decode = False

    def forward_chunks(self, chunks, pool: StatePool) -> torch.Tensor:
        """One step over ``pool``: float32 logits [rows wanting them, vocab], in chunk order."""
        step = RecurrentStep.plan(chunks, pool.block_size)
        h = self.run_layers(step, pool)
        return self.weights.lm_head.matmul(self.final_norm(h.index_select(0, step.logit_rows)))

    def run_layers(self, step: RecurrentStep, pool: StatePool) -> torch.Tensor:
        h = self.embed(step.tokens)
        for layer in range(self.cfg.n_layers):
            h = self.block(h, layer, step, pool)
        return h

    @torch.inference_mode()
    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final hidden states of one sequence [T, hidden] (after the final norm), for
        embeddings; over a scratch pool of its own, never a serving one."""
        n = int(tokens.shape[0])
        pool = StatePool(self.state_shapes(), self.cfg.n_layers, 1, block_size=max(1, n))
        segment = Segment(slice(0, n), 0, None, [(n - 1, 0)])
        return self.final_norm(self.run_layers(RecurrentStep(tokens, torch.tensor([n - 1]), [segment]), pool))

    def state_shapes(self) -> dict[str, tuple[int, ...]]:   # pragma: no cover - abstract
        raise NotImplementedError
