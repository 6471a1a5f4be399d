"""Compile the native CPU kernels once, ahead of time: ``python -m edgellm.kernels.build``.

``make setup`` runs this after ``pip install -e .``, so a start of edgellm only loads the finished
module (:func:`edgellm.kernels.native`) -- no compiler, no ninja check, no lock. Compiling at run
time remains only as the fallback for an install that skipped this step.

Where: ``<cache>/kernels/<name>/<name>.so`` with ``<cache>`` = :func:`edgellm.util.cache_dir` and
``<name>`` = ``edgellm_gguf_cpu_<hash>``; the hash covers what makes a build differ (the source,
the compile flags, the torch and Python versions), so a changed source or a new torch gets a new
build and two virtual environments can share one cache.

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
from pathlib import Path

from edgellm.util import cache_dir

SOURCE = Path(__file__).with_name("gguf_cpu.cpp")
# Unchanged from the JIT build that came before, so the kernels stay bit-identical.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
DEFAULT_WAIT_S = 900.0


class KernelBuildError(RuntimeError):
    """The kernels could not be built (or another process's build could not be waited for)."""


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


def have_compiler() -> bool:
    return shutil.which("c++") is not None or shutil.which("g++") is not None


def module_name() -> str:
    """``edgellm_gguf_cpu_<hash>``; also the name the module is compiled under (PyInit_<name>)."""
    import torch  # the module links against this torch: its version is part of the key

    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2], sysconfig.get_config_var("EXT_SUFFIX")):
        h.update(repr(part).encode())
    return "edgellm_gguf_cpu_" + h.hexdigest()[:16]


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def module_path(name: str | None = None) -> Path:
    """Where the finished module lives (whether or not it has been built)."""
    name = name or module_name()
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


def build(verbose: bool = False, timeout_s: float | None = None) -> tuple[Path, bool]:
    """Compile the kernels unless already built; return (module path, whether this call compiled).

    Safe to run from several processes at once and to kill at any moment (see the module doc).
    """
    name = module_name()
    final = module_path(name)
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
        print("edgellm: compiling the native CPU kernels (once per machine, about a minute)...", file=sys.stderr)
        try:
            _compile(name, tmp, verbose)
            os.rename(tmp, final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True


def _compile(name: str, build_dir: Path, verbose: bool) -> None:
    # torch's builder knows the include paths, libraries and ABI flags of the installed torch.
    # Its own lock file is created inside our private build_dir, where no other process looks.
    from torch.utils.cpp_extension import load

    # It runs `ninja`, which pip installs next to this interpreter.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    try:
        load(name=name, sources=[str(SOURCE)], build_directory=str(build_dir),
             extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=verbose)
    except Exception as err:
        raise KernelBuildError(f"compiling {SOURCE.name} failed: {err}") from err
    if not (build_dir / f"{name}.so").exists():
        raise KernelBuildError(f"the compiler reported success but wrote no {name}.so in {build_dir}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m edgellm.kernels.build",
        description="Compile edgellm's native CPU kernels once, into the cache that edgellm loads them from.")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)
    if os.environ.get("EDGELLM_NATIVE", "1") == "0":
        print("edgellm: EDGELLM_NATIVE=0 is set; not building the native kernels")
        return 0
    if not cpu_supports_avx2():
        # Not an error: edgellm runs on the PyTorch path on such a CPU.
        print("edgellm: this CPU lacks AVX2/FMA/F16C; the native kernels are not built "
              "(edgellm uses its PyTorch path)")
        return 0
    if not have_compiler():
        print("edgellm: no C++ compiler found; the native kernels are not built (install g++ and "
              "rerun this command for the fast path; until then edgellm uses its PyTorch path)")
        return 0
    try:
        path, compiled = build(verbose=args.verbose)
    except KernelBuildError as err:
        print(f"edgellm: {err}", file=sys.stderr)
        return 1
    print(f"edgellm: native kernels {'built' if compiled else 'already built'}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
