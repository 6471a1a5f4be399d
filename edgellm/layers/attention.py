"""Grouped-query attention over the paged KV cache.

The runner lays every sequence's new tokens end to end ([T, ...], no padding) and describes the
step in an ``AttentionBatch``: where each token's key/value goes (``write_slots``) and, per
sequence, which cache slots hold its history. Attention is two calls, so that a trace can time
them apart: :func:`write_kv` (RoPE, then k and v into the cache) and :func:`attend`. Decode rows
(one new token each) are attended in one batched call over padded histories; prefill chunks
(several new tokens) one sequence at a time, with a causal mask offset by the tokens already cached.

Sliding-window layers (Mistral, Gemma 3) pass ``window``: the query at position p then sees the
keys of positions p - window + 1 .. p only. Decode rows read just those positions (the batch's
histories trimmed once per step and window, :meth:`AttentionBatch.windowed`); prefill chunks mask
the rest and skip keys no query of the chunk can see.

With a grouped KV layout (``edgellm.kv.cache.KVLayout``: sliding layers on block tables of their
own) the step has one batch per group (``AttentionBatch.groups``); each layer uses its group's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from edgellm.kernels import native
from edgellm.kernels.build import cpu_flags
from edgellm.kv.cache import KVCache
from edgellm.layers.rope import apply_rope


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
    # The same as index tensors, for the native kernels (built once per step, used by every layer).
    write_index: torch.Tensor | None = None   # [T]
    decode_index: torch.Tensor | None = None  # [B, Lmax]
    decode_lens: torch.Tensor | None = None   # [B]
    decode_seqs: list[SequenceSlice] = field(default_factory=list)   # the decode rows' sequences
    # the decode part restricted to each window size asked for this step (see ``windowed``)
    windows: dict = field(default_factory=dict, repr=False)
    # one batch per group of a grouped KV layout (each its own slots), else None: this one serves all
    groups: list | None = None

    def for_layer(self, cache: KVCache, layer: int) -> "AttentionBatch":
        """The batch addressing ``layer``'s KV: its group's with a grouped layout, else this one."""
        if self.groups is None:
            return self
        return self.groups[cache.group_of[layer]]

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
        batch = cls(write_slots=_concat_slots(writes), prefills=prefills, decode_seqs=decodes)
        batch.write_index = _as_index(batch.write_slots)
        if decodes:
            lmax = max(d.context for d in decodes)
            if len(decodes) == 1:   # one row: its slots are the whole index (no padding to fill)
                index = _as_index(decodes[0].slots).view(1, lmax)
            else:
                index = torch.zeros(len(decodes), lmax, dtype=torch.int64)
                for i, d in enumerate(decodes):
                    index[i, : d.context] = _as_index(d.slots)
            batch.decode_rows = torch.tensor([d.start for d in decodes])
            batch.decode_index = index
            batch.decode_lens = torch.tensor([d.context for d in decodes])
            if len(decodes) == 1 and isinstance(decodes[0].slots, slice):
                batch.decode_slots = decodes[0].slots      # a view, no gather
            else:
                batch.decode_slots = index
                batch.decode_mask = (torch.arange(lmax)[None, :] < batch.decode_lens[:, None]).view(
                    len(decodes), 1, 1, lmax)
        return batch

    def windowed(self, window: int | None) -> "AttentionBatch":
        """This step with each decode row's history cut to its last ``window`` positions (the
        row's own token included): the decode fields of a sliding-window layer. Built once per
        step and window size, then shared by every layer with that window. Prefill slices are
        kept as they are (``attend`` masks them)."""
        if window is None or self.decode_lens is None or int(self.decode_lens.max()) <= window:
            return self
        if window not in self.windows:
            part = AttentionBatch.build([(1, min(d.context, window),
                                          _slot_range(d.slots, max(0, d.context - window), d.context))
                                         for d in self.decode_seqs])
            self.windows[window] = AttentionBatch(
                write_slots=self.write_slots, prefills=self.prefills, decode_rows=self.decode_rows,
                decode_slots=part.decode_slots, decode_mask=part.decode_mask, write_index=self.write_index,
                decode_index=part.decode_index, decode_lens=part.decode_lens)
        return self.windows[window]


def _slot_range(slots, lo: int, hi: int):
    return slice(slots.start + lo, slots.start + hi) if isinstance(slots, slice) else slots[lo:hi]


def _as_index(slots) -> torch.Tensor:
    return torch.arange(slots.start, slots.stop) if isinstance(slots, slice) else slots


def _concat_slots(parts: list):
    if len(parts) == 1:
        return parts[0]
    return torch.cat([_as_index(p) for p in parts])


def write_kv(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, layer: int,
             batch: AttentionBatch, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """The first half of attention: RoPE on q and k, k and v into the cache at ``batch.write_slots``.
    Returns q, [T, H, D]."""
    T = qkv.shape[0]
    D = cache.cfg.head_dim
    batch = batch.for_layer(cache, layer)
    ext = native() if cache.dtype == torch.float32 else None
    if ext is not None:  # fused: RoPE + cache write in one call
        kc, vc = cache.keys_values(layer)
        return ext.rope_qkv_write(qkv, rope[0].view(T, D), rope[1].view(T, D), kc, vc, batch.write_index,
                                  n_heads, n_kv_heads)
    q, k, v = qkv.split([n_heads * D, n_kv_heads * D, n_kv_heads * D], dim=-1)
    q = apply_rope(q.view(T, n_heads, D), *rope)
    k = apply_rope(k.view(T, n_kv_heads, D), *rope)
    cache.write(layer, batch.write_slots, k, v.reshape(T, n_kv_heads, D))
    return q


def native_bf16_attention(ext, head_dim: int) -> bool:
    """Whether a bf16 prefill attention runs on our kernel (``prefill_attention_bf16``: vdpbf16ps,
    edgellm/kernels/bf16_attention.h) instead of PyTorch's flash kernel on bf16 inputs: where the
    avx512 kernels run on a CPU with AVX512_BF16 and without AMX (whose tiles PyTorch's kernel
    multiplies; ours has not been measured against them), for head sizes a multiple of 64.
    ``EDGELLM_BF16_ATTENTION=ours`` takes ours on AMX CPUs too (to compare the two there)."""
    if ext is None or head_dim % 64 or not ext.bf16_dot_available():
        return False
    return not cpu_has_amx() or os.environ.get("EDGELLM_BF16_ATTENTION", "") == "ours"


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    return "amx_bf16" in cpu_flags()


#: Prefill queries go to the flash kernel this many at a time, each part with only the keys up to
#: its last query: the parts skip most of the masked triangle above the diagonal, and were faster
#: than one call over all the queries (docs/kernels.md, "Prefill attention in parts").
PREFILL_QUERY_PART = 64


def causal_attention(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, first: int, lo: int,
                     window: int | None, out: torch.Tensor) -> None:
    """Causal attention of queries qs [1, H, Tq, D] at positions first .. first + Tq - 1 over keys
    and values ks, vs [1, H, L, D] at positions lo .. lo + L - 1 (the last one is the last query's),
    within ``window`` positions if given; writes out [Tq, H, D] (float32)."""
    n_queries = qs.shape[2]
    for a in range(0, n_queries, PREFILL_QUERY_PART):
        b = min(n_queries, a + PREFILL_QUERY_PART)
        q_lo, q_hi = first + a, first + b                     # positions of this part's queries
        k_lo = lo if window is None else max(lo, q_lo - window + 1)
        part = slice(k_lo - lo, q_hi - lo)                    # the keys some query of the part sees
        q, k, v = qs[:, :, a:b], ks[:, :, part], vs[:, :, part]
        if k_lo == q_lo and (window is None or q_hi - q_lo <= window):   # square: the kernel's own mask
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i of the part sits at position q_lo + i
            qpos = torch.arange(q_lo, q_hi)[:, None]
            kpos = torch.arange(k_lo, q_hi)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out[a:b] = o[0].transpose(0, 1)


def attend(q: torch.Tensor, cache: KVCache, layer: int, batch: AttentionBatch,
           window: int | None = None, prefill_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The second half of attention: q [T, H, D] over the cached keys and values of each token's
    sequence (written by :func:`write_kv`, this step's included), or over the last ``window``
    positions of it (sliding-window layers). Returns [T, H * D]. ``prefill_dtype``: what the
    prefill rows' attention multiplies in (``--dtype bfloat16`` where the CPU has AMX or
    AVX512_BF16: bfloat16, :func:`native_bf16_attention` says whose kernel); decode rows and the
    result are float32 either way."""
    T, H, D = q.shape
    batch = batch.for_layer(cache, layer).windowed(window)
    # The native kernels read a float32 cache only; other cache formats dequantise in cache.read.
    ext = native() if cache.dtype == torch.float32 else None
    if not batch.prefills and ext is not None:  # decode-only step: the common case
        return ext.decode_attention(q, *cache.keys_values(layer), batch.decode_index,
                                    batch.decode_lens)
    out = torch.empty(T, H, D, dtype=q.dtype)
    for s in batch.prefills:
        rows = slice(s.start, s.start + s.new_tokens)
        first = s.context - s.new_tokens               # position of the chunk's first query
        # keys before the first query's window are seen by no query of the chunk: not read
        lo = max(0, first - window + 1) if window is not None else 0
        keys, vals = cache.read(layer, _slot_range(s.slots, lo, s.context), q.dtype)   # [L, KVH, D]
        if prefill_dtype == torch.bfloat16 and native_bf16_attention(ext, D):
            out[rows] = ext.prefill_attention_bf16(q[rows], keys, vals, first, lo, window or 0)
            continue
        # [1, H, Tq, D]: PyTorch's CPU flash kernel takes 4-D inputs only; 3-D ones fall back to
        # the math path, measured 3.7x slower at 512 tokens.
        qs = q[rows].transpose(0, 1).unsqueeze(0)
        # Repeating each KV head for its query heads costs a copy but takes the flash kernel; its
        # grouped-query path is 5x slower at 512 tokens (measured here).
        group = H // keys.shape[1]
        ks = keys.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)   # [1, H, L, D]
        vs = vals.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
        if prefill_dtype != q.dtype:
            qs, ks, vs = qs.to(prefill_dtype), ks.to(prefill_dtype), vs.to(prefill_dtype)
        causal_attention(qs, ks, vs, first, lo, window, out[rows])
    if batch.decode_rows is not None:
        qd = q.index_select(0, batch.decode_rows)                     # [B, H, D]
        if ext is not None:
            o = ext.decode_attention(qd, *cache.keys_values(layer), batch.decode_index,
                                     batch.decode_lens).view(-1, H, D)
        else:
            keys, vals = cache.read(layer, batch.decode_slots, q.dtype)   # [B, L, KVH, D] or [L, KVH, D]
            if keys.dim() == 3:
                keys, vals = keys.unsqueeze(0), vals.unsqueeze(0)
            o = F.scaled_dot_product_attention(qd.unsqueeze(2), keys.transpose(1, 2), vals.transpose(1, 2),
                                               attn_mask=batch.decode_mask, enable_gqa=True).squeeze(2)
        out.index_copy_(0, batch.decode_rows, o)
    return out.view(T, H * D)
