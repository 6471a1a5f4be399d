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
# window); Gemma 3 has its own model (edgellm.models.gemma3). The mixtures of experts (Mixtral,
# Qwen2-MoE, Qwen3-MoE: edgellm.models.moe) are Llama-shaped blocks whose MLP is a routed set of
# experts; llama.cpp writes Mixtral as "llama" with expert counts, so a GGUF "llama" may be one too.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3", "mixtral", "qwen2moe", "qwen3moe")

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
}
#: attention-free models, each read by its own module (``edgellm.loading.load.load_recurrent_hf``)
RECURRENT_HF_ARCHITECTURES = ("MambaForCausalLM", "Mamba2ForCausalLM", "RwkvForCausalLM")
#: attention-free models read from GGUF (llama.cpp's layouts), by edgellm.loading.recurrent_gguf
RECURRENT_GGUF_ARCHITECTURES = ("mamba", "mamba2")

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
class ExpertConfig:
    """A mixture-of-experts MLP: a router picks ``n_used`` of ``n_experts`` SwiGLU experts (each
    ``ffn_size`` wide) per token and adds their outputs weighted by the router's softmax
    probabilities, renormalised over the chosen ones when ``norm_top_k`` (Mixtral, Qwen3-MoE; not
    Qwen2-MoE). ``shared_ffn_size`` > 0: an expert every token runs, its output scaled by
    sigmoid(x . gate) (Qwen2-MoE). ``dense_layers`` keep the plain MLP of ``ModelConfig.ffn_size``
    (Qwen's ``mlp_only_layers`` / ``decoder_sparse_step``)."""

    n_experts: int
    n_used: int
    ffn_size: int
    norm_top_k: bool
    shared_ffn_size: int = 0
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n_used > self.n_experts:
            raise ModelFormatError(
                f"the model routes each token to {self.n_used} experts but has only {self.n_experts}",
                "the expert counts (expert_used_count / num_experts_per_tok against expert_count / "
                "num_experts) contradict each other; re-export the model")

    def sparse(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is the routed experts (else the dense MLP)."""
        return layer not in self.dense_layers

    def layer_parameters(self, hidden: int) -> int:
        """Weights of one sparse MLP: router, every expert, shared expert and its gate."""
        shared = 3 * hidden * self.shared_ffn_size + hidden if self.shared_ffn_size else 0
        return hidden * self.n_experts + self.n_experts * 3 * hidden * self.ffn_size + shared

    def active_layer_parameters(self, hidden: int, experts: float | None = None) -> float:
        """Weights one sparse MLP reads when ``experts`` distinct experts run (default ``n_used``,
        one token): the router, those experts, the shared expert and its gate."""
        used = self.n_used if experts is None else experts
        shared = 3 * hidden * self.shared_ffn_size + hidden if self.shared_ffn_size else 0
        return hidden * self.n_experts + used * 3 * hidden * self.ffn_size + shared


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
    experts: ExpertConfig | None = None            # mixture-of-experts MLP (None: dense)
    qk_norm: bool = False                          # RMSNorm on each q and k head before RoPE (Qwen3-MoE)
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
        """Every weight (a mixture of experts: all its experts; see ``n_active_parameters``)."""
        per_layer = (self.hidden_size * (self.q_size + 2 * self.kv_size)   # q, k, v
                     + self.q_size * self.hidden_size                      # o
                     + 3 * self.hidden_size * self.ffn_size                # gate, up, down
                     + 2 * self.hidden_size)                               # two norms
        if self.qkv_bias:
            per_layer += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        total = self.n_layers * per_layer + self.hidden_size               # final norm
        if self.experts is not None:   # sparse layers: the experts instead of the dense MLP
            n_sparse = sum(self.experts.sparse(i) for i in range(self.n_layers))
            total += n_sparse * (self.experts.layer_parameters(self.hidden_size) - 3 * self.hidden_size * self.ffn_size)
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

    def n_active_parameters(self, include_embeddings: bool = True, experts: float | None = None) -> float:
        """Weights a step reads when ``experts`` distinct experts run in each sparse layer (default:
        ``n_used``, one token's); equal to ``n_parameters`` for a dense model."""
        total = self.n_parameters(include_embeddings)
        if self.experts is None:
            return total
        n_sparse = sum(self.experts.sparse(i) for i in range(self.n_layers))
        h = self.hidden_size
        return total - n_sparse * (self.experts.layer_parameters(h) - self.experts.active_layer_parameters(h, experts))

    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> float:
        return 2 * self.n_layers * self.kv_size * bytes_per_element

    def kv_positions(self, context: float) -> float:
        """Positions of KV one sequence of ``context`` tokens keeps, summed over the layers: a
        sliding-window layer keeps (and a decode step reads) its window only."""
        return sum(context if w is None else min(context, w)
                   for w in (self.layer_window(i) for i in range(self.n_layers)))

    def kv_bytes(self, context: int, bytes_per_element: float = 2.0) -> float:
        """KV of one sequence of ``context`` tokens: a sliding-window layer keeps its window only."""
        return 2 * self.kv_positions(context) * self.kv_size * bytes_per_element

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
                f"edgellm runs these architectures: {', '.join(SUPPORTED_ARCHITECTURES + RECURRENT_GGUF_ARCHITECTURES)}")

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
            experts=_gguf_experts(meta, arch, count("feed_forward_length")),
            qk_norm=arch == "qwen3moe",
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
                f"{archs[0]} is a recurrent model, read by its own loader (edgellm.loading.load.load_recurrent_hf), "
                "not as a Llama-family config", "load it with load_model / --model, which reads it whole")
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
        if arch in ("qwen2moe", "qwen3moe") and not cfg.get("use_sliding_window"):
            cfg = {**cfg, "sliding_window": None}   # Qwen MoE configs write 0 or a size they do not use
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
            qkv_bias=(arch == "qwen2" or bool(cfg.get("attention_bias", False))
                      or (arch == "qwen2moe" and bool(cfg.get("qkv_bias", True)))),
            rope_scaling=scaling,
            name=name or str(cfg.get("_name_or_path", "")),
            experts=_hf_experts(cfg, arch, n_layers),
            qk_norm=arch == "qwen3moe",
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
    elif arch in ("qwen2", "qwen2moe", "qwen3moe"):
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


