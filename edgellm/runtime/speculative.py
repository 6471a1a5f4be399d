"""Speculative decoding: propose a few tokens cheaply, check them all in one forward pass.

Decode reads every weight once per step whatever the number of rows, so a pass over the pending
token and ``k`` proposed ones (a *verify* pass, ``SeqChunk.verify``) costs little more than one
plain step while it can commit up to ``k + 1`` tokens. The target model decides every committed
token exactly as plain decoding would: greedy rows accept a proposal only where it equals their
argmax, sampled rows use the speculative sampling rule (``Sampler.sample(drafts=...)``), and the
KV of rejected positions is dropped (only accepted tokens are committed to the block manager, so
prefix-cache hashes name committed tokens only; the blocks reserved past them are trimmed).

Proposers (``--speculative``):

* ``ngram`` -- prompt lookup: the last n tokens (n = 4 down to 2, longest first) are looked up in
  the prompt and the output so far, and the tokens that followed their latest earlier occurrence
  are proposed. No model runs; it pays where the reply copies its input (editing code, quoting a
  document).
* ``early-exit:L`` -- self-speculation: the first L blocks of the target model, then its final
  norm and head, run once per proposed token; they write the same KV rows the verify pass then
  rewrites with the full model.
* ``layer-skip:N`` -- self-speculation by skipping N blocks of the target, the ones whose absence
  changes its next-token choices least on a short calibration text shipped with edgellm
  (``runtime/data/calibration.txt``; the choice is cached per model file).
* ``draft:MODEL`` -- a separate model with the same vocabulary (e.g. a smaller or lower-precision
  copy), with its own KV pool, which catches up on the committed tokens and proposes greedily.

How many tokens to propose adapts per sequence (:class:`AdaptiveDraft`): it estimates the
chance that a proposed token is accepted and the measured cost of a verify pass of ``k + 1``
rows against a one-row step, and proposes the ``k`` with the most tokens per unit of time -- zero
(plain decoding) when nothing pays, probing again after a while.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from edgellm.errors import InvalidParameterError
from edgellm.kv.block_manager import BlockManager, KVSequence, OutOfBlocks
from edgellm.kv.cache import BLOCK_SIZE, KVCache
from edgellm.runtime.model_runner import ModelRunner, SeqChunk
from edgellm.runtime.scheduler import common_prefix
from edgellm.sampling import greedy_pick

if TYPE_CHECKING:
    from edgellm.runtime.types import Sequence

NGRAM = "ngram"
EARLY_EXIT = "early-exit"
LAYER_SKIP = "layer-skip"
DRAFT = "draft"
METHODS = (NGRAM, EARLY_EXIT, LAYER_SKIP, DRAFT)

#: default most tokens proposed per step (k): a verify pass of k + 1 <= 8 rows keeps every matmul,
#: the vocabulary projection included, on the native kernels' multi-row path
DEFAULT_DRAFT_TOKENS = 7
MAX_DRAFT_TOKENS = 15
NGRAM_MAX = 4
#: a single matching token proposes too often and too badly (chat: 6% accepted); two or more
NGRAM_MIN = 2
#: every this many steps the adaptive controller proposes nothing (a plain step, re-measured)
REMEASURE_EVERY = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """``method``: "ngram", "early-exit", "layer-skip" or "draft"; ``draft_tokens``: the most
    tokens proposed per step; ``layers``: the early-exit depth, or the blocks layer-skip leaves
    out; ``draft_model``: the draft's model spec;
    ``adaptive``: let each sequence's proposal length follow its acceptance (else always the most)."""

    method: str
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    layers: int | None = None
    draft_model: str | None = None
    adaptive: bool = True
    # what prepare_speculative computed once: the loaded draft (draft), the skipped blocks (layer-skip)
    prepared: Any = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        if self.method in (EARLY_EXIT, LAYER_SKIP):
            return f"{self.method}:{self.layers}"
        if self.method == DRAFT:
            return f"{DRAFT}:{self.draft_model}"
        return self.method


