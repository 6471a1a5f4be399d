"""Convert a loaded model's weights to another precision format, in memory or into a file.

* :func:`convert_weights` (``--weights F`` on generate/bench/eval): a new ``LoadedModel`` whose
  matrices are in format ``F`` (``--keep`` ones in bfloat16); norms and biases stay float32.
* :func:`quantize_model` (``edgellm quantize``): writes a GGUF file (formats GGUF knows:
  float32/float16/bfloat16 and the block types) or an edgellm safetensors file
  (:mod:`edgellm.loading.edgellm_format`; every format). Everything that can be refused is
  checked before any tensor is touched, and the file appears atomically (temporary file, then
  rename), so a failure leaves no half-written output.

GGUF output is made from the source GGUF's own tensors, in their own (llama.cpp) row order, so
q/k need no re-permutation and each row is quantised exactly as the in-memory conversion does
(quantisation is row-wise); the source's metadata is copied with ``general.file_type`` set.

Format names are parsed by :mod:`edgellm.quant.registry`; a matrix is converted by the format's
registered entry (:mod:`edgellm.quant.builtin`). Matrices are named as in GGUF, after fusion:
``token_embd``, ``output`` (alias ``lm_head``), ``blk.N.attn_qkv`` (answers to
``attn_q``/``attn_k``/``attn_v`` too), ``blk.N.attn_output``, ``blk.N.ffn_gate_up``
(``ffn_gate``/``ffn_up``), ``blk.N.ffn_down``; a mixture-of-experts layer has ``blk.N.ffn_gate_up_exps`` (``ffn_gate_exps``/
``ffn_up_exps``) and ``blk.N.ffn_down_exps`` (each converted expert by expert, one matrix per
expert) and, in Qwen2-MoE, ``blk.N.ffn_gate_up_shexp`` and ``blk.N.ffn_down_shexp``; its router
(``ffn_gate_inp``) keeps its precision, as llama.cpp's quantiser does, since it picks the experts.
``--keep`` patterns select matrices left at 16 bits
(bfloat16): a name, a prefix (``blk.0`` = the whole first block; ``blk.-1`` = the last), or a shell
glob (``blk.*.ffn_down``). A pattern that matches nothing is an error. With tied embeddings
``token_embd`` and ``output`` are one matrix: keeping either keeps it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgellm.errors import InvalidParameterError, UnsupportedModelError
from edgellm.quant.base import Weight
from edgellm.quant.builtin import entry
from edgellm.quant.dense import DenseWeight
from edgellm.quant.registry import WeightFormat, parse_format

KEEP_DTYPE = torch.bfloat16

# general.file_type (llama.cpp's LlamaFileType) for each GGUF-writable format
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 14,
              "Q6_K": 18, "BF16": 32}


def convert_matrix(fmt: WeightFormat, w: Weight, segments: list[int] | None = None) -> Weight:
    """``w`` in format ``fmt``. ``segments``: row counts of the tensors fused into ``w`` (q/k/v,
    gate/up), so a per-tensor scale stays per original tensor."""
    return entry(fmt.kind).convert(w, fmt, segments)


def _keep_weight(w: Weight, fmt: WeightFormat) -> Weight:
    if fmt.kind == "dense" and fmt.dtype == torch.float32:
        return convert_matrix(fmt, w)          # "keep at 16 bits" never lowers a float32 model
    if isinstance(w, DenseWeight) and w.tensor.dtype in (torch.bfloat16, torch.float16):
        return w
    return DenseWeight(w.dequantize().to(KEEP_DTYPE))


def convert_model_weights(weights, cfg, fmt: WeightFormat, kept: set[str], progress: bool = False):
    """A new ModelWeights with every matrix in ``fmt`` except the ``kept`` ones (bf16)."""
    from edgellm.models.llama import ModelWeights

    layers = {ly.name: ly for ly in model_layers(cfg)}

    def conv(name: str, w: Weight) -> Weight:
        if name in kept:
            return _keep_weight(w, fmt)
        return convert_matrix(fmt, w, list(layers[name].segments))

    iterator = range(len(weights.blocks))
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=f"converting to {fmt.name}", unit="block", delay=1.0, leave=False,
                        file=sys.stderr)
    blocks = []
    for i in iterator:
        b, p = weights.blocks[i], f"blk.{i}."
        ex = getattr(b, "experts", None)
        dense = ex is None
        blocks.append(replace(b, qkv=conv(p + "attn_qkv", b.qkv), o=conv(p + "attn_output", b.o),
                              gate_up=conv(p + "ffn_gate_up", b.gate_up) if dense else None,
                              down=conv(p + "ffn_down", b.down) if dense else None))
        if not dense:
            blocks[-1].experts = replace(
                ex, gate_up=[conv(p + "ffn_gate_up_exps", m) for m in ex.gate_up],
                down=[conv(p + "ffn_down_exps", m) for m in ex.down],
                shared_gate_up=None if ex.shared_gate_up is None else conv(p + "ffn_gate_up_shexp", ex.shared_gate_up),
                shared_down=None if ex.shared_down is None else conv(p + "ffn_down_shexp", ex.shared_down))
    tied = weights.lm_head is weights.embed
    embed = conv("token_embd", weights.embed)
    lm_head = embed if tied else conv("output", weights.lm_head)
    return ModelWeights(embed=embed, blocks=blocks, final_norm=weights.final_norm, lm_head=lm_head)


def prepare(cfg, format: str | WeightFormat, keep=()) -> tuple[WeightFormat, set[str]]:
    """Parse and check a format and ``--keep`` against a model config (no tensor touched)."""
    fmt = format if isinstance(format, WeightFormat) else parse_format(format)
    if is_recurrent(cfg):      # its matrices are not the Llama family's: convert_recurrent checks them
        refuse_keep_on_recurrent(cfg, format, keep)
        return fmt, set()
    kept = resolve_keep(keep, cfg)
    check_model(fmt, cfg, kept)
    return fmt, kept


def convert_weights(loaded, format: str, keep=(), progress: bool = False):
    """``loaded`` (a LoadedModel) with its weights converted to ``format`` at load time.

    ``keep``: ``--keep`` patterns (matrices left at bfloat16). Raises InvalidParameterError
    (unknown format, group that does not divide a width, pattern matching nothing) or
    UnsupportedModelError (fp8 without float8 types) before converting anything.
    """
    from edgellm.loading.load import LoadedModel, build_model

    if getattr(loaded.model, "recurrent", False):
        return convert_recurrent(loaded, format, keep)
    fmt, kept = prepare(loaded.config, format, keep)
    t0 = time.perf_counter()
    weights = convert_model_weights(loaded.model.weights, loaded.config, fmt, kept, progress)
    label = fmt.name + (f"+keep({','.join(parse_keep(keep))})" if kept else "")
    return LoadedModel(loaded.source, loaded.config, build_model(loaded.config, weights), loaded.tokenizer,
                       label, loaded.file_bytes, loaded.load_s + time.perf_counter() - t0)


def convert_recurrent(loaded, format: str, keep=()):
    """A recurrent model (Mamba, Mamba-2, RWKV) with its matrices -- every :class:`Weight` of its
    weights and of their layers: projections, embedding, head -- in ``format``. The small tensors
    (convolution, decays, norms, biases) stay float32. A matrix whose width the format cannot
    split (Mamba's dt projection is dt_rank = hidden / 16 wide) is left as it is, as llama.cpp's
    quantiser leaves it; ``--keep`` is refused (its names are the Llama family's)."""
    import copy
    from dataclasses import fields

    refuse_keep_on_recurrent(loaded.config, format, keep)
    fmt = format if isinstance(format, WeightFormat) else parse_format(format)
    t0 = time.perf_counter()

    def conv(w: Weight) -> Weight:
        try:
            fmt.check_width("", w.shape[1])
        except InvalidParameterError:
            return w
        return convert_matrix(fmt, w)

    def converted(obj, done: dict[int, Weight]):
        """``obj`` (a dataclass) with its Weight fields converted; ``done``: by id, so a tied head
        stays the embedding's one matrix."""
        changes = {}
        for f in fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, Weight):
                changes[f.name] = done[id(v)] = done.get(id(v)) or conv(v)
        return replace(obj, **changes)

    from edgellm.loading.load import LoadedModel

    weights = loaded.model.weights
    done: dict[int, Weight] = {}
    model = copy.copy(loaded.model)    # the same model class and sizes over the converted weights
    model.weights = converted(replace(weights, layers=[converted(layer, done) for layer in weights.layers]), done)
    return LoadedModel(loaded.source, loaded.config, model, loaded.tokenizer, fmt.name, loaded.file_bytes,
                       loaded.load_s + time.perf_counter() - t0)


def is_recurrent(cfg) -> bool:
    """An attention-free model's config (its mixer's sizes are in ``extra["recurrent"]``)."""
    return "recurrent" in (cfg.extra or {})


def refuse_keep_on_recurrent(cfg, format, keep) -> None:
    if keep:
        raise InvalidParameterError(
            f"--keep names matrices of Llama-family models; the recurrent model '{cfg.architecture}' has other ones",
            f"drop --keep: {format} applies to all of this model's projections")


def weight_formats(weights) -> dict[str, int]:
    """{format name: number of matrices} of a ModelWeights (for reports)."""
    out: dict[str, int] = {}
    mats = [weights.embed] + [m for b in weights.blocks for m in b.matrices()]
    if weights.lm_head is not weights.embed:
        mats.append(weights.lm_head)
    for m in mats:
        out[m.format] = out.get(m.format, 0) + 1
    return out


# --------------------------------------------------------------------------------------------
# matrix names and --keep

@dataclass(frozen=True)
class Layer:
    name: str                     # "blk.3.attn_qkv"
    shape: tuple[int, int]        # [N, K]
    segments: tuple[int, ...]     # row counts of the fused tensors ((N,) when not fused)
    aliases: tuple[str, ...]      # other names that select it ("blk.3.attn_q", ...)


def model_layers(cfg) -> list[Layer]:
    """The weight matrices of a model with this config, in ModelWeights order."""
    H, Q, KV, Fs = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.ffn_size
    tied = cfg.tie_embeddings
    out = [Layer("token_embd", (cfg.vocab_size, H), (cfg.vocab_size,),
                 ("embed", "embed_tokens") + (("output", "lm_head") if tied else ()))]
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        out += [
            Layer(p + "attn_qkv", (Q + 2 * KV, H), (Q, KV, KV), (p + "attn_q", p + "attn_k", p + "attn_v")),
            Layer(p + "attn_output", (H, Q), (H,), (p + "attn_o",)),
        ]
        if cfg.experts is not None and cfg.experts.sparse(i):
            out += _expert_layers(cfg, p)
            continue
        out += [
            Layer(p + "ffn_gate_up", (2 * Fs, H), (Fs, Fs), (p + "ffn_gate", p + "ffn_up")),
            Layer(p + "ffn_down", (H, Fs), (H,), ()),
        ]
    if not tied:
        out.append(Layer("output", (cfg.vocab_size, H), (cfg.vocab_size,), ("lm_head",)))
    return out


def _expert_layers(cfg, p: str) -> list[Layer]:
    """A sparse layer's matrices; each experts' entry stands for every expert's matrix (shape: one
    expert's)."""
    H, F, S = cfg.hidden_size, cfg.experts.ffn_size, cfg.experts.shared_ffn_size
    out = [Layer(p + "ffn_gate_up_exps", (2 * F, H), (F, F), (p + "ffn_gate_exps", p + "ffn_up_exps")),
           Layer(p + "ffn_down_exps", (H, F), (H,), ())]
    if S:
        out += [Layer(p + "ffn_gate_up_shexp", (2 * S, H), (S, S), (p + "ffn_gate_shexp", p + "ffn_up_shexp")),
                Layer(p + "ffn_down_shexp", (H, S), (H,), ())]
    return out


def parse_keep(keep) -> list[str]:
    """``--keep`` values (repeatable, comma-separated) as a flat list of patterns."""
    if keep is None:
        return []
    if isinstance(keep, str):
        keep = [keep]
    return [p.strip() for item in keep for p in str(item).split(",") if p.strip()]


def resolve_keep(keep, cfg) -> set[str]:
    """Names of the matrices the ``--keep`` patterns select; InvalidParameterError for a pattern
    that selects nothing."""
    layers = model_layers(cfg)
    chosen: set[str] = set()
    for pattern in parse_keep(keep):
        p = pattern.lower().removesuffix(".weight")
        p = re.sub(r"^(blk|layers?|model\.layers)\.(-\d+)", lambda m: f"blk.{cfg.n_layers + int(m.group(2))}", p)
        p = re.sub(r"^(layers?|model\.layers)\.", "blk.", p)
        hits = {ly.name for ly in layers
                if any(fnmatch.fnmatchcase(n, p) or n.startswith(p + ".") for n in (ly.name, *ly.aliases))}
        if not hits:
            raise InvalidParameterError(
                f"--keep {pattern!r} matches no weight matrix of this model",
                f"name matrices as token_embd, lm_head, blk.N (0..{cfg.n_layers - 1}), blk.N.attn_qkv, "
                "blk.N.attn_output, blk.N.ffn_gate_up, blk.N.ffn_down (mixtures of experts: blk.N.ffn_gate_up_exps, "
                "blk.N.ffn_down_exps, blk.N.ffn_gate_up_shexp, blk.N.ffn_down_shexp), or globs like 'blk.*.ffn_down'")
        chosen |= hits
    return chosen


def check_model(fmt: WeightFormat, cfg, kept: set[str]) -> None:
    """Refuse the conversion of this model to ``fmt`` before any work, with the first bad matrix."""
    for ly in model_layers(cfg):
        if ly.name not in kept:
            fmt.check_width(ly.name, ly.shape[1])


# --------------------------------------------------------------------------------------------
# writing files

def _output_kind(out: Path, fmt: WeightFormat) -> str:
    suffix = out.suffix.lower()
    if suffix == ".gguf":
        if fmt.gguf_type is None:
            raise InvalidParameterError(
                f"GGUF has no tensor type for {fmt.name} weights as edgellm stores them",
                f"write an edgellm safetensors file instead: --out {out.with_suffix('.safetensors')}")
        return "gguf"
    if suffix == ".safetensors":
        return "edgellm"
    raise InvalidParameterError(f"--out {out}: the file name must end in .gguf or .safetensors",
                                f"e.g. --out {out.with_suffix('.gguf' if fmt.gguf_type else '.safetensors')}")


def _check_out(out: Path, model_path: Path | None) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidParameterError(f"--out {out}: folder {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK):
        raise InvalidParameterError(f"--out {out}: folder {parent} is not writable", "choose another folder")
    if out.is_dir():
        raise InvalidParameterError(f"--out {out} is a folder", "give a file name")
    if model_path is not None and out.exists() and out.resolve() == Path(model_path).resolve():
        raise InvalidParameterError(f"--out {out} is the input model itself", "write to another file")


def peek_config(spec):
    """The config of the model ``spec`` names, reading only headers."""
    from edgellm.loading.resolve import resolve_model

    src = resolve_model(spec)
    if src.kind == "gguf":
        from edgellm.config import RECURRENT_GGUF_ARCHITECTURES
        from edgellm.loading.gguf import read_gguf

        gf = read_gguf(src.path)
        if gf.metadata.get("general.architecture") in RECURRENT_GGUF_ARCHITECTURES:
            from edgellm.loading.recurrent_gguf import recurrent_gguf_config
            return src, recurrent_gguf_config(gf)
        return src, gf.config()
    if src.kind == "edgellm":
        from edgellm.loading.edgellm_format import read_config
        return src, read_config(src.path)
    from edgellm.loading.load import recurrent_config_from_json
    from edgellm.loading.weights import read_hf_config

    try:
        data = json.loads((Path(src.path) / "config.json").read_text())
    except (OSError, ValueError):
        data = None      # read_hf_config says what is wrong with it
    recurrent = recurrent_config_from_json(data, Path(src.path).name) if data is not None else None
    return src, recurrent or read_hf_config(Path(src.path))


def quantize_model(model, format: str, out, keep=(), progress: bool = True, log=None) -> dict:
    """Write ``model`` with weights in ``format`` to ``out`` (.gguf or .safetensors).

    Returns a summary dict (formats, bytes, seconds). All checks come first; the output file
    appears whole or not at all.
    """
    log = log or (lambda s: None)
    fmt = parse_format(format)
    out = Path(out).expanduser()
    kind = _output_kind(out, fmt)
    src, cfg = peek_config(model)
    if is_recurrent(cfg):
        raise UnsupportedModelError(
            f"edgellm quantize does not write recurrent models ('{cfg.architecture}') yet",
            f"convert at load time instead: --weights {fmt.name} on generate, bench, eval or serve")
    _check_out(out, src.path if src.kind != "hf" else None)
    fmt, kept = prepare(cfg, fmt, keep)
    if kind == "gguf" and src.kind != "gguf":
        raise InvalidParameterError(
            f"GGUF output needs a GGUF source model (its metadata and tokenizer are copied); {src.path} is not one",
            f"write an edgellm file instead: --out {out.with_suffix('.safetensors')}")
    t0 = time.perf_counter()
    if kind == "gguf":
        summary = _write_gguf(src.path, cfg, fmt, kept, out, progress)
    else:
        summary = _write_edgellm(src, cfg, fmt, kept, keep, out, progress)
    summary.update(format=fmt.name, out=str(out), bytes=out.stat().st_size, seconds=time.perf_counter() - t0,
                   kept=sorted(kept))
    return summary


def _gguf_layer(name: str) -> str | None:
    """The edgellm matrix a GGUF tensor belongs to (None for vectors and unknown tensors)."""
    if not name.endswith(".weight"):
        return None
    base = name[: -len(".weight")]
    if base in ("token_embd", "output"):
        return base
    parts = base.split(".")
    if len(parts) != 3 or parts[0] != "blk":
        return None
    fused = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv", "attn_output": "attn_output",
             "ffn_gate": "ffn_gate_up", "ffn_up": "ffn_gate_up", "ffn_down": "ffn_down",
             "ffn_gate_exps": "ffn_gate_up_exps", "ffn_up_exps": "ffn_gate_up_exps", "ffn_down_exps": "ffn_down_exps",
             "ffn_gate_shexp": "ffn_gate_up_shexp", "ffn_up_shexp": "ffn_gate_up_shexp",
             "ffn_down_shexp": "ffn_down_shexp"}
    return f"blk.{parts[1]}.{fused[parts[2]]}" if parts[2] in fused else None


def _write_gguf(path: Path, cfg, fmt: WeightFormat, kept: set[str], out: Path, progress: bool) -> dict:
    from edgellm.loading.gguf import read_gguf, write_gguf
    from edgellm.quant import gguf_blocks

    gf = read_gguf(path)
    tied = cfg.tie_embeddings
    types: dict[str, int] = {}

    def tensors():
        items = list(gf.tensors.values())
        if progress:
            from tqdm import tqdm
            items = tqdm(items, desc=f"quantising to {fmt.name}", unit="tensor", delay=1.0, leave=False,
                         file=sys.stderr)
        for t in items:
            layer = _gguf_layer(t.name)
            if layer == "output" and tied:
                layer = "token_embd"
            # norms, biases, routers, anything else: as they are. Stacked experts [E, rows, cols]
            # are quantised row by row like any matrix (rows of one expert never mix with another's)
            if layer is None or len(t.shape) != (3 if layer.endswith("_exps") else 2):
                types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
                yield t.name, t.data, t.ggml_type, t.shape
                continue
            target = "BF16" if layer in kept and fmt.gguf_type != "F32" else fmt.type_for_width(t.shape[-1])
            types[target] = types.get(target, 0) + 1
            if target == t.ggml_type:
                yield t.name, t.data, t.ggml_type, t.shape
            else:
                dense = t.dequantize().reshape(t.shape)
                yield t.name, gguf_blocks.quantize(dense, target), target, t.shape

    metadata = dict(gf.metadata)
    mtypes = dict(gf.metadata_types)
    metadata["general.file_type"] = FILE_TYPES[fmt.gguf_type]
    mtypes["general.file_type"] = "UINT32"
    if fmt.kind == "gguf":
        metadata["general.quantization_version"] = 2
        mtypes["general.quantization_version"] = "UINT32"
    write_gguf(out, metadata, tensors(), mtypes)
    return {"container": "gguf", "tensor_types": types}


def _tokenizer_info(src) -> dict:
    if src.kind == "gguf":
        from edgellm.loading.gguf import read_gguf
        meta = read_gguf(src.path).metadata
        return {"kind": "gguf", "metadata": meta}
    if src.kind == "edgellm":
        from edgellm.loading.edgellm_format import read_header
        return json.loads(read_header(Path(src.path))["edgellm.tokenizer"])
    folder = Path(src.path)
    files = {}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (folder / name).is_file():
            files[name] = (folder / name).read_text(encoding="utf-8")
    return {"kind": "files", "files": files}


def save_edgellm(out: Path, weights, cfg, fmt_name: str, keep, tokenizer_info: dict) -> None:
    """Write ModelWeights as an edgellm safetensors file, atomically."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    _check_writable(cfg)

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}

    def put(name: str, w: Weight) -> None:
        params, parts = w.parts()
        layers[name] = params
        for part, t in parts.items():
            tensors[f"{name}.{part}"] = t.contiguous()

    put("token_embd", weights.embed)
    if weights.lm_head is not weights.embed:
        put("output", weights.lm_head)
    for i, b in enumerate(weights.blocks):
        p = f"blk.{i}."
        put(p + "attn_qkv", b.qkv)
        put(p + "attn_output", b.o)
        put(p + "ffn_gate_up", b.gate_up)
        put(p + "ffn_down", b.down)
        tensors[p + "attn_norm"] = b.attn_norm.float().contiguous()
        tensors[p + "ffn_norm"] = b.ffn_norm.float().contiguous()
        if b.qkv_bias is not None:
            tensors[p + "attn_qkv_bias"] = b.qkv_bias.float().contiguous()
    tensors["output_norm"] = weights.final_norm.float().contiguous()
    cfg_dict = asdict(cfg)
    cfg_dict.pop("extra", None)
    if weights.lm_head is weights.embed and not cfg.tie_embeddings:
        cfg_dict["tie_embeddings"] = True
    meta = {
        "format": "edgellm", "edgellm.version": "1", "edgellm.weights": fmt_name,
        "edgellm.keep": json.dumps(parse_keep(keep)), "edgellm.config": json.dumps(cfg_dict),
        "edgellm.layers": json.dumps(layers), "edgellm.tokenizer": json.dumps(tokenizer_info),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _check_writable(cfg) -> None:
    if cfg.experts is not None:   # the file's layout (version 1) has one MLP per block
        raise UnsupportedModelError(
            "edgellm model files hold dense models; a mixture-of-experts model cannot be written as one",
            "write a .gguf file from the model's GGUF (edgellm quantize --out FILE.gguf), or convert at load "
            "time with --weights FORMAT")
    if cfg.architecture == "gemma3":   # its extra norms have no place in the file's layout (version 1)
        raise UnsupportedModelError(
            "edgellm model files hold Llama-family models; Gemma 3 cannot be written as one",
            "convert a Gemma 3 model at load time instead: --weights FORMAT with the GGUF file")


def _write_edgellm(src, cfg, fmt: WeightFormat, kept: set[str], keep, out: Path, progress: bool) -> dict:
    from edgellm.loading.load import load_model

    _check_writable(cfg)   # before loading and converting anything

    loaded = load_model(str(src.path))
    weights = convert_model_weights(loaded.model.weights, cfg, fmt, kept, progress)
    save_edgellm(out, weights, cfg, fmt.name, keep, _tokenizer_info(src))
    return {"container": "edgellm-safetensors", "matrix_formats": weight_formats(weights)}
