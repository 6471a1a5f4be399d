"""`edgellm bench`: the JSON report, the text report, bad input, a missing peer; llama.cpp as a peer (slow).

The fast tests run the real benchmark once on the default model with tiny sizes (two worker
processes: ours and the bandwidth probe); the other fast checks fail before any worker starts,
except the context-window one, which needs the model's config (one ours worker).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest

from edgellm.bench import harness, worker
from edgellm.cli.main import main
from edgellm.errors import InvalidParameterError

REQUIRED = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "decode_ceiling_tok_s",
            "ceiling_fraction", "memory_bandwidth_gb_s")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_run(smollm2_path):
    """One tiny benchmark with --profile-decode and a peer that pretends not to be installed."""
    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "find_spec", lambda name: None if name == "transformers" else real(name))
        rc, out, err = run_cli(["bench", "--model", str(smollm2_path), "--prompt-tokens", "16", "--gen-tokens", "4",
                                "--repeat", "1", "--json", "--profile-decode", "3", "--peers", "transformers"])
    assert rc == 0, err
    return json.loads(out)


def test_json_has_positive_figures(tiny_run):
    for key in REQUIRED:
        assert isinstance(tiny_run[key], (int, float)) and tiny_run[key] > 0, key
    assert tiny_run["settings"]["prompt_tokens"] == 16 and tiny_run["settings"]["gen_tokens"] == 4
    # the weights plus the KV cache at the mean context (16 prompt + 4/2 generated tokens), by hand:
    # 30 layers x 3 KV heads x 64 dims x (K, V) x 4 bytes per token
    assert tiny_run["model"]["weight_bytes"] > 0
    assert tiny_run["bytes_per_decode_step"] == tiny_run["model"]["weight_bytes"] + 18 * 30 * 3 * 64 * 2 * 4
    expected = tiny_run["memory_bandwidth_gb_s"] * 1e9 / tiny_run["bytes_per_decode_step"]
    assert tiny_run["decode_ceiling_tok_s"] == pytest.approx(expected)
    assert tiny_run["ceiling_fraction"] == pytest.approx(tiny_run["decode_tok_s"] / expected)
    assert len(tiny_run["repeats"]["ours"]) == 1 and len(tiny_run["repeats"]["membw"]) == 1
    assert tiny_run["repeats"]["ours"][0]["completion_tokens"] == 4
    # 3 decode steps (4 tokens, the first from prefill), all counted by thread count
    assert sum(tiny_run["repeats"]["ours"][0]["decode_steps_by_threads"].values()) == 3


def test_memory_breakdown_adds_up_to_the_peak(tiny_run):
    mem = tiny_run["memory"]
    parts = ("runtime_mb", "weights_mb", "other_load_mb", "kv_mb", "generation_mb")
    assert sum(mem[k] for k in parts) == pytest.approx(mem["run_peak_mb"])
    # the process peak includes loading (VmHWM vs ru_maxrss: ~0.1 MB apart)
    assert mem["run_peak_mb"] <= tiny_run["peak_rss_mb"] + 1
    assert mem["weights_mb"] == pytest.approx(tiny_run["model"]["weight_bytes"] / 2**20)
    # 20 tokens of fp32 KV for 30 layers x 3 KV heads x 64 dims x (K, V) x 4 bytes, worked by hand
    assert mem["kv_mb"] == pytest.approx(20 * 30 * 3 * 64 * 2 * 4 / 2**20)
    assert mem["runtime_mb"] < mem["load_peak_mb"] <= tiny_run["peak_rss_mb"]
    assert tiny_run["peak_rss_mb"] == pytest.approx(max(mem["load_peak_mb"], mem["run_peak_mb"]), abs=2)


def test_missing_peer_is_skipped_with_the_install_command(tiny_run):
    peer = tiny_run["peers"]["transformers"]
    assert peer["status"] == "skipped"
    assert "pip install" in peer["install"]


def test_profile_decode_splits_the_step(tiny_run):
    prof = tiny_run["profile"]
    assert prof["steps"] == 3
    assert prof["step_ms_median"] > 0 and prof["matmul_calls_per_step"] > 0
    f = prof["fractions"]
    assert f["matmul"] > 0    # the lm_head at least
    assert f["attention"] > 0 or f["native_blocks"] > 0    # per-op path or the fused native one
    parts = ("matmul", "attention", "native_blocks", "other_in_forward", "outside_forward")
    assert sum(f[k] for k in parts) == pytest.approx(1.0)
    assert 0 <= f["lm_head"] <= f["matmul"]


def test_text_report_renders(tiny_run):
    buf = io.StringIO()
    harness.format_report(tiny_run, buf)
    text = buf.getvalue()
    assert "decode ceiling" in text and "transformers" in text and "skipped" in text
    assert "where a decode step's time goes" in text
    assert "over the bare process" in text


@pytest.mark.parametrize("argv, message", [
    (["--prompt-tokens", "0"], "--prompt-tokens must be at least 1"),
    (["--gen-tokens", "0"], "--gen-tokens must be at least 1"),
    (["--repeat", "0"], "--repeat must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--peers", "vllm"], "unknown peer 'vllm'"),
    (["--profile-decode", "0"], "--profile-decode must time at least 1 step"),
])
def test_bad_input_exits_2_with_the_fix(argv, message):
    rc, out, err = run_cli(["bench", *argv])
    assert rc == 2
    assert message in err and "fix:" in err
    assert "Traceback" not in err


def test_prompt_longer_than_the_context_exits_2(smollm2_path):
    rc, out, err = run_cli(["bench", "--model", str(smollm2_path), "--prompt-tokens", "9000", "--gen-tokens", "4",
                            "--repeat", "1", "--quiet"])
    assert rc == 2
    assert "context window of 8192 tokens" in err and "fix:" in err
    assert "Traceback" not in err


def test_parse_peers_aliases_and_errors():
    assert harness.parse_peers("transformers, llama.cpp") == ["transformers", "llama.cpp"]
    assert harness.parse_peers("hf,llamacpp,llama_cpp") == ["transformers", "llama.cpp"]
    assert harness.parse_peers("") == []
    with pytest.raises(InvalidParameterError):
        harness.parse_peers("transformers,mlc")


def test_prompt_ids_are_cut_to_exactly_n():
    def encode(text):  # one id per word: whatever the text, the builder must return n ids
        return [len(w) for w in text.split()]

    for n in (1, 17, 20000):
        ids, source = worker.prompt_ids(encode, n)
        assert len(ids) == n and source


@pytest.mark.slow
def test_llama_cpp_peer(smollm2_path):
    pytest.importorskip("llama_cpp")
    rc, out, err = run_cli(["bench", "--model", str(smollm2_path), "--prompt-tokens", "32", "--gen-tokens", "8",
                            "--repeat", "2", "--json", "--peers", "llama.cpp"])
    assert rc == 0, err
    s = json.loads(out)
    peer = s["peers"]["llama.cpp"]
    assert peer["status"] == "ok", peer
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "internal_decode_tok_s"):
        assert peer[key] > 0, key
    for key in harness.RATIO_METRICS:
        assert peer["ratio"][key] > 0, key
    assert peer["same_tokens_as_ours"] >= 1   # same prompt ids, same file: at least the first greedy token agrees


def test_progress_line_says_when_decode_fell_back_to_fewer_threads():
    r = {"prefill_tok_s": 700.0, "decode_tok_s": 50.0, "ttft_s": 0.7, "peak_rss_mb": 430.0,
         "decode_steps_by_threads": {"1": 100, "2": 27}, "decode_max_threads": 2}
    assert "decode steps by threads 1: 100, 2: 27" in harness._progress(0, 5, "ours", r)
    r["decode_steps_by_threads"] = {"2": 127}
    assert "decode steps by threads" not in harness._progress(0, 5, "ours", r)


def test_prompt_of_a_tokenizer_that_folds_repeats_is_refused_not_looped():
    # A word-level tokenizer with a tiny vocabulary maps any text to one <unk>: repeating the
    # text never makes the prompt longer, so asking for 64 tokens must fail with a message.
    with pytest.raises(InvalidParameterError, match="cannot be made"):
        worker.prompt_ids(lambda text: [0], 64)
    ids, source = worker.prompt_ids(lambda text: list(range(len(text.split()))), 5)
    assert ids == [0, 1, 2, 3, 4]
