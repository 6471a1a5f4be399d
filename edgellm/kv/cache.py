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

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]

    def block_slots(self, block_table: list[int], length: int) -> torch.Tensor:
        """Slots of positions 0..length-1 for a sequence with this block table."""
        bs = self.block_size
        blocks = torch.tensor(block_table, dtype=torch.int64)
        pos = torch.arange(length, dtype=torch.int64)
        return blocks[pos // bs] * bs + pos % bs
