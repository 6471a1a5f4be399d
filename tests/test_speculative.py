"""Speculative decoding gives the tokens of plain decoding: greedy token for token (real model,
every proposer), sampled in distribution (the acceptance rule against exact probabilities), with
stop strings, max_tokens, EOS and logprobs unchanged, and the KV books balanced afterwards."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgellm.errors import InvalidParameterError
from edgellm.loading.gguf import read_gguf
from edgellm.loading.load import load_model
from edgellm.runtime.engine import Engine
from edgellm.runtime.speculative import (
    AdaptiveDraft,
    NgramIndex,
    SpeculativeConfig,
    StepCosts,
    expected_tokens,
    parse_speculative,
)
from edgellm.sampling import Sampler, SamplingParams
from tiny_model import write_tiny_llama

CODE = '''def moving_average(values, window):
    """Return the moving averages of values over the given window."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''

PROMPTS = [
    [{"role": "user", "content": "Rewrite this function so that it also accepts a float window. "
                                 "Give the whole function.\n\n" + CODE}],
    [{"role": "user", "content": "Name three rivers in Europe."}],
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
]


def _generate(engine, prompt, params):
    return engine.generate([prompt], params, chat=isinstance(prompt, list))[0]


# ---- the parts, worked by hand ----------------------------------------------------------------
def test_ngram_index_proposes_what_followed_the_latest_longest_match():
    idx = NgramIndex(n_max=3)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    # the suffix (1, 2, 3) occurred at 0..2, followed by 4 5 9
    assert idx.propose(tokens, 3) == [4, 5, 9]
    tokens += [7]
    # suffix (2, 3, 7) occurred at 6..8, followed by 8 1 2
    assert idx.propose(tokens, 3) == [8, 1, 2]
    assert NgramIndex().propose([5, 6, 7], 4) == []          # nothing seen before


def test_expected_tokens_and_adaptive_choice():
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5.0
    costs = StepCosts()
    costs.record(1, 0.010)
    costs.record(5, 0.012)            # a verify pass of 5 rows costs 1.2 plain steps
    sure = AdaptiveDraft(alpha_hits=99.0, alpha_misses=1.0)
    assert sure.choose(4, costs, 1, 0.0) == 4
    hopeless = AdaptiveDraft(alpha_hits=0.0, alpha_misses=50.0)
    assert hopeless.choose(4, costs, 1, 0.0) == 0
    # a proposer costing a whole step per token never pays, however good it is
    assert AdaptiveDraft(alpha_hits=9.0, alpha_misses=1.0).choose(4, costs, 1, 1.0) == 0
    # one-row steps timed while the machine was busy, two-row passes later: more rows are never
    # taken as cheaper than one, so a proposer accepted 5% of the time stays off
    stale = StepCosts()
    stale.record(1, 3.0)
    stale.record(2, 0.5)
    assert stale.relative(2, 1) >= 1.05
    assert AdaptiveDraft(alpha_hits=1.0, alpha_misses=19.0).choose(4, stale, 1, 0.0) == 0


def test_parse_speculative_refuses_bad_specs():
    assert parse_speculative("ngram").method == "ngram"
    assert parse_speculative("early-exit:6", 3) == SpeculativeConfig("early-exit", 3, layers=6)
    assert parse_speculative(None) is None
    for bad in ("ngrams", "early-exit", "early-exit:x", "draft:", 7):
        with pytest.raises(InvalidParameterError):
            parse_speculative(bad)
    with pytest.raises(InvalidParameterError, match="draft tokens"):
        parse_speculative("ngram", 0)


