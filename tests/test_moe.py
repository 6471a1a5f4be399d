"""Mixtures of experts (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE with q/k norms)
against Hugging Face transformers.

Tiny random models are built and saved by transformers as HF folders; edgellm loads them. Their
routers are drawn with a large spread so each token's choice of experts is decisive and differs
from token to token (the checks that count experts read below confirm several are used). Logits
of the prompt (whole and in chunks) and of every decode step must agree within 1e-3; greedy
tokens through the Engine must be transformers' own greedy tokens. A GGUF written here with the
``gguf`` package (experts stacked and quantised Q8_0 / Q4_0 as llama.cpp stores them) must match
transformers run on the same weights dequantised. A decode step must read only the experts its
rows' routers chose (their union), and bad files must be refused with a clear message.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgellm.config import ExpertConfig, ModelConfig  # noqa: E402
from edgellm.errors import ModelFormatError, UnsupportedModelError  # noqa: E402
from edgellm.kernels import native  # noqa: E402
from edgellm.kv.cache import KVCache  # noqa: E402
from edgellm.loading.load import load_model  # noqa: E402
from edgellm.quant.base import Weight  # noqa: E402
from edgellm.runtime.model_runner import ModelRunner, SeqChunk  # noqa: E402
from edgellm.sampling import SamplingParams  # noqa: E402
from tiny_model import run_chunks, save_hf_folder  # noqa: E402

VOCAB, EXPERTS, TOP_K = 64, 8, 2
PROMPT_LEN, DECODE_STEPS = 24, 6
TOLERANCE = 1e-3
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.1,
              num_experts_per_tok=TOP_K, attn_implementation="eager", pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


def hf_config(arch: str):
    if arch == "mixtral":
        return transformers.MixtralConfig(**COMMON, intermediate_size=32, num_hidden_layers=2,
                                          num_local_experts=EXPERTS)
    if arch == "qwen2moe":   # layer 1 keeps a dense MLP; the others have a shared expert
        return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=40, num_hidden_layers=3,
                                           num_experts=EXPERTS, mlp_only_layers=[1], norm_topk_prob=False)
    return transformers.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=32, num_hidden_layers=2,
                                       num_experts=EXPERTS, norm_topk_prob=True)


ARCHS = ["mixtral", "qwen2moe", "qwen3moe"]


def build_reference(arch: str, **config):
    """``config``: config attributes changed from hf_config's."""
    torch.manual_seed(0)
    cfg = hf_config(arch)
    for key, value in config.items():
        setattr(cfg, key, value)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():   # decisive routing, a shared-expert gate that matters, non-trivial q/k norms
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] in (EXPERTS, 1):
                p.normal_(0.0, 1.0)
            elif "q_norm" in name or "k_norm" in name:
                p.normal_(1.0, 0.3)
    return model


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory):
    arch = request.param
    model = build_reference(arch)
    folder = save_hf_folder(model, tmp_path_factory.mktemp(arch), VOCAB)
    return arch, model, folder


@pytest.fixture(scope="module")
def ids() -> list[int]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (PROMPT_LEN + DECODE_STEPS,), generator=gen).tolist()


def assert_matches(got: list[torch.Tensor], want: torch.Tensor, label: str) -> None:
    for step, logits in enumerate(got):
        pos = PROMPT_LEN - 1 + step
        err = (logits - want[pos]).abs().max().item()
        assert err < TOLERANCE, f"{label}, position {pos}: logits differ by {err:.2e}"


def test_config_from_the_folder(case):
    arch, reference, folder = case
    cfg = load_model(str(folder)).config
    ex = cfg.experts
    assert cfg.architecture == arch
    assert (ex.n_experts, ex.n_used, ex.ffn_size) == (EXPERTS, TOP_K, 32)
    assert ex.norm_top_k == (arch != "qwen2moe")
    assert ex.shared_ffn_size == (40 if arch == "qwen2moe" else 0)
    assert ex.dense_layers == ((1,) if arch == "qwen2moe" else ())
    assert cfg.qk_norm == (arch == "qwen3moe") and cfg.qkv_bias == (arch == "qwen2moe")
    assert cfg.sliding_window is None
    # every weight counted: transformers' own parameter count
    assert cfg.n_parameters() == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("chunk", [PROMPT_LEN, 5])
