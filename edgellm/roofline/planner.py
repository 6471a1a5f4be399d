"""The planner: a model split across N chips, energy per token, and a disaggregated-serving what-if.

Pure arithmetic on top of :func:`edgellm.roofline.analyze.analyze` (one roofline time per layer);
nothing here runs a model. ``edgellm analyze --plan --chips ...`` and ``--disaggregate`` print it.

**Splits** (:func:`plan_split`, :func:`plan_splits`). ``pp`` pipeline stages x ``tp`` tensor-parallel
chips per stage, ``N = pp * tp``:

* Pipeline parallel (GPipe: Huang et al. 2019, "GPipe: Efficient Training of Giant Neural Networks
  using Pipeline Parallelism"): the blocks are cut into ``pp`` contiguous stages; the embedding sits
  on the first, the final norm and lm_head on the last. Stages are balanced by time (the decode step
  time of each block) or by memory, minimising the largest stage (the linear-partition problem,
  solved exactly by dynamic programming).
* Tensor parallel (Megatron-LM: Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter
  Language Models Using Model Parallelism"): attention heads and MLP columns are split across the
  ``tp`` chips of a stage (column- then row-parallel), so each chip holds 1/tp of each weight and of
  the KV heads (a KV head is replicated when there are fewer KV heads than chips). Norms and residual
  adds are repeated on every chip. Each block ends its attention and its MLP with an all-reduce of
  the hidden-size activations (2 per block), the vocab-parallel embedding with one more, and the
  split lm_head with an all-gather of the logits.
* Ring all-reduce of S bytes over p chips (Thakur, Rabenseifner & Gropp 2005, "Optimization of
  Collective Communication Operations in MPICH"): each chip sends 2(p-1)/p x S bytes in 2(p-1) steps,
  time = 2(p-1) x latency + 2(p-1)/p x S / link bandwidth. All-gather: half of that.
* Pipeline link: each token crossing a stage boundary carries hidden_size x activation bytes; with
  tp > 1 the tp chips of a stage send their shares over tp links in parallel (the scatter/gather
  of Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM"). One transfer costs latency + bytes / bandwidth.
* Prefill of B x P tokens in M micro-batches (token chunks of P/M, as in TeraPipe: Li et al. 2021):
  a stage spends t_i / M on a chunk (exact for the linears; attention, whose later chunks see more
  keys, is approximated by its average). GPipe schedule: time = sum_i c_i + (pp-1) x link +
  (M-1) x max(max_i c_i, link), so with balanced stages and free links the idle ("bubble") share of
  the chips is (pp-1) / (M+pp-1).
* Decode with M micro-batches (M groups of B sequences in flight, one per stage when M = pp): one
  token of a sequence passes every stage and link and its id returns to the first stage, so a round
  takes max(M x max_i t_i, sum_i t_i + (pp-1) x link + latency); M x B tokens per round. Bubble =
  1 - sum_i M t_i / (pp x round): (pp-1)/pp at M = 1, 0 once M x max t_i covers the round.
* Memory per chip: weights (parameters x weight bits / tp) + KV cache (its blocks x context x B x M
  sequences x 2 x KV heads per chip x head_dim x KV bits) + activations (the largest input + output
  of one layer in the prefill of B x P tokens, /tp where split). It fits when it is at most
  capacity x (1 - reserve) (the reserve is for the runtime and fragmentation).

**Energy** (:func:`energy_joules`): a chip draws its busy power (``Hardware.power_W``: TDP or a
measured figure) while the roofline says it computes or moves memory, and its idle power while it
waits (bubbles, links, think time). Unknown idle power counts as 0, so energy is then a lower bound,
and busy power = TDP is an upper bound for a memory-bound phase that rarely draws it. Joules per
token = energy of a phase / tokens of that phase. Link energy is left out.

**Disaggregated serving** (:func:`disaggregate`): prefill on one chip, decode on another, the KV
cache of the prompt moved between them (Patel et al. 2024, "Splitwise: Efficient Generative LLM
Inference Using Phase Splitting"; Zhong et al. 2024, "DistServe: Disaggregating Prefill and
Decoding for Goodput-optimized Large Language Model Serving"). See that function for the model.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.config import ModelConfig
from edgellm.errors import EdgeLLMError, InvalidParameterError
from edgellm.roofline.analyze import DEFAULT_RESERVE, Analysis, analyze, format_bytes, format_time
from edgellm.roofline.hardware import Hardware
from edgellm.roofline.layers import ATTENTION_CORE, validate_bits

MODES = ("pipeline", "tensor", "hybrid")
BALANCES = ("time", "memory")
HEAD_NAMES = ("final_norm", "lm_head")
# Layers every tensor-parallel chip repeats on the full hidden vector (Megatron-LM keeps them whole).
REPLICATED = ("attn_norm", "ffn_norm", "attn_add", "ffn_add", "final_norm")
MAX_CHIPS_SEARCHED = 4096


class PlanError(EdgeLLMError):
    """A split or a serving setup that cannot work: the model fits nowhere, a link is missing, ..."""


# ---- links ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    bandwidth: float          # bytes/s, one direction
    latency_s: float          # one hop
    source: str

    def time(self, nbytes: float) -> float:
        """latency + bytes / bandwidth: one transfer over one link."""
        return self.latency_s + nbytes / self.bandwidth

    def to_dict(self) -> dict:
        return {"bandwidth_bytes_per_s": self.bandwidth, "latency_s": self.latency_s, "source": self.source}


def resolve_link(hw: Hardware, gbps: float | None = None, latency_us: float | None = None,
                 needed: bool = True) -> Link | None:
    """The link between two chips: ``--link-gbps`` (gigaBITS per second, as networks are quoted:
    10GbE = 10) and ``--link-latency-us`` override the hardware entry's figures."""
    for flag, value in (("--link-gbps", gbps), ("--link-latency-us", latency_us)):
        if value is not None and (isinstance(value, bool) or not value >= 0 or math.isinf(value)):
            raise InvalidParameterError(f"{flag} must be a non-negative number, got {value!r}",
                                        f"pass {flag} with e.g. 10 (10GbE) / 30")
    if gbps is not None and gbps == 0:
        raise InvalidParameterError("--link-gbps 0 would never deliver a byte", "pass a positive bandwidth")
    bw = gbps * 1e9 / 8 if gbps is not None else hw.link_bandwidth
    lat = latency_us * 1e-6 if latency_us is not None else hw.link_latency_s
    if bw is None or lat is None:
        if not needed:
            return None
        missing = " and ".join(f for f, v in (("--link-gbps", bw), ("--link-latency-us", lat)) if v is None)
        raise PlanError(f"hardware '{hw.name}' has no chip-to-chip link figure, and more than one chip needs one",
                        f"pass {missing} (e.g. --link-gbps 10 --link-latency-us 30 for 10GbE), or a hardware "
                        "file with link_GBps and link_latency_us")
    parts = []
    if gbps is not None:
        parts.append(f"--link-gbps {gbps:g}")
    if latency_us is not None:
        parts.append(f"--link-latency-us {latency_us:g}")
    source = ", ".join(parts) if parts else hw.link_source
    if parts and hw.link_source and len(parts) < 2:
        source += f"; the rest from the entry ({hw.link_source})"
    return Link(bw, lat, source)


