"""The five-phase lifecycle with a recurrent state instead of KV (tiny random Mamba models, HF
folders with a chat tokenizer): every reply is compared token for token with transformers' own
greedy continuation of the same rendered conversation (full forward passes, no cache), so
"identical alone, in a batch of 16, after offload to disk, after a follow-up turn" is checked
against an independent reference, not against the engine itself.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgellm.errors import InvalidParameterError  # noqa: E402
from edgellm.kv.state import StatePool  # noqa: E402
from edgellm.loading.load import load_model  # noqa: E402
from edgellm.runtime.engine import Engine  # noqa: E402
from edgellm.sampling import SamplingParams  # noqa: E402
from tiny_recurrent import hf_greedy, save_chat_folder, words  # noqa: E402

VOCAB, NEW_TOKENS, BLOCK = 64, 6, 16
SYSTEM = words(1, 40, VOCAB)                 # its rendering fills two blocks of 16 and part of a third
USERS = [words(100 + i, 3 + i % 5, VOCAB) for i in range(16)]


def build_mamba():
    # large random weights and spread-out decay rates and step sizes: varied greedy replies (the
    # default initialisation of so small a model answers one token over and over)
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                   initializer_range=1.0, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            elif name.endswith("dt_proj.bias"):
                p.uniform_(-3.0, 0.5)
    return model


def build_mamba2():
    cfg = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=8,
                                    head_dim=8, n_groups=2, initializer_range=1.0, tie_word_embeddings=True,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            elif name.endswith("dt_bias"):
                p.uniform_(-3.0, 0.5)
    return model


def build_rwkv():
    cfg = transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  context_length=256, initializer_range=1.0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.RwkvForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "time_mix" in name:
                p.uniform_(0.0, 1.0)
            elif name.endswith("time_decay"):
                p.uniform_(-2.0, 1.5)
            elif p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model


BUILDERS = {"mamba": build_mamba, "mamba2": build_mamba2, "rwkv": build_rwkv}
# CI runs the lifecycle on Mamba; the same checks on the other architectures are slow-marked
# (their per-layer parity is in tests/test_mamba2.py and tests/test_rwkv.py)
KINDS = [pytest.param(k, marks=() if k == "mamba" else pytest.mark.slow) for k in BUILDERS]


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    """(transformers model, edgellm LoadedModel) of one recurrent architecture."""
    hf = BUILDERS[request.param]().float().eval()
    folder = save_chat_folder(hf, tmp_path_factory.mktemp(request.param), VOCAB)
    return hf, load_model(str(folder))


def greedy(**overrides) -> SamplingParams:
    return SamplingParams.greedy(max_tokens=NEW_TOKENS, **overrides)


def conversation(*user_turns_and_replies: str) -> list[dict]:
    """system, user, assistant, user, ... messages of a conversation."""
    roles = ["user", "assistant"]
    return [{"role": "system", "content": SYSTEM}] + [
        {"role": roles[i % 2], "content": text} for i, text in enumerate(user_turns_and_replies)]


def test_the_engine_keeps_a_state_pool(tiny):
    _, loaded = tiny
    with Engine(loaded, kv_memory="1MB") as eng:
        assert isinstance(eng.cache, StatePool)
        # one slot = one sequence's whole state, every layer, whatever its length
        assert eng.kv_bytes_per_block == 4 * loaded.config.n_layers * sum(
            math.prod(shape) for shape in loaded.model.state_shapes().values())


def test_alone_and_in_a_batch_of_16_match_transformers(tiny):
    hf, loaded = tiny
    # ignore_eos: all 16 replies run their full length, so every decode step has 16 rows
    with Engine(loaded, kv_memory="2MB") as eng:
        alone = eng.session(system=SYSTEM, sampling=greedy(ignore_eos=True)).chat(USERS[0])
        want = [hf_greedy(hf, eng.input.encode(conversation(u), chat=True), NEW_TOKENS, eos=None) for u in USERS]
        assert alone.token_ids == want[0]
    with Engine(loaded, kv_memory="2MB") as eng:
        handles = [eng.session(system=SYSTEM, sampling=greedy(ignore_eos=True)).send(u) for u in USERS]
        got = [h.result().token_ids for h in handles]
        assert eng.step_stats.max_batch_rows == 16      # the 16 decoded together
    assert got == want


def test_offload_to_disk_and_follow_up_turn_continue_from_the_state(tiny, tmp_path):
    hf, loaded = tiny
    with Engine(loaded, kv_memory="2MB", host_memory=0, disk_dir=str(tmp_path)) as eng:
        s = eng.session(system=SYSTEM, sampling=greedy())
        first = s.chat(USERS[1])
        history = s.kv.num_tokens                       # prompt + reply tokens whose state is held
        assert eng.offload_idle() == 1
        assert eng.kv_tier(s) == "disk" and len(eng.store.files()) == 1
        # what left the pool is the one live state, not a snapshot per block of the history
        assert eng.store.counters()["disk_bytes"] == eng.kv_bytes_per_block and history > 2 * BLOCK
        second = s.chat(USERS[2])
        assert eng.kv_tier(s) == "pool" and eng.store.counters()["restored_disk"] == 1
        # nothing of the history recomputed: only the new turn's tokens
        assert second.cached_tokens == history
        assert second.computed_prompt_tokens == second.prompt_tokens - history
        ids = eng.input.encode(conversation(USERS[1], first.text, USERS[2]), chat=True)
        assert second.token_ids == hf_greedy(hf, ids, NEW_TOKENS)
        s.close()
        assert eng.store.files() == [] and eng.block_manager.num_used == 0


def test_a_shared_system_prompt_is_computed_once(tiny):
    hf, loaded = tiny
    with Engine(loaded, kv_memory="2MB") as eng:
        prompts = [eng.input.encode(conversation(u), chat=True) for u in USERS[:4]]
        shared = min(next(i for i, (a, b) in enumerate(zip(p, prompts[0])) if a != b) for p in prompts[1:])
        reused = shared - shared % BLOCK                # the full blocks every prompt starts with
        # block 2's edge: a power of two, snapshotted by the first prompt (edgellm.kv.state_manager)
        assert reused == 2 * BLOCK
        results = [eng.session(system=SYSTEM, sampling=greedy()).chat(u) for u in USERS[:4]]
    assert results[0].computed_prompt_tokens == len(prompts[0])
    for r, p in zip(results[1:], prompts[1:]):
        assert r.cached_tokens == reused
        assert r.computed_prompt_tokens == len(p) - reused
    assert [r.token_ids for r in results] == [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]


def test_speculative_decoding_is_refused(tiny):
    _, loaded = tiny
    with pytest.raises(InvalidParameterError, match="recurrent"):
        Engine(loaded, kv_memory="1MB", speculative="ngram")


def test_an_edited_history_resumes_at_the_block_edge_before_the_change(tiny):
    """The conversation changed inside a block (the last reply edited): the state after the
    common prefix is not held, so the turn resumes from the snapshot at the block edge before it."""
    hf, loaded = tiny
    with Engine(loaded, kv_memory="2MB") as eng:
        s = eng.session(system=SYSTEM, sampling=greedy(ignore_eos=True))
        s.chat(USERS[3])
        held = list(s.kv.token_ids)
        s.messages[-1]["content"] = "w9 w9 w9"           # a different reply than the one computed
        second = s.chat(USERS[4])
        ids = eng.input.encode(conversation(USERS[3], "w9 w9 w9", USERS[4]), chat=True)
        common = next(i for i, (a, b) in enumerate(zip(ids, held)) if a != b)
        assert common % BLOCK                           # the change falls inside a block
        # the last edge of the first prompt is snapshotted, and the change falls after it
        first_prompt = len(eng.input.encode(conversation(USERS[3]), chat=True))
        assert second.cached_tokens == common - common % BLOCK == first_prompt - first_prompt % BLOCK
        assert second.computed_prompt_tokens == len(ids) - second.cached_tokens
        assert second.token_ids == hf_greedy(hf, ids, NEW_TOKENS, eos=None)


@pytest.mark.slow
def test_served_on_completions_and_chat_refused_without_a_template(tiny, tmp_path):
    """`edgellm serve` on a recurrent model: /v1/completions answers what transformers answers;
    without a chat template (a base model's folder) /v1/chat/completions is refused clearly."""
    import httpx

    from edgellm.serve.process import ServerProcess
    from edgellm.tokenizer import Tokenizer
    from tiny_model import save_hf_folder

    hf, _ = tiny
    folder = save_hf_folder(hf, tmp_path / "base", VOCAB)        # no chat template
    tokenizer = Tokenizer.from_file(folder)
    with ServerProcess(["--model", str(folder), "--kv-memory", "2MB", "--threads", "2"]) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            r = http.post("/v1/completions", json={"model": "base", "prompt": USERS[5], "max_tokens": NEW_TOKENS,
                                                   "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200
            want = hf_greedy(hf, tokenizer.encode(USERS[5]), NEW_TOKENS, eos=None)
            assert r.json()["choices"][0]["text"] == tokenizer.decode(want)
            r = http.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "w9"}]})
            assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
