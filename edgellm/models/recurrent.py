"""What every recurrent (attention-free) model shares: the plan of one engine step over a
:class:`~edgellm.kv.state.StatePool`, and the forward pass built on it.

A step's chunks (``SeqChunk``: new tokens, first position, and as ``slots`` a
:class:`~edgellm.kv.state.StateSlots`: the sequence's live slot and the snapshots owed) are laid
end to end as for attention models ([T] tokens). A sequence's live slot holds its state after its
last computed token -- where its next chunk starts -- and the chunk leaves its new state there:

* a **decode row** (one token after history): reads the live slot and writes it back. All decode
  rows of a step are updated together, batched over sequences;
* a **segment** (a prefill chunk, or a sequence's very first token): starts from the live slot,
  or from zeros at position 0, writes the snapshots the state manager asked for at block edges
  inside it (prefix reuse, ``edgellm.kv.state_manager``) and its last state to the live slot. A
  model scans a segment in pieces that end at those writes (:func:`scan_pieces`), vectorised
  within a piece -- no Python loop per token.

The models (``mamba``, ``mamba2``, ``rwkv``) implement ``embed``, ``block`` and ``final_norm``
over this plan; :class:`RecurrentModel` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgellm.kv.state import StatePool, StateSlots

#: longest piece a segment is scanned in: a piece materialises [L, L, ...] decay factors, so its
#: cost and memory grow with L squared; 16 positions keep both small and the Python loop short
SCAN_PIECE = 16


@dataclass
class Segment:
    rows: slice                     # this chunk's rows in the step's flat token batch
    start: int                      # position of its first token
    source: int | None              # slot whose state it starts from; None: zeros (position 0)
    writes: list[tuple[int, int]]   # (row offset in the chunk, slot): store the state after that row

    @property
    def length(self) -> int:
        return self.rows.stop - self.rows.start


@dataclass
class RecurrentStep:
    tokens: torch.Tensor                            # [T]
    logit_rows: torch.Tensor                        # rows whose next-token logits are wanted
    segments: list[Segment] = field(default_factory=list)
    decode_rows: torch.Tensor | None = None         # [B] rows of the decode tokens
    decode_source: torch.Tensor | None = None       # [B] slot each reads its state from
    decode_target: torch.Tensor | None = None       # [B] slot each writes its new state to

    @classmethod
    def plan(cls, chunks) -> "RecurrentStep":
        """``chunks``: objects with ``token_ids``, ``start``, ``slots`` (a :class:`StateSlots`)
        and ``want_logits``."""
        tokens, logit_rows, segments = [], [], []
        rows, sources, targets = [], [], []
        row = 0
        for c in chunks:
            if getattr(c, "verify", False):
                raise ValueError("a recurrent model cannot verify speculative tokens: its state would "
                                 "advance past rejected ones")
            n, start = len(c.token_ids), c.start
            slots: StateSlots = c.slots
            tokens.extend(c.token_ids)
            source = slots.live if start > 0 else None
            if n == 1 and source is not None:
                rows.append(row)
                sources.append(source)
                targets.append(slots.live)
            else:
                # snapshots at edges inside the chunk, then the live state after its last token
                # (the state manager copies a snapshot owed at the chunk's end from the live slot)
                writes = [(edge - start - 1, slot) for edge, slot in slots.snapshots if start < edge < start + n]
                segments.append(Segment(slice(row, row + n), start, source, writes + [(n - 1, slots.live)]))
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
    """A segment's rows cut into pieces ``(lo, hi, slot)``: each at most ``longest`` rows, each
    state write ending one (``slot``: where the state after row hi - 1 goes, else None)."""
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
        step = RecurrentStep.plan(chunks)
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
        pool = StatePool(self.state_shapes(), self.cfg.n_layers, 1)
        segment = Segment(slice(0, n), 0, None, [(n - 1, 0)])
        return self.final_norm(self.run_layers(RecurrentStep(tokens, torch.tensor([n - 1]), [segment]), pool))

    def state_shapes(self) -> dict[str, tuple[int, ...]]:   # pragma: no cover - abstract
        raise NotImplementedError
