"""Token sampling: parameters, the batched sampler, per-sequence penalty state, stop strings.

How the engine uses this module, once per decode step::

    sampler = Sampler()                                         # one per engine
    hist = SequenceHistory(prompt_ids, vocab_size, sample_index=i)   # one per sequence, at admission
    stops = StopChecker.from_params(params, eos_token_ids)      # one per sequence, at admission
    ...
    out = sampler.sample(logits, [seq.params for seq in batch], [seq.hist for seq in batch])
    for row, seq in enumerate(batch):
        tok = out.token_ids[row]
        seq.hist.append(tok)                                    # penalties see it next step
        upd = seq.stops.step(tok, detokenize_increment(tok))
        emit(upd.text, out.logprobs[row], out.top_logprobs[row])
        if upd.finish_reason: finish(seq, upd.finish_reason)    # "stop" or "length"

Processing order, per row (the order of Hugging Face ``generate`` and vLLM):

    logit_bias -> penalties (repetition, then frequency, then presence) -> grammar mask -> temperature
    -> top-k -> top-p -> min-p -> sample

Grammar mask: a row whose ``SequenceHistory`` holds a ``constraint`` (``SamplingParams.grammar``,
see :mod:`edgellm.grammar`) has every token its grammar forbids set to -inf, greedy or sampled;
``SequenceHistory.append`` advances the constraint past the chosen token. A constrained row whose
grammar allows nothing fails alone (``errors="row"``), like a row of non-finite logits.

``logit_bias`` (OpenAI): a map token id -> a number in [-100, 100] added to that token's logit
(-100 in effect bans the token, +100 all but forces it).

Greedy rows (``temperature == 0``, or ``top_k == 1``) take the argmax of the *penalised* logits; the
truncation steps do not change an argmax, so they are skipped. A batch of plain greedy rows (no
penalties, no log-probabilities) is a single ``argmax`` with no sort and no softmax.

Log-probabilities: ``SampleOutput.logprobs`` / ``top_logprobs`` are the log-softmax of the *raw*
logits the model produced, before penalties, temperature and truncation, as OpenAI's API and vLLM
report them by default. So a token the sampler picked from a truncated, sharpened distribution still
reports how likely the model itself found it.

Penalties:

* ``repetition_penalty`` (CTRL / Hugging Face): for every token that occurs in the prompt or in
  the output so far, a positive logit is divided by the penalty and a negative one multiplied.
* ``frequency_penalty`` / ``presence_penalty`` (OpenAI): ``logit -= frequency_penalty * count
  + presence_penalty * (count > 0)``, where ``count`` is how often the token occurs in the
  *generated* tokens only -- the prompt does not count (as in vLLM and OpenAI's description).

Reproducibility: a row with ``seed`` set draws from its own ``torch.Generator``, seeded from the
seed (and ``SequenceHistory.sample_index`` for the n>1 siblings of one request), kept in its
``SequenceHistory`` so successive steps continue one random stream. Each sampled row draws exactly
one uniform number per step, and all the arithmetic is row-wise, so a seeded sequence produces the
same tokens whatever else shares its batch. Rows without a seed draw from the sampler's own
generator, seeded randomly (or from ``Sampler(seed=...)``), in one vectorised call.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from edgellm.errors import InvalidParameterError
from edgellm.grammar import Grammar, TokenConstraint

FINISH_STOP = "stop"        # EOS, a stop token or a stop string
FINISH_LENGTH = "length"    # max_tokens reached

MAX_TOP_LOGPROBS = 20
# Below this a temperature is treated as 0 (greedy): dividing by it would overflow the logits.
GREEDY_TEMPERATURE_EPS = 1e-5
# Relative slack in the top-p comparison, so that a nucleus reaching exactly top_p (0.5 + 0.3 for
# top_p=0.8) counts as reaching it despite float rounding in softmax and cumsum.
_TOP_P_RTOL = 1e-6

_SEED_MIN, _SEED_MAX = -(2 ** 63), 2 ** 64 - 1   # what torch.Generator.manual_seed accepts

# Bounds of the other parameters. Each keeps every intermediate of the sampler finite in float32:
# a repetition penalty of 1e-50 would be 0.0 there, and logit / 0 = inf makes the row NaN.
# (vLLM accepts any repetition_penalty > 0; llama.cpp any float. 0.01..100 covers every useful
# setting -- 1.0 is off, 1.1-1.3 is typical -- and scales a logit by at most 100.)
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_TEMPERATURE = 100.0          # OpenAI allows 2; beyond ~10 the distribution is already uniform
MAX_PENALTY = 2.0                # presence/frequency: OpenAI's [-2, 2]
MAX_INT = 2 ** 31 - 1            # top_k, max_tokens, token ids: an int32, as llama.cpp's are
MAX_N = 1024                     # completions per request (the server allows fewer)
MAX_STOP_STRINGS = 16            # the server allows 4, as OpenAI does
MAX_STOP_LENGTH = 256            # characters of all stop strings together (see StopChecker)
MAX_LOGIT_BIAS = 100.0           # logit_bias values: OpenAI's [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 300     # tokens one request may bias


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to choose tokens for one request; validated on construction (``InvalidParameterError``).

    ``temperature=0`` means greedy. ``top_k=0`` and ``top_p=1`` and ``min_p=0`` switch those
    filters off. ``presence_penalty``/``frequency_penalty`` act on generated tokens only;
    ``repetition_penalty`` on prompt and generated tokens (see the module docstring).
    ``stop`` may be given as one string. ``top_logprobs > 0`` implies ``logprobs``.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    # What the output must match (a JSON schema, regex, ...): the sampler masks every token the
    # grammar forbids (see edgellm/grammar.py). A constrained sequence must be decoded one token at
    # a time from its own sampled tokens, so speculative decoding leaves it out (``constrained``).
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def greedy(cls, **overrides) -> "SamplingParams":
        """Deterministic argmax decoding (``temperature=0``); other fields may be overridden."""
        overrides.setdefault("temperature", 0.0)
        return cls(**overrides)

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field, normalising ``stop``/``stop_token_ids`` to lists; raise on the first bad one."""

        def bad(name: str, requirement: str, fix: str) -> InvalidParameterError:
            return InvalidParameterError(
                f"sampling parameter '{name}' {requirement}, got {getattr(self, name)!r}", fix)

        def real(name: str) -> float:
            value = getattr(self, name)
            if not _is_real(value):
                raise bad(name, "must be a number", f"pass a number for {name}")
            value = float(value)
            if not math.isfinite(value):
                raise bad(name, "must be a finite number (not NaN or infinity)", f"pass a finite number for {name}")
            return value

        def integer(name: str) -> int:
            value = getattr(self, name)
            if not _is_int(value):
                raise bad(name, "must be an integer", f"pass a whole number for {name}")
            return int(value)

        if not 1 <= integer("max_tokens") <= MAX_INT:
            raise bad("max_tokens", f"must be between 1 and {MAX_INT}", "ask for one or more tokens")
        if not 0 <= real("temperature") <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be in [0, {MAX_TEMPERATURE:g}]",
                      "use 0 for greedy decoding or a positive value such as 0.7")
        if not 0 <= integer("top_k") <= MAX_INT:
            raise bad("top_k", f"must be between 0 and {MAX_INT}",
                      "use 0 to switch top-k off, or a positive number of tokens")
        top_p = real("top_p")
        if not 0.0 < top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]", "use 1.0 to switch top-p off, or a value such as 0.9")
        min_p = real("min_p")
        if not 0.0 <= min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]", "use 0 to switch min-p off, or a value such as 0.05")
        if not MIN_REPETITION_PENALTY <= real("repetition_penalty") <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]",
                      "use 1.0 for no penalty, or a value such as 1.1 to discourage repetition")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= real(name) <= MAX_PENALTY:
                raise bad(name, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]",
                          f"use 0 for no penalty, or a value between -{MAX_PENALTY:g} and {MAX_PENALTY:g}")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise bad("seed", "must be an integer or null", "pass a whole number as seed, or omit it")
            if not _SEED_MIN <= int(self.seed) <= _SEED_MAX:
                raise bad("seed", f"must be in [{_SEED_MIN}, {_SEED_MAX}]", "pass a smaller seed")
        # stop strings: None -> [], "x" -> ["x"]
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a string or a list of non-empty strings",
                      'pass stop strings such as ["\\n\\n", "User:"]')
        self.stop = list(self.stop)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"may hold at most {MAX_STOP_STRINGS} strings", "pass fewer stop strings")
        if sum(len(s) for s in self.stop) > MAX_STOP_LENGTH:
            raise bad("stop", f"must total at most {MAX_STOP_LENGTH} characters",
                      "use shorter stop strings (a stop string only needs its first distinctive characters)")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif _is_int(self.stop_token_ids):
            self.stop_token_ids = [self.stop_token_ids]
        if (not isinstance(self.stop_token_ids, (list, tuple))
                or not all(_is_int(t) and 0 <= t <= MAX_INT for t in self.stop_token_ids)):
            raise bad("stop_token_ids", "must be a list of non-negative integers", "pass token ids such as [2, 32000]")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false", f"pass a boolean for {name}")
        if not 0 <= integer("top_logprobs") <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}",
                      f"ask for at most {MAX_TOP_LOGPROBS} alternatives per token")
        if not 1 <= integer("n") <= MAX_N:
            raise bad("n", f"must be between 1 and {MAX_N}", "ask for fewer completions")
        if self.logit_bias is None:
            self.logit_bias = {}
        if not isinstance(self.logit_bias, dict):
            raise bad("logit_bias", "must be a map of token id to bias", "pass e.g. {50256: -100}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidParameterError(
                f"sampling parameter 'logit_bias' may bias at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got "
                f"{len(self.logit_bias)}", "bias fewer tokens")
        for tid, value in self.logit_bias.items():
            if not _is_int(tid) or not 0 <= tid <= MAX_INT:
                raise InvalidParameterError(f"sampling parameter 'logit_bias' has key {tid!r}, not a token id",
                                            "use non-negative integer token ids as keys")
            if not _is_real(value) or not -MAX_LOGIT_BIAS <= float(value) <= MAX_LOGIT_BIAS:
                raise InvalidParameterError(
                    f"sampling parameter 'logit_bias' gives token {tid} the bias {value!r}; biases must be numbers "
                    f"in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", "use e.g. -100 to ban a token, 5 to favour it")
        self.logit_bias = {int(t): float(v) for t, v in self.logit_bias.items()}
        if self.grammar is not None:
            if not isinstance(self.grammar, Grammar):
                raise bad("grammar", "must be an edgellm.grammar.Grammar or None",
                          "build one with Grammar.json_schema(schema), Grammar.regex(pattern), ...")
            self.grammar.validate()
            if self.ignore_eos:
                raise InvalidParameterError(
                    "sampling parameters 'grammar' and 'ignore_eos' cannot be combined: a finished grammar "
                    "allows only the end-of-sequence token", "drop ignore_eos")

    # ---- derived ---------------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def constrained(self) -> bool:
        """The output must match a grammar (decode it one sampled token at a time)."""
        return self.grammar is not None

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


