"""Compile the native CPU kernels once, ahead of time: ``python -m edgellm.kernels.build``.

``make setup`` runs this after ``pip install -e .``, so a start of edgellm only loads the finished
module (:func:`edgellm.kernels.native`) -- no compiler, no ninja check, no lock. Compiling at run
time remains only as the fallback for an install that skipped this step.

One source, several builds (``VARIANTS``), as ggml builds its CPU backend per instruction set:
``avx512`` (AVX-512 F/BW/VL/DQ as well as AVX2), ``avx2`` (AVX2 + FMA + F16C) and ``portable``
(no vector extension named: any x86-64 CPU, ARM). The command builds every variant the compiler
can build, including ones this CPU cannot run (a shared cache or a copied home directory may
serve another machine); at run time edgellm loads the best variant the CPU reports
(:func:`edgellm.kernels.selected_variant`).

Where: ``<cache>/kernels/<name>/<name>.so`` with ``<cache>`` = :func:`edgellm.util.cache_dir` and
``<name>`` = ``edgellm_gguf_cpu_<variant>_<hash>``; the hash covers what makes a build differ (the
sources, the compile flags, the torch and Python versions), so a changed source or a new torch gets
a new build and two virtual environments can share one cache.

Why a build cannot leave a broken state behind:

* it compiles into a private temporary directory beside the target and renames that directory
  into place when the module is complete (a rename is atomic), so a build killed half way leaves
  only a temporary directory, which the next build removes;
* builders take an ``fcntl.flock`` lock on ``<name>.lock``. The kernel releases such a lock when
  its process dies, however it dies (SIGKILL, OOM killer), so the lock file that stays behind
  never blocks anyone and must not be deleted. (torch's own JIT lock is a file whose existence
  is the lock: a killed build left it and every later start waited for it forever.)
* a process waiting for another's build gives up after ``EDGELLM_KERNEL_BUILD_WAIT`` seconds
  (default 900) with a message saying what to do.

Why not compile in ``pip install``: pip's isolated build environment would download its own torch
(the multi-GB CUDA build) to compile against, and the module must match the torch it runs with.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from edgellm.util import cache_dir

SOURCE = Path(__file__).with_name("gguf_cpu.cpp")
HEADERS = [Path(__file__).with_name(name) for name in ("simd_portable.h", "int8_activations.h", "int8_dot.inc",
                                                      "int8_row_lanes.inc", "bf16_decode.h", "bf16_attention.h")]
LDFLAGS = ("-fopenmp",)   # a tuple: torch's builder appends to the list it is given
DEFAULT_WAIT_S = 900.0


class KernelBuildError(RuntimeError):
    """The kernels could not be built (or another process's build could not be waited for)."""


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: its compiler flags and the CPU flags (/proc/cpuinfo) it needs."""

    name: str
    cflags: tuple[str, ...]
    cpu_flags: frozenset[str]
    x86_only: bool
    summary: str


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("avx512", ("-O3", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                       "-fopenmp"),
            frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}), True,
            "AVX-512 F/BW/VL/DQ and AVX2"),
    # Unchanged from the JIT build that came before, so the kernels stay bit-identical.
    Variant("avx2", ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"), frozenset({"avx2", "fma", "f16c"}), True,
            "AVX2, FMA and F16C"),
    Variant("portable", ("-O3", "-fopenmp"), frozenset(), False, "no vector extension named (any CPU)"),
)}
PREFERENCE = ("avx512", "avx2", "portable")   # the first one a CPU can run is its default


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the CPU reports (Linux: /proc/cpuinfo); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def cpu_vendor() -> str:
    """The CPU's vendor string as Linux reports it ("GenuineIntel", "AuthenticAMD"); "" where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.startswith("vendor_id")), "")
    return line.split(":", 1)[1].strip() if ":" in line else ""


def missing_for(variant: str) -> str | None:
    """Why this CPU cannot run ``variant``, or None if it can."""
    v = VARIANTS[variant]
    if v.x86_only and not is_x86():
        return f"the {variant} kernels need an x86-64 CPU, and this is {platform.machine() or 'unknown'}"
    lacks = sorted(v.cpu_flags - cpu_flags())
    if lacks:
        return f"this CPU lacks {', '.join(lacks)} (the {variant} kernels use {v.summary})"
    return None


def runnable_variants() -> list[str]:
    """The variants this CPU can run, best first."""
    return [name for name in PREFERENCE if missing_for(name) is None]


def cpu_supports_avx2() -> bool:
    return missing_for("avx2") is None


def have_compiler() -> bool:
    return shutil.which("c++") is not None or shutil.which("g++") is not None


def module_name(variant: str = "avx2") -> str:
    """``edgellm_gguf_cpu_<variant>_<hash>``; also the name the module is compiled under (PyInit_<name>)."""
    import torch  # the module links against this torch: its version is part of the key

    h = hashlib.sha256(SOURCE.read_bytes())
    for header in HEADERS:
        h.update(header.read_bytes())
    for part in (list(VARIANTS[variant].cflags), list(LDFLAGS), torch.__version__, sys.version_info[:2],
                 sysconfig.get_config_var("EXT_SUFFIX")):
        h.update(repr(part).encode())
    return f"edgellm_gguf_cpu_{variant}_{h.hexdigest()[:16]}"


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def module_path(variant: str = "avx2", name: str | None = None) -> Path:
    """Where the finished module of ``variant`` lives (whether or not it has been built)."""
    name = name or module_name(variant)
    return kernels_dir() / name / f"{name}.so"


def wait_limit_s() -> float:
    raw = os.environ.get("EDGELLM_KERNEL_BUILD_WAIT", "")
    try:
        return float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        raise KernelBuildError(
            f"EDGELLM_KERNEL_BUILD_WAIT={raw!r} is not a number of seconds; unset it or give e.g. 900"
        ) from None


@contextmanager
def build_lock(lock_path: Path, timeout_s: float, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``, waiting at most ``timeout_s`` for it.

    Raises KernelBuildError when the wait runs out. The lock dies with the process that holds it
    (and Python opens the file close-on-exec, so the compiler it starts does not inherit it).
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise KernelBuildError(
                    f"another edgellm process is compiling the native kernels in {lock_path.parent}; "
                    f"waited {waited:.0f} s for it. Remove nothing (the lock is released when that "
                    "process ends): retry later, raise EDGELLM_KERNEL_BUILD_WAIT, or set "
                    "EDGELLM_NATIVE=0 to run without the native kernels"
                )
            if not told:
                print(f"edgellm: waiting for another process compiling the native kernels in "
                      f"{lock_path.parent} ...", file=sys.stderr)
                told = True
            time.sleep(poll_s)
        yield
    finally:
        os.close(fd)   # closing the descriptor releases the lock


def build(variant: str = "avx2", verbose: bool = False, timeout_s: float | None = None) -> tuple[Path, bool]:
    """Compile one variant unless already built; return (module path, whether this call compiled).

    Safe to run from several processes at once and to kill at any moment (see the module doc).
    """
    name = module_name(variant)
    final = module_path(variant, name)
    if final.exists():
        return final, False
    if not have_compiler():
        raise KernelBuildError("no C++ compiler found (install g++), so the native kernels cannot be built")
    root = kernels_dir()
    with build_lock(root / f"{name}.lock", wait_limit_s() if timeout_s is None else timeout_s):
        if final.exists():  # built by the process we waited for
            return final, False
        # Temporary directories of builds that were killed: only a lock holder creates them, and
        # we hold the lock, so none of them is in use.
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.parent.exists():  # a module directory without its module (deleted by hand)
            shutil.rmtree(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished module is for every user
        print(f"edgellm: compiling the native CPU kernels, {variant} build (once per machine, about a minute)...",
              file=sys.stderr)
        try:
            _compile(name, VARIANTS[variant].cflags, tmp, verbose)
            os.rename(tmp, final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True


def _compile(name: str, cflags: tuple[str, ...], build_dir: Path, verbose: bool) -> None:
    # torch's builder knows the include paths, libraries and ABI flags of the installed torch. Its
    # public load() imports the module once built, which kills the process with SIGILL when the
    # variant is one this CPU cannot run (AVX-512 on an AVX2 machine), so the step under it that
    # only writes the ninja file and builds is called (torch is pinned, so is its signature).
    from torch.utils import cpp_extension

    # It runs `ninja`, which pip installs next to this interpreter.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    build_only = getattr(cpp_extension, "_write_ninja_file_and_build_library", None)
    if build_only is None:
        raise KernelBuildError("this torch has no build-only step (torch.utils.cpp_extension."
                               "_write_ninja_file_and_build_library); install the torch edgellm pins")
    try:
        build_only(name=name, sources=[str(SOURCE)], extra_cflags=list(cflags), extra_cuda_cflags=[],
                   extra_sycl_cflags=[], extra_ldflags=list(LDFLAGS), extra_include_paths=[],
                   build_directory=str(build_dir), verbose=verbose, with_cuda=False, with_sycl=False,
                   is_standalone=False)
    except Exception as err:
        raise KernelBuildError(f"compiling {SOURCE.name} ({name}) failed: {err}") from err
    if not (build_dir / f"{name}.so").exists():
        raise KernelBuildError(f"the compiler reported success but wrote no {name}.so in {build_dir}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m edgellm.kernels.build",
        description="Compile edgellm's native CPU kernels once, into the cache that edgellm loads them from: "
                    "every variant the compiler can build (the CPU picks one at run time).")
    parser.add_argument("--variant", choices=list(VARIANTS), action="append",
                        help="build only this variant (repeatable); default: all")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)
    if os.environ.get("EDGELLM_NATIVE", "1") == "0":
        print("edgellm: EDGELLM_NATIVE=0 is set; not building the native kernels")
        return 0
    if not have_compiler():
        print("edgellm: no C++ compiler found; the native kernels are not built (install g++ and "
              "rerun this command for the fast path; until then edgellm uses its PyTorch path)")
        return 0
    wanted = args.variant or [name for name in PREFERENCE if is_x86() or not VARIANTS[name].x86_only]
    runnable = runnable_variants()
    failed_needed = False
    for variant in wanted:
        try:
            path, compiled = build(variant, verbose=args.verbose)
        except KernelBuildError as err:
            # A variant this CPU would not use (say AVX-512 with an old compiler) may fail alone.
            needed = bool(runnable) and variant == runnable[0]
            failed_needed |= needed
            print(f"edgellm: the {variant} kernels were not built: {err}", file=sys.stderr)
            continue
        note = "" if missing_for(variant) is None else f" (not runnable here: {missing_for(variant)})"
        print(f"edgellm: {variant} kernels {'built' if compiled else 'already built'}: {path}{note}")
    return 1 if failed_needed else 0


if __name__ == "__main__":
    sys.exit(main())
