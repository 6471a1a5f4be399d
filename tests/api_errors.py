"""The check every server test makes of an error answer: OpenAI's error shape, the right status."""

from __future__ import annotations


def assert_error(resp, status, param=None, code=None) -> dict:
    """``resp`` is a JSON error with this status, OpenAI's four fields and a message; ``param`` and
    ``code``, when given, as stated. Returns the error object."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err
