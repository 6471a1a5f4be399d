"""The one table of dtype names: compute/dense precisions, KV-cache precisions, float8 variants.

Two vocabularies name the same float types. Compute and weight precisions (``--dtype``,
``--weights float16``) use the long names ``float32``/``bfloat16``/``float16``; the KV cache
(``--kv-dtype``) uses the short ones ``fp32``/``bf16``/``fp16`` and adds the scaled 1-byte
formats ``int8``, ``fp8`` (E4M3) and ``fp8-e5m2``. Both are read from the tables here, so an
alias added once is accepted everywhere. This module imports nothing of edgellm but its errors,
so the KV cache, the loaders and the weight formats can all import it.
"""

from __future__ import annotations

import torch

from edgellm.errors import InvalidParameterError, UnsupportedModelError

#: long name -> torch dtype: the compute dtypes (--dtype) and the dense weight formats
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: long name -> the KV cache's short name
SHORT_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
#: other spellings of the float types -> long name
FLOAT_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "f16": "float16", "half": "float16"}
#: float8 variant -> torch attribute (absent from PyTorch before 2.1)
FLOAT8_TYPES = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}
#: names --kv-dtype accepts
KV_DTYPES = ("fp32", "fp16", "bf16", "fp8", "fp8-e5m2", "int8")
#: other spellings of the KV cache's 1-byte formats
KV_ALIASES = {"fp8-e4m3": "fp8", "fp8_e4m3": "fp8", "e4m3": "fp8", "fp8_e5m2": "fp8-e5m2", "e5m2": "fp8-e5m2",
              "q8": "int8"}
#: KV name of a float8 type -> its variant
KV_FLOAT8 = {"fp8": "e4m3", "fp8-e5m2": "e5m2"}


def float_name(name: str) -> str | None:
    """The long name (``float32``, ...) of a float type's name or alias; None if it is none."""
    key = str(name).strip().lower().removeprefix("torch.")
    key = FLOAT_ALIASES.get(key, key)
    return key if key in FLOAT_DTYPES else None


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of a compute precision given by its long name; UnsupportedModelError if
    it is not one (aliases are refused, as --dtype has always done)."""
    if name not in FLOAT_DTYPES:
        raise UnsupportedModelError(f"dtype '{name}' is not supported", f"use one of: {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def float8_dtype(variant: str) -> torch.dtype | None:
    """The torch float8 dtype of ``variant`` (e4m3 | e5m2), or None where this PyTorch lacks it."""
    return getattr(torch, FLOAT8_TYPES[variant], None)


def kv_dtype_name(dtype) -> str:
    """Canonical KV name (``fp32``, ``fp16``, ``bf16``, ``int8``, ``fp8``, ``fp8-e5m2``) of a KV
    dtype given as a name or a torch dtype; InvalidParameterError if unknown."""
    if isinstance(dtype, torch.dtype):
        for name in KV_DTYPES:
            if _kv_torch_dtype(name) == dtype:
                return name
        raise InvalidParameterError(f"KV cache dtype {dtype} is not supported", "use one of: " + ", ".join(KV_DTYPES))
    key = str(dtype).strip().lower().removeprefix("torch.")
    long = float_name(key)
    key = SHORT_NAMES[long] if long else KV_ALIASES.get(key, key)
    if key not in KV_DTYPES:
        raise InvalidParameterError(f"unknown KV cache dtype {dtype!r}", "use one of: " + ", ".join(KV_DTYPES))
    return key


def _kv_torch_dtype(name: str) -> torch.dtype | None:
    if name in KV_FLOAT8:
        return float8_dtype(KV_FLOAT8[name])
    if name == "int8":
        return torch.int8
    return FLOAT_DTYPES[next(long for long, short in SHORT_NAMES.items() if short == name)]


def kv_storage_dtype(name: str) -> torch.dtype:
    """What a KV cache of canonical KV name ``name`` holds; UnsupportedModelError for fp8 on a
    PyTorch without float8 types."""
    dt = _kv_torch_dtype(name)
    if dt is None:
        attr = FLOAT8_TYPES[KV_FLOAT8[name]]
        raise UnsupportedModelError(f"this PyTorch ({torch.__version__}) has no torch.{attr} for an fp8 KV cache",
                                    "use --kv-dtype int8 (same size) or fp16")
    return dt


# value of the half built from the bits of a float8, relative to the float8's value
FLOAT8_HALF_FACTOR = {"e4m3": 2.0 ** -8, "e5m2": 1.0}


def float8_as_half(f8: torch.Tensor, variant: str) -> torch.Tensor:
    """float8 [R, K] -> float16 [R, K] worth ``FLOAT8_HALF_FACTOR[variant]`` times the values, exactly.

    PyTorch's float8 -> float cast is a scalar loop; these are integer shifts. E5M2 is the top
    byte of an IEEE half. E4M3 shifted left by 7 (sign moved to bit 15) is a half worth 2^-8 of
    the E4M3 value, subnormals included (both formats' subnormals line up).
    """
    if variant == "e5m2":
        return (f8.view(torch.uint8).to(torch.int16) << 8).view(torch.float16)
    # int8 -> int16 sign-extends: bits 8..15 copy the sign. << 7 leaves it in bit 15 (and 14),
    # clearing bit 14 leaves sign | exponent+mantissa.
    return ((f8.view(torch.int8).to(torch.int16) << 7) & -16385).view(torch.float16)
