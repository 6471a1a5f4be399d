"""Native CPU kernels: built once ahead of time, per CPU kind, loaded at run time with no compiler
and no lock.

``native()`` returns the compiled module of the variant this CPU runs best (``avx512``, ``avx2``
or ``portable``: see :mod:`edgellm.kernels.build`), or None where the module is neither built
nor buildable (no C++ compiler), or ``EDGELLM_NATIVE=0`` is set. Callers then take the
pure-PyTorch path, which gives the same numbers more slowly.

``EDGELLM_KERNEL=avx512|avx2|portable`` chooses the variant instead (``auto``: the default); a
variant the CPU cannot run is refused with an error that says why.

``make setup`` builds the modules with ``python -m edgellm.kernels.build`` (see
:mod:`edgellm.kernels.build` for where they live and why a killed build cannot block later runs).
When that step was skipped, the first ``native()`` compiles the chosen variant, under the same
lock, as a fallback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

from edgellm.errors import InvalidParameterError

# edgellm.kernels.build is imported inside the functions below, not here: `python -m
# edgellm.kernels.build` runs this package first, and a build module already imported by it
# would then run a second time as __main__ (runpy warns about exactly that).

# Block formats the native kernels read directly; the codes match gguf_cpu.cpp. Q4_KR and Q6_KR
# are Q4_K and Q6_K repacked at load time (edgellm/quant/repack.py).
NATIVE_FORMATS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q4_KR": 3, "Q6_KR": 4, "Q5_0": 5}

# How this process got the module: "loaded" (built before), "compiled" (built by this process as
# the fallback), or None (not available). Tests and `--stats`-style reports read it via how_loaded().
_how: str | None = None
_variant: str | None = None


class KernelVariantError(InvalidParameterError):
    """EDGELLM_KERNEL names a variant that does not exist or that this CPU cannot run."""


def cpu_supports_avx2() -> bool:
    from edgellm.kernels.build import cpu_supports_avx2 as check

    return check()


def selected_variant() -> str:
    """The variant ``native()`` loads: ``EDGELLM_KERNEL`` if set (and runnable here), else the best
    one this CPU runs. Raises KernelVariantError for an unknown or unrunnable request."""
    from edgellm.kernels.build import PREFERENCE, missing_for, runnable_variants

    asked = os.environ.get("EDGELLM_KERNEL", "auto").strip().lower() or "auto"
    if asked == "auto":
        return runnable_variants()[0]   # "portable" runs everywhere
    if asked not in PREFERENCE:
        raise KernelVariantError(f"EDGELLM_KERNEL={asked!r} is not a kernel variant",
                                 f"use one of: auto, {', '.join(PREFERENCE)}")
    why = missing_for(asked)
    if why is not None:
        raise KernelVariantError(
            f"EDGELLM_KERNEL={asked} asks for kernels this machine cannot run: {why}",
            f"unset EDGELLM_KERNEL (the best variant here is {runnable_variants()[0]}) or choose one of: "
            f"{', '.join(runnable_variants())}")
    return asked


def unavailable_reason() -> str | None:
    """Why the native kernels cannot be used here, or None if they can (or may, once compiled)."""
    if os.environ.get("EDGELLM_NATIVE", "1") == "0":
        return "disabled by EDGELLM_NATIVE=0"
    return None


def how_loaded() -> str | None:
    """``"loaded"`` (a module built earlier was loaded), ``"compiled"`` (this process built it), or
    None (native kernels not in use, or ``native()`` not called yet)."""
    return _how


def variant_in_use() -> str | None:
    """The variant ``native()`` loaded (``"avx2"``, ...), or None (not in use, or not called yet)."""
    return _variant


def _load(path: Path):
    import torch  # noqa: F401 -- the module links against libtorch, which this loads into the process

    name = path.stem
    if name in sys.modules:  # compiled by this process (torch's builder imported it already)
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


@lru_cache(maxsize=None)
def load_variant(variant: str):
    """The module of one variant, built first if it is not (raises KernelBuildError, ImportError or
    OSError when that fails; KernelVariantError when this CPU cannot run it). For tests and
    benchmarks that compare variants; the engine calls ``native()``."""
    from edgellm.kernels.build import PREFERENCE, build, missing_for, module_path

    if variant not in PREFERENCE:
        raise KernelVariantError(f"{variant!r} is not a kernel variant", f"use one of: {', '.join(PREFERENCE)}")
    why = missing_for(variant)
    if why is not None:
        raise KernelVariantError(f"the {variant} kernels cannot run here: {why}", "use another variant")
    path = module_path(variant)
    compiled = False
    if not path.exists():   # set-up skipped `python -m edgellm.kernels.build`: build now
        path, compiled = build(variant)
    module = _load(path)
    module.edgellm_how = "compiled" if compiled else "loaded"
    return module


def paired_rows_wanted() -> bool:
    """Whether the avx512 build's many-row matmuls put two activation rows in each 16-float vector
    (gguf_cpu.cpp, tile_pairs; the same bits either way). ``EDGELLM_PAIRED_ROWS=1|0`` decides;
    by default on for Intel CPUs, whose cores have two full-width 512-bit FMA units, and off
    elsewhere: AMD's Zen 4 splits each 512-bit FMA in two halves, and there the path measured no
    faster than one row per 8-float vector (docs/kernels.md, "Two rows a vector")."""
    from edgellm.kernels.build import cpu_vendor

    asked = os.environ.get("EDGELLM_PAIRED_ROWS", "").strip()
    if asked in ("0", "1"):
        return asked == "1"
    if asked:
        raise InvalidParameterError(f"EDGELLM_PAIRED_ROWS={asked!r} is not 0 or 1",
                                    "unset it (the CPU decides) or set 0 or 1")
    return cpu_vendor() == "GenuineIntel"


@lru_cache(maxsize=1)
def native():
    """The compiled kernel module, or None (with a warning saying why) if it cannot be had.

    Raises KernelVariantError when ``EDGELLM_KERNEL`` asks for a variant this CPU cannot run.
    """
    from edgellm.kernels.build import KernelBuildError, have_compiler, module_path

    global _how, _variant
    reason = unavailable_reason()
    if reason is not None:
        return None
    variant = selected_variant()
    if not module_path(variant).exists() and not have_compiler():
        reason = (f"the {variant} kernels are not built and there is no C++ compiler "
                  "(install g++, then run `make setup`)")
        warnings.warn(f"native kernels unavailable ({reason}); using the slower PyTorch path", stacklevel=2)
        return None
    try:
        module = load_variant(variant)
    except (KernelBuildError, ImportError, OSError) as err:  # a broken toolchain must not stop the engine
        warnings.warn(f"native kernels unavailable ({err}); using the slower PyTorch path", stacklevel=2)
        return None
    module.set_paired_rows(paired_rows_wanted())
    _how, _variant = module.edgellm_how, variant
    return module


__all__ = ["NATIVE_FORMATS", "KernelVariantError", "cpu_supports_avx2", "how_loaded", "load_variant", "native",
           "paired_rows_wanted", "selected_variant", "unavailable_reason", "variant_in_use"]
