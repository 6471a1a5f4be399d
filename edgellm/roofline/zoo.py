"""Models to analyse: a built-in zoo of public config.json figures, a config.json path, or a GGUF file.

Every model becomes an :class:`edgellm.config.ModelConfig`, built by its own constructors
(``from_hf_config``, ``from_gguf_metadata``), so the analyzer sees models as the engine does.
The zoo's numbers are those of each model's published ``config.json`` on the Hugging Face hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgellm.config import ModelConfig
from edgellm.errors import ModelFormatError, ModelNotFoundError


def _cfg(arch: str, hidden: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, ctx: int, *,
         tie: bool = False, theta: float = 10000.0, eps: float = 1e-5, head_dim: int | None = None,
         llama3_scaling: float | None = None, repo: str = "", moe: dict | None = None) -> dict:
    d: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                           "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}[arch]],
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "intermediate_size": ffn, "vocab_size": vocab,
        "max_position_embeddings": ctx, "tie_word_embeddings": tie, "rope_theta": theta, "rms_norm_eps": eps,
        "_name_or_path": repo,
    }
    if head_dim:
        d["head_dim"] = head_dim
    d.update(moe or {})   # the config.json's expert fields (mixtures of experts)
    if llama3_scaling:
        d["rope_scaling"] = {"rope_type": "llama3", "factor": llama3_scaling, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return d


# name -> config.json fields (hidden, layers, heads, kv heads, intermediate, vocab, max positions)
ZOO: dict[str, dict] = {
    "Llama-2-7B": _cfg("llama", 4096, 32, 32, 32, 11008, 32000, 4096, repo="meta-llama/Llama-2-7b-hf"),
    "Llama-2-13B": _cfg("llama", 5120, 40, 40, 40, 13824, 32000, 4096, repo="meta-llama/Llama-2-13b-hf"),
    "Llama-2-70B": _cfg("llama", 8192, 80, 64, 8, 28672, 32000, 4096, repo="meta-llama/Llama-2-70b-hf"),
    "Llama-3-8B": _cfg("llama", 4096, 32, 32, 8, 14336, 128256, 8192, theta=500000.0,
                       repo="meta-llama/Meta-Llama-3-8B"),
    "Llama-3-70B": _cfg("llama", 8192, 80, 64, 8, 28672, 128256, 8192, theta=500000.0,
                        repo="meta-llama/Meta-Llama-3-70B"),
    "Llama-3.1-8B": _cfg("llama", 4096, 32, 32, 8, 14336, 128256, 131072, theta=500000.0, llama3_scaling=8.0,
                         repo="meta-llama/Llama-3.1-8B"),
    "Llama-3.2-1B": _cfg("llama", 2048, 16, 32, 8, 8192, 128256, 131072, tie=True, theta=500000.0, head_dim=64,
                         llama3_scaling=32.0, repo="meta-llama/Llama-3.2-1B"),
    "Llama-3.2-3B": _cfg("llama", 3072, 28, 24, 8, 8192, 128256, 131072, tie=True, theta=500000.0, head_dim=128,
                         llama3_scaling=32.0, repo="meta-llama/Llama-3.2-3B"),
    "Mistral-7B": _cfg("mistral", 4096, 32, 32, 8, 14336, 32000, 32768, repo="mistralai/Mistral-7B-v0.1"),
    "Qwen2.5-0.5B": _cfg("qwen2", 896, 24, 14, 2, 4864, 151936, 32768, tie=True, theta=1e6, eps=1e-6,
                         repo="Qwen/Qwen2.5-0.5B"),
    "Qwen2.5-1.5B": _cfg("qwen2", 1536, 28, 12, 2, 8960, 151936, 131072, tie=True, theta=1e6, eps=1e-6,
                         repo="Qwen/Qwen2.5-1.5B"),
    "Qwen2.5-3B": _cfg("qwen2", 2048, 36, 16, 2, 11008, 151936, 32768, tie=True, theta=1e6, eps=1e-6,
                       repo="Qwen/Qwen2.5-3B"),
    "Qwen2.5-7B": _cfg("qwen2", 3584, 28, 28, 4, 18944, 152064, 131072, theta=1e6, eps=1e-6,
                       repo="Qwen/Qwen2.5-7B"),
    "SmolLM2-135M": _cfg("llama", 576, 30, 9, 3, 1536, 49152, 8192, tie=True, theta=100000.0,
                         repo="HuggingFaceTB/SmolLM2-135M"),
    "SmolLM2-360M": _cfg("llama", 960, 32, 15, 5, 2560, 49152, 8192, tie=True, theta=100000.0,
                         repo="HuggingFaceTB/SmolLM2-360M"),
    # mixtures of experts: (experts, chosen per token, expert width[, shared expert width]) as published
    "Mixtral-8x7B": _cfg("mixtral", 4096, 32, 32, 8, 14336, 32000, 32768, theta=1e6,
                         moe={"num_local_experts": 8, "num_experts_per_tok": 2}, repo="mistralai/Mixtral-8x7B-v0.1"),
    "Qwen1.5-MoE-A2.7B": _cfg("qwen2moe", 2048, 24, 16, 16, 5632, 151936, 8192, theta=1e6, eps=1e-6,
                              moe={"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                                   "shared_expert_intermediate_size": 5632, "norm_topk_prob": False},
                              repo="Qwen/Qwen1.5-MoE-A2.7B"),
    "Qwen3-30B-A3B": _cfg("qwen3moe", 2048, 48, 32, 4, 6144, 151936, 40960, theta=1e6, eps=1e-6, head_dim=128,
                          moe={"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                               "norm_topk_prob": True}, repo="Qwen/Qwen3-30B-A3B"),
    "SmolLM2-1.7B": _cfg("llama", 2048, 24, 32, 32, 8192, 49152, 8192, tie=True, theta=130000.0,
                         repo="HuggingFaceTB/SmolLM2-1.7B"),
    # attention-free models (their config.json as transformers writes it)
    "Mamba-130M": {"architectures": ["MambaForCausalLM"], "hidden_size": 768, "num_hidden_layers": 24,
                   "state_size": 16, "expand": 2, "conv_kernel": 4, "time_step_rank": 48, "vocab_size": 50280,
                   "tie_word_embeddings": True, "_name_or_path": "state-spaces/mamba-130m-hf"},
    "Mamba-2.8B": {"architectures": ["MambaForCausalLM"], "hidden_size": 2560, "num_hidden_layers": 64,
                   "state_size": 16, "expand": 2, "conv_kernel": 4, "time_step_rank": 160, "vocab_size": 50280,
                   "tie_word_embeddings": True, "_name_or_path": "state-spaces/mamba-2.8b-hf"},
    "Mamba-Codestral-7B": {"architectures": ["Mamba2ForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 64,
                           "num_heads": 128, "head_dim": 64, "n_groups": 8, "state_size": 128, "expand": 2,
                           "conv_kernel": 4, "vocab_size": 32768, "tie_word_embeddings": False,
                           "_name_or_path": "mistralai/Mamba-Codestral-7B-v0.1"},
    "RWKV-4-169M": {"architectures": ["RwkvForCausalLM"], "hidden_size": 768, "num_hidden_layers": 12,
                    "attention_hidden_size": 768, "intermediate_size": 3072, "vocab_size": 50277,
                    "tie_word_embeddings": False, "_name_or_path": "RWKV/rwkv-4-169m-pile"},
}


def from_config_json(data: dict, name: str) -> ModelConfig:
    """A config.json's ModelConfig: a recurrent model's (with its mixer sizes) or a transformer's."""
    from edgellm.loading.load import recurrent_config_from_json

    cfg = recurrent_config_from_json(data, name)
    return cfg if cfg is not None else ModelConfig.from_hf_config(data, name=name)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "-", name.strip().lower()).removeprefix("meta-")


