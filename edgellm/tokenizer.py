"""Text <-> token ids, the incremental detokenizer, and chat templates.

A :class:`Tokenizer` wraps a Hugging Face ``tokenizers.Tokenizer`` (Rust, fast) for encoding and
keeps its own table of the bytes each id stands for, which makes decoding and streaming exact
and cheap. It is built either

* from a GGUF file's metadata (:meth:`Tokenizer.from_gguf_metadata`, :meth:`Tokenizer.from_gguf`),
  rebuilding the tokenizer llama.cpp would run for that file, or
* from a Hugging Face model folder's ``tokenizer.json`` (:meth:`Tokenizer.from_file`), with
  ``tokenizer_config.json`` / ``chat_template.jinja`` / ``generation_config.json`` when present.

GGUF vocabularies
-----------------
``tokenizer.ggml.model == "gpt2"`` -- byte-level BPE. Vocabulary and merges come from the file;
the text is split before BPE by the regular expressions llama.cpp uses for the file's
``tokenizer.ggml.pre`` (see :data:`PRE_TOKENIZER_SPLITS`), then mapped to GPT-2's byte alphabet.
``qwen2`` vocabularies also NFC-normalise the text, as the original ``tokenizer.json`` does.
An unknown ``pre`` falls back to the GPT-2 expression with a warning.

``tokenizer.ggml.model == "llama"`` -- SentencePiece BPE. Merges are rebuilt from the scores
(merging the adjacent pair whose concatenation scores best is exactly SentencePiece's BPE); spaces
become ``▁``; ``add_space_prefix`` (default true) puts a ``▁`` in front of the text and, as
llama.cpp and Llama-2's ``tokenizer.json`` do, after every special or user-defined token found in
it (the ``sentencepiece`` library, which knows no special tokens, prefixes only the start);
characters outside the vocabulary fall back to ``<0xXX>`` byte tokens. Decoding removes the one
space the prefix added at the start.

Control tokens (``<|im_start|>``...) and user-defined tokens (``<tool_call>``) are matched whole
in the text before BPE, as llama.cpp does with ``parse_special`` and transformers does by default.

BOS / EOS and how this matches transformers
-------------------------------------------
``encode(text, add_special_tokens=True)`` adds BOS only when the file says
``tokenizer.ggml.add_bos_token = true``; when the key is missing it defaults to true for
SentencePiece ("llama") vocabularies and false otherwise -- the rule of both llama.cpp and
transformers' GGUF loader, so ids equal ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``'s.
EOS is appended only for ``add_eos_token = true``. For a ``tokenizer.json`` model the file's own
post-processor decides, exactly as in transformers. A prompt rendered by
:meth:`Tokenizer.apply_chat_template` already holds the template's special tokens (some templates
write ``{{ bos_token }}`` themselves): encode it with ``add_special_tokens=False``, as
transformers' ``apply_chat_template(tokenize=True)`` does; :meth:`Tokenizer.encode_chat` does it.

This module imports no torch.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import marshal
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from edgellm.errors import InvalidParameterError, ModelFormatError, ModelNotFoundError, UnsupportedModelError
from edgellm.util import cache_dir

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_UNDEFINED = 0
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

SPM_SPACE = "\u2581"  # ▁

# --------------------------------------------------------------------------------------------
# Pre-tokenizer regular expressions, per GGUF ``tokenizer.ggml.pre``.
# Each entry is a list of expressions applied one after another, every one splitting the pieces
# the previous left ("isolated": matches and the text between them both become pieces) -- this is
# llama.cpp's unicode_regex_split, and tokenizers' Sequence of Split pre-tokenizers.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {}
for _names, _exprs in (
    # llama.cpp LLAMA_VOCAB_PRE_TYPE_DEFAULT (also used when the key is missing)
    (("default",), [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]),
    (("gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion", "granite-docling"), [_GPT2]),
    # single digits, then GPT-2 (SmolLM's tokenizer.json: Digits(individual) + ByteLevel)
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        [r"\p{N}", _GPT2],
    ),
    (("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "chatglm-bpe"), [_LLAMA3]),
    (("qwen2", "qwen2.5", "qwen-2.5", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez"), [_QWEN2]),
    (("tekken",), [_TEKKEN]),
    (("gpt-4o", "llama4", "minimax-m2"), [_GPT4O]),
):
    for _n in _names:
        PRE_TOKENIZER_SPLITS[_n] = _exprs

# Pre-tokenizers whose original tokenizer.json NFC-normalises the text first.
_NFC_PRE = {"qwen2", "qwen2.5", "qwen-2.5", "deepseek-r1-qwen"}
# llama.cpp sets ignore_merges for these: a pre-token that is itself a vocabulary entry is kept whole.
_IGNORE_MERGES_PRE = {"llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "llama4"}

# Texts of tokens that end a turn, looked up in the vocabulary for `eog_ids` (as llama.cpp does).
EOG_TOKEN_TEXTS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "<EOT>",
    "<|EOT|>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
    "<|return|>",
)

ALLOWED_ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


@lru_cache(maxsize=1)
def _byte_level_translation() -> dict[int, int]:
    """A ``str.translate`` table taking each byte-level character to the code point of its byte:
    for a token made only of such characters, ``token.translate(t).encode("latin-1")`` is its
    bytes, computed in C (a Python loop over 49k tokens costs a noticeable part of a start)."""
    return {ord(c): b for b, c in byte_to_unicode().items()}


def _byte_level_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for (characters outside the alphabet: their UTF-8)."""
    inv = unicode_to_byte()
    out = bytearray()
    for ch in token:
        b = inv.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def _byte_level_spelling(raw: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in raw)


def _spm_bytes(token: str, token_type: int) -> bytes:
    if token_type == TOKEN_BYTE:
        try:
            return bytes([int(token[3:-1], 16)])  # "<0x0A>"
        except ValueError:
            return token.encode("utf-8")
    return token.replace(SPM_SPACE, " ").encode("utf-8")