def slower_link(a: Link, b: Link) -> Link:
    """A transfer between two chips runs at the lower bandwidth and pays the higher latency of the two ends."""
    if a == b:
        return a
    slow = a if a.bandwidth <= b.bandwidth else b
    return Link(min(a.bandwidth, b.bandwidth), max(a.latency_s, b.latency_s),
                f"the slower end: {slow.source}")


def allreduce_time(nbytes: float, chips: int, link: Link | None) -> float:
    """Ring all-reduce (Thakur et al. 2005): 2(p-1) x latency + 2(p-1)/p x S / bandwidth."""
    if chips <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (chips - 1) * link.latency_s + 2 * (chips - 1) / chips * nbytes / link.bandwidth


def allgather_time(nbytes: float, chips: int, link: Link | None) -> float:
    """Ring all-gather of S bytes in all: (p-1) x latency + (p-1)/p x S / bandwidth."""
    if chips <= 1 or nbytes <= 0:
        return 0.0
    return (chips - 1) * link.latency_s + (chips - 1) / chips * nbytes / link.bandwidth


def ring_allreduce_bytes(nbytes: float, chips: int) -> float:
    """Bytes each chip sends in a ring all-reduce of ``nbytes``: 2(p-1)/p x S."""
    return 0.0 if chips <= 1 else 2 * (chips - 1) / chips * nbytes


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """GPipe's idle share for balanced stages and free links: (N-1) / (M+N-1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def energy_joules(busy_s: float, wall_s: float, hw: Hardware) -> float | None:
    """One chip over ``wall_s`` seconds, ``busy_s`` of them running: busy W x busy s + idle W x the rest.
    None when the chip has no power figure; an unknown idle power counts as 0 (a lower bound)."""
    if hw.power_W is None:
        return None
    return hw.power_W * busy_s + (hw.idle_power_W or 0.0) * max(wall_s - busy_s, 0.0)


# ---- per-chip costs of one phase ------------------------------------------------------------------
@dataclass
class _PhaseCosts:
    """One phase's roofline on one chip of a tp group: per-block time (incl. its all-reduces), the
    embedding and head times, and the tensor-parallel communication separately."""

    block_s: float
    emb_s: float
    head_s: float
    block_comm_s: float
    emb_comm_s: float
    head_comm_s: float
    tokens: int                       # tokens in one forward pass of the phase (B x P, or B)


# Layers split by attention head: when the heads do not divide evenly over the chips, the chip
# with the most KV groups (and their query heads) sets the pace of these.
HEAD_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "q_norm", "k_norm") + ATTENTION_CORE


def _chip_time(layer, tp: int, kv_share: float, head_share: float) -> float:
    """A layer's roofline time on the busiest of ``tp`` chips: ops and non-KV bytes / tp (a
    head-split layer: x ``head_share``, the busiest chip's share of the query heads), KV bytes x the
    chip's share of KV heads; REPLICATED layers are whole on every chip."""
    if tp == 1 or layer.name in REPLICATED:
        return layer.time_per_block_s
    c = layer.cost
    kv = c.load_kv + c.store_kv
    other = c.memory_bytes - kv
    part = head_share if layer.name in HEAD_LAYERS else 1 / tp
    return max(c.ops * part / layer.peak_ops_per_s, (other * part + kv * kv_share) / layer.bandwidth)


def _kv_share(cfg: ModelConfig, tp: int) -> float:
    """Fraction of the KV heads one chip holds: ceil(n_kv / tp) / n_kv (replicated past n_kv chips)."""
    return math.ceil(cfg.n_kv_heads / tp) / cfg.n_kv_heads


def _phase_costs(a: Analysis, tp: int, link: Link | None) -> _PhaseCosts:
    cfg = a.model
    share = _kv_share(cfg, tp)
    # KV heads that do not divide evenly go by whole KV groups (with their query heads): the
    # busiest chip holds ``share`` of the heads; past one KV head per chip the query heads split evenly
    heads = share if cfg.n_kv_heads % tp and tp < cfg.n_kv_heads else 1 / tp
    block = sum(_chip_time(x, tp, share, heads) for x in a.layers if x.count == cfg.n_layers and x.name not in
                ("embedding",) + HEAD_NAMES)
    emb = sum(_chip_time(x, tp, share, heads) for x in a.layers if x.name == "embedding")
    head = sum(_chip_time(x, tp, share, heads) for x in a.layers if x.name in HEAD_NAMES)
    tokens = a.batch * (a.seq_len if a.phase == "prefill" else 1)
    act = a.bits.act / 8
    hidden_bytes = tokens * cfg.hidden_size * act
    block_comm = 2 * allreduce_time(hidden_bytes, tp, link)               # after attention, after the MLP
    emb_comm = allreduce_time(hidden_bytes, tp, link)                     # vocab-parallel embedding
    head_comm = allgather_time(a.batch * cfg.vocab_size * act, tp, link)  # logits of the last positions
    return _PhaseCosts(block + block_comm, emb + emb_comm, head + head_comm, block_comm, emb_comm, head_comm,
                       tokens)


