"""Grouped-query attention over the paged KV cache.

The runner lays every sequence's new tokens end to end ([T, ...], no padding) and describes the
step in an ``AttentionBatch``: where each token's key/value goes (``write_slots``) and, per
sequence, which cache slots hold its history. Decode rows (one new token each) are attended in
one batched call over padded histories; prefill chunks (several new tokens) one sequence at a
time, with a causal mask offset by the tokens already cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from edgellm.kv.cache import KVCache


@dataclass
class SequenceSlice:
    start: int            # first row of this sequence in the flat token batch
    new_tokens: int       # rows it has in this step
    context: int          # tokens in the cache once this step is written (history + new)
    slots: torch.Tensor | slice  # cache slots of positions 0..context-1 (a slice when contiguous)


@dataclass
class AttentionBatch:
    write_slots: torch.Tensor | slice
    prefills: list[SequenceSlice] = field(default_factory=list)
    decode_rows: torch.Tensor | None = None   # [B] rows of the decode tokens
    decode_slots: torch.Tensor | slice | None = None  # [B, Lmax] slot per history position (padded)
    decode_mask: torch.Tensor | None = None   # [B, 1, 1, Lmax] True where a key is real

    @classmethod
    def build(cls, seqs: list[tuple[int, int, torch.Tensor | slice]]) -> "AttentionBatch":
        """``seqs``: (new_tokens, context, slots) per sequence, in batch order."""
        writes, prefills, decodes = [], [], []
        start = 0
        for new, ctx, slots in seqs:
            slots = _slot_range(slots, 0, ctx)  # exactly the positions 0..ctx-1
            s = SequenceSlice(start, new, ctx, slots)
            writes.append(_slot_range(slots, ctx - new, ctx))
            (decodes if new == 1 else prefills).append(s)
            start += new
        batch = cls(write_slots=_concat_slots(writes), prefills=prefills)
        if len(decodes) == 1 and isinstance(decodes[0].slots, slice):
            d = decodes[0]
            batch.decode_rows = torch.tensor([d.start])
            batch.decode_slots = d.slots
        elif decodes:
            lmax = max(d.context for d in decodes)
            slots = torch.zeros(len(decodes), lmax, dtype=torch.int64)
            mask = torch.zeros(len(decodes), 1, 1, lmax, dtype=torch.bool)
            for i, d in enumerate(decodes):
                slots[i, : d.context] = _as_index(d.slots)
                mask[i, ..., : d.context] = True
            batch.decode_rows = torch.tensor([d.start for d in decodes])
            batch.decode_slots, batch.decode_mask = slots, mask
        return batch


def _slot_range(slots, lo: int, hi: int):
    return slice(slots.start + lo, slots.start + hi) if isinstance(slots, slice) else slots[lo:hi]


def _as_index(slots) -> torch.Tensor:
    return torch.arange(slots.start, slots.stop) if isinstance(slots, slice) else slots


def _concat_slots(parts: list):
    if len(parts) == 1:
        return parts[0]
    return torch.cat([_as_index(p) for p in parts])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
              batch: AttentionBatch) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] for the new tokens. Returns [T, H * D]."""
    T, H, D = q.shape
    cache.write(layer, batch.write_slots, k, v)
    out = torch.empty(T, H, D, dtype=q.dtype)
    for s in batch.prefills:
        rows = slice(s.start, s.start + s.new_tokens)
        keys, vals = cache.read(layer, s.slots, q.dtype)   # [L, KVH, D]
        qs = q[rows].transpose(0, 1)                       # [H, Tq, D]
        # Repeating each KV head for its query heads costs a copy but takes PyTorch's flash
        # kernel; its grouped-query path is 5x slower at 512 tokens (measured here).
        group = H // keys.shape[1]
        ks = keys.repeat_interleave(group, dim=1).transpose(0, 1)   # [H, L, D]
        vs = vals.repeat_interleave(group, dim=1).transpose(0, 1)
        if s.new_tokens == s.context:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        else:  # a chunk after cached history: query i sits at position context - new + i
            qpos = torch.arange(s.context - s.new_tokens, s.context)[:, None]
            mask = torch.arange(s.context)[None, :] <= qpos
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        out[rows] = o.transpose(0, 1)
    if batch.decode_rows is not None:
        qd = q.index_select(0, batch.decode_rows).unsqueeze(2)        # [B, H, 1, D]
        keys, vals = cache.read(layer, batch.decode_slots, q.dtype)   # [B, L, KVH, D] or [L, KVH, D]
        if keys.dim() == 3:
            keys, vals = keys.unsqueeze(0), vals.unsqueeze(0)
        o = F.scaled_dot_product_attention(qd, keys.transpose(1, 2), vals.transpose(1, 2),
                                           attn_mask=batch.decode_mask, enable_gqa=True)
        out.index_copy_(0, batch.decode_rows, o.squeeze(2))
    return out.view(T, H * D)
