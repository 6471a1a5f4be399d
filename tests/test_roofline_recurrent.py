"""The roofline analyzer on attention-free models: a decode step's operations and bytes are flat in
the context (an attention model's grow), the state is counted at hand-worked sizes, the parameters
the layers carry add up to what transformers' own models hold, and the crossover against an
attention model brackets the context where the attention model's step becomes the dearer one."""

from __future__ import annotations

import pytest

from edgellm.errors import InvalidParameterError
from edgellm.roofline.analyze import analyze, crossover_context, crossover_versus
from edgellm.roofline.hardware import resolve_hardware
from edgellm.roofline.recurrent import state_bytes
from edgellm.roofline.zoo import config_from_hf_file, resolve_model


@pytest.fixture(scope="module")
def hw():
    return resolve_hardware("H100-SXM")


@pytest.mark.parametrize("name", ["Mamba-130M", "Mamba-Codestral-7B", "RWKV-4-169M"])
def test_a_decode_step_is_flat_in_the_context(hw, name):
    cfg = resolve_model(name)
    short, long = analyze(cfg, hw, "decode", 1, 10), analyze(cfg, hw, "decode", 1, 100_000)
    assert (short.ops, short.memory_bytes, short.kv_cache_bytes) == (long.ops, long.memory_bytes, long.kv_cache_bytes)
    llama_short, llama_long = (analyze(resolve_model("SmolLM2-135M"), hw, "decode", 1, n) for n in (10, 100_000))
    assert llama_long.memory_bytes > 2 * llama_short.memory_bytes       # its KV cache is read every step


def test_hand_worked_mamba_130m_figures(hw):
    cfg = resolve_model("Mamba-130M")
    a = analyze(cfg, hw, "decode", 4, 1000, kv_bits=32)
    layer = {x.name: x.cost for x in a.layers}
    assert layer["in_proj"].ops == 2 * 4 * 768 * 3072                    # 4 tokens through h -> 2 * d_inner
    # per sequence and layer: conv (d_inner x 3 taps) + ssm (d_inner x 16), float32
    assert state_bytes(cfg, 32) == 24 * 1536 * (3 + 16) * 4
    assert a.kv_cache_bytes == 4 * 24 * 1536 * (3 + 16) * 4
    assert layer["selective_scan"].load_kv == layer["selective_scan"].store_kv == 4 * 1536 * 16 * 4


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_parameters_add_up_to_transformers_models(hw, tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    if kind == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=3, time_step_rank=5))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=3, num_heads=8, head_dim=8, n_groups=2))
    model.save_pretrained(str(tmp_path))                               # config.json as transformers writes it
    cfg = config_from_hf_file(tmp_path / "config.json")
    a = analyze(cfg, hw, "decode", 1, 16, weight_bits=16)
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}      # a tied head counted once
    assert a.weight_bytes == 2 * sum(unique.values())


def test_crossover_against_an_attention_model_brackets_the_context(hw):
    mamba, smol = resolve_model("Mamba-2.8B"), resolve_model("SmolLM2-1.7B")
    n = crossover_versus(mamba, smol, hw, "decode")
    assert n is not None and n > 0

    def dearer(k: int) -> bool:
        return analyze(smol, hw, "decode", 1, k).time_s >= analyze(mamba, hw, "decode", 1, k).time_s

    assert dearer(n) and not dearer(n - 1)
    with pytest.raises(InvalidParameterError, match="--against"):
        crossover_context(mamba, hw, "decode")
