"""Turn a GGUF file or a Hugging Face folder into the model's weights, in the chosen format.

``dtype="float32"`` (the default) keeps GGUF matrices of a type the native kernels read
(:data:`edgellm.kernels.NATIVE_FORMATS`: Q4_0, Q4_1, Q5_0, Q8_0 as they are; Q4_K and Q6_K repacked
exactly as Q4_KR / Q6_KR) as their raw blocks, and dequantises other block types to float32.
``"bfloat16"`` (the opt-in fast mode) keeps the same blocks, marked to multiply in bf16
(:mod:`edgellm.quant.bf16`: prefill's GEMM; decode's dot products where the CPU has AVX512_BF16,
else the exact block kernels), and holds every other matrix
(other block types, float tensors, an HF folder's, all of them without the native kernels) as a
bf16 matrix, which computes in bf16. Norm weights and biases are always float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgellm.config import ModelConfig
from edgellm.dtypes import compute_dtype
from edgellm.errors import ModelFormatError
from edgellm.kernels import NATIVE_FORMATS, native
from edgellm.loading.gguf import GGUFFile, GGUFTensor
from edgellm.models.gemma3 import Gemma3BlockWeights
from edgellm.models.llama import BlockWeights, ModelWeights
from edgellm.models.moe import ExpertWeights, MoEBlockWeights
from edgellm.quant import gguf_blocks, repack
from edgellm.quant.base import CONVERT_ROWS, Weight, concat_rows
from edgellm.quant.bf16 import warn_if_emulated
from edgellm.quant.dense import DenseWeight
from edgellm.quant.gguf_weights import GGUFBlockWeight


def _rope_unpermute_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order that turns llama.cpp's q/k layout (adjacent-pair RoPE) back into HF's (rotate-half).

    llama.cpp's converter reorders each head's rows from [first half; second half] to interleaved
    pairs; reading row ``idx[r]`` of the GGUF matrix for HF row ``r`` undoes it.
    """
    head_dim = n_rows // n_heads
    return torch.arange(n_rows).view(n_heads, head_dim // 2, 2).transpose(1, 2).reshape(n_rows)


class GGUFSource:
    """Tensors of a GGUF file: vectors as float32, matrices kept in the file's block format where
    the native kernels read it (``kind``: what the file should hold, for the missing-tensor error)."""

    kind = "a Llama-family model"

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, dtype: torch.dtype, use_native: bool):
        self.gf, self.cfg, self.dtype = gf, cfg, dtype
        self.native = use_native and dtype in (torch.float32, torch.bfloat16) and native() is not None
        self.bf16_mode = dtype == torch.bfloat16   # native blocks: --dtype bfloat16's arithmetic (quant/bf16.py)
        self.unpermute = cfg.architecture in ("llama", "mistral")

    def has(self, name: str) -> bool:
        return name in self.gf.tensors

    def _tensor(self, name: str):
        t = self.gf.tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.gf.path}: tensor '{name}' is missing",
                                   f"the file is incomplete or not {self.kind}; re-export it")
        return t

    def vector(self, name: str) -> torch.Tensor:
        t = self._tensor(name)
        out = t.dequantize().float().reshape(-1)
        t.release()
        return out

    def matrix(self, name: str, expect: tuple[int, int], rope_heads: int | None = None,
               kept: bool = False) -> Weight:
        """``kept``: the caller keeps the matrix as it is (fuses it with no other), so blocks the
        kernels read as stored are used in place in the file's mapping rather than copied."""
        t = self._tensor(name)
        in_place = kept and self._reads_as_stored(t, rope_heads)
        try:
            return self._matrix(t, expect, rope_heads, in_place)
        finally:
            if not in_place:
                t.release()   # copied: its file pages need not stay resident

    def _reads_as_stored(self, t, rope_heads: int | None) -> bool:
        return self.native and t.ggml_type in NATIVE_FORMATS and not (rope_heads and self.unpermute)

    def fused(self, parts: list[tuple[str, tuple[int, int], int | None]]) -> Weight:
        """The matrices ``parts`` ((name, expected shape, rope heads) each) stacked by rows: fused
        q/k/v or gate/up. Blocks the kernels read as stored, all of one type, are copied (or
        permuted) once, from the file's mapping straight into the fused matrix: no copy of each
        part to concatenate, so half the fresh memory is touched (start-up, docs/kernels.md)."""
        tensors = [self._tensor(name) for name, _, _ in parts]
        if not (self.native and tensors[0].ggml_type in NATIVE_FORMATS
                and all(t.ggml_type == tensors[0].ggml_type for t in tensors)):
            return _fused([self.matrix(*part) for part in parts])
        for t, (_, expect, _) in zip(tensors, parts):
            self._check_shape(t, expect)
        raws = [torch.from_numpy(t.mapped_bytes()).view(expect[0], -1) for t, (_, expect, _) in zip(tensors, parts)]
        fused = torch.empty((sum(r.shape[0] for r in raws), raws[0].shape[1]), dtype=torch.uint8)
        row = 0
        for raw, (_, expect, heads) in zip(raws, parts):
            rows = fused[row:row + expect[0]]
            if heads and self.unpermute:
                torch.index_select(raw, 0, _rope_unpermute_rows(expect[0], heads), out=rows)
            else:
                rows.copy_(raw)
            row += expect[0]
        return self._blocks(fused, tensors[0].ggml_type, parts[0][1][1])

    def _check_shape(self, t, expect: tuple[int, int]) -> None:
        if tuple(t.shape) != expect:
            raise ModelFormatError(f"{self.gf.path}: tensor '{t.name}' has shape {tuple(t.shape)}, expected {expect}",
                                   "the tensor shapes contradict the file's own metadata; re-export the model")

    def expert_matrices(self, name: str, n_experts: int, expect: tuple[int, int]) -> list[Weight]:
        """The experts of a stacked [n_experts, rows, cols] tensor (llama.cpp's ``*_exps``), one
        matrix each, kept in the file's format: quantisation is row-wise, so expert e's blocks are
        rows e*rows .. (e+1)*rows of the tensor's bytes."""
        t = self._tensor(name)
        if tuple(t.shape) != (n_experts, *expect):
            raise ModelFormatError(
                f"{self.gf.path}: tensor '{name}' has shape {tuple(t.shape)}, expected {(n_experts, *expect)}",
                "the stacked expert tensor contradicts the file's expert count or widths; re-export the model")
        size = t.nbytes // n_experts
        parts = [GGUFTensor(f"{name}[{e}]", expect, t.ggml_type, t.data[e * size:(e + 1) * size], t.offset + e * size, t.path)
                 for e in range(n_experts)]
        return [self._matrix(part, expect, None) for part in parts]

    def _matrix(self, t, expect: tuple[int, int], rope_heads: int | None, in_place: bool = False) -> Weight:
        self._check_shape(t, expect)
        order = _rope_unpermute_rows(expect[0], rope_heads) if rope_heads and self.unpermute else None
        if self.native and t.ggml_type in NATIVE_FORMATS:
            # in place, or permuted straight out of the mapping (one copy): see GGUFTensor.mapped_bytes
            stored = t.mapped_bytes() if in_place or order is not None else t.copy_bytes()
            raw = torch.from_numpy(stored).view(expect[0], -1)
            if order is not None:
                raw = raw.index_select(0, order)
            return self._blocks(raw, t.ggml_type, expect[1])
        if self.native and t.ggml_type in repack.REPACKED:   # K-quants: per-32 constants multiplied out, exactly
            raw = repack.repack(torch.from_numpy(t.mapped_bytes()), t.ggml_type, *expect)
            if order is not None:
                raw = raw.index_select(0, order)
            return self._blocks(raw, repack.REPACKED[t.ggml_type], expect[1])
        dense = t.dequantize().reshape(expect)
        if order is not None:
            dense = dense.index_select(0, order)
        return DenseWeight(dense.to(self.dtype))


    def _blocks(self, raw: torch.Tensor, ggml_type: str, n_cols: int) -> GGUFBlockWeight:
        w = GGUFBlockWeight(raw, ggml_type, n_cols)
        w.bf16_mode = self.bf16_mode
        return w


