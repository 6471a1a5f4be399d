"""Sampling: parameters, the batched sampler against hand-worked and Hugging Face references, stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from edgellm.errors import InvalidParameterError
from edgellm.sampling import (
    FINISH_LENGTH,
    FINISH_STOP,
    Sampler,
    SamplingParams,
    SequenceHistory,
    StopChecker,
    apply_penalties,
    kept_tokens,
)

HAND_PROBS = [0.5, 0.3, 0.15, 0.05]


def _hf():
    return pytest.importorskip("transformers.generation.logits_process")


def _draw(params: SamplingParams, logits_row: torch.Tensor, n: int, seed: int = 1234) -> torch.Tensor:
    """n independent draws from one row: the row repeated n times in one batch (unseeded rows)."""
    out = Sampler(seed=seed).sample(logits_row.expand(n, -1).contiguous(), [params] * n)
    return torch.tensor(out.token_ids)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


# ---- greedy ---------------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    out = Sampler().sample(logits, [SamplingParams.greedy()] * 6)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6
    # top_k=1 is greedy too, whatever the temperature
    out = Sampler().sample(logits, [SamplingParams(temperature=5.0, top_k=1)] * 6)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_plain_greedy_batch_is_one_argmax(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("plain greedy batch must not sort or softmax")

    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    for name in ("sort", "softmax", "log_softmax", "topk", "cumsum"):
        monkeypatch.setattr(torch, name, forbidden)
    out = Sampler().sample(logits, [SamplingParams.greedy()] * 4)
    assert out.token_ids == before.argmax(-1).tolist()
    assert torch.equal(logits, before)          # input not modified


def test_greedy_uses_penalised_logits():
    logits = torch.tensor([[3.0, 2.5, -1.0, 0.0]])
    hist = SequenceHistory([0], 4)              # token 0 in the prompt
    out = Sampler().sample(logits, [SamplingParams.greedy(repetition_penalty=1.5)], [hist])
    assert out.token_ids == [1]                 # 3.0/1.5 = 2.0 < 2.5
    assert Sampler().sample(logits, [SamplingParams.greedy()], [hist]).token_ids == [0]


def test_logit_bias_is_added_per_row_before_penalties():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(7))
    top = logits.argmax(-1).tolist()
    second = logits.topk(2, dim=-1).indices[:, 1].tolist()
    params = [SamplingParams.greedy(logit_bias={11: 100}), SamplingParams.greedy(logit_bias={top[1]: -100}),
              SamplingParams.greedy()]
    out = Sampler().sample(logits, params)
    assert out.token_ids == [11, second[1], top[2]]         # forced, banned, untouched
    before = logits.clone()
    out = Sampler().sample(logits, [SamplingParams.greedy(logit_bias={11: 100}, logprobs=True)] * 3)
    assert torch.equal(logits, before)                      # input not modified
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[11]))   # raw log-probs
    # the bias comes before the repetition penalty: 3.0 + 1.0 = 4.0, then /2 = 2.0 < 2.5
    row = torch.tensor([[3.0, 2.5, -1.0, 0.0]])
    p = SamplingParams.greedy(logit_bias={0: 1.0}, repetition_penalty=2.0)
    assert Sampler().sample(row, [p], [SequenceHistory([0], 4)]).token_ids == [1]


@pytest.mark.parametrize("bias,needle", [
    ({5: 101}, "[-100, 100]"), ({5: float("nan")}, "[-100, 100]"), ({-1: 1}, "token id"), ({"5": 1}, "token id"),
    ([5], "map"), ({i: 1 for i in range(301)}, "at most 300"),
])
def test_logit_bias_is_validated(bias, needle):
    with pytest.raises(InvalidParameterError, match=needle.replace("[", "\\[").replace("]", "\\]")):
        SamplingParams(logit_bias=bias)


# ---- temperature, top-k, top-p, min-p -----------------------------------------------------
def test_temperature_matches_softmax_of_scaled_logits():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    temperature, n = 0.6, 20000
    draws = _draw(SamplingParams(temperature=temperature), logits.view(1, -1), n)
    counts = torch.bincount(draws, minlength=6)
    chi2 = _chi_square(counts, torch.softmax(logits / temperature, -1))
    assert chi2 < 22.46, chi2                   # df=5, p=0.0005
    # the test has power: the same counts are far from the untempered distribution
    assert _chi_square(counts, torch.softmax(logits, -1)) > 500


def test_top_k_only_returns_top_k_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 64, generator=g)
    draws = _draw(SamplingParams(temperature=2.0, top_k=5), logits, 4000)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    assert set(draws.tolist()) == top5          # only the top 5, and each of them occurs


def test_top_k_matches_hf():
    lp = _hf()
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))
    for k in (2, 7, 49, 50, 80):
        ours = kept_tokens(logits, [SamplingParams(top_k=k)] * 8)
        theirs = torch.isfinite(lp.TopKLogitsWarper(k)(None, logits.clone()))
        assert torch.equal(ours, theirs), k


def test_top_p_hand_example_keeps_minimal_nucleus():
    logits = torch.tensor([HAND_PROBS]).log()
    # 0.5 + 0.3 reaches 0.8 exactly: the nucleus is the first two tokens
    for top_p, kept in ((0.8, [0, 1]), (0.5, [0]), (0.3, [0]), (0.81, [0, 1, 2]), (0.95, [0, 1, 2]),
                        (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])):
        mask = kept_tokens(logits, [SamplingParams(top_p=top_p)])
        assert mask[0].nonzero().flatten().tolist() == kept, top_p
    draws = _draw(SamplingParams(top_p=0.8), logits, 4000)
    counts = torch.bincount(draws, minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() / 4000 - 0.5 / 0.8) < 0.03          # renormalised 5:3


def test_top_p_matches_hf_convention():
    lp = _hf()
    # the hand example at the boundary, and random rows
    # the hand example at the boundary; random rows over a vocabulary wider than the first candidate
    # set (so that wide nuclei take the fallback path); top-k then top-p on the renormalised rest
    g = torch.Generator().manual_seed(4)
    rows = [torch.tensor([HAND_PROBS]).log(), torch.randn(16, 40, generator=g) * 2,
            torch.randn(6, 3000, generator=g) * torch.tensor([[0.3], [1.0], [2.0], [4.0], [8.0], [0.05]])]
    for logits in rows:
        for top_p in (0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99):
            ours = kept_tokens(logits, [SamplingParams(top_p=top_p)] * logits.shape[0])
            theirs = torch.isfinite(lp.TopPLogitsWarper(top_p)(None, logits.clone()))
            assert torch.equal(ours, theirs), top_p
            ours = kept_tokens(logits, [SamplingParams(top_k=20, top_p=top_p)] * logits.shape[0])
            theirs = lp.TopPLogitsWarper(top_p)(None, lp.TopKLogitsWarper(20)(None, logits.clone()))
            assert torch.equal(ours, torch.isfinite(theirs)), top_p


def test_min_p_hand_example():
    logits = torch.tensor([HAND_PROBS]).log()
    # min_p=0.2: threshold 0.2*0.5 = 0.1 -> drops 0.05; min_p=0.35: threshold 0.175 -> drops 0.15 too
    for min_p, kept in ((0.2, [0, 1, 2]), (0.35, [0, 1]), (0.7, [0]), (0.0, [0, 1, 2, 3])):
        mask = kept_tokens(logits, [SamplingParams(min_p=min_p)])
        assert mask[0].nonzero().flatten().tolist() == kept, min_p
        # the same on the candidate path, after a top-k that drops the last token
        mask = kept_tokens(logits, [SamplingParams(min_p=min_p, top_k=3)])
        assert mask[0].nonzero().flatten().tolist() == [t for t in kept if t < 3], min_p
    draws = _draw(SamplingParams(min_p=0.35), logits, 2000)
    assert set(draws.tolist()) == {0, 1}


def test_min_p_matches_hf():
    lp = _hf()
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(5)) * 2
    for min_p in (0.01, 0.1, 0.5):
        ours = kept_tokens(logits, [SamplingParams(min_p=min_p)] * 16)
        theirs = torch.isfinite(lp.MinPLogitsWarper(min_p)(None, logits.clone()))
        assert torch.equal(ours, theirs), min_p
        # after temperature and top-p, as HF chains them
        ours = kept_tokens(logits, [SamplingParams(temperature=0.7, top_p=0.9, min_p=min_p)] * 16)
        ref = lp.TemperatureLogitsWarper(0.7)(None, logits.clone())
        ref = lp.MinPLogitsWarper(min_p)(None, lp.TopPLogitsWarper(0.9)(None, ref))
        assert torch.equal(ours, torch.isfinite(ref)), min_p


def test_filters_compose_per_row():
    """Each row of one batch gets its own filters: a top-k row next to a min-p row and a greedy row."""
    logits = torch.tensor([HAND_PROBS]).log().expand(3, -1).contiguous()
    params = [SamplingParams(top_k=1 + 1, temperature=1.0), SamplingParams(min_p=0.35), SamplingParams.greedy()]
    seen = [set(), set(), set()]
    sampler = Sampler(seed=7)
    for _ in range(300):
        out = sampler.sample(logits, params)
        for row, tok in enumerate(out.token_ids):
            seen[row].add(tok)
    assert seen == [{0, 1}, {0, 1}, {0}]


# ---- penalties ------------------------------------------------------------------------------
def test_repetition_penalty_matches_hf():
    lp = _hf()
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(6)) * 3
    prompt, output = [3, 5, 5, 7, 12], [1, 3, 29]
    hist = SequenceHistory(prompt, 30)
    hist.seen_ids()                                    # build the state now, so append() must update it
    hist.extend(output)
    ours = apply_penalties(logits, [SamplingParams(repetition_penalty=1.3)], [hist])
    theirs = lp.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    assert torch.allclose(ours, theirs)
    assert not torch.allclose(ours, logits)            # the penalty did something, both signs present
    touched = ours != logits
    assert (logits[touched] > 0).any() and (logits[touched] < 0).any()


def test_presence_and_frequency_penalties_openai_formula():
    # logit[j] -= frequency * count[j] + presence * (count[j] > 0), over generated tokens only
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    hist = SequenceHistory([0, 3], 4)                  # prompt tokens do not count
    for t in (2, 2, 1):
        hist.append(t)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.3)
    ours = apply_penalties(logits, [params], [hist])
    expected = torch.tensor([[1.0, 2.0 - 0.3 * 1 - 0.5, 3.0 - 0.3 * 2 - 0.5, 0.5]])   # [1.0, 1.2, 1.9, 0.5]
    assert torch.allclose(ours, expected)
    # negative penalties encourage repetition
    ours = apply_penalties(logits, [SamplingParams(presence_penalty=-1.0)], [hist])
    assert torch.allclose(ours, torch.tensor([[1.0, 3.0, 4.0, 0.5]]))


def test_history_incremental_state_matches_rebuild():
    hist = SequenceHistory([4, 4, 9], 40)
    hist.seen_ids(), hist.output_counts()
    for t in [1, 1, 11, 4, 45] + list(range(40)) * 2:   # 45 is outside the logits' vocabulary: ignored
        hist.append(t)                                   # 40 distinct ids: the id tensors must grow
    fresh = SequenceHistory([4, 4, 9], 40)
    fresh.output_token_ids = list(hist.output_token_ids)
    expected_seen = [4, 9, 1, 11] + [t for t in range(40) if t not in (1, 4, 9, 11)]
    assert hist.seen_ids().tolist() == fresh.seen_ids().tolist() == expected_seen
    counts = dict(zip(*(t.tolist() for t in hist.output_counts())))
    assert counts == dict(zip(*(t.tolist() for t in fresh.output_counts())))
    assert counts[1] == 4 and counts[4] == 3 and counts[0] == 2 and 9 in counts and 45 not in counts
    assert len(counts) == 40


# ---- seeds ----------------------------------------------------------------------------------
def _step_logits(steps: int, vocab: int = 500) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    return [torch.randn(1, vocab, generator=g) for _ in range(steps)]


def _generate(params: SamplingParams, steps_logits, *, position: int = 0, others=(), sample_index: int = 0):
    """Run a sequence for len(steps_logits) steps at ``position`` in a batch with ``others``."""
    vocab = steps_logits[0].shape[1]
    sampler = Sampler()
    batch = list(others)
    batch.insert(position, params)
    hists = [SequenceHistory([1, 2, 3], vocab, sample_index=sample_index if i == position else 0)
             for i in range(len(batch))]
    g = torch.Generator().manual_seed(99)
    tokens = []
    for row_logits in steps_logits:
        logits = torch.randn(len(batch), vocab, generator=g)
        logits[position] = row_logits[0]
        out = sampler.sample(logits, batch, hists)
        for h, t in zip(hists, out.token_ids):
            h.append(t)
        tokens.append(out.token_ids[position])
    return tokens


def test_same_seed_same_tokens_different_seed_different():
    steps = _step_logits(12)
    a = _generate(SamplingParams(seed=42, temperature=1.5), steps)
    b = _generate(SamplingParams(seed=42, temperature=1.5), steps)
    c = _generate(SamplingParams(seed=43, temperature=1.5), steps)
    assert a == b
    assert a != c
    # sibling completions (n>1) of one seeded request differ, and each is reproducible
    s1 = _generate(SamplingParams(seed=42, temperature=1.5), steps, sample_index=1)
    assert s1 != a and s1 == _generate(SamplingParams(seed=42, temperature=1.5), steps, sample_index=1)


def test_seeded_tokens_independent_of_batch_composition():
    steps = _step_logits(10)
    params = SamplingParams(seed=7, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2)
    alone = _generate(params, steps)
    others = [SamplingParams(), SamplingParams.greedy(), SamplingParams(seed=1, min_p=0.1),
              SamplingParams(temperature=0.3, top_p=0.5, frequency_penalty=1.0, logprobs=True, top_logprobs=3)]
    crowded = _generate(params, steps, position=2, others=others)
    last = _generate(params, steps, position=4, others=others[::-1])
    assert alone == crowded == last


def test_sampler_seed_reproducible_for_unseeded_rows():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(9))
    params = [SamplingParams()] * 64
    assert Sampler(seed=3).sample(logits, params).token_ids == Sampler(seed=3).sample(logits, params).token_ids
    assert Sampler(seed=3).sample(logits, params).token_ids != Sampler(seed=4).sample(logits, params).token_ids


# ---- log-probabilities ------------------------------------------------------------------------
def test_logprobs_are_raw_log_softmax_and_top_sorted():
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(10)) * 2
    params = [SamplingParams(temperature=0.5, top_k=10, repetition_penalty=1.5, presence_penalty=1.0,
                             logprobs=True, top_logprobs=5),
              SamplingParams(),
              SamplingParams.greedy(logprobs=True)]
    hists = [SequenceHistory(list(range(50)), 200), None, None]
    hists[0].extend([int(logits[0].argmax())] * 3)
    out = Sampler(seed=0).sample(logits, params, hists)
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[0] == pytest.approx(raw[0, out.token_ids[0]].item(), abs=1e-6)
    top = out.top_logprobs[0]
    assert len(top) == 5
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    assert [t for t, _ in top] == torch.topk(raw[0], 5).indices.tolist()
    assert values == pytest.approx(torch.topk(raw[0], 5).values.tolist(), abs=1e-6)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.logprobs[2] == pytest.approx(raw[2].max().item(), abs=1e-6) and out.top_logprobs[2] == []


# ---- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": math.nan}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": -1}, "top_logprobs"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"seed": True}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"n": 0}, "n"),
])
def test_invalid_parameters_raise(kwargs, name):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kwargs)
    assert f"'{name}'" in str(info.value)
    assert info.value.fix


def test_valid_parameters_and_normalisation():
    p = SamplingParams(stop="END", seed=0, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                       top_logprobs=20, temperature=0)
    assert p.stop == ["END"] and p.is_greedy and p.wants_logprobs
    assert SamplingParams.greedy().temperature == 0.0
    assert SamplingParams.greedy(max_tokens=5).max_tokens == 5
    p = SamplingParams()
    p.temperature = -1.0
    with pytest.raises(InvalidParameterError, match="temperature"):
        p.validate()


# ---- stop strings ---------------------------------------------------------------------------
def _stream(chunks, stop=("END",), **kw):
    checker = StopChecker(stop=list(stop), **kw)
    emitted, reasons = [], []
    for i, chunk in enumerate(chunks):
        upd = checker.step(100 + i, chunk)
        emitted.append(upd.text)
        reasons.append(upd.finish_reason)
    return emitted, reasons, checker


def test_stop_string_over_every_chunking():
    text = "Hello END world"
    n = len(text)
    for cuts in range(1 << (n - 1)):               # every way to split the text into chunks
        bounds = [0] + [i + 1 for i in range(n - 1) if cuts >> i & 1] + [n]
        chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        emitted, reasons, checker = _stream(chunks)
        so_far = ""
        for piece in emitted:
            so_far += piece
            assert "Hello ".startswith(so_far), (chunks, so_far)   # never "Hello E", "Hello EN"
        assert so_far == "Hello "
        assert reasons.count(FINISH_STOP) == 1 and checker.finish_reason == FINISH_STOP
        assert all(r is None for r in reasons[reasons.index(FINISH_STOP) + 1:])


def test_partial_stop_prefix_is_released_when_it_cannot_complete():
    emitted, reasons, _ = _stream(["Hello E", "N", "x", " done"])
    assert emitted == ["Hello ", "", "ENx", " done"] and reasons == [None] * 4
    # earliest of several stop strings wins; overlapping candidates are held back
    for stop in (["cd", "bc"], ["bc", "cd"]):
        emitted, reasons, _ = _stream(["a b", "c", "d"], stop=stop)
        assert emitted == ["a ", "", ""] and reasons == [None, FINISH_STOP, None]
        emitted, reasons, _ = _stream(["x bcd y"], stop=stop)
        assert emitted == ["x "] and reasons == [FINISH_STOP]


def test_finish_by_token_and_length_flush_held_text():
    # EOS: held-back prefix is released, the EOS text is not
    checker = StopChecker(stop=["END"], eos_token_ids=[2])
    assert checker.step(5, "Hi E").text == "Hi "
    upd = checker.step(2, "</s>")
    assert (upd.text, upd.finish_reason, upd.stop_reason) == ("E", FINISH_STOP, 2)
    assert checker.emitted == "Hi E"
    # ignore_eos: EOS is an ordinary token; a stop token id still stops
    checker = StopChecker(eos_token_ids=[2], stop_token_ids=[7], ignore_eos=True)
    assert checker.step(2, "x").finish_reason is None
    assert checker.step(7, "y").finish_reason == FINISH_STOP
    # length: the last token's text and any held text are emitted
    checker = StopChecker.from_params(SamplingParams(max_tokens=2, stop=["END"]), eos_token_ids=[2])
    assert checker.step(5, "ab").finish_reason is None
    upd = checker.step(6, " EN")
    assert (upd.text, upd.finish_reason) == (" EN", FINISH_LENGTH)
    assert checker.step(7, "more").text == ""      # finished: input ignored


def test_stop_string_inside_one_chunk_truncates_rest():
    emitted, reasons, _ = _stream(["say ENDing now", "ignored"])
    assert emitted == ["say ", ""] and reasons == [FINISH_STOP, None]


def test_without_stop_strings_text_streams_unchanged():
    checker = StopChecker()
    assert [checker.step(5, c).text for c in ("He", "llo", " END")] == ["He", "llo", " END"]
    assert checker.emitted == "Hello END" and not checker.finished


def test_unsampleable_logits_raise():
    logits = torch.tensor([[0.0, 1.0], [-math.inf, -math.inf]])
    with pytest.raises(ValueError, match="NaN or all -inf"):
        Sampler().sample(logits, [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="NaN or all -inf"):
        Sampler().sample(torch.tensor([[math.nan, 1.0]]), [SamplingParams(top_p=0.9)])


@pytest.mark.parametrize("bad", [[math.nan, 1.0, 2.0], [1.0, math.inf, 2.0], [-math.inf, -math.inf, -math.inf],
                                 [3.0, math.nan, 9.0], [-math.inf, math.inf, math.nan]])
def test_plain_greedy_rows_that_cannot_be_sampled_fail_alone(bad):
    """An all-greedy batch takes one argmax pass (plain_greedy_picks); a row holding a NaN or +inf,
    or only -inf, must still fail by itself (errors="row") and the other rows get torch's argmax
    (the first maximum on ties), as the general path gives them."""
    good = [[0.5, 2.0, 2.0], [-math.inf, -1.0, -math.inf]]
    logits = torch.tensor([good[0], bad, good[1]])
    greedy = [SamplingParams(temperature=0.0)] * 3
    out = Sampler().sample(logits, greedy, errors="row")
    assert out.token_ids[0] == 1 and out.token_ids[2] == 1     # torch.argmax: the first of the tied 2.0
    assert out.token_ids[1] == -1 and list(out.failed) == [1]
    assert "NaN" in out.failed[1]
    clean = Sampler().sample(torch.tensor(good), greedy[:2])
    assert clean.token_ids == torch.tensor(good).argmax(dim=-1).tolist()