# ---------------------------------------------------------------------------------------------
# Per-sequence state
# ---------------------------------------------------------------------------------------------
def _mix_seed(seed: int, sample_index: int) -> int:
    """The generator seed of sample ``sample_index`` of a request seeded ``seed`` (splitmix64)."""
    x = seed % 2 ** 64
    if sample_index == 0:
        return x
    mask = 2 ** 64 - 1
    x = (x + 0x9E3779B97F4A7C15 * (sample_index + 1)) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def _seeded_generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


class _TokenCounts:
    """Distinct token ids with a count each, as growable tensors: O(1) per added token, O(distinct) memory."""

    def __init__(self, token_ids: Sequence[int] = ()):
        self._slot: dict[int, int] = {}
        for t in token_ids:
            self._slot.setdefault(t, len(self._slot))
        n = len(self._slot)
        self._ids = torch.empty(max(16, 2 * n), dtype=torch.long)
        self._counts = torch.zeros(max(16, 2 * n), dtype=torch.float32)
        if n:
            self._ids[:n] = torch.tensor(list(self._slot), dtype=torch.long)
            self._counts[:n] = torch.bincount(torch.tensor([self._slot[t] for t in token_ids]), minlength=n).float()
        self.n = n

    def add(self, token_id: int) -> None:
        slot = self._slot.get(token_id)
        if slot is not None:
            self._counts[slot] += 1.0
            return
        if self.n == self._ids.numel():
            self._ids = torch.cat([self._ids, torch.empty_like(self._ids)])
            self._counts = torch.cat([self._counts, torch.zeros_like(self._counts)])
        self._slot[token_id] = self.n
        self._ids[self.n] = token_id
        self._counts[self.n] = 1.0
        self.n += 1

    @property
    def ids(self) -> torch.Tensor:
        return self._ids[:self.n]

    @property
    def counts(self) -> torch.Tensor:
        return self._counts[:self.n]