def _gguf_experts(meta: Mapping[str, Any], arch: str, ffn_size: int) -> ExpertConfig | None:
    """The expert counts of a GGUF file (llama.cpp's keys), None without ``<arch>.expert_count``
    (or with 0: a dense model). llama.cpp renormalises the chosen experts' weights for Mixtral
    ("llama") and Qwen3-MoE but not for Qwen2-MoE, unless ``<arch>.expert_weights_norm`` says."""
    where = "GGUF metadata"
    if arch == "mixtral":   # llama.cpp writes Mixtral as "llama" (q/k rows permuted as Llama's)
        raise UnsupportedModelError("GGUF architecture 'mixtral' is not a layout llama.cpp writes",
                                    "convert the model with llama.cpp's convert_hf_to_gguf.py (it writes 'llama' "
                                    "with expert counts)")
    if arch in ("qwen2moe", "qwen3moe") and f"{arch}.expert_count" not in meta:
        raise ModelFormatError(f"GGUF metadata lacks '{arch}.expert_count'",
                               "the file is incomplete; re-export the model with llama.cpp's converter")
    if meta.get(f"{arch}.expert_count", 0) == 0:
        return None
    n_experts = _positive_int(where, f"{arch}.expert_count", meta[f"{arch}.expert_count"])
    if f"{arch}.expert_used_count" not in meta:
        raise ModelFormatError(f"GGUF metadata lacks '{arch}.expert_used_count'",
                               "the file is incomplete; re-export the model with llama.cpp's converter")
    key = f"{arch}.expert_feed_forward_length"
    expert_ffn = _positive_int(where, key, meta[key]) if key in meta else ffn_size
    key = f"{arch}.expert_shared_feed_forward_length"
    shared = _positive_int(where, key, meta[key]) if key in meta else 0
    norm = meta.get(f"{arch}.expert_weights_norm", arch != "qwen2moe")
    if not isinstance(norm, bool):
        raise ModelFormatError(f"{where} '{arch}.expert_weights_norm' is {_describe(norm)}, expected a boolean",
                               _DAMAGED)
    return ExpertConfig(n_experts=n_experts,
                        n_used=_positive_int(where, f"{arch}.expert_used_count", meta[f"{arch}.expert_used_count"]),
                        ffn_size=expert_ffn, norm_top_k=norm, shared_ffn_size=shared)


def _hf_experts(cfg: Mapping[str, Any], arch: str, n_layers: int) -> ExpertConfig | None:
    """The experts of a config.json, named as transformers' Mixtral / Qwen2-MoE / Qwen3-MoE
    configs name them (Mixtral always renormalises the chosen experts' weights; the Qwen MoE
    models when ``norm_topk_prob``)."""
    if arch not in ("mixtral", "qwen2moe", "qwen3moe"):
        return None
    where = "config.json"
    experts_key = "num_local_experts" if arch == "mixtral" or "num_experts" not in cfg else "num_experts"
    for key in (experts_key, "num_experts_per_tok"):
        if key not in cfg:
            raise ModelFormatError(f"config.json lacks '{key}'", "use the config.json that came with the model's weights")
    n_experts = _positive_int(where, experts_key, cfg[experts_key])
    n_used = _positive_int(where, "num_experts_per_tok", cfg["num_experts_per_tok"])
    if arch == "mixtral":
        return ExpertConfig(n_experts, n_used, _positive_int(where, "intermediate_size", cfg["intermediate_size"]),
                            norm_top_k=True)
    if "moe_intermediate_size" not in cfg:
        raise ModelFormatError("config.json lacks 'moe_intermediate_size'",
                               "use the config.json that came with the model's weights")
    shared = 0
    if arch == "qwen2moe":
        shared = _positive_int(where, "shared_expert_intermediate_size", cfg.get("shared_expert_intermediate_size"))
    step = _positive_int(where, "decoder_sparse_step", cfg.get("decoder_sparse_step", 1))
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise ModelFormatError(f"config.json 'mlp_only_layers' is {_describe(only)}, expected a list of layer numbers",
                               "use the config.json that came with the model's weights")
    # transformers' rule: a layer is sparse unless listed, and only every `step`-th one
    dense = tuple(i for i in range(n_layers) if i in only or (i + 1) % step)
    return ExpertConfig(n_experts, n_used, _positive_int(where, "moe_intermediate_size", cfg["moe_intermediate_size"]),
                        norm_top_k=bool(cfg.get("norm_topk_prob", False)), shared_ffn_size=shared, dense_layers=dense)


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
