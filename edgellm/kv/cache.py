"""The KV cache: one preallocated pool of fixed-size blocks, addressed by slot.

Slot ``s`` is position ``s % block_size`` of block ``s // block_size``. A sequence owns a list
of blocks (its block table); attention writes new keys/values to their slots and reads a
sequence's history through the slots of its positions. Who owns which block is the block
manager's business (``edgellm.kv.block_manager``); this module only holds the tensors.
"""

from __future__ import annotations

import torch

from edgellm.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype=torch.float32):
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        slots = num_blocks * block_size
        # [layer, k|v, slot, kv_head, head_dim]: one tensor, so a block's bytes across all layers
        # can be copied out (offload) and back with two index operations.
        self.data = torch.zeros(cfg.n_layers, 2, slots, cfg.n_kv_heads, cfg.head_dim, dtype=dtype)

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int = 16, dtype=torch.float32) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return cfg.n_layers * 2 * block_size * cfg.n_kv_heads * cfg.head_dim * element

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, layer: int, slots: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values ([T, kv_heads, head_dim]) at their slots."""
        kc, vc = self.data[layer, 0], self.data[layer, 1]
        if isinstance(slots, slice):
            kc[slots] = k.to(self.dtype)
            vc[slots] = v.to(self.dtype)
        else:
            kc.index_copy_(0, slots, k.to(self.dtype))
            vc.index_copy_(0, slots, v.to(self.dtype))

    def read(self, layer: int, slots: torch.Tensor | slice, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` (a slice, or an index tensor of any shape) as ``dtype``:
        [*slots.shape, kv_heads, head_dim]."""
        kc, vc = self.data[layer, 0], self.data[layer, 1]
        if isinstance(slots, slice):
            return kc[slots].to(dtype), vc[slots].to(dtype)
        flat = slots.reshape(-1)
        shape = (*slots.shape, *kc.shape[1:])
        return kc.index_select(0, flat).view(shape).to(dtype), vc.index_select(0, flat).view(shape).to(dtype)

    def export_blocks(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        """A copy of these blocks' contents in every layer (for offload to host memory or disk)."""
        idx = torch.tensor(blocks, dtype=torch.int64)
        view = self.data.view(self.cfg.n_layers, 2, self.num_blocks, self.block_size, *self.data.shape[3:])
        return {"kv": view.index_select(2, idx).clone()}

    def import_blocks(self, blocks: list[int], saved: dict[str, torch.Tensor]) -> None:
        """Put back what ``export_blocks`` returned, possibly into other block ids."""
        idx = torch.tensor(blocks, dtype=torch.int64)
        view = self.data.view(self.cfg.n_layers, 2, self.num_blocks, self.block_size, *self.data.shape[3:])
        view.index_copy_(2, idx, saved["kv"])

    def block_slots(self, block_table: list[int], length: int) -> torch.Tensor:
        """Slots of positions 0..length-1 for a sequence with this block table."""
        bs = self.block_size
        blocks = torch.tensor(block_table, dtype=torch.int64)
        pos = torch.arange(length, dtype=torch.int64)
        return blocks[pos // bs] * bs + pos % bs
