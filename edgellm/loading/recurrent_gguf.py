"""Attention-free models from GGUF files in llama.cpp's layout: Mamba (``general.architecture`` =
"mamba") and Mamba-2 ("mamba2"), as llama.cpp's ``convert_hf_to_gguf.py`` writes them.

The sizes are the ``<arch>.ssm.*`` keys (``conv_kernel``, ``inner_size``, ``state_size``,
``time_step_rank``; Mamba-2 also ``group_count``, and its time-step rank is the head count). The
tensors are llama.cpp's names for transformers' (``blk.N.ssm_in`` = ``in_proj``, ``ssm_conv1d``,
``ssm_x`` = ``x_proj``, ``ssm_dt`` = ``dt_proj`` with Mamba-2's ``dt_bias`` as ``ssm_dt.bias``,
``ssm_a`` already ``-exp(A_log)``, ``ssm_d``, ``ssm_norm`` (Mamba-2's gated norm), ``ssm_out``;
``attn_norm`` the block's norm). The converter squeezes the convolution to [channels, d_conv]
and gives Mamba-2's A and D a trailing axis of 1.

Matrices (``token_embd``, ``output``, ``ssm_in``, ``ssm_x``, ``ssm_dt``, ``ssm_out``) stay in the
file's block format behind the :class:`~edgellm.quant.base.Weight` interface, as a Llama's do;
the small tensors (convolution, A, D, norms, biases) are read as float32, as llama.cpp keeps them.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from edgellm.config import RECURRENT_GGUF_ARCHITECTURES, ModelConfig
from edgellm.dtypes import compute_dtype
from edgellm.errors import ModelFormatError, UnsupportedModelError
from edgellm.loading.gguf import GGUFFile
from edgellm.loading.weights import GGUFSource
from edgellm.models.mamba import MambaLayer, MambaModel, MambaShape, MambaWeights, recurrent_config
from edgellm.models.mamba2 import Mamba2Layer, Mamba2Model, Mamba2Shape, Mamba2Weights

RECONVERT = "re-convert the model with llama.cpp's convert_hf_to_gguf.py"


class RecurrentGGUFSource(GGUFSource):
    """A GGUF file's tensors with the shape of each small one checked."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, dtype: str, use_native: bool, kind: str):
        super().__init__(gf, cfg, compute_dtype(dtype), use_native)
        self.kind = kind

    def floats(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``name`` as float32 of ``shape``; also refuses a shape other than ``shape``."""
        t = self.gf.tensors.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise ModelFormatError(f"{self.gf.path}: tensor '{name}' has shape {tuple(t.shape)}, expected {shape}",
                                   f"the tensor contradicts the file's own metadata; {RECONVERT}")
        return self.vector(name).reshape(shape)

    def optional(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.floats(name, shape) if self.has(name) else None


class SSMKeys:
    """The ``<arch>.*`` metadata of a state-space model, each read with a clear error if absent."""

    def __init__(self, gf: GGUFFile, arch: str):
        self.gf, self.arch = gf, arch

    def count(self, key: str) -> int:
        full = f"{self.arch}.{key}"
        value = self.gf.metadata.get(full)
        if value is None:
            raise ModelFormatError(f"{self.gf.path}: GGUF metadata lacks '{full}', which a {self.arch} model needs",
                                   f"the file is incomplete; {RECONVERT}")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelFormatError(f"{self.gf.path}: GGUF metadata '{full}' is {value!r}, expected a positive integer",
                                   f"the file is damaged; {RECONVERT}")
        return value

    def eps(self) -> float:
        full = f"{self.arch}.attention.layer_norm_rms_epsilon"
        value = self.gf.metadata.get(full)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ModelFormatError(f"{self.gf.path}: GGUF metadata '{full}' is {value!r}, expected a small "
                                   "positive number (the RMS norms' epsilon)", f"the file is incomplete; {RECONVERT}")
        return float(value)


def load_recurrent_gguf(gf: GGUFFile, dtype: str = "float32", use_native: bool = True):
    """The Mamba or Mamba-2 model of ``gf`` (an architecture of config.RECURRENT_GGUF_ARCHITECTURES)."""
    return {"mamba": _load_mamba, "mamba2": _load_mamba2}[_architecture(gf)](gf, dtype, use_native)


def recurrent_gguf_config(gf: GGUFFile) -> ModelConfig:
    """The ModelConfig of ``gf``'s Mamba or Mamba-2, from its header alone (no tensor is read)."""
    return {"mamba": mamba_sizes, "mamba2": mamba2_sizes}[_architecture(gf)](gf)[0]


def _architecture(gf: GGUFFile) -> str:
    arch = gf.metadata.get("general.architecture")
    if arch not in RECURRENT_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"{gf.path}: architecture {arch!r} is not an attention-free model edgellm reads",
                                    f"edgellm reads these from GGUF: {', '.join(RECURRENT_GGUF_ARCHITECTURES)}")
    return arch


