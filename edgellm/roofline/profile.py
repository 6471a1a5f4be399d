"""`edgellm analyze --measure`: the real engine timed op by op on this machine, next to the roofline.

How it measures. The engine's own forward pass runs with a trace on (``edgellm.models.trace``): the
model marks the end of each op it runs (embedding, the norms, the fused q/k/v matrix, RoPE + KV-cache
write, attention, ...), and the trace records each op's time per block. That pass runs through a
``ModelRunner`` held to the per-layer path (``fused_decode=False``): in decode the engine runs every
block in one native call (``decode_blocks``), which cannot be split by layer. Each op type's time is
summed over the blocks of one forward pass; the median over ``repeats`` passes is reported. The
engine's own step (``ModelRunner.run``, no trace) is timed in the same loop, interleaved with the
traced passes; the path it takes is read from one traced call of it.

The prediction is the analyzer's (:func:`edgellm.roofline.analyze.analyze`) with the engine's real
formats: the bytes per weight element of each matrix from its ``Weight.nbytes`` (Q4_1 = 0.625,
Q8_0 = 1.0625, float32 = 4), float32 activations and KV cache, fp32 compute, and attention counted
as the engine runs it (``fused``: PyTorch's flash kernel in prefill, a native kernel in decode)
unless ``attention="unfused"`` is asked for.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgellm.errors import InvalidParameterError, UnsupportedModelError
from edgellm.roofline.measure import MeasuredRates

if TYPE_CHECKING:  # pragma: no cover

    from edgellm.roofline.analyze import Analysis, LayerResult
    from edgellm.roofline.hardware import Hardware

DEFAULT_REPEATS = 5


@dataclass(frozen=True)
class EngineOp:
    """One op type of the engine's forward pass and the analyzer layers it does the work of."""

    name: str
    layers: tuple[str, ...]
    call: str                 # what the engine calls
    per_block: bool = True


# In execution order. Attention's analyzer layers depend on --attention (see _op_layers).
ENGINE_OPS = (
    EngineOp("embedding", ("embedding",), "embed.rows(tokens): the tokens' rows, dequantised", per_block=False),
    EngineOp("attn_norm", ("attn_norm",), "F.rms_norm"),
    EngineOp("qkv_proj", ("q_proj", "k_proj", "v_proj"),
             "qkv.matmul (+ bias): q, k and v are ONE fused matrix in the engine"),
    EngineOp("rope", ("rope",), "RoPE on q and k + K/V cache write in one native call (rope_qkv_write); "
                                "plus the cos/sin table look-up once per forward"),
    EngineOp("attention", ("qk_matmul", "softmax", "sv_matmul"),
             "attention.attend: prefill: PyTorch flash SDPA per sequence (K/V heads repeated for GQA); "
             "decode: native decode_attention"),
    EngineOp("o_proj+attn_add", ("o_proj", "attn_add"), "o.matmul_add: projection and residual add fused"),
    EngineOp("ffn_norm", ("ffn_norm",), "F.rms_norm"),
    EngineOp("gate_up_proj", ("gate_proj", "up_proj"), "gate_up.matmul: gate and up are ONE fused matrix"),
    EngineOp("mlp_act", ("mlp_act",), "silu(gate) * up (native silu_mul)"),
    EngineOp("down_proj+ffn_add", ("down_proj", "ffn_add"), "down.matmul_add: projection and residual add fused"),
    EngineOp("final_norm", ("final_norm",), "the logit rows picked, F.rms_norm", per_block=False),
    EngineOp("lm_head", ("lm_head",), "lm_head.matmul (the embedding matrix when tied)", per_block=False),
)

MEASURE_CONVENTIONS = [
    "measured: the engine's forward pass on its per-layer path with a trace on (the model marks the end of each "
    "op); an op type's time is summed over the blocks of one pass, median of repeats",
    "the engine fuses q/k/v into one matrix, gate/up into one, and each projection with its residual add: such a "
    "row is compared with the SUM of the analyzer's layers it does the work of",
    "predicted: the analyzer with the engine's formats: bytes per weight element from Weight.nbytes "
    "(Q4_1 0.625, Q8_0 1.0625, float32 4), float32 activations and KV cache, fp32 compute peak",
    "roofline_fraction = predicted time / measured time (1.0: the op runs at the roofline); "
    "achieved bytes/s and ops/s = the predicted bytes and ops over the measured time",
    "engine step: ModelRunner.run timed whole, no trace (in decode all blocks run in one native call, so it can "
    "be faster than the sum of the per-op parts); overhead = median over passes of (traced pass time - the sum "
    "of its op scopes): the runner's step inputs and calls outside the scopes",
]

