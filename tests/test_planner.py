"""The planner (`edgellm analyze --plan --chips`, `--disaggregate`): figures worked by hand on a tiny
made-up model and chip, refusals, and the command's table and JSON."""

from __future__ import annotations

import json
import math

import pytest

import edgellm.cli.main
from edgellm.config import ModelConfig
from edgellm.roofline.analyze import analyze
from edgellm.roofline.hardware import HARDWARE, hardware_from_dict
from edgellm.roofline.planner import (
    Link,
    PlanError,
    Session,
    TraceFormatError,
    Turn,
    allreduce_time,
    bubble_fraction,
    disaggregate,
    energy_joules,
    load_trace,
    plan_split,
    plan_splits,
    resolve_link,
    ring_allreduce_bytes,
    slower_link,
)
from edgellm.roofline.zoo import zoo_config

# A made-up model: hidden 64, 4 blocks, 4 heads of 16, 2 KV heads, MLP 128, vocab 256.
TINY_HF = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
           "max_position_embeddings": 4096, "tie_word_embeddings": False}
TINY = ModelConfig.from_hf_config(TINY_HF, name="tiny")
# By hand, 16-bit weights (2 bytes):
BLOCK_PARAMS = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64   # q,k,v + o + gate,up,down + 2 norms
EMB_BYTES = 256 * 64 * 2
HEAD_BYTES = (256 * 64 + 64) * 2                                      # lm_head + final norm
KV_PER_TOKEN_PER_BLOCK = 2 * 2 * 16 * 2                               # K and V x 2 heads x 16 x 2 bytes

CHIP_DICT = {"name": "Toy chip", "peak_TOPS": {"fp16": 1}, "memory_bandwidth_GBps": 1, "memory_GB": 1,
             "power_W": 10, "idle_power_W": 2, "power_source": "made up", "link_GBps": 1,
             "link_latency_us": 1, "link_source": "made up"}
CHIP = hardware_from_dict(CHIP_DICT)
LINK = resolve_link(CHIP)


def test_tiny_model_shape_is_what_the_figures_assume():
    assert BLOCK_PARAMS == 36992
    assert TINY.n_parameters() == 4 * BLOCK_PARAMS + EMB_BYTES // 2 + HEAD_BYTES // 2
    assert TINY.kv_bytes_per_token(2) == 4 * KV_PER_TOKEN_PER_BLOCK


# ---- memory per stage -------------------------------------------------------------------------------
def test_pipeline_memory_per_stage_by_hand():
    s = plan_split(TINY, CHIP, pp=2, prompt_tokens=100, context=100, micro_batches=2, attention="fused",
                   balance="memory", link=LINK)
    assert [(st.first_block, st.end_block) for st in s.stages] == [(0, 2), (2, 4)]
    first, last = s.stages
    assert first.weight_bytes == 2 * BLOCK_PARAMS * 2 + EMB_BYTES
    assert last.weight_bytes == 2 * BLOCK_PARAMS * 2 + HEAD_BYTES
    # KV: 2 blocks x 128 bytes per token x 100 tokens x (batch 1 x 2 micro-batches) sequences
    assert first.kv_bytes == last.kv_bytes == 2 * KV_PER_TOKEN_PER_BLOCK * 100 * 2 == 51200
    # activations: the largest layer in a 100-token prefill is SiLU*up: reads 2 x 100 x 128, writes 100 x 128
    assert first.act_bytes == 3 * 100 * 128 * 2 == 76800
    assert s.max_memory_bytes == last.weight_bytes + 51200 + 76800
    assert s.fits


def test_tensor_parallel_memory_per_chip_by_hand():
    s = plan_split(TINY, CHIP, pp=1, tp=2, prompt_tokens=100, context=100, attention="fused", link=LINK)
    (st,) = s.stages
    assert st.weight_bytes == (4 * BLOCK_PARAMS * 2 + EMB_BYTES + HEAD_BYTES) / 2
    # each chip holds 1 of the 2 KV heads
    assert st.kv_bytes == 4 * (KV_PER_TOKEN_PER_BLOCK / 2) * 100
    # SiLU*up is split (38400 per chip); a residual add is whole on every chip: reads 2 x 100 x 64, writes 100 x 64
    assert st.act_bytes == 3 * 100 * 64 * 2 == 38400


