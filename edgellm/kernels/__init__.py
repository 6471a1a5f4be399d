"""Native CPU kernels, compiled on first use, with a clear fallback when they cannot be.

``native()`` returns the compiled module, or None where the CPU lacks AVX2/FMA/F16C, no C++
compiler is present, or ``EDGELLM_NATIVE=0`` is set. Callers then take the pure-PyTorch path,
which gives the same numbers more slowly. The build is cached under ``~/.cache/edgellm/kernels``
(``$XDG_CACHE_HOME`` respected) and keyed by the source's hash, so it happens once per machine.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from edgellm.util import cache_dir

_SOURCE = Path(__file__).with_name("gguf_cpu.cpp")

# Block formats the native kernels read directly; the codes match gguf_cpu.cpp. Q4_KR and Q6_KR
# are Q4_K and Q6_K repacked at load time (edgellm/quant/repack.py).
NATIVE_FORMATS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q4_KR": 3, "Q6_KR": 4, "Q5_0": 5}




def cpu_supports_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((ln for ln in flags.splitlines() if ln.startswith("flags")), "")
    have = set(line.split())
    return {"avx2", "fma", "f16c"} <= have


def unavailable_reason() -> str | None:
    """Why the native kernels cannot be used here, or None if they can."""
    if os.environ.get("EDGELLM_NATIVE", "1") == "0":
        return "disabled by EDGELLM_NATIVE=0"
    if not cpu_supports_avx2():
        return "this CPU lacks AVX2/FMA/F16C"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (install g++)"
    return None


@lru_cache(maxsize=1)
def native():
    """The compiled kernel module, or None (with a warning saying why) if it cannot be built."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("EDGELLM_NATIVE", "1") != "0":
            warnings.warn(f"native kernels unavailable ({reason}); using the slower PyTorch path", stacklevel=2)
        return None
    # torch's builder runs `ninja`, which pip installs next to this interpreter.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]
    name = f"edgellm_gguf_cpu_{digest}"
    build = cache_dir() / "kernels" / name
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        print("edgellm: compiling native CPU kernels (once per machine, about a minute)...", file=sys.stderr)
    try:
        from torch.utils.cpp_extension import load

        return load(name=name, sources=[str(_SOURCE)], build_directory=str(build),
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # a broken toolchain must not stop the engine
        warnings.warn(f"native kernels failed to build ({err}); using the slower PyTorch path", stacklevel=2)
        return None
