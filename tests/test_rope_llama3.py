"""Llama-3.1 RoPE scaling (``rope_type: llama3``) against Hugging Face transformers.

A tiny random Llama with ``original_max_position_embeddings = 32`` is built and saved by
transformers; edgellm loads the folder, and its logits for an 80-token prompt (positions well past
32, where the scaled low frequencies matter) and a few decode steps must equal the reference
model's. The frequencies and cos/sin tables are compared with transformers' own ``llama3`` RoPE
initialisation. Two config.json layouts: the one Meta's Llama-3.1 checkpoints ship (``rope_theta``
and ``rope_scaling`` at the top level) and the one transformers >= 5 writes (``rope_parameters``).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgellm.kv.cache import KVCache  # noqa: E402
from edgellm.layers.rope import RotaryEmbedding, inverse_frequencies  # noqa: E402
from edgellm.loading.load import load_model  # noqa: E402
from edgellm.runtime.model_runner import ModelRunner, SeqChunk  # noqa: E402

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}
THETA = 20000.0         # head_dim 32: wavelengths 6.3 (kept), 11.7 and 21.7 (blended), 40 and up (divided by 8)
PROMPT_LEN, DECODE_STEPS = 80, 4
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tokenizer_files(smollm2_path, tmp_path_factory):
    """SmolLM2's tokenizer as a tokenizer.json folder (the model's vocabulary size is its)."""
    folder = tmp_path_factory.mktemp("tok")
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    tok.save_pretrained(str(folder))
    return folder, len(tok)


def hf_config(vocab: int, scaling: dict | None = SCALING):
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=THETA, rope_scaling=scaling,
        tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.2)


@pytest.fixture(scope="module")
def reference(tokenizer_files):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(hf_config(tokenizer_files[1])).float().eval()


@pytest.fixture(scope="module", params=["hub", "transformers5"])
def folder(request, reference, tokenizer_files, tmp_path_factory):
    """The reference saved by transformers, its config.json in the layout named by the param."""
    import shutil

    out = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(str(out))
    for f in tokenizer_files[0].iterdir():
        shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    if request.param == "hub":            # as in meta-llama/Llama-3.1-8B's config.json
        params = cfg.pop("rope_parameters", None) or {**cfg["rope_scaling"], "rope_theta": cfg["rope_theta"]}
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params
    else:
        assert "rope_parameters" in cfg, "this transformers writes the older layout: covered by 'hub'"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def ids_for(vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(100, vocab, (PROMPT_LEN + DECODE_STEPS,), generator=gen).tolist()


def test_scaling_matters_for_this_prompt(reference, tokenizer_files):
    """Without the scaling the reference gives other logits: the 1e-4 comparison below can fail."""
    plain = transformers.LlamaForCausalLM(hf_config(tokenizer_files[1], scaling=None)).float().eval()
    plain.load_state_dict(reference.state_dict())
    ids = torch.tensor([ids_for(tokenizer_files[1])])
    with torch.no_grad():
        diff = (plain(ids).logits - reference(ids).logits)[0].abs().amax(-1)
    assert diff[0] < TOLERANCE                        # position 0 is not rotated
    assert diff[PROMPT_LEN - 1:].min() > 100 * TOLERANCE


def test_frequencies_and_tables_match_transformers(folder, reference):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = load_model(str(folder)).config
    assert cfg.rope_theta == THETA
    assert cfg.rope_scaling is not None, "config.json's llama3 RoPE scaling was not read"
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](reference.config, "cpu")
    torch.testing.assert_close(inverse_frequencies(cfg), want.float(), rtol=1e-6, atol=0)
    positions = torch.tensor([0, 7, 31, 32, 33, 79, 200, 255])
    cos, sin = RotaryEmbedding(cfg).tables(positions)
    hf_rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(reference.config)
    hf_cos, hf_sin = hf_rope(torch.zeros(1, len(positions), 32), positions[None])
    torch.testing.assert_close(cos[:, 0], hf_cos[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(sin[:, 0], hf_sin[0], rtol=0, atol=1e-5)


def test_prefill_and_decode_logits_match_transformers(folder, reference, tokenizer_files):
    ids = ids_for(tokenizer_files[1])
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]          # teacher-forced: every position's logits
    loaded = load_model(str(folder))
    assert loaded.config.rope_scaling is not None, "config.json's llama3 RoPE scaling was not read"
    cache = KVCache(loaded.config, num_blocks=-(-len(ids) // 16))
    runner = ModelRunner(loaded.model, cache)
    slots = slice(0, cache.num_blocks * 16)
    with torch.inference_mode():
        got = [runner.run([SeqChunk(ids[:PROMPT_LEN], 0, slots)])[0]]
        for pos in range(PROMPT_LEN, len(ids) - 1):
            got.append(runner.run([SeqChunk([ids[pos]], pos, slots)])[0])
    for step, logits in enumerate(got):
        pos = PROMPT_LEN - 1 + step
        err = (logits - want[pos]).abs().max().item()
        assert err < TOLERANCE, f"position {pos}: logits differ by {err:.2e}"
