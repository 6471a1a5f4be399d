"""Model files with metadata of the wrong type or shapes that contradict it: each is refused by
``load_model`` with a ModelFormatError naming the key or tensor and what was expected, never a raw
TypeError/ValueError/KeyError and never later, at the first forward pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgellm.errors import EdgeLLMError, ModelFormatError
from edgellm.loading.gguf import read_gguf, write_gguf
from edgellm.loading.load import load_model
from edgellm.quant import gguf_blocks
from tiny_model import TINY, write_tiny_llama


def rewrite(path: Path, meta_changes: dict | None = None, tensor_changes: dict | None = None) -> Path:
    """Write ``path`` again with some metadata values (their GGUF types inferred from the new values)
    and some tensors ``name -> (data, ggml_type, shape)`` replaced."""
    f = read_gguf(path)
    meta = dict(f.metadata)
    types = dict(f.metadata_types)
    for key, value in (meta_changes or {}).items():
        meta[key] = value
        types.pop(key, None)
    tensors = [(name, np.array(t.data), t.ggml_type, t.shape) for name, t in f.tensors.items()]
    tensors = [(name, *tensor_changes[name]) if name in (tensor_changes or {}) else (name, *rest)
               for name, *rest in tensors]
    del f
    write_gguf(path, meta, tensors, metadata_types=types)
    return path


def refused(spec, *needles: str) -> ModelFormatError:
    """``load_model(spec)`` raises a ModelFormatError whose message holds every needle."""
    with pytest.raises(EdgeLLMError) as info:
        load_model(str(spec))
    err = info.value
    assert isinstance(err, ModelFormatError), f"{type(err).__name__}: {err}"
    for needle in needles:
        assert needle.lower() in str(err).lower(), str(err)
    assert err.fix, "the error says what to do"
    return err


@pytest.fixture
def tiny(tmp_path, smollm2_path) -> Path:
    return write_tiny_llama(tmp_path / "tiny.gguf", smollm2_path)


def test_the_tiny_model_itself_loads(tiny):
    assert load_model(str(tiny)).config.hidden_size == TINY["hidden"]


# ---- metadata of the wrong type ---------------------------------------------------------------

@pytest.mark.parametrize("key,value,needles", [
    ("llama.embedding_length", "64", ["llama.embedding_length", "string", "positive integer"]),
    ("llama.block_count", 2.0, ["llama.block_count", "float", "positive integer"]),
    ("llama.context_length", math.nan, ["llama.context_length", "nan", "positive integer"]),
    ("llama.context_length", -64, ["llama.context_length", "-64", "positive integer"]),
    ("llama.context_length", 0, ["llama.context_length", "is 0", "positive integer"]),
    ("llama.attention.head_count", [4, 4], ["llama.attention.head_count", "array", "positive integer"]),
    ("llama.rope.freq_base", math.inf, ["llama.rope.freq_base", "inf", "finite positive number"]),
    ("llama.attention.layer_norm_rms_epsilon", "1e-5", ["layer_norm_rms_epsilon", "string", "number"]),
])
def test_gguf_number_of_the_wrong_type(tiny, key, value, needles):
    refused(rewrite(tiny, {key: value}), *needles)


def test_gguf_architecture_as_an_array(tiny):
    refused(rewrite(tiny, {"general.architecture": ["llama", "llama"]}),
            "general.architecture", "array of 2 items", "expected a string")


def test_gguf_chat_template_as_an_array(tiny):
    """It used to be dropped silently, the ChatML fallback taking its place."""
    refused(rewrite(tiny, {"tokenizer.chat_template": ["{{ messages }}", "x"]}),
            "tokenizer.chat_template", "expected a string")


def test_gguf_integer_merges(tiny):
    refused(rewrite(tiny, {"tokenizer.ggml.merges": [1, 2, 3]}),
            "tokenizer.ggml.merges", "item 0", "int", "array of strings")


@pytest.mark.parametrize("key,value,needle", [
    ("tokenizer.ggml.model", 2, "tokenizer.ggml.model"),
    ("tokenizer.ggml.bos_token_id", "1", "tokenizer.ggml.bos_token_id"),
    ("tokenizer.ggml.token_type", [1.5] * 3, "tokenizer.ggml.token_type"),
])
def test_gguf_tokenizer_key_of_the_wrong_type(tiny, key, value, needle):
    refused(rewrite(tiny, {key: value}), needle, "expected" if not isinstance(value, list) else "item 0")


# ---- shapes -----------------------------------------------------------------------------------

def test_gguf_odd_head_width(tiny):
    refused(rewrite(tiny, {"llama.attention.key_length": 15}), "llama.attention.key_length", "head width of 15", "even")


def test_gguf_odd_derived_head_width(tiny):
    refused(rewrite(tiny, {"llama.embedding_length": 60}), "llama.embedding_length", "head width of 15", "even")


def test_gguf_hidden_size_not_divisible_by_heads(tiny):
    refused(rewrite(tiny, {"llama.attention.head_count": 3, "llama.attention.head_count_kv": 1}),
            "llama.embedding_length", "64", "not divisible", "llama.attention.head_count", "3")


@pytest.mark.parametrize("tensor", ["blk.1.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"])
def test_gguf_norm_of_the_wrong_length(tmp_path, smollm2_path, tensor):
    path = write_tiny_llama(tmp_path / "norm.gguf", smollm2_path, bad_shape=tensor)
    refused(path, tensor, f"({2 * TINY['hidden']},)", f"expected ({TINY['hidden']},)")


def test_gguf_vocab_size_larger_than_the_token_list(tiny):
    """Metadata and embedding agree on 32 more rows than there are tokens: the model could sample
    ids no token stands for."""
    n_tokens = len(read_gguf(tiny).metadata["tokenizer.ggml.tokens"])
    rows = n_tokens + 32
    embd = gguf_blocks.quantize(np.zeros((rows, TINY["hidden"]), np.float32), "Q8_0")
    path = rewrite(tiny, {"llama.vocab_size": rows},
                   {"token_embd.weight": (embd, "Q8_0", (rows, TINY["hidden"]))})
    refused(path, f"vocab_size (rows of the token embedding) is {rows}", f"{n_tokens} tokens")


def test_gguf_vocab_size_smaller_than_the_token_list(tiny):
    n_tokens = len(read_gguf(tiny).metadata["tokenizer.ggml.tokens"])
    rows = n_tokens - 32
    embd = gguf_blocks.quantize(np.zeros((rows, TINY["hidden"]), np.float32), "Q8_0")
    path = rewrite(tiny, {"llama.vocab_size": rows},
                   {"token_embd.weight": (embd, "Q8_0", (rows, TINY["hidden"]))})
    refused(path, f"{n_tokens} tokens", f"vocab_size (rows of the token embedding) is {rows}")


# ---- Hugging Face folders ---------------------------------------------------------------------

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 16,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
}


def hf_folder(tmp_path: Path, n_tokens: int = 16, bad_norm: bool = False, **changes) -> Path:
    """A tiny random HF Llama folder: config.json, a word-level tokenizer.json, model.safetensors."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    folder = tmp_path / "hf"
    folder.mkdir()
    cfg = {**HF_CONFIG, **changes}
    (folder / "config.json").write_text(json.dumps(cfg))
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, n_tokens)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    h, f, kv = 64, 128, 32
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(16, h, generator=g), "model.norm.weight": torch.ones(h)}
    p = "model.layers.0."
    t.update({p + "input_layernorm.weight": torch.ones(2 * h if bad_norm else h),
              p + "post_attention_layernorm.weight": torch.ones(h),
              p + "self_attn.q_proj.weight": torch.randn(h, h, generator=g),
              p + "self_attn.k_proj.weight": torch.randn(kv, h, generator=g),
              p + "self_attn.v_proj.weight": torch.randn(kv, h, generator=g),
              p + "self_attn.o_proj.weight": torch.randn(h, h, generator=g),
              p + "mlp.gate_proj.weight": torch.randn(f, h, generator=g),
              p + "mlp.up_proj.weight": torch.randn(f, h, generator=g),
              p + "mlp.down_proj.weight": torch.randn(h, f, generator=g)})
    save_file(t, str(folder / "model.safetensors"))
    return folder