def test_balance_by_time_and_by_memory_cut_differently():
    # a big vocabulary: the embedding and the head each weigh several blocks in memory, but only the head
    # (a matmul over the whole vocabulary) costs time in decode
    cfg = ModelConfig.from_hf_config(dict(TINY_HF, vocab_size=4096), name="tiny-bigvocab")
    by_mem = plan_split(cfg, CHIP, pp=2, prompt_tokens=16, balance="memory", link=LINK)
    by_time = plan_split(cfg, CHIP, pp=2, prompt_tokens=16, balance="time", link=LINK)
    assert [(x.first_block, x.end_block) for x in by_mem.stages] == [(0, 2), (2, 4)]
    assert [(x.first_block, x.end_block) for x in by_time.stages] == [(0, 3), (3, 4)]


# ---- links, all-reduce, bubble, energy -------------------------------------------------------------------
def test_bytes_per_link_per_token_by_hand():
    pipe = plan_split(TINY, CHIP, pp=4, prompt_tokens=16, link=LINK)
    lb = pipe.figures["link_bytes_per_token"]
    assert lb["pipeline_per_boundary"] == 64 * 2 and lb["pipeline_boundaries"] == 3    # hidden x 2 bytes
    tens = plan_split(TINY, CHIP, pp=1, tp=2, prompt_tokens=16, link=LINK)
    lb = tens.figures["link_bytes_per_token"]
    # 2 all-reduces per block + the embedding's = 9; each chip sends 2(N-1)/N x 128 bytes per all-reduce
    assert lb["tensor_allreduces"] == 9 and lb["tensor_sent_per_chip"] == 9 * 1 * 128
    assert ring_allreduce_bytes(1000, 4) == 1500


def test_ring_allreduce_and_link_time_by_hand():
    link = Link(bandwidth=1000.0, latency_s=0.1, source="hand")
    assert link.time(500) == pytest.approx(0.6)
    assert allreduce_time(1000, 4, link) == pytest.approx(2 * 3 * 0.1 + 2 * 3 / 4 * 1000 / 1000)   # 2.1
    assert allreduce_time(1000, 1, link) == 0.0
    fast = Link(2000.0, 0.05, "a")
    slow = slower_link(link, fast)
    assert slow.bandwidth == 1000.0 and slow.latency_s == 0.1


@pytest.mark.parametrize("stages,micro,expected", [(1, 1, 0.0), (2, 1, 1 / 2), (4, 4, 3 / 7), (8, 8, 7 / 15)])
def test_gpipe_bubble_fraction(stages, micro, expected):
    assert bubble_fraction(stages, micro) == pytest.approx(expected)


def test_prefill_schedule_follows_gpipe():
    s = plan_split(TINY, CHIP, pp=2, prompt_tokens=64, micro_batches=4, link=LINK)
    M = 4
    chunks = [st.prefill_s / M for st in s.stages]
    link_chunk = LINK.latency_s + 64 / M * 64 * 2 / LINK.bandwidth
    f = s.figures["prefill"]
    assert f["link_s_per_chunk"] == pytest.approx(link_chunk)
    assert f["time_s"] == pytest.approx(sum(chunks) + link_chunk + (M - 1) * max(max(chunks), link_chunk))
    assert f["bubble_fraction"] == pytest.approx(1 - sum(st.prefill_s for st in s.stages) / (2 * f["time_s"]))
    assert f["gpipe_bubble_fraction"] == pytest.approx(1 / 5)


