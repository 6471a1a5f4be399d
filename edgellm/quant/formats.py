"""Weight precision formats: their names, how a matrix is converted to each, and ``--keep``.

A *format name* is what a user types after ``--format`` / ``--weights``:

==================  =========================================================================
``float32``         dense fp32 (aliases ``fp32``, ``f32``)
``bfloat16``        dense bf16 (``bf16``)
``float16``         dense fp16 (``fp16``, ``f16``)
``int8``            weight-only int8, one fp32 scale per output channel (:mod:`.int8`)
``int4``            weight-only int4, group-wise along the input dimension (:mod:`.int4`):
                    ``int4`` = ``int4-g32`` (zero point); ``-g64``/``-g128``/``-g256`` pick the
                    group, ``-sym`` drops the zero point (``int4-g128-sym``)
``q8_0`` ``q4_0``   GGUF block formats, bit-exact with ``gguf.quants`` / llama.cpp
``q4_1`` ``q5_0``   (:mod:`edgellm.quant.gguf_blocks`); ``q4_k`` / ``q6_k`` need rows that are a
``q4_k`` ``q6_k``   multiple of 256 and fall back, as llama.cpp does, to Q5_0 / Q8_0 elsewhere
``fp8``             FP8 E4M3 with a per-channel scale (``fp8-e4m3``); ``fp8-e5m2`` (:mod:`.fp8`)
``ternary``         {-1, 0, +1} x absmean scale per tensor, 2 bits a weight (BitNet b1.58);
                    ``ternary-channel``: a scale per output channel (:mod:`.ternary`)
==================  =========================================================================

Matrices are named as in GGUF, after fusion: ``token_embd``, ``output`` (alias ``lm_head``),
``blk.N.attn_qkv`` (answers to ``attn_q``/``attn_k``/``attn_v`` too), ``blk.N.attn_output``,
``blk.N.ffn_gate_up`` (``ffn_gate``/``ffn_up``), ``blk.N.ffn_down``. ``--keep`` patterns select
matrices left at 16 bits (bfloat16): a name, a prefix (``blk.0`` = the whole first block;
``blk.-1`` = the last), or a shell glob (``blk.*.ffn_down``). A pattern that matches nothing is an
error. With tied embeddings ``token_embd`` and ``output`` are one matrix: keeping either keeps it.

Quantised formats share :class:`QuantizedWeight`: decode-sized inputs (at most
:data:`DECODE_MAX_ROWS` rows) go through the format's own kernel, which reads the packed weights
once; larger inputs (prefill) dequantise slabs of rows (a few MB each, cache-resident) and call
BLAS, in bfloat16 where the CPU has native bf16 dot products (AVX512-BF16/AMX), else in float32.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from edgellm.errors import InvalidParameterError
from edgellm.layers.weights import DenseWeight, GGUFBlockWeight, Weight
from edgellm.quant import repack

# Inputs with at most this many rows (decode) take the format's kernel; more rows (prefill)
# take dequantised slabs + BLAS, which wins there (measured: README of docs/precision.md).
DECODE_MAX_ROWS = 8
# Bytes of one dequantised slab: small enough to stay in L2, large enough to amortise calls.
SLAB_BYTES = 2 << 20


@lru_cache(maxsize=1)
def prefill_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX: 2x the fp32 GEMM
    rate, measured), else float32 (bf16 GEMM is emulated and slower there)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    line = next((ln for ln in flags.splitlines() if ln.startswith("flags")), "")
    have = set(line.split())
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & have else torch.float32


def slab_rows(k: int, element_bytes: int = 2, align: int = 64) -> int:
    rows = max(align, SLAB_BYTES // max(1, k * element_bytes))
    return rows - rows % align


class QuantizedWeight(Weight):
    """An [N, K] matrix in a packed format with a decode kernel and a slab-dequantise prefill path.

    Subclasses implement ``_decode(x)`` ([M <= 8, K] float32 -> [M, N] float32),
    ``_dequant_rows(r0, r1, dtype)`` and ``rows(index)``, and hold their packed form in
    ``self.packed`` (saved by :mod:`edgellm.quant.convert`).
    """

    shape: tuple[int, int]
    slab_align: int = 64
    format_name: str = "?"

    def _decode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[0] <= DECODE_MAX_ROWS:
            return self._decode(x)
        return self._slab_matmul(x, prefill_dtype())

    def _slab_matmul(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        n, k = self.shape
        xx = x.to(dtype)
        step = slab_rows(k, torch.empty((), dtype=dtype).element_size(), self.slab_align)
        if n <= step:
            return F.linear(xx, self._dequant_rows(0, n, dtype)).float()
        out = torch.empty(x.shape[0], n, dtype=torch.float32)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            out[:, r0:r1] = F.linear(xx, self._dequant_rows(r0, r1, dtype))
        return out

    def dequantize(self) -> torch.Tensor:
        return self._dequant_rows(0, self.shape[0], torch.float32)

    @property
    def format(self) -> str:
        return self.format_name


class GGUFSlabWeight(QuantizedWeight):
    """Raw GGUF blocks of a type without a native kernel (Q4_K, Q6_K, Q5_0, ...), or any type
    where the native kernels are unavailable: every matmul dequantises slabs of rows with
    :func:`edgellm.quant.gguf_blocks.dequantize` and calls BLAS. Correct and compact in memory,
    but decode pays a full dequantisation per token (see docs/precision.md for the speed)."""

    slab_align = 1

    def __init__(self, raw: torch.Tensor, ggml_type: str, n_cols: int):
        self.raw = raw.contiguous()
        self.ggml_type = ggml_type
        self.shape = (raw.shape[0], n_cols)
        self.format_name = ggml_type

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return _dequantize_raw(self.raw[r0:r1], self.ggml_type, self.shape[1]).to(dtype)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        return self._slab_matmul(x, torch.float32)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return _dequantize_raw(self.raw.index_select(0, index.reshape(-1)), self.ggml_type, self.shape[1])

    @property
    def nbytes(self) -> int:
        return self.raw.numel()


def _dequantize_raw(raw: torch.Tensor, ggml_type: str, n_cols: int) -> torch.Tensor:
    from edgellm.quant import gguf_blocks

    if ggml_type in repack.BLOCK_BYTES:   # saved from a repacked weight, read where no kernel is
        return repack.dequantize(raw, ggml_type, n_cols)
    return gguf_blocks.dequantize(raw, ggml_type, (raw.shape[0], n_cols))


def gguf_weight(raw: torch.Tensor, ggml_type: str, n_cols: int) -> Weight:
    """The fastest Weight for raw GGUF rows: the native kernel if there is one, else slabs.

    Q4_K and Q6_K are repacked for the kernels (edgellm/quant/repack.py), exactly.
    """
    from edgellm.kernels import NATIVE_FORMATS, native

    if native() is not None:
        if ggml_type in NATIVE_FORMATS:
            return GGUFBlockWeight(raw, ggml_type, n_cols)
        if ggml_type in repack.REPACKED:
            return GGUFBlockWeight(repack.repack(raw, ggml_type, raw.shape[0], n_cols), repack.REPACKED[ggml_type], n_cols)
    return GGUFSlabWeight(raw, ggml_type, n_cols)


# --------------------------------------------------------------------------------------------
# format names

# llama.cpp's fallbacks for rows that are not a multiple of 256 (llama_tensor_get_type).
K_QUANT_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
GGUF_BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")
INT4_GROUPS = (32, 64, 128, 256)
DENSE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DENSE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "f16": "float16", "half": "float16"}
#: Names listed in help and error messages.
FORMAT_NAMES = ("float32", "bfloat16", "float16", "int8", "int4", "int4-g64", "int4-g128", "int4-sym",
                "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q6_k", "fp8", "fp8-e5m2", "ternary",
                "ternary-channel")


@dataclass(frozen=True)
class WeightFormat:
    """A parsed format name (see the module docstring)."""

    name: str                      # canonical name, e.g. "int4-g32", "q4_k", "fp8-e4m3"
    kind: str                      # dense | int8 | int4 | gguf | fp8 | ternary
    dtype: torch.dtype | None = None   # dense
    group: int | None = None           # int4
    symmetric: bool = False            # int4
    ggml_type: str | None = None       # gguf
    fp8: str | None = None             # fp8: "e4m3" | "e5m2"
    per_channel: bool = False          # ternary

    @property
    def gguf_type(self) -> str | None:
        """The GGUF tensor type this format writes, or None when GGUF cannot hold it."""
        if self.kind == "dense":
            return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[self.dtype]
        return self.ggml_type if self.kind == "gguf" else None

    def type_for_width(self, k: int) -> str | None:
        """The GGUF type actually used for rows of ``k`` elements (K-quant fallbacks applied)."""
        t = self.gguf_type
        if t in K_QUANT_FALLBACK and k % 256:
            return K_QUANT_FALLBACK[t]
        return t

    def check_width(self, layer: str, k: int) -> None:
        """Refuse a matrix whose width (input dim) this format cannot split."""
        from edgellm.quant import gguf_blocks

        need, why = None, ""
        if self.kind == "int4":
            need, why = self.group, f"group size {self.group}"
        elif self.kind == "ternary":
            need, why = 4, "4 weights per byte"
        elif self.kind == "gguf":
            t = self.type_for_width(k)
            need, why = gguf_blocks.BLOCK_ELEMS[t], f"{t} block of {gguf_blocks.BLOCK_ELEMS[t]}"
        if need and k % need:
            fix = "keep that matrix at 16 bits with --keep " + layer
            if self.kind == "int4":
                fits = [g for g in INT4_GROUPS if k % g == 0]
                if fits:
                    fix = f"use a group that divides {k} (int4-g{fits[-1]}{'-sym' if self.symmetric else ''}), or " + fix
            raise InvalidParameterError(
                f"format {self.name}: the {why} does not divide the width {k} of {layer}", fix)

    def convert(self, w: Weight, segments: list[int] | None = None) -> Weight:
        """``w`` in this format. ``segments``: row counts of the tensors fused into ``w``
        (q/k/v, gate/up), so a per-tensor scale stays per original tensor."""
        if self.kind == "dense":
            if isinstance(w, DenseWeight) and w.tensor.dtype == self.dtype:
                return w
            return DenseWeight(w.dequantize().to(self.dtype))
        if self.kind == "gguf":
            t = self.type_for_width(w.shape[1])
            if isinstance(w, (GGUFBlockWeight, GGUFSlabWeight)) and w.ggml_type == t:
                return w          # already these blocks: requantising could only lose
        dense = w.dequantize()
        if self.kind == "int8":
            from edgellm.quant import int8
            return int8.Int8Weight(int8.quantize(dense))
        if self.kind == "int4":
            from edgellm.quant import int4
            return int4.Int4Weight(int4.quantize(dense, self.group, self.symmetric))
        if self.kind == "fp8":
            from edgellm.quant import fp8
            return fp8.FP8Weight(fp8.quantize(dense, self.fp8))
        if self.kind == "ternary":
            from edgellm.quant import ternary
            return ternary.TernaryWeight(ternary.quantize(dense, per_channel=self.per_channel, segments=segments))
        if self.kind == "gguf":
            from edgellm.quant import gguf_blocks
            raw = torch.from_numpy(gguf_blocks.quantize(dense, t)).view(dense.shape[0], -1)
            return gguf_weight(raw, t, dense.shape[1])
        raise AssertionError(self.kind)


def _unknown(name: str) -> InvalidParameterError:
    return InvalidParameterError(f"unknown weight format {name!r}", "use one of: " + ", ".join(FORMAT_NAMES))


def parse_format(name: str) -> WeightFormat:
    """The :class:`WeightFormat` for a user's format name; InvalidParameterError if unknown."""
    if not isinstance(name, str) or not name.strip():
        raise _unknown(str(name))
    key = name.strip().lower()
    key = _DENSE_ALIASES.get(key, key)
    if key in DENSE:
        return WeightFormat(key, "dense", dtype=DENSE[key])
    if key == "int8":
        return WeightFormat("int8", "int8")
    if key.startswith("int4"):
        group, symmetric = 32, False
        for part in [p for p in re.split(r"[-_]", key[4:]) if p]:
            if re.fullmatch(r"g\d+", part):
                group = int(part[1:])
            elif part in ("sym", "symmetric"):
                symmetric = True
            elif part in ("asym", "zp", "zero"):
                symmetric = False
            else:
                raise _unknown(name)
        if group not in INT4_GROUPS:
            raise InvalidParameterError(f"int4 group size {group} is not supported",
                                        "use a group of " + ", ".join(map(str, INT4_GROUPS)) + " (int4-g128)")
        return WeightFormat(f"int4-g{group}" + ("-sym" if symmetric else ""), "int4", group=group,
                            symmetric=symmetric)
    if key.upper() in GGUF_BLOCK_TYPES:
        return WeightFormat(key, "gguf", ggml_type=key.upper())
    if key in ("fp8", "fp8-e4m3", "fp8_e4m3", "fp8-e4m3fn", "fp8-e5m2", "fp8_e5m2"):
        variant = "e5m2" if "e5m2" in key else "e4m3"
        from edgellm.quant import fp8
        fp8.require_float8(variant)
        return WeightFormat(f"fp8-{variant}", "fp8", fp8=variant)
    if key in ("ternary", "ternary-tensor", "ternary-channel", "bitnet", "b1.58"):
        per_channel = key == "ternary-channel"
        return WeightFormat("ternary-channel" if per_channel else "ternary", "ternary", per_channel=per_channel)
    raise _unknown(name)


