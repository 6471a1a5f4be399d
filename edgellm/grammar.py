"""Constrained decoding: a grammar (a JSON schema, a regex, a Lark grammar, a list of choices)
turned into a per-sequence token mask that the sampler applies before it picks a token.

::

    grammar = Grammar.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    compiler = GrammarCompiler(tokenizer, vocab_size)   # one per engine (holds the token table)
    compiler.compile(grammar)                           # InvalidParameterError if it does not compile
    c = compiler.constraint(grammar)                    # one per sequence
    c.mask_(logits_row)                                 # tokens the grammar forbids -> -inf
    c.accept(token_id)                                  # after the token is committed

The library is llguidance (PyPI ``llguidance``). Why it, and not xgrammar or outlines-core:

* it installs alone: a Rust extension with no Python dependencies (xgrammar 0.2.8 pulls triton and
  a TVM runtime, ~hundreds of MB, and wants torch at a version of its own choosing);
* it computes a mask in tens of microseconds per token with no precomputation over the whole
  vocabulary per grammar (its lexer works on a token trie), so a new schema per request costs
  ~1 ms to compile, where outlines-core builds an index of every (state, token) pair up front;
* it reads any tokenizer given as a list of token bytes, which is what
  :class:`edgellm.tokenizer.Tokenizer` exposes for both its BPE and SentencePiece vocabularies.

Tokens the grammar allows come back as a bitmask (one bit per token); this module unpacks it with
numpy and writes -inf over the forbidden logits of the row. Once the grammar is complete only the
end-of-generation tokens are allowed, so a constrained sequence ends with finish reason "stop" as
soon as its output is whole. Ids beyond the tokenizer's vocabulary (an output layer wider than the
token list, as Qwen2.5's) are always forbidden.

JSON schemas compile with compact separators (``,`` and ``:``) and no free whitespace
(``whitespace_flexible`` off), properties in the schema's order:
a small model given free whitespace can emit newlines until ``max_tokens``, and the output
stays valid JSON either way. A schema's own ``x-guidance`` options override that.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from edgellm.errors import InvalidParameterError

GRAMMAR_KINDS = ("json_schema", "regex", "lark", "choice")
MAX_GRAMMAR_CHARS = 256 * 1024      # a schema or grammar's text, before it reaches the compiler
MAX_CHOICES = 256
CACHE_SIZE = 64                     # compiled grammars kept (a client usually repeats its schema)
# What llguidance's JSON compiler uses unless the schema's own "x-guidance" says otherwise.
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Grammar:
    """What a sequence's output must match. ``kind`` is one of :data:`GRAMMAR_KINDS`; ``source``
    is its text (a JSON schema serialised as given: its properties' order is the output's order;
    a regex; a Lark grammar; the choices as a JSON array). Build it with the class methods."""

    kind: str
    source: str

    @classmethod
    def json_schema(cls, schema) -> "Grammar":
        """Output is JSON valid against ``schema`` (a dict, or ``True`` for any JSON value)."""
        if not isinstance(schema, (dict, bool)):
            raise InvalidParameterError(f"a JSON schema must be an object, got {type(schema).__name__}",
                                        'pass a schema such as {"type": "object", "properties": {...}}')
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))

    @classmethod
    def json_object(cls) -> "Grammar":
        """Output is one JSON object, of any content (OpenAI's ``{"type": "json_object"}``)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        """Output matches the whole regular expression (Rust ``regex`` syntax, as llguidance reads it)."""
        if not isinstance(pattern, str):
            raise InvalidParameterError(f"a regex must be a string, got {type(pattern).__name__}", "pass a str")
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> "Grammar":
        """Output matches a Lark grammar whose start rule is ``start`` (llguidance's Lark dialect)."""
        if not isinstance(grammar, str):
            raise InvalidParameterError(f"a grammar must be a string, got {type(grammar).__name__}", "pass a str")
        return cls("lark", grammar)

    @classmethod
    def choice(cls, choices) -> "Grammar":
        """Output is exactly one of the strings ``choices``."""
        if (not isinstance(choices, (list, tuple)) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise InvalidParameterError("choices must be a non-empty list of non-empty strings",
                                        'pass e.g. ["yes", "no"]')
        if len(choices) > MAX_CHOICES:
            raise InvalidParameterError(f"at most {MAX_CHOICES} choices, got {len(choices)}", "pass fewer choices")
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))

    def validate(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise InvalidParameterError(f"unknown grammar kind {self.kind!r}", f"use one of {', '.join(GRAMMAR_KINDS)}")
        if not isinstance(self.source, str) or len(self.source) > MAX_GRAMMAR_CHARS:
            raise InvalidParameterError(f"the {self.kind} is longer than {MAX_GRAMMAR_CHARS} characters",
                                        "use a smaller schema or grammar")

    def describe(self) -> str:
        return {"json_schema": "JSON schema", "regex": "regex", "lark": "grammar", "choice": "choice list"}[self.kind]

    def to_llguidance(self) -> str:
        """The grammar as llguidance reads it (its JSON grammar format); not yet checked."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        if self.kind == "lark":
            return LLMatcher.grammar_from_lark(self.source)
        # choice: a Lark rule of string literals, each written as a JSON string (Lark's escapes)
        literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(self.source))
        return LLMatcher.grammar_from_lark(f"start: {literals}\n")


class _VocabView:
    """The tokenizer as llguidance's ``TokenizerWrapper`` wants it: every token's bytes, the special
    ids (which never match grammar text), and an encode function (used only to tokenise forced text)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids, default=0)
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_special_tokens=False, parse_special=False)