class SequenceHistory:
    """What the sampler needs to remember about one sequence between steps.

    Holds the prompt's token ids and the generated ids, and -- built on the first step that
    needs a penalty, then kept up to date by :meth:`append` in O(1) -- the distinct tokens of
    prompt + output (for the repetition penalty) and the distinct generated tokens with their
    counts (for the presence/frequency penalties). Memory is O(distinct tokens), not O(vocab), and
    sequences without penalties never build either. It also carries the sequence's seeded
    generator, created on its first sampled step.

    ``sample_index`` tells apart the ``n`` completions of one request that share a seed: sample
    0 uses the seed itself, sample i>0 a seed derived from (seed, i), so they differ but each is
    reproducible. Token ids >= ``vocab_size`` (an embedding larger than the output layer) are
    ignored by the penalties, as Hugging Face does.
    """

    def __init__(self, prompt_token_ids: Sequence[int], vocab_size: int, *, sample_index: int = 0,
                 constraint: TokenConstraint | None = None):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.prompt_token_ids: list[int] = [int(t) for t in prompt_token_ids]
        if any(t < 0 for t in self.prompt_token_ids):
            raise ValueError("prompt token ids must be non-negative")
        self.output_token_ids: list[int] = []
        self.sample_index = int(sample_index)
        self.generator: torch.Generator | None = None
        self._seen: _TokenCounts | None = None      # prompt + output
        self._output: _TokenCounts | None = None    # output only
        # The sequence's grammar state (edgellm.grammar), if its params have a grammar: the sampler
        # masks its row with it, and append() advances it.
        self.constraint = constraint

    def __len__(self) -> int:
        return len(self.output_token_ids)

    def append(self, token_id: int) -> None:
        """Record one generated token (call once per step, after sampling)."""
        token_id = int(token_id)
        if token_id < 0:
            raise ValueError(f"token id must be non-negative, got {token_id}")
        if self.constraint is not None:
            self.constraint.accept(token_id)      # raises (before anything is recorded) if forbidden
        self.output_token_ids.append(token_id)
        if token_id < self.vocab_size:
            if self._seen is not None:
                self._seen.add(token_id)
            if self._output is not None:
                self._output.add(token_id)

    def extend(self, token_ids: Sequence[int]) -> None:
        for t in token_ids:
            self.append(t)

    def _in_vocab(self, ids: list[int]) -> list[int]:
        return [t for t in ids if t < self.vocab_size]

    def seen_ids(self) -> torch.Tensor:
        """Distinct token ids of prompt and output so far (LongTensor, in first-seen order)."""
        if self._seen is None:
            self._seen = _TokenCounts(self._in_vocab(self.prompt_token_ids + self.output_token_ids))
        return self._seen.ids

    def output_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct generated token ids, how often each was generated as float32)."""
        if self._output is None:
            self._output = _TokenCounts(self._in_vocab(self.output_token_ids))
        return self._output.ids, self._output.counts

    def generator_for(self, params: SamplingParams) -> torch.Generator:
        """The sequence's seeded generator, created from ``params.seed`` on first use."""
        if self.generator is None:
            assert params.seed is not None
            self.generator = _seeded_generator(_mix_seed(int(params.seed), self.sample_index))
        return self.generator