def test_prefill_and_decode_match_transformers(case, ids, chunk):
    arch, reference, folder = case
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]       # teacher-forced: every position
    loaded = load_model(str(folder))
    assert_matches(run_chunks(loaded.model, loaded.config, ids, PROMPT_LEN, chunk), want, f"{arch}, chunks of {chunk}")


def test_greedy_tokens_through_the_engine(case, ids):
    """Two prompts batched by the Engine (its scheduler, sampler and KV pool) give transformers'
    greedy tokens."""
    from edgellm.runtime.engine import Engine

    arch, reference, folder = case
    prompts = [ids[:PROMPT_LEN], ids[5:17]]
    want = []
    for p in prompts:
        with torch.no_grad():
            out = reference.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
        want.append(out[0, len(p):].tolist())
    engine = Engine(load_model(str(folder)), kv_memory="4MB", host_memory=0)
    try:
        got = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    finally:
        engine.close()
    assert [r.token_ids for r in got] == want


def save_stacked_folder(model, folder):
    """An HF folder as save_hf_folder writes it, but with transformers' own stacked expert tensors."""
    save_hf_folder(model, folder, VOCAB)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(str(folder), save_original_format=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_folder_with_stacked_experts_matches_transformers(arch, ids, tmp_path):
    """transformers 5 saves each layer's experts as two stacked tensors (gate_up_proj [E, 2F, H],
    gate first, and down_proj [E, H, F]; Mixtral's router as mlp.gate) when asked to keep its
    own layout: edgellm reads those too."""
    from safetensors import safe_open

    reference = build_reference(arch)
    save_stacked_folder(reference, tmp_path)
    keys = set(safe_open(str(tmp_path / "model.safetensors"), "pt").keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and not any(".experts.0." in k for k in keys)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    loaded = load_model(str(tmp_path))
    assert_matches(run_chunks(loaded.model, loaded.config, ids, PROMPT_LEN, 9), want, f"{arch}, stacked experts")


def test_folder_with_a_misshapen_stacked_expert_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_stacked_folder(build_reference("qwen3moe"), tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    key = "model.layers.1.mlp.experts.down_proj"
    tensors[key] = tensors[key][:, :, :16].contiguous()
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match=r"experts\.down_proj' has shape \(8, 64, 16\), expected \(8, 64, 32\)"):
        load_model(str(tmp_path))


def save_with_bpe_tokenizer(model, folder, source_gguf):
    """``model`` saved as an HF folder with SmolLM2's byte-level BPE vocabulary and merges as its
    tokenizer.json (built with the ``tokenizers`` library from the GGUF's token list)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from edgellm.loading.gguf import read_gguf

    meta = read_gguf(source_gguf).metadata
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    bpe = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    model.save_pretrained(str(folder))
    bpe.save(str(folder / "tokenizer.json"))
    return folder, bpe


def test_text_prompt_with_a_bpe_tokenizer_through_the_engine(smollm2_path, tmp_path):
    """Text in, text out: a Qwen3-MoE folder with a real BPE tokenizer; the Engine's greedy
    continuation of a text prompt is transformers' (ids from the ``tokenizers`` library)."""
    from edgellm.runtime.engine import Engine

    reference = gguf_reference("qwen3moe")
    folder, bpe = save_with_bpe_tokenizer(reference, tmp_path, smollm2_path)
    prompt = "The experts of a mixture are chosen per token by a router."
    ids = bpe.encode(prompt).ids
    with torch.no_grad():
        want = reference.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
    engine = Engine(load_model(str(folder)), kv_memory="4MB", host_memory=0)
    try:
        got = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    finally:
        engine.close()
    assert got.token_ids == want
    assert got.text == bpe.decode(want)


class CountingWeight(Weight):
    """A real expert matrix that also counts the rows it multiplies (a read of its weights)."""

    def __init__(self, inner: Weight, log: list, key):
        self.inner, self.log, self.key, self.shape = inner, log, key, inner.shape

    def matmul(self, x):
        self.log.append((self.key, x.shape[0]))
        return self.inner.matmul(x)

    def rows(self, index):
        return self.inner.rows(index)

    @property
    def nbytes(self):
        return self.inner.nbytes

    @property
    def format(self):
        return self.inner.format


def test_decode_reads_only_the_chosen_experts():
    """A decode step of three sequences runs, in each sparse layer, exactly the union of the
    experts transformers' router picks for those three rows -- each once, on the rows that chose
    it -- and reads no other expert's weights."""
    arch = "mixtral"
    reference = build_reference(arch)
    loaded = load_model(str(save_hf_folder(reference, _tmp(), VOCAB)))
    log: list = []
    for i, b in enumerate(loaded.model.weights.blocks):
        b.experts.gate_up = [CountingWeight(w, log, (i, e)) for e, w in enumerate(b.experts.gate_up)]
    seqs = [[5, 9, 11, 3], [7, 7, 20], [40, 2, 33, 8, 13]]
    cache = KVCache(loaded.config, num_blocks=3)
    runner = ModelRunner(loaded.model, cache)
    slots = [slice(16 * i, 16 * i + 16) for i in range(3)]
    with torch.inference_mode():
        runner.run([SeqChunk(s[:-1], 0, sl) for s, sl in zip(seqs, slots)])
        log.clear()
        runner.run([SeqChunk(s[-1:], len(s) - 1, sl) for s, sl in zip(seqs, slots)])
    chosen = _hf_router_choices(reference, seqs)       # layer -> [set of experts per row]
    for layer, per_row in chosen.items():
        union = set().union(*per_row)
        ran = {e: n for (ly, e), n in log if ly == layer}
        assert set(ran) == union, f"layer {layer}: ran experts {sorted(ran)}, the router chose {sorted(union)}"
        assert len([1 for (ly, _), _ in log if ly == layer]) == len(union), "an expert ran twice in one step"
        for e, n in ran.items():
            assert n == sum(e in row for row in per_row)
        assert len(union) < EXPERTS   # the check could fail: some experts were left unread


def _tmp():
    import tempfile
    from pathlib import Path
    return Path(tempfile.mkdtemp(prefix="edgellm-moe-"))


def _hf_router_choices(reference, seqs) -> dict[int, list[set[int]]]:
    """transformers' top-k experts of each sequence's last token, per layer (from its router
    logits, which it returns on request)."""
    out: dict[int, list[set[int]]] = {}
    for s in seqs:
        with torch.no_grad():
            logits = reference(torch.tensor([s]), output_router_logits=True).router_logits
        for layer, lg in enumerate(logits):
            top = torch.topk(torch.softmax(lg.float(), -1)[-1], TOP_K).indices.tolist()
            out.setdefault(layer, []).append(set(top))
    return out


# ---------------------------------------------------------------------------------------------
# GGUF: llama.cpp's layout, written with the gguf package
# ---------------------------------------------------------------------------------------------
GGUF_ARCH = {"mixtral": "llama", "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe"}


def _permute_for_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each q/k head's rows for its adjacent-pair RoPE (Llama
    layout only): rows [first half; second half] become interleaved pairs."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _unpermute_for_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_moe_gguf(path, reference, arch: str, source_gguf, expert_type: str, drop: str | None = None,
                   used: int = TOP_K, all_quantised: bool = False):
    """``reference``'s weights as llama.cpp lays out ``arch`` (experts stacked [E, rows, cols],
    quantised ``expert_type``; the rest float32, or with ``all_quantised`` the attention and
    shared-expert matrices quantised too, as llama.cpp's quantiser leaves only the routers, norms
    and biases float32), with SmolLM2's tokenizer. Returns the state dict transformers must load
    to compute what the file holds (quantised matrices dequantised)."""
    import gguf
    from gguf.quants import dequantize, quantize

    from edgellm.loading.gguf import read_gguf

    cfg = reference.config
    qtype = gguf.GGMLQuantizationType[expert_type]
    ga = GGUF_ARCH[arch]
    sd = {k: v.detach().float().numpy() for k, v in reference.state_dict().items()}
    exact = dict(sd)
    w = gguf.GGUFWriter(str(path), ga)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(used)
    if arch != "mixtral":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    src = read_gguf(source_gguf)
    meta = src.metadata
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])

    def put(name: str, array: np.ndarray, quantised: bool = False):
        if name == drop:
            return
        if quantised:
            data = quantize(array, qtype)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
            return dequantize(data, qtype).reshape(array.shape)
        w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        return array

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        hf, p = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[hf + "self_attn.q_proj.weight"], sd[hf + "self_attn.k_proj.weight"]
        if ga == "llama":
            q, k = _permute_for_llama_cpp(q, heads), _permute_for_llama_cpp(k, kv_heads)
        q = put(p + "attn_q.weight", q, all_quantised)
        k = put(p + "attn_k.weight", k, all_quantised)
        if ga == "llama" and q is not None and k is not None:
            q, k = _unpermute_for_llama_cpp(q, heads), _unpermute_for_llama_cpp(k, kv_heads)
        exact[hf + "self_attn.q_proj.weight"], exact[hf + "self_attn.k_proj.weight"] = q, k
        for part, name in (("v_proj", "attn_v"), ("o_proj", "attn_output")):
            exact[hf + f"self_attn.{part}.weight"] = put(p + f"{name}.weight", sd[hf + f"self_attn.{part}.weight"],
                                                         all_quantised)
        put(p + "attn_norm.weight", sd[hf + "input_layernorm.weight"])
        put(p + "ffn_norm.weight", sd[hf + "post_attention_layernorm.weight"])
        for part in ("q", "k", "v"):
            if hf + f"self_attn.{part}_proj.bias" in sd:
                put(p + f"attn_{part}.bias", sd[hf + f"self_attn.{part}_proj.bias"])
            if part != "v" and hf + f"self_attn.{part}_norm.weight" in sd:
                put(p + f"attn_{part}_norm.weight", sd[hf + f"self_attn.{part}_norm.weight"])
        # transformers holds the experts stacked: gate_up [E, 2F, H] (gate first), down [E, H, F]
        put(p + "ffn_gate_inp.weight", sd[hf + "mlp.gate.weight"])
        gate_up, down = sd[hf + "mlp.experts.gate_up_proj"], sd[hf + "mlp.experts.down_proj"]
        f = down.shape[2]
        parts = {"gate": gate_up[:, :f], "up": gate_up[:, f:], "down": down}
        held = {part: put(p + f"ffn_{part}_exps.weight", np.ascontiguousarray(a), quantised=True)
                for part, a in parts.items()}
        if all(a is not None for a in held.values()):
            exact[hf + "mlp.experts.gate_up_proj"] = np.concatenate([held["gate"], held["up"]], axis=1)
            exact[hf + "mlp.experts.down_proj"] = held["down"]
        if arch == "qwen2moe":
            for part in ("gate", "up", "down"):
                name = hf + f"mlp.shared_expert.{part}_proj.weight"
                exact[name] = put(p + f"ffn_{part}_shexp.weight", sd[name], all_quantised)
            put(p + "ffn_gate_inp_shexp.weight", sd[hf + "mlp.shared_expert_gate.weight"].reshape(-1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in exact.items() if v is not None}


def gguf_reference(arch: str, shared: int | None = None):
    """A reference whose every layer is sparse (llama.cpp's Qwen MoE layouts have no dense
    layers) and whose vocabulary is SmolLM2's tokenizer's; ``shared``: Qwen2-MoE's shared expert
    width (a multiple of 32 can be quantised)."""
    cfg = hf_config(arch)
    cfg.vocab_size = 49152
    if arch == "qwen2moe":
        cfg.mlp_only_layers = []
        if shared is not None:
            cfg.shared_expert_intermediate_size = shared
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] in (EXPERTS, 1):
                p.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("arch,expert_type", [("mixtral", "Q4_0"), ("qwen2moe", "Q8_0"), ("qwen3moe", "Q4_0")])