def test_sampler_acceptance_rule_keeps_the_distribution():
    """Many draws of one row with a proposed token: the frequencies are the row's own
    probabilities (softmax after temperature and top-k), whatever the proposal."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=0.8, top_k=4, max_tokens=1)
    probs = torch.softmax(logits[0, :4] / 0.8, dim=-1).numpy()
    sampler = Sampler(seed=123)
    n = 20000
    for draft in (0, 2, 5):     # the likeliest, a middling one, one outside the top-k
        counts = np.zeros(6)
        for _ in range(n // 200):
            out = sampler.sample(logits.repeat(200, 1), [params] * 200, drafts=[draft] * 200)
            np.add.at(counts, out.token_ids, 1)
        assert counts[4:].sum() == 0
        freq = counts[:4] / n
        # 5 standard errors of a binomial frequency: fails by chance with p < 1e-5 per cell
        tol = 5 * np.sqrt(probs * (1 - probs) / n)
        assert np.all(np.abs(freq - probs) < tol), (draft, freq, probs)


# ---- the engine on the real model ---------------------------------------------------------------
def test_greedy_tokens_identical_to_plain_decoding(llm):
    plain = Engine(llm.loaded)
    params = SamplingParams.greedy(max_tokens=32)
    expected = [_generate(plain, prompt, params) for prompt in PROMPTS]
    for method in ("ngram", "early-exit:10"):
        spec = Engine(llm.loaded, speculative=method)
        for prompt, a in zip(PROMPTS, expected):
            b = _generate(spec, prompt, params)
            assert b.token_ids == a.token_ids, (method, prompt)
            assert b.text == a.text and b.finish_reason == a.finish_reason
        st = spec.stats()["speculative"]
        assert st["proposed"] > 0 and st["steps"] > 0, method
        spec.block_manager.check()
        assert spec.block_manager.num_used == 0      # every request finished: nothing held


def test_draft_model_gives_identical_tokens_and_refuses_another_vocabulary(llm, smollm2_path, tmp_path):
    plain = Engine(llm.loaded)
    # The target itself as its own draft: every proposal is right, the mechanics are all exercised.
    spec = Engine(llm.loaded, speculative=SpeculativeConfig("draft", 4, draft_model=str(smollm2_path),
                                                            adaptive=False))
    params = SamplingParams.greedy(max_tokens=24)
    for prompt in PROMPTS[:2]:
        a, b = _generate(plain, prompt, params), _generate(spec, prompt, params)
        assert b.token_ids == a.token_ids
        assert b.speculative["accepted"] == b.speculative["proposed"] > 0
    spec.block_manager.check()
    spec.speculator.draft_model.bm.check()
    assert spec.speculator.draft_model.bm.num_used == 0       # the draft's KV freed with its requests

    tokens = list(read_gguf(smollm2_path).metadata["tokenizer.ggml.tokens"])
    tokens[100], tokens[101] = tokens[101], tokens[100]
    other = write_tiny_llama(tmp_path / "other.gguf", smollm2_path, overrides={"tokenizer.ggml.tokens": tokens})
    with pytest.raises(InvalidParameterError, match="another vocabulary"):
        Engine(llm.loaded, speculative=f"draft:{other}")


def test_stop_strings_max_tokens_and_logprobs_as_without_speculation(llm):
    plain = Engine(llm.loaded)
    spec = Engine(llm.loaded, speculative=SpeculativeConfig("ngram", 6, adaptive=False))
    prompt = PROMPTS[0]
    full = _generate(plain, prompt, SamplingParams.greedy(max_tokens=60))
    stop = full.text[40:46]       # a stop string met inside a run of accepted proposals, likely
    for params in (SamplingParams.greedy(max_tokens=60, stop=[stop]),
                   SamplingParams.greedy(max_tokens=23),
                   SamplingParams.greedy(max_tokens=30, logprobs=True, top_logprobs=2)):
        a, b = _generate(plain, prompt, params), _generate(spec, prompt, params)
        assert (b.text, b.token_ids, b.finish_reason) == (a.text, a.token_ids, a.finish_reason)
        if params.logprobs:
            assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
            assert [[t for t, _ in top] for top in b.top_logprobs] == [[t for t, _ in top] for top in a.top_logprobs]
    assert spec.stats()["speculative"]["accepted"] > 0
    spec.block_manager.check()


@pytest.mark.parametrize("n", [6, pytest.param(16, marks=pytest.mark.slow)])
def test_batch_of_mixed_speculating_and_plain_sequences_matches_solo(llm, n):
    """One engine, n requests at once: copy-heavy ones speculate, others find nothing to
    propose; each gets the tokens it gets alone without speculation (16 in the slow run)."""
    prompts = []
    for i in range(n):
        if i % 2 == 0:
            prompts.append([{"role": "user", "content": f"Copy this text exactly:\n{CODE[:60 + 8 * i]}"}])
        else:
            prompts.append([{"role": "user", "content": f"Give one fact about the number {i}."}])
    params = SamplingParams.greedy(max_tokens=16)
    plain = Engine(llm.loaded)
    solo = [_generate(plain, p, params).token_ids for p in prompts]
    spec = Engine(llm.loaded, speculative="ngram")
    batch = spec.generate(prompts, params, chat=True)
    assert [r.token_ids for r in batch] == solo
    assert spec.stats()["speculative"]["accepted"] > 0
    spec.block_manager.check()
    assert spec.block_manager.num_used == 0


def test_sampled_tokens_follow_the_target_distribution(smollm2_path, tmp_path):
    """A tiny random model drafting for itself (greedy proposals, accepted about a third of the
    time at top-k 3): the second token's frequencies over many seeded requests match its exact
    marginal sum_t1 p(t1) p(t2 | t1), computed from plain (non-speculative) forward passes."""
    path = write_tiny_llama(tmp_path / "tiny.gguf", smollm2_path, seed=3)
    loaded = load_model(str(path))
    prompt = [1, 510, 2000, 77, 9001]
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=3, seed=s, ignore_eos=True) for s in range(800)]

    def dist(tokens: list[int]) -> dict[int, float]:
        plain = Engine(loaded)
        lp = plain.generate([tokens], SamplingParams.greedy(max_tokens=1, logprobs=True, top_logprobs=3))[0]
        top = lp.top_logprobs[0]
        w = torch.softmax(torch.tensor([v for _, v in top]), dim=0).tolist()
        return dict(zip([t for t, _ in top], w))

    p1 = dist(prompt)
    exact: dict[int, float] = {}
    for t1, w1 in p1.items():
        for t2, w2 in dist(prompt + [t1]).items():
            exact[t2] = exact.get(t2, 0.0) + w1 * w2
    spec = Engine(loaded, speculative=SpeculativeConfig("draft", 1, draft_model=str(path), adaptive=False),
                  kv_memory="64MB")
    results = spec.generate([prompt] * len(params), params)
    assert spec.stats()["speculative"]["proposed"] > 0
    counts: dict[int, int] = {}
    for r in results:
        counts[r.token_ids[1]] = counts.get(r.token_ids[1], 0) + 1
    n = len(results)
    assert set(counts) <= set(exact)
    # chi-square against the exact marginal; 0.999 quantile for up to 8 degrees of freedom is 26.1
    chi2 = sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in exact.items() if n * p > 0)
    assert chi2 < 26.1, (chi2, counts, exact)
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-6)


def test_grammar_constrained_request_speculates_to_the_same_output(llm):
    """A JSON-schema request under ngram speculation: its verify rows are sampled one at a time,
    each under the grammar state the tokens before it reached, so the output is plain decoding's."""
    from edgellm.grammar import Grammar

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "values": {
        "type": "array", "items": {"type": "integer"}}}, "required": ["name", "values"]}
    prompt = [{"role": "user", "content": 'Answer in JSON like {"name": "x", "values": [1, 2, 3, 1, 2, 3]}: '
                                          'name the sequence 1 2 3 repeated, with six values.'}]
    params = SamplingParams.greedy(max_tokens=40, grammar=Grammar.json_schema(schema))
    a = _generate(Engine(llm.loaded), prompt, params)
    spec = Engine(llm.loaded, speculative=SpeculativeConfig("ngram", 4, adaptive=False))
    b = _generate(spec, prompt, params)
    assert b.token_ids == a.token_ids
    json.loads(b.text)
    assert spec.stats()["speculative"]["proposed"] > 0
    spec.block_manager.check()


