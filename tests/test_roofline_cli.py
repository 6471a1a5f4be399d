"""`edgellm analyze` end to end: outputs, model and hardware files, bad input, this machine, plots."""

from __future__ import annotations

import csv
import io
import json
from types import SimpleNamespace

import pytest
import torch

import edgellm.cli.main
from edgellm.errors import EdgeLLMError
from edgellm.roofline import hardware as hwmod
from edgellm.roofline import measure
from edgellm.roofline.analyze import analyze, compare, format_comparison
from edgellm.roofline.hardware import HARDWARE, load_hardware_file, resolve_hardware
from edgellm.roofline.zoo import ZOO, resolve_model, zoo_config


@pytest.fixture(autouse=True)
def only_analyze(monkeypatch, tmp_path):
    """Run the real dispatcher with only this command registered (other commands are other modules'),
    and keep the local-hardware cache in a temporary folder."""
    monkeypatch.setattr(edgellm.cli.main, "COMMANDS", {"analyze": edgellm.cli.main.COMMANDS["analyze"]})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def run(capsys, *argv):
    code = edgellm.cli.main.main(["analyze", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- outputs -------------------------------------------------------------------------------------
def test_json_output(capsys):
    code, out, _ = run(capsys, "--model", "Llama-2-7B", "--hardware", "A6000", "--phase", "prefill",
                       "--seq-len", "1024", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "Llama-2-7B" and data["phase"] == "prefill" and "A6000" in data["hardware"]
    names = [layer["name"] for layer in data["layers"]]
    for expected in ("embedding", "attn_norm", "q_proj", "k_proj", "v_proj", "rope", "qk_matmul", "softmax",
                     "sv_matmul", "o_proj", "attn_add", "ffn_norm", "gate_proj", "up_proj", "down_proj",
                     "ffn_add", "final_norm", "lm_head"):
        assert expected in names
    for layer in data["layers"]:
        assert {"name", "ops", "memory_bytes", "arithmetic_intensity", "attainable_ops_per_s", "bound",
                "time_s"} <= set(layer)
        assert layer["bound"] in ("compute", "memory")
    q = next(layer for layer in data["layers"] if layer["name"] == "q_proj")
    assert q["count"] == 32 and q["ops"] == pytest.approx(32 * q["per_block"]["ops"])
    assert data["totals"]["time_to_first_token_s"] == pytest.approx(sum(x["time_s"] for x in data["layers"]))
    assert data["conventions"] and "whole model" in data["layer_figures"]


def test_table_output_states_conventions(capsys):
    code, out, _ = run(capsys, "--model", "SmolLM2-135M", "--hardware", "RTX-4090", "--seq-len", "100")
    assert code == 0
    assert "decode:" in out and "tokens/s" in out and "conventions:" in out and "memory" in out


def test_csv_output(capsys):
    code, out, _ = run(capsys, "--model", "Qwen2.5-0.5B", "--hardware", "H100-SXM", "--format", "csv",
                       "--attention", "fused")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    names = [r["name"] for r in rows]
    assert "fused_attention" in names and "softmax" not in names and names[-1] == "total"
    assert float(rows[-1]["time_s"]) == pytest.approx(sum(float(r["time_s"]) for r in rows[:-1]))


def test_plan_and_crossover(capsys):
    code, out, _ = run(capsys, "--model", "Llama-3-8B", "--hardware", "RTX-4090", "--plan", "--weight-bits", "4")
    assert code == 0 and "KV cache room" in out and "largest batch" in out
    code, out, _ = run(capsys, "--model", "Llama-2-7B", "--hardware", "A6000", "--crossover", "--format", "json")
    assert code == 0
    rows = json.loads(out)["crossover"]
    assert {(r["phase"], r["attention"]) for r in rows} == {("prefill", "unfused"), ("prefill", "fused"),
                                                            ("decode", "unfused"), ("decode", "fused")}
    assert all(r["by_ops"] > 1000 for r in rows)


# ---- models from files -----------------------------------------------------------------------------
def test_gguf_model(smollm2_path):
    cfg = resolve_model(str(smollm2_path))
    zoo = zoo_config("SmolLM2-135M")
    for attr in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "ffn_size", "vocab_size",
                 "tie_embeddings"):
        assert getattr(cfg, attr) == getattr(zoo, attr), attr
    assert 4 < cfg.extra["gguf_bits_per_weight"] < 8


def test_config_json_model(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ZOO["Mistral-7B"]))
    cfg = resolve_model(str(tmp_path))              # the folder, or the file
    assert cfg.n_kv_heads == 8 and cfg.hidden_size == 4096
    assert resolve_model(str(path)) == cfg


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("hidden_size"), "hidden_size"),
    (lambda d: d.update(num_attention_heads="many"), "num_attention_heads"),
    (lambda d: d.update(intermediate_size=-5), "intermediate_size"),
])
def test_malformed_config_names_the_field(tmp_path, capsys, edit, message):
    data = dict(ZOO["Llama-2-7B"])
    edit(data)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    code, _, err = run(capsys, "--model", str(path), "--hardware", "A6000")
    assert code == 2 and message in err and "Traceback" not in err