def model_names() -> list[str]:
    return list(ZOO)


def zoo_config(name: str) -> ModelConfig | None:
    key = _norm(name.split("/")[-1])
    for zoo_name, cfg in ZOO.items():
        if _norm(zoo_name) == key:
            return from_config_json(cfg, zoo_name)
    return None


_INT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim")


def config_from_hf_file(path: Path) -> ModelConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{path} is not valid JSON: {err}", "use the model's config.json as published") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object of config fields")
    for key in _INT_FIELDS:   # name the wrong field before int() fails without saying which
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelFormatError(f"{path}: field '{key}' must be a positive integer, got {value!r}",
                                   "use the model's config.json as published")
    return from_config_json(data, path.parent.name if path.name == "config.json" else path.stem)


def _gguf_value(field) -> Any:
    try:
        return field.contents()
    except Exception:  # older gguf packages: decode the parts by hand
        import numpy as np

        if not field.data:
            return None
        parts = [field.parts[i] for i in field.data]
        vals = [bytes(p).decode("utf-8", "replace") if p.dtype == np.uint8 else p.tolist()[0] for p in parts]
        return vals if len(vals) > 1 else vals[0]


def config_from_gguf(path: Path) -> ModelConfig:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as err:
        raise ModelFormatError(f"{path} is not a readable GGUF file: {err}",
                               "re-download it, or export it again with llama.cpp's convert script") from None
    meta = {}
    for key, fld in reader.fields.items():
        if key == "tokenizer.ggml.tokens":
            meta[key] = [None] * len(fld.data)   # only its length matters here
        elif not key.startswith("tokenizer.ggml."):
            meta[key] = _gguf_value(fld)
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig.from_gguf_metadata(meta, tensor_names=names)
    n_elem = sum(int(t.n_elements) for t in reader.tensors)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    extra = {"source": str(path), "general.name": cfg.name,
             "gguf_bits_per_weight": round(8 * n_bytes / max(n_elem, 1), 3)}
    name = path.stem
    from dataclasses import replace

    return replace(cfg, name=name, extra=extra)


def resolve_model(spec: str) -> ModelConfig:
    """A zoo name, a config.json (or a folder holding one), or a .gguf file."""
    if not spec or not spec.strip():
        raise ModelNotFoundError("no model given", f"pass --model with one of: {', '.join(ZOO)}; "
                                                   "or a config.json or .gguf path")
    cfg = zoo_config(spec)
    if cfg is not None:
        return cfg
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return config_from_gguf(path)
        if path.suffix.lower() == ".gguf":
            raise ModelFormatError(f"{path} does not start with the GGUF magic", "the file is not a GGUF model")
        return config_from_hf_file(path)
    raise ModelNotFoundError(f"unknown model '{spec}'",
                             f"use one of: {', '.join(ZOO)}; or the path of a config.json or .gguf file")
