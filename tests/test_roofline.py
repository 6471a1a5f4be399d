"""Roofline analyzer: figures worked by hand, roofline properties, the planner and the crossover."""

from __future__ import annotations

import math

import pytest

from edgellm.config import ModelConfig
from edgellm.errors import InvalidParameterError
from edgellm.roofline.analyze import analyze, crossover_context, plan_memory
from edgellm.roofline.hardware import HARDWARE, Hardware
from edgellm.roofline.layers import BLOCK_LINEARS, Bits, block_layers, compute_bits, model_layers
from edgellm.roofline.zoo import ZOO, zoo_config

# A tiny GQA model: hidden 64, 4 query heads and 2 KV heads of 16, MLP 128, 2 blocks.
TINY = ModelConfig(architecture="llama", n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
                   ffn_size=128, vocab_size=100, context_length=256, name="tiny")
# A chip with round numbers: 100 TOPS at 16 bits, 200 at 8 bits, 1 TB/s, 10 GB.
TOY = Hardware(name="toy", peak_ops={"fp16": 100e12, "int8": 200e12}, bandwidth=1e12, memory_bytes=10e9,
               source="made up for tests")


def by_name(layers):
    return {layer.name: layer for layer in layers}


# ---- figures worked by hand --------------------------------------------------------------------------
def test_q_proj_prefill_by_hand():
    # batch 2, prompt 8 -> T = 16 tokens; q_proj is 64 -> 64.
    #   ops     = 2 * 16 * 64 * 64            = 131072
    #   weights = 64 * 64 * 2 bytes           = 8192
    #   act in  = 16 * 64 * 2 bytes           = 2048
    #   act out = 16 * 64 * 2 bytes           = 2048   -> 12288 bytes, intensity 131072 / 12288 = 10.67
    q = by_name(block_layers(TINY, "prefill", 2, 8, Bits(16, 16, 16)))["q_proj"]
    assert q.ops == 131072
    assert (q.load_weight, q.load_act, q.store_act, q.load_kv, q.store_kv) == (8192, 2048, 2048, 0, 0)
    assert q.memory_bytes == 12288
    assert q.arithmetic_intensity == pytest.approx(131072 / 12288)
    assert q.count == 2


def test_k_and_v_proj_by_hand_gqa():
    # k_proj 64 -> 2 KV heads * 16 = 32: ops = 2 * 16 * 64 * 32 = 65536; v_proj writes its 16 x 32 outputs
    # straight into the KV cache: 16 * 32 * 1 byte (8-bit KV) = 512 bytes, no activation output.
    layers = by_name(block_layers(TINY, "prefill", 2, 8, Bits(16, 16, 8)))
    assert layers["k_proj"].ops == 65536
    assert layers["k_proj"].store_act == 16 * 32 * 2
    assert layers["v_proj"].store_kv == 512 and layers["v_proj"].store_act == 0
    # RoPE writes the rotated K into the cache (8-bit) and Q as an activation (16-bit)
    assert layers["rope"].store_kv == 512 and layers["rope"].store_act == 16 * 64 * 2


def test_qk_matmul_prefill_by_hand():
    # batch 2, q = k = 8, 4 heads of 16, 2 KV heads:
    #   ops    = 2 * B * H * q * k * d = 2 * 2 * 4 * 8 * 8 * 16     = 16384
    #   Q in   = T * H * d * 2 bytes   = 16 * 64 * 2                = 2048
    #   K read = B * k * Hkv * d * 2   = 2 * 8 * 2 * 16 * 2         = 1024  (each KV head once: GQA)
    #   scores = B * H * q * k * 2     = 2 * 4 * 8 * 8 * 2          = 1024
    qk = by_name(block_layers(TINY, "prefill", 2, 8, Bits(16, 16, 16)))["qk_matmul"]
    assert qk.ops == 16384
    assert (qk.load_act, qk.load_kv, qk.store_act) == (2048, 1024, 1024)
    assert qk.memory_bytes == 4096


def test_qk_matmul_decode_by_hand():
    # batch 2, 7 tokens cached -> k = 8 keys, q = 1:
    #   ops = 2 * 2 * 4 * 1 * 8 * 16 = 2048; Q in = 2 * 64 * 2 = 256; K = 2 * 8 * 2 * 16 * 2 = 1024;
    #   scores out = 2 * 4 * 1 * 8 * 2 = 128   -> 1408 bytes
    qk = by_name(block_layers(TINY, "decode", 2, 7, Bits(16, 16, 16)))["qk_matmul"]
    assert qk.ops == 2048
    assert (qk.load_act, qk.load_kv, qk.store_act) == (256, 1024, 128)