def test_gguf_with_quantised_experts_matches_transformers(arch, expert_type, smollm2_path, tmp_path, ids):
    reference = gguf_reference(arch)
    exact = write_moe_gguf(tmp_path / "moe.gguf", reference, arch, smollm2_path, expert_type)
    reference.load_state_dict(exact)       # the experts as the file holds them
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    loaded = load_model(str(tmp_path / "moe.gguf"))
    block = loaded.model.weights.blocks[0]
    if native() is not None:    # kept quantised (without the kernels they are dequantised)
        assert {m.format for m in block.experts.gate_up + block.experts.down} == {expert_type}
    assert loaded.config.experts.norm_top_k == (arch != "qwen2moe")
    assert_matches(run_chunks(loaded.model, loaded.config, ids, PROMPT_LEN, 7), want, f"{arch} GGUF")


@pytest.mark.parametrize("arch,expert_type", [("mixtral", "Q4_0"), ("qwen2moe", "Q8_0"), ("qwen3moe", "Q4_0")])
def test_fused_native_decode_step_matches_transformers(arch, expert_type, smollm2_path, tmp_path, ids):
    """A file whose every matrix but the router is quantised decodes through the one-call native
    step (moe_decode_blocks): every decode step within the tolerance of transformers on the
    dequantised weights, batched rows included (through the Engine: its greedy tokens)."""
    from edgellm.runtime.engine import Engine

    reference = gguf_reference(arch, shared=32)
    exact = write_moe_gguf(tmp_path / "moe.gguf", reference, arch, smollm2_path, expert_type, all_quantised=True)
    reference.load_state_dict(exact)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    loaded = load_model(str(tmp_path / "moe.gguf"))
    assert loaded.model.has_fused_decode == (native() is not None)    # the native step is the one taken
    assert_matches(run_chunks(loaded.model, loaded.config, ids, PROMPT_LEN, PROMPT_LEN), want, f"{arch} fused")
    prompts = [ids[:PROMPT_LEN], ids[3:11], ids[7:20]]
    greedy = []
    for p in prompts:
        with torch.no_grad():
            out = reference.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
        greedy.append(out[0, len(p):].tolist())
    engine = Engine(loaded, kv_memory="4MB", host_memory=0)
    try:
        got = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    finally:
        engine.close()
    assert [r.token_ids for r in got] == greedy


