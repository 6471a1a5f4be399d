"""Start-up to the first token: what the fast path skips must not change what it computes.

The GGUF reader carries its own table of ggml tensor types (importing the gguf package cost
~0.13 s of every start); ``EDGELLM_TRACE_STARTUP=1`` prints where the time of a start went.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from edgellm.loading.gguf import ggml_type_id, ggml_type_info

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("qtype", list(GGMLQuantizationType), ids=lambda t: t.name)
def test_type_table_agrees_with_the_gguf_package(qtype):
    if qtype not in GGML_QUANT_SIZES:
        pytest.skip(f"the gguf package gives no block size for {qtype.name}")
    assert ggml_type_info(int(qtype)) == (qtype.name, *GGML_QUANT_SIZES[qtype])
    assert ggml_type_id(qtype.name) == int(qtype)


def test_unknown_type_ids_and_names():
    assert ggml_type_info(10_000) is None
    assert ggml_type_id("Q9_9") is None


def test_reading_a_gguf_file_does_not_import_the_gguf_package(smollm2_path):
    code = ("import sys; from edgellm.loading.gguf import read_gguf; "
            f"read_gguf({str(smollm2_path)!r}); print('gguf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "False"


def test_startup_trace_accounts_for_the_run(smollm2_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGELLM_TRACE_STARTUP": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "edgellm", "generate", "--model", str(smollm2_path),
                          "--prompt", "hi", "--max-tokens", "1"], capture_output=True, text=True, timeout=600,
                         env=env, check=True)
    wall = time.perf_counter() - start
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("edgellm start-up (s):")]
    phases = dict((name, float(s)) for name, s in re.findall(r"([a-zA-Z][^,;:]*?) (\d+\.\d+)(?=[,;])", line.split(":", 1)[1]))
    for phase in ("python and command line", "imports (torch)", "read GGUF header", "tokenizer", "native kernels",
                  "weights", "model", "engine and prompt", "generate"):
        assert phase in phases, (phase, line)
    total = float(re.search(r"total (\d+\.\d+)", line).group(1))
    assert sum(phases.values()) == pytest.approx(total, abs=0.01)
    # Counted from the process's own start: within what the parent measured around it.
    assert 0.5 * wall < total <= wall + 0.05


def test_the_collector_is_paused_only_while_loading(smollm2_path):
    """Loading pauses the cyclic garbage collector and leaves it as it found it: on (with the
    loaded objects frozen) after a paused start-up or when it was on, off when the caller had
    turned it off. Run in a fresh interpreter so no other test's state counts."""
    code = f"""
import gc
from edgellm.loading.load import load_model
from edgellm.util import pause_gc_for_startup
seen = []
pause_gc_for_startup(); seen.append(gc.isenabled())
load_model({str(smollm2_path)!r}); seen.append(gc.isenabled()); seen.append(gc.get_freeze_count() > 100000)
load_model({str(smollm2_path)!r}); seen.append(gc.isenabled())
gc.disable(); load_model({str(smollm2_path)!r}); seen.append(gc.isenabled())
print(seen)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[False, True, True, True, False]"
