"""ModelConfig: the shape of a Llama-family decoder, read from GGUF metadata or an HF config.json.

One dataclass serves the engine (to build the model), the KV cache (to size blocks) and the
roofline analyzer (to count operations and bytes), so all three agree on what a model is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from edgellm.errors import ModelFormatError, UnsupportedModelError

# Architectures the Llama-family model runs. Qwen2 adds q/k/v biases; Mistral is Llama-shaped.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling of RoPE (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    context_length: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling: RopeScaling | None = None
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for attr in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "ffn_size",
                     "vocab_size", "context_length"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value <= 0:
                raise ModelFormatError(f"model config field '{attr}' must be a positive integer, got {value!r}",
                                       "the model's metadata is damaged; re-download or re-export the model")
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}",
                "grouped-query attention needs each KV head shared by the same number of query heads")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def n_parameters(self, include_embeddings: bool = True) -> int:
        per_layer = (self.hidden_size * (self.q_size + 2 * self.kv_size)   # q, k, v
                     + self.q_size * self.hidden_size                      # o
                     + 3 * self.hidden_size * self.ffn_size                # gate, up, down
                     + 2 * self.hidden_size)                               # two norms
        if self.qkv_bias:
            per_layer += self.q_size + 2 * self.kv_size
        total = self.n_layers * per_layer + self.hidden_size               # final norm
        if include_embeddings:
            total += self.vocab_size * self.hidden_size
            if not self.tie_embeddings:
                total += self.vocab_size * self.hidden_size
        return total

    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> float:
        return 2 * self.n_layers * self.kv_size * bytes_per_element

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tensor_names: set[str] | None = None) -> "ModelConfig":
        """Build from GGUF key/values (``general.architecture`` and ``<arch>.*`` keys)."""
        arch = meta.get("general.architecture")
        if arch is None:
            raise ModelFormatError("GGUF file has no 'general.architecture' key",
                                   "the file is not a model GGUF; export it again with llama.cpp's convert script")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture '{arch}' is not supported",
                f"edgellm runs these architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")

        def need(key: str) -> Any:
            full = f"{arch}.{key}"
            if full not in meta:
                raise ModelFormatError(f"GGUF metadata lacks '{full}'",
                                       "the file is incomplete; re-download or re-export the model")
            return meta[full]

        hidden = int(need("embedding_length"))
        n_heads = int(need("attention.head_count"))
        n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
        head_dim = int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", 0)) or
                       hidden // max(n_heads, 1))
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else 0
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") == "llama3" or f"{arch}.rope.scaling.low_freq_factor" in meta:
            scaling = RopeScaling(
                factor=float(meta.get(f"{arch}.rope.scaling.factor", 8.0)),
                low_freq_factor=float(meta.get(f"{arch}.rope.scaling.low_freq_factor", 1.0)),
                high_freq_factor=float(meta.get(f"{arch}.rope.scaling.high_freq_factor", 4.0)),
                original_max_position=int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192)),
            )
        names = tensor_names or set()
        return cls(
            architecture=arch,
            n_layers=int(need("block_count")),
            hidden_size=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ffn_size=int(need("feed_forward_length")),
            vocab_size=int(vocab),
            context_length=int(need("context_length")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings=bool(names) and "output.weight" not in names,
            qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in names,
            rope_scaling=scaling,
            name=str(meta.get("general.name", "")),
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dictionary."""
        archs = cfg.get("architectures") or []
        arch = _HF_ARCHITECTURES.get(archs[0] if archs else "", cfg.get("model_type", ""))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {archs or cfg.get('model_type')!r} is not supported",
                f"edgellm runs: {', '.join(_HF_ARCHITECTURES)}")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if k not in cfg]
        if missing:
            raise ModelFormatError(f"config.json lacks {', '.join(missing)}",
                                   "use the config.json that came with the model's weights")
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        # transformers >= 5 writes theta and the scaling inside "rope_parameters"; older files
        # (and the hub's Llama-3.1 config.json) keep them at the top level as "rope_theta"/"rope_scaling".
        rope = cfg.get("rope_parameters") or {}
        rs = cfg.get("rope_scaling") or rope
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = None
        if rs.get("rope_type", rs.get("type")) == "llama3":
            scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
                                  int(rs["original_max_position_embeddings"]))
        return cls(
            architecture=arch,
            n_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            ffn_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            context_length=int(cfg.get("max_position_embeddings", 4096)),
            rope_theta=float(theta),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=scaling,
            name=name or str(cfg.get("_name_or_path", "")),
        )
