"""Mamba from GGUF files in llama.cpp's layout, against transformers and against llama.cpp itself.

A tiny random transformers ``MambaForCausalLM`` (widths multiples of 32, so every projection
splits into quantisation blocks; SmolLM2's real BPE vocabulary) is written here with the ``gguf``
package as llama.cpp's ``convert_hf_to_gguf.py`` lays Mamba out: ``ssm_*`` tensor names, the
convolution squeezed to [d_inner, d_conv], ``ssm_a`` stored as ``-exp(A_log)``, the head tied to
the embedding (no ``output.weight``), the ``mamba.ssm.*`` keys. One copy holds every tensor as
F32; others hold the projections and the embedding quantised (Q8_0, Q4_0) by ``gguf.quants``,
the small tensors (convolution, A, D, norms, biases) F32, as llama.cpp's quantiser leaves them.

References, each independent of edgellm:

* the F32 file against transformers on the same weights: prompt logits (in chunks that cross
  block edges) and every decode step within 1e-3;
* a quantised file against transformers on the weights ``gguf.quants.dequantize`` decodes from
  it: within 1e-3 as well (edgellm's kernels multiply the blocks with float32 activations);
* llama.cpp (llama-cpp-python) on the same files: on F32 ones identical greedy tokens and logits
  within 1e-3; on quantised ones logits within ``LLAMA_CPP_TOLERANCE`` (see there why it is looser).

Mamba-2 (arch "mamba2") gets the same checks on a model with two groups of heads. The Q4_0 copy
runs with ``-m slow`` only (CI keeps Q8_0).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from recurrent_parity import (  # noqa: E402
    PROMPT_LEN,
    TOLERANCE,
    check_chunked_prefill_and_decode,
    check_resume_from_block_edge,
    reference_logits,
    token_ids,
)

from edgellm.errors import ModelFormatError  # noqa: E402
from edgellm.loading.gguf import read_gguf  # noqa: E402
from edgellm.loading.load import load_model  # noqa: E402

HIDDEN, STATE, DT_RANK, LAYERS = 64, 16, 32, 2
#: the projections and the embedding llama.cpp's quantiser converts (ssm_conv1d, ssm_a, ssm_d,
#: norms and biases stay F32)
QUANTISED = ("ssm_in.weight", "ssm_x.weight", "ssm_dt.weight", "ssm_out.weight", "token_embd.weight", "output.weight")
#: llama.cpp rounds the activations to 8-bit blocks (Q8_0) before every quantised matmul; edgellm
#: multiplies them in float32. On these models (logits of standard deviation ~0.85, largest 4 to 6)
#: that rounding is worth 0.05 to 0.1: transformers with its Linear inputs rounded to Q8_0 blocks
#: moves from its float32-activation self by 0.050 (Mamba) and 0.103 (Mamba-2), and llama.cpp
#: differs from edgellm by 0.047 (Mamba, Q8_0), 0.050 (Mamba, Q4_0) and 0.103 (Mamba-2, Q8_0) --
#: while on the F32 files, where neither side rounds, the two agree within 3e-6. 0.2 is twice the
#: largest rounding effect and still catches any layout error (a transposed, missing or mis-signed
#: tensor moves logits by whole units).
LLAMA_CPP_TOLERANCE = 0.2


@pytest.fixture(scope="module")
def reference(smollm2_path):
    vocab = len(read_gguf(smollm2_path).metadata["tokenizer.ggml.tokens"])
    cfg = transformers.MambaConfig(vocab_size=vocab, hidden_size=HIDDEN, state_size=STATE, num_hidden_layers=LAYERS,
                                   expand=2, conv_kernel=4, time_step_rank=DT_RANK, use_bias=False,
                                   use_conv_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg).float().eval()
    with torch.no_grad():   # random norms, skips and step sizes: every term of the mixer shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.normal_(1.0, 0.3)
            elif name.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            elif name.endswith("dt_proj.bias"):
                p.uniform_(-3.0, 0.5)
            elif name.endswith("dt_proj.weight"):
                p.normal_(0.0, 0.2)
    return model


def write_mamba_gguf(path, reference, source_gguf, qtype: str | None = None, drop_key: str | None = None,
                     drop_tensor: str | None = None, **keys_set) -> dict[str, torch.Tensor]:
    """``reference`` as llama.cpp's converter writes a Mamba (``qtype``: the QUANTISED tensors in
    that block type), with ``source_gguf``'s tokenizer; ``keys_set``: ``mamba.`` keys overridden
    (dots as double underscores). Returns the state dict transformers must load to compute what the
    file holds (the quantised tensors as ``gguf.quants`` decodes them)."""
    cfg = reference.config
    sd = {k: v.detach().float().numpy() for k, v in reference.state_dict().items()}
    keys = {"ssm.conv_kernel": cfg.conv_kernel, "ssm.inner_size": cfg.intermediate_size, "ssm.state_size": STATE,
            "ssm.time_step_rank": DT_RANK, "ssm.dt_b_c_rms": False,
            **{k.replace("__", "."): v for k, v in keys_set.items()}}
    tensors = []
    for i in range(LAYERS):
        hf, p = f"backbone.layers.{i}.", f"blk.{i}."
        m = hf + "mixer."
        tensors += [(p + "attn_norm.weight", hf + "norm.weight", None),
                    (p + "ssm_in.weight", m + "in_proj.weight", None),
                    (p + "ssm_conv1d.weight", m + "conv1d.weight", sd[m + "conv1d.weight"][:, 0, :]),  # squeezed
                    (p + "ssm_conv1d.bias", m + "conv1d.bias", None),
                    (p + "ssm_x.weight", m + "x_proj.weight", None),
                    (p + "ssm_dt.weight", m + "dt_proj.weight", None),
                    (p + "ssm_dt.bias", m + "dt_proj.bias", None),
                    (p + "ssm_a", m + "A_log", -np.exp(sd[m + "A_log"])),
                    (p + "ssm_d", m + "D", None),
                    (p + "ssm_out.weight", m + "out_proj.weight", None)]
    return write_ssm_gguf(path, "mamba", sd, keys, tensors, source_gguf, qtype, drop_key, drop_tensor)


def write_ssm_gguf(path, arch: str, sd: dict[str, np.ndarray], keys: dict, tensors: list, source_gguf,
                   qtype: str | None, drop_key: str | None = None, drop_tensor: str | None = None):
    """A GGUF of architecture ``arch``: the common keys, ``keys`` (``arch.`` prefixed), SmolLM2's
    tokenizer, the embedding and final norm, then ``tensors`` ((gguf name, state-dict name, the
    array as llama.cpp stores it or None for the state dict's own)); the head is written only when
    the state dict's ``lm_head.weight`` is not the embedding. Returns the state dict as the file holds it."""
    from gguf.quants import dequantize, quantize

    held = dict(sd)
    w = gguf.GGUFWriter(str(path), arch)
    keys = {"block_count": LAYERS, "context_length": 1 << 20, "embedding_length": HIDDEN, "feed_forward_length": 0,
            "attention.head_count": 0, "attention.layer_norm_rms_epsilon": 1e-5, **keys}
    for key, value in keys.items():
        if key == drop_key:
            continue
        add = w.add_bool if isinstance(value, bool) else w.add_uint32 if isinstance(value, int) else w.add_float32
        add(f"{arch}.{key}", value)
    meta = read_gguf(source_gguf).metadata
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    tied = np.array_equal(sd["lm_head.weight"], sd["backbone.embeddings.weight"])
    ends = [("token_embd.weight", "backbone.embeddings.weight", None), ("output_norm.weight", "backbone.norm_f.weight", None)]
    if not tied:
        ends.append(("output.weight", "lm_head.weight", None))
    for name, hf_name, array in ends + tensors:
        array = np.ascontiguousarray(sd[hf_name] if array is None else array, dtype=np.float32)
        if name == drop_tensor:
            continue
        if qtype is not None and name.endswith(QUANTISED):
            t = gguf.GGMLQuantizationType[qtype]
            data = quantize(array, t)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=t)
            held[hf_name] = dequantize(data, t).reshape(array.shape)
        else:
            w.add_tensor(name, array)
    if tied:   # one tensor, as the file holds it
        held["lm_head.weight"] = held["backbone.embeddings.weight"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in held.items()}


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return token_ids()


@pytest.fixture(scope="module")
def f32_file(reference, smollm2_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("mamba_gguf") / "mamba-f32.gguf"
    write_mamba_gguf(path, reference, smollm2_path)
    return path


@pytest.fixture(scope="module", params=["Q8_0", pytest.param("Q4_0", marks=pytest.mark.slow)])
def quantised(request, reference, smollm2_path, tmp_path_factory):
    """(file, transformers on the weights the file holds, block type)."""
    path = tmp_path_factory.mktemp("mamba_gguf") / f"mamba-{request.param}.gguf"
    held = write_mamba_gguf(path, reference, smollm2_path, request.param)
    dequantised = copy.deepcopy(reference)
    dequantised.load_state_dict(held)
    return path, dequantised, request.param


def test_reads_the_layout(f32_file):
    loaded = load_model(str(f32_file))
    cfg, model = loaded.config, loaded.model
    assert (cfg.architecture, cfg.n_layers, cfg.hidden_size, cfg.vocab_size) == ("mamba", LAYERS, HIDDEN, 49152)
    assert cfg.tie_embeddings and model.weights.lm_head is model.weights.embed
    assert model.state_shapes() == {"conv": (2 * HIDDEN, 3), "ssm": (2 * HIDDEN, STATE)}


def test_f32_file_matches_transformers(f32_file, reference, ids):
    check_chunked_prefill_and_decode(f32_file, ids, reference_logits(reference, ids))


@pytest.mark.slow      # the resumption itself is tests/test_mamba.py's; here only the file differs
def test_f32_file_resumes_from_a_block_edge_snapshot(f32_file, reference, ids):
    check_resume_from_block_edge(f32_file, ids, reference_logits(reference, ids))


def test_quantised_file_stays_quantised_and_matches_its_dequantised_weights(quantised, ids):
    path, dequantised, qtype = quantised
    weights = load_model(str(path)).model.weights
    assert {m.format for m in weights.matrices()} == {qtype}
    assert weights.embed.format == qtype
    assert all(t.dtype == torch.float32 for layer in weights.layers for t in (layer.conv_w, layer.A, layer.D))
    check_chunked_prefill_and_decode(path, ids, reference_logits(dequantised, ids))


def llama_cpp_logits(path, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits after the prompt and after each of ``steps`` greedy tokens it feeds back
    (one eval of the prompt, then one token at a time), and those greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + steps + 1, n_batch=64, n_threads=2,
                          logits_all=True, verbose=False)
    try:
        llm.eval(prompt)
        rows, tokens = [np.array(llm.scores[len(prompt) - 1])], []
        for _ in range(steps):
            tokens.append(int(rows[-1].argmax()))
            llm.eval([tokens[-1]])
            rows.append(np.array(llm.scores[llm.n_tokens - 1]))
    finally:
        llm.close()
    return np.stack(rows), tokens


def edgellm_logits(path, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """edgellm's logits after the prompt and after each of ``tokens`` (fed one at a time)."""
    from edgellm.kv.state import StatePool, StateSlots
    from edgellm.runtime.model_runner import ModelRunner, SeqChunk

    loaded = load_model(str(path))
    pool = StatePool(loaded.model.state_shapes(), loaded.config.n_layers, 1)
    runner = ModelRunner(loaded.model, pool)
    rows = [runner.run([SeqChunk(prompt, 0, StateSlots(0))])[0]]   # one live state, slot 0
    seq = list(prompt)
    for t in tokens:
        seq.append(t)
        rows.append(runner.run([SeqChunk([t], len(seq) - 1, StateSlots(0))])[0])
    return torch.stack(rows)


def test_llama_cpp_on_the_quantised_file_agrees(quantised, ids):
    """The greedy margins of this model (>1.4) are far above the rounding: the tokens must agree."""
    path = quantised[0]
    want, llama_tokens = llama_cpp_logits(path, ids[:PROMPT_LEN], 8)
    got = edgellm_logits(path, ids[:PROMPT_LEN], llama_tokens)
    assert got.argmax(-1)[:-1].tolist() == llama_tokens          # the same greedy continuation
    err = (got - torch.from_numpy(want)).abs().max().item()
    assert err < LLAMA_CPP_TOLERANCE, f"llama.cpp and edgellm logits differ by {err:.3e}"


def test_llama_cpp_on_the_f32_file_agrees_closely(f32_file, ids):
    """No block rounding on either side: the two agree as closely as two float32 programs can."""
    want, llama_tokens = llama_cpp_logits(f32_file, ids[:PROMPT_LEN], 4)
    got = edgellm_logits(f32_file, ids[:PROMPT_LEN], llama_tokens)
    assert got.argmax(-1)[:-1].tolist() == llama_tokens
    torch.testing.assert_close(got, torch.from_numpy(want), atol=TOLERANCE, rtol=0)


def test_engine_greedy_matches_transformers(quantised, smollm2_path):
    """Text through the whole lifecycle (encode, schedule, prefill, decode, detokenise) on the Q8_0
    / Q4_0 file: the Engine's greedy tokens are transformers' on the dequantised weights."""
    from edgellm.runtime.engine import Engine
    from edgellm.sampling import SamplingParams

    path, dequantised, _ = quantised
    loaded = load_model(str(path))
    prompts = ["The state of a recurrent model", "Mamba reads one token at a time and"]
    engine = Engine(loaded, kv_memory="4MB", host_memory=0)
    try:
        got = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    finally:
        engine.close()
    for prompt, result in zip(prompts, got):
        ids = loaded.tokenizer.encode(prompt)
        with torch.no_grad():
            out = dequantised.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)
        assert result.token_ids == out[0, len(ids):].tolist()


@pytest.mark.parametrize("key", ["ssm.state_size", "attention.layer_norm_rms_epsilon"])
def test_a_missing_key_is_named(reference, smollm2_path, tmp_path, key):
    path = tmp_path / "bad.gguf"
    write_mamba_gguf(path, reference, smollm2_path, drop_key=key)
    with pytest.raises(ModelFormatError, match=f"mamba.{key}") as err:
        load_model(str(path))
    assert "convert_hf_to_gguf" in err.value.fix


def test_a_missing_tensor_is_named(reference, smollm2_path, tmp_path):
    path = tmp_path / "bad.gguf"
    write_mamba_gguf(path, reference, smollm2_path, drop_tensor="blk.1.ssm_a")
    with pytest.raises(ModelFormatError, match="blk.1.ssm_a' is missing") as err:
        load_model(str(path))
    assert "Mamba" in err.value.fix


# ---------------------------------------------------------------------------------------------
# Mamba-2 (arch "mamba2"): heads of HEAD_DIM, B and C shared by GROUPS groups, an untied head
# ---------------------------------------------------------------------------------------------
HEADS, GROUPS = 8, 2


@pytest.fixture(scope="module")
def reference2(smollm2_path):
    vocab = len(read_gguf(smollm2_path).metadata["tokenizer.ggml.tokens"])
    cfg = transformers.Mamba2Config(vocab_size=vocab, hidden_size=HIDDEN, state_size=STATE, num_hidden_layers=LAYERS,
                                    expand=2, num_heads=HEADS, head_dim=2 * HIDDEN // HEADS, n_groups=GROUPS,
                                    conv_kernel=4, chunk_size=1, use_bias=False, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2)
    torch.manual_seed(1)
    model = transformers.Mamba2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.normal_(1.0, 0.3)
            elif name.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            elif name.endswith("dt_bias"):
                p.uniform_(-3.0, 0.5)
    return model


def write_mamba2_gguf(path, reference, source_gguf, qtype: str | None = None) -> dict[str, torch.Tensor]:
    """``reference`` as llama.cpp's converter writes a Mamba-2: ``dt_bias`` as ``ssm_dt.bias``, A and
    D with a trailing axis of 1, the gated norm's weight as [groups, d_inner / groups]."""
    d_inner = 2 * HIDDEN
    sd = {k: v.detach().float().numpy() for k, v in reference.state_dict().items()}
    keys = {"ssm.conv_kernel": 4, "ssm.inner_size": d_inner, "ssm.state_size": STATE, "ssm.time_step_rank": HEADS,
            "ssm.group_count": GROUPS}
    tensors = []
    for i in range(LAYERS):
        hf, p = f"backbone.layers.{i}.", f"blk.{i}."
        m = hf + "mixer."
        tensors += [(p + "attn_norm.weight", hf + "norm.weight", None),
                    (p + "ssm_in.weight", m + "in_proj.weight", None),
                    (p + "ssm_conv1d.weight", m + "conv1d.weight", sd[m + "conv1d.weight"][:, 0, :]),
                    (p + "ssm_conv1d.bias", m + "conv1d.bias", None),
                    (p + "ssm_dt.bias", m + "dt_bias", None),
                    (p + "ssm_a", m + "A_log", -np.exp(sd[m + "A_log"]).reshape(HEADS, 1)),
                    (p + "ssm_d", m + "D", sd[m + "D"].reshape(HEADS, 1)),
                    (p + "ssm_norm.weight", m + "norm.weight", sd[m + "norm.weight"].reshape(GROUPS, -1)),
                    (p + "ssm_out.weight", m + "out_proj.weight", None)]
    return write_ssm_gguf(path, "mamba2", sd, keys, tensors, source_gguf, qtype)


@pytest.fixture(scope="module")
def mamba2_q8(reference2, smollm2_path, tmp_path_factory):
    """(the Q8_0 file, transformers on the weights it holds)."""
    path = tmp_path_factory.mktemp("mamba2_gguf") / "mamba2-Q8_0.gguf"
    held = write_mamba2_gguf(path, reference2, smollm2_path, "Q8_0")
    dequantised = copy.deepcopy(reference2)
    dequantised.load_state_dict(held)
    return path, dequantised


def test_mamba2_f32_file_matches_transformers(reference2, smollm2_path, tmp_path, ids):
    path = tmp_path / "mamba2-f32.gguf"
    write_mamba2_gguf(path, reference2, smollm2_path)
    loaded = load_model(str(path))
    assert loaded.config.architecture == "mamba2" and not loaded.config.tie_embeddings
    assert loaded.model.state_shapes() == {"conv": (2 * HIDDEN + 2 * GROUPS * STATE, 3),
                                           "ssm": (HEADS, 2 * HIDDEN // HEADS, STATE)}
    check_chunked_prefill_and_decode(path, ids, reference_logits(reference2, ids))
    want, llama_tokens = llama_cpp_logits(path, ids[:PROMPT_LEN], 4)       # and llama.cpp on the same file
    got = edgellm_logits(path, ids[:PROMPT_LEN], llama_tokens)
    assert got.argmax(-1)[:-1].tolist() == llama_tokens
    torch.testing.assert_close(got, torch.from_numpy(want), atol=TOLERANCE, rtol=0)


def test_mamba2_q8_0_file_matches_its_dequantised_weights(mamba2_q8, ids):
    path, dequantised = mamba2_q8
    weights = load_model(str(path)).model.weights
    assert {m.format for m in weights.matrices()} | {weights.embed.format, weights.lm_head.format} == {"Q8_0"}
    check_chunked_prefill_and_decode(path, ids, reference_logits(dequantised, ids))


def test_llama_cpp_on_the_mamba2_file_agrees(mamba2_q8, ids):
    """Logits only: this model's greedy margins (down to 0.02) are below llama.cpp's rounding, so
    its tokens may differ; the F32 file's test above compares tokens."""
    path = mamba2_q8[0]
    want, llama_tokens = llama_cpp_logits(path, ids[:PROMPT_LEN], 8)
    got = edgellm_logits(path, ids[:PROMPT_LEN], llama_tokens)
    err = (got - torch.from_numpy(want)).abs().max().item()
    assert err < LLAMA_CPP_TOLERANCE, f"llama.cpp and edgellm logits differ by {err:.3e}"


# ---------------------------------------------------------------------------------------------
# --weights on HF folders: a recurrent model's matrices converted at load time
# ---------------------------------------------------------------------------------------------
def tiny_hf(kind: str):
    """A tiny transformers model whose matrices are 32 or 64 wide (Q8_0 blocks split them), with
    every parameter drawn so each term of the mixer shows; vocabulary of 64 word tokens."""
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, bos_token_id=1, eos_token_id=2)
    if kind == "mamba":
        cfg = transformers.MambaConfig(**common, state_size=8, expand=2, pad_token_id=0)
        model = transformers.MambaForCausalLM(cfg)
    elif kind == "mamba2":
        cfg = transformers.Mamba2Config(**common, state_size=8, expand=2, num_heads=8, head_dim=8, n_groups=2,
                                        chunk_size=1, pad_token_id=0)
        model = transformers.Mamba2ForCausalLM(cfg)
    else:
        cfg = transformers.RwkvConfig(**common, attention_hidden_size=32, intermediate_size=64, rescale_every=0,
                                      context_length=128)
        model = transformers.RwkvForCausalLM(cfg)
    torch.manual_seed(4)
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")) or ("ln" in name and name.endswith("weight")):
                p.normal_(1.0, 0.3)
            elif name.endswith("A_log") or name.endswith("time_decay"):
                p.uniform_(-1.0, 1.5)
            elif name.endswith(("dt_proj.bias", "dt_bias")):
                p.uniform_(-3.0, 0.5)
            elif "time_mix" in name:
                p.uniform_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def q8_0_round_trip(model):
    """``model`` with every matrix whose rows split into 32-wide blocks (Linear weights, the
    embedding) replaced by what ``gguf.quants`` makes of it as Q8_0 (bit-exact with llama.cpp)."""
    from gguf.quants import dequantize, quantize

    q8 = gguf.GGMLQuantizationType.Q8_0
    out = copy.deepcopy(model)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and module.weight.shape[1] % 32 == 0:
                w = module.weight.detach().numpy()
                module.weight.copy_(torch.from_numpy(dequantize(quantize(w, q8), q8).reshape(w.shape)))
    return out


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "rwkv"])
def test_weights_q8_0_on_an_hf_folder_matches_transformers_on_the_rounded_weights(kind, tmp_path):
    from recurrent_parity import DECODE_STEPS, state_runner

    from edgellm.kv.state import StateSlots
    from edgellm.loading.convert import convert_weights
    from edgellm.runtime.model_runner import SeqChunk
    from tiny_model import save_hf_folder

    model = tiny_hf(kind)
    folder = save_hf_folder(model, tmp_path / kind, 64)
    loaded = convert_weights(load_model(str(folder)), "q8_0")
    weights = loaded.model.weights
    formats = {m.format for m in [*weights.matrices(), weights.embed, weights.lm_head]}
    assert formats == ({"Q8_0", "float32"} if kind == "mamba" else {"Q8_0"})   # Mamba's dt_proj: 2 wide
    assert loaded.dtype == "q8_0"
    ids = token_ids()
    want = reference_logits(q8_0_round_trip(model), ids)
    runner = state_runner(loaded)
    got = [runner.run([SeqChunk(ids[:PROMPT_LEN], 0, StateSlots(0))])[0]]   # one live state, slot 0
    for p in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
        got.append(runner.run([SeqChunk([ids[p]], p, StateSlots(0))])[0])
    torch.testing.assert_close(torch.stack(got), want[PROMPT_LEN - 1:], atol=TOLERANCE, rtol=0)


def test_weights_int8_runs_a_recurrent_model_and_keep_is_refused(tmp_path):
    from edgellm.errors import InvalidParameterError
    from edgellm.llm import LLM
    from edgellm.sampling import SamplingParams
    from tiny_model import save_hf_folder

    model = tiny_hf("mamba2")
    folder = save_hf_folder(model, tmp_path / "m2", 64)
    llm = LLM(str(folder), weights="int8")
    assert {m.format for m in llm.loaded.model.weights.matrices()} == {"int8"}
    ids = token_ids()[:12]
    got = llm.generate(ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)).token_ids
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    assert got == want      # int8's rounding is far below this model's greedy margins
    with pytest.raises(InvalidParameterError, match="--keep"):
        LLM(str(folder), weights="int8", keep=["blk.0"])


