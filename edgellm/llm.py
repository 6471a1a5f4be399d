"""LLM: load a model and generate from one prompt at a time (the offline path of the CLI).

This is the plain prefill-then-decode loop with timings; the multi-session runtime
(``edgellm.runtime.engine``) runs the same model runner under a scheduler.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from edgellm.errors import ContextOverflowError, InvalidParameterError
from edgellm.kv.cache import BLOCK_SIZE, KVCache
from edgellm.loading.load import LoadedModel, load_model
from edgellm.runtime.model_runner import ModelRunner, SeqChunk
from edgellm.sampling import Sampler, SamplingParams, SequenceHistory, StopChecker

# Prompt tokens per forward pass: bounds the transient activations of a long prompt.
PREFILL_CHUNK = 512


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    ttft_s: float
    prefill_s: float
    decode_s: float
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes out of prefill; decode made the rest.
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason,
                "ttft_s": self.ttft_s, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s}


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise InvalidParameterError(f"--threads must be at least 1, got {threads}", "pass a positive count")
        torch.set_num_threads(threads)


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", threads: int | None = None,
                 loaded: LoadedModel | None = None, use_native: bool = True, weights: str | None = None,
                 keep=(), kv_dtype="fp32"):
        """``weights``: a precision format to convert the matrices to at load time (``--keep``
        patterns stay at 16 bits); ``kv_dtype``: the KV cache precision (fp32, fp16, bf16, fp8, int8)."""
        from edgellm.kv.cache import kv_dtype_name

        set_threads(threads)
        self.kv_dtype = kv_dtype_name(kv_dtype)
        self.loaded = loaded or load_model(model, dtype, use_native)
        if weights:
            from edgellm.quant.convert import convert_weights

            self.loaded = convert_weights(self.loaded, weights, keep)
        self.cfg = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self._cache: KVCache | None = None

    def _kv_cache(self, num_blocks: int) -> KVCache:
        """A cache of at least ``num_blocks`` blocks, kept between calls: a fresh one per request
        cost ~7 ms of zeroing for a 512-token prompt (profiled) and new pages each time."""
        if self._cache is None or self._cache.num_blocks < num_blocks:
            self._cache = None   # free the old one before allocating its successor
            self._cache = KVCache(self.cfg, num_blocks, BLOCK_SIZE, self.kv_dtype)
        return self._cache

    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                       [{"role": "user", "content": prompt}]
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return self.tokenizer.encode(prompt)

    def check_fits(self, n_prompt: int) -> None:
        ctx = self.cfg.context_length
        if n_prompt == 0:
            raise InvalidParameterError("the prompt is empty", "give at least one token of prompt")
        if n_prompt >= ctx:
            raise ContextOverflowError(
                f"the prompt has {n_prompt} tokens but the model's context window is {ctx}",
                f"shorten the prompt to fewer than {ctx} tokens")

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, chat: bool = False,
                 on_text: Callable[[str], None] | None = None) -> Completion:
        """Generate one completion; ``on_text`` receives text pieces as they are decided."""
        params = params or SamplingParams()
        t0 = time.perf_counter()
        ids = list(prompt) if isinstance(prompt, list) else self.encode_prompt(prompt, chat)
        self.check_fits(len(ids))
        budget = min(params.max_tokens, self.cfg.context_length - len(ids))
        cache = self._kv_cache(math.ceil((len(ids) + budget) / BLOCK_SIZE))
        runner = ModelRunner(self.loaded.model, cache)
        slots = slice(0, cache.num_blocks * BLOCK_SIZE)   # one sequence: its blocks are contiguous
        sampler = Sampler()
        history = SequenceHistory(ids, self.cfg.vocab_size)
        stop = StopChecker(params.stop, params.stop_token_ids, self.tokenizer.eog_ids, params.ignore_eos, budget)
        decoder = self.tokenizer.incremental_decoder()
        out_ids, logprobs, tops, pieces = [], [], [], []

        # Prefill, in chunks for long prompts; the last chunk yields the first token's logits.
        t_start = time.perf_counter()
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            logits = runner.run([SeqChunk(chunk, start, slots, want_logits=start + len(chunk) == len(ids))])
        t_prefill = time.perf_counter()
        ttft = None
        pos = len(ids)
        while True:
            s = sampler.sample(logits, [params], [history])
            tok = s.token_ids[0]
            if ttft is None:
                ttft = time.perf_counter() - t0
            history.append(tok)
            out_ids.append(tok)
            if params.logprobs:
                logprobs.append(s.logprobs[0])
                tops.append(s.top_logprobs[0] or [])
            upd = stop.step(tok, decoder.add(tok))
            if upd.text:
                pieces.append(upd.text)
                if on_text:
                    on_text(upd.text)
            if upd.finished:
                break
            logits = runner.run([SeqChunk([tok], pos, slots)])
            pos += 1
        t_end = time.perf_counter()
        # An end-of-sequence or stop token stays in token_ids (it was generated) but not in the text.
        return Completion(text="".join(pieces), token_ids=out_ids, prompt_tokens=len(ids),
                          finish_reason=stop.finish_reason or "length", ttft_s=ttft,
                          prefill_s=t_prefill - t_start, decode_s=t_end - t0 - ttft,
                          logprobs=logprobs, top_logprobs=tops)
