"""A tiny random Mamba (transformers' MambaForCausalLM, saved as an HF folder) against transformers.

The reference is one transformers forward pass over the whole token sequence (its slow path: a
sequential scan, one position at a time): position p's logits are what a prompt ending at p
predicts. edgellm runs the same tokens through its StatePool: a 40-token prompt in chunks of 13
(so chunks start mid-block and cross block edges of 8), then decode steps one token at a time,
and a second sequence that starts from the first one's snapshot at a block edge (prefix reuse).
Logits must agree within 1e-3 (float32) at every step.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from recurrent_parity import (  # noqa: E402
    PROMPT_LEN,
    TOLERANCE,
    VOCAB,
    check_chunked_prefill_and_decode,
    check_resume_from_block_edge,
    reference_logits,
    token_ids,
)

from edgellm.errors import UnsupportedModelError  # noqa: E402
from edgellm.loading.load import load_model  # noqa: E402
from tiny_model import save_hf_folder  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4, time_step_rank="auto", use_bias=True, use_conv_bias=True,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg).float().eval()
    with torch.no_grad():   # random norms, skips and step sizes: every term of the mixer shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.normal_(1.0, 0.3)
            elif name.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            elif name.endswith("dt_proj.bias"):
                p.uniform_(-3.0, 0.5)
            elif name.endswith("in_proj.bias") or name.endswith("out_proj.bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    return save_hf_folder(reference, tmp_path_factory.mktemp("mamba"), VOCAB)


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return token_ids()


@pytest.fixture(scope="module")
def expected(reference, ids) -> torch.Tensor:
    return reference_logits(reference, ids)


def test_loads_as_a_recurrent_model(folder):
    loaded = load_model(str(folder))
    assert loaded.config.architecture == "mamba"
    assert loaded.model.recurrent
    assert loaded.model.state_shapes() == {"conv": (64, 3), "ssm": (64, 8)}


def test_chunked_prefill_and_decode_match_transformers(folder, ids, expected):
    check_chunked_prefill_and_decode(folder, ids, expected)


def test_resuming_from_a_block_edge_snapshot_matches(folder, ids, expected):
    check_resume_from_block_edge(folder, ids, expected)


def test_hidden_states_match_transformers(folder, reference, ids):
    loaded = load_model(str(folder))
    got = loaded.model.hidden_states(torch.tensor(ids[:PROMPT_LEN]))
    with torch.no_grad():
        want = reference.backbone(torch.tensor([ids[:PROMPT_LEN]]), use_cache=False).last_hidden_state[0]
    torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


def test_unknown_architecture_lists_the_recurrent_ones(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconMambaForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM"):
        load_model(str(tmp_path))


def test_a_missing_tensor_is_named(folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from edgellm.errors import ModelFormatError

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["backbone.layers.1.mixer.A_log"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="backbone.layers.1.mixer.A_log"):
        load_model(str(broken))
