"""RoPE tables: grown on demand, equal to the formula cos/sin(p * theta^(-2i/d)) at every size."""

from __future__ import annotations

import math

import pytest
import torch

from edgellm.config import ModelConfig
from edgellm.layers.rope import RotaryEmbedding


def _cfg(smollm2_path) -> ModelConfig:
    from edgellm.loading.gguf import read_gguf

    return read_gguf(smollm2_path).config()


def test_tables_grow_with_the_positions_and_match_the_formula(smollm2_path):
    cfg = _cfg(smollm2_path)
    rope = RotaryEmbedding(cfg)
    assert rope.cos.shape[0] == RotaryEmbedding.MIN_POSITIONS < cfg.context_length
    small = rope.tables(torch.tensor([0, 5, 1023]))
    pos = torch.tensor([5, 1023, 3000, cfg.context_length - 1])
    cos, sin = rope.tables(pos)
    assert rope.cos.shape[0] == cfg.context_length          # doubled past 3000, capped at the context
    d = cfg.head_dim
    for row, p in enumerate(pos.tolist()):
        for i in (0, 7, d // 2 - 1):
            angle = torch.tensor(p, dtype=torch.float32) * torch.tensor(1.0 / cfg.rope_theta ** (2 * i / d))
            # float32 frequencies: the angle of position 8191 is good to ~1e-4 rad
            assert cos[row, 0, i].item() == pytest.approx(math.cos(angle.item()), abs=2e-4)
            assert sin[row, 0, i + d // 2].item() == pytest.approx(math.sin(angle.item()), abs=2e-4)
    # a position's values do not depend on the table's size
    assert torch.equal(small[0][1:], rope.tables(torch.tensor([5, 1023]))[0])
    with pytest.raises(IndexError, match="context window"):
        rope.tables(torch.tensor([cfg.context_length]))
