"""Weights used as stored are read in place from a private mapping of the GGUF file (start-up:
no copy into fresh memory). Checked against gguf-py's reader and the kernel's own map of this
process (/proc/self/maps): the bytes are the file's, the memory is the file's mapping, and writing
to it leaves the file unchanged."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from edgellm.kernels import native
from edgellm.loading.gguf import read_gguf
from edgellm.loading.weights import load_gguf_weights

pytestmark = pytest.mark.skipif(native() is None, reason="the in-place path is the native kernels' path")


@pytest.fixture(scope="module")
def loaded(smollm2_path):
    gf = read_gguf(smollm2_path)
    return gf, load_gguf_weights(gf, gf.config())


KEPT = ("token_embd.weight", "blk.3.attn_output.weight", "blk.17.ffn_down.weight", "blk.0.ffn_down.weight")
FUSED = ("blk.3.attn_q.weight", "blk.3.attn_k.weight", "blk.3.attn_v.weight", "blk.3.ffn_gate.weight",
         "blk.3.ffn_up.weight")


@pytest.fixture(scope="module")
def reference(smollm2_path) -> dict[str, np.ndarray]:
    """The raw bytes of the tensors in KEPT as gguf-py reads them (one reader: it takes seconds)."""
    return {t.name: np.asarray(t.data).reshape(-1).view(np.uint8).copy()
            for t in gguf.GGUFReader(smollm2_path).tensors if t.name in KEPT + FUSED}


def _mapping_of(address: int) -> tuple[str, str]:
    """(permissions, path) of the mapping of this process that holds ``address``."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[1], (fields[5].strip() if len(fields) > 5 else "")
    raise AssertionError(f"address {address:#x} is in no mapping")


def test_kept_matrices_are_the_files_bytes_in_its_mapping(loaded, reference, smollm2_path):
    gf, w = loaded
    kept = {"token_embd.weight": w.embed, "blk.3.attn_output.weight": w.blocks[3].o,
            "blk.17.ffn_down.weight": w.blocks[17].down}
    for name, weight in kept.items():
        raw = weight.raw
        assert np.array_equal(raw.numpy().reshape(-1), reference[name]), name
        perms, where = _mapping_of(raw.data_ptr())
        assert where == str(smollm2_path.resolve()), f"{name} lives in {where or 'anonymous memory'}"
        assert perms.endswith("p"), f"{name}'s mapping is shared ({perms}), not private"


def _hf_row_order(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a GGUF q/k matrix in the checkpoint's order: llama.cpp's converter interleaves each
    head's two rotary halves (reshape to [heads, 2, half], swap), so undo that swap."""
    half = rows.shape[0] // n_heads // 2
    return rows.reshape(n_heads, half, 2, -1).swapaxes(1, 2).reshape(rows.shape)


def test_fused_matrices_are_copies_of_the_files_parts(loaded, reference):
    """q/k/v and gate/up are fused (q and k in the checkpoint's row order) into new memory, not
    the file's mapping, with the bytes gguf-py reads."""
    gf, w = loaded
    cfg = gf.config()
    per_row = w.blocks[3].qkv.raw.shape[1]
    parts = {name: reference[f"blk.3.{name}.weight"].reshape(-1, per_row) for name in
             ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")}
    qkv = np.concatenate([_hf_row_order(parts["attn_q"], cfg.n_heads), _hf_row_order(parts["attn_k"], cfg.n_kv_heads),
                          parts["attn_v"]])
    assert np.array_equal(w.blocks[3].qkv.raw.numpy(), qkv)
    assert np.array_equal(w.blocks[3].gate_up.raw.numpy(), np.concatenate([parts["ffn_gate"], parts["ffn_up"]]))
    for weight in (w.blocks[3].qkv, w.blocks[3].gate_up):
        _, where = _mapping_of(weight.raw.data_ptr())
        assert not where.endswith(".gguf")


def test_writing_to_an_in_place_matrix_leaves_the_file_unchanged(smollm2_path, reference):
    gf = read_gguf(smollm2_path)
    w = load_gguf_weights(gf, gf.config(), layers=range(0, 1), ends=False)
    t = gf.tensors["blk.0.ffn_down.weight"]
    with open(smollm2_path, "rb") as f:
        f.seek(t.offset)
        before = f.read(64)
    raw = w.blocks[0].down.raw
    raw.view(-1)[:64] = torch.from_numpy(np.frombuffer(before, dtype=np.uint8) ^ 0xFF)
    assert bytes(raw.view(-1)[:64].numpy()) != before        # this process sees its own write
    with open(smollm2_path, "rb") as f:
        f.seek(t.offset)
        assert f.read(64) == before                            # the file does not
    assert np.array_equal(reference[t.name][:64], np.frombuffer(before, dtype=np.uint8))
