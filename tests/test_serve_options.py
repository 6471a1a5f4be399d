"""`edgellm serve` options beyond the defaults (issue 14, item 11): CORS for browser clients, and
the engine's own options (KV precision, preemption, disk tier). The real server in a child
process on 127.0.0.1, talked to with raw HTTP."""

from __future__ import annotations

import httpx
import pytest

from edgellm.serve.process import ServerProcess

MODEL = "smollm2-135m"
ALLOWED = "https://app.example:8443"


@pytest.fixture(scope="module")
def server(smollm2_path):
    with ServerProcess(["--model", MODEL, "--kv-memory", "32MB", "--threads", "2", "--cors-origin", ALLOWED,
                        "--cors-origin", "http://localhost:3000"]) as s:
        yield s
        assert s.alive, "the server died during the tests"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def preflight(http, origin: str) -> httpx.Response:
    return http.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_cors_preflight_from_an_allowed_origin_only(http):
    ok = preflight(http, ALLOWED)
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert preflight(http, "http://localhost:3000").headers["access-control-allow-origin"] == "http://localhost:3000"
    other = preflight(http, "https://evil.example")
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # the actual request: the allowed origin is named in the answer, another origin is not
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    r = http.post("/v1/completions", json=body, headers={"Origin": ALLOWED})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    r = http.post("/v1/completions", json=body, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_periodic_stats_line(smollm2_path):
    """--log-stats-interval: while requests run, one line of throughput, queue and KV use; idle, none.
    (Its own server: the stats line is logged at info, which the shared fixtures' servers leave out.)"""
    import time

    def lines(s):
        return [ln for ln in s.output().splitlines() if "generation throughput" in ln]

    with ServerProcess(["--model", MODEL, "--kv-memory", "16MB", "--threads", "2", "--log-stats-interval", "0.5",
                        "--log-level", "info"]) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        time.sleep(1.5)
        assert lines(s) == []                        # idle: quiet
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24,
                                            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while not lines(s) and time.monotonic() < deadline:
            time.sleep(0.2)
        line = lines(s)[-1]
        assert "prompt throughput" in line and "KV cache usage" in line and "running" in line, line
        assert max(float(ln.split("generation throughput ")[1].split(" tok/s")[0]) for ln in lines(s)) > 0


def test_no_cors_headers_without_the_option(smollm2_path):
    """The default: no --cors-origin, no CORS answer for any origin."""
    with ServerProcess(["--model", MODEL, "--kv-memory", "16MB", "--threads", "2"]) as s, \
            httpx.Client(base_url=s.url, timeout=60) as c:
        r = preflight(c, ALLOWED)
        assert "access-control-allow-origin" not in r.headers and r.status_code == 405


def test_engine_options_reach_the_engine(smollm2_path, llm, tmp_path):
    """--kv-dtype fp16 --preemption swap --offload-dir: the server starts, answers, and its pool
    holds fp16 KV (half the bytes per token of fp32); the startup line names the choices."""
    from edgellm.kv.cache import KVCache

    disk = tmp_path / "kv-disk"
    with ServerProcess(["--model", MODEL, "--kv-memory", "16MB", "--threads", "2", "--kv-dtype", "fp16",
                        "--preemption", "swap", "--offload-dir", str(disk)]) as s, \
            httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] and r.json()["usage"]["completion_tokens"] >= 1
        kv = c.get("/v1/runtime").json()["kv"]
        assert kv["bytes_per_token"] == KVCache.bytes_per_block(llm.cfg, 16, "fp16") / 16
        assert kv["bytes_per_token"] * 2 == KVCache.bytes_per_block(llm.cfg, 16, "fp32") / 16
        assert "KV fp16" in s.output() and "preemption swap" in s.output()
    assert disk.is_dir()                         # the disk tier's folder, made at start


@pytest.mark.parametrize("args,needle", [
    (["--kv-dtype", "fp4"], "unknown KV cache dtype"),
    (["--preemption", "sometimes"], "invalid choice: 'sometimes'"),
    (["--keep", "blk.0"], "--keep needs --weights"),
    (["--weights", "int5"], "unknown weight format"),
    (["--state-snapshots", "-1"], "--state-snapshots must be >= 0"),
])
def test_bad_engine_options_are_refused_before_loading(capsys, monkeypatch, args, needle):
    """Exit 2 with the reason, and the model is never loaded."""
    import edgellm.llm
    from edgellm.cli.main import main

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded despite a bad option")

    monkeypatch.setattr(edgellm.llm.LLM, "__init__", no_loading)
    try:
        code = main(["serve", *args])
    except SystemExit as exit_:             # argparse refuses a bad choice itself
        code = exit_.code
    assert code == 2
    assert needle in capsys.readouterr().err


def test_an_offload_dir_that_is_a_file_is_refused(capsys, tmp_path):
    from edgellm.cli.main import main

    f = tmp_path / "file"
    f.write_text("x")
    assert main(["serve", "--offload-dir", str(f)]) == 2
    assert "--offload-dir" in capsys.readouterr().err


@pytest.mark.parametrize("origin", ["app.example", "https://app.example/", "https://app.example/path", ""])
def test_bad_cors_origin_is_refused_before_loading(capsys, origin):
    from edgellm.cli.main import main

    assert main(["serve", "--cors-origin", origin]) == 2
    err = capsys.readouterr().err
    assert "--cors-origin" in err and "https://app.example:8080" in err