def test_sliding_window_layers_read_their_window_in_decode_by_hand():
    # TINY with a window of 4 on block 0 only (as Gemma 3's sliding layers), 7 tokens cached -> 8 keys:
    # block 0 reads 4 keys, block 1 all 8: on average 6 keys a block, so per block
    #   ops = 2 * B * H * q * 6 * d = 2 * 2 * 4 * 1 * 6 * 16 = 1536;  K = 2 * 6 * 2 * 16 * 2 = 768 bytes
    # and both blocks together 2 * 1536 = (1024 + 2048): block 0's 4 keys plus block 1's 8.
    windowed = ModelConfig(**{**TINY.__dict__, "sliding_window": 4, "sliding_layers": (0,)})
    qk = by_name(block_layers(windowed, "decode", 2, 7, Bits(16, 16, 16)))["qk_matmul"]
    assert qk.ops == 1536 and qk.count == 2
    assert (qk.load_act, qk.load_kv, qk.store_act) == (256, 768, 96)
    # a context inside the window, and prefill (a masked square: every pair computed), are unchanged
    assert by_name(block_layers(windowed, "decode", 2, 2, Bits(16, 16, 16)))["qk_matmul"].ops == \
        by_name(block_layers(TINY, "decode", 2, 2, Bits(16, 16, 16)))["qk_matmul"].ops
    assert by_name(block_layers(windowed, "prefill", 2, 8, Bits(16, 16, 16)))["qk_matmul"].ops == 16384


def test_roofline_time_and_bound_by_hand():
    # q_proj above on TOY: compute 131072 / 1e14 = 1.31 ns, memory 12288 / 1e12 = 12.3 ns -> memory-bound,
    # attainable = 10.67 ops/B * 1e12 B/s = 10.67 Tops/s, time x 2 blocks = 24.6 ns.
    a = analyze(TINY, TOY, "prefill", 2, 8)
    q = by_name(a.layers)["q_proj"]
    assert q.bound == "memory"
    assert q.attainable_ops_per_s == pytest.approx(131072 / 12288 * 1e12)
    assert q.time_s == pytest.approx(2 * 12288 / 1e12)
    assert q.ops == 2 * 131072 and q.memory_bytes == 2 * 12288
    assert a.time_s == pytest.approx(sum(layer.time_s for layer in a.layers))
    assert a.totals()["time_to_first_token_s"] == a.time_s


def test_decode_totals():
    a = analyze(TINY, TOY, "decode", batch=4, seq_len=10)
    t = a.totals()
    assert t["tokens_per_s"] == pytest.approx(4 / a.time_s)
    assert t["tokens_per_s_per_sequence"] == pytest.approx(1 / a.time_s)
    # KV after the step: 4 sequences x 11 tokens x (2 x 2 blocks x 32 x 2 bytes)
    assert t["kv_cache_bytes"] == 4 * 11 * 2 * 2 * 32 * 2
    assert t["weight_bytes"] == TINY.n_parameters() * 2


def test_compute_precision():
    assert compute_bits(4, 16) == 16          # W4A16 dequantizes and computes at 16 bits
    assert compute_bits(8, 8) == 8
    assert compute_bits(4.5, 4) == 8
    assert TOY.compute_precision(4) == ("int8", 200e12)     # no int4: the next wider precision
    assert TOY.compute_precision(32) == ("fp16", 100e12)    # nothing wider: the widest it has
    a = analyze(TINY, TOY, "decode", 1, 10, weight_bits=8, act_bits=8)
    assert by_name(a.layers)["q_proj"].peak_ops_per_s == 200e12


# ---- properties ----------------------------------------------------------------------------------
LLAMA7 = zoo_config("Llama-2-7B")


@pytest.mark.parametrize("hw_key", list(HARDWARE))
def test_decode_linears_intensity_one_and_memory_bound(hw_key):
    a = analyze(LLAMA7, HARDWARE[hw_key], "decode", batch=1, seq_len=512, weight_bits=16)
    for layer in a.layers:
        if layer.name in BLOCK_LINEARS or layer.name == "lm_head":
            assert layer.arithmetic_intensity == pytest.approx(1.0, rel=0.01), layer.name
            assert layer.bound == "memory", (hw_key, layer.name)


