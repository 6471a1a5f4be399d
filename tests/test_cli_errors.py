"""Bad input through the real command line: one clear message, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgellm.loading.gguf import read_gguf, write_gguf
from tiny_model import write_tiny_llama


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error:" in proc.stderr
    for needle in needles:
        assert needle.lower() in proc.stderr.lower(), proc.stderr


def test_missing_model_file(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "hi")
    assert_clean_error(proc, "nope.gguf")


def test_unknown_registry_name():
    proc = run_cli("generate", "--model", "no-such-model", "--prompt", "hi")
    assert_clean_error(proc, "smollm2-135m")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 200)
    assert_clean_error(run_cli("generate", "--model", str(bad), "--prompt", "hi"), "not a GGUF")


def test_truncated_gguf(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(smollm2_path.stat().st_size // 2))
    assert_clean_error(run_cli("generate", "--model", str(cut), "--prompt", "hi"), "cut.gguf")


def test_tensor_shape_contradicting_metadata(tmp_path, smollm2_path):
    path = write_tiny_llama(tmp_path / "shape.gguf", smollm2_path, bad_shape="blk.1.attn_output.weight")
    assert_clean_error(run_cli("generate", "--model", str(path), "--prompt", "hi"), "blk.1.attn_output.weight")


def test_missing_tensor(tmp_path, smollm2_path):
    path = write_tiny_llama(tmp_path / "missing.gguf", smollm2_path, drop="blk.0.ffn_up.weight")
    assert_clean_error(run_cli("generate", "--model", str(path), "--prompt", "hi"), "blk.0.ffn_up.weight")


def test_unsupported_architecture(tmp_path, smollm2_path):
    path = write_tiny_llama(tmp_path / "arch.gguf", smollm2_path, arch="rwkv6")
    assert_clean_error(run_cli("generate", "--model", str(path), "--prompt", "hi"), "rwkv6", "llama")


def test_prompt_longer_than_context(tmp_path, smollm2_path):
    path = write_tiny_llama(tmp_path / "ctx.gguf", smollm2_path, context=32)
    proc = run_cli("generate", "--model", str(path), "--prompt", "-", stdin="word " * 100)
    assert_clean_error(proc, "context window is 32")


@pytest.mark.parametrize("flag,value,needle", [
    ("--temperature", "-1", "temperature"),
    ("--top-p", "0", "top_p"),
    ("--top-k", "-3", "top_k"),
    ("--max-tokens", "0", "max_tokens"),
    ("--threads", "0", "threads"),
])
def test_invalid_sampling_parameter(smollm2_path, flag, value, needle):
    proc = run_cli("generate", "--model", str(smollm2_path), "--prompt", "hi", flag, value)
    assert_clean_error(proc, needle)


def test_tiny_random_model_generates(tmp_path, smollm2_path):
    """The same tiny file used above loads and runs when nothing is wrong with it."""
    path = write_tiny_llama(tmp_path / "ok.gguf", smollm2_path)
    proc = run_cli("generate", "--model", str(path), "--prompt", "hello", "--max-tokens", "4", "--temperature", "0",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # the same greedy request in this process, on the same file: the command prints its result
    from edgellm.llm import LLM
    from edgellm.sampling import SamplingParams

    ref = LLM(str(path)).generate("hello", SamplingParams.greedy(max_tokens=4))
    assert (out["token_ids"], out["text"], out["finish_reason"]) == (ref.token_ids, ref.text, ref.finish_reason)
    assert out["completion_tokens"] == len(ref.token_ids) and out["prompt_tokens"] == ref.prompt_tokens
    assert ref.finish_reason == ("length" if len(ref.token_ids) == 4 else "stop")


@pytest.mark.parametrize("key,value,needle", [
    ("llama.embedding_length", "64", "llama.embedding_length"),
    ("tokenizer.ggml.merges", [1, 2, 3], "tokenizer.ggml.merges"),
])
def test_metadata_of_the_wrong_type(tmp_path, smollm2_path, key, value, needle):
    """A string where a number belongs, integers where strings belong: one line naming the key, with
    the fix, and exit code 2 (it was a traceback: ValueError / AttributeError)."""
    path = write_tiny_llama(tmp_path / "meta.gguf", smollm2_path)
    f = read_gguf(path)
    meta, types = dict(f.metadata), dict(f.metadata_types)
    meta[key] = value
    types.pop(key)
    tensors = [(n, np.array(t.data), t.ggml_type, t.shape) for n, t in f.tensors.items()]
    write_gguf(path, meta, tensors, metadata_types=types)
    proc = run_cli("generate", "--model", str(path), "--prompt", "hi")
    assert_clean_error(proc, needle, "expected", "fix:")


def test_version():
    from edgellm import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"edgellm {__version__}"
    assert __version__ == "0.1.0"
