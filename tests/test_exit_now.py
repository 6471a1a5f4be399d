"""`edgellm.util.exit_now`: a one-shot command ends without the interpreter's teardown, yet its
exit handlers run and its buffered output is all written. Each case runs in a child process (the
point is how a process ends), with stdout a pipe and buffered (PYTHONUNBUFFERED unset)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_child(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_exit_handlers_run_and_buffered_output_is_written():
    child = run_child("""
        import atexit, sys
        from edgellm.util import exit_now
        atexit.register(lambda: print("handler ran", file=sys.stderr))
        sys.stdout.write("x" * 100000)      # more than one buffer, still in it when exiting
        sys.stdout.write("end")
        exit_now(3)
        print("not reached")
    """)
    assert child.returncode == 3
    assert child.stdout == "x" * 100000 + "end"
    assert child.stderr.strip() == "handler ran"


def test_teardown_is_skipped():
    """An object's finaliser that a normal exit would run is not run: the teardown is skipped."""
    child = run_child("""
        import sys
        from edgellm.util import exit_now
        class Noisy:
            def __del__(self):
                print("teardown ran", flush=True)
        kept = Noisy()
        print("done", flush=True)
        exit_now(0)
    """)
    assert child.returncode == 0 and child.stdout == "done\n"


def test_a_running_non_daemon_thread_keeps_the_normal_exit():
    child = run_child("""
        import threading, time
        from edgellm.util import exit_now
        worker = threading.Thread(target=lambda: (time.sleep(0.5), print("worker finished", flush=True)))
        worker.start()
        exit_now(5)
        print("exit_now returned", flush=True)
    """)
    assert child.returncode == 0
    assert child.stdout.splitlines() == ["exit_now returned", "worker finished"]
