"""One call from a model spec (path or registry name) to a runnable model and its tokenizer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edgellm import heap
from edgellm.config import RECURRENT_GGUF_ARCHITECTURES, ModelConfig
from edgellm.kernels import native
from edgellm.kernels.threads import one_thread
from edgellm.loading.resolve import ResolvedModel, resolve_model
from edgellm.models.gemma3 import Gemma3Model
from edgellm.models.llama import LlamaModel, ModelWeights
from edgellm.models.moe import MoEModel
from edgellm.tokenizer import Tokenizer
from edgellm.util import gc_paused_while_loading, startup_mark


@dataclass
class LoadedModel:
    source: ResolvedModel
    config: ModelConfig
    model: LlamaModel | Gemma3Model
    tokenizer: Tokenizer
    dtype: str
    file_bytes: int
    load_s: float

    @property
    def weight_bytes(self) -> int:
        return self.model.weights.nbytes


def load_model(spec: str | None = None, dtype: str = "auto", use_native: bool = True,
               layers: range | None = None, ends: bool = True) -> LoadedModel:
    """Load a GGUF file, an HF folder or a registry model. ``dtype``: auto | float32 | bfloat16.

    ``use_native=False`` skips the native kernels (every matrix dequantised to float32): the
    path of machines where they cannot be built, kept reachable for tests. ``layers``: read only
    these blocks, ``ends=False``: and no embedding, final norm or head (a rank of a split model,
    ``edgellm.runtime.sharding``; GGUF files and HF folders only).
    """
    with gc_paused_while_loading():   # edgellm.util says why
        return _load(spec, dtype, use_native, layers, ends)


def _load(spec: str | None, dtype: str, use_native: bool, layers: range | None, ends: bool) -> LoadedModel:
    from edgellm.dtypes import compute_dtype
    from edgellm.loading.weights import check_vector_shapes, load_gguf_weights, load_hf_weights, read_hf_config

    heap.tune_for_inference()
    dtype = "float32" if dtype == "auto" else dtype
    compute_dtype(dtype)  # refuse an unknown dtype before reading anything
    t0 = time.perf_counter()
    src = resolve_model(spec)
    if src.kind == "gguf":
        from edgellm.loading.gguf import read_gguf

        gf = read_gguf(src.path)
        if gf.metadata.get("general.architecture") in RECURRENT_GGUF_ARCHITECTURES:   # Mamba, Mamba-2
            return _load_recurrent_gguf(src, gf, dtype, use_native, layers, ends, t0)
        cfg = gf.config()
        startup_mark("read GGUF header")
        tokenizer = Tokenizer.from_gguf_metadata(gf.metadata)
        cfg.check_token_count(tokenizer.vocab_size, str(src.path))
        startup_mark("tokenizer")
        if use_native:
            native()   # loaded here rather than by the first weight, so the start-up trace shows it apart
            startup_mark("native kernels")
        with one_thread(only_when_busy=True):   # copies: one_thread's doc says what threads cost them
            weights = load_gguf_weights(gf, cfg, dtype, use_native, layers, ends)
        check_vector_shapes(weights, cfg)
        startup_mark("weights")
        size = gf.file_size
    elif src.kind == "edgellm":   # a file written by `edgellm quantize`: matrices in their own formats
        from edgellm.loading.edgellm_format import load_edgellm

        if layers is not None or not ends:
            from edgellm.errors import InvalidParameterError

            raise InvalidParameterError(f"{src.path}: an edgellm file cannot be loaded in parts (for a split model)",
                                        "split the GGUF file or HF folder it was made from instead")
        cfg, tokenizer, weights, size, meta = load_edgellm(src.path, use_native)
        check_vector_shapes(weights, cfg)
        dtype = meta.get("edgellm.weights", dtype)   # the format it was written in (reports say so)
    else:
        folder = Path(src.path)
        recurrent = load_recurrent_hf(folder, dtype)   # Mamba, Mamba-2, RWKV: models of their own
        cfg = read_hf_config(folder) if recurrent is None else recurrent.cfg
        tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
        cfg.check_token_count(tokenizer.vocab_size, str(folder), padded=True)
        if recurrent is None:
            weights = load_hf_weights(folder, cfg, dtype, layers, ends)
            check_vector_shapes(weights, cfg, hf_names=True)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        if recurrent is not None:
            heap.release_free_heap()
            return LoadedModel(src, cfg, recurrent, tokenizer, dtype, size, time.perf_counter() - t0)
    model = build_model(cfg, weights)
    if src.kind == "gguf" and use_native and dtype == "bfloat16":   # the fast mode (docs/fast-modes.md)
        from edgellm.quant.bf16 import prefill_attention_dtype

        model.prefill_attention_dtype = prefill_attention_dtype()
    heap.release_free_heap()
    startup_mark("model")
    return LoadedModel(src, cfg, model, tokenizer, dtype, size, time.perf_counter() - t0)



def _load_recurrent_gguf(src: ResolvedModel, gf, dtype: str, use_native: bool, layers, ends: bool,
                         t0: float) -> LoadedModel:
    """An attention-free model of a GGUF file (edgellm.loading.recurrent_gguf), with its tokenizer."""
    from edgellm.loading.recurrent_gguf import load_recurrent_gguf

    if layers is not None or not ends:
        from edgellm.errors import InvalidParameterError

        raise InvalidParameterError(f"{src.path}: a recurrent model cannot be loaded in parts (for a split model)",
                                    "run it on one rank: drop --pipeline-parallel / --tensor-parallel")
    tokenizer = Tokenizer.from_gguf_metadata(gf.metadata)
    startup_mark("tokenizer")
    if use_native:
        native()
    with one_thread(only_when_busy=True):
        model = load_recurrent_gguf(gf, dtype, use_native)
    model.cfg.check_token_count(tokenizer.vocab_size, str(src.path))
    heap.release_free_heap()
    startup_mark("model")
    return LoadedModel(src, model.cfg, model, tokenizer, dtype, gf.file_size, time.perf_counter() - t0)


def load_recurrent_hf(folder: Path, dtype: str):
    """The attention-free model of an HF folder whose config.json names one (loaded with its own
    module), else None (the folder holds a Llama-family or Gemma model)."""
    import json

    from edgellm.dtypes import compute_dtype
    from edgellm.models.mamba import load_mamba
    from edgellm.models.mamba2 import load_mamba2
    from edgellm.models.rwkv import load_rwkv

    # the names config.RECURRENT_HF_ARCHITECTURES lists
    loaders = {"MambaForCausalLM": load_mamba, "Mamba2ForCausalLM": load_mamba2, "RwkvForCausalLM": load_rwkv}
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None        # read_hf_config reports it
    archs = data.get("architectures") if isinstance(data, dict) else None
    if not isinstance(archs, list) or not archs or archs[0] not in loaders:
        return None
    return loaders[archs[0]](folder, data, compute_dtype(dtype))


def recurrent_config_from_json(data: dict, name: str = ""):
    """The ModelConfig of a recurrent model's config.json (its mixer's sizes in ``extra["recurrent"]``,
    for the roofline analyzer), or None when the file names another architecture."""
    from edgellm.models.mamba import mamba_config
    from edgellm.models.mamba2 import mamba2_config
    from edgellm.models.rwkv import rwkv_config

    configs = {"MambaForCausalLM": mamba_config, "Mamba2ForCausalLM": mamba2_config, "RwkvForCausalLM": rwkv_config}
    archs = data.get("architectures") if isinstance(data, dict) else None
    if not isinstance(archs, list) or not archs or archs[0] not in configs:
        return None
    return configs[archs[0]](data, name)[0]


def build_model(cfg: ModelConfig, weights: ModelWeights) -> LlamaModel | Gemma3Model:
    """The model class of ``cfg.architecture`` over ``weights``: Gemma 3 has its own blocks, and a
    mixture of experts (``cfg.experts``; a GGUF Mixtral says "llama") its own MLP."""
    if cfg.experts is not None:
        return MoEModel(cfg, weights)
    return Gemma3Model(cfg, weights) if cfg.architecture == "gemma3" else LlamaModel(cfg, weights)
