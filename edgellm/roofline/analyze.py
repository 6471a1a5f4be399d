"""The roofline of a model on a chip: per-layer figures, totals, the memory planner, the crossover,
and measured per-layer times next to the predicted ones (:func:`compare`).

``analyze(cfg, hw, phase, ...)`` places every layer of :mod:`edgellm.roofline.layers` under the
roofline of a :class:`~edgellm.roofline.hardware.Hardware`: attainable ops/s = min(peak,
intensity × bandwidth), time = max(ops / peak, bytes / bandwidth), bound = whichever term wins.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Mapping

from edgellm.config import ModelConfig
from edgellm.errors import InvalidParameterError
from edgellm.roofline.hardware import Hardware
from edgellm.roofline.layers import (
    ATTENTION_CORE,
    CONVENTIONS,
    LINEAR_LAYERS,
    Bits,
    LayerCost,
    active_experts,
    model_layers,
    validate_bits,
)
from edgellm.roofline.measure import MeasuredRates
from edgellm.roofline.recurrent import (
    RECURRENT_CORE,
    RECURRENT_LINEARS,
    is_recurrent,
    recurrent_model_layers,
    state_bytes,
)

PLAN_BITS = (32, 16, 8, 4)
DEFAULT_RESERVE = 0.10     # share of memory the planner keeps for activations, runtime and fragmentation


@dataclass(frozen=True)
class LayerResult:
    """A layer under the roofline. ``ops``/``memory_bytes``/``time_s`` are for the whole model
    (``count`` instances); ``per_block`` gives one instance."""

    cost: LayerCost
    peak_ops_per_s: float
    precision: str
    bandwidth: float

    @property
    def name(self) -> str:
        return self.cost.name

    @property
    def count(self) -> int:
        return self.cost.count

    @property
    def ops(self) -> float:
        return self.cost.ops * self.count

    @property
    def memory_bytes(self) -> float:
        return self.cost.memory_bytes * self.count

    @property
    def arithmetic_intensity(self) -> float:
        return self.cost.arithmetic_intensity

    @property
    def attainable_ops_per_s(self) -> float:
        return min(self.peak_ops_per_s, self.arithmetic_intensity * self.bandwidth)

    @property
    def compute_time_s(self) -> float:
        return self.cost.ops / self.peak_ops_per_s

    @property
    def memory_time_s(self) -> float:
        return self.cost.memory_bytes / self.bandwidth

    @property
    def bound(self) -> str:
        return "compute" if self.compute_time_s > self.memory_time_s else "memory"

    @property
    def time_per_block_s(self) -> float:
        return max(self.compute_time_s, self.memory_time_s)

    @property
    def time_s(self) -> float:
        return self.time_per_block_s * self.count

    def to_dict(self) -> dict:
        c = self.cost
        return {
            "name": self.name, "ops": self.ops, "memory_bytes": self.memory_bytes,
            "arithmetic_intensity": self.arithmetic_intensity, "attainable_ops_per_s": self.attainable_ops_per_s,
            "bound": self.bound, "time_s": self.time_s,
            "count": self.count, "kind": c.kind, "precision": self.precision,
            "bytes": {"weights": c.load_weight * self.count, "act_in": c.load_act * self.count,
                      "act_out": c.store_act * self.count, "kv_read": c.load_kv * self.count,
                      "kv_written": c.store_kv * self.count},
            "per_block": {"ops": c.ops, "memory_bytes": c.memory_bytes, "time_s": self.time_per_block_s},
        }


@dataclass
class Analysis:
    model: ModelConfig
    hardware: Hardware
    phase: str
    batch: int
    seq_len: int
    bits: Bits
    attention: str
    layers: list[LayerResult]
    notes: list[str] = field(default_factory=list)

    # ---- totals ------------------------------------------------------------------------------
    @property
    def time_s(self) -> float:
        return sum(layer.time_s for layer in self.layers)

    @property
    def ops(self) -> float:
        return sum(layer.ops for layer in self.layers)

    @property
    def memory_bytes(self) -> float:
        return sum(layer.memory_bytes for layer in self.layers)

    @property
    def weight_bytes(self) -> float:
        """Bytes of the model's weights stored at the weight bits (embeddings once if tied)."""
        if is_recurrent(self.model):   # ModelConfig's count is a transformer's: sum the layers' own
            return sum(x.cost.params * x.cost.count for x in self.layers) * self.bits.weight / 8
        return self.model.n_parameters(include_embeddings=True) * self.bits.weight / 8

    @property
    def context_tokens(self) -> int:
        """Tokens in the KV cache after this step, per sequence."""
        return self.seq_len if self.phase == "prefill" else self.seq_len + 1

    @property
    def kv_cache_bytes(self) -> float:
        if is_recurrent(self.model):   # one fixed-size state per sequence, whatever the context
            return self.batch * state_bytes(self.model, self.bits.kv)
        # sliding-window layers (Gemma 3, Mistral) hold their window only (edgellm.kv.cache.KVLayout)
        return self.batch * self.model.kv_bytes(self.context_tokens, self.bits.kv / 8)

    def group_time(self, names) -> float:
        return sum(layer.time_s for layer in self.layers if layer.name in names)

    def parameter_counts(self) -> dict:
        """Parameters stored and parameters this step reads: they differ for a mixture of experts,
        whose sparse layers read only the (expected, uniform routing) distinct chosen experts."""
        cfg = self.model
        out = {"total_parameters": cfg.n_parameters(include_embeddings=True)}
        if cfg.experts is None:
            out["active_parameters"] = out["total_parameters"]
            return out
        experts = active_experts(cfg, self.phase, self.batch, self.seq_len)
        out["active_parameters"] = cfg.n_active_parameters(include_embeddings=True, experts=experts)
        out["active_experts_per_layer"] = experts
        out["experts_per_layer"] = cfg.experts.n_experts
        return out

    def totals(self) -> dict:
        t = self.time_s
        memory_bound = sum(layer.time_s for layer in self.layers if layer.bound == "memory")
        out = {
            "ops": self.ops, "memory_bytes": self.memory_bytes, "time_s": t,
            "arithmetic_intensity": self.ops / self.memory_bytes if self.memory_bytes else 0.0,
            "weight_bytes": self.weight_bytes, "kv_cache_bytes": self.kv_cache_bytes,
            "kv_bytes_per_token": 0.0 if is_recurrent(self.model) else self.model.kv_bytes_per_token(self.bits.kv / 8),
            "memory_bound_time_fraction": memory_bound / t if t else 0.0,
            "linear_time_s": self.group_time(LINEAR_LAYERS),
            "attention_time_s": self.group_time(ATTENTION_CORE),
        }
        out.update(self.parameter_counts())
        if self.phase == "prefill":
            out["time_to_first_token_s"] = t
            out["prefill_tokens_per_s"] = self.batch * self.seq_len / t
        else:
            out["time_per_token_s"] = t
            out["tokens_per_s"] = self.batch / t                  # all sequences of the batch together
            out["tokens_per_s_per_sequence"] = 1.0 / t
        if self.hardware.power_W is not None:
            # Energy model: the chip draws its busy power for the whole roofline time (an upper bound
            # for a memory-bound phase); joules per token = busy W x time / tokens of this step.
            tokens = self.batch * (self.seq_len if self.phase == "prefill" else 1)
            out["power_W"] = self.hardware.power_W
            out["energy_J"] = self.hardware.power_W * t
            out["joules_per_token"] = self.hardware.power_W * t / tokens
        return out

    def to_dict(self) -> dict:
        hw = self.hardware
        return {
            "model": self.model.name, "hardware": hw.name, "phase": self.phase,
            "batch": self.batch, "seq_len": self.seq_len,
            "weight_bits": self.bits.weight, "act_bits": self.bits.act, "kv_bits": self.bits.kv,
            "attention": self.attention,
            "layer_figures": "whole model: per-block figures x count (n_layers for block layers); "
                             "'per_block' holds one instance",
            "layers": [layer.to_dict() for layer in self.layers],
            "totals": self.totals(),
            "hardware_info": {"peak_ops_per_s": dict(hw.peak_ops), "bandwidth_bytes_per_s": hw.bandwidth,
                              "memory_bytes": hw.memory_bytes, "source": hw.source},
            "model_info": {k: v for k, v in self.model.to_dict().items() if k != "rope_scaling"},
            "conventions": list(CONVENTIONS),
            "notes": list(self.notes),
        }