class GrammarCompiler:
    """Compiles grammars for one tokenizer and hands out per-sequence constraints. Thread-safe:
    the server compiles in worker threads, the engine makes constraints in its own thread.

    ``vocab_size`` is the width of the model's logits (it may exceed the tokenizer's token count;
    the extra ids are always forbidden). The token table is built on first use (~0.3 s for 49k
    tokens), not at engine start, so an engine that never sees a grammar never pays for it."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        # Grammar -> a matcher at its start state, never advanced: each sequence gets a deep copy
        # (~0.1 ms), since building a matcher for a large schema takes up to hundreds of ms, which
        # must not happen on the engine's thread between two decode steps.
        self._cache: OrderedDict[Grammar, object] = OrderedDict()

    def _llg_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                from llguidance import LLTokenizer, TokenizerWrapper

                eog = sorted(self.tokenizer.eog_ids) or [self.tokenizer.eos_id]
                self._ll_tokenizer = LLTokenizer(TokenizerWrapper(_VocabView(self.tokenizer)), eos_token=eog)
            return self._ll_tokenizer

    def compile(self, grammar: Grammar):
        """A matcher of ``grammar`` at its start (cached; do not advance it). Raises
        InvalidParameterError with the compiler's own message when it is not a valid schema, regex
        or grammar. Slow for a large schema (tens to hundreds of ms): call it off the engine's thread."""
        if not isinstance(grammar, Grammar):
            raise InvalidParameterError(f"grammar must be an edgellm.grammar.Grammar, got {type(grammar).__name__}",
                                        "build one with Grammar.json_schema(...), Grammar.regex(...), ...")
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                return hit
        grammar.validate()
        from llguidance import LLMatcher

        try:
            text = grammar.to_llguidance()
        except (ValueError, TypeError) as err:
            raise InvalidParameterError(f"the {grammar.describe()} does not compile: {err}",
                                        f"fix the {grammar.describe()}") from None
        matcher = LLMatcher(self._llg_tokenizer(), text, log_level=0)
        if matcher.is_error():
            raise InvalidParameterError(f"the {grammar.describe()} does not compile: {matcher.get_error().strip()}",
                                        f"fix the {grammar.describe()} (llguidance supports most of JSON Schema "
                                        "draft 2020-12, Rust regex syntax and Lark grammars)")
        with self._lock:
            self._cache[grammar] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def constraint(self, grammar: Grammar | None) -> "TokenConstraint | None":
        """A fresh constraint for one sequence (None for no grammar)."""
        if grammar is None:
            return None
        start = self.compile(grammar)
        return TokenConstraint(start.deep_copy(), self._llg_tokenizer().vocab_size, self.vocab_size)


class TokenConstraint:
    """One sequence's position in its grammar: the tokens allowed next, advanced by each committed token."""

    def __init__(self, matcher, n_tokens: int, vocab_size: int):
        """``n_tokens``: the ids the matcher's mask covers (the tokenizer's); ``vocab_size``: the logits' width."""
        self.matcher = matcher
        self.vocab_size = vocab_size
        n_tok = int(n_tokens)
        self.n_tokens = min(n_tok, vocab_size)
        self._bits = np.zeros((n_tok + 31) // 32, dtype=np.int32)
        if matcher.is_error():
            raise InvalidParameterError(f"the grammar does not compile: {matcher.get_error()}", "fix the grammar")

    @property
    def finished(self) -> bool:
        """The output is complete: only an end-of-generation token may follow."""
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """A bool array over the logits' width: True where the grammar allows the token next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.n_tokens].view(bool)
        if self.n_tokens == self.vocab_size:
            return bits
        out = np.zeros(self.vocab_size, dtype=bool)
        out[:self.n_tokens] = bits
        return out

    def mask_(self, row: torch.Tensor) -> bool:
        """Set the forbidden logits of ``row`` [V] (float32, CPU or not) to -inf, in place. False when
        the grammar allows no token at all (the matcher failed), and the row is left as it was."""
        if self.matcher.is_error():      # its mask would still allow the end token: an invalid output
            return False
        allowed = self.allowed()
        keep = np.flatnonzero(allowed)
        if keep.size == 0:
            return False
        if row.device.type == "cpu":
            r = row.numpy()
            if keep.size < r.size // 2:      # few allowed (JSON structure): save them, fill, put back
                kept = r[keep]
                r.fill(-np.inf)
                r[keep] = kept
            else:                            # most allowed (inside a string): overwrite the others
                r[np.flatnonzero(~allowed)] = -np.inf
        else:
            row.masked_fill_(~torch.from_numpy(allowed).to(row.device), float("-inf"))
        return True

    def accept(self, token_id: int) -> None:
        """Advance past a committed token. Raises ValueError if the grammar forbids it (it cannot
        when the token was sampled under :meth:`mask_`)."""
        if not self.matcher.consume_token(int(token_id)):
            raise ValueError(f"token {token_id} does not fit the grammar: {self.matcher.get_error()}")

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""