@pytest.mark.slow   # quantises and reads back SmolLM2's 49k-row embedding and head (43 s at load average 16)
def test_quantize_command_writes_quantised_stacked_experts(smollm2_path, tmp_path, ids, capsys):
    """`edgellm quantize` of a MoE GGUF: the stacked expert tensors quantised row by row (read
    back with the gguf package), the router left float32, and the written file computes what
    transformers computes on the file's weights dequantised by the gguf package."""
    import gguf
    from gguf.quants import dequantize

    from edgellm.cli.main import main

    reference = gguf_reference("qwen3moe")
    write_moe_gguf(tmp_path / "src.gguf", reference, "qwen3moe", smollm2_path, "Q8_0")
    assert main(["quantize", "--model", str(tmp_path / "src.gguf"), "--format", "q4_0",
                 "--out", str(tmp_path / "q4.gguf")]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q4.gguf")).tensors}
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    def read(name: str) -> torch.Tensor:
        t = tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape))
        return torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).copy())

    state = reference.state_dict()
    state.update({"model.embed_tokens.weight": read("token_embd.weight"), "lm_head.weight": read("output.weight")})
    for i in range(reference.config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            state[p + f"self_attn.{hf}.weight"] = read(b + gg + ".weight")
        state[p + "mlp.experts.gate_up_proj"] = torch.cat([read(b + "ffn_gate_exps.weight"),
                                                           read(b + "ffn_up_exps.weight")], dim=1)
        state[p + "mlp.experts.down_proj"] = read(b + "ffn_down_exps.weight")
    reference.load_state_dict(state)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    loaded = load_model(str(tmp_path / "q4.gguf"))
    if native() is not None:    # kept in the file's blocks (without the kernels they are dequantised)
        assert {m.format for m in loaded.model.weights.blocks[1].experts.down} == {"Q4_0"}
    assert_matches(run_chunks(loaded.model, loaded.config, ids, PROMPT_LEN, 9), want, "quantised file")


def test_quantize_to_an_edgellm_file_is_refused_for_experts(tmp_path):
    from edgellm.loading.convert import quantize_model

    folder = save_hf_folder(build_reference("mixtral"), tmp_path / "mixtral", VOCAB)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts model cannot be written"):
        quantize_model(str(folder), "int8", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_gguf_with_more_used_than_experts_is_refused(smollm2_path, tmp_path):
    write_moe_gguf(tmp_path / "bad.gguf", gguf_reference("qwen3moe"), "qwen3moe", smollm2_path, "Q8_0",
                   used=EXPERTS + 1)
    with pytest.raises(ModelFormatError, match=f"routes each token to {EXPERTS + 1} experts but has only {EXPERTS}"):
        load_model(str(tmp_path / "bad.gguf"))


def test_gguf_missing_expert_tensor_is_named(smollm2_path, tmp_path):
    write_moe_gguf(tmp_path / "bad.gguf", gguf_reference("mixtral"), "mixtral", smollm2_path, "Q8_0",
                   drop="blk.1.ffn_up_exps.weight")
    with pytest.raises(ModelFormatError, match="'blk.1.ffn_up_exps.weight' is missing"):
        load_model(str(tmp_path / "bad.gguf"))


def test_folder_missing_an_expert_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_hf_folder(build_reference("qwen2moe"), tmp_path, VOCAB)
    f = next(folder.glob("*.safetensors"))
    tensors = load_file(str(f))
    del tensors["model.layers.2.mlp.experts.5.down_proj.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match=r"model\.layers\.2\.mlp\.experts\.5\.down_proj\.weight' is missing"):
        load_model(str(folder))


def test_config_json_with_too_many_used_experts_is_refused(tmp_path):
    data = hf_config("mixtral").to_dict()
    data.update(architectures=["MixtralForCausalLM"], num_experts_per_tok=EXPERTS + 2)
    with pytest.raises(ModelFormatError, match="expert_used_count / num_experts_per_tok"):
        ModelConfig.from_hf_config(json.loads(json.dumps(data)))


def dequantised_state(weights, cfg) -> dict[str, torch.Tensor]:
    """transformers' parameters holding what converted ModelWeights hold (every matrix
    dequantised; an HF folder's q/k rows are in transformers' order)."""
    sd = {"model.embed_tokens.weight": weights.embed.dequantize(), "lm_head.weight": weights.lm_head.dequantize()}
    for i, b in enumerate(weights.blocks):
        p = f"model.layers.{i}."
        q, k, v = b.qkv.dequantize().split([cfg.q_size, cfg.kv_size, cfg.kv_size])
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": b.o.dequantize()})
        ex = b.experts
        if ex is None:      # a dense layer
            gate, up = b.gate_up.dequantize().chunk(2)
            sd.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                       p + "mlp.down_proj.weight": b.down.dequantize()})
            continue
        sd[p + "mlp.experts.gate_up_proj"] = torch.stack([m.dequantize() for m in ex.gate_up])
        sd[p + "mlp.experts.down_proj"] = torch.stack([m.dequantize() for m in ex.down])
        if ex.shared_gate_up is not None:
            gate, up = ex.shared_gate_up.dequantize().chunk(2)
            sd.update({p + "mlp.shared_expert.gate_proj.weight": gate, p + "mlp.shared_expert.up_proj.weight": up,
                       p + "mlp.shared_expert.down_proj.weight": ex.shared_down.dequantize()})
    return sd


@pytest.mark.parametrize("arch,fmt", [("mixtral", "q4_0"), ("qwen2moe", "q4_1"), ("qwen3moe", "q8_0"),
                                      ("qwen3moe", "int8")])
def test_converted_experts_match_transformers_on_the_dequantised_weights(arch, fmt, ids, tmp_path):
    """--weights FORMAT on a mixture of experts: each expert matrix converted on its own (the
    router kept), and the model then computes what transformers computes on the dequantised
    weights, prefill and every decode step: within 1e-3 for the block formats (float32
    activations), within 2% of the largest logit for int8 (its kernels take bfloat16 activations and
    round each output to bfloat16, 0.2-0.3% of a matmul's largest output measured alone; through the
    layers a decode step's logits moved 1.16% on an AVX512_BF16 CPU, past the 1% first set here)."""
    from edgellm.loading.convert import convert_weights

    # Qwen2-MoE's dense layer and shared expert as wide as whole blocks of 32
    reference = build_reference(arch, intermediate_size=64, shared_expert_intermediate_size=32)
    loaded = load_model(str(save_hf_folder(reference, tmp_path, VOCAB)))
    converted = convert_weights(loaded, fmt)
    if native() is not None:   # every matrix in a native block format, every layer sparse: the one-call step
        assert converted.model.has_fused_decode == (fmt in ("q4_0", "q8_0"))
    block = converted.model.weights.blocks[0]
    assert len(block.experts.gate_up) == EXPERTS and block.experts.router.format == "float32"
    assert {m.format for m in block.experts.gate_up + block.experts.down} == {fmt.upper() if "_" in fmt else fmt}
    state = reference.state_dict()
    state.update(dequantised_state(converted.model.weights, converted.config))
    reference.load_state_dict(state)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    got = run_chunks(converted.model, converted.config, ids, PROMPT_LEN, 9)
    if fmt != "int8":
        assert_matches(got, want, f"{arch} as {fmt}")
        return
    for step, logits in enumerate(got):
        row = want[PROMPT_LEN - 1 + step]
        assert float((logits - row).abs().max() / row.abs().max()) < 2e-2, f"int8, decode step {step}"


def test_expert_config_parameter_counts_by_hand():
    """Mixtral-8x7B's MLP: 8 experts of 3 x 4096 x 14336 and a 8 x 4096 router; two run per token."""
    ex = ExpertConfig(n_experts=8, n_used=2, ffn_size=14336, norm_top_k=True)
    assert ex.layer_parameters(4096) == 8 * 4096 + 8 * 3 * 4096 * 14336
    assert ex.active_layer_parameters(4096) == 8 * 4096 + 2 * 3 * 4096 * 14336


# ---------------------------------------------------------------------------------------------
# the roofline analyzer: active against total parameters, worked by hand
# ---------------------------------------------------------------------------------------------
def test_expected_distinct_experts_by_hand():
    from edgellm.roofline.experts import expected_distinct_experts

    assert expected_distinct_experts(8, 2, 0) == 0
    assert expected_distinct_experts(8, 2, 1) == pytest.approx(2)             # one token: its k experts
    assert expected_distinct_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75 ** 2))   # 3.5
    assert expected_distinct_experts(8, 8, 1) == pytest.approx(8)             # every expert chosen
    assert expected_distinct_experts(128, 8, 512) == pytest.approx(128, rel=1e-9)   # a prefill reads them all


