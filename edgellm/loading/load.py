"""One call from a model spec (path or registry name) to a runnable model and its tokenizer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edgellm import heap
from edgellm.config import ModelConfig
from edgellm.kernels import native
from edgellm.kernels.threads import one_thread
from edgellm.loading.resolve import ResolvedModel, resolve_model
from edgellm.models.gemma3 import Gemma3Model
from edgellm.models.llama import LlamaModel, ModelWeights
from edgellm.tokenizer import Tokenizer
from edgellm.util import startup_mark


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


def load_model(spec: str | None = None, dtype: str = "auto", use_native: bool = True) -> LoadedModel:
    """Load a GGUF file, an HF folder or a registry model. ``dtype``: auto | float32 | bfloat16.

    ``use_native=False`` skips the native kernels (every matrix dequantised to float32): the
    path of machines where they cannot be built, kept reachable for tests.
    """
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
        cfg = gf.config()
        startup_mark("read GGUF header")
        tokenizer = Tokenizer.from_gguf_metadata(gf.metadata)
        cfg.check_token_count(tokenizer.vocab_size, str(src.path))
        startup_mark("tokenizer")
        if use_native:
            native()   # loaded here rather than by the first weight, so the start-up trace shows it apart
            startup_mark("native kernels")
        with one_thread(only_when_busy=True):   # copies: one_thread's doc says what threads cost them
            weights = load_gguf_weights(gf, cfg, dtype, use_native)
        check_vector_shapes(weights, cfg)
        startup_mark("weights")
        size = gf.file_size
    elif src.kind == "edgellm":   # a file written by `edgellm quantize`: matrices in their own formats
        from edgellm.loading.edgellm_format import load_edgellm

        cfg, tokenizer, weights, size, meta = load_edgellm(src.path, use_native)
        check_vector_shapes(weights, cfg)
        dtype = meta.get("edgellm.weights", dtype)   # the format it was written in (reports say so)
    else:
        folder = Path(src.path)
        cfg = read_hf_config(folder)
        tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
        cfg.check_token_count(tokenizer.vocab_size, str(folder), padded=True)
        weights = load_hf_weights(folder, cfg, dtype)
        check_vector_shapes(weights, cfg, hf_names=True)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    model = build_model(cfg, weights)
    heap.release_free_heap()
    startup_mark("model")
    return LoadedModel(src, cfg, model, tokenizer, dtype, size, time.perf_counter() - t0)



def build_model(cfg: ModelConfig, weights: ModelWeights) -> LlamaModel | Gemma3Model:
    """The model class of ``cfg.architecture`` over ``weights``: Gemma 3 has its own blocks."""
    return Gemma3Model(cfg, weights) if cfg.architecture == "gemma3" else LlamaModel(cfg, weights)
