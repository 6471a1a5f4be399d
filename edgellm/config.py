"""ModelConfig: the shape of a Llama-family decoder, read from GGUF metadata or an HF config.json.

One dataclass serves the engine (to build the model), the KV cache (to size blocks) and the
roofline analyzer (to count operations and bytes), so all three agree on what a model is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from edgellm.errors import ModelFormatError, UnsupportedModelError

_DAMAGED = "the model's metadata is damaged or was written by a broken converter; re-download or re-export the model"


def _describe(value: Any) -> str:
    """How a metadata value looks, for an error message: "a string ('576')", "an array of 3 items"."""
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, float):
        return f"a float ({value!r})"
    if isinstance(value, int):
        return f"the integer {value}"
    return f"a {type(value).__name__}"


def _positive_int(where: str, key: str, value: Any) -> int:
    """``value`` as a positive integer, or a ModelFormatError naming ``key`` in ``where``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFormatError(f"{where} '{key}' is {_describe(value)}, expected a positive integer", _DAMAGED)
    if value <= 0:
        raise ModelFormatError(f"{where} '{key}' is {value}, expected a positive integer", _DAMAGED)
    return value


def _positive_float(where: str, key: str, value: Any) -> float:
    """``value`` as a finite positive number, or a ModelFormatError naming ``key`` in ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFormatError(f"{where} '{key}' is {_describe(value)}, expected a positive number", _DAMAGED)
    if not math.isfinite(value) or value <= 0:
        raise ModelFormatError(f"{where} '{key}' is {value!r}, expected a finite positive number", _DAMAGED)
    return float(value)


def _string(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ModelFormatError(f"{where} '{key}' is {_describe(value)}, expected a string", _DAMAGED)
    return value

# Architectures edgellm runs. Qwen2 adds q/k/v biases; Mistral is Llama-shaped (with a sliding
# window); Gemma 3 has its own model (edgellm.models.gemma3).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3")

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Gemma3ForCausalLM": "gemma3",
}
#: attention-free models, each read by its own module (``edgellm.loading.load.load_recurrent_hf``)
RECURRENT_HF_ARCHITECTURES = ("MambaForCausalLM", "Mamba2ForCausalLM", "RwkvForCausalLM")

#: Gemma 3: every ``GEMMA3_SLIDING_PATTERN``-th layer attends globally, the others through the
#: sliding window; the sliding layers' RoPE base. GGUF files carry neither (llama.cpp and
#: transformers' GGUF loader both use these values for gemma3 files).
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0


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
    # Sliding-window attention: a sliding layer's query at position p sees keys p - window + 1 .. p.
    # ``sliding_layers`` lists those layers (Gemma 3: five of six); None with a window set means
    # every layer (Mistral).
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None
    rope_local_theta: float | None = None          # RoPE base of the sliding layers (Gemma 3)
    query_pre_attn_scalar: float | None = None     # attention scale = this ** -0.5 (default head_dim)
    final_logit_softcapping: float | None = None   # logits = c * tanh(logits / c) (Gemma 2/3 configs)
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
        if self.head_dim % 2:
            raise ModelFormatError(
                f"the attention head width is {self.head_dim}, an odd number",
                "rotary position embeddings rotate pairs of values, so the head width must be even; "
                "the model's metadata is damaged or the model is not Llama-family")

    # ---- attention ---------------------------------------------------------------------------
    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: it attends to the whole context)."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers is None or layer in self.sliding_layers:
            return self.sliding_window
        return None

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

    def check_token_count(self, n_tokens: int, source: str, padded: bool = False) -> None:
        """Refuse a tokenizer of ``n_tokens`` tokens that does not fit ``vocab_size`` embedding rows:
        more tokens index past the embedding; in a GGUF file (``padded=False``) fewer tokens leave
        rows the model can sample but nothing can decode. HF folders (``padded=True``) may pad
        the embedding past the tokenizer (Qwen2 does), so there only more tokens is refused."""
        if n_tokens > self.vocab_size:
            raise ModelFormatError(
                f"{source}: the tokenizer has {n_tokens} tokens but the model's vocab_size (rows of the token "
                f"embedding) is {self.vocab_size}: token ids from {self.vocab_size} up have no embedding",
                "the tokenizer does not belong to these weights; use the model's own files")
        if n_tokens < self.vocab_size and not padded:
            raise ModelFormatError(
                f"{source}: the model's vocab_size (rows of the token embedding) is {self.vocab_size}, larger than "
                f"its token list of {n_tokens} tokens: ids from {n_tokens} up could be generated but not decoded",
                "the file's vocabulary is incomplete; re-convert the model with llama.cpp's convert_hf_to_gguf.py")

    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> float:
        return 2 * self.n_layers * self.kv_size * bytes_per_element

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tensor_names: set[str] | None = None) -> "ModelConfig":
        """Build from GGUF key/values (``general.architecture`` and ``<arch>.*`` keys).

        Every value is type-checked: a string, NaN or array where a number belongs raises a
        ModelFormatError naming the key and what was expected, not a TypeError/ValueError.
        """
        where = "GGUF metadata"
        arch = meta.get("general.architecture")
        if arch is None:
            raise ModelFormatError("GGUF file has no 'general.architecture' key",
                                   "the file is not a model GGUF; export it again with llama.cpp's convert script")
        arch = _string(where, "general.architecture", arch)
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

        def count(key: str, default: Any = None) -> int:
            value = need(key) if default is None else meta.get(f"{arch}.{key}", default)
            return _positive_int(where, f"{arch}.{key}", value)

        def number(key: str, default: float) -> float:
            return _positive_float(where, f"{arch}.{key}", meta.get(f"{arch}.{key}", default))

        hidden = count("embedding_length")
        n_heads = count("attention.head_count")
        n_kv = count("attention.head_count_kv", n_heads)
        if f"{arch}.attention.key_length" in meta:
            head_dim = _even_head_dim(where, f"{arch}.attention.key_length", count("attention.key_length"))
        elif f"{arch}.rope.dimension_count" in meta:
            head_dim = _even_head_dim(where, f"{arch}.rope.dimension_count", count("rope.dimension_count"))
        else:
            head_dim = _derived_head_dim(where, f"{arch}.embedding_length", hidden,
                                         f"{arch}.attention.head_count", n_heads)
        tokens = meta.get("tokenizer.ggml.tokens")
        if f"{arch}.vocab_size" in meta:
            vocab = count("vocab_size")
        elif isinstance(tokens, (list, tuple)):
            vocab = len(tokens)
        else:
            vocab = 0   # refused below, by __post_init__ (or by the tokenizer's own checks first)
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") == "llama3" or f"{arch}.rope.scaling.low_freq_factor" in meta:
            scaling = RopeScaling(
                factor=number("rope.scaling.factor", 8.0),
                low_freq_factor=number("rope.scaling.low_freq_factor", 1.0),
                high_freq_factor=number("rope.scaling.high_freq_factor", 4.0),
                original_max_position=count("rope.scaling.original_context_length", 8192),
            )
        name = meta.get("general.name", "")
        names = tensor_names or set()
        window = count("attention.sliding_window") if f"{arch}.attention.sliding_window" in meta else None
        gemma = {}
        if arch == "gemma3":
            n_layers = count("block_count")
            if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
                raise UnsupportedModelError(
                    f"this Gemma 3 file scales RoPE ('{arch}.rope.scaling.type' = "
                    f"{meta.get(f'{arch}.rope.scaling.type')!r}), which edgellm does not implement",
                    "use a Gemma 3 model without RoPE scaling (the 270M and 1B text models have none)")
            gemma = dict(
                sliding_layers=tuple(i for i in range(n_layers) if (i + 1) % GEMMA3_SLIDING_PATTERN),
                rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
                # llama.cpp scales Gemma 3 attention by 1/sqrt(head width) (the 27B, whose
                # query_pre_attn_scalar differs, is told apart by its size there)
                query_pre_attn_scalar=float(head_dim),
                final_logit_softcapping=(number("final_logit_softcapping", 1.0)
                                         if f"{arch}.final_logit_softcapping" in meta else None),
            )
            if window is None:
                raise ModelFormatError(f"GGUF metadata lacks '{arch}.attention.sliding_window'",
                                       "the file is incomplete; re-export the model with llama.cpp's converter")
        return cls(
            architecture=arch,
            n_layers=count("block_count"),
            hidden_size=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ffn_size=count("feed_forward_length"),
            vocab_size=vocab,
            context_length=count("context_length"),
            rope_theta=number("rope.freq_base", 10000.0),
            rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
            tie_embeddings=bool(names) and "output.weight" not in names,
            qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in names,
            rope_scaling=scaling,
            name=_string(where, "general.name", name),
            sliding_window=window,
            **gemma,
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dictionary (every used field type-checked)."""
        where = "config.json"
        if not isinstance(cfg, Mapping):
            raise ModelFormatError(f"config.json holds {_describe(cfg)}, expected a JSON object",
                                   "use the config.json that came with the model's weights")
        archs = cfg.get("architectures") or []
        if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
            raise ModelFormatError(f"config.json 'architectures' is {_describe(archs)}, expected a list of strings",
                                   "use the config.json that came with the model's weights")
        model_type = cfg.get("model_type", "")
        arch = _HF_ARCHITECTURES.get(archs[0] if archs else "", model_type if isinstance(model_type, str) else "")
        if archs and archs[0] in RECURRENT_HF_ARCHITECTURES:
            # load_model reads these with their own modules; what comes here wants a Llama-shaped config
            raise UnsupportedModelError(
                f"{archs[0]} is a recurrent model: edgellm runs it as it is, but converting or quantising its "
                "weights (--weights, edgellm quantize) is not implemented", "drop --weights, or use --dtype bfloat16")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {archs or cfg.get('model_type')!r} is not supported",
                f"edgellm runs: {', '.join([*_HF_ARCHITECTURES, *RECURRENT_HF_ARCHITECTURES])}")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if k not in cfg]
        if missing:
            raise ModelFormatError(f"config.json lacks {', '.join(missing)}",
                                   "use the config.json that came with the model's weights")

        def count(key: str, default: Any = None) -> int:
            value = cfg[key] if default is None else (cfg.get(key) if cfg.get(key) is not None else default)
            return _positive_int(where, key, value)

        n_heads = count("num_attention_heads")
        hidden = count("hidden_size")
        if cfg.get("head_dim") is not None:
            head_dim = _even_head_dim(where, "head_dim", count("head_dim"))
        else:
            head_dim = _derived_head_dim(where, "hidden_size", hidden, "num_attention_heads", n_heads)
        # transformers >= 5 writes theta and the scaling inside "rope_parameters"; older files
        # (and the hub's Llama-3.1 config.json) keep them at the top level as "rope_theta"/"rope_scaling".
        rope = cfg.get("rope_parameters") or {}
        rs = cfg.get("rope_scaling") or rope
        for key, value in (("rope_parameters", rope), ("rope_scaling", rs)):
            if not isinstance(value, Mapping):
                raise ModelFormatError(f"config.json '{key}' is {_describe(value)}, expected an object",
                                       "use the config.json that came with the model's weights")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = None
        if rs.get("rope_type", rs.get("type")) == "llama3":
            def part(key: str) -> Any:
                if key not in rs:
                    raise ModelFormatError(f"config.json 'rope_scaling' (llama3) lacks '{key}'",
                                           "use the config.json that came with the model's weights")
                return rs[key]

            scaling = RopeScaling(
                _positive_float(where, "rope_scaling.factor", part("factor")),
                _positive_float(where, "rope_scaling.low_freq_factor", part("low_freq_factor")),
                _positive_float(where, "rope_scaling.high_freq_factor", part("high_freq_factor")),
                _positive_int(where, "rope_scaling.original_max_position_embeddings",
                              part("original_max_position_embeddings")))
        n_layers = count("num_hidden_layers")
        attention = _hf_attention_fields(cfg, arch, n_layers, head_dim)
        theta = attention.pop("rope_theta", theta)   # Gemma 3 nests it per layer type
        return cls(
            architecture=arch,
            n_layers=n_layers,
            hidden_size=hidden,
            n_heads=n_heads,
            n_kv_heads=count("num_key_value_heads", n_heads),
            head_dim=head_dim,
            ffn_size=count("intermediate_size"),
            vocab_size=count("vocab_size"),
            context_length=count("max_position_embeddings", 4096),
            rope_theta=_positive_float(where, "rope_theta", theta),
            rms_norm_eps=_positive_float(where, "rms_norm_eps", cfg.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma3")),   # transformers' defaults
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=scaling,
            name=name or str(cfg.get("_name_or_path", "")),
            **attention,
        )


def _hf_attention_fields(cfg: Mapping[str, Any], arch: str, n_layers: int, head_dim: int) -> dict:
    """Sliding window, per-layer RoPE bases and attention scale of a config.json, as transformers
    reads them: ``layer_types`` when given; else Mistral's ``sliding_window`` covers every layer,
    Qwen2's only with ``use_sliding_window`` (from layer ``max_window_layers`` on), and Gemma 3's
    five of every ``sliding_window_pattern`` (6) layers."""
    where = "config.json"
    window = cfg.get("sliding_window")
    window = None if window is None else _positive_int(where, "sliding_window", window)
    types = cfg.get("layer_types")
    out: dict[str, Any] = {}
    if types is not None:
        if (not isinstance(types, (list, tuple)) or len(types) != n_layers
                or not all(t in ("sliding_attention", "full_attention") for t in types)):
            raise ModelFormatError(
                f"config.json 'layer_types' is {_describe(types)}, expected {n_layers} items each "
                "'sliding_attention' or 'full_attention'", "use the config.json that came with the model's weights")
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif arch == "gemma3":
        pattern = _positive_int(where, "sliding_window_pattern", cfg.get("sliding_window_pattern", GEMMA3_SLIDING_PATTERN))
        sliding = tuple(i for i in range(n_layers) if (i + 1) % pattern)
    elif arch == "qwen2":
        first = cfg.get("max_window_layers", n_layers)
        sliding = tuple(range(first, n_layers)) if cfg.get("use_sliding_window") else ()
    else:
        sliding = tuple(range(n_layers))
    if window is not None and sliding:
        out.update(sliding_window=window, sliding_layers=None if len(sliding) == n_layers else sliding)
    if arch == "gemma3":
        if cfg.get("attn_logit_softcapping") is not None or cfg.get("use_bidirectional_attention"):
            raise UnsupportedModelError(
                "this Gemma 3 config asks for attention logit soft-capping or bidirectional attention, "
                "which edgellm does not implement", "use a Gemma 3 text model (Gemma3ForCausalLM) config")
        rope = cfg.get("rope_parameters") or {}
        local = (rope.get("sliding_attention") or {}) if isinstance(rope, Mapping) else {}
        full = (rope.get("full_attention") or {}) if isinstance(rope, Mapping) else {}
        for part in (local, full):
            if part.get("rope_type", "default") != "default":
                raise UnsupportedModelError(
                    f"this Gemma 3 config scales RoPE ({part.get('rope_type')!r}), which edgellm does not implement",
                    "use a Gemma 3 model without RoPE scaling (the 270M and 1B text models have none)")
        out["rope_local_theta"] = _positive_float(
            where, "rope_local_base_freq", local.get("rope_theta", cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)))
        if "rope_theta" in full:
            out["rope_theta"] = _positive_float(where, "rope_parameters.full_attention.rope_theta", full["rope_theta"])
        out["query_pre_attn_scalar"] = _positive_float(where, "query_pre_attn_scalar",
                                                       cfg.get("query_pre_attn_scalar", head_dim))
        cap = cfg.get("final_logit_softcapping")
        out["final_logit_softcapping"] = None if cap is None else _positive_float(where, "final_logit_softcapping", cap)
    return out


def _derived_head_dim(where: str, hidden_key: str, hidden: int, heads_key: str, n_heads: int) -> int:
    """``hidden // n_heads`` when the file gives no head width; refused when it does not divide."""
    if hidden % n_heads:
        raise ModelFormatError(
            f"{where} '{hidden_key}' = {hidden} is not divisible by '{heads_key}' = {n_heads}, so the "
            "attention head width is not a whole number",
            "the model's metadata is damaged; re-download or re-export the model")
    return _even_head_dim(where, f"{hidden_key}' / '{heads_key}", hidden // n_heads)


def _even_head_dim(where: str, key: str, head_dim: int) -> int:
    if head_dim % 2:
        raise ModelFormatError(
            f"{where} '{key}' gives an attention head width of {head_dim}, an odd number",
            "rotary position embeddings rotate pairs of values, so the head width must be even; "
            "the model's metadata is damaged or the model is not Llama-family")
    return head_dim
