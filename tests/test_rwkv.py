"""A tiny random RWKV-4 (transformers' RwkvForCausalLM, saved as an HF folder) against transformers,
as tests/test_mamba.py does for Mamba: a 40-token prompt in chunks of 13 over blocks of 8, decode
steps, and a second sequence resuming from a block-edge snapshot in the same step as the first
one's decode row. Seven blocks with ``rescale_every=3`` so the inference-time rescaling (weights
divided by 2^(i // 3), the residual halved after every third block) is exercised. The reference
is one transformers pass over the whole sequence (its CPU path: a sequential WKV loop). Logits
within 1e-3 at every step.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from recurrent_parity import (  # noqa: E402
    VOCAB,
    check_chunked_prefill_and_decode,
    check_resume_from_block_edge,
    reference_logits,
    token_ids,
)

from edgellm.loading.load import load_model  # noqa: E402
from tiny_model import save_hf_folder  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    cfg = transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=32, attention_hidden_size=24, intermediate_size=48,
                                  num_hidden_layers=7, rescale_every=3, context_length=128,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.RwkvForCausalLM(cfg).float().eval()
    with torch.no_grad():   # random mixes, decays, bonuses and norms: every term shows
        for name, p in model.named_parameters():
            if "time_mix" in name:
                p.uniform_(0.0, 1.0)
            elif name.endswith("time_decay"):
                p.uniform_(-2.0, 1.5)
            elif name.endswith("time_first"):
                p.uniform_(-1.0, 1.0)
            elif "ln" in name and name.endswith("weight"):
                p.normal_(1.0, 0.3)
            elif "ln" in name and name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    return save_hf_folder(reference, tmp_path_factory.mktemp("rwkv"), VOCAB)


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return token_ids()


@pytest.fixture(scope="module")
def expected(reference, ids) -> torch.Tensor:
    return reference_logits(reference, ids)


def test_loads_as_a_recurrent_model(folder):
    loaded = load_model(str(folder))
    assert loaded.config.architecture == "rwkv" and loaded.model.recurrent
    assert loaded.model.state_shapes() == {"att_x": (32,), "ffn_x": (32,), "num": (24,), "den": (24,), "max": (24,)}


def test_chunked_prefill_and_decode_match_transformers(folder, ids, expected):
    check_chunked_prefill_and_decode(folder, ids, expected)


def test_resuming_from_a_block_edge_snapshot_matches(folder, ids, expected):
    check_resume_from_block_edge(folder, ids, expected)