def parse_speculative(spec: Any, draft_tokens: int | None = None, adaptive: bool = True) -> SpeculativeConfig | None:
    """``"ngram"``, ``"early-exit:L"``, ``"layer-skip:N"``, ``"draft:MODEL"`` (a path or registry
    name), a :class:`SpeculativeConfig`, or None/"" (off)."""
    if spec is None or spec == "" or spec is False:
        return None
    if isinstance(spec, SpeculativeConfig):
        return spec if draft_tokens is None else replace(spec, draft_tokens=_check_k(draft_tokens))
    how = ("use --speculative ngram, early-exit:L (the first L blocks draft, e.g. early-exit:8), layer-skip:N "
           "(N blocks skipped, e.g. layer-skip:6) or draft:MODEL (a path or registry name)")
    if not isinstance(spec, str):
        raise InvalidParameterError(f"speculative must be a string, got {type(spec).__name__}", how)
    method, _, arg = spec.strip().partition(":")
    k = DEFAULT_DRAFT_TOKENS if draft_tokens is None else _check_k(draft_tokens)
    if method == NGRAM and not arg:
        return SpeculativeConfig(NGRAM, k, adaptive=adaptive)
    if method == EARLY_EXIT:
        if not arg.isdigit() or int(arg) < 1:
            raise InvalidParameterError(f"early-exit needs a number of blocks, got {spec!r}",
                                        "e.g. --speculative early-exit:8 (the first 8 blocks draft)")
        return SpeculativeConfig(EARLY_EXIT, k, layers=int(arg), adaptive=adaptive)
    if method == LAYER_SKIP:
        if not arg.isdigit() or int(arg) < 1:
            raise InvalidParameterError(f"layer-skip needs a number of blocks to skip, got {spec!r}",
                                        "e.g. --speculative layer-skip:6 (the draft leaves 6 blocks out)")
        return SpeculativeConfig(LAYER_SKIP, k, layers=int(arg), adaptive=adaptive)
    if method == DRAFT:
        if not arg:
            raise InvalidParameterError("draft needs a model", "e.g. --speculative draft:/path/to/small.gguf")
        return SpeculativeConfig(DRAFT, k, draft_model=arg, adaptive=adaptive)
    raise InvalidParameterError(f"unknown speculative method {spec!r}", how)


def prepare_speculative(config: SpeculativeConfig, target: Any) -> SpeculativeConfig:
    """Do the slow part once, for every engine made later: load and check a draft model, or
    calibrate which blocks a layer-skip draft leaves out."""
    if config.prepared is not None:
        return config
    if config.method == DRAFT:
        return replace(config, prepared=load_draft(config.draft_model, target))
    if config.method == LAYER_SKIP:
        n_layers = target.config.n_layers
        if not 1 <= config.layers < n_layers:
            raise InvalidParameterError(f"{config.name} needs fewer blocks than the model's {n_layers}",
                                        f"use layer-skip:N with 1 <= N < {n_layers}")
        return replace(config, prepared=calibrate_skipped_layers(target, config.layers))
    return config


CALIBRATION_TOKENS = 160


def calibrate_skipped_layers(loaded: Any, n_skip: int) -> list[int]:
    """The ``n_skip`` blocks whose absence changes the model's greedy next-token choices least,
    over the first CALIBRATION_TOKENS tokens of the shipped calibration text: each block is left
    out alone once (one prefill each), and the blocks ranked by how often the choices still agree
    with the full model's (a one-shot ranking, not a search over sets; cached per model file)."""
    import hashlib
    import json
    from importlib import resources

    from edgellm.util import cache_dir

    text = resources.files("edgellm.runtime").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    src = loaded.source
    key = hashlib.sha256(f"{src.name}|{loaded.file_bytes}|{loaded.dtype}|{text}".encode()).hexdigest()[:16]
    path = cache_dir() / "calibration" / f"layer-skip-{key}.json"
    try:
        ranking = json.loads(path.read_text())["ranking"]
    except (OSError, ValueError, KeyError):
        ranking = _rank_layers(loaded, text)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"model": src.name, "ranking": ranking}))
            tmp.replace(path)
        except OSError:          # a read-only cache: calibrate again next time
            pass
    return sorted(int(i) for i in ranking[:n_skip])


