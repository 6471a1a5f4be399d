"""Constrained decoding below the server: edgellm.grammar (llguidance over the real SmolLM2
tokenizer) and the sampler's use of it -- masks, sampled and greedy rows, failures kept to their
row, parameters, the CLI's --json-schema."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from edgellm.errors import InvalidParameterError
from edgellm.grammar import Grammar, GrammarCompiler
from edgellm.sampling import Sampler, SamplingParams, SequenceHistory


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from edgellm.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, tok.vocab_size)


def test_builders_refuse_bad_input():
    for build, value in ((Grammar.json_schema, "not a dict"), (Grammar.json_schema, [1]), (Grammar.regex, 5),
                         (Grammar.lark, None), (Grammar.choice, []), (Grammar.choice, ["a", ""]),
                         (Grammar.choice, ["x"] * 300)):
        with pytest.raises(InvalidParameterError):
            build(value)
    with pytest.raises(InvalidParameterError, match="ignore_eos"):
        SamplingParams(grammar=Grammar.json_object(), ignore_eos=True)
    with pytest.raises(InvalidParameterError, match="grammar"):
        SamplingParams(grammar='{"type": "object"}')
    assert SamplingParams(grammar=Grammar.regex("a+")).constrained and not SamplingParams().constrained


@pytest.mark.parametrize("grammar,word", [(Grammar.json_schema({"type": "objekt"}), "objekt"),
                                          (Grammar.regex("(a"), "regex"),
                                          (Grammar.lark("start: missing_rule"), "missing_rule"),
                                          (Grammar.json_schema({"type": "string", "pattern": "[z-a]"}), "JSON schema")])
def test_compile_errors_say_what_is_wrong(compiler, grammar, word):
    with pytest.raises(InvalidParameterError) as info:
        compiler.compile(grammar)
    assert word in str(info.value) and "does not compile" in str(info.value)


def test_mask_allows_exactly_the_grammar(tok, compiler):
    """At each step the allowed tokens are those whose text extends the output within the regex;
    an allowed token decodes to such text and a forbidden one does not (checked over the vocabulary)."""
    pattern = r"(cat|dog)s? [0-9]{2}"
    c = compiler.constraint(Grammar.regex(pattern))
    whole = [f"{a}{s} {n:02d}" for a in ("cat", "dog") for s in ("", "s") for n in range(100)]
    prefixes = {w[:i] for w in whole for i in range(1, len(w) + 1)}
    texts = [tok.decode([t]) for t in range(tok.vocab_size)]
    text = ""
    for piece in ["cat", "s", " ", "4", "2"]:
        allowed = c.allowed()
        for t in range(tok.vocab_size):
            if t in tok.special_ids:
                continue
            assert bool(allowed[t]) == (text + texts[t] in prefixes and texts[t] != ""), (text, repr(texts[t]))
        for tid in tok.encode(piece, add_special_tokens=False):
            c.accept(tid)
        text += piece
    assert c.finished
    allowed = c.allowed()
    assert set(allowed.nonzero()[0].tolist()) == set(tok.eog_ids)     # complete: only the end
    with pytest.raises(ValueError):
        c.accept(tok.encode("x", add_special_tokens=False)[0])


def test_sampled_rows_follow_the_grammar_and_share_a_batch(tok, compiler):
    """Temperature sampling under a regex, many seeds: every output matches; an unconstrained row
    in the same batch samples exactly what it samples alone."""
    torch.manual_seed(0)
    vocab = tok.vocab_size
    g = Grammar.regex(r"[0-9]{3}-[a-z]{2}")
    sampler = Sampler(seed=1)
    p_free = SamplingParams(temperature=1.0, seed=99)
    for seed in range(12):
        p_con = SamplingParams(temperature=1.5, seed=seed, grammar=g)
        h_con = SequenceHistory([1], vocab, constraint=compiler.constraint(g))
        h_free, h_solo = SequenceHistory([1], vocab), SequenceHistory([1], vocab)
        out = []
        for _ in range(8):
            logits = torch.randn(2, vocab)
            r = sampler.sample(logits, [p_con, p_free], [h_con, h_free])
            s = Sampler(seed=1).sample(logits[1:], [p_free], [h_solo])
            assert r.token_ids[1] == s.token_ids[0]
            h_free.append(r.token_ids[1])
            h_solo.append(s.token_ids[0])
            if h_con.constraint.finished:
                assert r.token_ids[0] in tok.eog_ids
                break
            h_con.append(r.token_ids[0])
            out.append(r.token_ids[0])
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", tok.decode(out)), tok.decode(out)


def test_a_dead_grammar_fails_only_its_row(tok, compiler):
    """A matcher with no allowed token (forced into its error state) makes its row fail with a
    reason; the other rows of the batch are sampled as usual."""
    vocab = tok.vocab_size
    g = Grammar.regex("ab")
    c = compiler.constraint(g)
    c.matcher.consume_token(tok.encode("zzz", add_special_tokens=False)[0])     # not allowed: error state
    assert c.error
    logits = torch.randn(3, vocab)
    out = Sampler(seed=0).sample(logits, [SamplingParams.greedy()] * 3,
                                 [SequenceHistory([1], vocab), SequenceHistory([1], vocab, constraint=c), None],
                                 errors="row")
    assert list(out.failed) == [1] and "grammar allows no next token" in out.failed[1]
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[2] == int(logits[2].argmax())
    logits_copy = logits.clone()
    out = Sampler(seed=0).sample(logits[:1], [SamplingParams.greedy(grammar=g)],
                                 [SequenceHistory([1], vocab, constraint=compiler.constraint(g))])
    assert tok.decode(out.token_ids) in ("a", "ab")
    assert torch.equal(logits, logits_copy)          # the caller's logits are never written


def test_cli_generate_json_schema(smollm2_path, tmp_path):
    schema = {"type": "object", "additionalProperties": False, "required": ["colour", "count"],
              "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}}}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    run = subprocess.run([sys.executable, "-m", "edgellm", "generate", "--model", str(smollm2_path), "--chat",
                          "--prompt", "Pick a colour and a count.", "--json-schema", str(tmp_path / "s.json"),
                          "--max-tokens", "40", "--threads", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    value = json.loads(out["text"])
    assert set(value) == {"colour", "count"} and value["colour"] in ("red", "green", "blue")
    assert out["finish_reason"] == "stop"
    (tmp_path / "bad.json").write_text('{"type": "objekt"}')
    bad = subprocess.run([sys.executable, "-m", "edgellm", "generate", "--model", str(smollm2_path), "--prompt", "x",
                          "--json-schema", str(tmp_path / "bad.json"), "--threads", "2"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "objekt" in bad.stderr and "Traceback" not in bad.stderr
