"""Prefill attention in parts (edgellm.layers.attention.causal_attention) against attention worked
out directly: float64 scores over the positions each query may see (causal, and within a sliding
window where one is set), softmax, weighted values. Covers a fresh prompt, a chunk after cached
history, windows narrower and wider than a part, and query counts that are not a multiple of it."""

from __future__ import annotations

import math

import pytest
import torch

from edgellm.layers import attention
from edgellm.layers.attention import causal_attention


def direct(q, k, v, first: int, lo: int, window: int | None) -> torch.Tensor:
    """q [Tq, H, D] at positions first..; k, v [L, H, D] at positions lo..; -> [Tq, H, D] float64."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        pos = first + i
        seen = [j for j in range(k.shape[0]) if lo + j <= pos and (window is None or lo + j > pos - window)]
        scores = torch.einsum("hd,lhd->hl", q[i], k[seen]) / math.sqrt(q.shape[2])
        out[i] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v[seen])
    return out


@pytest.mark.parametrize("part", [64, 7])
@pytest.mark.parametrize("n_queries, first, lo, window", [
    (150, 0, 0, None),        # a fresh prompt, not a multiple of the part
    (90, 40, 0, None),        # a chunk after 40 cached positions
    (100, 0, 0, 30),          # a window narrower than a part
    (100, 0, 0, 80),          # a window wider than a part, narrower than the prompt
    (70, 50, 21, 30),         # after history, keys read from the first one a window can see
])
def test_parts_equal_direct_attention(monkeypatch, part, n_queries, first, lo, window):
    monkeypatch.setattr(attention, "PREFILL_QUERY_PART", part)
    g = torch.Generator().manual_seed(n_queries + first)
    H, D = 4, 16
    n_keys = first + n_queries - lo
    q = torch.randn(n_queries, H, D, generator=g)
    k = torch.randn(n_keys, H, D, generator=g)
    v = torch.randn(n_keys, H, D, generator=g)
    out = torch.empty(n_queries, H, D)
    as4d = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731  [1, H, T, D], the flash kernel's layout
    causal_attention(as4d(q), as4d(k), as4d(v), first, lo, window, out)
    torch.testing.assert_close(out.double(), direct(q, k, v, first, lo, window), rtol=1e-5, atol=1e-5)