def tiny_moe_config(shared: int = 0) -> ModelConfig:
    return ModelConfig(architecture="qwen2moe" if shared else "mixtral", n_layers=3, hidden_size=16, n_heads=2,
                       n_kv_heads=1, head_dim=8, ffn_size=24, vocab_size=100, context_length=64,
                       experts=ExpertConfig(n_experts=4, n_used=2, ffn_size=32, norm_top_k=not shared,
                                            shared_ffn_size=shared, dense_layers=(1,)))


def test_decode_layers_read_the_union_of_chosen_experts():
    """Batch 2 at 16-bit weights: 4 experts, 2 per token -> 4 * (1 - (1/2)^2) = 3 experts read;
    the ops follow the 2 x 2 token-expert pairs; layer 1 keeps the dense MLP."""
    from edgellm.roofline.layers import Bits, block_layers

    by_name = {ly.name: ly for ly in block_layers(tiny_moe_config(shared=40), "decode", 2, 10, Bits(16, 16, 16))}
    gate = by_name["expert_gate_proj"]
    assert gate.count == 2 and by_name["gate_proj"].count == 1 and by_name["q_proj"].count == 3
    assert gate.load_weight == 3 * 16 * 32 * 2            # 3 distinct experts' 16 x 32 matrices, 2 bytes each
    assert gate.ops == 2 * (2 * 2) * 16 * 32               # 4 token-expert pairs
    assert gate.params == 4 * 16 * 32                      # every expert stored
    assert by_name["router"].load_weight == 16 * 4 * 2 and by_name["router"].ops == 2 * 2 * 16 * 4
    assert by_name["shared_up_proj"].load_weight == 16 * 40 * 2 and by_name["shared_up_proj"].ops == 2 * 2 * 16 * 40
    assert by_name["expert_act"].ops == 5 * 2 * (2 * 32 + 40)