# ---- the split ----------------------------------------------------------------------------------
@dataclass
class Stage:
    first_block: int
    end_block: int                     # exclusive
    weight_bytes: float                # per chip
    kv_bytes: float                    # per chip
    act_bytes: float                   # per chip
    prefill_s: float                   # whole prompt (B x P tokens), per chip, incl. tensor-parallel comm
    decode_s: float                    # one decode step, per chip, incl. tensor-parallel comm
    prefill_comm_s: float
    decode_comm_s: float

    @property
    def memory_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.act_bytes

    @property
    def n_blocks(self) -> int:
        return self.end_block - self.first_block

    def to_dict(self) -> dict:
        return {"blocks": [self.first_block, self.end_block - 1], "n_blocks": self.n_blocks,
                "memory_bytes_per_chip": self.memory_bytes, "weight_bytes_per_chip": self.weight_bytes,
                "kv_bytes_per_chip": self.kv_bytes, "activation_bytes_per_chip": self.act_bytes,
                "prefill_s": self.prefill_s, "decode_step_s": self.decode_s,
                "prefill_tensor_comm_s": self.prefill_comm_s, "decode_tensor_comm_s": self.decode_comm_s}


@dataclass
class Split:
    model: str
    hardware: Hardware
    mode: str
    pp: int
    tp: int
    micro_batches: int
    batch: int
    prompt_tokens: int
    context: int
    balance: str
    usable_bytes: float
    link: Link | None
    stages: list[Stage] = field(default_factory=list)
    reason: str = ""                   # why this split cannot run at all (then stages is empty)
    figures: dict = field(default_factory=dict)

    @property
    def chips(self) -> int:
        return self.pp * self.tp

    @property
    def fits(self) -> bool:
        return not self.reason and all(s.memory_bytes <= self.usable_bytes for s in self.stages)

    @property
    def max_memory_bytes(self) -> float:
        return max((s.memory_bytes for s in self.stages), default=math.nan)

    def to_dict(self) -> dict:
        d = {"mode": self.mode, "chips": self.chips, "pipeline_stages": self.pp, "tensor_parallel": self.tp,
             "micro_batches": self.micro_batches, "batch": self.batch, "prompt_tokens": self.prompt_tokens,
             "context": self.context, "balance": self.balance, "fits": self.fits,
             "usable_bytes_per_chip": self.usable_bytes,
             "max_memory_bytes_per_chip": None if not self.stages else self.max_memory_bytes,
             "link": None if self.link is None else self.link.to_dict()}
        if self.reason:
            d["reason"] = self.reason
        d["stages"] = [s.to_dict() for s in self.stages]
        d.update(self.figures)
        return d