def test_config_not_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text("{ not json")
    code, _, err = run(capsys, "--model", str(path), "--hardware", "A6000")
    assert code == 2 and "not valid JSON" in err


# ---- hardware files ------------------------------------------------------------------------------
GOOD_HW = "name: Test chip\npeak_TOPS: {fp16: 50, int8: 100}\nmemory_bandwidth_GBps: 500\nmemory_GB: 16\n"


def test_hardware_yaml_and_json(tmp_path):
    y = tmp_path / "chip.yaml"
    y.write_text(GOOD_HW + "source: my datasheet\n")
    hw = load_hardware_file(y)
    assert hw.peak(16) == 50e12 and hw.bandwidth == 500e9 and hw.memory_bytes == 16e9
    assert hw.source == "my datasheet"
    j = tmp_path / "chip.json"
    j.write_text(json.dumps(HARDWARE["A6000"].to_dict()))
    assert resolve_hardware(str(j)).peak_ops == HARDWARE["A6000"].peak_ops


@pytest.mark.parametrize("text,message", [
    (GOOD_HW.replace("memory_bandwidth_GBps: 500\n", ""), "memory_bandwidth_GBps"),
    (GOOD_HW.replace("memory_GB: 16", "memory_GB: lots"), "memory_GB"),
    (GOOD_HW.replace("fp16: 50", "fp64: 50"), "peak_TOPS.fp64"),
    (GOOD_HW.replace("int8: 100", "int8: -1"), "peak_TOPS.int8"),
    ("name: [unclosed\n", "not valid"),
])
def test_malformed_hardware_file_names_the_field(tmp_path, capsys, text, message):
    path = tmp_path / "chip.yaml"
    path.write_text(text)
    code, _, err = run(capsys, "--model", "Llama-2-7B", "--hardware", str(path))
    assert code == 2 and message in err and "Traceback" not in err


# ---- bad input through the CLI ----------------------------------------------------------------------
def test_unknown_model_lists_the_zoo(capsys):
    code, _, err = run(capsys, "--model", "GPT-5", "--hardware", "A6000")
    assert code == 2
    assert "unknown model 'GPT-5'" in err and "Llama-2-7B" in err and "SmolLM2-135M" in err


def test_unknown_hardware_lists_the_table(capsys):
    code, _, err = run(capsys, "--model", "Llama-2-7B", "--hardware", "TPU-v9")
    assert code == 2
    assert "unknown hardware 'TPU-v9'" in err and "A6000" in err and "Groq-LPU" in err and "local" in err


@pytest.mark.parametrize("argv,message", [
    (["--batch", "0"], "batch must be a positive integer"),
    (["--seq-len", "-3"], "non-negative"),
    (["--phase", "prefill", "--seq-len", "0"], "at least 1 token"),
    (["--weight-bits", "7"], "weight bits must be one of"),
    (["--act-bits", "12"], "activation bits must be one of"),
    (["--kv-bits", "6"], "KV-cache bits must be one of"),
])
def test_impossible_values_refused(capsys, argv, message):
    # --hardware local would measure: the refusal must come first, without measuring
    code, _, err = run(capsys, "--model", "Llama-2-7B", "--hardware", "local", *argv)
    assert code == 2 and message in err
    assert not hwmod.local_cache_path().exists()


def test_missing_model_and_hardware(capsys):
    code, _, err = run(capsys, "--hardware", "A6000")
    assert code == 2 and "no model given" in err
    code, _, err = run(capsys, "--model", "Llama-2-7B")
    assert code == 2 and "no hardware given" in err and "A6000" in err


# ---- this machine ------------------------------------------------------------------------------------
def fake_measurement(**_):
    return {"name": "local: fake", "peak_TOPS": {"fp32": 0.1, "bf16": 0.2, "int8": 0.3},
            "memory_bandwidth_GBps": 20.0, "memory_GB": 16.0, "source": "fake",
            "measured": {"fingerprint": measure.machine_fingerprint()}}


