"""The KV cache: one preallocated pool of fixed-size blocks, addressed by slot.

Slot ``s`` is position ``s % block_size`` of block ``s // block_size``. A sequence owns a list
of blocks (its block table); attention writes new keys/values to their slots and reads a
sequence's history through the slots of its positions. Who owns which block is the block
manager's business (``edgellm.kv.block_manager``); this module only holds the tensors.

Precision (``dtype``: a torch dtype or a name, as ``--kv-dtype`` takes them; the names are
:data:`edgellm.dtypes.KV_DTYPES`):

==============  ==========================================================  ================
name            storage                                                     bytes / element
==============  ==========================================================  ================
``fp32``        float32 (the default)                                       4
``fp16``        float16                                                     2
``bf16``        bfloat16                                                    2
``int8``        int8, one float16 scale per token and KV head (absmax/127)  1 + 2/head_dim
``fp8``         float8 E4M3, one float16 scale per token and KV head        1 + 2/head_dim
                (absmax/448); ``fp8-e5m2``: E5M2 (absmax/57344)
==============  ==========================================================  ================

With head_dim 64 the scaled formats take 1.03 bytes an element: the cache quarters (int8/fp8)
or halves (fp16/bf16), and a runtime that sizes its pool in bytes (``bytes_per_block``) holds
3.9x or 2x the tokens. Scaled values are written quantised and read back dequantised into the
compute dtype; int8 errs by at most half a step (absmax/254) per element, fp8 E4M3 by a
relative 2^-4. ``export_blocks`` returns ``{"kv": ...}`` and, for scaled formats, ``"scale"``.

Layer groups (:class:`KVLayout`). By default every layer's KV of a block lives in the block: one
block table per sequence covers all layers. A model with sliding-window layers (Mistral, Gemma 3)
can instead use ``KVLayout.for_model``: its layers are split into groups of equal size (layers of
one window each), and a block (a *page*) then holds ``block_size`` tokens of one group's layers.
Each group has its own block table per sequence, so a sliding group can give back the pages of
positions that left its window (``edgellm.kv.block_manager``) while a full-attention group keeps
them all; all groups draw pages from the one pool, so memory freed by one serves the others.
Gemma 3 270M's 18 layers (3 global, 15 sliding) make six groups of three layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgellm.config import ModelConfig
from edgellm.dtypes import FLOAT8_HALF_FACTOR, KV_FLOAT8, float8_as_half, kv_dtype_name, kv_storage_dtype

#: tokens per KV block: the unit of allocation, sharing and offload everywhere in edgellm
BLOCK_SIZE = 16

# largest code of each scaled format
_QMAX = {"int8": 127.0, "fp8": 448.0, "fp8-e5m2": 57344.0}
_SCALE_DTYPE = torch.float16
_SCALE_MIN = 2.0 ** -24         # smallest float16 (subnormal): a scale never rounds to zero

#: a block table entry whose page was given back (a sliding group's positions out of its window)
NULL_BLOCK = -1


@dataclass(frozen=True)
class KVLayout:
    """Which layers share a block table. ``groups[g]``: the layers of group g, all of the same
    count (``width``), each group one window (``windows[g]``: None for full attention); layer
    ``groups[g][j]`` keeps its KV in row j of the pool tensor, at its group's pages."""

    groups: tuple[tuple[int, ...], ...]
    windows: tuple[int | None, ...]

    @classmethod
    def single(cls, n_layers: int) -> "KVLayout":
        """One table for every layer, nothing given back (windows, if any, only masked)."""
        return cls((tuple(range(n_layers)),), (None,))

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> "KVLayout":
        """Layers grouped by window, so sliding groups can give back what left their window. A
        model without windows (the Llama family) gets the single table of ``single``."""
        by_window: dict[int | None, list[int]] = {}
        for layer in range(cfg.n_layers):
            by_window.setdefault(cfg.layer_window(layer), []).append(layer)
        if list(by_window) == [None]:
            return cls.single(cfg.n_layers)
        # equal groups: every page then has the same bytes, so all groups share one pool
        width = math.gcd(*(len(layers) for layers in by_window.values()))
        groups, windows = [], []
        for window, layers in by_window.items():
            for i in range(0, len(layers), width):
                groups.append(tuple(layers[i:i + width]))
                windows.append(window)
        return cls(tuple(groups), tuple(windows))

    @property
    def width(self) -> int:
        """Layers in each group: the rows of the pool tensor."""
        return len(self.groups[0])

    @property
    def grouped(self) -> bool:
        return len(self.groups) > 1

    def placement(self, n_layers: int) -> tuple[list[int], list[int]]:
        """(group of each layer, row of each layer)."""
        group_of, row_of = [0] * n_layers, [0] * n_layers
        for g, layers in enumerate(self.groups):
            for j, layer in enumerate(layers):
                group_of[layer], row_of[layer] = g, j
        return group_of, row_of

    def pages_held(self, n_tokens: int, block_size: int, chunk: int = 0) -> int:
        """Pages a sequence of ``n_tokens`` tokens holds, over all groups: every block of a full
        group, at most the window's ``ceil(window / block_size) + 1`` of a sliding one between
        steps -- plus, with ``chunk``, the pages a prefill chunk of that many tokens writes."""
        blocks = -(-n_tokens // block_size)
        return sum(blocks if w is None else min(blocks, -(-(w + chunk) // block_size) + 1) for w in self.windows)

    def max_tokens(self, num_pages: int, block_size: int, context: int) -> int:
        """The longest sequence whose pages fit ``num_pages`` (``context`` when only sliding
        groups, whose pages are bounded, hold it)."""
        full = sum(w is None for w in self.windows)
        left = num_pages - sum(-(-w // block_size) + 1 for w in self.windows if w is not None)
        if left < 0:
            return 0
        return context if full == 0 else left // full * block_size


class KVCache:
    #: a sequence cut back to any length keeps the KV of the positions before it (a recurrent
    #: model's StatePool cannot: it resumes at block edges only)
    resumes_mid_block = True

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype=torch.float32,
                 layout: KVLayout | None = None):
        self.cfg = cfg
        self.layout = layout or KVLayout.single(cfg.n_layers)
        # where each layer's KV is: the group whose block table addresses it, the tensor row
        self.group_of, self.row_of = self.layout.placement(cfg.n_layers)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_dtype = kv_dtype_name(dtype)
        self.dtype = kv_storage_dtype(self.kv_dtype)   # what ``data`` holds
        self.scaled = self.kv_dtype in _QMAX
        slots = num_blocks * block_size
        rows = self.layout.width
        # [row, k|v, slot, kv_head, head_dim]: one tensor, so a block's bytes across all layers
        # can be copied out (offload) and back with two index operations. Row = layer unless the
        # layout groups layers (then row j of a page is its group's j-th layer).
        self.data = torch.zeros(rows, 2, slots, cfg.n_kv_heads, cfg.head_dim, dtype=self.dtype)
        # [row, k|v, slot, kv_head]: the scale of each token's head vector (scaled formats)
        self.scales = torch.ones(rows, 2, slots, cfg.n_kv_heads, dtype=_SCALE_DTYPE) if self.scaled else None

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int = 16, dtype=torch.float32,
                        layout: KVLayout | None = None) -> int:
        """Bytes of one block (with a grouped ``layout``: of one page, a group's layers only)."""
        name = kv_dtype_name(dtype)
        element = torch.empty((), dtype=kv_storage_dtype(name)).element_size()
        per_head = cfg.head_dim * element + (2 if name in _QMAX else 0)
        rows = cfg.n_layers if layout is None else layout.width
        return rows * 2 * block_size * cfg.n_kv_heads * per_head

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scales is not None:
            n += self.scales.numel() * self.scales.element_size()
        return n

    # ---- quantisation -----------------------------------------------------------------------
    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, KVH, D] float -> (codes in ``self.dtype``, float16 scales [T, KVH])."""
        x = x.float()
        qmax = _QMAX[self.kv_dtype]
        exact = x.abs().amax(dim=-1) / qmax
        scale = exact.to(_SCALE_DTYPE)
        # round the scale up, never down: absmax / scale then stays within the codes' range (a
        # scale rounded down would clip the largest element, badly so for tiny float16 scales)
        scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.tensor(torch.inf, dtype=_SCALE_DTYPE)),
                            scale).clamp_(min=_SCALE_MIN)
        y = x / scale.float()[..., None]
        if self.kv_dtype == "int8":
            return y.round_().clamp_(-qmax, qmax).to(torch.int8), scale
        return y.clamp_(-qmax, qmax).to(self.dtype), scale

    def _dequantize(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.kv_dtype == "int8":
            vals = codes.float()
            s = scale.float()
        else:
            # torch's float8 -> float cast is a scalar loop; widen through half bits instead.
            variant = KV_FLOAT8[self.kv_dtype]
            vals = float8_as_half(codes, variant).float()
            s = scale.float() / FLOAT8_HALF_FACTOR[variant]
        return (vals * s[..., None]).to(dtype)

    # ---- access -----------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values ([T, kv_heads, head_dim]) at their slots."""
        row = self.row_of[layer]
        kc, vc = self.data[row, 0], self.data[row, 1]
        if self.scaled:
            (kq, ks), (vq, vs) = self._quantize(k), self._quantize(v)
            ksc, vsc = self.scales[row, 0], self.scales[row, 1]
            if isinstance(slots, slice):
                kc[slots], vc[slots], ksc[slots], vsc[slots] = kq, vq, ks, vs
            else:
                # index_copy_ lacks float8 kernels: copy the raw bytes
                kc.view(torch.uint8).index_copy_(0, slots, kq.view(torch.uint8))
                vc.view(torch.uint8).index_copy_(0, slots, vq.view(torch.uint8))
                ksc.index_copy_(0, slots, ks)
                vsc.index_copy_(0, slots, vs)
            return
        if isinstance(slots, slice):
            kc[slots] = k.to(self.dtype)
            vc[slots] = v.to(self.dtype)
        else:
            kc.index_copy_(0, slots, k.to(self.dtype))
            vc.index_copy_(0, slots, v.to(self.dtype))

    def read(self, layer: int, slots: torch.Tensor | slice, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` (a slice, or an index tensor of any shape) as ``dtype``:
        [*slots.shape, kv_heads, head_dim]."""
        row = self.row_of[layer]
        kc, vc = self.data[row, 0], self.data[row, 1]
        if self.scaled:
            ksc, vsc = self.scales[row, 0], self.scales[row, 1]
            if isinstance(slots, slice):
                return (self._dequantize(kc[slots], ksc[slots], dtype),
                        self._dequantize(vc[slots], vsc[slots], dtype))
            flat = slots.reshape(-1)
            shape = (*slots.shape, *kc.shape[1:])

            def gather(c, s):
                codes = c.view(torch.uint8).index_select(0, flat).view(self.dtype)
                return self._dequantize(codes, s.index_select(0, flat), dtype).view(shape)
            return gather(kc, ksc), gather(vc, vsc)
        if isinstance(slots, slice):
            return kc[slots].to(dtype), vc[slots].to(dtype)
        flat = slots.reshape(-1)
        shape = (*slots.shape, *kc.shape[1:])
        return kc.index_select(0, flat).view(shape).to(dtype), vc.index_select(0, flat).view(shape).to(dtype)

    # ---- offload ------------------------------------------------------------------------------
    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value tensors [slots, kv_heads, head_dim] holding ``layer`` (native kernels)."""
        row = self.row_of[layer]
        return self.data[row, 0], self.data[row, 1]

    def _block_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.layout.width, 2, self.num_blocks, self.block_size, *t.shape[3:])

    def export_blocks(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        """A copy of these blocks' contents in every layer (for offload to host memory or disk)."""
        idx = torch.tensor(blocks, dtype=torch.int64)
        out = {"kv": self._block_view(self.data).index_select(2, idx).clone()}
        if self.scales is not None:
            out["scale"] = self._block_view(self.scales).index_select(2, idx).clone()
        return out

    def copy_block(self, src: int, dst: int) -> None:
        """Block ``src``'s contents, every layer, into block ``dst`` (the block manager's copy-on-write)."""
        self.import_blocks([dst], self.export_blocks([src]))

    def import_blocks(self, blocks: list[int], saved: dict[str, torch.Tensor]) -> None:
        """Put back what ``export_blocks`` returned, possibly into other block ids."""
        idx = torch.tensor(blocks, dtype=torch.int64)
        kv = saved["kv"]
        if kv.dtype != self.dtype or (self.scales is not None) != ("scale" in saved):
            raise ValueError(f"blocks exported from a {kv.dtype} cache cannot go into a {self.kv_dtype} cache")
        view = self._block_view(self.data)
        if self.dtype.is_floating_point and self.dtype.itemsize == 1:   # float8: no index_copy_ kernel
            view.view(torch.uint8).index_copy_(2, idx, kv.view(torch.uint8))
        else:
            view.index_copy_(2, idx, kv)
        if self.scales is not None:
            self._block_view(self.scales).index_copy_(2, idx, saved["scale"])

    def block_slots(self, block_table: list[int], length: int) -> torch.Tensor | slice:
        """Slots of positions 0..length-1 for a sequence with this block table: a slice when its
        blocks are consecutive (the common case of a lone sequence in a fresh pool), which spares
        a decode step building and gathering through an index of its whole history. Entries given
        back (``NULL_BLOCK``: a sliding group's positions out of its window) get page 0's slots,
        which attention never reads: it reads only each query's window."""
        bs = self.block_size
        n = -(-length // bs)
        first = block_table[0] if block_table else 0
        if block_table[:n] == list(range(first, first + n)) and first != NULL_BLOCK:
            return slice(first * bs, first * bs + length)
        blocks = torch.tensor(block_table, dtype=torch.int64).clamp_(min=0)
        pos = torch.arange(length, dtype=torch.int64)
        return blocks[pos // bs] * bs + pos % bs