def _rank_layers(loaded: Any, text: str) -> list[int]:
    """Blocks from the least to the most missed: agreement of the greedy choices with one block
    left out, against the full model, over the calibration text (teacher-forced)."""
    import torch

    ids = loaded.tokenizer.encode(text)[:CALIBRATION_TOKENS]
    cfg = loaded.config
    cache = KVCache(cfg, -(-len(ids) // 16), 16, "fp32")
    runner = ModelRunner(loaded.model, cache, fused_decode=False)
    slots = slice(0, len(ids))

    def choices(layers):
        # every position's logits: the rows of a verify chunk (prefill-shaped, one row each)
        logits = runner.run([SeqChunk(ids, 0, slots, True, verify=True)], layers=layers)
        return torch.tensor(greedy_pick(logits))

    full = choices(None)
    n = cfg.n_layers
    agreement = []
    for skip in range(n):
        kept = [i for i in range(n) if i != skip]
        agreement.append(float((choices(kept) == full).float().mean()))
    return sorted(range(n), key=lambda i: -agreement[i])


def load_draft(spec: str, target: Any) -> Any:
    """The draft model ``spec`` (a path or registry name), refused unless it shares the target's vocabulary."""
    from edgellm.loading.load import load_model

    loaded = load_model(spec)
    _check_same_vocabulary(loaded, target, spec)
    return loaded


def _check_k(k: Any) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise InvalidParameterError(f"draft tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {k!r}",
                                    f"use e.g. --draft-tokens {DEFAULT_DRAFT_TOKENS}")
    return k


# ---------------------------------------------------------------------------------------------
# How many tokens to propose
# ---------------------------------------------------------------------------------------------
class StepCosts:
    """Measured time of a decode-only forward pass by its number of rows (moving averages), to
    weigh a verify pass of k + 1 rows against one row. Rows never measured are estimated by a
    straight line through the nearest measured ones (or, before any, a guess that each extra row
    costs 15% of one)."""

    PRIOR_SLOPE = 0.15
    MIN_SLOPE = 0.05
    DECAY = 0.2

    def __init__(self):
        self.seconds: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else old + self.DECAY * (seconds - old)

    def relative(self, rows: int, base: int = 1) -> float:
        """Cost of ``rows`` rows over the cost of ``base`` rows, never below 1 + MIN_SLOPE per
        extra row: times taken at different moments of a shared machine can say that more rows
        were cheaper, which would keep a failing proposer on."""
        b, r = self.estimate(base), self.estimate(rows)
        ratio = r / b if b > 0 else 1.0 + self.PRIOR_SLOPE * (rows - base)
        return max(ratio, 1.0 + self.MIN_SLOPE * (rows - base))

    def estimate(self, rows: int) -> float:
        if rows in self.seconds:
            return self.seconds[rows]
        known = sorted(self.seconds)
        if not known:
            return 1.0 + self.PRIOR_SLOPE * (rows - 1)
        lo = [n for n in known if n < rows]
        hi = [n for n in known if n > rows]
        if lo and hi:
            a, b = lo[-1], hi[0]
            return self.seconds[a] + (self.seconds[b] - self.seconds[a]) * (rows - a) / (b - a)
        n = lo[-1] if lo else hi[0]       # beyond the measured rows: the prior slope from the nearest
        return self.seconds[n] * (1.0 + self.PRIOR_SLOPE * (rows - n))


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verify pass commits when each proposed token is accepted with probability
    ``alpha`` until the first rejection: 1 + alpha + ... + alpha^k (the pass always commits one)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class AdaptiveDraft:
    """One sequence's proposal length. ``alpha``: the estimated chance a proposed token is accepted
    (accepted / (accepted + rejections), both decayed so recent steps count most); ``off_steps``:
    plain steps taken since speculation was judged not to pay (it probes again with one token
    after ``probe_after`` of them, and waits twice as long each time the probe fails)."""

    alpha_hits: float = 1.0       # a prior of one success and one failure: alpha = 0.5
    alpha_misses: float = 1.0
    off_steps: int = 0
    probe_after: int = 8
    proposed: int = 0
    accepted: int = 0
    steps: int = 0
    DECAY = 0.9

    @property
    def alpha(self) -> float:
        return self.alpha_hits / (self.alpha_hits + self.alpha_misses)

    def choose(self, k_max: int, costs: StepCosts, base_rows: int, draft_cost: float) -> int:
        """The k in 0..k_max with the most expected tokens per unit of time; ``draft_cost``: the
        proposer's own time per proposed token, relative to a one-row step."""
        best_k, best = 0, 1.0
        alpha = self.alpha
        for k in range(1, k_max + 1):
            cost = costs.relative(base_rows + k, base_rows) + draft_cost * k
            rate = expected_tokens(alpha, k) / cost
            if rate > best * 1.02:        # a margin: near-equal choices keep plain decoding
                best_k, best = k, rate
        if best_k == 0:
            self.off_steps += 1
            if self.off_steps >= self.probe_after:   # probe: one token, to learn alpha again
                self.off_steps = 0
                self.probe_after = min(self.probe_after * 2, 256)
                return 1
        return best_k

    def record(self, proposed: int, accepted: int) -> None:
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        self.alpha_hits = self.DECAY ** proposed * self.alpha_hits + accepted
        self.alpha_misses = self.DECAY ** proposed * self.alpha_misses + (1 if accepted < proposed else 0)
        if accepted == proposed and proposed > 0:
            self.probe_after = 8


# ---------------------------------------------------------------------------------------------
# Proposers
# ---------------------------------------------------------------------------------------------
class NgramIndex:
    """Where each n-gram (n = 1..NGRAM_MAX) of a token list last ended, kept up to date as tokens
    are appended: a lookup costs a dict access instead of a scan of the whole prompt."""

    def __init__(self, n_max: int = NGRAM_MAX):
        self.n_max = n_max
        self.last_end: dict[tuple[int, ...], int] = {}
        self.indexed = 0          # n-grams ending before this position are in the table

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix of
        ``tokens`` (of at most n_max tokens) seen before."""
        end = len(tokens) - 1
        self._index(tokens, end)        # every n-gram that ends before the last token
        for n in range(min(self.n_max, len(tokens)), NGRAM_MIN - 1, -1):
            j = self.last_end.get(tuple(tokens[end - n + 1:end + 1]))
            if j is not None:
                return tokens[j + 1:j + 1 + k]
        return []

    def _index(self, tokens: list[int], upto: int) -> None:
        for e in range(self.indexed, upto):
            for n in range(1, min(self.n_max, e + 1) + 1):
                self.last_end[tuple(tokens[e - n + 1:e + 1])] = e
        self.indexed = max(self.indexed, upto)


@dataclass
class SpecState:
    """A sequence's speculative state: its proposal length controller, n-gram index, the tokens
    proposed for the step in progress, and (draft model) the draft's KV."""

    method: str
    adaptive: AdaptiveDraft = field(default_factory=AdaptiveDraft)
    ngrams: NgramIndex | None = None
    draft: list[int] = field(default_factory=list)
    draft_kv: KVSequence | None = None

    def summary(self) -> dict:
        a = self.adaptive
        return {"method": self.method, "proposed": a.proposed, "accepted": a.accepted, "steps": a.steps}


class Speculator:
    """Plans, makes and accounts for the proposals of the engine's sequences (one per engine)."""

    def __init__(self, config: SpeculativeConfig, runner: ModelRunner, loaded: Any):
        self.config = config
        self.runner = runner
        self.costs = StepCosts()
        self.draft_seconds = 0.0       # time spent proposing (model-based proposers)
        self.draft_passes = 0
        self.proposed = 0
        self.accepted = 0
        self.verify_steps = 0
        self.verify_tokens = 0         # tokens committed by verify passes
        self.plans = 0
        self.draft_model = None
        self.draft_layers: list[int] | None = None     # the blocks a self-speculative draft runs
        n_layers = loaded.config.n_layers
        if config.method in (EARLY_EXIT, LAYER_SKIP) and not 1 <= config.layers < n_layers:
            raise InvalidParameterError(
                f"{config.name} needs fewer blocks than the model's {n_layers}",
                f"use {config.method}:N with 1 <= N < {n_layers}, e.g. {config.method}:{max(1, n_layers // 4)}")
        if config.method == EARLY_EXIT:
            self.draft_layers = list(range(config.layers))
        elif config.method == LAYER_SKIP:
            skipped = set(config.prepared or calibrate_skipped_layers(loaded, config.layers))
            self.draft_layers = [i for i in range(n_layers) if i not in skipped]
        elif config.method == DRAFT:
            draft = config.prepared or load_draft(config.draft_model, loaded)
            self.draft_model = DraftModel(draft, runner.cache.num_blocks * runner.cache.block_size)

    def new_state(self) -> SpecState:
        return SpecState(self.config.name)

    # ---- before the scheduler: how many positions to reserve ----------------------------------
    def plan(self, seqs: list[Sequence], vocab_size: int) -> None:
        """Set ``seq.spec_want`` (positions to reserve past the pending token) for each decoding
        sequence; n-gram proposals are made here already (they cost a dict lookup)."""
        base_rows = max(1, len(seqs))
        # Now and then a step without proposals, so the cost of plain steps is measured again
        # (while every step verifies, the base of the comparison would go stale).
        self.plans += 1
        remeasure = self.config.adaptive and self.plans % REMEASURE_EVERY == 0
        for seq in seqs:
            st = seq.spec
            remaining = seq.max_tokens - len(seq.out_ids)   # a pass commits at most k + 1 tokens
            k = min(self.config.draft_tokens, remaining - 1)
            st.draft = []
            if k < 1 or remeasure:
                seq.spec_want = 0
                continue
            if self.config.adaptive:
                k = st.adaptive.choose(k, self.costs, base_rows, self._draft_cost())
            if k and self.config.method == NGRAM:
                if st.ngrams is None:
                    st.ngrams = NgramIndex()
                st.draft = [t for t in st.ngrams.propose(seq.all_tokens(), k) if t < vocab_size]
                k = len(st.draft)
            seq.spec_want = k

    def _draft_cost(self) -> float:
        """The proposer's time per proposed token over a one-row step: measured once it has run;
        before, its share of the blocks (self-drafts) or a guess of 0.3 (a draft model)."""
        if self.config.method == NGRAM:
            return 0.0
        if self.draft_passes == 0:
            if self.draft_layers is not None:
                return len(self.draft_layers) / self.runner.model.cfg.n_layers
            return 0.3
        one_row = self.costs.estimate(1)
        return (self.draft_seconds / self.draft_passes) / one_row if one_row > 0 else 0.0

    # ---- after the scheduler: the proposals themselves ------------------------------------------
    def propose(self, chunks: list, slots_of) -> None:
        """Fill in the proposals of the decode chunks that got room (``chunk.draft_room``): their
        tokens become the pending token plus the proposal, and they become verify passes.
        ``slots_of(kv, length)``: a sequence's cache slots (``model_runner.sequence_slots``)."""
        spec_chunks = [c for c in chunks if c.draft_room > 0]
        if not spec_chunks:
            return
        if self.config.method == NGRAM:
            for c in spec_chunks:
                c.seq.spec.draft = c.seq.spec.draft[:c.draft_room]
        else:
            start = time.perf_counter()
            if self.draft_layers is not None:
                self._self_draft(spec_chunks, slots_of)
            else:
                self.draft_model.propose(spec_chunks)
            self.draft_seconds += time.perf_counter() - start
            self.draft_passes += max(c.draft_room for c in spec_chunks)
        for c in spec_chunks:
            draft = c.seq.spec.draft
            if draft:
                c.tokens = c.tokens + draft
                c.verify = True

    def _self_draft(self, chunks: list, slots_of) -> None:
        """k passes of the draft's blocks of the target model, one token per sequence each, batched
        over sequences; those blocks' KV is written at the draft positions (the verify pass
        rewrites it with the full model's)."""
        for c in chunks:
            c.seq.spec.draft = []
        active = list(chunks)
        step = 0
        while active:     # pass `step` feeds each sequence its latest token (the pending one first)
            seq_chunks = [SeqChunk([(c.tokens + c.seq.spec.draft)[-1]], c.start + step,
                                   slots_of(c.seq.kv, c.start + step + 1)) for c in active]
            picks = greedy_pick(self.runner.run(seq_chunks, layers=self.draft_layers))
            step += 1
            for c, tok in zip(active, picks):
                c.seq.spec.draft.append(tok)
            active = [c for c in active if len(c.seq.spec.draft) < c.draft_room]

    # ---- after sampling ---------------------------------------------------------------------------
    def record(self, seq: Sequence, proposed: int, accepted: int, committed: int) -> None:
        seq.spec.adaptive.record(proposed, accepted)
        self.proposed += proposed
        self.accepted += accepted
        self.verify_steps += 1
        self.verify_tokens += committed

    def record_step(self, rows: int, seconds: float) -> None:
        """The time of a decode-only forward pass of ``rows`` rows (for the cost model)."""
        self.costs.record(rows, seconds)

    def release(self, seq: Sequence) -> None:
        """A sequence ended: free what its proposals held (the draft model's KV)."""
        if self.draft_model is not None:
            self.draft_model.release(seq)

    def stats(self) -> dict:
        return {"method": self.config.name, "proposed": self.proposed, "accepted": self.accepted,
                "steps": self.verify_steps,
                "acceptance_rate": self.accepted / self.proposed if self.proposed else 0.0,
                "tokens_per_verify_step": self.verify_tokens / self.verify_steps if self.verify_steps else 0.0}


class DraftModel:
    """A second, smaller model that proposes greedily, with its own KV pool (``pool_tokens``
    positions, as many as the target's) and prefix cache; each target sequence keeps a draft KV
    sequence that catches up on the committed tokens before proposing."""

    def __init__(self, loaded: Any, pool_tokens: int):
        self.loaded = loaded
        num_blocks = max(4, pool_tokens // BLOCK_SIZE)
        self.cache = KVCache(loaded.config, num_blocks, BLOCK_SIZE, "fp32")
        self.bm = BlockManager(num_blocks, BLOCK_SIZE, copy_block=self.cache.copy_block)
        self.runner = ModelRunner(self.loaded.model, self.cache)

    def propose(self, chunks: list) -> None:
        # 1. catch up: each sequence computes the committed tokens its draft KV lacks (the last
        #    one, the pending token, gives the first proposal)
        first = []
        ready = []
        for c in chunks:
            seq = c.seq
            seq.spec.draft = []
            tokens = seq.all_tokens()
            kv = seq.spec.draft_kv
            if kv is None:
                kv = seq.spec.draft_kv = KVSequence()
            keep = common_prefix(kv.token_ids, tokens, len(tokens) - 1)
            try:
                if keep < kv.num_tokens:
                    self.bm.truncate(kv, keep)
                self.bm.match_prefix(kv, tokens, len(tokens) - 1)
                if not self.bm.reserve(kv, len(tokens) + c.draft_room - 1):
                    continue
            except OutOfBlocks:
                continue
            new = tokens[kv.num_tokens:]
            first.append(SeqChunk(new, kv.num_tokens, self.cache.block_slots(kv.blocks, len(tokens))))
            ready.append((c, new))
        if not ready:
            return
        picks = greedy_pick(self.runner.run(first))
        active = []
        for (c, new), tok in zip(ready, picks):
            self.bm.commit(c.seq.spec.draft_kv, new)
            c.seq.spec.draft.append(tok)
            if c.draft_room > 1:
                active.append(c)
        # 2. the rest of the proposal, one decode row per sequence per pass
        while active:
            rows = []
            for c in active:
                kv = c.seq.spec.draft_kv
                rows.append(SeqChunk([c.seq.spec.draft[-1]], kv.num_tokens,
                                     self.cache.block_slots(kv.blocks, kv.num_tokens + 1)))
            picks = greedy_pick(self.runner.run(rows))
            still = []
            for c, tok in zip(active, picks):
                self.bm.commit(c.seq.spec.draft_kv, [c.seq.spec.draft[-1]])
                c.seq.spec.draft.append(tok)
                if len(c.seq.spec.draft) < c.draft_room:
                    still.append(c)
            active = still
        for c in chunks:
            if c.seq.spec.draft_kv is not None:
                self.bm.trim(c.seq.spec.draft_kv)

    def release(self, seq: Sequence) -> None:
        kv = seq.spec.draft_kv
        if kv is not None:
            self.bm.free_sequence(kv)
            seq.spec.draft_kv = None


def _check_same_vocabulary(draft: Any, target: Any, spec: str) -> None:
    """A draft must tokenise like the target: the same number of output rows and the same token
    for every id (its proposals are token ids of the target's vocabulary)."""
    dv, tv = draft.config.vocab_size, target.config.vocab_size
    fix = "use a draft made from the same model family, e.g. `edgellm quantize` of the target"
    if dv != tv:
        raise InvalidParameterError(f"the draft model {spec!r} has a vocabulary of {dv} tokens, the target {tv}", fix)
    dt, tt = draft.tokenizer, target.tokenizer
    if dt.vocab_size != tt.vocab_size:
        raise InvalidParameterError(f"the draft model {spec!r}'s tokenizer has {dt.vocab_size} tokens, the "
                                    f"target's {tt.vocab_size}", fix)
    for i in range(tt.vocab_size):
        if dt.id_to_token(i) != tt.id_to_token(i):
            raise InvalidParameterError(f"the draft model {spec!r} has another vocabulary than the target: token "
                                        f"{i} is {dt.id_to_token(i)!r} there, {tt.id_to_token(i)!r} here", fix)
