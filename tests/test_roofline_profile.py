"""`edgellm analyze --measure`: the engine timed op by op next to the roofline.

Correctness is checked against independent references: the engine's own step (the traced per-layer
pass must give its logits and KV cache, with every op of every block in the trace once), the GGUF
file's tensor sizes read by the ``gguf`` package, and weight bytes and
operations worked by hand for the tiny model. Timings are only checked for sanity (positive, under
the roofline); speed is reported by the command, never asserted.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import edgellm.cli.main
from edgellm.kv.cache import BLOCK_SIZE, KVCache
from edgellm.loading.load import load_model
from edgellm.models.trace import OPS
from edgellm.roofline import profile
from edgellm.roofline.hardware import hardware_from_dict
from edgellm.runtime.model_runner import ModelRunner, SeqChunk
from tiny_model import TINY, write_tiny_llama

# A made-up chip with round figures, so predicted times can be worked by hand; far faster than this
# CPU (a 2-core VM reaches ~0.1 TFLOPS and ~20 GB/s), so every op must land below its roofline.
TEST_CHIP = {"name": "test chip", "peak_TOPS": {"fp32": 1}, "memory_bandwidth_GBps": 200, "memory_GB": 16}
Q4_1 = 20 / 32        # bytes per weight: 32 four-bit codes (16 bytes) + fp16 scale and min (4 bytes)
Q8_0 = 34 / 32        # 32 int8 codes + an fp16 scale


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, smollm2_path):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", smollm2_path)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(str(tiny_path))


@pytest.fixture(scope="module")
def smollm2(smollm2_llm):
    return smollm2_llm.loaded      # the session's model: load_model's defaults, not changed by these tests


def _engine_and_traced(loaded, seq_len: int):
    """Engine and traced logits for a prefill then one decode step, their caches and the traced runner."""
    cfg, model = loaded.config, loaded.model
    ids = profile.prompt_ids(loaded.tokenizer, seq_len + 1)
    n_blocks = -(-(seq_len + 1) // BLOCK_SIZE)
    slots = slice(0, n_blocks * BLOCK_SIZE)
    caches = [KVCache(cfg, n_blocks, BLOCK_SIZE) for _ in range(2)]
    runner, traced = ModelRunner(model, caches[0]), profile.traced_runner(model, caches[1])
    out = {"engine": [], "traced": [], "path": []}
    with torch.inference_mode():
        for chunk in (SeqChunk(ids[:seq_len], 0, slots), SeqChunk([ids[seq_len]], seq_len, slots)):
            out["engine"].append(runner.run([chunk]))
            out["traced"].append(traced.run([chunk]))
    out["path"] = profile.engine_path(runner, SeqChunk([ids[seq_len]], seq_len, slots))
    return out, caches, traced.trace


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_traced_pass_gives_the_engines_logits_and_cache(which, request):
    loaded = request.getfixturevalue(which)
    out, (c_engine, c_traced), trace = _engine_and_traced(loaded, 20)
    for engine, traced in zip(out["engine"], out["traced"]):      # prefill, then decode
        assert engine.shape == traced.shape == (1, loaded.config.vocab_size)
        torch.testing.assert_close(traced, engine, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c_traced.data, c_engine.data, atol=1e-5, rtol=1e-5)
    if which == "smollm2":   # its decode step really took the all-blocks native call
        assert "native" in out["path"]


def test_the_trace_holds_every_op_of_every_block_once_in_order(tiny):
    """The op scopes the profiler reads: per step, the embedding and the cos/sin look-up, then each
    block's nine ops (layer 0, 1, ...), then the final norm and the lm_head; names are the profiler's."""
    _, _, trace = _engine_and_traced(tiny, 12)
    block_ops = [op.name for op in profile.ENGINE_OPS if op.per_block]
    want = [("embedding", None), ("rope", None)] + [(op, i) for i in range(tiny.config.n_layers) for op in block_ops] \
        + [("final_norm", None), ("lm_head", None)]
    assert [s.tokens for s in trace.steps] == [12, 1]
    for step in trace.steps:
        assert [(op, layer) for op, layer, _ in step.ops] == want
        assert all(sec >= 0 for _, _, sec in step.ops)
        assert sum(sec for _, _, sec in step.ops) <= step.seconds
    assert [op.name for op in profile.ENGINE_OPS] == [op for op in OPS if op != "decode_blocks"]


def test_trace_callback_sees_each_op_as_it_ends(tiny):
    seen = []
    cache = KVCache(tiny.config, 1, BLOCK_SIZE)
    runner = profile.traced_runner(tiny.model, cache)
    runner.trace.callback = lambda op, layer, seconds: seen.append((op, layer))
    runner.run([SeqChunk([5, 6, 7], 0, slice(0, BLOCK_SIZE))])
    assert seen == [(op, layer) for op, layer, _ in runner.trace.steps[0].ops] and len(seen) > 10


@pytest.fixture(scope="module")
def tiny_report(tiny):
    return profile.measure_model(tiny, hardware_from_dict(TEST_CHIP), seq_len=16, repeats=2)


def test_report_structure_and_sanity(tiny_report):
    assert tiny_report["measured"] is True and tiny_report["batch"] == 1 and tiny_report["seq_len"] == 16
    assert [p["phase"] for p in tiny_report["phases"]] == ["prefill", "decode"]
    keys = {"name", "ops", "memory_bytes", "arithmetic_intensity", "attainable_ops_per_s", "bound", "time_s",
            "measured_time_s", "achieved_bytes_per_s", "achieved_ops_per_s", "roofline_fraction", "layers"}
    for ph in tiny_report["phases"]:
        rows = ph["layers"]
        assert [r["name"] for r in rows] == [op.name for op in profile.ENGINE_OPS]
        covered = [name for r in rows for name in r["layers"]]
        assert len(covered) == len(set(covered)) == 19 - 2    # every analyzer layer once (fused attention: 1)
        for r in rows:
            assert keys <= set(r)
            assert r["measured_time_s"] > 0 and r["time_s"] > 0
            assert 0 < r["roofline_fraction"] < 1
            assert r["roofline_fraction"] == pytest.approx(r["time_s"] / r["measured_time_s"])
            assert r["achieved_bytes_per_s"] == pytest.approx(r["memory_bytes"] / r["measured_time_s"])
            assert r["achieved_ops_per_s"] == pytest.approx(r["ops"] / r["measured_time_s"])
            assert r["time_s"] == pytest.approx(sum(r["predicted_by_layer_s"].values()))
        t = ph["totals"]
        assert t["time_s"] == pytest.approx(sum(r["time_s"] for r in rows))
        assert t["measured_sum_of_parts_s"] == pytest.approx(sum(r["measured_time_s"] for r in rows))
        assert t["op_by_op_pass_s"] > 0 and t["engine_step_s"] > 0 and 0 <= t["overhead_s"] < t["op_by_op_pass_s"]
        assert t["measured_tokens_per_s"] > 0 and len(ph["samples"]["engine_s"]) == 2


@pytest.mark.parametrize("readings,cores,busy", [((1.5, 9.5), 4, "load average 9.5 on 4 cores"),
                                                 ((0.5, 1.0), 4, None),
                                                 ((3.0, 2.0), 2, "load average 3.0 on 2 cores")])
def test_load_average_is_the_busier_reading_and_a_busy_machine_is_noted(tiny, monkeypatch, readings, cores, busy):
    """The OS's 1-minute load average read before and after the timing (given here): the report keeps
    the larger, and says the machine was busy when it exceeds the core count."""
    left = list(readings)
    monkeypatch.setattr(os, "getloadavg", lambda: (left.pop(0) if len(left) > 1 else left[0], 0.0, 0.0))
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    report = profile.measure_model(tiny, hardware_from_dict(TEST_CHIP), seq_len=16, repeats=1)
    assert report["load_average"] == max(readings)
    said = [n for n in report["notes"] if n.startswith("the machine was busy")]
    if busy is None:
        assert said == []
    else:
        assert len(said) == 1 and said[0].startswith(f"the machine was busy ({busy})"), said


def test_weight_bytes_and_ops_by_hand(tiny_report, tiny):
    h, f, L = TINY["hidden"], TINY["ffn"], TINY["n_layers"]
    kv = TINY["n_kv_heads"] * h // TINY["n_heads"]
    pre, dec = ({r["name"]: r for r in p["layers"]} for p in tiny_report["phases"])
    vocab = tiny.config.vocab_size
    assert vocab == 49152                                    # SmolLM2's vocabulary, lm_head tied to the embedding
    want = {"qkv_proj": L * (h + 2 * kv) * h * Q4_1,         # 2 x 128 x 64 x 0.625 = 10240
            "o_proj+attn_add": L * h * h * Q4_1,             # 5120
            "gate_up_proj": L * 2 * f * h * Q4_1,            # 20480
            "down_proj+ffn_add": L * h * f * Q4_1,           # 10240
            "lm_head": vocab * h * Q8_0}                     # 3342336
    for rows in (pre, dec):
        for name, value in want.items():
            assert rows[name]["weight_bytes"] == pytest.approx(value), name
    assert want["qkv_proj"] == 10240 and want["lm_head"] == 3342336
    assert pre["embedding"]["weight_bytes"] == pytest.approx(16 * h * Q8_0)      # 16 prompt rows
    assert dec["embedding"]["weight_bytes"] == pytest.approx(1 * h * Q8_0)
    # ops: 2 per multiply-add over 16 prompt tokens (prefill) or 1 token (decode)
    assert pre["qkv_proj"]["ops"] == 2 * 16 * h * (h + 2 * kv) * L
    assert dec["gate_up_proj"]["ops"] == 2 * 1 * h * 2 * f * L
    # prediction on the test chip by hand, decode, per block: q, k and v each read the fp32 input (3 x 4h
    # bytes) and write their fp32 outputs (4 (h + 2 kv)); the fused Q4_1 matrix is read once. Memory-bound.
    qkv_bytes = 3 * 4 * h + 4 * (h + 2 * kv) + (h + 2 * kv) * h * Q4_1
    assert dec["qkv_proj"]["memory_bytes"] == pytest.approx(L * qkv_bytes)
    assert dec["qkv_proj"]["time_s"] == pytest.approx(L * qkv_bytes / 200e9)
    assert dec["qkv_proj"]["bound"] == "memory"


def test_default_model_bytes_match_the_gguf_file(smollm2, smollm2_path):
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(smollm2_path)).tensors}
    fmt = profile.engine_formats(smollm2)
    assert fmt["matrices"]["qkv"] == "Q4_1" and fmt["bytes_per_weight"]["q_proj"] == pytest.approx(Q4_1)
    a = profile.predict(smollm2, hardware_from_dict(TEST_CHIP), "decode", 8)
    by = {x.name: x.cost.load_weight * x.count for x in a.layers}
    qkv_file = sum(v for k, v in sizes.items() if k.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight")))
    assert by["q_proj"] + by["k_proj"] + by["v_proj"] == pytest.approx(qkv_file)
    assert by["down_proj"] == pytest.approx(sum(v for k, v in sizes.items() if k.endswith("ffn_down.weight")))
    assert by["lm_head"] == pytest.approx(sizes["token_embd.weight"])   # tied: the embedding matrix is read


def test_default_model_measured_on_this_machine(smollm2):
    from edgellm.roofline.measure import measure_local

    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # one thread: a shared CI machine slows multi-threaded calls the most
    try:
        hw = hardware_from_dict(measure_local(budget_s=1.0))      # measured now with that thread, not cached
        report = profile.measure_model(smollm2, hw, seq_len=16, repeats=1)
    finally:
        torch.set_num_threads(threads)
    for ph in report["phases"]:
        for r in ph["layers"]:
            assert r["measured_time_s"] > 0 and 0 < r["roofline_fraction"] <= 1.5, (ph["phase"], r["name"])
        assert 0 < ph["totals"]["roofline_fraction_engine_step"] <= 1.5
    text = profile.format_table(report)
    assert "PREFILL" in text and "DECODE" in text and "sum of parts" in text and "engine step" in text


# ---- the command ---------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(edgellm.cli.main, "COMMANDS", {"analyze": edgellm.cli.main.COMMANDS["analyze"]})
    chip = tmp_path / "chip.json"
    chip.write_text(json.dumps(TEST_CHIP))

    def run(*argv, hardware=True):
        extra = ["--hardware", str(chip)] if hardware else []
        code = edgellm.cli.main.main(["analyze", "--measure", *extra, *argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_cli_json_csv_table_plot(cli, tiny_path, tmp_path):
    png = tmp_path / "measured.png"
    code, out, err = cli("--model", str(tiny_path), "--seq-len", "8", "--repeat", "1", "--phase", "decode",
                         "--format", "json", "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    data = json.loads(out)
    assert data["hardware"] == "test chip" and [p["phase"] for p in data["phases"]] == ["decode"]
    assert data["phases"][0]["layers"][2]["layers"] == ["q_proj", "k_proj", "v_proj"]
    code, out, _ = cli("--model", str(tiny_path), "--seq-len", "8", "--repeat", "1", "--format", "csv")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].startswith("phase,name,layers") and len(lines) == 1 + 2 * (12 + 2)
    assert any(line.startswith("prefill,qkv_proj,q_proj+k_proj+v_proj,2,") for line in lines)
    code, out, _ = cli("--model", str(tiny_path), "--seq-len", "8", "--repeat", "1", "--phase", "prefill",
                       "--attention", "unfused")
    assert code == 0 and "PREFILL" in out and "DECODE" not in out and "engine step" in out
    assert "block by block" in out         # a prefill never takes the fused decode call


@pytest.mark.parametrize("argv, message", [
    (["--batch", "2"], "one sequence"),
    (["--weight-bits", "4"], "cannot be combined with --weight-bits"),
    (["--plan"], "cannot be combined with --plan"),
    (["--repeat", "0"], "--repeat must be at least 1"),
    (["--seq-len", "-3"], "non-negative"),
    (["--seq-len", "64"], "context window is 64"),
    (["--seq-len", "0", "--phase", "prefill"], "at least 1 token"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--plot", "/no/such/folder/r.png"], "does not exist"),
    (["--plot", "roofline.bmpx"], "image format"),
])
def test_cli_bad_input(cli, tiny_path, argv, message):
    code, _, err = cli("--model", str(tiny_path), *argv)
    assert code == 2 and message in err


def test_cli_unknown_model_lists_the_names(cli):
    code, _, err = cli("--model", "no-such-model")
    assert code == 2 and "smollm2-135m" in err