def test_quantize_refuses_a_recurrent_model_and_names_the_way_that_works(f32_file, tmp_path):
    from edgellm.errors import UnsupportedModelError
    from edgellm.loading.convert import peek_config, quantize_model

    cfg = peek_config(str(f32_file))[1]          # from the header alone
    assert (cfg.architecture, cfg.n_layers, cfg.extra["recurrent"]["dt_rank"]) == ("mamba", LAYERS, DT_RANK)
    with pytest.raises(UnsupportedModelError, match="recurrent") as err:
        quantize_model(str(f32_file), "q4_0", tmp_path / "out.gguf", progress=False)
    assert "--weights q4_0" in err.value.fix
    assert not (tmp_path / "out.gguf").exists()


def test_falcon_mamba_and_unknown_architectures_are_refused(reference, smollm2_path, tmp_path):
    from edgellm.errors import UnsupportedModelError

    path = tmp_path / "falcon.gguf"
    write_mamba_gguf(path, reference, smollm2_path, ssm__dt_b_c_rms=True)   # Falcon-Mamba's extra norms
    with pytest.raises(UnsupportedModelError, match="dt_b_c_rms"):
        load_model(str(path))
    path = tmp_path / "rwkv6.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'rwkv6' is not supported") as err:
        load_model(str(path))
    assert "mamba, mamba2" in err.value.fix


def test_bench_counts_one_state_not_kv_per_token(f32_file):
    """`edgellm bench` on a Mamba file: the bytes a decode step reads beside the weights are one
    sequence's state, worked from the config: per layer the last conv_kernel - 1 = 3 inputs and
    the SSM state of 16 for each of 2 * 64 inner channels, float32 -- whatever the context."""
    from edgellm.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["bench", "--model", str(f32_file), "--prompt-tokens", "16", "--gen-tokens", "4", "--repeat", "1",
                   "--json"])
    assert rc == 0
    run = json.loads(out.getvalue())
    state = LAYERS * (2 * HIDDEN) * (3 + STATE) * 4
    assert run["kv_bytes_at_mean_context"] == state
    assert run["bytes_per_decode_step"] == run["model"]["weight_bytes"] + state