def test_active_and_total_parameters_of_mixtral_by_hand():
    """Mixtral-8x7B as published (hidden 4096, 32 layers, 32/8 heads of 128, 8 experts of 14336,
    2 per token, vocabulary 32000, untied): 46.7 B parameters, 12.9 B active per token."""
    from edgellm.roofline.analyze import analyze
    from edgellm.roofline.hardware import lookup_builtin
    from edgellm.roofline.zoo import zoo_config

    h, f, E = 4096, 14336, 8
    attention = h * (4096 + 2 * 1024) + 4096 * h
    per_layer = attention + 2 * h + h * E          # + norms + router
    total = 32 * (per_layer + E * 3 * h * f) + h + 2 * 32000 * h
    active = 32 * (per_layer + 2 * 3 * h * f) + h + 2 * 32000 * h
    cfg = zoo_config("Mixtral-8x7B")
    hw = lookup_builtin("A6000")
    one = analyze(cfg, hw, "decode", batch=1, seq_len=100).totals()
    assert one["total_parameters"] == total and round(total / 1e9, 1) == 46.7
    assert one["active_parameters"] == pytest.approx(active) and round(active / 1e9, 1) == 12.9
    four = analyze(cfg, hw, "decode", batch=4, seq_len=100).totals()
    union = 8 * (1 - 0.75 ** 4)
    assert four["active_experts_per_layer"] == pytest.approx(union)
    assert four["active_parameters"] == pytest.approx(active + 32 * (union - 2) * 3 * h * f)
    prefill = analyze(cfg, hw, "prefill", batch=1, seq_len=512).totals()
    assert prefill["active_parameters"] == pytest.approx(total)


