"""Weight format names: what a user types after ``--format`` / ``--weights``, parsed into a
:class:`WeightFormat`, and the table of formats (each format module registers itself).

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

A format's *kind* (dense, int8, int4, gguf, fp8, ternary) names its entry in the registry: how a
matrix is converted to it and how a saved one is rebuilt. This module imports no format module;
:mod:`edgellm.quant.builtin` is the one place that imports them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from edgellm.dtypes import FLOAT8_TYPES, FLOAT_DTYPES, float8_dtype, float_name
from edgellm.errors import InvalidParameterError, UnsupportedModelError
from edgellm.quant import gguf_blocks
from edgellm.quant.base import Weight


@dataclass(frozen=True)
class FormatEntry:
    """What a format module registers."""

    kind: str
    # (matrix, parsed format, row counts of the tensors fused into it) -> the matrix in this format
    convert: Callable[[Weight, "WeightFormat", list[int] | None], Weight]
    # (params, tensors) as Weight.parts() gave them -> the Weight
    load: Callable[[dict, dict[str, torch.Tensor]], Weight]


_FORMATS: dict[str, FormatEntry] = {}


def register(kind: str, convert, load) -> None:
    """Called once by each format module, at import."""
    if kind in _FORMATS:
        raise RuntimeError(f"weight format {kind!r} registered twice")
    _FORMATS[kind] = FormatEntry(kind, convert, load)


def registered(kind: str) -> FormatEntry:
    """The entry of ``kind``; KeyError if no imported module registered it (callers import
    :mod:`edgellm.quant.builtin`, which loads every built-in format)."""
    return _FORMATS[kind]


# --------------------------------------------------------------------------------------------
# format names

# llama.cpp's fallbacks for rows that are not a multiple of 256 (llama_tensor_get_type).
K_QUANT_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
GGUF_BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")
INT4_GROUPS = (32, 64, 128, 256)
# GGUF tensor type of each dense format
GGUF_FLOAT_TYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
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
            return GGUF_FLOAT_TYPES[self.name]
        return self.ggml_type if self.kind == "gguf" else None

    def type_for_width(self, k: int) -> str | None:
        """The GGUF type actually used for rows of ``k`` elements (K-quant fallbacks applied)."""
        t = self.gguf_type
        if t in K_QUANT_FALLBACK and k % 256:
            return K_QUANT_FALLBACK[t]
        return t

    def check_width(self, layer: str, k: int) -> None:
        """Refuse a matrix whose width (input dim) this format cannot split."""
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


def _unknown(name: str) -> InvalidParameterError:
    return InvalidParameterError(f"unknown weight format {name!r}", "use one of: " + ", ".join(FORMAT_NAMES))


def _parse_int4(name: str, key: str) -> WeightFormat:
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
    return WeightFormat(f"int4-g{group}" + ("-sym" if symmetric else ""), "int4", group=group, symmetric=symmetric)


def require_float8(variant: str = "e4m3") -> torch.dtype:
    """The torch float8 dtype of ``variant``; UnsupportedModelError if this torch lacks it."""
    dtype = float8_dtype(variant)
    if dtype is None:
        raise UnsupportedModelError(
            f"this PyTorch ({torch.__version__}) has no torch.{FLOAT8_TYPES[variant]}, so FP8 weights cannot be stored",
            "install PyTorch 2.1 or newer, or pick another format (int8, q8_0, bfloat16)")
    return dtype


def parse_format(name: str) -> WeightFormat:
    """The :class:`WeightFormat` for a user's format name; InvalidParameterError if unknown."""
    if not isinstance(name, str) or not name.strip():
        raise _unknown(str(name))
    key = name.strip().lower()
    dense = float_name(key) if not key.startswith("torch.") else None
    if dense:
        return WeightFormat(dense, "dense", dtype=FLOAT_DTYPES[dense])
    if key == "int8":
        return WeightFormat("int8", "int8")
    if key.startswith("int4"):
        return _parse_int4(name, key)
    if key.upper() in GGUF_BLOCK_TYPES:
        return WeightFormat(key, "gguf", ggml_type=key.upper())
    if key in ("fp8", "fp8-e4m3", "fp8_e4m3", "fp8-e4m3fn", "fp8-e5m2", "fp8_e5m2"):
        variant = "e5m2" if "e5m2" in key else "e4m3"
        require_float8(variant)
        return WeightFormat(f"fp8-{variant}", "fp8", fp8=variant)
    if key in ("ternary", "ternary-tensor", "ternary-channel", "bitnet", "b1.58"):
        per_channel = key == "ternary-channel"
        return WeightFormat("ternary-channel" if per_channel else "ternary", "ternary", per_channel=per_channel)
    raise _unknown(name)