# --------------------------------------------------------------------------------------------
# matrix names and --keep

@dataclass(frozen=True)
class Layer:
    name: str                     # "blk.3.attn_qkv"
    shape: tuple[int, int]        # [N, K]
    segments: tuple[int, ...]     # row counts of the fused tensors ((N,) when not fused)
    aliases: tuple[str, ...]      # other names that select it ("blk.3.attn_q", ...)


def model_layers(cfg) -> list[Layer]:
    """The weight matrices of a model with this config, in ModelWeights order."""
    H, Q, KV, Fs = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.ffn_size
    tied = cfg.tie_embeddings
    out = [Layer("token_embd", (cfg.vocab_size, H), (cfg.vocab_size,),
                 ("embed", "embed_tokens") + (("output", "lm_head") if tied else ()))]
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        out += [
            Layer(p + "attn_qkv", (Q + 2 * KV, H), (Q, KV, KV), (p + "attn_q", p + "attn_k", p + "attn_v")),
            Layer(p + "attn_output", (H, Q), (H,), (p + "attn_o",)),
            Layer(p + "ffn_gate_up", (2 * Fs, H), (Fs, Fs), (p + "ffn_gate", p + "ffn_up")),
            Layer(p + "ffn_down", (H, Fs), (H,), ()),
        ]
    if not tied:
        out.append(Layer("output", (cfg.vocab_size, H), (cfg.vocab_size,), ("lm_head",)))
    return out