@pytest.mark.parametrize("hw_key", list(HARDWARE))
def test_prefill_linears_at_long_prompts_compute_bound(hw_key):
    a = analyze(LLAMA7, HARDWARE[hw_key], "prefill", batch=1, seq_len=4096)
    for layer in a.layers:
        if layer.name in BLOCK_LINEARS:
            assert layer.bound == "compute", (hw_key, layer.name)


def test_halving_weight_bits_halves_weight_bytes():
    for w, half in ((16, 8), (8, 4), (32, 16)):
        full = by_name(model_layers(LLAMA7, "decode", 1, 100, Bits(w, 16, 16)))
        halved = by_name(model_layers(LLAMA7, "decode", 1, 100, Bits(half, 16, 16)))
        for name in BLOCK_LINEARS + ("lm_head", "embedding"):
            assert halved[name].load_weight == pytest.approx(full[name].load_weight / 2), name
        assert analyze(LLAMA7, TOY, weight_bits=half).weight_bytes == pytest.approx(
            analyze(LLAMA7, TOY, weight_bits=w).weight_bytes / 2)


@pytest.mark.parametrize("phase,seq", [("prefill", 64), ("decode", 300)])
def test_unfused_attention_moves_score_matrix_fused_does_not(phase, seq):
    bits = Bits(16, 16, 16)
    unfused = by_name(block_layers(TINY, phase, 3, seq, bits, "unfused"))
    fused = by_name(block_layers(TINY, phase, 3, seq, bits, "fused"))
    q, k = (seq, seq) if phase == "prefill" else (1, seq + 1)
    scores_bytes = 3 * TINY.n_heads * q * k * 2
    moved = sum(unfused[n].memory_bytes for n in ("qk_matmul", "softmax", "sv_matmul"))
    # unfused: written by qk, read + written by softmax, read by sv = 4 passes over the score matrix
    assert moved - fused["fused_attention"].memory_bytes == pytest.approx(4 * scores_bytes)
    # fused: exactly Q in, K and V of the context, O out
    f = fused["fused_attention"]
    assert f.memory_bytes == 2 * 3 * q * TINY.q_size * 2 + 2 * 3 * k * TINY.kv_size * 2
    assert f.ops == pytest.approx(sum(unfused[n].ops for n in ("qk_matmul", "softmax", "sv_matmul")))


def test_decode_attention_grows_linearly_with_context():
    def cost(seq):
        layers = by_name(analyze(LLAMA7, HARDWARE["A6000"], "decode", 1, seq).layers)
        att = [layers[n] for n in ("qk_matmul", "softmax", "sv_matmul")]
        return sum(x.ops for x in att), sum(x.memory_bytes for x in att), sum(x.time_s for x in att)

    c1, c2, c4 = cost(1023), cost(2047), cost(4095)       # 1024, 2048, 4096 keys
    assert c2[0] == 2 * c1[0] and c4[0] == 4 * c1[0]       # ops: proportional to the keys
    for i in (1, 2):   # bytes and time: affine (Q in and O out do not grow), and the fixed part is small
        assert c4[i] - c2[i] == pytest.approx(2 * (c2[i] - c1[i]), rel=1e-9)
        assert c2[i] == pytest.approx(2 * c1[i], rel=1e-3)
    # the linear layers do not depend on the context in decode
    lin = lambda s: sum(x.time_s for x in analyze(LLAMA7, HARDWARE["A6000"], "decode", 1, s).layers  # noqa: E731
                        if x.name in BLOCK_LINEARS)
    assert lin(1023) == pytest.approx(lin(4095))


def test_gqa_reads_each_kv_head_once():
    mha = ModelConfig(architecture="llama", n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=4, head_dim=16,
                      ffn_size=128, vocab_size=100, context_length=256)
    gqa = by_name(block_layers(TINY, "decode", 1, 99, Bits()))
    full = by_name(block_layers(mha, "decode", 1, 99, Bits()))
    assert full["qk_matmul"].load_kv == 2 * gqa["qk_matmul"].load_kv
    assert full["qk_matmul"].ops == gqa["qk_matmul"].ops


def test_qwen_bias_counted():
    cfg = zoo_config("Qwen2.5-0.5B")
    assert cfg.qkv_bias
    q = by_name(block_layers(cfg, "decode", 1, 10, Bits()))["q_proj"]
    assert q.ops == 2 * 896 * 896 + 896
    assert q.params == 896 * 896 + 896


