"""Reading and writing GGUF files: the real SmolLM2 file, round trips, and damaged files."""

from __future__ import annotations

import dataclasses
import struct
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgellm.errors import EdgeLLMError, ModelFormatError, ModelNotFoundError, UnsupportedModelError
from edgellm.loading.gguf import GGUFFile, GGUFTensor, read_gguf, write_gguf
from edgellm.quant import gguf_blocks as gb

# ---------------------------------------------------------------------------------------------
# the real model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> GGUFFile:
    return read_gguf(smollm2_path)


def test_real_file_loads_lazily(smollm2_path):
    """Opening the file reads the header only: the tensors stay on disk (the pages of the file this
    process holds grow by far less than the file's size; no timing)."""
    before = _file_rss_kib()
    f = read_gguf(smollm2_path)
    grown = _file_rss_kib() - before
    assert grown * 1024 < f.file_size / 8, f"{grown / 1024:.0f} MiB of the file became resident"
    assert f.file_size == smollm2_path.stat().st_size
    assert f.version == 3 and f.alignment == 32
    t = f.tensors["token_embd.weight"]
    assert isinstance(t.data, np.memmap) and not t.data.flags.owndata and not t.data.flags.writeable
    assert t.data.dtype == np.uint8


def _file_rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return 0


def test_copy_bytes_is_exact_and_drops_the_file_pages(smollm2_path):
    """The loader's copy equals the file's bytes (checked against gguf-py's reader), and the
    piecewise copy leaves the tensor's file pages out of resident memory."""
    t = read_gguf(smollm2_path).tensors["token_embd.weight"]   # the largest tensor, ~30 MB
    before = _file_rss_kib()
    copy = t.copy_bytes(piece=1 << 20)
    after = _file_rss_kib()
    ref = gguf.GGUFReader(smollm2_path).get_tensor(
        [x.name for x in gguf.GGUFReader(smollm2_path).tensors].index("token_embd.weight"))
    assert copy.nbytes == t.nbytes == ref.data.nbytes
    assert np.array_equal(copy, np.asarray(ref.data).reshape(-1).view(np.uint8))
    assert after - before < 8 * 1024, f"{(after - before) / 1024:.0f} MiB of file pages stayed resident"


def test_copy_bytes_from_the_mapping_equals_the_file_read(smollm2_path):
    """Without its file's path (a tensor made from a mapping alone) the copy is made from the
    mapping, piece by piece; both ways give the bytes gguf-py reads."""
    t = read_gguf(smollm2_path).tensors["blk.3.ffn_down.weight"]
    mapped = dataclasses.replace(t, path=None).copy_bytes(piece=1 << 16)
    reader = gguf.GGUFReader(smollm2_path)
    ref = next(x for x in reader.tensors if x.name == "blk.3.ffn_down.weight")
    assert np.array_equal(mapped, np.asarray(ref.data).reshape(-1).view(np.uint8))
    assert np.array_equal(t.copy_bytes(), mapped)


def test_real_file_config(smollm2):
    cfg = smollm2.config()
    assert cfg.architecture == "llama"
    assert (cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads) == (30, 576, 9, 3)
    assert (cfg.ffn_size, cfg.vocab_size, cfg.head_dim) == (1536, 49152, 64)
    assert cfg.tie_embeddings is True
    assert cfg.rope_theta == 100000.0
    assert cfg.context_length == 8192


def test_real_file_tensors(smollm2):
    tensors = smollm2.tensors
    assert len(tensors) == 272
    assert Counter(t.ggml_type for t in tensors.values()) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert "output.weight" not in tensors
    # PyTorch order: (out_features, in_features)
    assert tensors["token_embd.weight"].shape == (49152, 576)
    assert tensors["blk.0.attn_q.weight"].shape == (576, 576)
    assert tensors["blk.0.attn_k.weight"].shape == (192, 576)
    assert tensors["blk.0.attn_v.weight"].shape == (192, 576)
    assert tensors["blk.0.ffn_gate.weight"].shape == (1536, 576)
    assert tensors["blk.0.ffn_up.weight"].shape == (1536, 576)
    assert tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
    assert tensors["output_norm.weight"].shape == (576,)
    for t in tensors.values():
        assert t.nbytes == gb.nbytes(t.ggml_type, t.n_elements)
        assert t.offset % smollm2.alignment == 0
        assert t.offset + t.nbytes <= smollm2.file_size
    w = tensors["blk.0.ffn_down.weight"].dequantize()
    assert w.dtype == torch.float32 and w.shape == (576, 1536)
    assert torch.isfinite(w).all() and 0 < float(w.abs().mean()) < 1


