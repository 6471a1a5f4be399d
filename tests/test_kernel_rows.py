"""Batch invariance of the native decode matmul: a row's result is bit-identical whatever the
number of rows it is computed with and wherever it sits among them.

Speculative decoding relies on it (a verify pass over k+1 rows must give exactly the logits of
k+1 one-row steps), and so does any promise that batching does not change a session's tokens.
The kernel gets it by computing every (weight row, activation row) pair with one fixed sequence
of operations, whatever tile the pair lands in (edgellm/kernels/gguf_cpu.cpp, matmul_range).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from edgellm.kernels import NATIVE_FORMATS, native

ext = native()
pytestmark = pytest.mark.skipif(ext is None, reason="native kernels unavailable on this machine")

MAX_ROWS = 33   # past the 8-row tiles of the many-row path (matmul_many) several times, and odd


def _matrix(fmt: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw blocks of a random [n, k] matrix in ``fmt`` (a native format code name), and the gguf
    package's dequantisation of the blocks it was made from (the independent reference)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    if fmt in ("Q4_KR", "Q6_KR"):   # K-quants, repacked for the kernels as at load time
        from edgellm.quant import gguf_blocks, repack

        kfmt = fmt[:-1]
        blocks = gguf_blocks.quantize(w, kfmt)
        ref = quants.dequantize(blocks.reshape(n, -1), GGMLQuantizationType[kfmt]).reshape(n, k)
        raw = torch.from_numpy(np.ascontiguousarray(blocks).view(np.uint8).reshape(n, -1))
        return repack.repack(raw, kfmt, n, k), torch.from_numpy(ref)
    blocks = quants.quantize(w, GGMLQuantizationType[fmt])
    ref = quants.dequantize(blocks, GGMLQuantizationType[fmt]).reshape(n, k)
    return torch.from_numpy(np.ascontiguousarray(blocks).view(np.uint8).reshape(n, -1)), torch.from_numpy(ref)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q4_KR", "Q6_KR"])
def test_block_matmul_rows_are_bit_identical_for_every_batch_size(fmt):
    # 100 output rows: not a multiple of the kernel's chunks of 8 weight rows, so short chunks
    # run too; K = 608 (19 blocks) or 768 (24: K-quants need multiples of 256) is cut into column
    # slices of 128 / rows blocks from 7 rows on, the last one short.
    n, k = 100, 512 + 256 if fmt.endswith("KR") else 608
    raw, ref = _matrix(fmt, n, k, seed=len(fmt))
    code = NATIVE_FORMATS[fmt]
    x = torch.randn(MAX_ROWS, k, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([ext.block_matmul(x[i:i + 1], raw, code, n) for i in range(MAX_ROWS)])
    # the independent reference: gguf's dequantised weights, products and sums in float64
    assert torch.allclose(alone.double(), x.double() @ ref.double().T, atol=1e-4, rtol=1e-4)
    for m in range(1, MAX_ROWS + 1):
        got = ext.block_matmul(x[:m], raw, code, n)
        assert torch.equal(got, alone[:m]), f"{m} rows: max diff {(got - alone[:m]).abs().max()}"
    # the same rows in another order: each row's result moves with it, bit for bit
    perm = torch.randperm(MAX_ROWS, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ext.block_matmul(x[perm], raw, code, n), alone[perm])
    # and the thread count (which changes how output rows are shared out, so where the chunks of
    # weight rows start, and at one row which weight rows are taken two at a time and which alone:
    # 3 threads get 33 / 33 / 34 of the 100) changes nothing, on the few-row and the many-row path
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            for m in (1, 3, 5, 16, MAX_ROWS):
                assert torch.equal(ext.block_matmul(x[:m], raw, code, n), alone[:m]), (t, m)
    finally:
        torch.set_num_threads(threads)


def test_fused_decode_step_rows_are_bit_identical_alone_and_in_a_batch(smollm2_path):
    """Every block of a decode step (the native decode_blocks call): the hidden state a sequence
    leaves with is the same bits whether it ran alone, as row 3 of 5 or as one of 16 sequences,
    and with 1 or 2 threads. Contexts run to 305 positions, so the longer rows' attention is cut
    into position ranges, which must depend on the row's own context only."""
    from edgellm.kv.cache import KVCache
    from edgellm.layers.attention import AttentionBatch
    from edgellm.loading.load import load_model

    model = load_model(str(smollm2_path)).model
    assert model.has_fused_decode
    span, n_seq = 320, 16
    contexts = [5 + 20 * i for i in range(n_seq)]                    # 5 .. 305 positions
    assert max(contexts) >= 256
    cache = KVCache(model.cfg, n_seq * span // 16, 16, torch.float32)
    cache.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))   # a history to attend to
    slots = [torch.arange(i * span, (i + 1) * span) for i in range(n_seq)]
    tokens = torch.randint(100, 40000, (n_seq,), generator=torch.Generator().manual_seed(4))

    def step(seqs: list[int], threads: int) -> torch.Tensor:
        """Hidden states after all blocks for a decode step of the sequences ``seqs``."""
        work = KVCache(model.cfg, cache.num_blocks, 16, torch.float32)
        work.data.copy_(cache.data)
        with torch.inference_mode():
            h = model.embed(tokens[seqs], None)
            rope = model.rope_tables(torch.tensor([contexts[s] - 1 for s in seqs]))
            batch = AttentionBatch.build([(1, contexts[s], slots[s]) for s in seqs])
            model.decode_blocks_fused(h, rope, batch, work, threads)
        return h

    alone = torch.cat([step([s], 2) for s in range(n_seq)])
    assert torch.equal(step(list(range(n_seq)), 2), alone)
    five = [9, 0, 14, 3, 7]                                            # sequence 3 as row 3 of 5
    assert torch.equal(step(five, 2), alone[five])
    assert torch.equal(step(five, 1), alone[five])
    assert torch.equal(step([3], 1), alone[3:4])