def test_hf_folder_itself_loads(tmp_path):
    assert load_model(str(hf_folder(tmp_path))).config.vocab_size == 16


@pytest.mark.parametrize("key,value,needles", [
    ("hidden_size", "64", ["'hidden_size'", "string", "positive integer"]),
    ("num_hidden_layers", 1.5, ["'num_hidden_layers'", "float", "positive integer"]),
    ("num_attention_heads", None, ["'num_attention_heads'", "nonetype", "positive integer"]),
    ("max_position_embeddings", -1, ["'max_position_embeddings'", "-1"]),
    ("rms_norm_eps", "small", ["'rms_norm_eps'", "string", "number"]),
    ("rope_theta", math.nan, ["'rope_theta'", "nan", "finite positive number"]),
    ("head_dim", 15, ["'head_dim'", "head width of 15", "even"]),
    ("num_attention_heads", 3, ["'hidden_size' = 64 is not divisible by 'num_attention_heads' = 3"]),
    ("architectures", "LlamaForCausalLM", ["'architectures'", "list of strings"]),
])
def test_hf_config_field_of_the_wrong_type(tmp_path, key, value, needles):
    refused(hf_folder(tmp_path, **{key: value}), "config.json", *needles)


def test_hf_config_that_is_not_an_object(tmp_path):
    folder = hf_folder(tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    refused(folder, "config.json", "expected a JSON object")


def test_hf_tokenizer_larger_than_vocab_size(tmp_path):
    refused(hf_folder(tmp_path, n_tokens=24), "24 tokens", "vocab_size (rows of the token embedding) is 16")


def test_hf_embedding_padded_past_the_tokenizer_loads(tmp_path):
    """HF checkpoints may pad the embedding past the tokenizer (Qwen2 does): not an error there."""
    assert load_model(str(hf_folder(tmp_path, n_tokens=12))).tokenizer.vocab_size == 12


def test_hf_norm_of_the_wrong_length(tmp_path):
    refused(hf_folder(tmp_path, bad_norm=True), "model.layers.0.input_layernorm.weight", "(128,)", "expected (64,)")