# A paragraph of ordinary English, tokenised and repeated to make prompts of any length.
_PROMPT_TEXT = ("The river ran past the old mill, where the miller kept his accounts in a worn ledger and "
                "counted every sack of grain twice before the carts left for the market in the town. ")


# ---- the engine's forward pass, traced ---------------------------------------------------------------
def traced_runner(model, cache):
    """A runner on the per-layer path with a trace on: the real forward pass, every op of every block
    marked (the fused decode call runs all blocks at once and cannot be split by layer)."""
    from edgellm.models.trace import Trace
    from edgellm.runtime.model_runner import ModelRunner

    return ModelRunner(model, cache, trace=Trace(), fused_decode=False)


def engine_path(runner, chunk) -> str:
    """Which path the engine's runner takes for ``chunk``: one traced call says."""
    from edgellm.models.trace import Trace

    runner.trace = Trace()
    try:
        runner.run([chunk])
    finally:
        trace, runner.trace = runner.trace, None
    if "decode_blocks" in trace.steps[0].totals():
        return "all blocks in one native call (decode_blocks)"
    return "block by block (LlamaModel.block)"


# ---- timing a phase --------------------------------------------------------------------------------
@dataclass
class PhaseTiming:
    phase: str
    seq_len: int
    repeats: int
    op_s: dict[str, float]            # median over repeats of each op type's time in one forward pass
    by_ops_s: float                   # median wall time of the whole traced (per-layer) pass
    between_ops_s: float              # median over passes of (pass time - the sum of its op scopes)
    engine_s: float                   # median wall time of ModelRunner.run
    engine_path: str
    samples: dict[str, list[float]] = field(default_factory=dict)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """``n`` token ids of ordinary text (the paragraph repeated)."""
    piece = tokenizer.encode(_PROMPT_TEXT)
    if not piece:
        raise InvalidParameterError("the model's tokenizer turned the measurement prompt into no tokens")
    return (piece * (n // len(piece) + 1))[:n]


def check_seq_len(cfg, phase: str | None, seq_len: int) -> None:
    from edgellm.roofline.layers import validate_shape

    for p in ([phase] if phase else ["prefill", "decode"]):
        validate_shape(p, 1, seq_len)
    if seq_len + 1 > cfg.context_length:
        raise InvalidParameterError(
            f"--seq-len {seq_len} needs {seq_len + 1} positions (the prompt and one decode step) but the "
            f"model's context window is {cfg.context_length}", f"pass --seq-len {cfg.context_length - 1} or less")


def time_phase(loaded, phase: str, seq_len: int, repeats: int = DEFAULT_REPEATS) -> PhaseTiming:
    """Time the engine's step and its traced per-layer pass for one sequence: a prefill of ``seq_len`` prompt
    tokens, or one decode step with ``seq_len`` tokens already in the KV cache."""
    import torch

    from edgellm.kv.cache import BLOCK_SIZE, KVCache
    from edgellm.runtime.model_runner import ModelRunner, SeqChunk

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidParameterError(f"--repeat must be a positive integer, got {repeats!r}", "pass --repeat 1 or more")
    cfg, model = loaded.config, loaded.model
    check_seq_len(cfg, phase, seq_len)
    ids = prompt_ids(loaded.tokenizer, seq_len + 1)
    n_blocks = math.ceil((seq_len + 1) / BLOCK_SIZE)
    cache = KVCache(cfg, n_blocks, BLOCK_SIZE)
    slots = slice(0, n_blocks * BLOCK_SIZE)
    runner = ModelRunner(model, cache)
    if phase == "prefill":
        chunk = SeqChunk(ids[:seq_len], 0, slots)
    else:
        if seq_len:   # fill the cache with a real prompt's keys and values
            runner.run([SeqChunk(ids[:seq_len], 0, slots, want_logits=False)])
        chunk = SeqChunk([ids[seq_len]], seq_len, slots)
    traced = traced_runner(model, cache)
    engine, by_ops, per_op = [], [], []
    clock = time.perf_counter
    with torch.inference_mode():
        path = engine_path(runner, chunk)         # also the warm-up: first-call allocations, caches
        traced.run([chunk])
        for _ in range(repeats):                  # interleaved, so load on the machine hits both alike
            t = clock()
            runner.run([chunk])
            engine.append(clock() - t)
            t = clock()
            traced.run([chunk])
            by_ops.append(clock() - t)
            per_op.append(traced.trace.steps[-1].totals())
    med = statistics.median
    op_s = {op.name: med(t[op.name] for t in per_op) for op in ENGINE_OPS}
    between = med(whole - sum(t.values()) for whole, t in zip(by_ops, per_op))
    return PhaseTiming(phase, seq_len, repeats, op_s, med(by_ops), between, med(engine), path,
                       samples={"engine_s": engine, "by_ops_s": by_ops})


# ---- the prediction with the engine's formats ------------------------------------------------------
_MATRIX_OF_LAYER = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
                    "up_proj": "gate_up", "down_proj": "down"}


def weight_bytes_per_element(weights) -> dict[str, float]:
    """Bytes per weight element of each analyzer layer, from the engine's matrices (``Weight.nbytes``)."""
    out = {}
    for layer, attr in _MATRIX_OF_LAYER.items():
        mats = [getattr(b, attr) for b in weights.blocks]
        out[layer] = sum(m.nbytes for m in mats) / sum(m.shape[0] * m.shape[1] for m in mats)
    for layer, m in (("embedding", weights.embed), ("lm_head", weights.lm_head)):
        out[layer] = m.nbytes / (m.shape[0] * m.shape[1])
    return out


def model_label(loaded) -> str:
    src = loaded.source
    path = getattr(src, "path", None)
    return f"{src.name} ({path.name})" if path is not None and path.name != src.name else str(src.name)


def engine_formats(loaded) -> dict:
    import torch

    from edgellm.kernels import native

    w = loaded.model.weights
    b = w.blocks[0]
    mats = {"qkv": b.qkv, "o": b.o, "gate_up": b.gate_up, "down": b.down, "embedding": w.embed,
            "lm_head": w.lm_head}
    return {"matrices": {k: m.format for k, m in mats.items()},
            "bytes_per_weight": weight_bytes_per_element(w),
            "weight_bytes": w.nbytes, "lm_head_tied": w.lm_head is w.embed,
            "activations": "float32", "kv_cache": "float32",
            "threads": torch.get_num_threads(), "native_kernels": native() is not None}


def predict(loaded, hw: "Hardware", phase: str, seq_len: int, attention: str = "fused") -> "Analysis":
    """The analyzer's prediction for the engine's model in its real storage formats."""
    from edgellm.roofline.analyze import analyze

    return analyze(loaded.config, hw, phase, 1, seq_len, weight_bits=32, act_bits=32, kv_bits=32,
                   attention=attention, weight_bytes=weight_bytes_per_element(loaded.model.weights))


# ---- measured next to predicted ----------------------------------------------------------------------
@dataclass(frozen=True)
class MeasuredLayer(MeasuredRates):
    op: EngineOp
    layers: tuple["LayerResult", ...]
    count: int
    measured_s: float

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def ops(self) -> float:
        return sum(x.ops for x in self.layers)

    @property
    def memory_bytes(self) -> float:
        return sum(x.memory_bytes for x in self.layers)

    @property
    def weight_bytes(self) -> float:
        return sum(x.cost.load_weight * x.count for x in self.layers)

    @property
    def predicted_s(self) -> float:
        return sum(x.time_s for x in self.layers)

    @property
    def arithmetic_intensity(self) -> float:
        return self.ops / self.memory_bytes if self.memory_bytes else 0.0

    @property
    def attainable_ops_per_s(self) -> float:
        return self.ops / self.predicted_s if self.predicted_s else 0.0

    @property
    def bound(self) -> str:
        compute = sum(x.time_s for x in self.layers if x.bound == "compute")
        return "compute" if compute > self.predicted_s - compute else "memory"


    def to_dict(self) -> dict:
        return {
            "name": self.name, "layers": [x.name for x in self.layers],
            "engine_call": self.op.call, "count": self.count,
            "ops": self.ops, "memory_bytes": self.memory_bytes, "weight_bytes": self.weight_bytes,
            "arithmetic_intensity": self.arithmetic_intensity, "attainable_ops_per_s": self.attainable_ops_per_s,
            "bound": self.bound, "time_s": self.predicted_s,
            "predicted_by_layer_s": {x.name: x.time_s for x in self.layers},
            "measured_time_s": self.measured_s, "achieved_bytes_per_s": self.achieved_bytes_per_s,
            "achieved_ops_per_s": self.achieved_ops_per_s, "roofline_fraction": self.roofline_fraction,
        }


def _op_layers(op: EngineOp, attention: str) -> tuple[str, ...]:
    if op.name == "attention" and attention == "fused":
        return ("fused_attention",)
    return op.layers


@dataclass
class PhaseReport:
    analysis: "Analysis"
    timing: PhaseTiming
    rows: list[MeasuredLayer]
    weight_bytes: int

    def totals(self) -> dict:
        a, t = self.analysis, self.timing
        parts = sum(r.measured_s for r in self.rows)
        predicted = a.time_s
        out = {
            "ops": a.ops, "memory_bytes": a.memory_bytes, "time_s": predicted,
            "measured_sum_of_parts_s": parts,
            "op_by_op_pass_s": t.by_ops_s,
            "overhead_s": t.between_ops_s,
            "overhead_fraction": t.between_ops_s / t.by_ops_s if t.by_ops_s else 0.0,
            "engine_step_s": t.engine_s, "engine_path": t.engine_path,
            "engine_vs_op_by_op": t.engine_s / t.by_ops_s if t.by_ops_s else 0.0,
            "roofline_fraction_sum_of_parts": predicted / parts if parts else 0.0,
            "roofline_fraction_engine_step": predicted / t.engine_s if t.engine_s else 0.0,
            "achieved_bytes_per_s_engine_step": a.memory_bytes / t.engine_s if t.engine_s else 0.0,
            "achieved_ops_per_s_engine_step": a.ops / t.engine_s if t.engine_s else 0.0,
            "weight_bytes": self.weight_bytes,
            "kv_cache_bytes": a.context_tokens * a.model.kv_bytes_per_token(4.0),
        }
        if a.phase == "prefill":
            out["predicted_tokens_per_s"] = a.seq_len / predicted
            out["measured_tokens_per_s"] = a.seq_len / t.engine_s
        else:
            out["predicted_tokens_per_s"] = 1.0 / predicted
            out["measured_tokens_per_s"] = 1.0 / t.engine_s
        return out

    def to_dict(self) -> dict:
        a = self.analysis
        return {"phase": a.phase, "batch": a.batch, "seq_len": a.seq_len, "attention": a.attention,
                "repeats": self.timing.repeats, "layers": [r.to_dict() for r in self.rows],
                "totals": self.totals(), "notes": list(a.notes),
                "samples": self.timing.samples}


def compare_phase(analysis: "Analysis", timing: PhaseTiming, n_layers: int, weight_bytes: int) -> PhaseReport:
    """Rows of engine ops with the analyzer layers they cover; every analyzer layer in exactly one row."""
    by_name = {layer.name: layer for layer in analysis.layers}
    rows, used = [], []
    for op in ENGINE_OPS:
        names = _op_layers(op, analysis.attention)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise InvalidParameterError(f"the analysis lacks layers {', '.join(missing)} for engine op {op.name}")
        used += names
        rows.append(MeasuredLayer(op, tuple(by_name[n] for n in names), n_layers if op.per_block else 1,
                                  timing.op_s[op.name]))
    left = sorted(set(by_name) - set(used))
    if left:
        raise InvalidParameterError(f"analyzer layers without an engine op: {', '.join(left)}")
    return PhaseReport(analysis, timing, rows, weight_bytes)


def measure_model(loaded, hw: "Hardware", phases=("prefill", "decode"), seq_len: int = 512,
                  repeats: int = DEFAULT_REPEATS, attention: str = "fused", log=None) -> dict:
    """Measure and predict each phase; returns the report as a JSON-ready dictionary."""
    from edgellm.roofline.layers import ATTENTIONS, CONVENTIONS

    if attention not in ATTENTIONS:
        raise InvalidParameterError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if loaded.config.experts is not None:   # its engine ops do not map onto the analyzer's expert layers yet
        raise UnsupportedModelError(
            "edgellm analyze --measure does not profile mixture-of-experts models yet",
            "analyze the model without --measure (its predicted figures count the experts each step reads), "
            "or time it with edgellm bench")
    for phase in phases:
        check_seq_len(loaded.config, phase, seq_len)
    load_before = _load_average()
    reports = []
    for phase in phases:
        if log:
            log(f"timing {phase} ({'prompt of' if phase == 'prefill' else 'KV cache of'} {seq_len} tokens), "
                f"{repeats} repeats ...")
        timing = time_phase(loaded, phase, seq_len, repeats)
        analysis = predict(loaded, hw, phase, seq_len, attention)
        reports.append(compare_phase(analysis, timing, loaded.config.n_layers, loaded.model.weights.nbytes))
    notes = [
        "the analyzer's v_proj writes V to the KV cache; the engine writes K and V in its RoPE call, so a few "
        "bytes move between the qkv_proj and rope rows (the sum is the same)",
        "prefill matmuls dequantise each matrix to float32 in slabs and call the BLAS sgemm: that copy's traffic "
        "is not in the predicted bytes (the roofline counts the stored format)",
    ]
    load = max(load_before, _load_average())
    cores = os.cpu_count() or 1
    if load > cores:
        notes.append(f"the machine was busy (load average {load:.1f} on {cores} cores): other processes took CPU "
                     "time, so the measured times are longer and noisier than on a quiet machine; with more "
                     "than one thread the per-op path suffers most (each call waits for all its threads)")
    from edgellm.llm import PREFILL_CHUNK

    if "prefill" in phases and seq_len > PREFILL_CHUNK:
        notes.append(f"the prefill here is one forward pass of {seq_len} tokens; `edgellm generate` prefills in "
                     f"chunks of {PREFILL_CHUNK}")
    if attention == "fused":
        notes.append("attention is predicted fused (FlashAttention convention), as the engine runs it; "
                     "PyTorch's causal flash kernel also skips the masked half of the score matrix in prefill")
    return {
        "model": model_label(loaded), "hardware": hw.name, "measured": True,
        "seq_len": seq_len, "batch": 1, "attention": attention, "repeats": repeats, "load_average": load,
        "engine": engine_formats(loaded),
        "phases": [r.to_dict() for r in reports],
        "hardware_info": {"peak_ops_per_s": dict(hw.peak_ops), "bandwidth_bytes_per_s": hw.bandwidth,
                          "source": hw.source},
        "conventions": list(CONVENTIONS) + MEASURE_CONVENTIONS,
        "notes": notes,
    }


def _load_average() -> float:
    """The 1-minute load average (0 where the OS has none): other work competing for the cores."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


# ---- output -----------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    from edgellm.roofline.analyze import format_bytes, format_si, format_time

    eng = report["engine"]
    fmts = ", ".join(f"{k} {v}" for k, v in eng["matrices"].items())
    hw = report["hardware_info"]
    lines = [
        f"Measured on this machine: {report['model']} — batch 1, {report['seq_len']} tokens "
        f"(prefill: prompt; decode: already in the KV cache), {report['attention']} attention, "
        f"median of {report['repeats']} repeats, {eng['threads']} thread{'' if eng['threads'] == 1 else 's'}",
        f"hardware: {report['hardware']} — {hw['bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s, peaks "
        + ", ".join(f"{k} {v / 1e12:,.3g} TOPS" for k, v in hw["peak_ops_per_s"].items()),
        f"engine formats: {fmts}; float32 activations and KV cache; weights {format_bytes(eng['weight_bytes'])}",
    ]
    head = (f"{'engine op':<18}{'x':>3}{'ops':>10}{'bytes':>11}{'ops/B':>7}{'bound':>8}{'predicted':>11}"
            f"{'measured':>11}{'GB/s':>8}{'GOP/s':>8}{'of roof':>9}")
    for ph in report["phases"]:
        tot = ph["totals"]
        what = "prompt tokens" if ph["phase"] == "prefill" else "tokens in the KV cache"
        lines += ["", f"{ph['phase'].upper()} — {ph['seq_len']} {what}", head, "-" * len(head)]
        for r in ph["layers"]:
            lines.append(f"{r['name']:<18}{r['count']:>3}{format_si(r['ops']):>10}{format_bytes(r['memory_bytes']):>11}"
                         f"{r['arithmetic_intensity']:>7.3g}{r['bound']:>8}{format_time(r['time_s']):>11}"
                         f"{format_time(r['measured_time_s']):>11}{r['achieved_bytes_per_s'] / 1e9:>8.2f}"
                         f"{r['achieved_ops_per_s'] / 1e9:>8.2f}{r['roofline_fraction']:>9.1%}")
        lines += ["-" * len(head),
                  f"{'sum of parts':<18}{'':>3}{format_si(tot['ops']):>10}{format_bytes(tot['memory_bytes']):>11}{'':>7}{'':>8}"
                  f"{format_time(tot['time_s']):>11}{format_time(tot['measured_sum_of_parts_s']):>11}"
                  f"{tot['memory_bytes'] / tot['measured_sum_of_parts_s'] / 1e9:>8.2f}"
                  f"{tot['ops'] / tot['measured_sum_of_parts_s'] / 1e9:>8.2f}"
                  f"{tot['roofline_fraction_sum_of_parts']:>9.1%}",
                  f"op-by-op pass {format_time(tot['op_by_op_pass_s'])}, of which {format_time(tot['overhead_s'])} "
                  f"({tot['overhead_fraction']:.1%}) outside the op scopes (step inputs, calls)",
                  f"engine step (ModelRunner.run, {tot['engine_path']}): {format_time(tot['engine_step_s'])} "
                  f"= {tot['roofline_fraction_engine_step']:.1%} of the roofline's {format_time(tot['time_s'])}; "
                  f"{tot['measured_tokens_per_s']:,.1f} tokens/s measured vs {tot['predicted_tokens_per_s']:,.1f} "
                  f"predicted"]
    lines += ["", "q/k/v, gate/up and projection+residual are fused in the engine: their rows compare with the "
              "sum of the analyzer's layers (JSON: predicted_by_layer_s)."]
    lines += [f"note: {n}" for n in report["notes"]]
    lines += ["", "conventions:"] + [f"  - {c}" for c in report["conventions"]]
    return "\n".join(lines)


CSV_FIELDS = ("phase", "name", "layers", "count", "ops", "memory_bytes", "weight_bytes", "arithmetic_intensity",
              "attainable_ops_per_s", "bound", "time_s", "measured_time_s", "achieved_bytes_per_s",
              "achieved_ops_per_s", "roofline_fraction")


def format_csv(report: dict) -> str:
    import csv
    import io

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for ph in report["phases"]:
        for r in ph["layers"]:
            w.writerow([ph["phase"], r["name"], "+".join(r["layers"]), r["count"], r["ops"], r["memory_bytes"],
                        r["weight_bytes"], r["arithmetic_intensity"], r["attainable_ops_per_s"], r["bound"],
                        r["time_s"], r["measured_time_s"], r["achieved_bytes_per_s"], r["achieved_ops_per_s"],
                        r["roofline_fraction"]])
        t = ph["totals"]
        w.writerow([ph["phase"], "sum_of_parts", "", "", t["ops"], t["memory_bytes"], "", "", "", "", t["time_s"],
                    t["measured_sum_of_parts_s"], "", "", t["roofline_fraction_sum_of_parts"]])
        w.writerow([ph["phase"], "engine_step", "", "", t["ops"], t["memory_bytes"], "", "", "", "", t["time_s"],
                    t["engine_step_s"], t["achieved_bytes_per_s_engine_step"], t["achieved_ops_per_s_engine_step"],
                    t["roofline_fraction_engine_step"]])
    return out.getvalue()