def _as_int_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (int,)):
        return [int(value)]
    return [int(v) for v in value]


def _token_content(tok: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if tok is None:
        return None
    if isinstance(tok, str):
        return tok
    if isinstance(tok, Mapping):
        c = tok.get("content")
        return c if isinstance(c, str) else None
    return None


_GGUF_TOKENIZER_KEYS = {
    # key: (expected, test of one value or of each array item, is an array)
    "tokenizer.ggml.model": ("a string", lambda v: isinstance(v, str), False),
    "tokenizer.ggml.pre": ("a string", lambda v: isinstance(v, str), False),
    "tokenizer.chat_template": ("a string", lambda v: isinstance(v, str), False),
    "tokenizer.ggml.tokens": ("an array of strings", lambda v: isinstance(v, str), True),
    "tokenizer.ggml.merges": ("an array of strings ('a b' pairs)", lambda v: isinstance(v, str), True),
    "tokenizer.ggml.token_type": ("an array of integers",
                                  lambda v: isinstance(v, int) and not isinstance(v, bool), True),
    "tokenizer.ggml.scores": ("an array of numbers",
                              lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), True),
}
for _key in ("bos", "eos", "unknown", "padding", "eot", "eom"):
    _GGUF_TOKENIZER_KEYS[f"tokenizer.ggml.{_key}_token_id"] = (
        "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool), False)
for _key in ("add_bos_token", "add_eos_token", "add_space_prefix"):
    _GGUF_TOKENIZER_KEYS[f"tokenizer.ggml.{_key}"] = ("a boolean", lambda v: isinstance(v, (bool, int)), False)
del _key
# Item types that pass each array key's test for certain (a quick first check of 49k-item arrays).
_ITEM_TYPES = {"tokenizer.ggml.tokens": {str}, "tokenizer.ggml.merges": {str}, "tokenizer.ggml.token_type": {int},
               "tokenizer.ggml.scores": {int, float}}


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)} item{'s' if len(value) != 1 else ''}"
    text, kind = repr(value), type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({text if len(text) <= 40 else text[:37] + '...'})"


def check_gguf_tokenizer_metadata(meta: Mapping[str, Any]) -> None:
    """Refuse tokenizer metadata of the wrong type (integer merges, an array for the chat
    template, ...) with a ModelFormatError naming the key, before anything trips over it."""
    for key, (expected, ok, is_array) in _GGUF_TOKENIZER_KEYS.items():
        if key not in meta:
            continue
        value = meta[key]
        if is_array and isinstance(value, (list, tuple)):
            if set(map(type, value)) <= _ITEM_TYPES.get(key, set()):   # the usual case, at C speed
                continue
            for i, item in enumerate(value):
                if not ok(item):
                    raise ModelFormatError(
                        f"GGUF metadata '{key}' holds {_shown(item)} at item {i}, expected {expected}",
                        fix="the file's vocabulary is damaged; re-convert the model with llama.cpp's "
                        "convert_hf_to_gguf.py")
            continue
        if not is_array and ok(value):
            continue
        raise ModelFormatError(f"GGUF metadata '{key}' is {_shown(value)}, expected {expected}",
                               fix="the file's metadata is damaged; re-convert the model with llama.cpp's "
                               "convert_hf_to_gguf.py")


# --------------------------------------------------------------------------------------------
# Chat templates


#: Bounds on rendering a chat template (it comes from the model file, so it may be hostile):
#: wall-clock seconds, and characters of output or of any one string/list it builds.
CHAT_TEMPLATE_TIME_LIMIT_S = 2.0
CHAT_TEMPLATE_MAX_CHARS = 8 << 20

_PERCENT_SPEC = re.compile(r"%[#0\- +]*(\d*)(?:\.(\d*))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*:[^{}]*?(\d+)(?:\.(\d+))?[^{}]*\}")


class _TemplateBoundError(Exception):
    """A chat template went past a bound of :data:`CHAT_TEMPLATE_TIME_LIMIT_S` or
    :data:`CHAT_TEMPLATE_MAX_CHARS` (not a jinja2.TemplateError: nothing in jinja2 swallows it)."""


def _too_big(what: str) -> _TemplateBoundError:
    return _TemplateBoundError(f"{what}, more than the {CHAT_TEMPLATE_MAX_CHARS} characters a chat template may build")


def _check_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and abs(value) > CHAT_TEMPLATE_MAX_CHARS:
            raise _too_big(f"a call with the argument {value}")


def _check_format_spec(fmt: str, spec: re.Pattern) -> None:
    for m in spec.finditer(fmt):
        for digits in m.groups():
            if digits and int(digits) > CHAT_TEMPLATE_MAX_CHARS:
                raise _too_big(f"a format field {m.group(0)!r}")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) and \
                len(left) + len(right) > CHAT_TEMPLATE_MAX_CHARS:
            raise _too_big(f"concatenating {len(left)} and {len(right)} items")
    elif operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > CHAT_TEMPLATE_MAX_CHARS:
                raise _too_big(f"repeating {len(seq)} items {n} times")
        if isinstance(left, int) and isinstance(right, int) and \
                left.bit_length() + right.bit_length() > 8 * CHAT_TEMPLATE_MAX_CHARS:
            raise _too_big("a product of two huge integers")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right * left.bit_length() > 8 * CHAT_TEMPLATE_MAX_CHARS:
            raise _too_big(f"the power {left} ** {right}")
    elif operator == "%" and isinstance(left, str):
        _check_format_spec(left, _PERCENT_SPEC)


def _bounded_join(join):
    def bounded(parts):
        parts = [str(p) for p in parts]
        if sum(len(p) for p in parts) > CHAT_TEMPLATE_MAX_CHARS:
            raise _too_big(f"joining strings of {sum(len(p) for p in parts)} characters")
        return join(parts)
    return bounded


