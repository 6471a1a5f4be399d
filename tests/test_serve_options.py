"""`edgellm serve` options beyond the defaults: CORS for browser clients (issue 14, item 11). The
real server in a child process on 127.0.0.1, talked to with raw HTTP."""

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


def test_no_cors_headers_without_the_option(smollm2_path):
    """The default: no --cors-origin, no CORS answer for any origin."""
    with ServerProcess(["--model", MODEL, "--kv-memory", "16MB", "--threads", "2"]) as s, \
            httpx.Client(base_url=s.url, timeout=60) as c:
        r = preflight(c, ALLOWED)
        assert "access-control-allow-origin" not in r.headers and r.status_code == 405


@pytest.mark.parametrize("origin", ["app.example", "https://app.example/", "https://app.example/path", ""])
def test_bad_cors_origin_is_refused_before_loading(capsys, origin):
    from edgellm.cli.main import main

    assert main(["serve", "--cors-origin", origin]) == 2
    err = capsys.readouterr().err
    assert "--cors-origin" in err and "https://app.example:8080" in err
