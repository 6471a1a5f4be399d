"""The C heap policy set for inference (edgellm/heap.py): it stops the page faults of a
prefill's activations (counted, not timed), and leaves a user's own malloc settings alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc policy")

FAULTS = """
import os, resource, sys
os.environ["EDGELLM_HEAP"] = sys.argv[1]    # "default": glibc's own policy
from edgellm.llm import LLM
from edgellm.sampling import SamplingParams
llm = LLM(sys.argv[2], threads=1)
ids = llm.tokenizer.encode("The history of the printing press, told slowly. " * 40)[:384]
params = SamplingParams(temperature=0.0, max_tokens=1)
llm.generate(ids, params)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
llm.generate(ids, params)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(mode: str, model) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode, str(model)], capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
    return int(out.stdout.split()[-1])


def test_a_second_prefill_reuses_the_first_ones_memory(smollm2_path):
    """With the tuned policy the second 384-token prefill touches no fresh pages; with glibc's
    default (EDGELLM_HEAP=default) it faults thousands."""
    tuned = _faults("tuned", smollm2_path)
    default = _faults("default", smollm2_path)
    assert default > 5 * max(tuned, 500), (tuned, default)


def test_a_users_malloc_settings_are_left_alone(monkeypatch):
    from edgellm import heap

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert heap.tune_for_inference() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("EDGELLM_HEAP", "default")
    assert heap.tune_for_inference() is False
