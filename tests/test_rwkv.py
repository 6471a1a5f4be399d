"""A tiny random RWKV-4 (transformers' RwkvForCausalLM, saved as an HF folder) against transformers,
as tests/test_mamba.py does for Mamba: a 40-token prompt in chunks of 13 over blocks of 8, decode
steps, and a second sequence resuming from a block-edge snapshot in the same step as the first
one's decode row. Seven blocks with ``rescale_every=3`` so the inference-time rescaling (weights
divided by 2^(i // 3), the residual halved after every third block) is exercised. The reference
is one transformers pass over the whole sequence (its CPU path: a sequential WKV loop). Logits
within 1e-3 at every step.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgellm.kv.state import StatePool  # noqa: E402
from edgellm.loading.load import load_model  # noqa: E402
from edgellm.runtime.model_runner import ModelRunner, SeqChunk  # noqa: E402
from tiny_model import save_hf_folder  # noqa: E402

VOCAB, BLOCK = 64, 8
PROMPT_LEN, DECODE_STEPS, CHUNK = 40, 6, 13
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def reference():
    cfg = transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=32, attention_hidden_size=24, intermediate_size=48,
                                  num_hidden_layers=7, rescale_every=3, context_length=128,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.RwkvForCausalLM(cfg).float().eval()
    with torch.no_grad():   # random mixes, decays, bonuses and norms: every term shows
        for name, p in model.named_parameters():
            if "time_mix" in name:
                p.uniform_(0.0, 1.0)
            elif name.endswith("time_decay"):
                p.uniform_(-2.0, 1.5)
            elif name.endswith("time_first"):
                p.uniform_(-1.0, 1.0)
            elif "ln" in name and name.endswith("weight"):
                p.normal_(1.0, 0.3)
            elif "ln" in name and name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    return save_hf_folder(reference, tmp_path_factory.mktemp("rwkv"), VOCAB)


@pytest.fixture(scope="module")
def ids() -> list[int]:
    gen = torch.Generator().manual_seed(2)
    return torch.randint(3, VOCAB, (PROMPT_LEN + DECODE_STEPS,), generator=gen).tolist()


@pytest.fixture(scope="module")
def expected(reference, ids) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids]), use_cache=False).logits[0].float()


def _runner(loaded) -> ModelRunner:
    return ModelRunner(loaded.model, StatePool(loaded.model.state_shapes(), loaded.config.n_layers, 16, BLOCK))


def _chunk(ids, start, n, table, pool) -> SeqChunk:
    return SeqChunk(ids[start:start + n], start, pool.block_slots(table, start + n))


def test_loads_as_a_recurrent_model(folder):
    loaded = load_model(str(folder))
    assert loaded.config.architecture == "rwkv" and loaded.model.recurrent
    assert loaded.model.state_shapes() == {"att_x": (32,), "ffn_x": (32,), "num": (24,), "den": (24,), "max": (24,)}


def test_chunked_prefill_and_decode_match_transformers(folder, ids, expected):
    runner = _runner(load_model(str(folder)))
    table = list(range(16))
    for start in range(0, PROMPT_LEN, CHUNK):
        n = min(CHUNK, PROMPT_LEN - start)
        logits = runner.run([_chunk(ids, start, n, table, runner.cache)])
        torch.testing.assert_close(logits[0], expected[start + n - 1], atol=TOLERANCE, rtol=0)
    for p in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
        logits = runner.run([_chunk(ids, p, 1, table, runner.cache)])
        torch.testing.assert_close(logits[0], expected[p], atol=TOLERANCE, rtol=0)


def test_resuming_from_a_block_edge_snapshot_matches(folder, ids, expected):
    runner = _runner(load_model(str(folder)))
    first = list(range(8))
    runner.run([_chunk(ids, 0, PROMPT_LEN, first, runner.cache)])
    second = first[:2] + [10, 11, 12, 13]
    logits = runner.run([_chunk(ids, PROMPT_LEN, 1, first, runner.cache),
                         _chunk(ids, 2 * BLOCK, PROMPT_LEN - 2 * BLOCK, second, runner.cache)])
    torch.testing.assert_close(logits[0], expected[PROMPT_LEN], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(logits[1], expected[PROMPT_LEN - 1], atol=TOLERANCE, rtol=0)