def _bounded_filter(func):
    """A jinja2 filter that refuses huge integer arguments (``center(10**9)``, ``batch(10**9)``)."""
    skip = 2 if getattr(func, "jinja_pass_arg", None) else 1   # the context (if passed) and the value

    @functools.wraps(func)   # keeps jinja's pass_context/pass_environment marks
    def bounded(*args, **kwargs):
        _check_arguments(args[skip:], kwargs)
        return func(*args, **kwargs)
    return bounded


def _render_bounded(template, variables: Mapping[str, Any]) -> str:
    """Render ``template`` in this thread, stopped with _TemplateBoundError once it has run
    :data:`CHAT_TEMPLATE_TIME_LIMIT_S` seconds or written :data:`CHAT_TEMPLATE_MAX_CHARS` characters.

    The time bound is a ``sys.settrace`` hook: called at every Python call made while rendering
    and at every line of the template's own compiled code (every loop iteration), it raises once
    the deadline has passed, and the exception unwinds the render like any other. A debugger's or
    coverage's trace function is set aside during the render and put back after it.
    """
    deadline = time.monotonic() + CHAT_TEMPLATE_TIME_LIMIT_S
    template_file = template.filename or "<template>"   # the co_filename of its compiled code

    def expired() -> _TemplateBoundError:
        return _TemplateBoundError(f"rendering ran past its time limit of {CHAT_TEMPLATE_TIME_LIMIT_S} s")

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise expired()
        return on_line

    def on_call(frame, event, arg):
        if time.monotonic() > deadline:
            raise expired()
        return on_line if frame.f_code.co_filename == template_file else None

    out: list[str] = []
    size = 0
    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > CHAT_TEMPLATE_MAX_CHARS:
                raise _too_big(f"output of {size} characters")
            out.append(piece)
    finally:
        sys.settrace(previous)
    return "".join(out)