# ---- the CLI --------------------------------------------------------------------------------------
def test_generate_json_reports_speculation_and_refuses_bad_flags():
    base = [sys.executable, "-m", "edgellm", "generate", "--prompt", "one two three one two three one two",
            "--max-tokens", "12", "--threads", "2"]
    out = subprocess.run(base + ["--speculative", "ngram", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    spec = json.loads(out.stdout)["speculative"]
    assert spec["method"] == "ngram" and set(spec) == {"method", "proposed", "accepted", "steps"}
    bad = subprocess.run(base + ["--speculative", "magic"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown speculative method" in bad.stderr
    lone = subprocess.run(base + ["--draft-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert lone.returncode == 2 and "--draft-tokens needs --speculative" in lone.stderr


# ---- the server ---------------------------------------------------------------------------------
def test_server_with_speculation_answers_the_openai_client_and_counts_proposals(smollm2_path, llm):
    """`edgellm serve --speculative ngram`: the openai client's greedy chat reply is the plain
    engine's, and /metrics counts the proposed and accepted tokens."""
    import httpx
    import openai

    from edgellm.serve.process import ServerProcess

    messages = PROMPTS[0]
    expected = _generate(Engine(llm.loaded), messages, SamplingParams.greedy(max_tokens=40))
    with ServerProcess(["--model", str(smollm2_path), "--kv-memory", "32MB", "--threads", "2",
                        "--speculative", "ngram"]) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        r = client.chat.completions.create(model=str(smollm2_path), messages=messages, max_tokens=40, temperature=0)
        assert r.choices[0].message.content == expected.text
        metrics = httpx.get(s.url + "/metrics", timeout=30).text
    counts = {line.split()[0].split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode")}
    assert counts["vllm:spec_decode_num_draft_tokens_total"] > 0
    assert 0 < counts["vllm:spec_decode_num_accepted_tokens_total"] <= counts["vllm:spec_decode_num_draft_tokens_total"]
