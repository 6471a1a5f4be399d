"""Load on the real server: 64 concurrent streaming clients, one request in ten hanging up
mid-stream. Every completed response must equal the same prompt served alone (greedy), the server
must stay up, and afterwards no KV block may be in use (cached prefixes aside). Takes about a
minute on two busy cores, hence slow; `python -m edgellm.serve.loadtest` prints the figures."""

from __future__ import annotations

import pytest

from edgellm.serve.loadtest import run_load_test
from edgellm.serve.process import ServerProcess


@pytest.mark.slow
def test_64_streaming_clients_with_disconnects(smollm2_path):
    with ServerProcess(["--model", "smollm2-135m", "--kv-memory", "256MB", "--threads", "2"]) as server:
        rep = run_load_test(server.url, "smollm2-135m", clients=64, requests=2, max_tokens=8, disconnect_every=10)
        assert server.alive
    assert rep["errors"] == []
    assert rep["requests"] == 128 and rep["disconnected"] == 12 and rep["completed"] == 116
    assert rep["mismatches"] == []
    after = rep["after"]
    assert after["health"] == 200 and after["in_flight"] == 0
    assert after["kv_used"] == 0 and after["kv_cached"] > 0