@lru_cache(maxsize=32)
def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """Accept transformers' ``{% generation %}...{% endgeneration %}`` (renders the body as is)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Like transformers: no HTML escaping, and the json.dumps options exposed.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox, plus size bounds on what one C-level operation can build (those
        run uninterrupted: the time bound of :func:`_render_bounded` only acts between them)."""

        intercepted_binops = frozenset(["+", "*", "**", "%"])   # also keeps them out of constant folding

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            _check_arguments(args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            if wrapped is not None:   # value is some_string.format: its fields' widths are bounded
                _check_format_spec(value.__self__, _FORMAT_SPEC)
            return wrapped

    env = BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    for fname, func in list(env.filters.items()):
        env.filters[fname] = _bounded_filter(func)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    template = env.from_string(source)
    # `a ~ b` compiles to a call of the module's str_join, which no sandbox hook sees: bound it here
    namespace = template.root_render_func.__globals__
    namespace["str_join"] = _bounded_join(namespace["str_join"])
    return template


def validate_messages(messages: Any) -> list[dict]:
    """Check a conversation and return plain dict copies; raise InvalidParameterError otherwise."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidParameterError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}",
            fix='pass e.g. [{"role": "user", "content": "Hello"}]',
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidParameterError(
                f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}",
                fix='pass e.g. {"role": "user", "content": "Hello"}',
            )
        role = m.get("role")
        if not isinstance(role, str):
            raise InvalidParameterError(
                f"message {i}: 'role' must be a string, got {type(role).__name__}",
                fix="use one of: " + ", ".join(ALLOWED_ROLES),
            )
        if role not in ALLOWED_ROLES:
            raise InvalidParameterError(
                f"message {i}: unknown role {role!r}", fix="use one of: " + ", ".join(ALLOWED_ROLES)
            )
        if "content" not in m:
            raise InvalidParameterError(f"message {i} ({role}) has no 'content'", fix="add a 'content' string")
        content = m["content"]
        if not isinstance(content, str):
            if not (content is None and role == "assistant" and m.get("tool_calls")):
                raise InvalidParameterError(
                    f"message {i} ({role}): 'content' must be a string, got {type(content).__name__}",
                    fix="pass the message text as a plain string",
                )
        out.append(dict(m))
    return out


# --------------------------------------------------------------------------------------------


@dataclass
class _Special:
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None


class Tokenizer:
    """Encode text to ids, decode ids to text, render chat prompts.

    Build one with :meth:`from_gguf_metadata`, :meth:`from_gguf` or :meth:`from_file`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        pieces: list[bytes] | None,
        tokens: list[str],
        special_ids: Iterable[int],
        bos_id: int | None,
        eos_id: int | None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        extra_eog_ids: Iterable[int] = (),
        chat_template: str | None = None,
        strip_leading_space: bool = False,
        kind: str = "bpe",
    ):
        self._backend = backend
        self._backend_plain: tokenizers.Tokenizer | None = None  # special tokens not parsed
        self._pieces = pieces
        self._tokens = tokens
        self._special_ids = frozenset(special_ids)
        self._sp = _Special(bos_id, eos_id, unk_id, pad_id)
        self._strip_leading_space = strip_leading_space
        self.kind = kind
        self._has_chat_template = bool(chat_template)
        self.chat_template: str = chat_template or CHATML_TEMPLATE
        self._token_to_id: dict[str, int] | None = None

        eog = set(int(i) for i in extra_eog_ids if i is not None and 0 <= int(i) < len(tokens))
        if eos_id is not None:
            eog.add(eos_id)
        # One pass over the vocabulary rather than token_to_id's {text: id} map (~5 MB for 49k
        # tokens, most processes never need it); the first id of a text wins, as there.
        wanted = set(EOG_TOKEN_TEXTS)
        for i, t in enumerate(tokens):
            if t in wanted:
                wanted.discard(t)
                if i in self._special_ids:
                    eog.add(i)
        self._eog_ids = frozenset(eog)

    # ---- construction from GGUF ------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """Build from a GGUF file (reads only its metadata)."""
        return cls.from_gguf_metadata(read_gguf_metadata(path))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Build from a GGUF metadata dict of plain Python values (``tokenizer.ggml.*`` keys)."""
        check_gguf_tokenizer_metadata(meta)
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None or model is None:
            raise ModelFormatError(
                "the GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)",
                fix="use a GGUF converted with its vocabulary (llama.cpp's convert_hf_to_gguf.py does this)",
            )
        tokens = [str(t) for t in tokens]
        types = _as_int_list(meta.get("tokenizer.ggml.token_type")) or [TOKEN_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ModelFormatError(
                f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens",
                fix="re-convert the model",
            )
        if model not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"tokenizer type {model!r} is not supported",
                fix="use a model with a 'gpt2' (byte-level BPE) or 'llama' (SentencePiece) vocabulary",
            )
        if model == "gpt2" and (meta.get("tokenizer.ggml.pre") or "default") not in PRE_TOKENIZER_SPLITS:
            # Said here, not where the backend is built, so that a cached backend says it too.
            warnings.warn(
                f"unknown GGUF pre-tokenizer {meta.get('tokenizer.ggml.pre')!r}: splitting text with "
                "GPT-2's expression; tokenization may differ from the model's own",
                stacklevel=2,
            )
        cache = _recipe_cache_path(meta) if len(tokens) >= _CACHE_MIN_TOKENS else None
        recipe = _read_cached_recipe(cache, len(tokens)) if cache is not None else None
        if recipe is None:
            build = cls._gguf_bpe_recipe if model == "gpt2" else cls._gguf_spm_recipe
            recipe = build(meta, tokens, types)
            if cache is not None:
                _write_cached_recipe(cache, recipe)
        return cls._from_gguf_parts(meta, tokens, types, _assemble_gguf(recipe, meta))

    @staticmethod
    def _special_ids_from_meta(meta: Mapping[str, Any], n: int) -> dict[str, int | None]:
        out = {}
        for name, key in (
            ("bos", "bos_token_id"),
            ("eos", "eos_token_id"),
            ("unk", "unknown_token_id"),
            ("pad", "padding_token_id"),
            ("eot", "eot_token_id"),
            ("eom", "eom_token_id"),
        ):
            v = meta.get(f"tokenizer.ggml.{key}")
            out[name] = int(v) if v is not None and 0 <= int(v) < n else None
        return out

    @staticmethod
    def _unique_vocab(keys: list[str]) -> dict[str, int]:
        """``{text: id}``; a repeated text keeps its first id, later ones get a placeholder key."""
        vocab: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in vocab or k == "":
                k = f"[EDGELLM_DUP_{i}]"
            vocab[k] = i
        return vocab

    @staticmethod
    def _added_tokens(tokens: list[str], types: list[int], keys: list[str]) -> tuple[list, list]:
        special, plain = [], []
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if keys[i] != t:  # a duplicate; can't be matched by text
                continue
            if ty == TOKEN_CONTROL:
                special.append(AddedToken(t, special=True, normalized=False))
            elif ty == TOKEN_USER_DEFINED:
                plain.append(AddedToken(t, special=False, normalized=False))
        return special, plain

    @staticmethod
    def _post_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None):
        """BOS/EOS around the text, as the GGUF's add_bos_token / add_eos_token ask."""
        head = [f"{bos}:0"] if bos is not None else []
        tail = [f"{eos}:0"] if eos is not None else []
        single = head + ["$A:0"] + tail
        pair = single + [t.replace(":0", ":1") for t in head] + ["$B:1"] + [t.replace(":0", ":1") for t in tail]
        specials = {}
        if bos is not None:
            specials[bos] = bos_id
        if eos is not None:
            specials[eos] = eos_id
        return processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=list(specials.items())
        )

    @classmethod
    def _finish_recipe(
        cls,
        meta: Mapping[str, Any],
        tokens: list[str],
        types: list[int],
        keys: list[str],
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        model_options: dict[str, Any],
        pieces: list[bytes],
        default_add_bos: bool,
        strip_leading_space: bool,
        kind: str,
    ) -> _GGUFRecipe:
        """The special tokens and the BOS/EOS post-processor's arguments, added to the recipe."""
        ids = cls._special_ids_from_meta(meta, len(tokens))
        special, plain = cls._added_tokens(tokens, types, keys)
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        add_bos = default_add_bos if add_bos is None else bool(add_bos)
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token") or False)
        bos_id = ids["bos"] if add_bos else None
        eos_id = ids["eos"] if add_eos else None
        post = None
        if bos_id is not None or eos_id is not None:
            post = (keys[bos_id] if bos_id is not None else None, bos_id,
                    keys[eos_id] if eos_id is not None else None, eos_id)
        return _GGUFRecipe(kind, list(vocab), merges, model_options, [t.content for t in special],
                           [t.content for t in plain], post, pieces, strip_leading_space)

    @classmethod
    def _from_gguf_parts(
        cls, meta: Mapping[str, Any], tokens: list[str], types: list[int], parts: _GGUFBackend
    ) -> "Tokenizer":
        ids = cls._special_ids_from_meta(meta, len(tokens))
        special_ids = {i for i, ty in enumerate(types) if ty == TOKEN_CONTROL}
        template = meta.get("tokenizer.chat_template")
        return cls(
            parts.backend,
            pieces=parts.pieces,
            tokens=tokens,
            special_ids=special_ids,
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            unk_id=ids["unk"],
            pad_id=ids["pad"],
            extra_eog_ids=[ids["eot"], ids["eom"]],
            chat_template=template if isinstance(template, str) else None,
            strip_leading_space=parts.strip_leading_space,
            kind=parts.kind,
        )

    @classmethod
    def _gguf_bpe_recipe(cls, meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> _GGUFRecipe:
        alphabet = frozenset(unicode_to_byte())
        to_bytes = _byte_level_translation()
        keys: list[str] = []
        pieces: list[bytes] = []
        for t, ty in zip(tokens, types):
            if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                keys.append(t)  # matched whole in the raw text; stands for its own UTF-8
                pieces.append(t.encode("utf-8"))
            elif ty == TOKEN_UNUSED:
                keys.append(t)
                pieces.append(b"")
            else:
                if alphabet.issuperset(t):
                    keys.append(t)
                    pieces.append(t.translate(to_bytes).encode("latin-1"))
                else:  # stored as plain text: respell in the byte alphabet
                    raw = t.encode("utf-8")
                    keys.append(_byte_level_spelling(raw))
                    pieces.append(raw)
        vocab = cls._unique_vocab(keys)
        merges = []
        for m in meta.get("tokenizer.ggml.merges") or ():
            pos = m.find(" ", 1)
            if pos < 0:
                continue
            a, b = m[:pos], m[pos + 1 :]
            if a in vocab and b in vocab and (a + b) in vocab:
                merges.append((a, b))

        pre = meta.get("tokenizer.ggml.pre") or "default"
        options = {"fuse_unk": False, "byte_fallback": False, "ignore_merges": pre in _IGNORE_MERGES_PRE}
        return cls._finish_recipe(meta, tokens, types, keys, vocab, merges, options, pieces, False, False, "bpe")

    @classmethod
    def _gguf_spm_recipe(cls, meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> _GGUFRecipe:
        # llama.cpp's defaults for SentencePiece files that name no special tokens
        defaults = {
            "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
        }
        meta = {**defaults, **meta}
        scores = meta.get("tokenizer.ggml.scores")
        scores = [float(s) for s in scores] if scores is not None else [0.0] * len(tokens)
        if len(scores) != len(tokens):
            raise ModelFormatError(
                f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens", fix="re-convert the model"
            )
        keys = list(tokens)
        vocab = cls._unique_vocab(keys)
        pieces = []
        for t, ty in zip(tokens, types):
            pieces.append(b"" if ty == TOKEN_UNUSED else _spm_bytes(t, ty))

        # SentencePiece BPE merges the adjacent pair whose concatenation has the best score.
        # As tokenizers BPE merges: every split (a, b) of a normal token t, ranked by t's score.
        mergeable = {
            t: i for t, i in vocab.items() if types[i] in (TOKEN_NORMAL, TOKEN_UNDEFINED, TOKEN_USER_DEFINED)
        }
        ranked = []
        for t, i in mergeable.items():
            if len(t) < 2:
                continue
            for k in range(1, len(t)):
                a, b = t[:k], t[k:]
                ia, ib = mergeable.get(a), mergeable.get(b)
                if ia is not None and ib is not None:
                    ranked.append((-scores[i], i, ia, ib, a, b))
        ranked.sort()
        merges = [(a, b) for *_, a, b in ranked]

        unk_id = cls._special_ids_from_meta(meta, len(tokens))["unk"]
        if unk_id is None:
            unk_id = next((i for i, ty in enumerate(types) if ty == TOKEN_UNKNOWN), None)
        has_bytes = any(ty == TOKEN_BYTE for ty in types)
        options = {"unk_token": keys[unk_id] if unk_id is not None else None, "fuse_unk": True,
                   "byte_fallback": has_bytes}
        add_prefix = meta.get("tokenizer.ggml.add_space_prefix")
        add_prefix = True if add_prefix is None else bool(add_prefix)
        return cls._finish_recipe(meta, tokens, types, keys, vocab, merges, options, pieces, True, add_prefix, "spm")

    # ---- construction from tokenizer.json ---------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Build from a ``tokenizer.json`` (or the folder holding one).

        Next to it, ``tokenizer_config.json`` gives ``bos_token``, ``eos_token`` and
        ``chat_template``; ``chat_template.jinja`` and ``generation_config.json``'s
        ``eos_token_id`` (for ``eog_ids``) are used when present.
        """
        from edgellm.errors import ModelNotFoundError

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFoundError(
                f"no tokenizer.json at {path}", fix="point to a Hugging Face model folder that has tokenizer.json"
            )
        folder = path.parent
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
            spec = json.loads(path.read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 - any parse failure is a format problem
            raise ModelFormatError(f"cannot read {path}: {e}", fix="re-download tokenizer.json") from e
        config: dict = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ModelFormatError(f"cannot parse {cfg_path}: {e}", fix="re-download it") from e

        n = backend.get_vocab_size(with_added_tokens=True)
        tokens = [backend.id_to_token(i) or "" for i in range(n)]
        added = spec.get("added_tokens") or []
        added_ids = {int(a["id"]): a for a in added if "id" in a}
        special_ids = {i for i, a in added_ids.items() if a.get("special")}

        pieces = cls._pieces_from_spec(spec, tokens, added_ids)
        strip = False
        dec = spec.get("decoder") or {}
        for d in [dec] + list(dec.get("decoders") or []):
            if d.get("type") == "Strip" and int(d.get("start") or 0) >= 1:
                strip = True
            if d.get("type") == "Metaspace" and d.get("prepend_scheme", "always") != "never":
                strip = True

        def tid(key: str) -> int | None:
            c = _token_content(config.get(key))
            return backend.token_to_id(c) if c is not None else None

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if not template and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        extra_eog: list[int] = []
        gen_cfg = folder / "generation_config.json"
        if gen_cfg.is_file():
            try:
                extra_eog = _as_int_list(json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id"))
            except ValueError:
                pass

        return cls(
            backend,
            pieces=pieces,
            tokens=tokens,
            special_ids=special_ids,
            bos_id=tid("bos_token"),
            eos_id=tid("eos_token"),
            unk_id=tid("unk_token"),
            pad_id=tid("pad_token"),
            extra_eog_ids=extra_eog,
            chat_template=template if isinstance(template, str) else None,
            strip_leading_space=strip,
            kind="hf",
        )

    @staticmethod
    def _pieces_from_spec(spec: dict, tokens: list[str], added_ids: dict[int, dict]) -> list[bytes] | None:
        """Per-id bytes for byte-level and SentencePiece-style decoders; None for anything else."""
        dec = spec.get("decoder") or {}
        parts = [dec] + list(dec.get("decoders") or [])
        kinds = {d.get("type") for d in parts}
        if "ByteLevel" in kinds:
            mode = "byte"
        elif "ByteFallback" in kinds or "Metaspace" in kinds or any(
            d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == SPM_SPACE for d in parts
        ):
            mode = "spm"
        else:
            return None
        out = []
        for i, t in enumerate(tokens):
            if i in added_ids:
                out.append(t.encode("utf-8"))
            elif mode == "byte":
                out.append(_byte_level_bytes(t))
            else:
                is_byte = len(t) == 6 and t.startswith("<0x") and t.endswith(">")
                out.append(_spm_bytes(t, TOKEN_BYTE if is_byte else TOKEN_NORMAL))
        return out

    # ---- properties --------------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        return self._sp.bos_id

    @property
    def eos_id(self) -> int | None:
        return self._sp.eos_id

    @property
    def unk_id(self) -> int | None:
        return self._sp.unk_id

    @property
    def pad_id(self) -> int | None:
        return self._sp.pad_id

    @property
    def eog_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS plus end-of-turn tokens found in the vocabulary."""
        return self._eog_ids

    @property
    def special_ids(self) -> frozenset[int]:
        """Control tokens: dropped by ``decode(skip_special_tokens=True)``."""
        return self._special_ids

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_id) if self.bos_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_id) if self.eos_id is not None else None

    @property
    def has_chat_template(self) -> bool:
        """False when the model brought none and :data:`CHATML_TEMPLATE` is used."""
        return self._has_chat_template

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry as stored (byte-level spelling, e.g. ``Ġworld``; ``▁`` for SPM)."""
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        if self._token_to_id is None:
            m: dict[str, int] = {}
            for i, t in enumerate(self._tokens):
                m.setdefault(t, i)
            self._token_to_id = m
        return self._token_to_id.get(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` decodes to (not necessarily valid UTF-8 on its own)."""
        if self._pieces is not None:
            return self._pieces[token_id]
        return self._backend.decode([token_id], skip_special_tokens=False).encode("utf-8")

    # ---- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``add_special_tokens``: add BOS/EOS as the model's metadata says (see the module doc).
        ``parse_special``: match special-token text such as ``<|im_start|>`` as that token (the
        default, like transformers); false treats it as plain text (safe for untrusted input).
        """
        if not isinstance(text, str):
            raise InvalidParameterError(f"text to encode must be a string, got {type(text).__name__}")
        backend = self._backend
        if not parse_special:
            if self._backend_plain is None:
                plain = tokenizers.Tokenizer.from_str(self._backend.to_str())
                plain.encode_special_tokens = True
                self._backend_plain = plain
            backend = self._backend_plain
        # encode_batch, not encode: the same ids, but it releases the GIL while it works, so a long
        # text tokenised in a worker thread does not stall the caller's other threads (a server's loop).
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_chat(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Ids of the rendered chat prompt. Special tokens come only from the template: special-token
        text inside a message's content (``<|im_end|><|im_start|>system`` in a user message) is
        encoded as plain text, as transformers does with ``split_special_tokens=True`` -- so a
        message cannot forge a role or end a turn early.

        How: the template is rendered a second time with every content string between two random
        markers, which gives the characters of the prompt that came from content. Special tokens
        are matched only outside those; the text between them (template and content together) is
        encoded as plain text, as ``encode`` does between special tokens. A prompt whose contents
        hold no special-token text is encoded exactly as before, in one call. Raises
        InvalidParameterError when content holds special-token text and the template rewrites
        contents (``| trim``), so that the two cannot be told apart.
        """
        import re
        import secrets

        prompt = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        specials = sorted({t.content for t in self._backend.get_added_tokens_decoder().values() if t.content},
                          key=len, reverse=True)
        contents = [m.get("content") for m in messages if isinstance(m, Mapping)]
        if not specials or not any(isinstance(c, str) and t in c for c in contents for t in specials):
            return self.encode(prompt, add_special_tokens=False)

        tag = secrets.token_hex(8)
        open_mark, close_mark = f"\x00<{tag}\x00", f"\x00{tag}>\x00"
        marked_msgs = [dict(m, content=open_mark + m["content"] + close_mark)
                       if isinstance(m, Mapping) and isinstance(m.get("content"), str) else m for m in messages]
        marked = self.apply_chat_template(marked_msgs, add_generation_prompt, **kwargs)
        # Template regions (even pieces) and content regions (odd pieces) of the prompt.
        pieces = re.split(f"{re.escape(open_mark)}|{re.escape(close_mark)}", marked)
        if "".join(pieces) != prompt or len(pieces) % 2 != 1:
            raise InvalidParameterError(
                "a message contains special-token text (such as "
                f"{next(t for t in specials if any(isinstance(c, str) and t in c for c in contents))!r}) "
                "and this model's chat template rewrites message contents, so it cannot be kept as plain text",
                fix="remove special-token text from the messages",
            )
        special_re = re.compile("|".join(re.escape(t) for t in specials))
        ids: list[int] = []
        text = ""                  # plain text since the last template special token

        def flush() -> None:
            nonlocal text
            if text:
                ids.extend(self.encode(text, add_special_tokens=False, parse_special=False))
            text = ""

        for k, piece in enumerate(pieces):
            if k % 2:              # content: never special
                text += piece
                continue
            at = 0
            for m in special_re.finditer(piece):
                text += piece[at:m.start()]
                flush()
                ids.extend(self.encode(m.group(0), add_special_tokens=False))
                at = m.end()
            text += piece[at:]
        flush()
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = []
        n = len(self._tokens)
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise InvalidParameterError(f"token id {i} is outside the vocabulary (0..{n - 1})")
            out.append(i)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
        ids = self._check_ids(ids)
        if self._pieces is None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        skip = self._special_ids if skip_special_tokens else ()
        data = b"".join(self._pieces[i] for i in ids if i not in skip)
        text = data.decode("utf-8", errors="replace")
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def incremental_decoder(self, skip_special_tokens: bool = False, strip_leading_space: bool | None = None):
        return IncrementalDecoder(self, skip_special_tokens, strip_leading_space)

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = False) -> Iterator[str]:
        """Yield text pieces as ``ids`` arrive; their concatenation equals ``decode(ids)``."""
        dec = IncrementalDecoder(self, skip_special_tokens)
        for i in ids:
            piece = dec.add(i)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail

    # ---- chat ----------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` with the model's chat template, as transformers does.

        The template is the GGUF's ``tokenizer.chat_template`` or the folder's
        ``tokenizer_config.json`` / ``chat_template.jinja``. A model without one gets the ChatML
        fallback :data:`CHATML_TEMPLATE` (``<|im_start|>role\\ncontent<|im_end|>\\n``); check
        :attr:`has_chat_template`. The template comes from the model file, so it is untrusted:
        rendering is bounded in time (:data:`CHAT_TEMPLATE_TIME_LIMIT_S`) and in the size of what it
        builds (:data:`CHAT_TEMPLATE_MAX_CHARS`); going past either raises ModelFormatError.
        Rendering runs in jinja2's immutable sandbox with
        ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a non-escaping
        ``tojson``, and the variables ``messages``, ``add_generation_prompt``, ``bos_token``,
        ``eos_token``, ``unk_token``, ``pad_token``, ``tools``, ``documents`` plus ``kwargs``.

        Raises InvalidParameterError for malformed messages or a template that rejects them.
        """
        import jinja2

        msgs = validate_messages(messages)
        variables: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "unk_token": self.id_to_token(self.unk_id) if self.unk_id is not None else None,
            "pad_token": self.id_to_token(self.pad_id) if self.pad_id is not None else None,
            "tools": None,
            "documents": None,
        }
        variables.update(kwargs)
        try:
            template = _compile_template(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ModelFormatError(
                f"the model's chat template does not parse: {e}", fix="pass a corrected template"
            ) from e
        hostile = "the model's chat template is faulty or hostile; pass a corrected template"
        try:
            return _render_bounded(template, {"messages": msgs, "add_generation_prompt": add_generation_prompt,
                                              **variables})
        except _TemplateBoundError as e:
            raise ModelFormatError(f"the model's chat template was stopped: {e}", fix=hostile) from None
        except (RecursionError, OverflowError, MemoryError) as e:
            raise ModelFormatError(
                f"the model's chat template failed while rendering ({type(e).__name__}: {e})", fix=hostile
            ) from None
        except jinja2.TemplateError as e:
            raise InvalidParameterError(
                f"the chat template rejected the conversation: {e}",
                fix="check the roles and their order (many templates need user/assistant turns to alternate)",
            ) from e


class IncrementalDecoder:
    """Turn a stream of ids into text pieces without splitting UTF-8 characters.

    ``add(id)`` returns the text that became complete (possibly ``""`` while a multi-byte
    character is still arriving byte token by byte token); ``flush()`` returns what is left
    (an unfinished character as U+FFFD). The concatenation of all pieces equals
    ``tokenizer.decode(ids)``. ``strip_leading_space`` defaults to what ``decode`` does (the
    SentencePiece prefix space); pass False when continuing text after a prompt.
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = False, strip_leading_space: bool | None = None
    ):
        self._tok = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._skip_flag = skip_special_tokens
        self._strip = tokenizer._strip_leading_space if strip_leading_space is None else strip_leading_space
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False
        self._ids: list[int] = []  # fallback mode only
        self._emitted = ""
        self.text = ""

    def _emit(self, text: str) -> str:
        if text and not self._started:
            self._started = True
            if self._strip and text.startswith(" "):
                text = text[1:]
        self.text += text
        return text

    def add(self, token_id: int) -> str:
        token_id = self._tok._check_ids([token_id])[0]
        if self._tok._pieces is None:
            return self._add_fallback(token_id)
        if token_id in self._skip:
            return ""
        return self._emit(self._utf8.decode(self._tok._pieces[token_id], final=False))

    def _add_fallback(self, token_id: int) -> str:
        self._ids.append(token_id)
        full = self._tok._backend.decode(self._ids, skip_special_tokens=self._skip_flag)
        if full.endswith("\ufffd"):
            return ""
        new = full[len(self._emitted) :] if full.startswith(self._emitted) else ""
        self._emitted = full
        self.text = full
        return new

    def flush(self) -> str:
        if self._tok._pieces is None:
            full = self._tok._backend.decode(self._ids, skip_special_tokens=self._skip_flag)
            new = full[len(self._emitted) :] if full.startswith(self._emitted) else ""
            self._emitted = self.text = full
            return new
        return self._emit(self._utf8.decode(b"", final=True))

    def reset(self) -> None:
        self.__init__(self._tok, self._skip_flag, self._strip)