def test_real_file_metadata(smollm2):
    md = smollm2.metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 30 and isinstance(md["llama.block_count"], int)
    assert isinstance(md["llama.rope.freq_base"], float)
    assert md["tokenizer.ggml.add_bos_token"] is False
    tokens = md["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and len(tokens) == 49152 and all(isinstance(s, str) for s in tokens[:100])
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert md["tokenizer.ggml.token_type"][:3] == [3, 3, 3]
    assert md["tokenizer.ggml.merges"][0] == "Ġ t"
    assert md["tokenizer.ggml.bos_token_id"] == 1 and md["tokenizer.ggml.eos_token_id"] == 2
    assert "{% for message in messages %}" in md["tokenizer.chat_template"]
    assert smollm2.metadata_types["tokenizer.ggml.token_type"] == ("ARRAY", "INT32")
    assert smollm2.metadata_types["llama.block_count"] == "UINT32"


@pytest.mark.slow
def test_real_file_matches_gguf_reader(smollm2, smollm2_path):
    """Everything we parse equals what gguf.GGUFReader (slow: ~5 s) parses."""
    r = gguf.GGUFReader(smollm2_path)
    assert {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")} == smollm2.metadata
    for rt in r.tensors:
        t = smollm2.tensors[rt.name]
        assert t.shape == tuple(reversed(rt.shape.tolist())) and t.ggml_type == rt.tensor_type.name
        assert t.offset == rt.data_offset and t.nbytes == rt.n_bytes


# ---------------------------------------------------------------------------------------------
# writing, and round trips
# ---------------------------------------------------------------------------------------------

META = {
    "general.architecture": "llama",
    "general.name": "tiny",
    "llama.block_count": 1,
    "llama.context_length": 128,
    "llama.embedding_length": 64,
    "llama.feed_forward_length": 256,
    "llama.attention.head_count": 4,
    "llama.rope.freq_base": 10000.0,
    "tokenizer.ggml.tokens": ["a", "b", "c", "<s>"],
    "tokenizer.ggml.scores": [0.0, -1.5, -2.0, 0.0],
    "tokenizer.ggml.token_type": [1, 1, 1, 3],
    "tokenizer.ggml.add_bos_token": True,
    "dup.key.one": 1,
    "dup.key.two": 2,
    "neg.value": -5,
    "big.value": 1 << 40,
}


def tiny_tensors(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        ("tensor.alpha", rng.standard_normal((4, 64)).astype(np.float32), "Q8_0", (4, 64)),
        ("tensor.bravo", rng.standard_normal(64).astype(np.float32), "F32", (64,)),
        ("tensor.charl", torch.from_numpy(rng.standard_normal((2, 256)).astype(np.float32)), "Q4_K", (2, 256)),
    ]


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, META, tiny_tensors())
    return path


def test_write_read_roundtrip(tiny):
    f = read_gguf(tiny)
    assert f.metadata == META
    assert f.metadata_types["tokenizer.ggml.scores"] == ("ARRAY", "FLOAT32")
    assert f.metadata_types["tokenizer.ggml.token_type"] == ("ARRAY", "INT32")
    assert f.metadata_types["neg.value"] == "INT32" and f.metadata_types["big.value"] == "UINT64"
    assert f.metadata_types["tokenizer.ggml.add_bos_token"] == "BOOL"
    assert list(f.tensors) == ["tensor.alpha", "tensor.bravo", "tensor.charl"]
    for name, data, ggml_type, shape in tiny_tensors():
        t = f.tensors[name]
        assert (t.shape, t.ggml_type) == (shape, ggml_type)
        want = gb.quantize(np.asarray(data, dtype=np.float32).reshape(-1, shape[-1]), ggml_type)
        np.testing.assert_array_equal(np.asarray(t.data), want)
    np.testing.assert_array_equal(f.tensors["tensor.bravo"].dequantize().numpy(), tiny_tensors()[1][1])
    cfg = f.config()
    assert cfg.n_layers == 1 and cfg.vocab_size == 4 and cfg.tie_embeddings is True


def test_written_file_reads_in_gguf_reader(tiny):
    r = gguf.GGUFReader(tiny)
    assert r.fields["general.name"].contents() == "tiny"
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c", "<s>"]
    f = read_gguf(tiny)
    for rt in r.tensors:
        t = f.tensors[rt.name]
        assert t.ggml_type == rt.tensor_type.name and t.shape == tuple(reversed(rt.shape.tolist()))
        assert t.offset == rt.data_offset
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(rt.data).view(np.uint8).reshape(-1))


