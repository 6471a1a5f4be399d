"""Robustness of the engine and the server (issue 14, items 5-7): every submitted request ends,
the event loop stays free while big requests are read and tokenised, the final text keeps a
trailing partial character, slow clients and foreign Host headers are refused. Engine tests run
the real default model; server tests talk to a real `edgellm serve` child process on 127.0.0.1."""

from __future__ import annotations

import pytest

from edgellm.runtime.engine import Engine
from edgellm.runtime.types import Request
from edgellm.sampling import SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):"]


# ---------------------------------------------------------------------------------------------
# 6. A submission that cannot be queued fails only itself
# ---------------------------------------------------------------------------------------------
def test_a_submission_that_fails_to_enqueue_fails_only_itself(llm):
    """Three submissions land in one inbox drain; the middle one's stop strings are made
    unusable after validation (a stand-in for any failure while it is queued). It ends with
    reason "error" and its handle raises; the others complete as they do alone."""
    params = SamplingParams.greedy(max_tokens=6)
    with Engine(llm, kv_memory="16MB") as eng:
        want = [eng.submit(Request(prompt=p, params=params)).result().token_ids for p in (PROMPTS[0], PROMPTS[2])]
    with Engine(llm, kv_memory="16MB") as eng:       # not started: nothing drains until a step
        bad_params = SamplingParams.greedy(max_tokens=6, stop=["x"])
        handles = [eng.submit(Request(prompt=PROMPTS[0], params=params)),
                   eng.submit(Request(prompt=PROMPTS[1], params=bad_params)),
                   eng.submit(Request(prompt=PROMPTS[2], params=SamplingParams.greedy(max_tokens=6)))]
        bad_params.stop = [17]          # not a string: building its stop checker raises
        assert handles[0].result().token_ids == want[0]
        assert handles[2].result().token_ids == want[1]
        with pytest.raises(TypeError):
            handles[1].result()
        assert handles[1].done
        assert eng.live_sessions() == []        # no ephemeral session left behind
        s = eng.session()                       # the engine goes on
        assert s.send("Hi", SamplingParams.greedy(max_tokens=2)).result().finish_reason in ("length", "stop")


# ---------------------------------------------------------------------------------------------
# 7. The decoder is flushed at the finish
# ---------------------------------------------------------------------------------------------
def test_a_length_finish_inside_a_character_keeps_it(llm):
    """The model writes emoji, each several byte tokens; cut after the second token (inside the
    first emoji), the result and the streamed pieces hold what decoding the tokens gives: a
    U+FFFD for the unfinished character, as a non-streaming decode writes it."""
    tok = llm.loaded.tokenizer
    with Engine(llm, kv_memory="16MB") as eng:
        h = eng.submit(Request(prompt="Emoji for happy: 😀😀", params=SamplingParams.greedy(max_tokens=2)))
        pieces = list(h)
        r = h.result()
    assert r.finish_reason == "length" and len(r.token_ids) == 2
    assert tok.decode(r.token_ids).endswith("\ufffd")         # the cut is inside a character
    assert r.text == tok.decode(r.token_ids) == "".join(pieces)