def _model_config(gf: GGUFFile, arch: str, keys: SSMKeys, ffn_size: int, sizes: dict) -> ModelConfig:
    """The engine's ModelConfig: the vocabulary is the token embedding's rows (the tokenizer's
    list must match them: load_model checks), tied when the file has no ``output.weight``."""
    embed = gf.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise ModelFormatError(f"{gf.path}: tensor 'token_embd.weight' is "
                               f"{'missing' if embed is None else f'of shape {embed.shape}'}",
                               f"a {arch} model needs its [vocab, hidden] token embedding; {RECONVERT}")
    data = {"num_hidden_layers": keys.count("block_count"), "hidden_size": keys.count("embedding_length"),
            "vocab_size": embed.shape[0], "tie_word_embeddings": "output.weight" not in gf.tensors}
    return recurrent_config(arch, data, str(gf.metadata.get("general.name") or gf.path.stem), ffn_size=ffn_size,
                            eps=keys.eps(), sizes=sizes)


def _ends(src: RecurrentGGUFSource, cfg: ModelConfig):
    """Token embedding, final norm and head (the embedding itself when tied)."""
    H = cfg.hidden_size
    embed = src.matrix("token_embd.weight", (cfg.vocab_size, H))
    lm_head = embed if cfg.tie_embeddings else src.matrix("output.weight", (cfg.vocab_size, H))
    return embed, src.floats("output_norm.weight", (H,)), lm_head


def mamba_sizes(gf: GGUFFile) -> tuple[ModelConfig, MambaShape]:
    """The ModelConfig and the mixer's sizes of a Mamba file (its header only)."""
    keys = SSMKeys(gf, "mamba")
    if gf.metadata.get("mamba.ssm.dt_b_c_rms"):
        raise UnsupportedModelError(f"{gf.path}: this Mamba normalises dt, B and C (mamba.ssm.dt_b_c_rms: a "
                                    "Falcon-Mamba model), which edgellm does not implement",
                                    "use a Mamba model (state-spaces/mamba-*)")
    s = MambaShape(d_inner=keys.count("ssm.inner_size"), d_state=keys.count("ssm.state_size"),
                   d_conv=keys.count("ssm.conv_kernel"), dt_rank=keys.count("ssm.time_step_rank"))
    return _model_config(gf, "mamba", keys, s.d_inner, asdict(s)), s


