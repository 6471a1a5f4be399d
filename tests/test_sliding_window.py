"""Sliding-window attention (Mistral's ``sliding_window``) against Hugging Face transformers.

A tiny random MistralForCausalLM with a window of 8 positions is built and saved by transformers;
edgellm loads the folder. The prompt (40 tokens) and the decode steps run well past the window, so
a model that ignored it (as edgellm did before) gives other logits -- checked first, so the 1e-3
comparisons can fail. transformers runs with ``attn_implementation="eager"``, whose mask applies
the window. Then the same with the prompt in chunks smaller and larger than the window, several
sequences in one step, and on a quantised GGUF whose decode steps take the fused native kernel.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgellm.kv.cache import KVCache  # noqa: E402
from edgellm.loading.load import load_model  # noqa: E402
from edgellm.runtime.model_runner import ModelRunner, SeqChunk  # noqa: E402
from tiny_model import run_chunks, save_hf_folder  # noqa: E402

WINDOW = 8
PROMPT_LEN, DECODE_STEPS = 40, 6
VOCAB = 64
TOLERANCE = 1e-3


def mistral_config(window: int | None):
    return transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=window,
        tie_word_embeddings=False, rms_norm_eps=1e-5, initializer_range=0.2, attn_implementation="eager")


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(mistral_config(WINDOW)).float().eval()


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    out = save_hf_folder(reference, tmp_path_factory.mktemp("mistral"), VOCAB)
    assert json.loads((out / "config.json").read_text())["sliding_window"] == WINDOW
    return out


@pytest.fixture(scope="module")
def ids() -> list[int]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(1, VOCAB, (PROMPT_LEN + DECODE_STEPS,), generator=gen).tolist()


@pytest.fixture(scope="module")
def want(reference, ids) -> torch.Tensor:
    """transformers' logits at every position (teacher-forced)."""
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0]


def test_the_window_changes_this_models_logits(reference, want, ids):
    """Without its window the same weights give other logits past position WINDOW: the
    comparisons below can fail if edgellm ignores the window."""
    full = transformers.MistralForCausalLM(mistral_config(None)).float().eval()
    full.load_state_dict(reference.state_dict())
    with torch.no_grad():
        diff = (full(torch.tensor([ids])).logits[0] - want).abs().amax(-1)
    assert diff[:WINDOW].max() < 1e-5               # inside the window the two agree
    assert diff[WINDOW + 2:].min() > 10 * TOLERANCE


@pytest.mark.parametrize("chunk", [PROMPT_LEN, 5, 13])
def test_prefill_and_decode_match_transformers(folder, want, ids, chunk):
    loaded = load_model(str(folder))
    assert loaded.config.sliding_window == WINDOW
    assert [loaded.config.layer_window(i) for i in range(2)] == [WINDOW, WINDOW]
    got = run_chunks(loaded.model, loaded.config, ids, PROMPT_LEN, chunk)
    for step, logits in enumerate(got):
        pos = PROMPT_LEN - 1 + step
        err = (logits - want[pos]).abs().max().item()
        assert err < TOLERANCE, f"chunks of {chunk}, position {pos}: logits differ by {err:.2e}"


def test_batched_decode_rows_of_different_lengths(folder, reference, ids):
    """Two sequences in one decode step, one past the window and one inside it: each row sees
    its own last WINDOW positions (the windowed history is padded per row)."""
    loaded = load_model(str(folder))
    short = ids[:5]
    with torch.no_grad():
        want_long = reference(torch.tensor([ids[:PROMPT_LEN + 1]])).logits[0, -1]
        want_short = reference(torch.tensor([short + [ids[PROMPT_LEN]]])).logits[0, -1]
    cache = KVCache(loaded.config, num_blocks=8)
    runner = ModelRunner(loaded.model, cache)
    a, b = slice(0, 64), slice(64, 128)
    with torch.inference_mode():
        runner.run([SeqChunk(ids[:PROMPT_LEN], 0, a), SeqChunk(short, 0, b)])
        got = runner.run([SeqChunk([ids[PROMPT_LEN]], PROMPT_LEN, a), SeqChunk([ids[PROMPT_LEN]], 5, b)])
    assert (got[0] - want_long).abs().max().item() < TOLERANCE
    assert (got[1] - want_short).abs().max().item() < TOLERANCE


def test_gguf_window_on_the_fused_decode_path(smollm2_path, tmp_path, ids):
    """A quantised GGUF with ``llama.attention.sliding_window``: its decode steps take the fused
    native kernel, which must apply the window as the per-layer path does -- and the window must
    matter (a copy without it gives other logits)."""
    from tiny_model import write_tiny_llama

    windowed = load_model(str(write_tiny_llama(tmp_path / "w.gguf", smollm2_path,
                                               overrides={"llama.attention.sliding_window": WINDOW})))
    plain = load_model(str(write_tiny_llama(tmp_path / "p.gguf", smollm2_path)))
    assert windowed.config.sliding_window == WINDOW and plain.config.sliding_window is None
    model = windowed.model
    if not model.has_fused_decode:
        pytest.skip("native kernels unavailable on this machine")
    fused = run_chunks(model, windowed.config, ids, PROMPT_LEN, 16, fused=True)
    per_layer = run_chunks(model, windowed.config, ids, PROMPT_LEN, 16, fused=False)
    full = run_chunks(plain.model, plain.config, ids, PROMPT_LEN, 16)
    for step, (a, b) in enumerate(zip(fused, per_layer)):
        assert (a - b).abs().max().item() < 1e-4, f"decode step {step}: fused and per-layer paths differ"
    assert max((a - c).abs().max().item() for a, c in zip(fused[1:], full[1:])) > 10 * TOLERANCE
