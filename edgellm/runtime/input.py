"""Input: a request's prompt turned into token ids, and the one admission rule.

Every way into the engine -- ``LLM.generate``, ``Engine.submit``, ``Session.send`` and the HTTP
server -- encodes with :meth:`InputProcessor.encode` and asks :meth:`InputProcessor.budget` how
many tokens the request may generate, so a prompt that fits one of them fits them all, and bad
input gets the same message everywhere.
"""

from __future__ import annotations

import math

from edgellm.errors import ContextOverflowError, InvalidParameterError
from edgellm.grammar import GrammarCompiler, TokenConstraint
from edgellm.sampling import SamplingParams


class InputProcessor:
    """Encodes prompts and admits them against the model's context and the KV pool."""

    def __init__(self, tokenizer, context_length: int, vocab_size: int, pool_tokens: int, block_size: int,
                 kv_bytes_per_block: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.pool_tokens = pool_tokens
        self.block_size = block_size
        self.kv_bytes_per_block = kv_bytes_per_block
        self.grammars = GrammarCompiler(tokenizer, vocab_size)   # builds its token table on first use

    def check_params(self, params) -> SamplingParams:
        """:func:`check_params`, and the grammar compiled (cached: the server compiles it first, in a
        worker thread, so this is a look-up there). Raises InvalidParameterError."""
        params = check_params(params, self.vocab_size)
        if params.grammar is not None:
            self.grammars.compile(params.grammar)
        return params

    def constraint(self, params: SamplingParams) -> TokenConstraint | None:
        """A sequence's grammar state (None without a grammar), made when it is queued."""
        return self.grammars.constraint(params.grammar)

    def encode(self, prompt, chat: bool = False, system: str | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, self.vocab_size, prompt, chat, system)

    # ---- admission ---------------------------------------------------------------------------------
    def budget(self, n_prompt: int, max_tokens: int | None = None, *, strict: bool = False,
               what: str = "the prompt") -> int:
        """How many tokens a prompt of ``n_prompt`` tokens may generate, or the reason it cannot run.

        The room is what the context window and the whole KV pool leave after the prompt.
        ``max_tokens`` (None: all the room) is capped to it -- or, with ``strict`` (the OpenAI
        API's rule), a request asking for more than the room is refused rather than shortened.
        Raises ``InvalidParameterError`` for an empty prompt, ``ContextOverflowError`` otherwise.
        """
        ctx, pool = self.context_length, self.pool_tokens
        if n_prompt == 0:
            raise InvalidParameterError(f"{what} is empty: it encodes to no token", "give at least one token of prompt")
        if n_prompt >= ctx:
            raise ContextOverflowError(f"{what} has {n_prompt} tokens but the model's context window is {ctx}",
                                       f"shorten it to fewer than {ctx} tokens (or start a new session)")
        if n_prompt >= pool:
            raise self._pool_overflow(n_prompt, what)
        room = min(ctx, pool) - n_prompt
        if max_tokens is None:
            return room
        if strict and n_prompt + max_tokens > ctx:
            raise ContextOverflowError(
                f"This model's maximum context length is {ctx} tokens, but {n_prompt + max_tokens} were requested "
                f"({n_prompt} in {what}, {max_tokens} for the completion)",
                f"shorten {what} or lower max_tokens")
        if strict and n_prompt + max_tokens > pool:
            raise ContextOverflowError(
                f"{what} ({n_prompt} tokens) plus max_tokens ({max_tokens}) needs {n_prompt + max_tokens} tokens "
                f"of KV cache, but the KV pool holds {pool} tokens",
                f"lower max_tokens, shorten {what}, or give the engine a larger kv_memory (the CLI's --kv-memory)")
        return min(max_tokens, room)

    def _pool_overflow(self, n_prompt: int, what: str) -> ContextOverflowError:
        need = math.ceil((n_prompt + 1) / self.block_size)
        blocks = self.pool_tokens // self.block_size
        return ContextOverflowError(
            f"{what} has {n_prompt} tokens, which need {need} KV blocks of {self.block_size} tokens, but the "
            f"whole KV pool holds {blocks} blocks ({self.pool_tokens} tokens, "
            f"{blocks * self.kv_bytes_per_block / 2 ** 20:.0f} MiB)",
            f"raise kv_memory (the CLI's --kv-memory) to at least "
            f"{math.ceil(need * self.kv_bytes_per_block / 2 ** 20) + 1}MB, or shorten the prompt (or start a new session)")


def encode_prompt(tokenizer, vocab_size: int, prompt, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of ``prompt``: text (plain, or one user message when ``chat``, after ``system``
    if given), chat messages (a list of ``{"role", "content"}`` dicts) or token ids (checked
    against the vocabulary). A chat prompt of a model without a chat template (a base model such
    as Gemma 3 270M) is refused: the tokenizer's ChatML fallback would feed it markers it was
    never trained on (and Gemma's vocabulary lacks them), giving replies that only look broken."""
    is_messages = isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)
    if ((chat and isinstance(prompt, str)) or is_messages) and not tokenizer.has_chat_template:
        raise InvalidParameterError(
            "this model has no chat template (it is a base model, not a chat model), so it cannot take a chat "
            "prompt or messages",
            "send plain text to continue instead (edgellm generate without --chat, or the server's "
            "/v1/completions endpoint), or use an instruction-tuned model that has a chat template")
    if isinstance(prompt, str):
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                       [{"role": "user", "content": prompt}]
            return tokenizer.encode_chat(messages, add_generation_prompt=True)
        return tokenizer.encode(prompt)
    if is_messages:
        return tokenizer.encode_chat(list(prompt), add_generation_prompt=True)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = [int(t) for t in prompt]
        check_token_ids(ids, vocab_size)
        return ids
    raise InvalidParameterError(f"a prompt must be text, token ids or chat messages, got {type(prompt).__name__}",
                                "pass a str, a list of ints or a list of {'role', 'content'} dicts")


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidParameterError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                                    "pass ids produced by this model's tokenizer")


def check_params(params, vocab_size: int | None = None) -> SamplingParams:
    """``params`` validated: a ``SamplingParams`` for one completion (the engine runs n=1 per request);
    with ``vocab_size``, its ``logit_bias`` ids checked against the vocabulary."""
    if not isinstance(params, SamplingParams):
        raise InvalidParameterError(f"params must be SamplingParams, got {type(params).__name__}",
                                    "build them with edgellm.sampling.SamplingParams(...)")
    params.validate()
    if vocab_size is not None and params.logit_bias and max(params.logit_bias) >= vocab_size:
        raise InvalidParameterError(f"logit_bias names token {max(params.logit_bias)}, outside the vocabulary "
                                    f"(0..{vocab_size - 1})", "bias ids produced by this model's tokenizer")
    if params.n != 1:
        raise InvalidParameterError(f"the engine runs one completion per request, got n={params.n}",
                                    "submit the prompt n times with sample_index 0..n-1")
    return params
