"""The state pool: what a recurrent model (Mamba, Mamba-2, RWKV) keeps instead of a KV cache.

A state-space model summarises everything it has read in a fixed-size state per layer (Mamba: the
last few convolution inputs and the SSM state). To fit the engine's lifecycle unchanged -- the
block manager's reference counts, prefix hashes, copy-on-write, offload and preemption -- the pool
is addressed by the same block ids as the KV pool, but a block holds one *state snapshot* instead
of ``block_size`` keys and values:

* a full block holds the state after its last token. Its prefix hash names every token before
  it, so the hash fixes the snapshot exactly as it fixes a KV block's contents: a sequence whose
  prompt starts with the same full blocks takes them from the prefix cache and goes on from the
  snapshot of the last one (a shared system prompt is computed once);
* a sequence's last, partly filled block holds the state after its last computed token: the
  state a decode step or a follow-up turn continues from. Partial blocks are private, so it is
  overwritten in place as the sequence advances; full blocks are never written again.

A sequence therefore resumes only at its own end or at a block edge (:attr:`resumes_mid_block`
is False): cut back inside a block, it recomputes from the edge before. The memory a sequence
holds grows by one snapshot per ``block_size`` tokens -- the price of prefix reuse at every
block edge; a larger block size trades reuse granularity for memory.

The pool stores float32 snapshots, one tensor per named part of a layer's state
(``[n_layers, num_blocks, *shape]``); the model says which parts and shapes
(``state_shapes()``) and reads/writes them by block id. ``export_blocks``/``import_blocks``/
``copy_block`` have the KV cache's signatures, so offload and copy-on-write take either.
"""

from __future__ import annotations

import math

import torch

from edgellm.errors import InvalidParameterError


class StatePool:
    #: a sequence cut back inside a block cannot resume there (only block edges hold snapshots)
    resumes_mid_block = False

    def __init__(self, state_shapes: dict[str, tuple[int, ...]], n_layers: int, num_blocks: int,
                 block_size: int = 16):
        """``state_shapes``: name -> shape of that part of one layer's state for one sequence."""
        self.shapes = dict(state_shapes)
        self.n_layers = n_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = torch.float32
        self.data = {name: torch.zeros(n_layers, num_blocks, *shape, dtype=self.dtype)
                     for name, shape in self.shapes.items()}

    @staticmethod
    def bytes_per_block(state_shapes: dict[str, tuple[int, ...]], n_layers: int) -> int:
        """Bytes of one snapshot (every layer, every part), float32."""
        return 4 * n_layers * sum(math.prod(s) for s in state_shapes.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    # ---- the model's access ---------------------------------------------------------------------
    def read(self, layer: int, name: str, blocks: torch.Tensor) -> torch.Tensor:
        """The snapshots of ``blocks`` ([B] ids) of one layer's part ``name``: [B, *shape] (a copy)."""
        return self.data[name][layer].index_select(0, blocks)

    def write(self, layer: int, name: str, blocks: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``values`` ([B, *shape]) as the snapshots of ``blocks`` ([B] distinct ids)."""
        self.data[name][layer].index_copy_(0, blocks, values.to(self.dtype))

    def block_slots(self, block_table: list[int], length: int) -> torch.Tensor:
        """The block ids covering positions 0..length-1 (what the model reads and writes snapshots
        by; the KV cache's method of the same name returns token slots)."""
        return torch.tensor(block_table[:-(-length // self.block_size)], dtype=torch.int64)

    # ---- offload and copy-on-write ------------------------------------------------------------------
    def export_blocks(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        """A copy of these blocks' snapshots (for offload to host memory or disk)."""
        idx = torch.tensor(blocks, dtype=torch.int64)
        return {name: t.index_select(1, idx) for name, t in self.data.items()}

    def import_blocks(self, blocks: list[int], saved: dict[str, torch.Tensor]) -> None:
        """Put back what ``export_blocks`` returned, possibly into other block ids."""
        if set(saved) != set(self.data):
            raise ValueError(f"saved state has parts {sorted(saved)}, this pool {sorted(self.data)}")
        idx = torch.tensor(blocks, dtype=torch.int64)
        for name, t in self.data.items():
            t.index_copy_(1, idx, saved[name].to(self.dtype))

    def copy_block(self, src: int, dst: int) -> None:
        """Block ``src``'s snapshot, every layer, into block ``dst``."""
        self.import_blocks([dst], self.export_blocks([src]))


def check_state_dtype(kv_dtype) -> None:
    """Recurrent states are kept in float32 only: a state is rewritten at every token, so a
    rounding of each write would accumulate over the whole context."""
    name = kv_dtype if isinstance(kv_dtype, str) else {torch.float32: "fp32"}.get(kv_dtype, str(kv_dtype))
    if name not in ("fp32", "float32"):
        raise InvalidParameterError(
            f"kv_dtype {name!r} was asked for a recurrent (state-space) model, whose state is kept in float32 only",
            "drop --kv-dtype / kv_dtype (the default fp32) for this model")