def test_local_hardware_is_cached_under_xdg_cache_home(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(measure, "measure_local", lambda **kw: calls.append(kw) or fake_measurement())
    hw = resolve_hardware("local")
    assert hw.bandwidth == 20e9 and len(calls) == 1
    path = hwmod.local_cache_path()
    assert path == tmp_path / "cache" / "edgellm" / "hardware-local.json"
    cached = json.loads(path.read_text())
    assert cached["memory_bandwidth_GBps"] == 20.0 and cached["peak_TOPS"]["bf16"] == 0.2
    assert resolve_hardware("local").peak(16) == 0.2e12 and len(calls) == 1        # from the cache
    cached["memory_bandwidth_GBps"] = 40.0                                          # the file is what is read
    path.write_text(json.dumps(cached))
    assert resolve_hardware("local").bandwidth == 40e9 and len(calls) == 1
    resolve_hardware("local", remeasure=True)
    assert len(calls) == 2                                                          # --remeasure


def test_local_cache_of_another_machine_is_measured_again(monkeypatch):
    stale = fake_measurement()
    stale["measured"]["fingerprint"] = {"threads": 999}
    path = hwmod.local_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(stale))
    monkeypatch.setattr(measure, "measure_local", lambda **kw: fake_measurement())
    assert resolve_hardware("local").name == "local: fake"
    assert json.loads(path.read_text())["measured"]["fingerprint"]["threads"] != 999


def test_cli_local_with_remeasure(monkeypatch, capsys):
    monkeypatch.setattr(measure, "measure_local", lambda **kw: fake_measurement())
    code, out, err = run(capsys, "--model", "SmolLM2-135M", "--hardware", "local", "--remeasure",
                         "--format", "json")
    assert code == 0 and "measuring this machine" in err
    assert json.loads(out)["hardware"] == "local: fake"


def test_micro_benchmarks_turn_times_into_rates(monkeypatch):
    """The real copy and matmuls, timed by a clock that advances 1/1024 s per reading, so every
    timed run takes exactly 1/1024 s and the rates are worked by hand: bytes read + written per
    second, 2 operations per multiply-add. Speed itself is never asserted."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: next(ticks) / 1024))
    n_bytes, n = 8 * 2**20, 128
    assert measure.measure_bandwidth(budget_s=0.05, n_bytes=n_bytes) == 2 * n_bytes * 1024
    assert measure.measure_matmul("fp32", budget_s=0.05, n=n) == 2 * n**3 * 1024
    # int8: measured where torch's int8 matmul runs on this machine (tried here directly), None elsewhere
    try:
        torch._int_mm(torch.ones(32, 32, dtype=torch.int8), torch.ones(32, 32, dtype=torch.int8))
        runs = True
    except (RuntimeError, AttributeError, NotImplementedError):
        runs = False
    assert measure.measure_matmul("int8", budget_s=0.05, n=n) == (2 * n**3 * 1024 if runs else None)


def test_measured_next_to_predicted():
    a = analyze(zoo_config("SmolLM2-135M"), HARDWARE["A6000"], "decode", 1, 64)
    predicted = {layer.name: layer.time_s for layer in a.layers}
    rows = compare(a, {"q_proj": 2 * predicted["q_proj"], "lm_head": predicted["lm_head"]})
    assert [r.name for r in rows] == ["q_proj", "lm_head"]
    assert rows[0].roofline_fraction == pytest.approx(0.5)
    assert rows[1].roofline_fraction == pytest.approx(1.0)
    q = next(layer for layer in a.layers if layer.name == "q_proj")
    assert rows[0].achieved_bytes_per_s == pytest.approx(q.memory_bytes / (2 * q.time_s))
    assert "q_proj" in format_comparison(rows)
    with pytest.raises(EdgeLLMError, match="not in the analysis"):
        compare(a, {"attention_block": 1.0})


def test_measure_refuses_a_chip_other_than_this_machine(capsys):
    # refused before any model is loaded or anything measured (--measure itself: tests/test_roofline_profile.py)
    code, _, err = run(capsys, "--model", "SmolLM2-135M", "--hardware", "A6000", "--measure")
    assert code == 2 and "times this machine" in err and "A6000" in err
    assert not hwmod.local_cache_path().exists()


def test_repeat_without_measure_refused(capsys):
    code, _, err = run(capsys, "--model", "SmolLM2-135M", "--hardware", "A6000", "--repeat", "3")
    assert code == 2 and "--repeat only applies to --measure" in err


# ---- plots ---------------------------------------------------------------------------------------
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_are_valid_pngs(tmp_path, capsys):
    roof, layers = tmp_path / "roofline.png", tmp_path / "layers.png"
    code, _, err = run(capsys, "--model", "Llama-2-7B", "--hardware", "A6000", "--seq-len", "1024",
                       "--plot", str(roof), "--plot-layers", str(layers))
    assert code == 0 and "wrote" in err
    for path in (roof, layers):
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_plot_to_a_missing_folder_refused(tmp_path, capsys):
    code, _, err = run(capsys, "--model", "SmolLM2-135M", "--hardware", "A6000",
                       "--plot", str(tmp_path / "nope" / "r.png"))
    assert code == 2 and "does not exist" in err