def test_joules_are_watts_times_seconds():
    assert energy_joules(2.0, 5.0, CHIP) == pytest.approx(10 * 2 + 2 * 3)
    no_power = hardware_from_dict({k: v for k, v in CHIP_DICT.items() if k != "power_W"})
    assert energy_joules(2.0, 5.0, no_power) is None
    one = plan_split(TINY, CHIP, pp=1, prompt_tokens=64, context=64)
    a = analyze(TINY, CHIP, "decode", 1, 63)
    assert one.figures["decode"]["time_per_token_s"] == pytest.approx(a.time_s)
    assert one.figures["decode"]["joules_per_token"] == pytest.approx(10 * a.time_s)
    p = analyze(TINY, CHIP, "prefill", 1, 64)
    assert one.figures["prefill"]["joules_per_token"] == pytest.approx(10 * p.time_s / 64)
    assert p.totals()["joules_per_token"] == pytest.approx(10 * p.time_s / 64)
    # two pipeline stages in a decode round of one sequence: each stage's chip idles while the other runs
    two = plan_split(TINY, CHIP, pp=2, micro_batches=1, prompt_tokens=64, link=LINK)
    r = two.figures["decode"]["time_per_token_s"]
    busy = [st.decode_s for st in two.stages]
    assert two.figures["decode"]["joules_per_token"] == pytest.approx(sum(10 * b + 2 * (r - b) for b in busy))


# ---- refusals ----------------------------------------------------------------------------------------
def test_model_that_fits_nowhere_is_refused_with_the_smallest_split():
    small = hardware_from_dict(dict(CHIP_DICT, memory_GB=0.0002))       # 200 kB: one block is 74 kB
    with pytest.raises(PlanError) as err:
        plan_splits(TINY, small, [1, 2], ["pipeline", "tensor"], link=LINK, prompt_tokens=16)
    msg = str(err.value)
    assert "fits none of the splits" in msg and "smallest split that fits" in msg and "--chips" in msg
    tiny_mem = hardware_from_dict(dict(CHIP_DICT, memory_GB=1e-6))      # 1 kB: nothing fits anywhere
    with pytest.raises(PlanError, match="fits none") as err:
        plan_splits(TINY, tiny_mem, [1, 2, 4], ["pipeline"], link=LINK, prompt_tokens=16)
    assert "lower --weight-bits" in str(err.value)


def test_splits_that_cannot_be_built_say_why():
    s = plan_split(TINY, CHIP, pp=1, tp=3, prompt_tokens=16, link=LINK)
    assert not s.fits and "4 attention heads do not split evenly over 3 chips and there are only 2 KV heads" in s.reason
    s = plan_split(TINY, CHIP, pp=5, prompt_tokens=16, link=LINK)
    assert "only 4 blocks" in s.reason


def test_more_than_one_chip_needs_a_link():
    no_link = hardware_from_dict({k: v for k, v in CHIP_DICT.items() if not k.startswith("link")})
    with pytest.raises(PlanError, match="--link-gbps"):
        resolve_link(no_link)
    link = resolve_link(no_link, gbps=8, latency_us=3)
    assert link.bandwidth == 1e9 and link.latency_s == pytest.approx(3e-6)


# ---- disaggregated serving -------------------------------------------------------------------------------
def test_disaggregation_kv_transfer_and_ttft_by_hand():
    fast = hardware_from_dict(dict(CHIP_DICT, name="Compute chip", peak_TOPS={"fp16": 100}))
    trace = [Session("s", (Turn(100, 11, 2.0),))]
    d = disaggregate(TINY, CHIP, fast, CHIP, trace, link=LINK)
    one, dis = d["one_chip"]["sessions"][0]["turns"][0], d["disaggregated"]["sessions"][0]["turns"][0]
    assert d["kv_bytes_per_token"] == 4 * KV_PER_TOKEN_PER_BLOCK == 512
    assert dis["kv_transfer_s"] == pytest.approx(1e-6 + 100 * 512 / 1e9) and one["kv_transfer_s"] == 0
    assert one["ttft_s"] == pytest.approx(analyze(TINY, CHIP, "prefill", 1, 100).time_s)
    assert dis["ttft_s"] == pytest.approx(analyze(TINY, fast, "prefill", 1, 100).time_s)
    tpot = analyze(TINY, CHIP, "decode", 1, 105).time_s                 # middle of the reply: 100 + 11 // 2
    assert one["tpot_s"] == pytest.approx(tpot) and dis["tpot_s"] == pytest.approx(tpot)
    assert dis["latency_s"] == pytest.approx(dis["ttft_s"] + dis["kv_transfer_s"] + 10 * tpot)
    s = d["disaggregated"]["sessions"][0]
    assert s["wall_s"] == pytest.approx(dis["latency_s"] + 2.0)
    e = s["energy_J"]
    assert e["prefill"] == pytest.approx(10 * dis["ttft_s"]) and e["decode"] == pytest.approx(10 * 10 * tpot)
    assert e["idle"] == pytest.approx(2 * (s["wall_s"] - dis["ttft_s"]) + 2 * (s["wall_s"] - 10 * tpot))


