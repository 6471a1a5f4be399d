"""`edgellm bench --speculative`: the JSON and text reports, identical tokens, bad input, a missing
llama.cpp; llama.cpp's plain decoding and prompt lookup as peers (slow).

The fast real run is one tiny benchmark on the default model (one worker process: our engine with
and without speculation; llama.cpp pretends not to be installed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest

from edgellm.bench import harness, workloads
from edgellm.bench import speculative as specbench
from edgellm.cli.main import main


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def spec_run(smollm2_path):
    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "find_spec", lambda name: None if name == "llama_cpp" else real(name))
        rc, out, err = run_cli(["bench", "--model", str(smollm2_path), "--speculative", "ngram", "--workload",
                                "code-edit", "--gen-tokens", "16", "--repeat", "1", "--peers", "llama.cpp", "--json"])
    assert rc == 0, err
    return json.loads(out)


def test_json_has_the_fields(spec_run):
    s = spec_run
    assert s["workload"] == "code-edit" and s["speculative"] == "ngram" and s["draft_tokens"] == 7
    for key in ("decode_tok_s", "baseline_decode_tok_s", "speedup", "ttft_s", "baseline_ttft_s"):
        assert isinstance(s[key], float) and s[key] > 0, key
    assert s["speedup"] == s["decode_tok_s"] / s["baseline_decode_tok_s"]
    assert 0.0 <= s["acceptance_rate"] <= 1.0
    assert s["accepted"] <= s["proposed"]
    if s["verify_steps"]:
        # a verify step commits at least the target's own token and at most k + 1
        assert 1.0 <= s["tokens_per_verify_step"] <= s["draft_tokens"] + 1
    assert s["identical_tokens"] is True and s["mismatches"] == []
    st = s["settings"]
    assert st["max_gen_tokens"] == 16 and 1 <= st["completion_tokens"] <= 16 and st["prompt_tokens"] > 300
    assert len(s["repeats"]["ours"]) == 1 and len(s["repeats"]["ours-plain"]) == 1
    assert s["repeats"]["ours"][0]["completion_tokens"] == st["completion_tokens"]


def test_missing_llama_cpp_is_skipped_with_the_install_command(spec_run):
    peer = spec_run["peers"]["llama.cpp"]
    assert peer["status"] == "skipped" and "pip install llama-cpp-python" in peer["install"]


def test_text_report_renders(spec_run):
    buf = io.StringIO()
    specbench.format_report(spec_run, buf)
    text = buf.getvalue()
    assert "ours, ngram" in text and "ours, no speculation" in text and "speedup" in text
    assert "identical to plain output" in text and "llama.cpp skipped" in text


def _fake(variant, tok_s, ids, **extra):
    return {"variant": variant, "decode_tok_s": tok_s, "ttft_s": 0.5, "token_ids": ids, "completion_tokens": len(ids),
            **extra}


def _summary(spec_ids, peer=True):
    opts = specbench.SpecBenchOptions("ngram", peers=["llama.cpp"] if peer else [])
    info = {"model_name": "m", "model_path": "/m.gguf", "model_kind": "gguf", "architecture": "llama",
            "file_bytes": 1, "weight_bytes": 1, "weight_formats": ["q8_0"], "dtype": "float32", "kv_dtype": "fp32",
            "n_layers": 2, "completion_tokens": 4, "finish_reason": "stop", "speculative": "ngram"}
    spec = dict(proposed=6, accepted=3, verify_steps=2, verify_tokens=5)
    samples = {specbench.SPEC: [_fake("spec", 30.0, spec_ids, **spec), _fake("spec", 20.0, spec_ids, **spec)],
               specbench.PLAIN: [_fake("plain", 10.0, [1, 2, 3, 4]), _fake("plain", 10.0, [1, 2, 3, 4])],
               specbench.LLAMA: [_fake(None, 12.5, [1, 2, 9, 9])],
               specbench.LOOKUP: [_fake(None, 20.0, [1, 2, 9, 9])]}
    status = {"llama.cpp": {"status": "ok", "info": {}}}
    return specbench.summarize(opts, 7, info, 100, samples, status)


def test_summary_ratios_and_pooled_acceptance():
    s = _summary([1, 2, 3, 4])
    assert s["decode_tok_s"] == 25.0 and s["baseline_decode_tok_s"] == 10.0 and s["speedup"] == 2.5
    assert s["acceptance_rate"] == 0.5 and s["tokens_per_verify_step"] == 2.5
    peer = s["peers"]["llama.cpp"]
    assert peer["ours_over_plain"] == 2.0 and peer["ours_over_prompt_lookup"] == 1.25
    assert peer["prompt_lookup_speedup"] == 1.6 and peer["prompt_lookup_same_tokens_as_plain"] is True
    assert peer["same_tokens_as_ours"] == 2


def test_a_mismatch_is_reported_loudly():
    s = _summary([1, 2, 7, 4])
    assert s["identical_tokens"] is False
    assert s["mismatches"][0]["first_differing_token"] == 2
    buf = io.StringIO()
    specbench.format_report(s, buf)
    assert "MISMATCH" in buf.getvalue()


@pytest.mark.parametrize("argv, message", [
    (["--speculative", "ngram", "--workload", "poetry"], "unknown workload 'poetry'"),
    (["--speculative", "medusa"], "unknown speculative method 'medusa'"),
    (["--speculative", "early-exit:x"], "early-exit needs a number of blocks"),
    (["--speculative", "ngram", "--draft-tokens", "0"], "draft tokens must be an integer from 1 to"),
    (["--speculative", "ngram", "--peers", "transformers"], "no peer 'transformers'"),
    (["--speculative", "ngram", "--scenario", "sessions"], "does not go with --scenario sessions"),
    (["--workload", "chat"], "--workload and --draft-tokens go with --speculative"),
    (["--speculative", "ngram", "--gen-tokens", "0"], "--gen-tokens must be at least 1"),
])
def test_bad_input_exits_2_with_the_fix(argv, message):
    rc, out, err = run_cli(["bench", *argv])
    assert rc == 2
    assert message in err and "fix:" in err
    assert "Traceback" not in err


def test_workloads_are_shipped_and_sized():
    assert set(workloads.WORKLOADS) == {"code-edit", "summarize", "chat"}
    assert 40 <= len(workloads.CODE_EDIT_FUNCTION.splitlines()) <= 60
    assert 400 <= len(workloads.SUMMARIZE_DOCUMENT.split()) <= 600
    assert workloads.CODE_EDIT_FUNCTION in workloads.CODE_EDIT
    assert workloads.SUMMARIZE_DOCUMENT in workloads.SUMMARIZE


@pytest.mark.slow
def test_llama_cpp_plain_and_prompt_lookup(smollm2_path):
    pytest.importorskip("llama_cpp")
    rc, out, err = run_cli(["bench", "--model", str(smollm2_path), "--speculative", "ngram", "--workload",
                            "code-edit", "--gen-tokens", "24", "--repeat", "1", "--peers", "llama.cpp", "--json"])
    assert rc == 0, err
    s = json.loads(out)
    peer = s["peers"]["llama.cpp"]
    assert peer["status"] == "ok", peer
    assert peer["decode_tok_s"] > 0 and peer["prompt_lookup_decode_tok_s"] > 0
    assert peer["completion_tokens"] == s["settings"]["completion_tokens"]
    assert peer["same_tokens_as_ours"] >= 1
