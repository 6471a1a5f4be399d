"""Activation precision of the matmuls on GGUF blocks: ``fp32`` (exact, the default) or ``int8``.

``int8`` is llama.cpp's scheme (the kernels: ``edgellm/kernels/int8_activations.h``): each 32
values of an activation row become int8 with one float scale (d = max|x| / 127, q = round(x / d))
and meet the weights' integer codes in integer dot products. Every such matmul computes
``W . x^`` with ``x^ = d q`` the dequantised activations, so the mode's whole error is the
rounding of x to 8 bits per block; its cost in quality is measured by ``edgellm eval`` (README,
"Fast modes").

Decode (at most ``DECODE_MAX_ROWS`` rows, and the fused decode step) runs the integer kernels.
Prefill rounds its activations the same way and multiplies them with the float32 BLAS, so a
prompt sees the same arithmetic (and perplexity, scored through prefill, measures the mode); the
integer kernel is a decode kernel, not a blocked GEMM (docs/fast-modes.md).
"""

from __future__ import annotations

import torch

from edgellm.errors import InvalidParameterError
from edgellm.kernels import native

ACTIVATIONS = ("fp32", "int8")
_ALIASES = {"fp32": "fp32", "float32": "fp32", "int8": "int8", "q8": "int8"}


def activations_name(name: str | None) -> str:
    """The canonical name of an activation precision (None: fp32); a clear error for an unknown
    name, or for int8 where the native kernels are not available (checked before any loading)."""
    if name is None:
        return "fp32"
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise InvalidParameterError(f"unknown activation precision {name!r}",
                                    f"use one of: {', '.join(ACTIVATIONS)} (default fp32)")
    if _ALIASES[key] == "int8" and native() is None:
        raise InvalidParameterError(
            "--activations int8 needs the native kernels, which are not available here "
            "(EDGELLM_NATIVE=0, or no C++ compiler)",
            "unset EDGELLM_NATIVE (or install g++ and run `make setup`), or drop --activations")
    return _ALIASES[key]


def dequantized_q8(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 rounded as the int8 kernels see it: each block of 32 quantised to int8
    with its scale, then multiplied back out (float32)."""
    q, d, _ = native().quantize_q8(x.float().contiguous())
    m, k = q.shape
    return (q.view(m, k // 32, 32).float() * d.unsqueeze(-1)).view(m, k)


def fast_modes_conflict() -> InvalidParameterError:
    """The error for --activations int8 beside --dtype bfloat16 (raised by the CLI before loading,
    and here for a model loaded in bf16)."""
    return InvalidParameterError("--dtype bfloat16 and --activations int8 are two different fast modes; they "
                                 "cannot be combined", "choose one: drop --dtype bfloat16 or --activations int8")


def set_activations(model, mode: str) -> None:
    """Make every block matrix of ``model`` (and its vocabulary projection, where that is GGUF
    blocks too) take ``mode`` activations. Refuses, before changing anything, a model whose block
    matrices are not all GGUF blocks read by the native kernels: there the mode would not be what ran.
    A matrix takes int8 activations if its format has the switch (``int8_activations``: GGUF blocks
    with a native kernel, edgellm.quant.gguf_weights)."""
    mode = activations_name(mode)
    blocks = getattr(getattr(model, "weights", None), "blocks", None)
    if mode == "fp32":
        if blocks is not None:
            for w in _matrices(model):
                if hasattr(w, "int8_activations"):
                    w.int8_activations = False
            model.activations = "fp32"
        return
    if not blocks:
        raise InvalidParameterError(
            f"--activations int8 runs on transformer models with GGUF block weights; "
            f"{type(model).__name__} is not one", "drop --activations")
    for i, block in enumerate(blocks):
        for w in block.matrices():
            if getattr(w, "bf16_mode", False):   # two fast modes for one matmul: which ran would be unclear
                raise fast_modes_conflict()
            if not hasattr(w, "int8_activations"):
                raise InvalidParameterError(
                    f"--activations int8 needs every block matrix in GGUF blocks that the native kernels read "
                    f"(Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K); block {i} has a {w.format} matrix",
                    "load a GGUF file of those types without --weights / --dtype bfloat16, or drop --activations")
    for w in _matrices(model):
        if hasattr(w, "int8_activations"):
            w.int8_activations = True
    model.activations = "int8"


def _matrices(model) -> list:
    out = [w for b in model.weights.blocks for w in b.matrices()]
    head = getattr(model.weights, "lm_head", None)
    return out + ([head] if head is not None else [])
