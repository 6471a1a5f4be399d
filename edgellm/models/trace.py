"""Named op scopes of the forward pass, timed when a trace is active (llama.cpp's per-op callback).

The model marks the end of each op (``trace.end("qkv_proj", layer)``) behind a ``trace is not
None`` check, so a pass without a trace pays one comparison per op and allocates nothing. An
op's time runs from the previous mark (or ``begin``) to its own: ops are contiguous within a
model method, and each public method of the model calls ``begin`` on entry, so what lies between
its calls (the runner's own Python) is in no op. The runner opens one step per forward pass.

Op names are the roofline profiler's engine ops (:data:`OPS`); an op outside a block (the
embedding, the cos/sin table look-up, the final norm, the lm_head, the fused all-blocks decode
call) has layer ``None``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

# In execution order; "decode_blocks" (every block in one native call) replaces the per-block ops.
OPS = ("embedding", "attn_norm", "qkv_proj", "rope", "attention", "o_proj+attn_add", "ffn_norm",
       "gate_up_proj", "mlp_act", "down_proj+ffn_add", "final_norm", "lm_head", "decode_blocks")
#: ops that run a matrix-multiply kernel (``Weight.matmul`` / ``matmul_add``)
MATMUL_OPS = ("qkv_proj", "o_proj+attn_add", "gate_up_proj", "down_proj+ffn_add", "lm_head")

OpRecord = tuple[str, "int | None", float]          # (op, layer, seconds)


@dataclass
class TracedStep:
    """One forward pass: its tokens, its wall time (from the runner) and its ops in order."""

    tokens: int
    seconds: float = 0.0
    ops: list[OpRecord] = field(default_factory=list)

    def totals(self) -> dict[str, float]:
        """Seconds per op name, summed over layers."""
        out: dict[str, float] = defaultdict(float)
        for op, _, s in self.ops:
            out[op] += s
        return dict(out)


class Trace:
    """Records every op of the traced forward passes, grouped by step; ``callback(op, layer,
    seconds)``, if given, is called as each op ends."""

    def __init__(self, callback: Callable[[str, int | None, float], None] | None = None):
        self.callback = callback
        self.steps: list[TracedStep] = []
        self._t = 0.0
        self._step_t0 = 0.0

    def begin_step(self, tokens: int) -> None:
        self.steps.append(TracedStep(tokens))
        self._step_t0 = self._t = time.perf_counter()

    def end_step(self) -> None:
        self.steps[-1].seconds = time.perf_counter() - self._step_t0

    def begin(self) -> None:
        """The next op starts now."""
        self._t = time.perf_counter()

    def end(self, op: str, layer: int | None) -> None:
        """Op ``op`` (of block ``layer``) ended now; it started at the previous ``end`` or ``begin``."""
        now = time.perf_counter()
        seconds = now - self._t
        self._t = now
        if not self.steps:        # a model method called without a runner: one step of unknown size
            self.steps.append(TracedStep(0))
        self.steps[-1].ops.append((op, layer, seconds))
        if self.callback is not None:
            self.callback(op, layer, seconds)
            self._t = time.perf_counter()     # the callback's own time is in no op