def _load_mamba(gf: GGUFFile, dtype: str, use_native: bool) -> MambaModel:
    cfg, s = mamba_sizes(gf)
    src = RecurrentGGUFSource(gf, cfg, dtype, use_native, "a Mamba model")
    H, Di, N = cfg.hidden_size, s.d_inner, s.d_state
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        layers.append(MambaLayer(
            norm=src.floats(p + "attn_norm.weight", (H,)),
            in_proj=src.matrix(p + "ssm_in.weight", (2 * Di, H)), in_bias=src.optional(p + "ssm_in.bias", (2 * Di,)),
            conv_w=src.floats(p + "ssm_conv1d.weight", (Di, s.d_conv)),
            conv_b=src.optional(p + "ssm_conv1d.bias", (Di,)),
            x_proj=src.matrix(p + "ssm_x.weight", (s.dt_rank + 2 * N, Di)),
            dt_proj=src.matrix(p + "ssm_dt.weight", (Di, s.dt_rank)), dt_b=src.floats(p + "ssm_dt.bias", (Di,)),
            A=src.floats(p + "ssm_a", (Di, N)), D=src.floats(p + "ssm_d", (Di,)),
            out_proj=src.matrix(p + "ssm_out.weight", (H, Di)), out_bias=src.optional(p + "ssm_out.bias", (H,))))
    embed, final_norm, lm_head = _ends(src, cfg)
    return MambaModel(cfg, s, MambaWeights(embed, layers, final_norm, lm_head))


def mamba2_sizes(gf: GGUFFile) -> tuple[ModelConfig, Mamba2Shape]:
    """The ModelConfig and the mixer's sizes of a Mamba-2 file (its header only)."""
    keys = SSMKeys(gf, "mamba2")
    d_inner, heads = keys.count("ssm.inner_size"), keys.count("ssm.time_step_rank")
    groups = keys.count("ssm.group_count") if "mamba2.ssm.group_count" in gf.metadata else 1
    if d_inner % heads or heads % groups:
        raise ModelFormatError(f"{gf.path}: mamba2.ssm.inner_size {d_inner} is not a multiple of the head count "
                               f"(mamba2.ssm.time_step_rank) {heads}, or that of the group count {groups}",
                               f"the metadata contradicts itself; {RECONVERT}")
    # llama.cpp applies no time-step limit (transformers' default is none either: 0 to infinity)
    s = Mamba2Shape(d_inner=d_inner, d_state=keys.count("ssm.state_size"), d_conv=keys.count("ssm.conv_kernel"),
                    heads=heads, head_dim=d_inner // heads, groups=groups, dt_min=0.0, dt_max=math.inf)
    return _model_config(gf, "mamba2", keys, d_inner, asdict(s)), s


def _load_mamba2(gf: GGUFFile, dtype: str, use_native: bool) -> Mamba2Model:
    cfg, s = mamba2_sizes(gf)
    d_inner, heads, groups = s.d_inner, s.heads, s.groups
    src = RecurrentGGUFSource(gf, cfg, dtype, use_native, "a Mamba-2 model")
    H = cfg.hidden_size
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        layers.append(Mamba2Layer(
            norm=src.floats(p + "attn_norm.weight", (H,)),
            in_proj=src.matrix(p + "ssm_in.weight", (d_inner + s.conv_dim + heads, H)),
            in_bias=src.optional(p + "ssm_in.bias", (d_inner + s.conv_dim + heads,)),
            conv_w=src.floats(p + "ssm_conv1d.weight", (s.conv_dim, s.d_conv)),
            conv_b=src.optional(p + "ssm_conv1d.bias", (s.conv_dim,)),
            dt_bias=src.floats(p + "ssm_dt.bias", (heads,)),
            A=src.floats(p + "ssm_a", (heads, 1)).reshape(heads), D=src.floats(p + "ssm_d", (heads, 1)).reshape(heads),
            gate_norm=src.floats(p + "ssm_norm.weight", (groups, d_inner // groups)).reshape(d_inner),
            out_proj=src.matrix(p + "ssm_out.weight", (H, d_inner)), out_bias=src.optional(p + "ssm_out.bias", (H,))))
    embed, final_norm, lm_head = _ends(src, cfg)
    return Mamba2Model(cfg, s, Mamba2Weights(embed, layers, final_norm, lm_head))
