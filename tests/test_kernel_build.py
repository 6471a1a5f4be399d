"""Building and loading the native kernels: built once, loaded without compiling or locking, and
never blocked by a start that was killed (issue 15).

Every test uses its own ``XDG_CACHE_HOME``, so none touches the cache other runs load from. The
module is compiled once per session (``built_cache``, about a minute); compiling under random
kills is ``slow``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgellm.kernels.build import (
    PREFERENCE,
    KernelBuildError,
    build_lock,
    cpu_supports_avx2,
    have_compiler,
    missing_for,
    runnable_variants,
)

REPO = Path(__file__).resolve().parents[1]
BEST = runnable_variants()[0]

needs_native = pytest.mark.skipif(
    not (cpu_supports_avx2() and have_compiler()), reason="needs an AVX2 CPU and a C++ compiler"
)

# A start of edgellm as far as the kernels go: prints how the module came (loaded / compiled),
# whether torch's compiler machinery was imported at all, and the module's file.
START = (
    "import sys\n"
    "from edgellm.kernels import native, how_loaded\n"
    "m = native()\n"
    "print('RESULT', how_loaded(), 'torch.utils.cpp_extension' in sys.modules, m.__file__ if m else None)\n"
)


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), PYTHONPATH=str(REPO))
    env.pop("EDGELLM_NATIVE", None)
    env.update(extra)
    return env


def _start(cache: Path, timeout: float = 600, **extra: str) -> list[str]:
    """Run START to the end; return its RESULT fields."""
    proc = subprocess.run([sys.executable, "-c", START], env=_env(cache, **extra), capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, f"no RESULT line; stdout={proc.stdout!r} stderr={proc.stderr[-2000:]!r}"
    return line.split()[1:]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under root with its size and mtime: a compile would change it."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _kill_at(proc: subprocess.Popen, at_s: float) -> None:
    """SIGKILL the Python process at ``at_s`` (as the OOM killer would), then its children."""
    try:
        proc.wait(timeout=at_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The compilers a killed build started keep running on their own; end them so they do not
    # load a shared machine. Each child runs in its own session, and ninja puts every compiler in
    # a process group of its own, so they are found by session id, not by group.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == proc.pid:  # fields after "(comm)": state ppid pgrp session ...
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory) -> Path:
    """A cache with the kernels built by the set-up command, as `make setup` runs it."""
    if not (cpu_supports_avx2() and have_compiler()):
        pytest.skip("needs an AVX2 CPU and a C++ compiler")
    cache = tmp_path_factory.mktemp("cache")
    # Only the variant this CPU runs by default (each variant is a compile of about a minute;
    # test_setup_builds_every_variant builds them all).
    proc = subprocess.run([sys.executable, "-m", "edgellm.kernels.build", "--variant", BEST], env=_env(cache),
                          capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"{BEST} kernels built:" in proc.stdout, proc.stdout
    assert "RuntimeWarning" not in proc.stderr, proc.stderr
    return cache


def test_lock_dies_with_its_holder(tmp_path):
    lock = tmp_path / "kernels" / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         ("import sys, time\n"
          "from pathlib import Path\n"
          "from edgellm.kernels.build import build_lock\n"
          f"with build_lock(Path({str(lock)!r}), 5):\n"
          "    print('held', flush=True)\n"
          "    time.sleep(600)\n")],
        env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # While it lives, the lock holds, and waiting for it ends with a message saying what to do.
        with pytest.raises(KernelBuildError, match=r"another edgellm process is compiling.*waited.*EDGELLM_NATIVE=0"), \
                build_lock(lock, timeout_s=0.5):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.exists()  # the file stays behind, as after any killed build ...
    with build_lock(lock, timeout_s=5):  # ... and blocks nobody
        pass


def test_native_off_builds_nothing(tmp_path):
    assert _start(tmp_path, EDGELLM_NATIVE="0") == ["None", "False", "None"]
    assert not (tmp_path / "edgellm" / "kernels").exists()


@needs_native
def test_second_start_neither_compiles_nor_locks(built_cache):
    kernels = built_cache / "edgellm" / "kernels"
    before = _snapshot(kernels)
    how, compiler_imported, file = _start(built_cache)
    assert how == "loaded"
    assert compiler_imported == "False"  # torch.utils.cpp_extension (ninja, the JIT lock) never imported
    assert Path(file).is_relative_to(kernels)
    # The set-up command run again finds the module and builds nothing either.
    proc = subprocess.run([sys.executable, "-m", "edgellm.kernels.build", "--variant", BEST], env=_env(built_cache),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and f"{BEST} kernels already built" in proc.stdout, proc.stdout + proc.stderr
    assert _snapshot(kernels) == before
    assert not list(kernels.glob(".*.tmp-*"))


@needs_native
def test_starts_killed_at_random_moments_do_not_block_the_next(built_cache):
    rng = random.Random(15)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", START], env=_env(built_cache), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_at(proc, rng.uniform(0.0, 3.0))
    how, _, _ = _start(built_cache, timeout=300)
    assert how == "loaded"


@needs_native
@pytest.mark.slow
def test_builds_killed_at_random_moments_do_not_block_the_next(tmp_path):
    """No set-up build: starts compile as the fallback, and are killed while doing so."""
    rng = random.Random(1515)
    for _ in range(2):
        # Two at once: one compiles, the other waits for its lock; both are killed.
        procs = [subprocess.Popen([sys.executable, "-c", START], env=_env(tmp_path), start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
        t0 = time.monotonic()
        for proc in procs:
            _kill_at(proc, max(0.0, rng.uniform(2.0, 40.0) - (time.monotonic() - t0)))
    how, _, file = _start(tmp_path, timeout=1800)
    assert how in ("compiled", "loaded")  # "loaded" if a killed start finished its build in time
    assert file != "None"
    kernels = tmp_path / "edgellm" / "kernels"
    if how == "compiled":  # the build removed the half-built directories of the killed ones
        assert not list(kernels.glob(".*.tmp-*"))
    assert _start(tmp_path)[0] == "loaded"


@pytest.mark.slow
def test_setup_builds_every_variant(tmp_path):
    """`make setup`'s command builds each variant the compiler can, runnable here or not, and says
    which ones this CPU cannot run; a start then loads the best runnable one."""
    if not have_compiler():
        pytest.skip("needs a C++ compiler")
    proc = subprocess.run([sys.executable, "-m", "edgellm.kernels.build"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0, proc.stderr
    for variant in PREFERENCE:
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"edgellm: {variant} kernels built:"))
        assert ("not runnable here" in line) == (missing_for(variant) is not None), line
    how, _, file = _start(tmp_path)
    assert how == "loaded" and f"edgellm_gguf_cpu_{BEST}_" in file