def parse_keep(keep) -> list[str]:
    """``--keep`` values (repeatable, comma-separated) as a flat list of patterns."""
    if keep is None:
        return []
    if isinstance(keep, str):
        keep = [keep]
    return [p.strip() for item in keep for p in str(item).split(",") if p.strip()]


def resolve_keep(keep, cfg) -> set[str]:
    """Names of the matrices the ``--keep`` patterns select; InvalidParameterError for a pattern
    that selects nothing."""
    layers = model_layers(cfg)
    chosen: set[str] = set()
    for pattern in parse_keep(keep):
        p = pattern.lower().removesuffix(".weight")
        p = re.sub(r"^(blk|layers?|model\.layers)\.(-\d+)", lambda m: f"blk.{cfg.n_layers + int(m.group(2))}", p)
        p = re.sub(r"^(layers?|model\.layers)\.", "blk.", p)
        hits = {ly.name for ly in layers
                if any(fnmatch.fnmatchcase(n, p) or n.startswith(p + ".") for n in (ly.name, *ly.aliases))}
        if not hits:
            raise InvalidParameterError(
                f"--keep {pattern!r} matches no weight matrix of this model",
                f"name matrices as token_embd, lm_head, blk.N (0..{cfg.n_layers - 1}), blk.N.attn_qkv, "
                "blk.N.attn_output, blk.N.ffn_gate_up, blk.N.ffn_down, or globs like 'blk.*.ffn_down'")
        chosen |= hits
    return chosen


def check_model(fmt: WeightFormat, cfg, kept: set[str]) -> None:
    """Refuse the conversion of this model to ``fmt`` before any work, with the first bad matrix."""
    for ly in model_layers(cfg):
        if ly.name not in kept:
            fmt.check_width(ly.name, ly.shape[1])
