"""`edgellm quantize` and `--weights`: files that load back and generate the same tokens as the
in-memory conversion, GGUF output bit-exact with gguf.quants, and bad input refused before any
work with no file left behind."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgellm.cli.main import main
from edgellm.kv.cache import KVCache
from edgellm.layers.attention import AttentionBatch
from tiny_model import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", smollm2_path, matrix_type="F32")


def _logits(loaded, ids):
    n = len(ids)
    cache = KVCache(loaded.config, -(-n // 16), 16)
    return loaded.model.forward(torch.tensor(ids), torch.arange(n), AttentionBatch.build([(n, n, slice(0, n))]),
                                cache, torch.arange(n))


def _cli(capsys, *args):
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# the first of each pair is written by `edgellm quantize`, the second converted at load time
@pytest.mark.parametrize("fmt,suffix", [("int8", "safetensors"), ("int4-g64-sym", "safetensors"),
                                        ("fp8-e5m2", "safetensors"), ("ternary", "safetensors"),
                                        ("q4_k", "safetensors"), ("q4_0", "gguf"), ("q8_0", "gguf")])
def test_quantized_file_loads_back_like_load_time_conversion(fmt, suffix, tiny, tmp_path, capsys):
    from edgellm.loading.convert import convert_weights
    from edgellm.loading.load import load_model

    out = tmp_path / f"m.{suffix}"
    # (a GGUF loads BF16 matrices as float32, so its kept matrices would compute differently)
    keep = ["blk.-1.ffn_down"] if suffix == "safetensors" else []
    rc, _, err = _cli(capsys, "quantize", "--model", str(tiny), "--format", fmt, *[f"--keep={k}" for k in keep],
                      "--out", str(out))
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]    # no temporary left
    from_file = load_model(str(out))
    in_memory = convert_weights(load_model(str(tiny)), fmt, keep)
    if keep:
        assert from_file.model.weights.blocks[-1].down.format == "bfloat16"
        assert from_file.model.weights.blocks[0].down.format == in_memory.model.weights.blocks[0].down.format
    ids = from_file.tokenizer.encode("The quick brown fox jumps over")
    a, b = _logits(from_file, ids), _logits(in_memory, ids)
    # GGUF keeps llama.cpp's q/k row order (a permutation: the same sums, another order)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 if suffix == "gguf" else 0)


def test_gguf_output_bit_exact_with_gguf_package(tiny, tmp_path, capsys):
    from gguf import GGMLQuantizationType, GGUFReader, quants

    from edgellm.loading.gguf import read_gguf

    out = tmp_path / "q.gguf"
    rc, _, err = _cli(capsys, "quantize", "--model", str(tiny), "--format", "q4_0", "--keep", "token_embd",
                      "--out", str(out))
    assert rc == 0, err
    src = read_gguf(tiny)
    reader = GGUFReader(str(out))
    checked = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            assert t.tensor_type == GGMLQuantizationType.BF16
        elif t.name.endswith(".weight") and len(t.shape) == 2:
            assert t.tensor_type == GGMLQuantizationType.Q4_0
            w = src.tensors[t.name].dequantize().reshape(src.tensors[t.name].shape).numpy()
            ref = quants.quantize(w, GGMLQuantizationType.Q4_0)
            assert np.array_equal(np.asarray(t.data).reshape(-1), ref.reshape(-1)), t.name
            checked += 1
    assert checked == 14
    assert int(reader.get_field("general.file_type").parts[-1][0]) == 2     # MOSTLY_Q4_0


def test_cli_round_trip_generates(tiny, tmp_path):
    """The real command line: quantize, then generate from the file (and at load time)."""
    out = tmp_path / "m.safetensors"
    run = lambda *a: subprocess.run([sys.executable, "-m", "edgellm", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=300)
    q = run("quantize", "--model", str(tiny), "--format", "int4", "--out", str(out), "--json")
    assert q.returncode == 0, q.stderr
    import json
    summary = json.loads(q.stdout)
    assert summary["format"] == "int4-g32" and summary["bytes"] == out.stat().st_size
    args = ["--prompt", "Hello", "--max-tokens", "6", "--json"]
    g1 = run("generate", "--model", str(out), *args)
    g2 = run("generate", "--model", str(tiny), "--weights", "int4", "--kv-dtype", "fp32", *args)
    assert g1.returncode == 0 and g2.returncode == 0, g1.stderr + g2.stderr
    r1, r2 = json.loads(g1.stdout), json.loads(g2.stdout)
    assert r1["completion_tokens"] == 6 and r1["token_ids"] == r2["token_ids"]
    assert r1["weights"] == "int4-g32" and r2["weights"] == "int4-g32"


# ---------------------------------------------------------------------------------------------
# bad input: refused before any work, nothing written

@pytest.mark.parametrize("args,needle", [
    (["--format", "int3"], "unknown weight format"),
    (["--format", "int4-g48"], "group size 48"),
    (["--format", "int4-g128"], "does not divide the width 64"),     # tiny hidden size: 64
    (["--format", "int4", "--keep", "blk.7"], "matches no weight matrix"),
    (["--format", "int4", "--keep", "attn_nothing"], "matches no weight matrix"),
    (["--format", "int8", "--out-suffix", ".gguf"], "GGUF has no tensor type"),
    (["--format", "int8", "--out-suffix", ".bin"], "must end in .gguf or .safetensors"),
])
def test_quantize_bad_input(args, needle, tiny, tmp_path, capsys):
    suffix = ".safetensors"
    if "--out-suffix" in args:
        i = args.index("--out-suffix")
        suffix, args = args[i + 1], args[:i] + args[i + 2:]
    out = tmp_path / ("m" + suffix)
    rc, _, err = _cli(capsys, "quantize", "--model", str(tiny), *args, "--out", str(out))
    assert rc == 2 and needle.lower() in err.lower(), err
    assert "fix:" in err
    assert list(tmp_path.iterdir()) == []


def test_generate_bad_precision_refused_before_loading(tiny, capsys, monkeypatch):
    import edgellm.loading.load as load

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(load, "load_model", no_load)
    for args, needle in ((["--weights", "q3_x"], "unknown weight format"),
                         (["--weights", "int4-g128"], "does not divide"),
                         (["--keep", "lm_head"], "--keep needs --weights"),
                         (["--weights", "int8", "--keep", "blk.5"], "matches no weight matrix"),
                         (["--kv-dtype", "int4"], "unknown KV cache dtype")):
        rc, _, err = _cli(capsys, "generate", "--model", str(tiny), "--prompt", "hi", *args)
        assert rc == 2 and needle.lower() in err.lower(), (args, err)


def test_fp8_refused_without_float8_types(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    out = tmp_path / "m.safetensors"
    rc, _, err = _cli(capsys, "quantize", "--model", str(tiny), "--format", "fp8", "--out", str(out))
    assert rc == 2 and "float8_e4m3fn" in err, err
    rc, _, err = _cli(capsys, "generate", "--model", str(tiny), "--prompt", "hi", "--kv-dtype", "fp8")
    assert rc == 2 and "float8_e4m3fn" in err, err
    assert list(tmp_path.iterdir()) == []


def test_failed_quantize_leaves_no_file(tiny, tmp_path, capsys, monkeypatch):
    """A failure half-way through the tensors (here: the 5th one) leaves neither the output nor
    a temporary file, and an existing file of that name is left untouched."""
    from edgellm.quant import gguf_blocks

    real, calls = gguf_blocks.quantize, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(*a, **k)
    monkeypatch.setattr(gguf_blocks, "quantize", failing)
    out = tmp_path / "m.gguf"
    with pytest.raises(OSError):
        main(["quantize", "--model", str(tiny), "--format", "q8_0", "--out", str(out)])
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"previous")
    calls.clear()
    with pytest.raises(OSError):
        main(["quantize", "--model", str(tiny), "--format", "q8_0", "--out", str(out)])
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == b"previous"