def test_disaggregation_refuses_a_chip_that_cannot_hold_the_model():
    with pytest.raises(PlanError, match="does not fit the prefill chip, Groq"):
        disaggregate(zoo_config("Llama-2-7B"), HARDWARE["H100-SXM"], HARDWARE["Groq-LPU"], HARDWARE["H200"],
                     link=resolve_link(HARDWARE["H100-SXM"]))


def test_trace_files(tmp_path):
    c = tmp_path / "t.csv"
    c.write_text("session,prompt_tokens,reply_tokens,think_s\na,100,20,5\na,180,30,0\nb,50,10,1\n")
    sessions = load_trace(c)
    assert [s.name for s in sessions] == ["a", "b"] and sessions[0].turns[1] == Turn(180, 30, 0.0)
    j = tmp_path / "t.json"
    j.write_text(json.dumps({"sessions": [{"name": "x", "turns": [{"prompt_tokens": 10, "reply_tokens": 2}]}]}))
    assert load_trace(j) == [Session("x", (Turn(10, 2, 0.0),))]
    bad = tmp_path / "bad.csv"
    bad.write_text("session,prompt,reply\na,1,2\n")
    with pytest.raises(TraceFormatError, match="missing column prompt_tokens"):
        load_trace(bad)
    bad.write_text("session,prompt_tokens,reply_tokens\na,0,2\n")
    with pytest.raises(TraceFormatError, match="'prompt_tokens' must be at least 1"):
        load_trace(bad)