def analyze(cfg: ModelConfig, hw: Hardware, phase: str = "decode", batch: int = 1, seq_len: int = 512,
            weight_bits: float = 16, act_bits: int = 16, kv_bits: int | None = None,
            attention: str = "unfused", weight_bytes: Mapping[str, float] | None = None) -> Analysis:
    """``weight_bytes`` (optional) maps layer names to the bytes per weight element of a real model's
    storage formats, overriding ``weight_bits`` for those layers (see ``layers.block_layers``)."""
    kv_bits = act_bits if kv_bits is None else kv_bits
    bits = Bits(weight_bits, act_bits, kv_bits)
    if is_recurrent(cfg):       # Mamba, RWKV: a state instead of attention, flat in the context
        costs = recurrent_model_layers(cfg, phase, batch, seq_len, bits, weight_bytes)
    else:
        costs = model_layers(cfg, phase, batch, seq_len, bits, attention, weight_bytes)
    results = []
    notes = []
    fallbacks = set()
    for cost in costs:
        precision, peak = hw.compute_precision(cost.compute_bits)
        if cost.kind in ("linear", "attention") and not _precision_matches(precision, cost.compute_bits):
            fallbacks.add((cost.compute_bits, precision))
        results.append(LayerResult(cost, peak, precision, hw.bandwidth))
    for wanted, used in sorted(fallbacks):
        notes.append(f"{hw.name} lists no {wanted}-bit peak: those matmuls run at its {used} peak")
    ctx = seq_len if phase == "prefill" else seq_len + 1
    if ctx > cfg.context_length:
        notes.append(f"{ctx} tokens exceed the model's context window ({cfg.context_length})")
    gguf_bits = cfg.extra.get("gguf_bits_per_weight") if cfg.extra else None
    if gguf_bits and abs(gguf_bits - bits.weight) > 0.5:
        notes.append(f"the GGUF file stores {gguf_bits:.2f} bits per weight on average "
                     f"(analysed at --weight-bits {bits.weight:g})")
    return Analysis(cfg, hw, phase, batch, seq_len, bits, attention, results, notes)


