"""Perplexity (sliding windows) against a numpy computation from full logits, greedy agreement,
and `edgellm eval` through the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from edgellm.cli.main import main
from edgellm.kv.cache import KVCache
from edgellm.layers.attention import AttentionBatch
from edgellm.quality import agreement, greedy_continuations, match_fraction, perplexity
from tiny_model import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    from edgellm.loading.load import load_model

    path = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", smollm2_path, matrix_type="Q8_0",
                            context=128)
    return path, load_model(str(path))


def _np_window_nll(model, cfg, ids: list[int], begin: int, end: int, first: int) -> list[float]:
    """-log p(ids[t] | ids[begin:t]) for t in first..end-1, from one forward's full logits (numpy)."""
    n = end - begin
    cache = KVCache(cfg, -(-n // 16), 16)
    logits = model.forward(torch.tensor(ids[begin:end]), torch.arange(n), AttentionBatch.build([(n, n, slice(0, n))]),
                           cache, torch.arange(n)).double().numpy()
    out = []
    for t in range(first, end):
        row = logits[t - begin - 1]
        lse = row.max() + math.log(np.exp(row - row.max()).sum())
        out.append(lse - row[ids[t]])
    return out


def test_perplexity_matches_numpy_windows(tiny):
    _, loaded = tiny
    ids = loaded.tokenizer.encode("It is free software: you can redistribute it and/or modify it under the terms "
                                  "of the license, either version 3 of the License, or any later version. " * 3)
    n = len(ids)
    assert n > 100
    # one window: every token scored against all before it
    r = perplexity(loaded.model, loaded.config, ids[:100], context=128)
    ref = _np_window_nll(loaded.model, loaded.config, ids, 0, 100, 1)
    assert r.tokens == 99 and r.windows == 1
    assert r.perplexity == pytest.approx(math.exp(np.mean(ref)), rel=1e-5)
    # windows of 48 every 16 tokens: window w scores its last 16 tokens, each with >= 32 before it
    r = perplexity(loaded.model, loaded.config, ids, context=48, stride=16)
    nll = _np_window_nll(loaded.model, loaded.config, ids, 0, 48, 1)
    begin = 16
    while begin + 48 - 16 < n:
        end = min(begin + 48, n)
        nll += _np_window_nll(loaded.model, loaded.config, ids, begin, end, begin + 32)
        begin += 16
    assert r.tokens == n - 1 == len(nll)
    assert r.perplexity == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)


def test_agreement_measures():
    assert match_fraction([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [4, 0, 6]]) == pytest.approx(4 / 6)


def test_agreement_with_itself_and_with_a_degraded_model(tiny):
    from edgellm.loading.convert import convert_weights

    _, loaded = tiny
    prompts = [loaded.tokenizer.encode(p) for p in ("The capital of France is", "def f(x):", "Once upon a time")]
    refs = greedy_continuations(loaded, prompts, 8)
    same = agreement(loaded, prompts, refs)
    assert same["agreement"] == 1.0 and same["top1_agreement"] == 1.0
    ternary = convert_weights(loaded, "ternary")
    worse = agreement(ternary, prompts, refs)
    assert worse["top1_agreement"] < 0.9


def test_eval_perplexity_cli(tiny, tmp_path, capsys):
    path, _ = tiny
    corpus = tmp_path / "text.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    rc = main(["eval", "perplexity", "--model", str(path), "--corpus", str(corpus), "--context", "64",
               "--weights", "int8", "--kv-dtype", "int8", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    r = json.loads(out)
    assert r["weights"] == "int8" and r["kv_dtype"] == "int8" and r["tokens"] > 100
    assert 1 < r["perplexity"] < math.inf   # a random tiny model: no better bound


@pytest.mark.parametrize("args,needle", [
    (["--context", "1"], "--context must be at least 2"),
    (["--context", "4096"], "exceeds the model's context window"),
    (["--context", "64", "--stride", "64"], "--stride must be between"),
    (["--context", "64", "--corpus", "/nonexistent/text.txt"], "does not exist"),
    (["--weights", "int5"], "unknown weight format"),
    (["--kv-dtype", "fp4"], "unknown KV cache dtype"),
])
def test_eval_bad_input(args, needle, tiny, capsys):
    path, _ = tiny
    rc = main(["eval", "perplexity", "--model", str(path), *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle.lower() in err.lower(), err


def test_default_corpus_exists():
    from edgellm.quality import DEFAULT_CORPUS, read_corpus

    text = read_corpus()
    assert DEFAULT_CORPUS.endswith("GPL-3") and "GNU GENERAL PUBLIC LICENSE" in text and len(text) > 30000