# ---- the command ------------------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(edgellm.cli.main, "COMMANDS", {"analyze": edgellm.cli.main.COMMANDS["analyze"]})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    (tmp_path / "chip.json").write_text(json.dumps(CHIP_DICT))

    def run(*argv):
        argv = [str(tmp_path / "config.json") if a == "TINY" else str(tmp_path / "chip.json") if a == "CHIP"
                else a for a in argv]
        code = edgellm.cli.main.main(["analyze", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_split_table_and_json(cli):
    code, out, _ = cli("--model", "TINY", "--hardware", "CHIP", "--plan", "--chips", "1,2,4", "--seq-len", "64")
    assert code == 0 and "Split plan" in out and "pipeline 4" in out and "tensor 2" in out and "J/tok" in out
    code, out, _ = cli("--model", "TINY", "--hardware", "CHIP", "--plan", "--chips", "1,2", "--parallel",
                       "pipeline,tensor,hybrid", "--prompt-tokens", "32", "--seq-len", "64", "--json")
    assert code == 0
    data = json.loads(out)
    assert [(s["mode"], s["chips"]) for s in data["splits"]] == [("pipeline", 1), ("pipeline", 2), ("tensor", 1),
                                                                 ("tensor", 2), ("hybrid", 1), ("hybrid", 2)]
    s = data["splits"][1]
    assert s["fits"] and s["prompt_tokens"] == 32 and s["context"] == 64 and len(s["stages"]) == 2
    assert s["decode"]["joules_per_token"] > 0 and s["link_bytes_per_token"]["pipeline_per_boundary"] == 128
    assert data["hardware_info"]["power_W"] == 10


def test_cli_disaggregate_prints_and_json_parses(cli, tmp_path):
    trace = tmp_path / "s.csv"
    trace.write_text("session,prompt_tokens,reply_tokens,think_s\nq,40,8,1\n")
    code, out, _ = cli("--model", "TINY", "--hardware", "CHIP", "--disaggregate", "--prefill-on", "CHIP",
                       "--decode-on", "CHIP", "--trace", str(trace))
    assert code == 0 and "Disaggregated serving" in out and "KV move" in out
    code, out, _ = cli("--model", "TINY", "--hardware", "CHIP", "--disaggregate", "--prefill-on", "CHIP",
                       "--decode-on", "CHIP", "--json")
    data = json.loads(out)
    assert code == 0 and {"one_chip", "disaggregated", "kv_bytes_per_token", "trace"} <= set(data)
    assert len(data["disaggregated"]["sessions"]) == 3                 # the built-in trace
    assert all(math.isfinite(s["wall_s"]) for s in data["one_chip"]["sessions"])


@pytest.mark.parametrize("argv,message", [
    (["--chips", "2"], "add --plan"),
    (["--plan", "--chips", "two"], "comma-separated"),
    (["--plan", "--chips", "2", "--parallel", "diagonal"], "unknown parallelism"),
    (["--micro-batches", "2"], "only apply to a split plan"),
    (["--disaggregate", "--prefill-on", "CHIP"], "needs --decode-on"),
    (["--trace", "x.csv"], "only apply to --disaggregate"),
    (["--link-gbps", "10"], "only apply to --plan --chips"),
    (["--plan", "--chips", "2", "--link-gbps", "-1"], "non-negative"),
])
def test_cli_refuses_bad_planner_flags(cli, argv, message):
    code, _, err = cli("--model", "TINY", "--hardware", "CHIP", *argv)
    assert code == 2 and message in err


def test_cli_refuses_a_model_that_fits_nowhere(cli):
    code, _, err = cli("--model", "Llama-2-7B", "--hardware", "Groq-LPU", "--plan", "--chips", "1,2,4,8",
                       "--seq-len", "1024")
    assert code == 2 and "fits none of the splits" in err and "smallest split that fits" in err


def test_plain_analysis_reports_joules_per_token(cli):
    code, out, _ = cli("--model", "TINY", "--hardware", "CHIP", "--phase", "prefill", "--seq-len", "10", "--json")
    t = json.loads(out)["totals"]
    assert code == 0 and t["joules_per_token"] == pytest.approx(10 * t["time_s"] / 10)


def test_uneven_heads_split_by_whole_kv_groups_as_the_runtime_does():
    # 6 heads / 3 KV heads over 2 chips: the runtime (edgellm.runtime.sharding) gives one chip 2 KV
    # groups (4 heads) and the other 1 (2 heads); the planner times the busier chip, so its
    # head-split layers cost 2/3 of one chip's, not 1/2. Memory-bound decode on the toy chip: the
    # block time per chip is (attention bytes x 2/3 + MLP bytes / 2 + norms) / bandwidth.
    cfg = ModelConfig.from_hf_config({**TINY_HF, "hidden_size": 96, "num_attention_heads": 6,
                                      "num_key_value_heads": 3}, name="tiny6")
    assert plan_split(cfg, CHIP, pp=1, tp=2, prompt_tokens=16, link=LINK).reason == ""
    assert "only 3 KV heads" in plan_split(cfg, CHIP, pp=1, tp=4, prompt_tokens=16, link=LINK).reason
    one = analyze(cfg, CHIP, "decode", 1, 15, 16, 16, 16)
    two = plan_split(cfg, CHIP, pp=1, tp=2, prompt_tokens=16, context=16, link=LINK)
    by_name = {x.name: x.time_per_block_s for x in one.layers}
    attn = sum(t for n, t in by_name.items() if n in ("q_proj", "k_proj", "v_proj", "o_proj", "rope",
                                                      "qk_matmul", "softmax", "sv_matmul", "fused_attention"))
    mlp = sum(t for n, t in by_name.items() if n in ("gate_proj", "up_proj", "mlp_act", "down_proj"))
    whole = sum(t for n, t in by_name.items() if n in ("attn_norm", "ffn_norm", "attn_add", "ffn_add"))
    ends = by_name["embedding"] / 2 + by_name["lm_head"] / 2 + by_name["final_norm"]   # vocab split; norm whole
    expected = cfg.n_layers * (attn * 2 / 3 + mlp / 2 + whole) + ends
    stage = two.stages[0]
    assert set(by_name) <= {"q_proj", "k_proj", "v_proj", "o_proj", "rope", "qk_matmul", "softmax", "sv_matmul",
                            "fused_attention", "gate_proj", "up_proj", "mlp_act", "down_proj", "attn_norm",
                            "ffn_norm", "attn_add", "ffn_add", "embedding", "lm_head", "final_norm"}
    assert stage.decode_s - stage.decode_comm_s == pytest.approx(expected, rel=1e-9)