# ---- zoo ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params_b", [
    ("Llama-2-7B", 6.74), ("Llama-2-13B", 13.0), ("Llama-2-70B", 69.0), ("Llama-3-8B", 8.03),
    ("Llama-3.2-1B", 1.24), ("Llama-3.2-3B", 3.21), ("Mistral-7B", 7.24), ("Qwen2.5-0.5B", 0.494),
    ("Qwen2.5-7B", 7.62), ("SmolLM2-135M", 0.1345), ("SmolLM2-360M", 0.362), ("SmolLM2-1.7B", 1.71)])
def test_zoo_parameter_counts_match_published_sizes(name, params_b):
    cfg = zoo_config(name)
    assert cfg is not None and cfg.name == name
    assert cfg.n_parameters() / 1e9 == pytest.approx(params_b, rel=0.02)


def test_zoo_lookup_is_forgiving():
    assert zoo_config("llama-2-7b").name == "Llama-2-7B"
    assert zoo_config("meta-llama/Llama-3.2-1B").name == "Llama-3.2-1B"
    assert zoo_config("smollm2_135m").name == "SmolLM2-135M"
    assert len(ZOO) >= 12


# ---- crossover ----------------------------------------------------------------------------------
def test_crossover_by_ops_matches_closed_form():
    # per token and block: linears 2 * (4 d^2 + 3 d f) ops; attention at context L: 4 L d (QK and SV) + 5 H L
    # (softmax). Equal at L = 2 (4 d^2 + 3 d f) / (4 d + 5 H).
    d, f, H = 4096, 11008, 32
    expected = math.ceil(2 * (4 * d * d + 3 * d * f) / (4 * d + 5 * H))
    assert crossover_context(LLAMA7, HARDWARE["A6000"], "prefill", metric="ops") == expected


def test_crossover_by_time_unfused_prefill_is_earlier():
    hw = HARDWARE["A6000"]
    unfused = crossover_context(LLAMA7, hw, "prefill", attention="unfused")
    fused = crossover_context(LLAMA7, hw, "prefill", attention="fused")
    assert unfused < fused
    a = analyze(LLAMA7, hw, "prefill", 1, unfused)
    b = analyze(LLAMA7, hw, "prefill", 1, unfused - 1)
    att, lin = ("qk_matmul", "softmax", "sv_matmul"), BLOCK_LINEARS
    assert a.group_time(att) >= a.group_time(lin) and b.group_time(att) < b.group_time(lin)
    # batching shares the weights in decode: the crossover context shrinks with the batch
    assert crossover_context(LLAMA7, hw, "decode", batch=8) < crossover_context(LLAMA7, hw, "decode", batch=1) / 4


# ---- memory planner --------------------------------------------------------------------------------
def test_plan_memory_by_hand():
    plan = plan_memory(LLAMA7, HARDWARE["A6000"], weight_bits=16, kv_bits=16, batch=1, reserve=0.1)
    n = LLAMA7.n_parameters()
    assert plan["weights_by_bits"]["16"] == n * 2
    assert plan["weights_by_bits"]["4"] == n / 2
    # Llama-2-7B: 2 (K, V) x 32 layers x 4096 x 2 bytes = 512 KiB per token
    assert plan["kv_bytes_per_token_by_bits"]["16"] == 524288
    tokens = int((48e9 * 0.9 - n * 2) // 524288)
    assert plan["chosen"]["max_kv_tokens"] == tokens
    assert plan["chosen"]["max_context_at_batch"] == 4096             # capped by the model's window
    assert plan["max_batch_by_context"]["4096"] == tokens // 4096


def test_plan_memory_weights_that_do_not_fit():
    plan = plan_memory(LLAMA7, HARDWARE["Groq-LPU"], 16, 16)
    assert not plan["chosen"]["fits_weights"] and plan["chosen"]["max_kv_tokens"] == 0


# ---- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"batch": 0}, "batch"), ({"seq_len": -1}, "non-negative"), ({"weight_bits": 7}, "weight bits"),
    ({"act_bits": 3}, "activation bits"), ({"kv_bits": 12}, "KV-cache bits"), ({"phase": "train"}, "phase"),
    ({"attention": "sparse"}, "attention")])
def test_impossible_values_refused(kwargs, match):
    args = {"phase": "decode", "batch": 1, "seq_len": 8} | kwargs
    with pytest.raises(InvalidParameterError, match=match):
        analyze(TINY, TOY, **args)


def test_prefill_needs_a_prompt():
    with pytest.raises(InvalidParameterError, match="at least 1 token"):
        analyze(TINY, TOY, "prefill", 1, 0)
    assert analyze(TINY, TOY, "decode", 1, 0).layers     # decode from an empty cache is fine