def test_roundtrip_real_metadata_and_raw_tensors(smollm2, tmp_path):
    """Copying real metadata (with its GGUF types) and raw quantised tensors is lossless."""
    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight"]
    out = tmp_path / "copy.gguf"
    write_gguf(out, smollm2.metadata,
               [(n, smollm2.tensors[n].data, smollm2.tensors[n].ggml_type, smollm2.tensors[n].shape) for n in names],
               metadata_types=smollm2.metadata_types)
    g = read_gguf(out)
    assert g.metadata == smollm2.metadata
    assert g.metadata_types == smollm2.metadata_types
    for n in names:
        a, b = smollm2.tensors[n], g.tensors[n]
        assert (a.shape, a.ggml_type) == (b.shape, b.ggml_type)
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))


def test_write_custom_alignment_and_raw_inputs(tmp_path):
    path = tmp_path / "aligned.gguf"
    raw = gb.quantize(np.ones((2, 32), np.float32), "Q4_0")
    write_gguf(path, {"general.architecture": "llama", "general.alignment": 64},
               [("a", raw.tobytes(), "Q4_0", (2, 32)), ("b", torch.from_numpy(raw.copy()), "Q4_0", (2, 32)),
                ("c", np.ones(3, np.float32), "F16", (3,))])
    f = read_gguf(path)
    assert f.alignment == 64
    assert all(t.offset % 64 == 0 for t in f.tensors.values())
    assert torch.equal(f.tensors["a"].dequantize(), torch.ones(2, 32))
    assert torch.equal(f.tensors["c"].dequantize(), torch.ones(3))


def test_write_failure_leaves_no_file(tmp_path):
    target = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="bytes"):
        write_gguf(target, META, [("x", np.zeros(10, np.uint8), "Q8_0", (32,))])
    assert list(tmp_path.iterdir()) == []

    def exploding():
        yield tiny_tensors()[0]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_gguf(target, META, exploding())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UnsupportedModelError):
        write_gguf(target, META, [("x", np.zeros(32, np.float32), "Q9_9", (32,))])
    with pytest.raises(ValueError, match="impossible"):
        write_gguf(target, META, [("x", np.zeros(32, np.float32), "Q4_K", (32,))])
    assert list(tmp_path.iterdir()) == []

    # an existing file survives a failed overwrite untouched
    write_gguf(target, META, tiny_tensors())
    before = target.read_bytes()
    with pytest.raises(ValueError):
        write_gguf(target, {"general.architecture": "llama", "bad": object()}, tiny_tensors())
    assert target.read_bytes() == before
    assert list(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------------------------

def tensor_info_pos(raw: bytes, name: str) -> dict[str, int]:
    """Byte positions of the fields of tensor ``name``'s info record in the header."""
    key = struct.pack("<Q", len(name)) + name.encode()
    p = raw.find(key)
    assert p > 0 and raw.find(key, p + 1) < 0
    p += len(key)
    n_dims = struct.unpack_from("<I", raw, p)[0]
    return {"n_dims": p, "dims": p + 4, "type": p + 4 + 8 * n_dims, "offset": p + 8 + 8 * n_dims,
            "end": p + 16 + 8 * n_dims}


def patched(path: Path, pos: int, fmt: str, value) -> Path:
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, pos, value)
    out = path.with_name("patched.gguf")
    out.write_bytes(bytes(raw))
    return out


