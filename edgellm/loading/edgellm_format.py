"""edgellm's own model file: a safetensors file holding ModelWeights in any precision format.

GGUF cannot hold int8/int4 group-wise/FP8/ternary matrices as edgellm runs them, so
``edgellm quantize --format int4 --out model.safetensors`` writes this format (any format can
be written to it; GGUF-known formats default to ``.gguf``). Layout, version 1:

* ``__metadata__`` (safetensors' string map):

  - ``format`` = ``"edgellm"``, ``edgellm.version`` = ``"1"``;
  - ``edgellm.weights``: the format name it was made with (``int4-g32``); ``edgellm.keep``: JSON
    list of the ``--keep`` patterns;
  - ``edgellm.config``: JSON of :class:`~edgellm.config.ModelConfig`;
  - ``edgellm.layers``: JSON ``{matrix name: {"format": ..., "shape": [N, K], ...}}`` for the
    matrices ``token_embd``, ``blk.N.attn_qkv``/``attn_output``/``ffn_gate_up``/``ffn_down`` and
    (untied only) ``output``; q/k rows are in edgellm's (Hugging Face) order, not llama.cpp's;
  - ``edgellm.tokenizer``: JSON ``{"kind": "gguf", "metadata": {...}}`` (the source GGUF's
    key/values) or ``{"kind": "files", "files": {"tokenizer.json": text, ...}}`` (HF source).

* tensors, named ``<matrix>.<part>``; parts per ``format``:

  - ``float32``/``bfloat16``/``float16``: ``weight`` [N, K];
  - ``int8``: ``q`` int8 [N, K], ``scale`` f32 [N];
  - ``int4``: ``q`` u8 [N, K/2] (element 2j in the low nibble), ``scale`` bf16 [N, K/g], ``zero``
    bf16 [N, K/g] (absent when ``symmetric``); params ``group``, ``symmetric``; w = (q-8)*scale+zero;
  - ``fp8``: ``w`` float8_e4m3fn/float8_e5m2 [N, K], ``scale`` f32 [N]; param ``variant``;
  - ``ternary``: ``codes`` u8 [N, K/4] (see :mod:`edgellm.quant.ternary`), ``scale`` f32 [N];
  - ``gguf``: ``raw`` u8 [N, row bytes], GGUF blocks of ``ggml_type``;

  and the vectors ``blk.N.attn_norm``, ``blk.N.ffn_norm``, ``blk.N.attn_qkv_bias`` (Qwen2),
  ``output_norm`` (float32).

Readers refuse a file whose ``format``/``edgellm.version`` they do not know.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from edgellm.errors import ModelFormatError, UnsupportedModelError

VERSION = "1"


def _config_from_dict(d: dict):
    from edgellm.config import ModelConfig, RopeScaling

    d = dict(d)
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if d.get("sliding_layers") is not None:   # a JSON list back to the config's tuple
        d["sliding_layers"] = tuple(d["sliding_layers"])
    return ModelConfig(**d)


def read_header(path: Path) -> dict[str, str]:
    """The ``__metadata__`` map of an edgellm safetensors file (ModelFormatError if it is not one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any parse failure is a format problem
        raise ModelFormatError(f"{path}: not a readable safetensors file ({e})",
                               "write it again with `edgellm quantize ... --out FILE.safetensors`") from None
    if meta.get("format") != "edgellm":
        raise ModelFormatError(f"{path}: a safetensors file, but not an edgellm model file",
                               "pass a Hugging Face model folder (with config.json) or a file written by "
                               "`edgellm quantize`")
    if meta.get("edgellm.version") != VERSION:
        raise UnsupportedModelError(f"{path}: edgellm file version {meta.get('edgellm.version')!r} is not "
                                    f"supported (this edgellm reads version {VERSION})",
                                    "re-create it with this version's `edgellm quantize`")
    return meta


def read_config(path: Path):
    return _config_from_dict(json.loads(read_header(path)["edgellm.config"]))


def tokenizer_from_info(info: dict):
    from edgellm.tokenizer import Tokenizer

    if info["kind"] == "gguf":
        return Tokenizer.from_gguf_metadata(info["metadata"])
    with tempfile.TemporaryDirectory(prefix="edgellm-tok-") as tmp:
        for name, text in info["files"].items():
            Path(tmp, os.path.basename(name)).write_text(text, encoding="utf-8")
        return Tokenizer.from_file(Path(tmp) / "tokenizer.json")


def weight_from_parts(params: dict, parts: dict[str, torch.Tensor]):
    """Rebuild one matrix's Weight from its params and tensors (what ``Weight.parts()`` gave)."""
    from edgellm.dtypes import FLOAT_DTYPES
    from edgellm.quant.builtin import entry

    kind = params["format"]
    try:   # a dense matrix is saved under its dtype's name, not as "dense"
        fmt = entry("dense" if kind in FLOAT_DTYPES else kind) if kind != "dense" else None
    except KeyError:
        fmt = None
    if fmt is None:
        raise UnsupportedModelError(f"matrix format {kind!r} is unknown to this edgellm",
                                    "re-create the file with this version's `edgellm quantize`")
    return fmt.load(params, parts)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` at a 64-byte-aligned address. safetensors hands out tensors at the file's offsets,
    and PyTorch's int8 weight-only kernel crashes (SIGSEGV, torch 2.13) on a weight that is not
    aligned; a fresh allocation is."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def load_edgellm(path, use_native: bool = True):
    """``(config, tokenizer, ModelWeights, file size, header)`` of an edgellm model file."""
    from safetensors import safe_open

    from edgellm.models.llama import BlockWeights, ModelWeights

    path = Path(path)
    meta = read_header(path)
    try:
        cfg = _config_from_dict(json.loads(meta["edgellm.config"]))
        layers = json.loads(meta["edgellm.layers"])
        tok_info = json.loads(meta["edgellm.tokenizer"])
    except (KeyError, ValueError, TypeError) as e:
        raise ModelFormatError(f"{path}: damaged edgellm header ({type(e).__name__}: {e})",
                               "write the file again with `edgellm quantize`") from None
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())

        def tensor(name: str) -> torch.Tensor:
            if name not in names:
                raise ModelFormatError(f"{path}: tensor '{name}' is missing", "write the file again")
            return f.get_tensor(name)

        def matrix(name: str):
            if name not in layers:
                raise ModelFormatError(f"{path}: matrix '{name}' is missing", "write the file again")
            params = layers[name]
            prefix = name + "."
            parts = {n[len(prefix):]: _aligned(f.get_tensor(n)) for n in names if n.startswith(prefix)}
            w = weight_from_parts(params, parts)
            if tuple(w.shape) != tuple(params["shape"]):
                raise ModelFormatError(f"{path}: matrix '{name}' has shape {tuple(w.shape)}, "
                                       f"header says {tuple(params['shape'])}", "write the file again")
            return w

        blocks = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            blocks.append(BlockWeights(
                attn_norm=tensor(p + "attn_norm").float(),
                qkv=matrix(p + "attn_qkv"),
                qkv_bias=tensor(p + "attn_qkv_bias").float() if cfg.qkv_bias else None,
                o=matrix(p + "attn_output"),
                ffn_norm=tensor(p + "ffn_norm").float(),
                gate_up=matrix(p + "ffn_gate_up"),
                down=matrix(p + "ffn_down"),
            ))
        embed = matrix("token_embd")
        lm_head = embed if cfg.tie_embeddings else matrix("output")
        weights = ModelWeights(embed=embed, blocks=blocks, final_norm=tensor("output_norm").float(), lm_head=lm_head)
    return cfg, tokenizer_from_info(tok_info), weights, path.stat().st_size, meta