# --------------------------------------------------------------------------------------------


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """GGUF metadata as plain Python values (read by :func:`edgellm.loading.gguf.read_gguf`)."""
    # Here, not at the top: the GGUF reader imports torch, which a tokenizer alone does not need.
    from edgellm.loading.gguf import read_gguf

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist", fix="check the path")
    return dict(read_gguf(path).metadata)


# --------------------------------------------------------------------------------------------
# GGUF vocabularies become a tokenizers BPE in two steps: a recipe of plain data, made by Python
# loops over every token and merge (the slow part: ~0.3 s for SmolLM2's 49k tokens), then the
# backend assembled from it in Rust. Recipes of large vocabularies are cached: reading one back
# and assembling it costs less than reading tokenizers' own JSON of the finished backend. The key covers everything the
# recipe depends on (the tokenizer metadata, this module's code, the tokenizers and Python versions), so a
# changed file or a new edgellm never reads a stale entry; a damaged entry is rebuilt.

_CACHE_FORMAT = 2
_CACHE_MIN_TOKENS = 4096  # smaller vocabularies build in milliseconds: not worth a file


@dataclass
class _GGUFRecipe:
    """What a GGUF vocabulary's backend is made of, as plain data (JSON-serialisable)."""

    kind: str                          # "bpe" (byte-level, GPT-2 style) or "spm" (SentencePiece)
    vocab: list[str]                   # token text by id, repeated texts given placeholder names
    merges: list[tuple[str, str]]      # in priority order
    model_options: dict[str, Any]      # the rest of models.BPE's arguments
    special: list[str]                 # added tokens matched whole, special
    plain: list[str]                   # added tokens matched whole, not special
    post: tuple[str | None, int | None, str | None, int | None] | None   # BOS and EOS added around text
    pieces: list[bytes]                # each token's bytes
    strip_leading_space: bool