def expect(exc, path: Path, match: str):
    with pytest.raises(exc, match=match) as info:
        read_gguf(path)
    assert str(path) in info.value.problem
    assert info.value.fix
    return info.value


def test_missing_path_and_directory(tmp_path):
    expect(ModelNotFoundError, tmp_path / "nope.gguf", "does not exist")
    expect(ModelNotFoundError, tmp_path, "directory")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    expect(ModelFormatError, p, "empty")


def test_wrong_magic(tiny, tmp_path):
    raw = tiny.read_bytes()
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + raw[4:])
    expect(ModelFormatError, p, "not a GGUF file")
    p.write_bytes(struct.pack("<Q", 100) + b'{"__metadata__": {}}')   # a safetensors file
    expect(ModelFormatError, p, "not a GGUF file")
    p.write_bytes(b"GG")
    expect(ModelFormatError, p, "not a GGUF file")


@pytest.mark.parametrize("version,match", [(1, "version 1"), (4, "version 4"), (0x03000000, "big-endian")])
def test_unsupported_version(tiny, version, match):
    expect(UnsupportedModelError, patched(tiny, 4, "<I", version), match)


def test_truncated_in_tensor_data(tiny):
    f = read_gguf(tiny)
    t = f.tensors["tensor.charl"]
    p = tiny.with_name("cut.gguf")
    p.write_bytes(tiny.read_bytes()[: t.offset + t.nbytes // 2])
    err = expect(ModelFormatError, p, "truncated")
    assert "tensor.charl" in err.problem


def test_truncated_anywhere_in_header(tiny, tmp_path):
    raw = tiny.read_bytes()
    data_offset = read_gguf(tiny).data_offset
    p = tmp_path / "cut.gguf"
    for cut in range(1, data_offset):
        p.write_bytes(raw[:cut])
        with pytest.raises(ModelFormatError) as info:
            read_gguf(p)
        msg = info.value.problem
        assert ("truncated" in msg) if cut >= 4 else ("not a GGUF file" in msg), (cut, msg)


def test_shape_larger_than_its_bytes(tiny):
    pos = tensor_info_pos(tiny.read_bytes(), "tensor.alpha")
    # 4 rows -> 5 rows of Q8_0: the tensor now runs into the next one
    err = expect(ModelFormatError, patched(tiny, pos["dims"] + 8, "<Q", 5), "overlaps")
    assert "tensor.alpha" in err.problem and "shape" in err.problem
    # the last tensor grows past the end of the file
    pos = tensor_info_pos(tiny.read_bytes(), "tensor.charl")
    err = expect(ModelFormatError, patched(tiny, pos["dims"] + 8, "<Q", 1000), "past the end")
    assert "tensor.charl" in err.problem


def test_row_not_a_multiple_of_block(tiny):
    pos = tensor_info_pos(tiny.read_bytes(), "tensor.alpha")
    err = expect(ModelFormatError, patched(tiny, pos["dims"], "<Q", 48), "block size")
    assert "Q8_0" in err.problem


@pytest.mark.parametrize("dim", [0, -1, 1 << 63])
def test_impossible_dims(tiny, dim):
    pos = tensor_info_pos(tiny.read_bytes(), "tensor.bravo")
    fmt = "<q" if dim < 0 else "<Q"
    expect(ModelFormatError, patched(tiny, pos["dims"], fmt, dim), "impossible shape")


@pytest.mark.parametrize("n_dims", [0, 5, 1 << 30])
def test_bad_dimension_count(tiny, n_dims):
    pos = tensor_info_pos(tiny.read_bytes(), "tensor.bravo")
    expect(ModelFormatError, patched(tiny, pos["n_dims"], "<I", n_dims), "dimensions")


def test_unknown_tensor_type(tiny):
    pos = tensor_info_pos(tiny.read_bytes(), "tensor.alpha")
    expect(UnsupportedModelError, patched(tiny, pos["type"], "<I", 99), "unknown tensor type id 99")


def test_known_but_unsupported_tensor_type(tiny):
    pos = tensor_info_pos(tiny.read_bytes(), "tensor.charl")
    p = patched(tiny, pos["type"], "<I", int(gguf.GGMLQuantizationType.Q3_K))
    expect(UnsupportedModelError, p, "Q3_K")
    f = read_gguf(p, allow_unsupported=True)
    assert f.tensors["tensor.charl"].ggml_type == "Q3_K"
    with pytest.raises(UnsupportedModelError, match="Q3_K"):
        f.tensors["tensor.charl"].dequantize()


def test_misaligned_tensor_offset(tiny):
    pos = tensor_info_pos(tiny.read_bytes(), "tensor.bravo")
    offset = struct.unpack_from("<Q", tiny.read_bytes(), pos["offset"])[0]
    expect(ModelFormatError, patched(tiny, pos["offset"], "<Q", offset + 4), "alignment")


def test_duplicate_tensor_names(tiny, tmp_path):
    raw = tiny.read_bytes()
    p = tmp_path / "dup.gguf"
    p.write_bytes(raw.replace(b"tensor.bravo", b"tensor.alpha"))
    expect(ModelFormatError, p, "'tensor.alpha' appears twice")


def test_duplicate_metadata_keys(tiny, tmp_path):
    p = tmp_path / "dup.gguf"
    p.write_bytes(tiny.read_bytes().replace(b"dup.key.two", b"dup.key.one"))
    expect(ModelFormatError, p, "'dup.key.one' appears twice")


def test_absurd_counts(tiny):
    expect(ModelFormatError, patched(tiny, 8, "<Q", 1 << 40), "tensors")
    expect(ModelFormatError, patched(tiny, 16, "<Q", 1 << 62), "metadata")


def test_unknown_metadata_value_type(tiny):
    raw = tiny.read_bytes()
    key = b"general.name"
    pos = raw.find(key) + len(key)
    assert struct.unpack_from("<I", raw, pos)[0] == 8   # STRING
    expect(ModelFormatError, patched(tiny, pos, "<I", 77), "unknown value type 77")


def test_huge_string_length(tiny):
    raw = tiny.read_bytes()
    key = b"general.name"
    pos = raw.find(key) + len(key) + 4
    expect(ModelFormatError, patched(tiny, pos, "<Q", 1 << 60), "truncated")


def test_bad_alignment(tmp_path):
    p = tmp_path / "a.gguf"
    write_gguf(p, {"general.architecture": "llama", "general.alignment": 32}, tiny_tensors())
    raw = p.read_bytes()
    pos = raw.find(b"general.alignment") + len(b"general.alignment") + 4
    expect(ModelFormatError, patched(p, pos, "<I", 24), "alignment")


def test_random_header_damage_only_raises_edgellm_errors(tiny, tmp_path):
    """Flipping random header bytes either still parses or raises an EdgeLLMError: never an
    IndexError, struct.error, UnicodeDecodeError, MemoryError... and never hangs."""
    raw = tiny.read_bytes()
    header = read_gguf(tiny).data_offset
    rng = np.random.default_rng(2024)
    p = tmp_path / "fuzz.gguf"
    outcomes = Counter()
    for _ in range(300):
        buf = bytearray(raw)
        for pos in rng.integers(4, header, rng.integers(1, 4)):
            buf[pos] = int(rng.integers(0, 256))
        p.write_bytes(bytes(buf))
        try:
            f = read_gguf(p)
            for t in f.tensors.values():
                t.dequantize()
            outcomes["ok"] += 1
        except EdgeLLMError as e:
            assert str(p) in e.problem
            outcomes[type(e).__name__] += 1
    assert outcomes["ModelFormatError"] > 0


def test_gguftensor_dequantize_matches_blocks(tiny):
    f = read_gguf(tiny)
    t = f.tensors["tensor.charl"]
    assert isinstance(t, GGUFTensor)
    assert torch.equal(t.dequantize(), gb.dequantize(t.data, "Q4_K", (2, 256)))


def _handmade(tmp_path: Path, body: bytes, n_tensors: int = 0, n_kv: int = 1) -> Path:
    p = tmp_path / "hand.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body)
    return p


def test_nested_arrays(tmp_path):
    def nested(depth: int) -> bytes:
        inner = struct.pack("<IQ", 0, 1) + b"\x07"            # [uint8 7]
        for _ in range(depth):
            inner = struct.pack("<IQ", 9, 1) + inner          # [ ... ]
        return struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9) + inner

    assert read_gguf(_handmade(tmp_path, nested(2))).metadata == {"k": [[[7]]]}
    expect(ModelFormatError, _handmade(tmp_path, nested(3000)), "nests arrays")


def test_header_only_file_without_tensors(tmp_path):
    body = struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<IQ", 8, 5) + b"llama"
    f = read_gguf(_handmade(tmp_path, body))
    assert f.tensors == {} and f.metadata == {"general.architecture": "llama"}


def test_non_utf8_strings_are_kept_recoverably(tmp_path):
    token = b"\xff\xfe"
    body = (struct.pack("<Q", 3) + b"tok" + struct.pack("<IIQ", 9, 8, 1) + struct.pack("<Q", 2) + token)
    f = read_gguf(_handmade(tmp_path, body))
    assert f.metadata["tok"][0].encode("utf-8", "surrogateescape") == token


# ---------------------------------------------------------------------------------------------
# the header cache (a large vocabulary is parsed once per file version)
# ---------------------------------------------------------------------------------------------

def _write_big_vocab_gguf(path: Path, words: list[str]) -> None:
    """A GGUF whose header (a 30k-string array) is over the cache's size threshold, written with
    gguf-py's own writer."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", words)
    w.add_uint32("test.count", len(words))
    w.add_tensor("t.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_header_cache_serves_the_same_file_and_never_a_changed_one(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "big.gguf"
    words = [f"w{i}-é" for i in range(30000)]
    _write_big_vocab_gguf(path, words)
    first = read_gguf(path)
    cached = list((tmp_path / "cache" / "edgellm" / "gguf-headers").iterdir())
    assert len(cached) == 1, "a header over the threshold is kept after its first parse"
    second = read_gguf(path)   # from the cache
    assert second.metadata == first.metadata
    assert second.metadata["tokenizer.ggml.tokens"] == words
    assert second.data_offset == first.data_offset
    assert np.array_equal(second.tensors["t.weight"].dequantize().numpy(),
                          np.arange(64, dtype=np.float32).reshape(2, 32))

    # rewritten in place with another vocabulary: the new file's header, not the cached one
    _write_big_vocab_gguf(path, words[:-1] + ["changed"])
    assert read_gguf(path).metadata["tokenizer.ggml.tokens"][-1] == "changed"
    ref = gguf.GGUFReader(str(path)).fields["test.count"]
    assert read_gguf(path).metadata["test.count"] == int(ref.parts[ref.data[0]][0]) == 30000

    # a damaged cache entry is parsed again, and replaced
    for entry in (tmp_path / "cache" / "edgellm" / "gguf-headers").iterdir():
        entry.write_bytes(b"\x00garbage")
    assert read_gguf(path).metadata["tokenizer.ggml.tokens"][-1] == "changed"


def test_small_headers_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "small.gguf"
    _write_big_vocab_gguf(path, ["a", "b"])
    assert read_gguf(path).metadata["tokenizer.ggml.tokens"] == ["a", "b"]
    assert not (tmp_path / "cache" / "edgellm" / "gguf-headers").exists()