# ---------------------------------------------------------------------------------------------
# Penalties and filters (row-wise; public so that tests compare them with references)
# ---------------------------------------------------------------------------------------------
def _row_tensor(values: list[float], device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _ragged(rows: list[int], parts: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The row index of every entry of ``parts`` concatenated (for one gather/scatter), and each part's length."""
    lengths = torch.tensor([p.numel() for p in parts], dtype=torch.long)
    row_idx = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)
    return row_idx.to(device), lengths


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The logits [B, V] with each row's ``logit_bias`` added. Returns ``logits`` itself when no
    row has a bias, otherwise a biased copy. Raises ValueError for a token id outside the row."""
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    vocab = logits.shape[1]
    logits = logits.clone()
    for i in rows:
        ids = list(params[i].logit_bias)
        if max(ids) >= vocab:
            raise ValueError(f"logit_bias of row {i} names token {max(ids)}, outside the vocabulary of {vocab}")
        idx = torch.tensor(ids, dtype=torch.long, device=logits.device)
        bias = torch.tensor(list(params[i].logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits[i, idx] += bias
    return logits


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    histories: Sequence[SequenceHistory | None] | None = None) -> torch.Tensor:
    """The logits [B, V] after each row's repetition, then frequency, then presence penalty.

    Repetition (CTRL/HF): for tokens in prompt or output, ``l / p`` if ``l > 0`` else ``l * p``.
    Frequency/presence (OpenAI): ``l - f * count - pr * (count > 0)`` over generated tokens only.
    Work is proportional to the distinct tokens involved, not the vocabulary. Returns ``logits``
    itself when no row has a penalty (or a history), otherwise a penalised copy.
    """
    batch, vocab = logits.shape
    rows = [i for i, p in enumerate(params) if p.has_penalties and histories is not None
            and histories[i] is not None]
    if not rows:
        return logits
    for i in rows:
        if histories[i].vocab_size != vocab:
            raise ValueError(f"history of row {i} has vocab_size {histories[i].vocab_size}, logits have {vocab}")
    logits = logits.clone()
    dev = logits.device

    rep = [i for i in rows if params[i].repetition_penalty != 1.0]
    if rep:
        ids = [histories[i].seen_ids() for i in rep]
        row_idx, lengths = _ragged(rep, ids, dev)
        col_idx = torch.cat(ids).to(dev)
        penalty = torch.repeat_interleave(
            torch.tensor([params[i].repetition_penalty for i in rep], dtype=torch.float32), lengths).to(dev)
        vals = logits[row_idx, col_idx]
        logits[row_idx, col_idx] = torch.where(vals > 0, vals / penalty, vals * penalty)

    fp = [i for i in rows if params[i].frequency_penalty != 0.0 or params[i].presence_penalty != 0.0]
    if fp:
        pairs = [histories[i].output_counts() for i in fp]
        row_idx, lengths = _ragged(fp, [p[0] for p in pairs], dev)
        col_idx = torch.cat([p[0] for p in pairs]).to(dev)
        counts = torch.cat([p[1] for p in pairs]).to(dev)

        def per_entry(values: list[float]) -> torch.Tensor:
            return torch.repeat_interleave(torch.tensor(values, dtype=torch.float32), lengths).to(dev)

        freq = per_entry([params[i].frequency_penalty for i in fp])
        pres = per_entry([params[i].presence_penalty for i in fp])
        # every listed token has count >= 1, so the presence term applies to all of them
        logits[row_idx, col_idx] -= freq * counts + pres
    return logits


# Top-p without a top-k first looks for the nucleus among this many most probable tokens, then
# among 8x as many, then the whole (sorted) vocabulary -- a full sort of 150k logits costs ~10 ms.
_TOP_P_CANDIDATES = 256


def filter_candidates(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float],
                      min_p: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k -> top-p -> min-p on temperature-scaled ``logits`` [R, V], for rows using top-k or top-p.

    Returns ``(weights, token_ids)``, both [R, K]: the K most probable tokens of each row in
    descending order and their softmax probabilities, filtered-out tokens set to 0 (columns past a
    row's own K are padding with weight 0). Not renormalised: sample in proportion to the weights.

    * top-k (``k`` > 0): keeps exactly the k most probable tokens (ties broken by ``topk``).
    * top-p: keeps a token iff the mass ranked strictly above it is < top_p of the (top-k
      renormalised) distribution -- the smallest set reaching top_p, the convention of Hugging
      Face's ``TopPLogitsWarper``: with probabilities [0.5, 0.3, 0.15, 0.05] and top_p=0.8 the
      nucleus is the first two. A relative slack of 1e-6 makes "reaches exactly" robust to
      rounding. The most probable token is always kept.
    * min-p: drops tokens whose probability is below min_p times the largest.

    Without a top-k, the nucleus is looked for among the 256 most probable tokens, then 8x as many,
    up to the whole vocabulary, so that the common case needs a ``topk``, not a full sort.
    """
    rows, vocab = logits.shape
    dev = logits.device
    probs = torch.softmax(logits, dim=-1)
    k_of = [k if 0 < k < vocab else 0 for k in top_k]
    need = [min(vocab, k if k else _TOP_P_CANDIDATES) for k in k_of]
    out_w: list[torch.Tensor | None] = [None] * rows
    out_ids: list[torch.Tensor | None] = [None] * rows
    pending = list(range(rows))
    while pending:
        sub = probs if len(pending) == rows else probs.index_select(0, _index(pending, dev))
        kmax = max(need[i] for i in pending)
        w, ids = torch.topk(sub, kmax, dim=-1)                        # sorted descending
        has_k = torch.tensor([k_of[i] > 0 for i in pending], device=dev).unsqueeze(1)
        k_lim = torch.tensor([k_of[i] or kmax for i in pending], device=dev).unsqueeze(1)
        w = w.masked_fill(torch.arange(kmax, device=dev).unsqueeze(0) >= k_lim, 0.0)   # top-k
        kept_mass = w.sum(dim=-1, keepdim=True)
        total = torch.where(has_k, kept_mass, sub.sum(dim=-1, keepdim=True))
        p = torch.tensor([top_p[i] for i in pending], dtype=torch.float32, device=dev).unsqueeze(1)
        bound = p * total * (1.0 - _TOP_P_RTOL)
        above = torch.cumsum(w, dim=-1) - w                           # mass ranked strictly above
        remove = above >= bound
        remove[:, 0] = False
        w = w.masked_fill(remove, 0.0)                                # top-p
        m = torch.tensor([min_p[i] for i in pending], dtype=torch.float32, device=dev).unsqueeze(1)
        w = w.masked_fill(w < m * w[:, :1], 0.0)                      # min-p
        # A row without top-k whose candidates do not reach top_p must look further.
        enough = (has_k | (kept_mass >= bound)).squeeze(1).tolist()
        retry = []
        for j, i in enumerate(pending):
            if enough[j] or kmax >= vocab:
                out_w[i], out_ids[i] = w[j], ids[j]
            else:
                need[i] = min(vocab, need[i] * 8)
                retry.append(i)
        pending = retry
    width = max(t.numel() for t in out_w)
    if all(t.numel() == width for t in out_w):
        return torch.stack(out_w), torch.stack(out_ids)
    weights = torch.zeros(rows, width, device=dev)
    token_ids = torch.zeros(rows, width, dtype=torch.long, device=dev)
    for i in range(rows):
        weights[i, :out_w[i].numel()] = out_w[i]
        token_ids[i, :out_ids[i].numel()] = out_ids[i]
    return weights, token_ids


def filter_full(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Softmax of temperature-scaled ``logits`` [R, V] with min-p applied (those < min_p * max set to 0)."""
    probs = torch.softmax(logits, dim=-1)
    if any(m > 0 for m in min_p):
        threshold = _row_tensor(list(min_p), logits.device) * probs.amax(dim=-1, keepdim=True)
        probs = torch.where(probs < threshold, 0.0, probs)
    return probs


def kept_tokens(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """bool [B, V]: the tokens each row may be sampled from, given its (already penalised) logits.

    Runs the sampler's own temperature and filters; a greedy row keeps only its argmax. For tests
    and for explaining the sampler's behaviour.
    """
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    for i, p in enumerate(params):
        if p.is_greedy:
            mask[i, logits[i].argmax()] = True
    if rows:
        ps = [params[i] for i in rows]
        scaled = logits[_index(rows, logits.device)].float() / _row_tensor([p.temperature for p in ps],
                                                                           logits.device)
        for js, w, ids in Sampler._filter(scaled, ps):
            for j, wj, idj in zip(js, w, ids if ids is not None else [None] * len(js)):
                if idj is None:
                    mask[rows[j]] = wj > 0
                else:
                    mask[rows[j], idj[wj > 0]] = True
    return mask


def sample_from_weights(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: a column per row of non-negative ``weights`` [R, K], for ``uniforms`` [R] in [0, 1).

    A column of weight 0 is never chosen. (torch's CPU cumsum accumulates float32 in double.)
    Raises ValueError for a row whose weights are all 0 or not finite (NaN or all -inf logits).
    """
    cdf = torch.cumsum(weights, dim=-1)
    total = cdf[:, -1]
    bad = ~(torch.isfinite(total) & (total > 0))
    if bool(bad.any()):
        raise ValueError(f"row {int(bad.nonzero()[0])} has NaN or all -inf logits: nothing to sample from")
    x = (uniforms.to(torch.float64) * total.to(torch.float64)).to(cdf.dtype)
    x = torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))   # strictly below the total
    return torch.searchsorted(cdf, x.unsqueeze(1), right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------
@dataclass
class SampleOutput:
    """One step's choice per row; ``logprobs[i]``/``top_logprobs[i]`` are None unless row i asked.

    ``top_logprobs[i]`` is a list of ``(token_id, logprob)`` sorted by descending logprob, of length
    ``params[i].top_logprobs`` (empty when only ``logprobs`` was asked). Log-probabilities are those
    of the raw model logits (log-softmax before penalties and temperature).
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    # Rows that could not be sampled (``sample(..., errors="row")`` only): row -> why. Their
    # token id is -1; nothing was drawn from their random streams.
    failed: dict[int, str] = field(default_factory=dict)


def unsamplable_rows(logits: torch.Tensor) -> list[int]:
    """Rows of (penalised) ``logits`` [B, V] with nothing to sample from: a NaN or +inf anywhere
    (softmax is then NaN) or every entry -inf."""
    # The usual case, in one read-only pass: the sum is finite only if every entry is (NaN and
    # infinities propagate); a sum that merely overflows sends the batch to the exact check below.
    # On the CPU numpy's single-threaded sum (~20 us for 49k logits) does not wake torch's thread
    # pool, which right after a decode step's native parallel region cost ~200 us.
    total = logits.numpy().sum() if logits.device.type == "cpu" else logits.sum()
    if math.isfinite(float(total)):
        return []
    bad = torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1) | torch.isneginf(logits).all(dim=-1)
    return bad.nonzero().flatten().tolist() if bool(bad.any()) else []


def apply_constraints(logits: torch.Tensor, raw_logits: torch.Tensor,
                      histories: Sequence[SequenceHistory | None]) -> tuple[torch.Tensor, dict[int, str]]:
    """The logits with each constrained row's forbidden tokens at -inf (a copy when ``logits`` is
    still the caller's ``raw_logits``), and the rows whose grammar allows no token -> why."""
    rows = [i for i, h in enumerate(histories) if h is not None and h.constraint is not None]
    failed: dict[int, str] = {}
    if not rows:
        return logits, failed
    if logits is raw_logits:
        # numpy's copy on the CPU: torch's clone() right after the decode step's native parallel
        # region measured 15 ms (waking its thread pool), 1000x the copy itself
        logits = torch.from_numpy(logits.numpy().copy()) if logits.device.type == "cpu" else logits.clone()
    for i in rows:
        c = histories[i].constraint
        if not c.mask_(logits[i]):
            failed[i] = f"its grammar allows no next token ({c.error or 'the matcher is in no state to go on'})"
    return logits, failed


def plain_greedy_picks(logits: torch.Tensor, params: Sequence[SamplingParams],
                       histories: Sequence[SequenceHistory | None]) -> list[int] | None:
    """The argmax of every row when the whole batch is plain greedy (no logprobs, bias, penalties
    or grammar) and every row can be sampled; None otherwise (the general path then decides,
    failures included). One pass over the logits instead of two (the finiteness check, then the
    argmax): a row's maximum is finite exactly when the row holds no NaN, no +inf and not only
    -inf (numpy's argmax stops at the first NaN), which is unsamplable_rows' test."""
    if logits.device.type != "cpu" or not all(
            p.is_greedy and not p.wants_logprobs and not p.logit_bias and not p.has_penalties for p in params):
        return None
    if any(h is not None and h.constraint is not None for h in histories):
        return None
    values = logits.numpy()
    picks = values.argmax(axis=1)
    if not np.isfinite(values[np.arange(len(picks)), picks]).all():
        return None
    return picks.tolist()


def greedy_pick(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (its first maximum, as ``torch.argmax``). On the CPU through numpy: its
    single-threaded argmax takes 7 us for a row of 49k logits, where torch's threaded reduction
    took 70-150 us (and 490 us for 8 rows) on this project's 2-core machine, ~1% of a decode step."""
    if logits.device.type == "cpu":
        return logits.numpy().argmax(axis=1).tolist()
    return logits.argmax(dim=-1).tolist()


class Sampler:
    """Chooses one token per row of a batch of logits, each row with its own ``SamplingParams``.

    ``seed`` seeds the generator shared by rows that have no seed of their own (random if None).
    """

    def __init__(self, seed: int | None = None):
        self._generator = _seeded_generator(secrets.randbits(63) if seed is None else seed)

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               histories: Sequence[SequenceHistory | None] | None = None, errors: str = "raise",
               drafts: Sequence[int | None] | None = None) -> SampleOutput:
        """Sample ``logits`` [B, V] (float32; not modified) under ``params[b]`` for each row.

        A row whose penalised logits hold a NaN or +inf, or are all -inf, cannot be sampled: with
        ``errors="raise"`` that raises ValueError; with ``errors="row"`` the row is left out (token
        -1, listed in ``SampleOutput.failed``) and the other rows are sampled exactly as they would
        be without it -- no random number is drawn for the bad row.

        ``histories[b]`` is the row's :class:`SequenceHistory` (needed for penalties and for a seed
        to continue one random stream across steps); the caller appends the chosen token to it
        afterwards. A row without a history has no prompt or output for its penalties to act on,
        and if seeded, reseeds its generator on every call (so a one-off call is still
        reproducible, but successive calls repeat the same random draw).

        ``drafts[b]`` (speculative decoding): a token proposed for row b, or None. A greedy row
        ignores it (the caller accepts the draft when the argmax equals it). A sampled row accepts
        it with the probability p(draft) that the row's own distribution gives it, and otherwise
        draws from that distribution with the draft taken out -- the speculative sampling rule
        (Leviathan et al. 2023; Chen et al. 2023) for a proposer that picks its token with
        certainty, under which every row's token still follows p exactly:
        P(x) = p(d) [x = d] + (1 - p(d)) p(x) [x != d] / (1 - p(d)) = p(x).
        The caller knows the draft was accepted when the token returned equals it.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if len(params) != batch:
            raise ValueError(f"{len(params)} SamplingParams for {batch} rows of logits")
        if histories is None:
            histories = [None] * batch
        elif len(histories) != batch:
            raise ValueError(f"{len(histories)} histories for {batch} rows of logits")
        logits = logits.float()
        plain = plain_greedy_picks(logits, params, histories)
        if plain is not None:
            return SampleOutput(plain, [None] * batch, [None] * batch)

        greedy = [p.is_greedy for p in params]
        wants_lp = [i for i, p in enumerate(params) if p.wants_logprobs]
        raw_logits = logits
        logits = apply_penalties(apply_logit_bias(logits, params), params, histories)
        bad_rows = unsamplable_rows(logits)
        why = "its logits hold a NaN or +inf after penalties, or are NaN or all -inf: nothing to sample from"
        reasons = dict.fromkeys(bad_rows, why)
        if not bad_rows:
            # Grammar masks go on after the finiteness check: a masked row is mostly -inf, which
            # would send every step through that check's slow exact path.
            logits, reasons = apply_constraints(logits, raw_logits, histories)
            bad_rows = sorted(reasons)
        if bad_rows:
            if errors != "row":
                raise ValueError(f"row {bad_rows[0]}: {reasons[bad_rows[0]]}")
            good = [i for i in range(batch) if i not in set(bad_rows)]
            out = SampleOutput([-1] * batch, [None] * batch, [None] * batch, {i: reasons[i] for i in bad_rows})
            if good:
                sub = self.sample(raw_logits.index_select(0, _index(good, raw_logits.device)),
                                  [params[i] for i in good], [histories[i] for i in good], errors="row",
                                  drafts=None if drafts is None else [drafts[i] for i in good])
                for j, i in enumerate(good):
                    out.token_ids[i], out.logprobs[i], out.top_logprobs[i] = \
                        sub.token_ids[j], sub.logprobs[j], sub.top_logprobs[j]
            return out

        # Common case: plain greedy batch -> one argmax, no copy, no softmax, no sort.
        if all(greedy) and not wants_lp:
            return SampleOutput(greedy_pick(logits), [None] * batch, [None] * batch)

        dev = logits.device
        chosen = torch.empty(batch, dtype=torch.long, device=dev)
        greedy_rows = [i for i in range(batch) if greedy[i]]
        if greedy_rows:
            idx = _index(greedy_rows, dev)
            chosen[idx] = logits[idx].argmax(dim=-1)
        sampled_rows = [i for i in range(batch) if not greedy[i]]
        if sampled_rows:
            chosen[_index(sampled_rows, dev)] = self._sample_rows(logits, params, histories, sampled_rows, drafts)

        token_ids = chosen.tolist()
        logprobs: list[float | None] = [None] * batch
        top_logprobs: list[list[tuple[int, float]] | None] = [None] * batch
        if wants_lp:
            idx = _index(wants_lp, dev)
            lp = torch.log_softmax(raw_logits[idx], dim=-1)
            chosen_lp = lp.gather(1, chosen[idx].view(-1, 1)).squeeze(1).tolist()
            n_top = [min(params[i].top_logprobs, vocab) for i in wants_lp]
            kmax = max(n_top)
            if kmax:
                top_vals, top_ids = torch.topk(lp, kmax, dim=-1)   # sorted descending
                top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            for j, row in enumerate(wants_lp):
                logprobs[row] = chosen_lp[j]
                k = n_top[j]
                top_logprobs[row] = list(zip(top_ids[j][:k], top_vals[j][:k])) if k else []
        return SampleOutput(token_ids, logprobs, top_logprobs)

    @staticmethod
    def _filter(scaled: torch.Tensor, ps: list[SamplingParams]
                ) -> list[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
        """Top-k, top-p, min-p: groups of (row positions, weights [n, K], token ids [n, K] or None
        when the K columns are the vocabulary itself)."""
        vocab = scaled.shape[1]
        dev = scaled.device
        groups = []
        cand = [j for j, p in enumerate(ps) if 0 < p.top_k < vocab or p.top_p < 1.0]
        full = [j for j, p in enumerate(ps) if not (0 < p.top_k < vocab or p.top_p < 1.0)]
        for js, whole in ((cand, False), (full, True)):
            if not js:
                continue
            sub = scaled if len(js) == len(ps) else scaled.index_select(0, _index(js, dev))
            if whole:
                groups.append((js, filter_full(sub, [ps[j].min_p for j in js]), None))
            else:
                groups.append((js, *filter_candidates(sub, [ps[j].top_k for j in js], [ps[j].top_p for j in js],
                                                      [ps[j].min_p for j in js])))
        return groups

    def _sample_rows(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                     histories: Sequence[SequenceHistory | None], rows: list[int],
                     drafts: Sequence[int | None] | None = None) -> torch.Tensor:
        ps = [params[i] for i in rows]
        dev = logits.device
        sub = logits if len(rows) == logits.shape[0] else logits.index_select(0, _index(rows, dev))
        scaled = sub / _row_tensor([p.temperature for p in ps], dev)
        row_drafts = [None if drafts is None else drafts[row] for row in rows]

        # Per row one uniform for the draw, and one more to accept or reject a draft (always both
        # for a row with a draft, so a seeded stream does not depend on what was accepted):
        # seeded rows from their own generator, the rest in one shared draw.
        uniforms = torch.empty(len(rows), dtype=torch.float64)
        accept_u = torch.ones(len(rows), dtype=torch.float64)
        unseeded = []
        for j, (row, p) in enumerate(zip(rows, ps)):
            if p.seed is None:
                unseeded.append(j)
                continue
            h = histories[row]
            gen = h.generator_for(p) if h is not None else _seeded_generator(_mix_seed(int(p.seed), 0))
            if row_drafts[j] is None:
                uniforms[j] = torch.rand(1, dtype=torch.float64, generator=gen)[0]
            else:
                accept_u[j], uniforms[j] = torch.rand(2, dtype=torch.float64, generator=gen).tolist()
        if unseeded:
            uniforms[torch.tensor(unseeded, dtype=torch.long)] = torch.rand(
                len(unseeded), dtype=torch.float64, generator=self._generator)
            drafted = [j for j in unseeded if row_drafts[j] is not None]
            if drafted:
                accept_u[torch.tensor(drafted, dtype=torch.long)] = torch.rand(
                    len(drafted), dtype=torch.float64, generator=self._generator)
        uniforms = uniforms.to(dev)

        chosen = torch.empty(len(rows), dtype=torch.long, device=dev)
        for js, weights, token_ids in self._filter(scaled, ps):
            idx = _index(js, dev)
            accepted = {}
            if any(row_drafts[j] is not None for j in js):
                weights, accepted = _accept_drafts(weights, token_ids, [row_drafts[j] for j in js],
                                                   [float(accept_u[j]) for j in js])
            try:
                pick = sample_from_weights(weights, uniforms[idx])
            except ValueError:
                raise ValueError("logits contain a row that is NaN or all -inf: nothing to sample from") from None
            if token_ids is not None:
                pick = token_ids.gather(1, pick.view(-1, 1)).squeeze(1)
            for jj, token in accepted.items():
                pick[jj] = token
            chosen[idx] = pick
        return chosen


def _accept_drafts(weights: torch.Tensor, token_ids: torch.Tensor | None, drafts: list[int | None],
                   accept_u: list[float]) -> tuple[torch.Tensor, dict[int, int]]:
    """The speculative sampling rule on rows of (unnormalised) ``weights`` [n, K] whose columns are
    the vocabulary (``token_ids`` None) or the candidates ``token_ids`` [n, K]: row j accepts
    ``drafts[j]`` when ``accept_u[j] < p(draft)``; a rejected draft's weight is set to 0 so the
    draw that follows comes from the rest. Returns the weights to draw from and {row: draft} of
    the rows that accepted."""
    weights = weights.clone()
    accepted = {}
    for jj, (d, u) in enumerate(zip(drafts, accept_u)):
        if d is None:
            continue
        if token_ids is None:
            col = d if 0 <= d < weights.shape[1] else None
        else:
            hit = (token_ids[jj] == d).nonzero()
            col = int(hit[0, 0]) if hit.numel() else None
        if col is None:                 # filtered out: probability 0, never accepted
            continue
        total = float(weights[jj].sum())
        p = float(weights[jj, col]) / total if total > 0 else 0.0
        if u < p:
            accepted[jj] = d
        else:
            weights[jj, col] = 0.0
    return weights, accepted


# ---------------------------------------------------------------------------------------------
# Stop conditions over streamed text
# ---------------------------------------------------------------------------------------------
def _failure_table(s: str) -> list[int]:
    """Knuth-Morris-Pratt: ``table[i]`` is the length of the longest proper prefix of ``s[:i + 1]``
    that is also its suffix."""
    table = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        if s[i] == s[k]:
            k += 1
        table[i] = k
    return table


@dataclass
class StopUpdate:
    """What to stream after one step: ``text`` (possibly empty) and, when done, the reason."""

    text: str
    finish_reason: str | None = None      # None, "stop" or "length"
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if any

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopChecker:
    """Decides when a sequence ends and what of its text a streaming client may see.

    Text is released as it arrives except for a suffix that could be the start of a stop string,
    which is held back until it either completes a stop string (then it and everything after is
    dropped and the sequence stops) or can no longer do so (then it is released). A client thus
    never sees any part of a stop string. Finish reasons: ``"stop"`` on EOS (unless ignore_eos),
    a stop token or a stop string; ``"length"`` after ``max_tokens`` tokens. The text of an EOS or
    stop token is not emitted. After finishing, further input is ignored.
    """

    def __init__(self, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 eos_token_ids: Sequence[int] = (), ignore_eos: bool = False, max_tokens: int | None = None):
        self.stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        self.stop_token_ids = set(int(t) for t in stop_token_ids)
        if not ignore_eos:
            self.stop_token_ids |= set(int(t) for t in eos_token_ids)
        self.max_tokens = max_tokens
        # Per stop string, a KMP matcher: its failure table and its state, the length of the
        # longest prefix of the stop string that ends the text so far. Each character of new text
        # advances every state in amortised O(1), so a step costs O(len(new_text) * len(stop)),
        # whatever the stop strings' lengths; the text held back is max(state) < the longest stop.
        self._tables = [_failure_table(s) for s in self.stop]
        self._states = [0] * len(self.stop)
        self.n_tokens = 0
        self.pending = ""            # held back: could begin a stop string
        self.emitted = ""            # everything released so far
        self.finish_reason: str | None = None

    @classmethod
    def from_params(cls, params: SamplingParams, eos_token_ids: Sequence[int] = ()) -> "StopChecker":
        return cls(params.stop, params.stop_token_ids, eos_token_ids, params.ignore_eos, params.max_tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _release(self, text: str, reason: str | None = None, stop_reason=None) -> StopUpdate:
        self.emitted += text
        if reason is not None:
            self.finish_reason = reason
        return StopUpdate(text, reason, stop_reason)

    def feed_text(self, new_text: str) -> StopUpdate:
        """Add decoded text; return what may be streamed now, with ``"stop"`` if a stop string completed."""
        if self.finished:
            return StopUpdate("", None)
        buf = self.pending + new_text
        if self.stop:
            base = len(self.pending)        # every state is <= base: no match starts before pending
            hit, hit_at = None, len(buf) + 1
            for k, s in enumerate(self.stop):
                q, table, n = self._states[k], self._tables[k], len(s)
                for pos, ch in enumerate(new_text):
                    while q and s[q] != ch:
                        q = table[q - 1]
                    if s[q] == ch:
                        q += 1
                    if q == n:              # the first occurrence of s in buf ends at pos
                        at = base + pos + 1 - n
                        if at < hit_at:
                            hit, hit_at = s, at
                        break
                self._states[k] = q
            if hit is not None:
                self.pending = ""
                return self._release(buf[:hit_at], FINISH_STOP, hit)
            hold = max(self._states)
        else:
            hold = 0
        self.pending = buf[len(buf) - hold:] if hold else ""
        return self._release(buf[:len(buf) - hold])

    def step(self, token_id: int, new_text: str) -> StopUpdate:
        """Account for one generated token and its decoded text (``""`` while a character is incomplete)."""
        if self.finished:
            return StopUpdate("", None)
        self.n_tokens += 1
        if int(token_id) in self.stop_token_ids:
            self.finish_reason = FINISH_STOP
            return StopUpdate(self.flush(), FINISH_STOP, int(token_id))
        upd = self.feed_text(new_text)
        if not upd.finished and self.max_tokens is not None and self.n_tokens >= self.max_tokens:
            self.finish_reason = FINISH_LENGTH
            return StopUpdate(upd.text + self.flush(), FINISH_LENGTH)
        return upd

    def flush(self) -> str:
        """Release the held-back text (the sequence ended without completing a stop string)."""
        text, self.pending = self.pending, ""
        self._states = [0] * len(self.stop)
        self.emitted += text
        return text
