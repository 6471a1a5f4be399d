"""A tiny random Mamba-2 (transformers' Mamba2ForCausalLM, saved as an HF folder) against
transformers, as tests/test_mamba.py does for Mamba: two groups of heads (B and C shared within a
group), a 40-token prompt in chunks of 13 over blocks of 8, decode steps, and a second sequence
resuming from a block-edge snapshot in the same step as the first one's decode row. The
reference is one transformers pass over the whole sequence with its chunk length set to 1, so its
chunked algorithm degenerates to the plain recurrence. Logits within 1e-3 at every step.
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
    cfg = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                    num_heads=8, head_dim=8, n_groups=2, conv_kernel=4, chunk_size=1, use_bias=True,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(cfg).float().eval()
    with torch.no_grad():   # random norms, skips, decays and step sizes: every term shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.normal_(1.0, 0.3)
            elif name.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            elif name.endswith("dt_bias"):
                p.uniform_(-3.0, 0.5)
            elif name.endswith(("in_proj.bias", "out_proj.bias")):
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    return save_hf_folder(reference, tmp_path_factory.mktemp("mamba2"), VOCAB)


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return token_ids()


@pytest.fixture(scope="module")
def expected(reference, ids) -> torch.Tensor:
    return reference_logits(reference, ids)


def test_loads_as_a_recurrent_model(folder):
    loaded = load_model(str(folder))
    assert loaded.config.architecture == "mamba2" and loaded.model.recurrent
    assert not loaded.config.tie_embeddings
    assert loaded.model.state_shapes() == {"conv": (64 + 2 * 2 * 8, 3), "ssm": (8, 8, 8)}


def test_chunked_prefill_and_decode_match_transformers(folder, ids, expected):
    check_chunked_prefill_and_decode(folder, ids, expected)


def test_resuming_from_a_block_edge_snapshot_matches(folder, ids, expected):
    check_resume_from_block_edge(folder, ids, expected)
