"""Robustness and security of the engine and the server (issue 14): one request cannot fail the
others, parameters are bounded, stop strings cost linear time, sessions are bounded and private,
chat content cannot inject control tokens. Engine tests run the real default model; server tests
talk to a real `edgellm serve` child process on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch

from edgellm.errors import EdgeLLMError, InvalidParameterError
from edgellm.llm import LLM
from edgellm.runtime.engine import Engine
from edgellm.runtime.types import Request
from edgellm.sampling import SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    torch.set_num_threads(2)
    return LLM(str(smollm2_path))


# ---------------------------------------------------------------------------------------------
# 1. One request cannot fail every request
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("repetition_penalty", 1e-50), ("repetition_penalty", 0.0), ("repetition_penalty", 1e9),
    ("temperature", 1e9), ("top_k", 2 ** 40), ("max_tokens", 2 ** 40), ("n", 10 ** 6),
])
def test_sampling_parameters_are_bounded(field, value):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**{field: value})
    assert field in e.value.problem and e.value.fix


def test_sampling_parameter_bounds_accept_their_edges():
    SamplingParams(repetition_penalty=0.01, temperature=100.0, top_k=2 ** 31 - 1, max_tokens=2 ** 31 - 1)
    SamplingParams(repetition_penalty=100.0)


def alone(llm, prompt, params: SamplingParams) -> list[int]:
    with Engine(llm, kv_memory="16MB") as eng:
        return eng.submit(Request(prompt=prompt, params=params)).result().token_ids


def test_a_row_that_cannot_be_sampled_fails_only_its_request(llm):
    """A row whose logits become NaN (a repetition penalty that is 0 in float32, set after
    validation as a stand-in for any non-finite row) ends with reason "error"; the rest of its
    batch -- greedy and seeded-sampled rows -- produce exactly what they produce alone."""
    greedy = SamplingParams.greedy(max_tokens=8)
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=1234)
    want = [alone(llm, PROMPTS[0], greedy), alone(llm, PROMPTS[1], seeded)]
    bad = SamplingParams(max_tokens=8, temperature=0.7, repetition_penalty=1.5)
    with Engine(llm, kv_memory="16MB") as eng:
        good = [eng.submit(Request(prompt=PROMPTS[0], params=SamplingParams.greedy(max_tokens=8))),
                eng.submit(Request(prompt=PROMPTS[1], params=SamplingParams(max_tokens=8, temperature=0.9,
                                                                             top_p=0.95, seed=1234)))]
        failing = eng.submit(Request(prompt=PROMPTS[2], params=bad))
        bad.repetition_penalty = 1e-50      # past validation: 0.0 in float32, so x / 0 -> inf -> NaN
        with pytest.raises(EdgeLLMError) as e:
            failing.result()
        assert "NaN" in e.value.problem or "finite" in e.value.problem
        assert eng.counts["finish_error"] == 1
        assert [h.result().token_ids for h in good] == want
        assert all(h.result().finish_reason in ("stop", "length") for h in good)


def test_failed_turn_is_not_added_to_the_session(llm):
    with Engine(llm, kv_memory="16MB") as eng:
        s = eng.session(system="You are terse.")
        bad = SamplingParams(max_tokens=4, temperature=0.7, repetition_penalty=1.5)
        h = s.send("Hello!", bad)
        bad.repetition_penalty = 1e-50
        with pytest.raises(EdgeLLMError):
            h.result()
        assert s.messages == [{"role": "system", "content": "You are terse."}]
        r = s.send("Hello!", SamplingParams.greedy(max_tokens=4)).result()
        assert r.finish_reason in ("stop", "length")
        assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]
        # a cancelled turn is not added either
        h = s.send("Tell me a long story.", SamplingParams.greedy(max_tokens=64))
        h.cancel()
        assert h.result().finish_reason == "cancelled"
        assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]


# ---------------------------------------------------------------------------------------------
# 2. Stop strings: bounded length, linear-time matching
# ---------------------------------------------------------------------------------------------
def test_stop_strings_total_length_is_bounded():
    from edgellm.sampling import MAX_STOP_LENGTH
    SamplingParams(stop=["x" * (MAX_STOP_LENGTH - 1), "y"])
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(stop=["x" * (MAX_STOP_LENGTH - 1), "yy"])
    assert "stop" in e.value.problem and str(MAX_STOP_LENGTH) in e.value.problem
    with pytest.raises(InvalidParameterError):
        SamplingParams(stop=["x" * 100_000])


def reference_stop(text: str, stops: list[str]) -> tuple[str, str, str | None]:
    """(released, held, stop hit) for all of ``text`` seen at once, by brute force."""
    hits = [(text.find(s), k) for k, s in enumerate(stops) if s in text]
    if hits:
        at, k = min(hits)
        return text[:at], "", stops[k]
    hold = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[:len(text) - hold], text[len(text) - hold:], None


def test_stop_checker_matches_a_brute_force_reference():
    import random

    from edgellm.sampling import StopChecker
    rng = random.Random(0)
    for trial in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        checker = StopChecker(stops)
        seen = ""
        for _ in range(rng.randint(1, 12)):
            piece = "".join(rng.choice("abc") for _ in range(rng.randint(0, 5)))
            upd = checker.feed_text(piece)
            seen += piece
            released, held, hit = reference_stop(seen, stops)
            assert checker.emitted == released, (stops, seen)
            assert checker.pending == held and len(held) < max(map(len, stops))
            assert upd.stop_reason == hit
            if hit is not None:
                break


def test_stop_checker_never_holds_more_than_the_longest_stop():
    from edgellm.sampling import StopChecker
    stop = "a" * 200 + "b"
    checker = StopChecker([stop])
    for i in range(1, 1001):       # a held suffix that never resolves
        checker.feed_text("a")
        assert checker.pending == "a" * min(i, 200)
    assert checker.feed_text("b").stop_reason == stop
    assert checker.emitted == "a" * 800
