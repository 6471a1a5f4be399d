"""A model split across 2 local ranks (gloo, one thread each): pipeline stages and tensor-parallel
shards give the greedy tokens of one process, uneven splits are handled or refused clearly, and
a rank that dies stops the others within the stated timeout instead of hanging (issue 13).

CI runs the sharding arithmetic and a tiny random model (3 blocks, 9 heads on 3 KV heads: neither
splits evenly over 2 ranks); the default model and the server are slow-marked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from edgellm.config import ModelConfig
from edgellm.errors import InvalidParameterError
from edgellm.llm import LLM
from edgellm.quant import gguf_blocks
from edgellm.quant.gguf_weights import gguf_weight
from edgellm.runtime.distributed import ParallelConfig, RankError
from edgellm.runtime.engine import Engine
from edgellm.runtime.parallel_runner import SplitModel, micro_batches
from edgellm.runtime.sharding import pipeline_stages, take_columns, take_rows, tensor_shares
from edgellm.sampling import SamplingParams
from tiny_model import write_tiny_llama

# 3 blocks (odd), 9 query heads on 3 KV heads of width 32, MLP 160 = 5 blocks of 32: over 2 ranks
# the heads go 6 + 3, the MLP 96 + 64 columns, the pipeline 1 + 2 blocks.
TINY_SPLIT = dict(n_layers=3, hidden=288, n_heads=9, n_kv_heads=3, ffn=160, context=4096)
TIMEOUT_S = 5.0
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


def _cfg(**kw) -> ModelConfig:
    base = dict(architecture="llama", n_layers=30, hidden_size=576, n_heads=9, n_kv_heads=3, head_dim=64,
                ffn_size=1536, vocab_size=100, context_length=64)
    return ModelConfig(**{**base, **kw})


# ---- sharding arithmetic ---------------------------------------------------------------------------
def test_pipeline_stages_are_contiguous_and_cover_every_block():
    assert pipeline_stages(30, 2) == [range(0, 15), range(15, 30)]
    assert pipeline_stages(3, 2) == [range(0, 1), range(1, 3)]     # the longer stage last (rank 0 has the head)
    with pytest.raises(InvalidParameterError, match="at least 4 blocks"):
        pipeline_stages(3, 4)


def test_tensor_shares_split_uneven_heads_by_kv_group():
    shares = tensor_shares(_cfg(), 2)        # SmolLM2: 9 heads on 3 KV heads, MLP 1536
    assert [s.kv_heads for s in shares] == [range(0, 2), range(2, 3)]
    assert [s.ffn for s in shares] == [range(0, 768), range(768, 1536)]
    with pytest.raises(InvalidParameterError, match="at least 4 KV heads"):
        tensor_shares(_cfg(), 4)


@pytest.mark.parametrize("ggml_type, n_cols, cut", [("Q4_1", 96, 64), ("Q6_K", 512, 256)])
def test_weight_splits_keep_the_format_and_the_values(ggml_type, n_cols, cut):
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((6, n_cols)).astype(np.float32)
    raw = torch.from_numpy(gguf_blocks.quantize(dense, ggml_type)).view(6, -1)
    reference = gguf_blocks.dequantize(raw, ggml_type, (6, n_cols))      # the file's own decoding
    w = gguf_weight(raw, ggml_type, n_cols)
    rows = torch.tensor([4, 1])
    picked = take_rows(w, rows, "test")
    left, right = take_columns(w, 0, cut, "test"), take_columns(w, cut, n_cols, "test")
    assert picked.format == left.format == w.format          # still quantised: the same blocks
    torch.testing.assert_close(picked.dequantize(), reference[rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(left.dequantize(), reference[:, :cut], rtol=0, atol=1e-6)
    torch.testing.assert_close(right.dequantize(), reference[:, cut:], rtol=0, atol=1e-6)
    with pytest.raises(InvalidParameterError, match="block boundaries"):
        take_columns(w, 0, 16, "test")


@pytest.mark.parametrize("kw, message", [
    (dict(pipeline=0), "--pipeline-parallel must be a positive integer"),
    (dict(pipeline=2, tensor=2), "cannot be combined"),
    (dict(pipeline=2, timeout_s=-1), "--dist-timeout must be a positive number"),
])
def test_bad_parallel_settings_are_refused_with_the_flag_named(kw, message):
    with pytest.raises(InvalidParameterError, match=message):
        ParallelConfig(**kw)


def test_dist_timeout_alone_is_refused():
    from argparse import Namespace

    from edgellm.cli.common import start_split

    with pytest.raises(InvalidParameterError, match="--dist-timeout needs") as err:
        start_split(Namespace(pipeline_parallel=1, tensor_parallel=1, dist_timeout=5.0, threads=None))
    assert "--pipeline-parallel" in err.value.fix


def test_micro_batches_keep_order_and_split_evenly():
    chunks = list(range(5))
    assert micro_batches(chunks, 2) == [[0, 1, 2], [3, 4]]
    assert micro_batches(chunks[:1], 2) == [[0]]


# ---- 2 local ranks on a tiny random model --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_split_path(tmp_path_factory, smollm2_path):
    return write_tiny_llama(tmp_path_factory.mktemp("dist") / "tiny-split.gguf", smollm2_path, seed=3, **TINY_SPLIT)


@pytest.fixture(scope="module")
def tiny_reference(tiny_split_path):
    """Greedy tokens of one process: one prompt alone, and three batched together."""
    llm = LLM(str(tiny_split_path), threads=1)
    params = SamplingParams.greedy(max_tokens=12)
    alone = llm.generate(PROMPTS[0], params).token_ids
    with Engine(llm) as engine:
        batch = [r.token_ids for r in engine.generate(PROMPTS, params)]
    return alone, batch


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _split_tokens(path, config: ParallelConfig, max_tokens: int = 12):
    """Greedy tokens of one prompt alone and of three batched, on ``path`` split as ``config`` says."""
    split = SplitModel(config, str(path))
    try:
        llm = LLM(str(path), parallel=split)
        params = SamplingParams.greedy(max_tokens=max_tokens)
        alone = llm.generate(PROMPTS[0], params).token_ids
        with Engine(llm) as engine:      # three sequences in one step: micro-batches through the stages
            batch = [r.token_ids for r in engine.generate(PROMPTS, params)]
        return alone, batch
    finally:
        split.close()


@pytest.mark.parametrize("config", [ParallelConfig(pipeline=2, timeout_s=TIMEOUT_S),
                                    ParallelConfig(tensor=2, timeout_s=TIMEOUT_S)], ids=["pipeline", "tensor"])
def test_two_ranks_give_the_tokens_of_one_process(tiny_split_path, tiny_reference, config, restore_threads):
    alone, batch = _split_tokens(tiny_split_path, config)
    assert alone == tiny_reference[0]
    assert batch == tiny_reference[1]
    assert len(set(map(tuple, batch))) == 3      # three different sequences, not one repeated


def test_a_split_that_cannot_be_made_is_refused_before_any_rank_starts(tmp_path, smollm2_path):
    path = write_tiny_llama(tmp_path / "one-kv-head.gguf", smollm2_path, n_heads=4, n_kv_heads=1)
    with pytest.raises(InvalidParameterError, match="at least 2 KV heads") as err:
        SplitModel(ParallelConfig(tensor=2), str(path))
    assert "--pipeline-parallel" in err.value.fix


def test_a_killed_rank_stops_the_split_model_within_the_timeout(tiny_split_path, restore_threads):
    split = SplitModel(ParallelConfig(pipeline=2, timeout_s=TIMEOUT_S), str(tiny_split_path))
    try:
        llm = LLM(str(tiny_split_path), parallel=split)
        llm.generate("warm up", SamplingParams.greedy(max_tokens=2))
        (child,) = split.group.children
        child.send_signal(signal.SIGKILL)
        outcome: list = []

        def generate():
            try:
                outcome.append(llm.generate("after the kill", SamplingParams.greedy(max_tokens=8)))
            except RankError as err:
                outcome.append(err)

        t = threading.Thread(target=generate, daemon=True)
        t.start()
        t.join(timeout=3 * TIMEOUT_S)     # the stated bound is TIMEOUT_S; a hang never returns
        assert not t.is_alive(), "generation hung after a rank was killed"
        assert isinstance(outcome[0], RankError), outcome
        assert not split.healthy and "rank 1" in str(split.failure)
    finally:
        split.close()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_killing_rank_0_ends_the_other_rank_within_the_timeout(tiny_split_path):
    cmd = [sys.executable, "-m", "edgellm", "generate", "--model", str(tiny_split_path), "--prompt", "Hello",
           "--max-tokens", "100000", "--pipeline-parallel", "2", "--dist-timeout", str(TIMEOUT_S)]
    rank0 = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        rank0.stdout.read(1)            # the first text: both ranks are generating
        (worker,) = _children(rank0.pid)
        rank0.send_signal(signal.SIGKILL)
        assert rank0.wait() == -signal.SIGKILL       # killed while generating, not finished
        gone = time.monotonic() + 3 * TIMEOUT_S
        while time.monotonic() < gone and os.path.exists(f"/proc/{worker}") and not _zombie(worker):
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{worker}") or _zombie(worker), "rank 1 outlived rank 0"
    finally:
        if rank0.poll() is None:
            rank0.kill()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


# ---- the default model and the server (slow) -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("config", [ParallelConfig(pipeline=2), ParallelConfig(tensor=2)], ids=["pipeline", "tensor"])
def test_default_model_on_two_ranks_gives_the_tokens_of_one_process(llm, smollm2_path, config):
    """SmolLM2-135M Q4_1: 30 blocks go 15 + 15; its 9 heads on 3 KV heads go 6 + 3."""
    params = SamplingParams.greedy(max_tokens=24)
    alone = llm.generate(PROMPTS[0], params).token_ids
    with Engine(llm) as engine:
        batch = [r.token_ids for r in engine.generate(PROMPTS, params)]
    assert (alone, batch) == _split_tokens(smollm2_path, config, max_tokens=24)


@pytest.mark.slow
def test_server_on_two_pipeline_ranks_answers_openai_then_503_when_a_rank_dies(llm, smollm2_path):
    import httpx
    import openai

    from edgellm.serve.process import ServerProcess

    expected = llm.generate(PROMPTS[0], SamplingParams.greedy(max_tokens=16)).text
    with ServerProcess(["--model", "smollm2-135m", "--pipeline-parallel", "2", "--dist-timeout",
                        str(TIMEOUT_S), "--kv-memory", "64MB"]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        out = client.completions.create(model="smollm2-135m", prompt=PROMPTS[0], max_tokens=16, temperature=0)
        assert out.choices[0].text == expected
        refused = httpx.post(server.url + "/v1/embeddings", json={"model": "smollm2-135m", "input": "hi"})
        assert refused.status_code == 400 and "split across ranks" in refused.text
        (worker,) = _children(server.proc.pid)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 3 * TIMEOUT_S
        while httpx.get(server.url + "/health").status_code != 503:
            assert time.monotonic() < deadline, "the server still says it is healthy with a rank dead"
            time.sleep(0.2)
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="smollm2-135m", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert err.value.status_code == 503
        assert server.alive
        assert "rank 1" in server.output()


@pytest.mark.slow
def test_bench_runs_ours_on_two_pipeline_ranks():
    """The token identity is the tests' above; here: the bench starts the split, reports it, ends."""
    import json

    out = subprocess.run([sys.executable, "-m", "edgellm", "bench", "--pipeline-parallel", "2", "--repeat", "1",
                          "--prompt-tokens", "16", "--gen-tokens", "8", "--json", "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout)
    assert (s["settings"]["pipeline_parallel"], s["settings"]["tensor_parallel"]) == (2, 1)
    assert s["repeats"]["ours"][-1]["completion_tokens"] == 8 and s["decode_tok_s"] > 0
