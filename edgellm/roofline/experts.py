"""The mixture-of-experts MLP under the roofline: which expert weights a step reads.

A sparse layer's router scores every token against every expert; each token then runs its
``k`` chosen experts of the layer's ``E``. The operations follow the tokens (``k`` experts per
token, whichever they are), but the weight bytes follow the *distinct* experts the step's tokens
chose: each chosen expert is read once for all of its tokens (as :mod:`edgellm.models.moe` runs
them). That number depends on the routing; the analyzer assumes it uniform and independent
across tokens: a token leaves a given expert out with probability 1 - k/E, so ``T`` tokens
touch

    E * (1 - (1 - k/E) ** T)

experts on average. A decode step at batch B has T = B (one token per sequence: k experts at
B = 1, nearly all of them by B ~ 3E/k); a prefill of a few hundred tokens touches all of them.
Real routers are not uniform (some experts are favoured, and the tokens of one sequence tend to
agree), so the expectation is an upper bound on the spread of a real batch, a fair one for
independent sequences.
"""

from __future__ import annotations

from typing import Mapping

from edgellm.config import ExpertConfig

# The MoE layers' names, in execution order (the shared ones only where the model has a shared expert).
EXPERT_LINEARS = ("router", "expert_gate_proj", "expert_up_proj", "expert_down_proj",
                  "shared_gate_proj", "shared_up_proj", "shared_down_proj", "shared_expert_gate")


def expected_distinct_experts(n_experts: int, n_used: int, tokens: int) -> float:
    """Expected number of distinct experts ``tokens`` tokens choose, each ``n_used`` of
    ``n_experts`` uniformly at random: n_experts * (1 - (1 - n_used / n_experts) ** tokens)."""
    if tokens <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - n_used / n_experts) ** tokens)


def expert_layer_specs(ex: ExpertConfig, hidden: int, tokens: int) -> list[tuple[str, int, int, float, float]]:
    """(name, inputs, outputs, rows multiplied, weight matrices read) of each linear layer of one
    sparse MLP for a step of ``tokens`` tokens. "rows" counts token-expert pairs (ops); "read"
    counts matrices of that shape loaded (bytes): the distinct experts, expected under uniform
    routing."""
    T, f = tokens, ex.ffn_size
    active = expected_distinct_experts(ex.n_experts, ex.n_used, T)
    specs = [("router", hidden, ex.n_experts, T, 1.0),
             ("expert_gate_proj", hidden, f, T * ex.n_used, active),
             ("expert_up_proj", hidden, f, T * ex.n_used, active),
             ("expert_down_proj", f, hidden, T * ex.n_used, active)]
    if ex.shared_ffn_size:
        s = ex.shared_ffn_size
        specs += [("shared_gate_proj", hidden, s, T, 1.0), ("shared_up_proj", hidden, s, T, 1.0),
                  ("shared_down_proj", s, hidden, T, 1.0), ("shared_expert_gate", hidden, 1, T, 1.0)]
    return specs


def expert_activation_elements(ex: ExpertConfig, tokens: int) -> int:
    """Elements SiLU*up runs over in one sparse MLP: every chosen expert's (and the shared
    expert's) intermediate values."""
    return tokens * (ex.n_used * ex.ffn_size + ex.shared_ffn_size)


def per_weight_bytes(per_weight: Mapping[str, float], name: str, default: float) -> float:
    """Bytes per weight element of layer ``name``: the per-layer override, else the dense MLP's of
    the same role (``expert_gate_proj`` -> ``gate_proj``), else ``default``."""
    if name in per_weight:
        return per_weight[name]
    role = name.removeprefix("expert_").removeprefix("shared_")
    return per_weight.get(role, default)