@dataclass
class _GGUFBackend:
    """The assembled recipe: the backend and what the Tokenizer keeps beside it."""

    backend: tokenizers.Tokenizer
    pieces: list[bytes]
    strip_leading_space: bool
    kind: str


def _assemble_gguf(recipe: _GGUFRecipe, meta: Mapping[str, Any]) -> _GGUFBackend:
    """The tokenizers backend of a recipe (``meta``: the GGUF metadata it was made from)."""
    vocab = {text: i for i, text in enumerate(recipe.vocab)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=recipe.merges, **recipe.model_options))
    if recipe.kind == "bpe":
        pre = meta.get("tokenizer.ggml.pre") or "default"
        exprs = PRE_TOKENIZER_SPLITS.get(pre, [_GPT2])  # unknown: from_gguf_metadata warned
        if pre in _NFC_PRE:
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(e), behavior="isolated", invert=False) for e in exprs]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
    else:
        add_prefix = recipe.strip_leading_space   # SentencePiece: the space it prepends is stripped again
        norm = [normalizers.Replace(" ", SPM_SPACE)]
        if add_prefix:
            norm.insert(0, normalizers.Prepend(SPM_SPACE))
        backend.normalizer = normalizers.Sequence(norm)
        backend.pre_tokenizer = None
        dec = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            dec.append(decoders.Strip(content=" ", left=1, right=0))
        backend.decoder = decoders.Sequence(dec)
    if recipe.special:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in recipe.special])
    if recipe.plain:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in recipe.plain])
    if recipe.post is not None:
        backend.post_processor = Tokenizer._post_processor(*recipe.post)
    return _GGUFBackend(backend, recipe.pieces, recipe.strip_leading_space, recipe.kind)


