"""LLM: load a model and generate from one prompt at a time (the offline path of the CLI).

A thin facade over :class:`edgellm.runtime.engine.Engine`: each ``generate`` call is one engine
request, run through the same admission, scheduler, model runner, sampler and output processing
as the server's requests, so what ``edgellm generate`` and ``edgellm bench`` measure is what
``edgellm serve`` runs. The LLM owns one engine whose KV pool grows to the largest request seen.
"""

from __future__ import annotations

from typing import Callable

from edgellm.dtypes import kv_dtype_name
from edgellm.kv.cache import BLOCK_SIZE
from edgellm.loading.load import LoadedModel, load_model
from edgellm.quant.activations import activations_name, set_activations
from edgellm.runtime.engine import Engine, pool_blocks_for, pool_bytes_per_block, refuse_speculation
from edgellm.runtime.input import check_params, encode_prompt
from edgellm.runtime.speculative import parse_speculative, prepare_speculative
from edgellm.runtime.types import Completion, Request
from edgellm.sampling import SamplingParams
from edgellm.util import set_threads

# Prompt tokens per forward pass: bounds the transient activations of a long prompt.
PREFILL_CHUNK = 512


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", threads: int | None = None,
                 loaded: LoadedModel | None = None, use_native: bool = True, weights: str | None = None,
                 keep=(), kv_dtype="fp32", speculative=None, draft_tokens: int | None = None, parallel=None,
                 activations: str | None = None):
        """``weights``: a precision format to convert the matrices to at load time (``--keep``
        patterns stay at 16 bits); ``kv_dtype``: the KV cache precision (fp32, fp16, bf16, fp8, int8);
        ``speculative`` ("ngram", "early-exit:L", "draft:MODEL") and ``draft_tokens``: speculative
        decoding for this LLM's generations and for every engine made over it (see
        ``edgellm.runtime.speculative``); ``parallel``: a ``SplitModel`` (the model split across
        ranks, ``edgellm.runtime.parallel_runner``): its rank-0 part is this LLM's model and every
        engine made over it runs its steps on the ranks; ``activations``: "int8" multiplies the GGUF
        block matrices with activations rounded to int8 blocks (``edgellm.quant.activations``; opt-in,
        approximate), "fp32" the exact default, None leaves a given ``loaded`` model as it is."""
        set_threads(threads)
        self.kv_dtype = kv_dtype_name(kv_dtype)
        self.speculative = parse_speculative(speculative, draft_tokens)   # refused before loading
        self.parallel = parallel
        activations = None if activations is None else activations_name(activations)   # refused before loading
        if parallel is not None and activations == "int8":
            from edgellm.errors import InvalidParameterError

            raise InvalidParameterError("--activations int8 does not run on a model split across ranks",
                                        "drop --activations, or drop --pipeline-parallel/--tensor-parallel")
        if parallel is not None and (weights or self.speculative is not None):
            from edgellm.errors import InvalidParameterError

            raise InvalidParameterError("--weights and --speculative cannot be used with a model split across ranks",
                                        "drop them, or drop --pipeline-parallel/--tensor-parallel")
        self.loaded = loaded or (parallel.loaded if parallel is not None else load_model(model, dtype, use_native))
        if weights:
            from edgellm.loading.convert import convert_weights

            self.loaded = convert_weights(self.loaded, weights, keep)
        if activations is not None:
            set_activations(self.loaded.model, activations)
        self.cfg = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        refuse_speculation(self.loaded, self.speculative)
        if self.speculative is not None:      # a draft model is loaded (and checked) once, here
            self.speculative = prepare_speculative(self.speculative, self.loaded)
        self._engine: Engine | None = None

    def engine(self, n_tokens: int = 1) -> Engine:
        """This LLM's engine, its KV pool holding at least ``n_tokens`` tokens. A pool is sized to
        the requests seen rather than to the whole context window: ``KVCache`` zeroes its memory,
        and SmolLM2's 8k-token fp32 window would take 360 MB."""
        # a sliding-window layer holds its window and one prefill chunk, not the whole sequence
        blocks = pool_blocks_for(self.loaded, n_tokens, BLOCK_SIZE, PREFILL_CHUNK)
        if self._engine is None or self._engine.num_blocks < blocks:
            if self._engine is not None:
                self._engine.close()
                self._engine = None   # free the old pool before allocating its successor
            pool = blocks * pool_bytes_per_block(self.loaded, BLOCK_SIZE, self.kv_dtype)
            self._engine = Engine(self, kv_memory=pool, host_memory=0, max_batch_tokens=PREFILL_CHUNK)
        return self._engine

    def encode_prompt(self, prompt, chat: bool = False, system: str | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, self.cfg.vocab_size, prompt, chat, system)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, chat: bool = False,
                 on_text: Callable[[str], None] | None = None, system: str | None = None) -> Completion:
        """Generate one completion; ``on_text`` receives text pieces as they are decided.

        Each call computes its whole prompt (the prefix cache is cleared first), so repeated calls
        are independent and their timings comparable; sessions (``Engine.session``) reuse KV."""
        params = check_params(params or SamplingParams(), self.cfg.vocab_size)
        ids = self.encode_prompt(prompt, chat, system)
        room = max(1, min(params.max_tokens, self.cfg.context_length - len(ids)))
        engine = self.engine(len(ids) + room)
        engine.clear_prefix_cache()
        handle = engine.submit(Request(prompt=ids, params=params))
        for event in handle.events():
            if event.text and on_text is not None:
                on_text(event.text)
        r = handle.result()
        return Completion(text=r.text, token_ids=r.token_ids, prompt_tokens=r.prompt_tokens,
                          finish_reason=r.finish_reason, ttft_s=r.ttft_s, prefill_s=r.prefill_s,
                          decode_s=r.decode_s, logprobs=r.logprobs, top_logprobs=r.top_logprobs,
                          speculative=r.speculative)
