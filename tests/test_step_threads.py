"""The vocabulary projection after a fused decode step runs on the thread count the thread chooser
gave the blocks (edgellm/runtime/model_runner.py), and its logits do not depend on that count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from edgellm.kernels import native
from edgellm.kv.cache import KVCache
from edgellm.runtime.model_runner import ModelRunner, SeqChunk, torch_threads

pytestmark = pytest.mark.skipif(native() is None, reason="native kernels unavailable on this machine")


@pytest.fixture(scope="module")
def model(smollm2_path):
    from edgellm.loading.load import load_model

    return load_model(str(smollm2_path)).model


def test_torch_threads_sets_and_restores_the_count():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_head_logits_are_the_same_bits_on_one_and_two_threads(model):
    """SmolLM2's 49152 x 576 Q8_0 head at 1 and 16 rows: one thread and two give identical logits,
    and both match a float64 product with the gguf package's dequantisation of the same blocks."""
    head = model.weights.lm_head
    assert head.code is not None
    raw = head.raw.numpy()
    ref_w = quants.dequantize(raw.reshape(head.shape[0], -1), GGMLQuantizationType.Q8_0)
    ref_w = torch.from_numpy(np.asarray(ref_w, dtype=np.float64).reshape(head.shape))
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 16):
        h = torch.randn(rows, model.cfg.hidden_size, generator=gen)
        picked = torch.arange(rows)
        with torch.inference_mode(), torch_threads(1):
            one = model.logits(h, picked)
        with torch.inference_mode(), torch_threads(2):
            two = model.logits(h, picked)
        assert torch.equal(one, two)
        x = torch.nn.functional.rms_norm(h, (model.cfg.hidden_size,), model.weights.final_norm,
                                         model.cfg.rms_norm_eps).double()
        torch.testing.assert_close(one.double(), x @ ref_w.T, rtol=0, atol=2e-4)


def test_runner_runs_the_head_on_the_fused_steps_thread_count(model):
    """A chooser that settled on one thread (what contention does) puts the head on one thread too;
    the logits equal those of a runner on two threads bit for bit, and PyTorch's count is restored."""
    seen = []
    plain_logits = model.logits

    def logits(h, rows, trace=None):           # the real head, recording the count it ran on
        seen.append(torch.get_num_threads())
        return plain_logits(h, rows, trace)

    prompt, nxt = [1, 504, 3458, 314, 253], [2295]

    def decode(threads: int) -> tuple[torch.Tensor, int | None]:
        cache = KVCache(model.cfg, 4, 16, torch.float32)
        slots = torch.arange(0, 64)
        with torch_threads(2):   # the runner made under the count it runs with (else it makes a new chooser)
            runner = ModelRunner(model, cache)
            runner.thread_chooser.current = threads
            runner.run([SeqChunk(prompt, 0, slots)])             # prefill: the per-layer path
            assert runner.step_threads is None
            out = runner.run([SeqChunk(nxt, len(prompt), slots)])
            assert torch.get_num_threads() == 2
        return out, runner.step_threads

    model.logits = logits
    try:
        one, threads_one = decode(1)
        two, threads_two = decode(2)
    finally:
        del model.logits
    assert (threads_one, threads_two) == (1, 2)
    assert seen == [2, 1, 2, 2]                 # prefill on 2; the decode head on the chooser's count
    assert torch.equal(one, two)