def _partition(weights: list[float], parts: int) -> list[tuple[int, int]]:
    """Cut ``weights`` into ``parts`` contiguous non-empty groups minimising the largest group sum
    (linear partition, exact DP; ties go to the earliest cut). Returns [start, end) pairs."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j] - 1e-12 * max(1.0, abs(cost)):
                    best[k][j] = cost
                    cut[k][j] = i
    bounds = []
    j = n
    for k in range(parts, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


@dataclass
class _Model:
    """The per-phase analyses and parameter counts one planning call shares."""

    cfg: ModelConfig
    hw: Hardware
    prefill: Analysis
    decode: Analysis
    weight_bits: float
    kv_bits: float
    act_bits: float

    @property
    def block_params(self) -> int:
        return sum(x.cost.params for x in self.decode.layers if x.count == self.cfg.n_layers
                   and x.name != "embedding")

    def kv_bytes_per_token_per_block(self, tp: int) -> float:
        cfg = self.cfg
        return 2 * math.ceil(cfg.n_kv_heads / tp) * cfg.head_dim * self.kv_bits / 8

    def act_bytes(self, tp: int, names: set[str] | None) -> float:
        """Largest input + output of one layer in the prefill (the working set while it runs)."""
        best = 0.0
        for x in self.prefill.layers:
            if names is not None and x.name not in names:
                continue
            b = x.cost.load_act + x.cost.store_act
            best = max(best, b if x.name in REPLICATED else b / tp)
        return best


def _build(cfg: ModelConfig, hw: Hardware, prompt_tokens: int, context: int, batch: int, weight_bits: float,
           act_bits: int, kv_bits: int, attention: str) -> _Model:
    pre = analyze(cfg, hw, "prefill", batch, prompt_tokens, weight_bits, act_bits, kv_bits, attention)
    dec = analyze(cfg, hw, "decode", batch, max(context - 1, 0), weight_bits, act_bits, kv_bits, attention)
    return _Model(cfg, hw, pre, dec, weight_bits, kv_bits, act_bits)


def _check_split(cfg: ModelConfig, pp: int, tp: int) -> str:
    """Why a pp x tp split cannot be built ('' if it can)."""
    if pp > cfg.n_layers:
        return f"{pp} pipeline stages but only {cfg.n_layers} blocks to place"
    if cfg.n_heads % tp and tp > cfg.n_kv_heads:
        # uneven splits go by whole KV groups (as edgellm.runtime.sharding cuts them), so every
        # chip needs a KV head of its own
        return (f"{cfg.n_heads} attention heads do not split evenly over {tp} chips and there are only "
                f"{cfg.n_kv_heads} KV heads to give each chip whole groups")
    if cfg.ffn_size % tp:
        return f"the MLP width {cfg.ffn_size} does not split evenly over {tp} chips"
    return ""


def _stage_memory(m: _Model, tp: int, seqs: int, first: int, end: int, last: bool, pp: int) -> tuple:
    cfg, wb = m.cfg, m.weight_bits / 8
    weights = (end - first) * m.block_params * wb / tp
    names = {x.name for x in m.prefill.layers if x.count == cfg.n_layers and x.name != "embedding"}
    if first == 0:
        weights += cfg.vocab_size * cfg.hidden_size * wb / tp
        names.add("embedding")
    if last:
        # the output head; a tied head shares the embedding's matrix only when it is on the same chip
        head = cfg.vocab_size * cfg.hidden_size if (not cfg.tie_embeddings or pp > 1) else 0
        weights += (head * wb + cfg.hidden_size * wb) / tp
        names |= set(HEAD_NAMES)
    kv = (end - first) * m.kv_bytes_per_token_per_block(tp) * m.decode.context_tokens * seqs
    return weights, kv, m.act_bytes(tp, names)


def plan_split(cfg: ModelConfig, hw: Hardware, pp: int, tp: int = 1, *, prompt_tokens: int = 512,
               context: int | None = None, batch: int = 1, micro_batches: int | None = None,
               weight_bits: float = 16, act_bits: int = 16, kv_bits: int | None = None,
               attention: str = "unfused", balance: str = "time", link: Link | None = None,
               reserve: float = DEFAULT_RESERVE, mode: str | None = None, _model: _Model | None = None) -> Split:
    """``pp`` contiguous stages x ``tp`` chips each: memory per chip, time per phase, bubble, link
    bytes, joules per token (formulas in the module docstring). ``context``: tokens each sequence
    keeps in the KV cache (default: the prompt); decode is timed at that full context. A split that
    cannot be built comes back with ``reason`` set; one that does not fit has ``fits`` False."""
    kv_bits = act_bits if kv_bits is None else kv_bits
    validate_bits(weight_bits, act_bits, kv_bits)
    context = prompt_tokens if context is None else context
    _positive_int("pipeline stages", pp)
    _positive_int("tensor-parallel chips", tp)
    _positive_int("--prompt-tokens", prompt_tokens)
    _positive_int("--batch", batch)
    if isinstance(context, bool) or not isinstance(context, int) or context < prompt_tokens:
        raise InvalidParameterError(f"the context ({context!r} tokens) must hold the prompt ({prompt_tokens})",
                                    "pass --seq-len at least --prompt-tokens")
    if balance not in BALANCES:
        raise InvalidParameterError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    if not 0 <= reserve < 1:
        raise InvalidParameterError(f"reserve must be a fraction in [0, 1), got {reserve!r}")
    m_batches = pp if micro_batches is None else micro_batches
    _positive_int("--micro-batches", m_batches)
    mode = mode or ("pipeline" if tp == 1 else "tensor" if pp == 1 else "hybrid")
    usable = hw.memory_bytes * (1 - reserve)
    split = Split(cfg.name, hw, mode, pp, tp, m_batches, batch, prompt_tokens, context, balance, usable, link)
    split.reason = _check_split(cfg, pp, tp)
    if split.reason:
        return split
    if pp * tp > 1 and link is None:
        raise PlanError(f"a split over {pp * tp} chips needs a link, and none was given",
                        "pass --link-gbps and --link-latency-us, or use hardware with a link figure")
    m = _model or _build(cfg, hw, prompt_tokens, context, batch, weight_bits, act_bits, kv_bits, attention)
    pre, dec = _phase_costs(m.prefill, tp, link), _phase_costs(m.decode, tp, link)
    seqs = batch * m_batches          # sequences whose KV every stage holds

    L = cfg.n_layers
    if balance == "time":
        items = [dec.block_s] * L
        items[0] += dec.emb_s
        items[-1] += dec.head_s
    else:
        # weights + KV of each block (with the embedding / head on the ends); activations are a peak,
        # not a sum, so they do not steer the cut
        items = [sum(_stage_memory(m, tp, seqs, j, j + 1, j == L - 1, pp)[:2]) for j in range(L)]
    for first, end in _partition(items, pp):
        last = end == L
        w, kv, act = _stage_memory(m, tp, seqs, first, end, last, pp)
        n = end - first
        p_s = n * pre.block_s + (pre.emb_s if first == 0 else 0) + (pre.head_s if last else 0)
        d_s = n * dec.block_s + (dec.emb_s if first == 0 else 0) + (dec.head_s if last else 0)
        p_c = n * pre.block_comm_s + (pre.emb_comm_s if first == 0 else 0) + (pre.head_comm_s if last else 0)
        d_c = n * dec.block_comm_s + (dec.emb_comm_s if first == 0 else 0) + (dec.head_comm_s if last else 0)
        split.stages.append(Stage(first, end, w, kv, act, p_s, d_s, p_c, d_c))
    split.figures = _figures(split, m, pre, dec)
    return split


def _figures(split: Split, m: _Model, pre: _PhaseCosts, dec: _PhaseCosts) -> dict:
    cfg, hw, link = m.cfg, m.hw, split.link
    pp, tp, M, B, P = split.pp, split.tp, split.micro_batches, split.batch, split.prompt_tokens
    act = m.act_bits / 8
    per_token_boundary = cfg.hidden_size * act
    # ---- prefill: GPipe schedule over M token chunks ----
    chunk = [s.prefill_s / M for s in split.stages]
    chunk_link = link.latency_s + B * P / M * per_token_boundary / (tp * link.bandwidth) if pp > 1 else 0.0
    prefill_s = sum(chunk) + (pp - 1) * chunk_link + (M - 1) * max(max(chunk), chunk_link)
    prefill_busy = [s.prefill_s - s.prefill_comm_s for s in split.stages]   # roofline time, chip drawing busy W
    prefill_bubble = 1 - sum(s.prefill_s for s in split.stages) / (pp * prefill_s)
    # ---- decode: M groups of B sequences in flight ----
    step_link = link.latency_s + B * per_token_boundary / (tp * link.bandwidth) if pp > 1 else 0.0
    back = link.latency_s if pp > 1 else 0.0               # the sampled token id returns to stage 0
    one_pass = sum(s.decode_s for s in split.stages) + (pp - 1) * step_link + back
    round_s = max(M * max(s.decode_s for s in split.stages), M * step_link, one_pass)
    decode_bubble = 1 - sum(M * s.decode_s for s in split.stages) / (pp * round_s)
    decode_busy = [M * (s.decode_s - s.decode_comm_s) for s in split.stages]

    def joules(busy: list[float], wall: float, tokens: float) -> float | None:
        e = [energy_joules(b, wall, hw) for b in busy]
        return None if e[0] is None else tp * sum(e) / tokens

    blocks_per_token_allreduce = 2 * cfg.n_layers + 1
    return {
        "prefill": {"time_s": prefill_s, "tokens_per_s": B * P / prefill_s, "bubble_fraction": prefill_bubble,
                    "gpipe_bubble_fraction": bubble_fraction(pp, M),
                    "link_s_per_chunk": chunk_link, "joules_per_token": joules(prefill_busy, prefill_s, B * P)},
        "decode": {"time_per_token_s": round_s, "tokens_per_s": M * B / round_s,
                   "tokens_per_s_per_sequence": 1 / round_s, "bubble_fraction": decode_bubble,
                   "link_s_per_step": step_link, "joules_per_token": joules(decode_busy, round_s, M * B)},
        "link_bytes_per_token": {
            "pipeline_per_boundary": per_token_boundary if pp > 1 else 0.0,
            "pipeline_boundaries": pp - 1,
            "tensor_allreduces": blocks_per_token_allreduce if tp > 1 else 0,
            "tensor_sent_per_chip": (blocks_per_token_allreduce * ring_allreduce_bytes(per_token_boundary, tp)
                                     if tp > 1 else 0.0),
        },
        "power_W": hw.power_W, "idle_power_W": hw.idle_power_W,
    }


def _positive_int(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(f"{what} must be a positive integer, got {value!r}")


def _factorizations(cfg: ModelConfig, chips: int, mode: str) -> list[tuple[int, int]]:
    if mode == "pipeline":
        return [(chips, 1)]
    if mode == "tensor":
        return [(1, chips)]
    return [(chips // tp, tp) for tp in range(1, chips + 1) if chips % tp == 0]


def plan_splits(cfg: ModelConfig, hw: Hardware, chips: list[int], modes: list[str], *, refuse: bool = True,
                **kw) -> dict:
    """Every (chips, mode) asked for; ``hybrid`` keeps, for each N, the fitting pp x tp with the
    fastest decode. Raises :class:`PlanError` (with the smallest split that would fit) when none fits
    and ``refuse`` is set."""
    for mode in modes:
        if mode not in MODES:
            raise InvalidParameterError(f"unknown parallelism {mode!r}", f"use one or more of {', '.join(MODES)}")
    for n in chips:
        _positive_int("--chips", n)
    kw = dict(kw)
    model = _build(cfg, hw, kw.get("prompt_tokens", 512), kw.get("context") or kw.get("prompt_tokens", 512),
                   kw.get("batch", 1), kw.get("weight_bits", 16), kw.get("act_bits", 16),
                   kw.get("kv_bits") if kw.get("kv_bits") is not None else kw.get("act_bits", 16),
                   kw.get("attention", "unfused"))
    link = kw.pop("link", None)
    rows: list[Split] = []
    for mode in modes:
        for n in chips:
            use_link = link if n > 1 else None
            if n > 1 and link is None:
                raise PlanError(f"a split over {n} chips of '{hw.name}' needs a chip-to-chip link, and the entry "
                                "has none", "pass --link-gbps and --link-latency-us, or a hardware file with "
                                "link_GBps and link_latency_us")
            candidates = [plan_split(cfg, hw, pp, tp, link=use_link, mode=mode, _model=model, **kw)
                          for pp, tp in _factorizations(cfg, n, mode)]
            if mode == "hybrid":
                fitting = [s for s in candidates if s.fits]
                pool = fitting or [s for s in candidates if not s.reason] or candidates
                key = (lambda s: s.figures["decode"]["time_per_token_s"]) if fitting else \
                      (lambda s: s.max_memory_bytes if s.stages else math.inf)
                rows.append(min(pool, key=key))
            else:
                rows.extend(candidates)
    smallest = smallest_fit(cfg, hw, model, link, **kw) if not all(r.fits for r in rows) else None
    if refuse and not any(r.fits for r in rows):
        asked = ", ".join(f"{r.mode} x{r.chips}" for r in rows)
        need = min((r.max_memory_bytes for r in rows if r.stages), default=math.nan)
        fix = ("lower --weight-bits / --kv-bits or the context (--seq-len), or use a chip with more memory"
               if smallest is None else
               f"the smallest split that fits is {smallest.chips} chips ({_describe(smallest)}, "
               f"{format_bytes(smallest.max_memory_bytes)} per chip): pass --chips {smallest.chips} "
               f"--parallel {smallest.mode}; or lower --weight-bits / --kv-bits, or the context")
        reasons = sorted({r.reason for r in rows if r.reason})
        raise PlanError(
            f"{cfg.name} (W{_g(kw.get('weight_bits', 16))}, context {kw.get('context') or kw.get('prompt_tokens')}"
            f") fits none of the splits asked for on {hw.name} ({asked}): "
            + (f"the best needs {format_bytes(need)} per chip, {format_bytes(rows[0].usable_bytes)} usable"
               if not math.isnan(need) else "none can be built")
            + ("" if not reasons else "; " + "; ".join(reasons)), fix)
    return {"model": cfg.name, "hardware": hw.name, "rows": rows, "smallest_fit": smallest, "link": link}


def smallest_fit(cfg: ModelConfig, hw: Hardware, model: _Model, link: Link | None, **kw) -> Split | None:
    """The fewest chips (pipeline first, then more tensor parallel) on which the model fits, searched
    up to MAX_CHIPS_SEARCHED; None if it fits nowhere (e.g. one block is larger than a chip and the
    heads cannot be split further)."""
    kw = {k: v for k, v in kw.items() if k not in ("balance", "mode")}
    if link is None:
        return None
    for n in range(1, MAX_CHIPS_SEARCHED + 1):
        for pp, tp in sorted(_factorizations(cfg, n, "hybrid"), key=lambda f: f[1]):
            if _check_split(cfg, pp, tp):
                continue
            s = plan_split(cfg, hw, pp, tp, link=link if n > 1 else None, balance="memory", _model=model, **kw)
            if s.fits:
                return s
    return None


def _g(x) -> str:
    return f"{x:g}"


def _describe(s: Split) -> str:
    if s.tp == 1:
        return f"pipeline {s.pp}"
    if s.pp == 1:
        return f"tensor {s.tp}"
    return f"pipeline {s.pp} x tensor {s.tp}"


# ---- formatting: splits -----------------------------------------------------------------------------
def format_splits(result: dict) -> str:
    rows: list[Split] = result["rows"]
    first = rows[0]
    hw = first.hardware
    link = result["link"]
    lines = [
        f"Split plan: {result['model']} on {hw.name} ({format_bytes(hw.memory_bytes)} per chip, "
        f"{format_bytes(first.usable_bytes)} usable) — prompt {first.prompt_tokens} tokens, context "
        f"{first.context}, batch {first.batch}, balanced by {first.balance}",
        "link: " + ("none (one chip)" if link is None else
                    f"{link.bandwidth / 1e9:,.3g} GB/s each way, {link.latency_s * 1e6:g} us — {link.source}"),
        "power: " + (f"{hw.power_W:g} W busy, idle "
                     + (f"{hw.idle_power_W:g} W" if hw.idle_power_W is not None else "unknown (counted as 0)")
                     + f" — {hw.power_source}" if hw.power_W is not None else
                     "unknown: no joules (give power_W in a hardware file)"),
        "",
    ]
    head = (f"{'split':<16}{'chips':>6}{'M':>4}{'mem/chip':>11}{'fits':>6}{'prefill':>11}{'bubble':>8}"
            f"{'decode/tok':>12}{'tok/s':>9}{'bubble':>8}{'J/tok pre':>11}{'J/tok dec':>11}{'link B/tok':>12}")
    lines += [head, "-" * len(head)]
    for r in rows:
        label = f"hybrid {r.pp}x{r.tp}" if r.mode == "hybrid" else f"{r.mode} {r.chips}"
        if r.reason:
            lines.append(f"{label:<16}{r.chips:>6}{'':>4}{'-':>11}{'no':>6}  cannot be built: {r.reason}")
            continue
        f = r.figures
        lb = f["link_bytes_per_token"]
        link_b = lb["tensor_sent_per_chip"] if r.tp > 1 else lb["pipeline_per_boundary"]
        cells = (f"{label:<16}{r.chips:>6}{r.micro_batches:>4}{format_bytes(r.max_memory_bytes):>11}"
                 f"{'yes' if r.fits else 'NO':>6}")
        if r.fits:
            cells += (f"{format_time(f['prefill']['time_s']):>11}{f['prefill']['bubble_fraction']:>8.0%}"
                      f"{format_time(f['decode']['time_per_token_s']):>12}{f['decode']['tokens_per_s']:>9.1f}"
                      f"{f['decode']['bubble_fraction']:>8.0%}{_j(f['prefill']['joules_per_token']):>11}"
                      f"{_j(f['decode']['joules_per_token']):>11}{format_bytes(link_b) if link_b else '-':>12}")
        else:
            cells += "  does not fit"
        lines.append(cells)
    smallest = result.get("smallest_fit")
    if smallest is not None and not all(r.fits for r in rows):
        lines += ["", f"smallest split that fits: {smallest.chips} chips ({_describe(smallest)}), "
                      f"{format_bytes(smallest.max_memory_bytes)} per chip"]
    lines += ["", "columns: M = micro-batches (prefill: token chunks; decode: groups of sequences in flight); "
                  "mem/chip = the fullest chip (weights + KV + activations); prefill = time for the whole "
                  "prompt; decode/tok = one token of one sequence; tok/s = all sequences in flight; "
                  "J/tok = joules per token on all chips; link B/tok = pipeline: bytes over each stage "
                  "boundary, tensor: bytes each chip sends in its all-reduces, per token",
              "model: " + "; ".join(SPLIT_CONVENTIONS)]
    return "\n".join(lines)


SPLIT_CONVENTIONS = [
    "pipeline: contiguous stages (GPipe), prefill in M token chunks, bubble (N-1)/(M+N-1) for balanced stages",
    "tensor: Megatron-LM column/row split, 2 ring all-reduces of the hidden activations per block, "
    "2(N-1)/N x size bytes sent per chip",
    "time per layer per chip = max(ops / tp / peak, bytes / tp / bandwidth) (norms and adds whole on each chip; "
    "KV heads that do not divide by tp: the busiest chip's share of whole KV groups for the attention layers)",
    "energy = busy W x roofline time + idle W x waiting (unknown idle = 0); link energy not counted",
    "memory per chip = weights + KV (context x batch x micro-batches) + the largest layer's activations; "
    "fits within capacity x (1 - reserve)",
]


def _j(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def splits_to_dict(result: dict) -> dict:
    rows = result["rows"]
    hw = rows[0].hardware
    smallest = result.get("smallest_fit")
    return {"model": result["model"], "hardware": hw.name,
            "hardware_info": hw.to_dict(),
            "link": None if result["link"] is None else result["link"].to_dict(),
            "splits": [r.to_dict() for r in rows],
            "smallest_fit": None if smallest is None else smallest.to_dict(),
            "conventions": list(SPLIT_CONVENTIONS)}


# ---- session traces ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Turn:
    prompt_tokens: int     # tokens the prefill processes (the whole prompt sent, history included)
    reply_tokens: int      # tokens generated
    think_s: float = 0.0   # the user's pause after the reply, before the session's next request


@dataclass(frozen=True)
class Session:
    name: str
    turns: tuple[Turn, ...]


# A small mix: a chat whose client resends the growing history each turn, a long document summarised
# once, a coding session. Prompt lengths include the resent history (no prefix cache is assumed).
DEFAULT_TRACE: tuple[Session, ...] = (
    Session("chat", (Turn(200, 150, 10.0), Turn(380, 120, 12.0), Turn(530, 200, 15.0))),
    Session("summarise", (Turn(3000, 250, 0.0),)),
    Session("code", (Turn(1200, 400, 20.0), Turn(1650, 300, 0.0))),
)

TRACE_FIELDS = ("session", "prompt_tokens", "reply_tokens", "think_s")


class TraceFormatError(EdgeLLMError):
    """A session trace file that cannot be read."""


def _turn(row, where: str) -> Turn:
    def num(key, kind, minimum):
        v = row.get(key, 0 if key == "think_s" else None)
        try:
            v = kind(v)
        except (TypeError, ValueError):
            raise TraceFormatError(f"{where}: '{key}' must be a number, got {row.get(key)!r}",
                                   f"each turn has {', '.join(TRACE_FIELDS[1:])} (think_s optional)") from None
        if not v >= minimum or (isinstance(v, float) and math.isinf(v)):
            raise TraceFormatError(f"{where}: '{key}' must be at least {minimum}, got {v!r}")
        return v

    return Turn(num("prompt_tokens", int, 1), num("reply_tokens", int, 1), num("think_s", float, 0.0))


def load_trace(path: str | Path) -> list[Session]:
    """A session trace: JSON ``{"sessions": [{"name": ..., "turns": [{"prompt_tokens": 512,
    "reply_tokens": 128, "think_s": 5}, ...]}, ...]}`` (or the list of sessions alone), or CSV with
    the header ``session,prompt_tokens,reply_tokens,think_s``, one row per turn, in order."""
    path = Path(path)
    if not path.is_file():
        raise TraceFormatError(f"trace file {path} does not exist", "give a .json or .csv trace (see docs/planner.md)")
    text = path.read_text(encoding="utf-8")
    sessions: list[Session] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = [f for f in TRACE_FIELDS[:3] if f not in (reader.fieldnames or [])]
        if missing:
            raise TraceFormatError(f"trace {path}: missing column {', '.join(missing)}",
                                   f"the header is {','.join(TRACE_FIELDS)}")
        order: dict[str, list[Turn]] = {}
        for i, row in enumerate(reader, start=2):
            order.setdefault(row["session"], []).append(_turn(row, f"trace {path}, line {i}"))
        sessions = [Session(name, tuple(turns)) for name, turns in order.items()]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TraceFormatError(f"trace {path} is not valid JSON: {err}", "fix the syntax, or use CSV") from None
        items = data.get("sessions") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise TraceFormatError(f"trace {path}: expected a list of sessions (or {{\"sessions\": [...]}})")
        for i, s in enumerate(items):
            turns = s.get("turns") if isinstance(s, dict) else None
            if not isinstance(turns, list) or not turns:
                raise TraceFormatError(f"trace {path}: session {i} has no 'turns' list")
            name = str(s.get("name", f"session-{i}"))
            sessions.append(Session(name, tuple(_turn(t if isinstance(t, dict) else {}, f"trace {path}, session "
                                                      f"{name}, turn {j}") for j, t in enumerate(turns))))
    if not sessions:
        raise TraceFormatError(f"trace {path} holds no sessions")
    return sessions


# ---- disaggregated serving ----------------------------------------------------------------------------
def disaggregate(cfg: ModelConfig, single: Hardware, prefill_hw: Hardware, decode_hw: Hardware,
                 trace: list[Session] | tuple[Session, ...] = DEFAULT_TRACE, *, link: Link | None = None,
                 batch: int = 1, weight_bits: float = 16, act_bits: int = 16, kv_bits: int | None = None,
                 attention: str = "unfused", reserve: float = DEFAULT_RESERVE) -> dict:
    """One chip doing both phases, against prefill on ``prefill_hw`` and decode on ``decode_hw`` with the
    prompt's KV cache moved over ``link`` (Splitwise; DistServe). Per turn of P prompt and R reply tokens:

    * prefill: the roofline time of a P-token prefill (the whole prompt; no prefix cache); it makes
      the first token, so TTFT = prefill time (on the prefill chip, as in Splitwise);
    * KV transfer (disaggregated only): P x KV bytes per token (2 x n_layers x n_kv_heads x head_dim x
      KV bits / 8) over the link: latency + bytes / bandwidth, after the prefill (not overlapped with
      it: an upper bound; Splitwise overlaps it layer by layer);
    * decode: R - 1 steps, each timed at the turn's middle context (P + R/2) with ``batch`` sequences
      per step (TPOT = that step time; a sequence's share of the chip is 1/batch);
    * latency = TTFT + KV transfer + (R - 1) x TPOT; session wall time = sum of latency + think time;
    * throughput with many sessions in flight: reply tokens / busy time of the busiest chip (one chip:
      prefill + decode shares; disaggregated: the two chips work on different sessions at once);
    * energy: busy W x each chip's busy time; "with idle" adds idle W x the rest of the session's wall
      time for each chip dedicated to the session (unknown idle = 0).
    """
    kv_bits = act_bits if kv_bits is None else kv_bits
    validate_bits(weight_bits, act_bits, kv_bits)
    _positive_int("--batch", batch)
    if not trace:
        raise InvalidParameterError("the session trace is empty", "give at least one session with one turn")
    if link is None:
        raise PlanError("disaggregated serving moves the KV cache between chips, and no link was given",
                        "pass --link-gbps and --link-latency-us, or use a prefill chip with a link figure")
    kv_per_token = cfg.kv_bytes_per_token(kv_bits / 8)
    weights = cfg.n_parameters(include_embeddings=True) * weight_bits / 8
    longest = max(t.prompt_tokens + t.reply_tokens for s in trace for t in s.turns)
    longest_prompt = max(t.prompt_tokens for s in trace for t in s.turns)
    if longest > cfg.context_length:
        raise PlanError(f"a turn of the trace needs {longest} tokens of context, more than {cfg.name}'s window "
                        f"({cfg.context_length})", "shorten the trace's prompts or replies")
    for hw, tokens, what in ((single, longest * batch, "one chip (both phases)"),
                             (prefill_hw, longest_prompt, "the prefill chip"),
                             (decode_hw, longest * batch, "the decode chip")):
        need = weights + tokens * kv_per_token
        if need > hw.memory_bytes * (1 - reserve):
            raise PlanError(f"{cfg.name} does not fit {what}, {hw.name}: weights {format_bytes(weights)} + KV of "
                            f"{tokens} tokens {format_bytes(tokens * kv_per_token)} > "
                            f"{format_bytes(hw.memory_bytes * (1 - reserve))} usable",
                            "choose a chip with more memory, lower --weight-bits / --kv-bits, or plan a split "
                            "across chips with --chips")
    cache: dict = {}

    def t(hw: Hardware, phase: str, n: int) -> float:
        key = (id(hw), phase, n)
        if key not in cache:
            b = 1 if phase == "prefill" else batch
            cache[key] = analyze(cfg, hw, phase, b, n, weight_bits, act_bits, kv_bits, attention).time_s
        return cache[key]

    def run(pre_hw: Hardware, dec_hw: Hardware, moved: bool) -> dict:
        sessions, tot = [], {"prompt": 0, "reply": 0, "pre_busy": 0.0, "dec_busy": 0.0, "kv_s": 0.0,
                             "e_pre": 0.0, "e_dec": 0.0, "e_idle": 0.0, "wall": 0.0, "known": True}
        for s in trace:
            turns, wall, pre_busy, dec_busy, kv_total = [], 0.0, 0.0, 0.0, 0.0
            for turn in s.turns:
                P, R = turn.prompt_tokens, turn.reply_tokens
                ttft = t(pre_hw, "prefill", P)
                tpot = t(dec_hw, "decode", P + R // 2)
                kv_s = link.time(P * kv_per_token) if moved else 0.0
                latency = ttft + kv_s + (R - 1) * tpot
                turns.append({"prompt_tokens": P, "reply_tokens": R, "think_s": turn.think_s, "ttft_s": ttft,
                              "kv_transfer_s": kv_s, "kv_bytes": P * kv_per_token if moved else 0.0,
                              "tpot_s": tpot, "latency_s": latency})
                wall += latency + turn.think_s
                pre_busy += ttft
                dec_busy += (R - 1) * tpot / batch
                kv_total += kv_s
            if moved:
                e_pre = energy_joules(pre_busy, pre_busy, pre_hw)
                e_dec = energy_joules(dec_busy, dec_busy, dec_hw)
                idle = [energy_joules(0.0, wall - pre_busy, pre_hw), energy_joules(0.0, wall - dec_busy, dec_hw)]
            else:
                e_pre = energy_joules(pre_busy, pre_busy, pre_hw)
                e_dec = energy_joules(dec_busy, dec_busy, pre_hw)
                idle = [energy_joules(0.0, wall - pre_busy - dec_busy, pre_hw)]
            known = e_pre is not None and e_dec is not None and None not in idle
            e_idle = sum(idle) if known else None
            n_prompt = sum(x["prompt_tokens"] for x in turns)
            n_reply = sum(x["reply_tokens"] for x in turns)
            sessions.append({
                "name": s.name, "turns": turns, "wall_s": wall,
                "mean_ttft_s": sum(x["ttft_s"] for x in turns) / len(turns),
                "mean_tpot_s": sum(x["tpot_s"] * (x["reply_tokens"] - 1) for x in turns)
                / max(sum(x["reply_tokens"] - 1 for x in turns), 1),
                "mean_latency_s": sum(x["latency_s"] for x in turns) / len(turns),
                "kv_transfer_s": kv_total,
                "energy_J": None if not known else {"prefill": e_pre, "decode": e_dec, "idle": e_idle,
                                                    "total": e_pre + e_dec + e_idle},
            })
            tot["prompt"] += n_prompt
            tot["reply"] += n_reply
            tot["pre_busy"] += pre_busy
            tot["dec_busy"] += dec_busy
            tot["kv_s"] += kv_total
            tot["wall"] += wall
            if known:
                tot["e_pre"] += e_pre
                tot["e_dec"] += e_dec
                tot["e_idle"] += e_idle
            tot["known"] &= known
        busiest = max(tot["pre_busy"], tot["dec_busy"]) if moved else tot["pre_busy"] + tot["dec_busy"]
        chips = 2 if moved else 1
        summary = {
            "prefill_hardware": pre_hw.name, "decode_hardware": dec_hw.name, "chips": chips,
            "sessions": sessions,
            "reply_tokens_per_s": tot["reply"] / busiest,
            "reply_tokens_per_s_per_chip": tot["reply"] / busiest / chips,
            "mean_ttft_s": sum(x["mean_ttft_s"] for x in sessions) / len(sessions),
            "mean_tpot_s": sum(x["mean_tpot_s"] for x in sessions) / len(sessions),
            "kv_transfer_s_total": tot["kv_s"],
            "joules_per_prompt_token": tot["e_pre"] / tot["prompt"] if tot["known"] else None,
            "joules_per_reply_token": tot["e_dec"] / tot["reply"] if tot["known"] else None,
            "joules_per_reply_token_all_phases": ((tot["e_pre"] + tot["e_dec"] + tot["e_idle"]) / tot["reply"]
                                                 if tot["known"] else None),
        }
        return summary

    return {
        "model": cfg.name, "batch": batch, "weight_bits": weight_bits, "act_bits": act_bits, "kv_bits": kv_bits,
        "kv_bytes_per_token": kv_per_token, "link": link.to_dict(),
        # with an unknown idle power the idle share counts as 0: the "with idle" figures are lower bounds
        "idle_power_known": all(h.idle_power_W is not None for h in (single, prefill_hw, decode_hw)),
        "trace": [{"name": s.name, "turns": [vars(x) for x in s.turns]} for s in trace],
        "one_chip": run(single, single, False),
        "disaggregated": run(prefill_hw, decode_hw, True),
        "conventions": [
            "prefill processes each turn's whole prompt (no prefix cache); its time is the TTFT",
            "KV moved after the prefill: P x kv_bytes_per_token over the link (latency + bytes / bandwidth), "
            "not overlapped",
            "decode: R - 1 steps timed at context P + R/2, batch sequences per step",
            "throughput: reply tokens / busy time of the busiest chip, sessions in flight on both chips",
            "energy: busy W x busy time; with idle: + idle W x the rest of each session (unknown idle = 0)",
        ],
    }


def format_disaggregation(d: dict) -> str:
    one, dis = d["one_chip"], d["disaggregated"]
    link = d["link"]
    lines = [
        f"Disaggregated serving what-if: {d['model']}, W{_g(d['weight_bits'])}A{_g(d['act_bits'])}"
        f"KV{_g(d['kv_bits'])}, decode batch {d['batch']}",
        f"one chip: {one['prefill_hardware']}  ·  prefill on {dis['prefill_hardware']}, decode on "
        f"{dis['decode_hardware']}",
        f"KV moved: {format_bytes(d['kv_bytes_per_token'])} per prompt token over "
        f"{link['bandwidth_bytes_per_s'] / 1e9:,.3g} GB/s, {link['latency_s'] * 1e6:g} us ({link['source']})",
        "",
        f"{'session':<14}{'setup':<16}{'TTFT':>10}{'KV move':>10}{'TPOT':>10}{'latency':>10}{'wall':>9}"
        f"{'J prefill':>11}{'J decode':>10}{'J idle':>9}",
    ]
    for a, b in zip(one["sessions"], dis["sessions"]):
        for label, s in (("one chip", a), ("disaggregated", b)):
            e = s["energy_J"]
            idle = "unknown" if not d["idle_power_known"] else None
            lines.append(f"{(s['name'] if label == 'one chip' else ''):<14}{label:<16}"
                         f"{format_time(s['mean_ttft_s']):>10}{format_time(s['kv_transfer_s']) if s['kv_transfer_s'] else '-':>10}"
                         f"{format_time(s['mean_tpot_s']):>10}{format_time(s['mean_latency_s']):>10}"
                         f"{s['wall_s']:>8.1f}s"
                         + ("" if e is None else f"{e['prefill']:>11.3g}{e['decode']:>10.3g}"
                                                 f"{idle or format(e['idle'], '.3g'):>9}"))
    lines += ["", f"{'setup':<16}{'reply tok/s':>12}{'per chip':>10}{'mean TTFT':>11}{'mean TPOT':>11}"
                  f"{'J/prompt tok':>14}{'J/reply tok':>13}{'J all / reply tok':>20}"]
    for label, s in (("one chip", one), ("disaggregated", dis)):
        lines.append(f"{label:<16}{s['reply_tokens_per_s']:>12.1f}{s['reply_tokens_per_s_per_chip']:>10.1f}"
                     f"{format_time(s['mean_ttft_s']):>11}{format_time(s['mean_tpot_s']):>11}"
                     f"{_j(s['joules_per_prompt_token']):>14}{_j(s['joules_per_reply_token']):>13}"
                     f"{_j(s['joules_per_reply_token_all_phases']):>20}")
    lines += ["", "latency = TTFT + KV move + (reply - 1) x TPOT, per turn (means); wall = the session with its "
                  "think times; J per session by phase (idle: think time and waiting, at idle power)",
              "model: " + "; ".join(d["conventions"])]
    return "\n".join(lines)
