"""The state pool: what a recurrent model (Mamba, Mamba-2, RWKV) keeps instead of a KV cache.

A state-space model summarises everything it has read in a fixed-size state per layer (Mamba: the
last few convolution inputs and the SSM state), so a sequence's memory must not grow with its
length. The pool is ``num_slots`` *slots*, each one state of every layer; a slot is either

* a sequence's **live state**: its state after its last computed token. Each sequence holding a
  state (running, or inactive between turns) owns exactly one live slot, whatever its length; a
  step reads it and writes it back in place (a chunk starts where the sequence stands). Offload
  and restore move this one slot; or
* a **snapshot**: the state at a block edge of some prompt, named by the prefix hash of every token
  before the edge (``edgellm.kv.block_manager.prefix_hashes``). Snapshots are a bounded,
  evictable cache (:class:`edgellm.kv.state_manager.StateManager` keeps the books): a sequence
  whose prompt starts with a cached prefix copies the snapshot into its live slot and goes on from
  there (a shared system prompt is computed once); evicting one changes only what is recomputed.

Why not one snapshot per block, as KV blocks are paged: then a sequence held one snapshot per
``block_size`` tokens (2.7 MiB each for Mamba-130M), its memory grew with its length like a KV
cache's, and a long conversation could not stay resident. Here the per-sequence cost is one slot;
the prefix cache costs what its capacity allows, shared by all sequences.

The pool stores float32 states, one tensor per named part of a layer's state
(``[n_layers, num_slots, *shape]``); the model says which parts and shapes (``state_shapes()``)
and reads/writes them by slot. ``export_blocks``/``import_blocks``/``copy_block`` have the KV
cache's signatures (a "block" here is a slot), so offload takes either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from edgellm.errors import InvalidParameterError


@dataclass
class StateSlots:
    """Where one chunk of a sequence reads and writes its state (``SeqChunk.slots`` for a recurrent
    model): it starts from ``live`` (unless it starts at position 0: zeros), leaves its state after
    its last token in ``live``, and stores the state after position ``edge - 1`` in ``slot`` for
    each ``(edge, slot)`` of ``snapshots`` (edges inside the chunk, before its last token)."""

    live: int
    snapshots: list[tuple[int, int]] = field(default_factory=list)


class StatePool:
    #: a sequence cut back inside its history cannot resume there: only its end (the live state)
    #: and cached block-edge snapshots hold states
    resumes_mid_block = False

    def __init__(self, state_shapes: dict[str, tuple[int, ...]], n_layers: int, num_slots: int,
                 block_size: int = 16):
        """``state_shapes``: name -> shape of that part of one layer's state for one sequence."""
        self.shapes = dict(state_shapes)
        self.n_layers = n_layers
        self.num_slots = num_slots
        self.block_size = block_size
        self.dtype = torch.float32
        self.data = {name: torch.zeros(n_layers, num_slots, *shape, dtype=self.dtype)
                     for name, shape in self.shapes.items()}

    @property
    def num_blocks(self) -> int:
        """Slots, under the KV cache's name (the engine sizes either pool in these units)."""
        return self.num_slots

    @staticmethod
    def bytes_per_state(state_shapes: dict[str, tuple[int, ...]], n_layers: int) -> int:
        """Bytes of one slot: one sequence's state, every layer and part, float32."""
        return 4 * n_layers * sum(math.prod(s) for s in state_shapes.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    # ---- the model's access ---------------------------------------------------------------------
    def read(self, layer: int, name: str, slots: torch.Tensor) -> torch.Tensor:
        """The states in ``slots`` ([B] ids) of one layer's part ``name``: [B, *shape] (a copy)."""
        return self.data[name][layer].index_select(0, slots)

    def write(self, layer: int, name: str, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``values`` ([B, *shape]) in ``slots`` ([B] distinct ids)."""
        self.data[name][layer].index_copy_(0, slots, values.to(self.dtype))

    # ---- offload and snapshots ------------------------------------------------------------------
    def export_blocks(self, slots: list[int]) -> dict[str, torch.Tensor]:
        """A copy of these slots' states (for offload to host memory or disk)."""
        idx = torch.tensor(slots, dtype=torch.int64)
        return {name: t.index_select(1, idx) for name, t in self.data.items()}

    def import_blocks(self, slots: list[int], saved: dict[str, torch.Tensor]) -> None:
        """Put back what ``export_blocks`` returned, possibly into other slots."""
        if set(saved) != set(self.data):
            raise ValueError(f"saved state has parts {sorted(saved)}, this pool {sorted(self.data)}")
        idx = torch.tensor(slots, dtype=torch.int64)
        for name, t in self.data.items():
            t.index_copy_(1, idx, saved[name].to(self.dtype))

    def copy_block(self, src: int, dst: int) -> None:
        """Slot ``src``'s state, every layer, into slot ``dst`` (a snapshot taken or resumed from)."""
        for t in self.data.values():
            t[:, dst] = t[:, src]


def check_state_dtype(kv_dtype) -> None:
    """Recurrent states are kept in float32 only: a state is rewritten at every token, so a
    rounding of each write would accumulate over the whole context."""
    name = kv_dtype if isinstance(kv_dtype, str) else {torch.float32: "fp32"}.get(kv_dtype, str(kv_dtype))
    if name not in ("fp32", "float32"):
        raise InvalidParameterError(
            f"kv_dtype {name!r} was asked for a recurrent (state-space) model, whose state is kept in float32 only",
            "drop --kv-dtype / kv_dtype (the default fp32) for this model")
