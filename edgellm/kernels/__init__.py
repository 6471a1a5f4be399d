"""Native CPU kernels: built once ahead of time, loaded at run time with no compiler and no lock.

``native()`` returns the compiled module, or None where the CPU lacks AVX2/FMA/F16C, the module
is neither built nor buildable (no C++ compiler), or ``EDGELLM_NATIVE=0`` is set. Callers then
take the pure-PyTorch path, which gives the same numbers more slowly.

``make setup`` builds the module with ``python -m edgellm.kernels.build`` (see
:mod:`edgellm.kernels.build` for where it lives and why a killed build cannot block later runs).
When that step was skipped, the first ``native()`` compiles it, under the same lock, as a fallback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

# edgellm.kernels.build is imported inside the functions below, not here: `python -m
# edgellm.kernels.build` runs this package first, and a build module already imported by it
# would then run a second time as __main__ (runpy warns about exactly that).

# Block formats the native kernels read directly; the codes match gguf_cpu.cpp. Q4_KR and Q6_KR
# are Q4_K and Q6_K repacked at load time (edgellm/quant/repack.py).
NATIVE_FORMATS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q4_KR": 3, "Q6_KR": 4, "Q5_0": 5}

# How this process got the module: "loaded" (built before), "compiled" (built by this process as
# the fallback), or None (not available). Tests and `--stats`-style reports read it via how_loaded().
_how: str | None = None


def cpu_supports_avx2() -> bool:
    from edgellm.kernels.build import cpu_supports_avx2 as check

    return check()


def unavailable_reason() -> str | None:
    """Why the native kernels cannot be used here, or None if they can (or may, once compiled)."""
    if os.environ.get("EDGELLM_NATIVE", "1") == "0":
        return "disabled by EDGELLM_NATIVE=0"
    if not cpu_supports_avx2():
        return "this CPU lacks AVX2/FMA/F16C"
    return None


def how_loaded() -> str | None:
    """``"loaded"`` (a module built earlier was loaded), ``"compiled"`` (this process built it), or
    None (native kernels not in use, or ``native()`` not called yet)."""
    return _how


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


@lru_cache(maxsize=1)
def native():
    """The compiled kernel module, or None (with a warning saying why) if it cannot be had."""
    from edgellm.kernels.build import (
        KernelBuildError,
        build,
        have_compiler,
        module_path,
    )

    global _how
    reason = unavailable_reason()
    if reason is None:
        path = module_path()
        if not path.exists() and not have_compiler():
            reason = "they are not built and there is no C++ compiler (install g++, then run `make setup`)"
    if reason is not None:
        if os.environ.get("EDGELLM_NATIVE", "1") != "0":
            warnings.warn(f"native kernels unavailable ({reason}); using the slower PyTorch path", stacklevel=2)
        return None
    how = "loaded"
    try:
        if not path.exists():  # set-up skipped `python -m edgellm.kernels.build`: build now
            path, compiled = build()
            how = "compiled" if compiled else "loaded"
        module = _load(path)
    except (KernelBuildError, ImportError, OSError) as err:  # a broken toolchain must not stop the engine
        warnings.warn(f"native kernels unavailable ({err}); using the slower PyTorch path", stacklevel=2)
        return None
    _how = how
    return module


__all__ = ["NATIVE_FORMATS", "cpu_supports_avx2", "how_loaded", "native", "unavailable_reason"]
