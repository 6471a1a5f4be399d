"""A tiny random Gemma 3 (Gemma3ForCausalLM, saved by transformers as an HF folder) against
transformers: what the real 270M file does not exercise -- an HF folder's norm weights (stored
as w, applied as 1 + w), an attention scale other than head_dim ** -0.5 (query_pre_attn_scalar),
final logit soft-capping -- and a window of 8 positions on the sliding layers, so a 40-token
prompt in chunks of 5 or 13 and its decode steps cross it many times. transformers runs eager
attention (its mask applies the window); logits must agree within 1e-3 at every step.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgellm.loading.load import load_model  # noqa: E402
from tiny_model import run_chunks, save_hf_folder  # noqa: E402

WINDOW, VOCAB = 8, 64
PROMPT_LEN, DECODE_STEPS = 40, 6
TOLERANCE = 1e-3
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


@pytest.fixture(scope="module")
def reference():
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=WINDOW,
        layer_types=LAYER_TYPES, query_pre_attn_scalar=32, final_logit_softcapping=5.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        initializer_range=0.3, attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).float().eval()
    with torch.no_grad():   # random norm weights: a missing or doubled "1 +" shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    return save_hf_folder(reference, tmp_path_factory.mktemp("gemma3"), VOCAB)


@pytest.fixture(scope="module")
def ids() -> list[int]:
    gen = torch.Generator().manual_seed(2)
    return torch.randint(3, VOCAB, (PROMPT_LEN + DECODE_STEPS,), generator=gen).tolist()


def test_config_from_the_folder(folder):
    cfg = load_model(str(folder)).config
    assert cfg.architecture == "gemma3"
    assert [cfg.layer_window(i) for i in range(3)] == [WINDOW, None, WINDOW]
    assert (cfg.rope_theta, cfg.rope_local_theta) == (10000.0, 10.0)
    assert (cfg.query_pre_attn_scalar, cfg.final_logit_softcapping) == (32.0, 5.0)
    assert cfg.tie_embeddings


@pytest.mark.parametrize("chunk", [PROMPT_LEN, 5, 13])
def test_prefill_and_decode_match_transformers(folder, reference, ids, chunk):
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]       # teacher-forced: every position
    loaded = load_model(str(folder))
    got = run_chunks(loaded.model, loaded.config, ids, PROMPT_LEN, chunk)
    for step, logits in enumerate(got):
        pos = PROMPT_LEN - 1 + step
        err = (logits - want[pos]).abs().max().item()
        assert err < TOLERANCE, f"chunks of {chunk}, position {pos}: logits differ by {err:.2e}"
