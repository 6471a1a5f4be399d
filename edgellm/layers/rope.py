"""Rotary position embeddings (RoPE), with Llama-3 frequency scaling.

We use the "rotate half" convention of Hugging Face checkpoints. GGUF files of the llama family
store q/k rows permuted for ggml's adjacent-pair rotation; the loader undoes that permutation,
so one convention serves every source.
"""

from __future__ import annotations

import math

import torch

from edgellm.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding:
    """cos/sin tables of positions, looked up per token. The tables grow (doubling) with the
    highest position seen instead of covering the whole context at once: Qwen2.5's 32k context
    would otherwise hold 16 MB of tables that a short chat never reads. A position's values do
    not depend on the table's size (one float32 product, then cos and sin)."""

    MIN_POSITIONS = 1024

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        self.limit = max_positions or cfg.context_length
        self.inv = inverse_frequencies(cfg)
        self.cos = self.sin = torch.empty(0, cfg.head_dim)
        self._grow(min(self.limit, self.MIN_POSITIONS))

    def _grow(self, n: int) -> None:
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for these positions, shaped [T, 1, head_dim]; looked up once per forward."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0]:
            if need > self.limit:
                raise IndexError(f"position {need - 1} is beyond the context window of {self.limit}")
            self._grow(min(self.limit, max(need, 2 * self.cos.shape[0])))
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, 1, head_dim] from ``RotaryEmbedding.tables``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