def _q5_0_as_q8_0(data, n_rows: int, n_cols: int) -> torch.Tensor:
    """Q5_0 blocks (w = d * (q - 16), q in 0..31) rewritten as Q8_0 blocks (w = d * q8) losslessly:
    the same fp16 scale, and q - 16 fits in int8. Costs 34 instead of 22 bytes per 32 weights.
    Rows go CONVERT_ROWS at a time: unpacking a 136M-weight embedding at once took ~650 MB of temporaries."""
    n_blocks = n_cols // 32
    rows = np.asarray(data).reshape(n_rows, -1)
    out = torch.empty(n_rows, n_blocks, 34, dtype=torch.uint8)
    for r0 in range(0, n_rows, CONVERT_ROWS):
        r1 = min(n_rows, r0 + CONVERT_ROWS)
        d, q = gguf_blocks.unpack_q5_0(rows[r0:r1], r1 - r0, n_cols)
        out[r0:r1, :, :2] = d.contiguous().view(torch.uint8).view(r1 - r0, n_blocks, 2)
        out[r0:r1, :, 2:] = (q.to(torch.int16) - 16).to(torch.int8).view(torch.uint8).view(r1 - r0, n_blocks, 32)
    return out.view(n_rows, n_blocks * 34)


class _HFSource:
    """Tensors of a Hugging Face folder (``*.safetensors``), renamed to GGUF's names."""

    _NAMES = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    _BLOCK = {
        "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    # Gemma 3 norms around attention and the MLP: its post_attention_layernorm is not Llama's
    _GEMMA3_BLOCK = {
        **_BLOCK,
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
        "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    }

    # the experts of transformers' checkpoints ("{e}": the expert's number)
    _MIXTRAL_BLOCK = {
        **_BLOCK,
        "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
        "ffn_gate_exps.weight": "block_sparse_moe.experts.{e}.w1.weight",
        "ffn_up_exps.weight": "block_sparse_moe.experts.{e}.w3.weight",
        "ffn_down_exps.weight": "block_sparse_moe.experts.{e}.w2.weight",
    }
    _QWEN_MOE_BLOCK = {
        **_BLOCK,
        "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
        "ffn_gate_inp.weight": "mlp.gate.weight",
        "ffn_gate_exps.weight": "mlp.experts.{e}.gate_proj.weight",
        "ffn_up_exps.weight": "mlp.experts.{e}.up_proj.weight",
        "ffn_down_exps.weight": "mlp.experts.{e}.down_proj.weight",
        "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
        "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
        "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
        "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    }

    # transformers 5 holds each layer's experts stacked (gate and up fused, gate first) and saves
    # them so with save_pretrained(save_original_format=False); every layout then names its router
    # mlp.gate, Mixtral included
    _STACKED_EXPERTS = {
        "ffn_gate_inp.weight": "mlp.gate.weight",
        "ffn_gate_exps.weight": "mlp.experts.gate_up_proj",
        "ffn_up_exps.weight": "mlp.experts.gate_up_proj",
        "ffn_down_exps.weight": "mlp.experts.down_proj",
    }

    @classmethod
    def names_of(cls, architecture: str) -> dict[str, str]:
        """GGUF block tensor name -> the checkpoint's, for ``architecture``."""
        return {"gemma3": cls._GEMMA3_BLOCK, "mixtral": cls._MIXTRAL_BLOCK, "qwen2moe": cls._QWEN_MOE_BLOCK,
                "qwen3moe": cls._QWEN_MOE_BLOCK}.get(architecture, cls._BLOCK)

    def __init__(self, folder: Path, dtype: torch.dtype, architecture: str = "llama"):
        from safetensors import safe_open

        self.dtype = dtype
        self.block_names = self.names_of(architecture)
        # Gemma checkpoints store w and apply (1 + w); the model takes the multiplier (as GGUF stores it)
        self.norm_offset = 1.0 if architecture == "gemma3" else 0.0
        self.files = {}
        for f in sorted(folder.glob("*.safetensors")):
            handle = safe_open(str(f), framework="pt")
            for key in handle.keys():
                self.files[key] = handle
        if not self.files:
            raise ModelFormatError(f"{folder}: no *.safetensors files", "put the model's safetensors weights there")
        self.stacked_experts = any(key.endswith("mlp.experts.gate_up_proj") for key in self.files)
        if self.stacked_experts:
            self.block_names = {**self.block_names, **self._STACKED_EXPERTS}

    def _hf(self, name: str) -> str:
        if name in self._NAMES:
            return self._NAMES[name]
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{self.block_names[rest]}"

    def has(self, name: str) -> bool:
        return self._hf(name) in self.files

    def _get(self, name: str) -> torch.Tensor:
        key = self._hf(name)
        if key not in self.files:
            raise ModelFormatError(f"tensor '{key}' is missing from the safetensors files",
                                   "the folder's weights are incomplete")
        return self.files[key].get_tensor(key)

    def vector(self, name: str) -> torch.Tensor:
        v = self._get(name).float().reshape(-1)
        return v + self.norm_offset if name.endswith("norm.weight") and self.norm_offset else v

    def matrix(self, name: str, expect: tuple[int, int], rope_heads: int | None = None,
               kept: bool = False) -> Weight:
        """``kept`` is GGUFSource's: here every matrix is converted to the compute dtype anyway."""
        t = self._get(name)
        if tuple(t.shape) != expect:
            raise ModelFormatError(f"tensor '{self._hf(name)}' has shape {tuple(t.shape)}, expected {expect}",
                                   "config.json does not describe these weights")
        return DenseWeight(t.to(self.dtype))

    def fused(self, parts: list[tuple[str, tuple[int, int], int | None]]) -> Weight:
        """The matrices ``parts`` ((name, expected shape, rope heads) each) stacked by rows."""
        return _fused([self.matrix(*part) for part in parts])

    def expert_matrices(self, name: str, n_experts: int, expect: tuple[int, int]) -> list[Weight]:
        """The experts of GGUF's stacked tensor ``name``: the checkpoint's one matrix per expert,
        or the slices of its stacked tensor."""
        _, i, rest = name.split(".", 2)
        pattern = f"model.layers.{i}.{self.block_names[rest]}"
        if self.stacked_experts:
            return self._stacked_expert_matrices(pattern, rest, n_experts, expect)
        out = []
        for e in range(n_experts):
            key = pattern.format(e=e)
            if key not in self.files:
                raise ModelFormatError(f"tensor '{key}' is missing from the safetensors files",
                                       f"config.json says {n_experts} experts; the folder's weights are incomplete")
            t = self.files[key].get_tensor(key)
            if tuple(t.shape) != expect:
                raise ModelFormatError(f"tensor '{key}' has shape {tuple(t.shape)}, expected {expect}",
                                       "config.json does not describe these weights")
            out.append(DenseWeight(t.to(self.dtype)))
        return out


    def _stacked_expert_matrices(self, key: str, rest: str, n_experts: int, expect: tuple[int, int]) -> list[Weight]:
        """Expert e's matrix of a stacked [n_experts, rows, cols] tensor; gate_up_proj holds the
        gate's rows, then the up projection's."""
        if key not in self.files:
            raise ModelFormatError(f"tensor '{key}' is missing from the safetensors files",
                                   "the folder holds stacked experts in other layers; its weights are incomplete")
        t = self.files[key].get_tensor(key)
        rows, cols = expect
        fused = key.endswith("gate_up_proj")
        want = (n_experts, 2 * rows if fused else rows, cols)
        if tuple(t.shape) != want:
            raise ModelFormatError(f"tensor '{key}' has shape {tuple(t.shape)}, expected {want}",
                                   "config.json does not describe these weights")
        if fused:
            t = t[:, rows:] if rest.startswith("ffn_up") else t[:, :rows]
        return [DenseWeight(t[e].to(self.dtype)) for e in range(n_experts)]


def _fused(parts: list[Weight]) -> Weight:
    fused = concat_rows(parts)
    if fused is None and {p.format for p in parts} == {"Q5_0", "Q8_0"}:
        # Q4_K_M files mix them within q/k/v (attn_v is Q8_0 in half the layers): Q5_0 rows are
        # exactly Q8_0 rows, so the fused matrix stays in one native format
        fused = concat_rows([_as_q8_0(p) if p.format == "Q5_0" else p for p in parts])
    if fused is None:  # other mixed formats: fall back to dense float32 so one call still does all
        fused = DenseWeight(torch.cat([p.dequantize() for p in parts]))
    return fused


def _as_q8_0(w: GGUFBlockWeight) -> GGUFBlockWeight:
    """A Q5_0 matrix as the same values in Q8_0 blocks (its --dtype bfloat16 mode kept)."""
    out = GGUFBlockWeight(_q5_0_as_q8_0(w.raw.numpy(), *w.shape), "Q8_0", w.shape[1])
    out.bf16_mode = w.bf16_mode
    return out


def _build(src, cfg: ModelConfig, label: str, layers: range | None = None, ends: bool = True) -> ModelWeights:
    """``layers``: load only these blocks, ``ends``: and the embedding, final norm and head (a
    rank of a split model, edgellm.runtime.sharding, reads only its part of the file)."""
    H, Q, KV, F = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.ffn_size
    blocks = []
    for i in tqdm(range(cfg.n_layers) if layers is None else layers, desc=f"loading {label}", unit="block", delay=1.0, leave=False):
        p = f"blk.{i}."
        bias = None
        if cfg.qkv_bias:
            bias = torch.cat([src.vector(p + "attn_q.bias"), src.vector(p + "attn_k.bias"),
                              src.vector(p + "attn_v.bias")])
        sparse = cfg.experts is not None and cfg.experts.sparse(i)
        common = dict(
            attn_norm=src.vector(p + "attn_norm.weight"),
            qkv=src.fused([(p + "attn_q.weight", (Q, H), cfg.n_heads), (p + "attn_k.weight", (KV, H), cfg.n_kv_heads),
                           (p + "attn_v.weight", (KV, H), None)]),
            qkv_bias=bias,
            o=src.matrix(p + "attn_output.weight", (H, Q), kept=True),
            ffn_norm=src.vector(p + "ffn_norm.weight"),
            gate_up=None if sparse else src.fused([(p + "ffn_gate.weight", (F, H), None),
                                                   (p + "ffn_up.weight", (F, H), None)]),
            down=None if sparse else src.matrix(p + "ffn_down.weight", (H, F), kept=True),
        )
        if cfg.experts is not None:
            blocks.append(MoEBlockWeights(
                **common, experts=_expert_weights(src, cfg, p) if sparse else None,
                q_norm=src.vector(p + "attn_q_norm.weight") if cfg.qk_norm else None,
                k_norm=src.vector(p + "attn_k_norm.weight") if cfg.qk_norm else None))
        elif cfg.architecture == "gemma3":
            blocks.append(Gemma3BlockWeights(
                **common, q_norm=src.vector(p + "attn_q_norm.weight"), k_norm=src.vector(p + "attn_k_norm.weight"),
                post_attn_norm=src.vector(p + "post_attention_norm.weight"),
                post_ffn_norm=src.vector(p + "post_ffw_norm.weight")))
        else:
            blocks.append(BlockWeights(**common))
    if not ends:
        return ModelWeights(embed=None, blocks=blocks, final_norm=None, lm_head=None)
    embed = src.matrix("token_embd.weight", (cfg.vocab_size, H), kept=True)
    lm_head = embed if cfg.tie_embeddings or not src.has("output.weight") else \
        src.matrix("output.weight", (cfg.vocab_size, H), kept=True)
    return ModelWeights(embed=embed, blocks=blocks, final_norm=src.vector("output_norm.weight"), lm_head=lm_head)


def _expert_weights(src, cfg: ModelConfig, p: str) -> ExpertWeights:
    """Router, experts (gate and up fused per expert) and shared expert of block prefix ``p``."""
    H, ex = cfg.hidden_size, cfg.experts
    E, F = ex.n_experts, ex.ffn_size
    gates = src.expert_matrices(p + "ffn_gate_exps.weight", E, (F, H))
    ups = src.expert_matrices(p + "ffn_up_exps.weight", E, (F, H))
    out = ExpertWeights(router=src.matrix(p + "ffn_gate_inp.weight", (E, H)),
                        gate_up=[_fused([g, u]) for g, u in zip(gates, ups)],
                        down=src.expert_matrices(p + "ffn_down_exps.weight", E, (H, F)))
    if ex.shared_ffn_size:
        S = ex.shared_ffn_size
        out.shared_gate_up = _fused([src.matrix(p + "ffn_gate_shexp.weight", (S, H)),
                                     src.matrix(p + "ffn_up_shexp.weight", (S, H))])
        out.shared_down = src.matrix(p + "ffn_down_shexp.weight", (H, S))
        out.shared_gate = src.vector(p + "ffn_gate_inp_shexp.weight")   # [1, hidden] or [hidden]: flattened
    return out


def load_gguf_weights(gf: GGUFFile, cfg: ModelConfig, dtype: str = "float32", use_native: bool = True,
                      layers: range | None = None, ends: bool = True) -> ModelWeights:
    """``use_native=False`` dequantises every matrix (the path taken where the kernels can't build);
    ``layers``/``ends``: a part of the model (see ``_build``)."""
    src = GGUFSource(gf, cfg, compute_dtype(dtype), use_native)
    if src.native and src.bf16_mode:
        warn_if_emulated()
    return _build(src, cfg, gf.path.name, layers, ends)


def load_hf_weights(folder: Path, cfg: ModelConfig, dtype: str = "float32", layers: range | None = None,
                    ends: bool = True) -> ModelWeights:
    return _build(_HFSource(folder, compute_dtype(dtype), cfg.architecture), cfg, folder.name, layers, ends)


def read_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{folder}: no config.json", "a Hugging Face model folder needs its config.json") from None
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{path}: not valid JSON ({err})", "restore the model's original config.json") from None
    return ModelConfig.from_hf_config(data, name=folder.name)


def check_vector_shapes(weights: ModelWeights, cfg: ModelConfig, hf_names: bool = False) -> None:
    """Refuse norm weights and q/k/v biases whose length contradicts ``cfg`` (they are read as flat
    vectors, so nothing else checks them: a wrong length used to fail at the first forward pass).
    ``hf_names``: name the tensors as a Hugging Face folder does, not as GGUF does."""
    def name(gguf_name: str) -> str:
        if not hf_names:
            return gguf_name
        if gguf_name in _HFSource._NAMES:
            return _HFSource._NAMES[gguf_name]
        _, i, rest = gguf_name.split(".", 2)
        names = _HFSource.names_of(cfg.architecture)
        return f"model.layers.{i}.{names[rest]}"

    def check(gguf_name: str, vector: torch.Tensor | None, length: int) -> None:
        if vector is not None and tuple(vector.shape) != (length,):
            raise ModelFormatError(
                f"tensor '{name(gguf_name)}' has shape {tuple(vector.shape)}, expected ({length},)",
                "the tensor contradicts the model's own metadata (its hidden size); re-export the model")

    if weights.final_norm is not None:      # None: a rank of a split model without the ends
        check("output_norm.weight", weights.final_norm, cfg.hidden_size)
    for i, block in enumerate(weights.blocks):
        check(f"blk.{i}.attn_norm.weight", block.attn_norm, cfg.hidden_size)
        check(f"blk.{i}.ffn_norm.weight", block.ffn_norm, cfg.hidden_size)
        if block.qkv_bias is not None:   # q, k and v biases concatenated
            check(f"blk.{i}.attn_q.bias", block.qkv_bias, cfg.q_size + 2 * cfg.kv_size)
        if isinstance(block, MoEBlockWeights):
            for norm, tensor_name in ((block.q_norm, "attn_q_norm"), (block.k_norm, "attn_k_norm")):
                check(f"blk.{i}.{tensor_name}.weight", norm, cfg.head_dim)
            if block.experts is not None:
                check(f"blk.{i}.ffn_gate_inp_shexp.weight", block.experts.shared_gate, cfg.hidden_size)
        if isinstance(block, Gemma3BlockWeights):
            check(f"blk.{i}.attn_q_norm.weight", block.q_norm, cfg.head_dim)
            check(f"blk.{i}.attn_k_norm.weight", block.k_norm, cfg.head_dim)
            check(f"blk.{i}.post_attention_norm.weight", block.post_attn_norm, cfg.hidden_size)
            check(f"blk.{i}.post_ffw_norm.weight", block.post_ffn_norm, cfg.hidden_size)