def _precision_matches(precision: str, bits: int) -> bool:
    return {"fp32": 32, "tf32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4}[precision] == bits


# ---- crossover ------------------------------------------------------------------------------------
def crossover_context(cfg: ModelConfig, hw: Hardware, phase: str, batch: int = 1, weight_bits: float = 16,
                      act_bits: int = 16, kv_bits: int | None = None, attention: str = "unfused",
                      metric: str = "time", limit: int = 1 << 24) -> int | None:
    """Smallest context (prompt length for prefill, cached tokens for decode) at which the attention
    core (qk_matmul + softmax + sv_matmul, or fused_attention) costs at least as much as the block's
    linear layers (q, k, v, o, gate, up, down; a mixture of experts' router and experts), by ``metric`` = "time" on ``hw`` or "ops".
    None if not reached below ``limit``."""
    if metric not in ("time", "ops"):
        raise InvalidParameterError(f"metric must be 'time' or 'ops', got {metric!r}")

    if is_recurrent(cfg):
        raise InvalidParameterError(
            f"{cfg.name} is a recurrent model: it has no attention whose cost could cross its linear layers'",
            "compare it with an attention model instead: --crossover --against MODEL")

    def attention_wins(n: int) -> bool:
        a = analyze(cfg, hw, phase, batch, n, weight_bits, act_bits, kv_bits, attention)
        if metric == "time":
            return a.group_time(ATTENTION_CORE) >= a.group_time(LINEAR_LAYERS)
        att = sum(x.ops for x in a.layers if x.name in ATTENTION_CORE)
        lin = sum(x.ops for x in a.layers if x.name in LINEAR_LAYERS)
        return att >= lin

    return _first_context(attention_wins, phase, limit)


def crossover_versus(recurrent: ModelConfig, other: ModelConfig, hw: Hardware, phase: str, batch: int = 1,
                     weight_bits: float = 16, act_bits: int = 16, kv_bits: int | None = None,
                     attention: str = "unfused", metric: str = "time", limit: int = 1 << 24) -> int | None:
    """Smallest context (prefill: prompt length; decode: tokens already held) at which the attention
    model ``other``'s whole step costs at least as much as the recurrent model's, by ``metric``:
    the recurrent decode step is flat in the context, the attention one grows with its KV cache.
    None if not reached below ``limit``."""
    if metric not in ("time", "ops"):
        raise InvalidParameterError(f"metric must be 'time' or 'ops', got {metric!r}")

    def cost(cfg: ModelConfig, n: int) -> float:
        a = analyze(cfg, hw, phase, batch, n, weight_bits, act_bits, kv_bits, attention)
        return a.time_s if metric == "time" else a.ops

    return _first_context(lambda n: cost(other, n) >= cost(recurrent, n), phase, limit)


def _first_context(wins, phase: str, limit: int) -> int | None:
    """The smallest context n (from 1 in prefill, 0 in decode) with ``wins(n)``, by doubling then
    bisection (``wins`` turns true once and stays so); None if not below ``limit``."""
    lo = 1 if phase == "prefill" else 0
    if wins(lo):
        return lo
    hi = max(lo + 1, 16)
    while not wins(hi):
        lo = hi
        hi *= 2
        if hi > limit:
            return None
    while hi - lo > 1:                # wins(lo) is False, wins(hi) is True
        mid = (lo + hi) // 2
        if wins(mid):
            hi = mid
        else:
            lo = mid
    return hi


def crossover_table(cfg: ModelConfig, hw: Hardware, batch: int = 1, weight_bits: float = 16, act_bits: int = 16,
                    kv_bits: int | None = None) -> list[dict]:
    rows = []
    for phase in ("prefill", "decode"):
        for attention in ("unfused", "fused"):
            row = {"phase": phase, "attention": attention}
            for metric in ("time", "ops"):
                row[f"by_{metric}"] = crossover_context(cfg, hw, phase, batch, weight_bits, act_bits, kv_bits,
                                                        attention, metric)
            rows.append(row)
    return rows


def crossover_versus_table(recurrent: ModelConfig, other: ModelConfig, hw: Hardware, batch: int = 1,
                           weight_bits: float = 16, act_bits: int = 16, kv_bits: int | None = None) -> list[dict]:
    rows = []
    for phase in ("prefill", "decode"):
        for attention in ("unfused", "fused"):
            row = {"phase": phase, "attention": attention}
            for metric in ("time", "ops"):
                row[f"by_{metric}"] = crossover_versus(recurrent, other, hw, phase, batch, weight_bits, act_bits,
                                                       kv_bits, attention, metric)
            rows.append(row)
    return rows


def format_crossover_versus(recurrent: ModelConfig, other: ModelConfig, hw: Hardware, rows: list[dict],
                            batch: int) -> str:
    lines = [f"Context at which {other.name}'s step (attention: its cost grows with the context) costs as much as "
             f"{recurrent.name}'s (recurrent: its decode step is flat in the context)",
             f"hardware {hw.name} · batch {batch}", "(prefill: prompt length; decode: tokens already held)", "",
             f"{'phase':<9}{'attention':<11}{'by time on this hardware':>26}{'by ops':>12}"]
    for r in rows:
        t = "never" if r["by_time"] is None else f"{r['by_time']:,}"
        o = "never" if r["by_ops"] is None else f"{r['by_ops']:,}"
        lines.append(f"{r['phase']:<9}{r['attention']:<11}{t:>26}{o:>12}")
    return "\n".join(lines)


def format_crossover(cfg: ModelConfig, hw: Hardware, rows: list[dict], batch: int) -> str:
    lines = ["Context at which attention (qk_matmul + softmax + sv_matmul, or fused) costs as much as the "
             "block's linear layers", f"model {cfg.name} · hardware {hw.name} · batch {batch}",
             "(prefill: prompt length; decode: tokens already in the KV cache)", "",
             f"{'phase':<9}{'attention':<11}{'by time on this hardware':>26}{'by ops':>12}"]
    for r in rows:
        t = "never" if r["by_time"] is None else f"{r['by_time']:,}"
        o = "never" if r["by_ops"] is None else f"{r['by_ops']:,}"
        lines.append(f"{r['phase']:<9}{r['attention']:<11}{t:>26}{o:>12}")
    return "\n".join(lines)


# ---- memory planner ------------------------------------------------------------------------------
def plan_memory(cfg: ModelConfig, hw: Hardware, weight_bits: float = 16, kv_bits: int = 16, batch: int = 1,
                seq_len: int | None = None, reserve: float = DEFAULT_RESERVE) -> dict:
    """Weights and KV bytes per token at each precision, and the batch x context that fits ``hw``."""
    validate_bits(weight_bits, 16, kv_bits)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InvalidParameterError(f"batch must be a positive integer, got {batch!r}")
    if not 0 <= reserve < 1:
        raise InvalidParameterError(f"reserve must be a fraction in [0, 1), got {reserve!r}")
    n_params = cfg.n_parameters(include_embeddings=True)
    usable = hw.memory_bytes * (1 - reserve)
    ctx_max = cfg.context_length

    def fit(wbits: float, kbits: float) -> dict:
        weights = n_params * wbits / 8
        per_token = cfg.kv_bytes_per_token(kbits / 8)
        free = usable - weights
        tokens = int(free // per_token) if free > 0 else 0
        return {"weight_bits": wbits, "kv_bits": kbits, "weight_bytes": weights, "kv_bytes_per_token": per_token,
                "fits_weights": free > 0, "max_kv_tokens": tokens,
                "max_context_at_batch": min(tokens // batch, ctx_max),
                "max_batch_at_full_context": tokens // ctx_max}

    chosen = fit(weight_bits, kv_bits)
    contexts = sorted({c for c in (512, 2048, 4096, 8192, 32768, 131072, ctx_max) if c <= ctx_max})
    if seq_len:
        contexts = sorted(set(contexts) | {seq_len})
    max_batch = {c: chosen["max_kv_tokens"] // c for c in contexts}
    return {
        "model": cfg.name, "hardware": hw.name, "memory_bytes": hw.memory_bytes, "reserve_fraction": reserve,
        "usable_bytes": usable, "n_parameters": n_params, "model_context_length": ctx_max, "batch": batch,
        "weights_by_bits": {f"{b:g}": n_params * b / 8 for b in PLAN_BITS},
        "kv_bytes_per_token_by_bits": {f"{b:g}": cfg.kv_bytes_per_token(b / 8) for b in PLAN_BITS},
        "chosen": chosen,
        "max_batch_by_context": {str(c): b for c, b in max_batch.items()},
        "grid": [fit(w, k) for w in PLAN_BITS for k in PLAN_BITS if k <= 16 or w == 32],
        "conventions": [
            f"usable memory = capacity x (1 - {reserve:g}) kept for activations, runtime and fragmentation",
            "weights: all parameters (embeddings once when tied) at the weight bits; quantization scales excluded",
            "KV cache per token = 2 (K and V) x n_layers x n_kv_heads x head_dim x kv bits / 8",
            "max context is capped at the model's context window",
        ],
    }


def format_plan(plan: dict) -> str:
    c = plan["chosen"]
    lines = [
        f"Memory plan: {plan['model']} ({plan['n_parameters'] / 1e9:.2f} B parameters) on {plan['hardware']} "
        f"({format_bytes(plan['memory_bytes'])}, {format_bytes(plan['usable_bytes'])} usable after a "
        f"{plan['reserve_fraction']:.0%} reserve)", "",
        f"{'bits':>6}{'weights':>12}{'KV / token':>13}{'KV / 1k tokens':>16}",
    ]
    for b in PLAN_BITS:
        w = plan["weights_by_bits"][f"{b:g}"]
        kv = plan["kv_bytes_per_token_by_bits"][f"{b:g}"]
        lines.append(f"{b:>6g}{format_bytes(w):>12}{format_bytes(kv):>13}{format_bytes(kv * 1000):>16}")
    lines += ["", f"At {c['weight_bits']:g}-bit weights and {c['kv_bits']:g}-bit KV:"]
    if not c["fits_weights"]:
        lines.append(f"  the weights ({format_bytes(c['weight_bytes'])}) do not fit: nothing is left for the KV cache")
    else:
        lines += [
            f"  KV cache room: {c['max_kv_tokens']:,} tokens (batch x context)",
            f"  longest context at batch {plan['batch']}: {c['max_context_at_batch']:,} tokens"
            f" (model window {plan['model_context_length']:,})",
            "  largest batch by context: " + ", ".join(f"{int(k):,} -> {v:,}"
                                                      for k, v in plan["max_batch_by_context"].items()),
        ]
    lines += ["", "KV-cache tokens that fit (batch x context), by weight bits (rows) and KV bits (columns):",
              f"{'w / kv':>8}" + "".join(f"{k:>12g}" for k in PLAN_BITS if k <= 16)]
    for w in PLAN_BITS:
        cells = [g for g in plan["grid"] if g["weight_bits"] == w and g["kv_bits"] <= 16]
        lines.append(f"{w:>8g}" + "".join(f"{_tokens(g):>12}" for g in cells))
    lines += ["", "conventions: " + "; ".join(plan["conventions"])]
    return "\n".join(lines)


def _tokens(g: dict) -> str:
    return f"{g['max_kv_tokens']:,}" if g["fits_weights"] else "-"


# ---- formatting -----------------------------------------------------------------------------------
def format_si(x: float, unit: str = "", digits: int = 3) -> str:
    if x == 0:
        return f"0 {unit}".rstrip()
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
        if abs(x) >= factor:
            return f"{x / factor:.{digits}g} {prefix}{unit}".rstrip()
    return f"{x:.{digits}g} {unit}".rstrip()


def format_bytes(x: float) -> str:
    for factor, prefix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= factor:
            v = x / factor
            return f"{v:.0f} {prefix}" if abs(v) >= 100 else f"{v:.3g} {prefix}"
    return f"{x:.0f} B"


def format_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def format_table(a: Analysis, per_block: bool = False) -> str:
    hw, cfg, b = a.hardware, a.model, a.bits
    seq_what = "prompt tokens" if a.phase == "prefill" else "tokens in KV cache"
    lines = [
        f"Roofline: {cfg.name} on {hw.name} — {a.phase}, batch {a.batch}, {a.seq_len} {seq_what}, "
        f"W{b.weight:g}A{b.act:g}KV{b.kv:g}, {a.attention} attention",
        f"hardware: {hw.bandwidth / 1e9:,.1f} GB/s, peaks " +
        ", ".join(f"{k} {v / 1e12:,.3g} TOPS" for k, v in hw.peak_ops.items()) + f" — source: {hw.source}",
        ("figures per block (one instance of each layer)" if per_block else
         "figures for the whole model (block layers: per block x count 'x')"),
        "",
    ]
    head = (f"{'layer':<16}{'x':>4}{'ops':>11}{'bytes':>11}{'ops/B':>9}{'attainable':>13}{'bound':>9}"
            f"{'time':>11}{'share':>7}")
    lines += [head, "-" * len(head)]
    total = a.time_s
    for layer in a.layers:
        ops = layer.cost.ops if per_block else layer.ops
        mem = layer.cost.memory_bytes if per_block else layer.memory_bytes
        t = layer.time_per_block_s if per_block else layer.time_s
        lines.append(f"{layer.name:<16}{layer.count:>4}{format_si(ops):>11}{format_bytes(mem):>11}"
                     f"{layer.arithmetic_intensity:>9.3g}{format_si(layer.attainable_ops_per_s, 'op/s'):>13}"
                     f"{layer.bound:>9}{format_time(t):>11}{layer.time_s / total:>7.1%}")
    tot = a.totals()
    lines += ["-" * len(head),
              f"{'model total':<16}{'':>4}{format_si(a.ops):>11}{format_bytes(a.memory_bytes):>11}{tot['arithmetic_intensity']:>9.3g}"
              f"{'':>13}{'':>9}{format_time(total):>11}", ""]
    if a.phase == "prefill":
        lines.append(f"prefill (time to first token): {format_time(total)}  ·  {tot['prefill_tokens_per_s']:,.1f} "
                     f"prompt tokens/s")
    else:
        lines.append(f"decode: {format_time(total)} per step  ·  {tot['tokens_per_s']:,.2f} tokens/s"
                     + (f" ({tot['tokens_per_s_per_sequence']:,.2f} per sequence)" if a.batch > 1 else ""))
    if is_recurrent(a.model):      # a fixed-size state per sequence, no attention
        lines.append(f"weights {format_bytes(a.weight_bytes)} · recurrent state {format_bytes(a.kv_cache_bytes)} "
                     f"({a.batch} x a fixed-size state, whatever the context) · "
                     f"{tot['memory_bound_time_fraction']:.0%} of the time in memory-bound layers")
        lines.append(f"state layers {format_time(a.group_time(RECURRENT_CORE))} vs linear layers "
                     f"{format_time(a.group_time(RECURRENT_LINEARS))} (per token: flat in the context)")
    else:
        lines.append(f"weights {format_bytes(a.weight_bytes)} · KV cache {format_bytes(a.kv_cache_bytes)} "
                     f"({a.batch} x {a.context_tokens} tokens, {format_bytes(tot['kv_bytes_per_token'])}/token) · "
                     f"{tot['memory_bound_time_fraction']:.0%} of the time in memory-bound layers")
        lines.append(f"attention core {format_time(tot['attention_time_s'])} vs linear layers "
                     f"{format_time(tot['linear_time_s'])}")
    if "active_experts_per_layer" in tot:
        lines.append(f"mixture of experts: {tot['active_parameters'] / 1e9:.3g} B of {tot['total_parameters'] / 1e9:.3g} B "
                     f"parameters read this step ({tot['active_experts_per_layer']:.3g} of {tot['experts_per_layer']} "
                     f"experts per sparse layer, {cfg.experts.n_used} per token; uniform routing assumed)")
    if "joules_per_token" in tot:
        lines.append(f"energy at {tot['power_W']:g} W busy: {tot['energy_J']:.3g} J this step, "
                     f"{tot['joules_per_token']:.3g} J per {'prompt ' if a.phase == 'prefill' else ''}token "
                     f"(power: {hw.power_source})")
    for note in a.notes:
        lines.append(f"note: {note}")
    lines += ["", "conventions:"] + [f"  - {c}" for c in CONVENTIONS]
    return "\n".join(lines)


CSV_FIELDS = ("name", "count", "ops", "memory_bytes", "arithmetic_intensity", "attainable_ops_per_s", "bound",
              "time_s", "weights_bytes", "act_in_bytes", "act_out_bytes", "kv_read_bytes", "kv_written_bytes",
              "precision")


def format_csv(a: Analysis) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for layer in a.layers:
        d = layer.to_dict()
        by = d["bytes"]
        w.writerow([d["name"], d["count"], d["ops"], d["memory_bytes"], d["arithmetic_intensity"],
                    d["attainable_ops_per_s"], d["bound"], d["time_s"], by["weights"], by["act_in"], by["act_out"],
                    by["kv_read"], by["kv_written"], d["precision"]])
    w.writerow(["total", "", a.ops, a.memory_bytes, a.ops / a.memory_bytes, "", "", a.time_s, "", "", "", "", "",
                ""])
    return out.getvalue()


def format_json(obj: dict) -> str:
    def clean(x):
        if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=2)


# ---- measured next to predicted -------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison(MeasuredRates):
    name: str
    predicted_s: float
    measured_s: float
    ops: float
    memory_bytes: float
    bound: str
    attainable_ops_per_s: float

    def to_dict(self) -> dict:
        return {"name": self.name, "predicted_s": self.predicted_s, "measured_s": self.measured_s,
                "ops": self.ops, "memory_bytes": self.memory_bytes, "bound": self.bound,
                "achieved_ops_per_s": self.achieved_ops_per_s, "achieved_bytes_per_s": self.achieved_bytes_per_s,
                "roofline_fraction": self.roofline_fraction}


def compare(analysis: Analysis, measured_s: Mapping[str, float]) -> list[Comparison]:
    """Rows for each analysed layer that has a measured time (seconds for the whole model: all blocks).

    ``measured_s`` is keyed by the analysis' layer names (``q_proj``, ``qk_matmul``, ``lm_head``...);
    layers without a measurement are left out, and a name the analysis lacks is an error.
    """
    by_name = {layer.name: layer for layer in analysis.layers}
    unknown = sorted(set(measured_s) - set(by_name))
    if unknown:
        raise InvalidParameterError(f"measured layers not in the analysis: {', '.join(unknown)}",
                                    f"layer names: {', '.join(by_name)}")
    rows = []
    for name, layer in by_name.items():
        if name in measured_s:
            rows.append(Comparison(name=name, predicted_s=layer.time_s, measured_s=float(measured_s[name]),
                                   ops=layer.ops, memory_bytes=layer.memory_bytes, bound=layer.bound,
                                   attainable_ops_per_s=layer.attainable_ops_per_s))
    return rows


def format_comparison(rows: list[Comparison]) -> str:
    head = f"{'layer':<16}{'predicted':>12}{'measured':>12}{'achieved':>14}{'achieved':>12}{'of roofline':>13}"
    unit = f"{'':<16}{'ms':>12}{'ms':>12}{'GOP/s':>14}{'GB/s':>12}{'':>13}"
    lines = [head, unit]
    for r in rows:
        lines.append(f"{r.name:<16}{r.predicted_s * 1e3:>12.3f}{r.measured_s * 1e3:>12.3f}"
                     f"{r.achieved_ops_per_s / 1e9:>14.2f}{r.achieved_bytes_per_s / 1e9:>12.2f}"
                     f"{r.roofline_fraction:>12.0%} ")
    return "\n".join(lines)