def _hash_value(h, value: Any) -> None:
    # Arrays of strings are joined rather than repr()'d: a 49k-token list's repr cost ~10 ms.
    if isinstance(value, list):
        try:
            joined = "\x00".join(value)
        except TypeError:   # not all strings
            joined = None
        if joined is not None:
            h.update(b"S%d:" % len(value))
            h.update(joined.encode("utf-8", "surrogateescape"))
            return
    h.update(repr(value).encode("utf-8", "surrogateescape"))


def _recipe_cache_path(meta: Mapping[str, Any]) -> Path:
    # marshal's format may change with the Python version: it is part of the key
    h = hashlib.sha256(f"{_CACHE_FORMAT} {tokenizers.__version__} {sys.version_info[:2]} {marshal.version}".encode())
    h.update(Path(__file__).read_bytes())
    for key in sorted(k for k in meta if k.startswith("tokenizer.ggml.")):
        h.update(f"\n{key}=".encode())
        _hash_value(h, meta[key])
    return cache_dir() / "tokenizers" / f"{h.hexdigest()[:32]}.recipe"


# The recipe is stored with marshal (lists, tuples, str, bytes as Python holds them): reading
# SmolLM2's back took a tenth of the time json took. marshal trusts its input, like the native
# kernels loaded from the same cache directory; a damaged file fails to load or to check, and is rebuilt.
_RECIPE_FIELDS = ("kind", "vocab", "merges", "model_options", "special", "plain", "post", "pieces",
                  "strip_leading_space")


def _read_cached_recipe(path: Path, n_tokens: int) -> _GGUFRecipe | None:
    """The cached recipe, or None when there is none or it is damaged (then it is rebuilt)."""
    try:
        d = marshal.loads(path.read_bytes())
        recipe = _GGUFRecipe(**{f: d[f] for f in _RECIPE_FIELDS})
        if len(recipe.pieces) != n_tokens or len(recipe.vocab) != n_tokens or recipe.kind not in ("bpe", "spm"):
            return None
        return recipe
    except Exception:  # noqa: BLE001 - missing, damaged or unreadable: the caller rebuilds it
        return None


def _write_cached_recipe(path: Path, recipe: _GGUFRecipe) -> None:
    """Write atomically (a temporary file renamed into place), so a killed process or a concurrent
    reader never sees half a file. A cache that cannot be written (read-only home) is skipped."""
    data = marshal.dumps({f: getattr(recipe, f) for f in _RECIPE_FIELDS})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; it holds nothing secret
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


__all__ = [
    "CHATML_TEMPLATE",
    "IncrementalDecoder",
    "PRE_TOKENIZER_SPLITS",
    "Tokenizer",
    "read_gguf_metadata",
    "validate_messages",
]