@pytest.mark.parametrize("name,total,active", [("Qwen3-30B-A3B", 30.5, 3.3), ("Qwen1.5-MoE-A2.7B", 14.3, 2.7)])
def test_zoo_moe_models_have_their_published_sizes(name, total, active):
    from edgellm.roofline.zoo import zoo_config

    cfg = zoo_config(name)   # the model cards round (3.35 B is "3.3B activated")
    assert cfg.n_parameters() / 1e9 == pytest.approx(total, abs=0.06)
    assert cfg.n_active_parameters() / 1e9 == pytest.approx(active, abs=0.06)


def test_analyze_command_shows_active_parameters(capsys):
    import edgellm.cli.main

    code = edgellm.cli.main.main(["analyze", "--model", "Mixtral-8x7B", "--hardware", "A6000", "--batch", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "expert_gate_proj" in out and "router" in out
    # 8 * (1 - (3/4)^4) = 5.47 experts; 12.88 B + 32 layers x 3.47 more experts x 3 x 4096 x 14336 = 32.4 B
    assert "mixture of experts: 32.4 B of 46.7 B parameters read this step (5.47 of 8 experts" in out


def test_measure_refuses_a_moe_model_clearly(case):
    from edgellm.roofline.hardware import lookup_builtin
    from edgellm.roofline.profile import measure_model

    _, _, folder = case
    with pytest.raises(UnsupportedModelError, match="does not profile mixture-of-experts"):
        measure_model(load_model(str(folder)), lookup_builtin("A6000"), seq_len=8, repeats=1)


def test_gguf_metadata_without_expert_counts_is_refused():
    meta = {"general.architecture": "qwen3moe", "qwen3moe.block_count": 2, "qwen3moe.embedding_length": 64,
            "qwen3moe.attention.head_count": 4, "qwen3moe.feed_forward_length": 48, "qwen3moe.context_length": 128,
            "qwen3moe.vocab_size": 64}
    with pytest.raises(ModelFormatError, match="lacks 'qwen3moe.expert_count'"):
        ModelConfig.from_gguf_metadata(meta)
    with pytest.raises(ModelFormatError, match="lacks 'qwen3moe.expert_used_count'"):
        ModelConfig.from_gguf_metadata({**meta, "qwen3moe.expert_count": 8})
    cfg = ModelConfig.from_gguf_metadata({**meta, "qwen3moe.expert_count": 8, "qwen3moe.expert_used_count": 2,
                                          "qwen3moe.expert_feed_forward_length": 32})
    assert cfg.experts == ExpertConfig(8, 2, 32, norm_top_k=True) and cfg.qk_norm
    with pytest.raises(UnsupportedModelError, match="'mixtral' is not a layout llama.cpp writes"):
        ModelConfig.from_gguf_metadata({k.replace("qwen3moe", "mixtral"): v.replace("qwen3moe", "mixtral")
                                        if isinstance(v, str) else v for k, v in meta.items()})
