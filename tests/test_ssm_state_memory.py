"""A recurrent sequence holds a fixed amount of memory, and the snapshot cache a bounded one.

The state of one Mamba sequence is worked by hand from the config (per layer: the last
``d_conv - 1`` convolution inputs of ``d_inner`` channels and the ``d_inner x d_state`` SSM state,
float32); the engine must hold exactly that for a sequence after 20 tokens and after 300, in a
pool too small for anything growing with the length. Replies are checked against transformers
(one full pass over the whole sequence, its argmax at every position: greedy decoding's reference).
The snapshot policy (which prompt edges are kept) is checked on the state manager alone against
edges worked by hand.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgellm.errors import InvalidParameterError  # noqa: E402
from edgellm.kv.block_manager import KVSequence, prefix_hashes  # noqa: E402
from edgellm.kv.state import StatePool  # noqa: E402
from edgellm.kv.state_manager import StateManager  # noqa: E402
from edgellm.loading.load import load_model  # noqa: E402
from edgellm.roofline.recurrent import state_bytes  # noqa: E402
from edgellm.runtime.engine import Engine  # noqa: E402
from edgellm.sampling import SamplingParams  # noqa: E402
from tiny_model import save_hf_folder  # noqa: E402
from tiny_recurrent import hf_greedy, save_chat_folder, words  # noqa: E402

VOCAB, HIDDEN, EXPAND, D_STATE, D_CONV, LAYERS = 64, 32, 2, 8, 4, 2
D_INNER = EXPAND * HIDDEN
#: one sequence's state, every layer, float32: conv inputs (d_inner x (d_conv - 1)) + SSM state
STATE_BYTES = 4 * LAYERS * (D_INNER * (D_CONV - 1) + D_INNER * D_STATE)


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, state_size=D_STATE, expand=EXPAND,
                                   conv_kernel=D_CONV, num_hidden_layers=LAYERS, initializer_range=1.0,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(cfg)
    with torch.no_grad():   # spread-out decays and step sizes: varied greedy replies
        for name, p in hf.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            elif name.endswith("dt_proj.bias"):
                p.uniform_(-3.0, 0.5)
    hf = hf.float().eval()
    folder = save_chat_folder(hf, tmp_path_factory.mktemp("mamba_state"), VOCAB)
    return hf, load_model(str(folder))


@torch.no_grad()
def teacher_forced_greedy(hf, ids: list[int], reply: list[int]) -> list[int]:
    """transformers' greedy choice after every prefix of ``ids + reply`` that ends in the reply's
    positions (one pass): equal to ``reply`` exactly when ``reply`` is the greedy continuation."""
    logits = hf(torch.tensor([ids + reply]), use_cache=False).logits[0]
    return logits[len(ids) - 1:len(ids) - 1 + len(reply)].argmax(-1).tolist()


def test_a_sequence_holds_one_state_whatever_its_length(mamba):
    hf, loaded = mamba
    assert loaded.model.state_shapes() == {"conv": (D_INNER, D_CONV - 1), "ssm": (D_INNER, D_STATE)}
    # two sequences' states and no more: one snapshot per 16 tokens would need 20 of them for 300
    with Engine(loaded, kv_memory=2 * STATE_BYTES) as eng:
        assert eng.num_blocks == 2 and eng.cache.nbytes == 2 * STATE_BYTES
        kv = eng.stats()["kv"]
        assert kv["per_sequence"] and kv["bytes_per_sequence"] == STATE_BYTES and kv["bytes_per_token"] == 0
        # the roofline analyzer counts the same state
        assert state_bytes(loaded.config, 32) == STATE_BYTES
        s = eng.session(sampling=SamplingParams.greedy(ignore_eos=True))
        held = []
        for n in (20, 300):
            prompt = eng.input.encode([*s.messages, {"role": "user", "content": words(n, 5, VOCAB)}], chat=True)
            r = s.chat(words(n, 5, VOCAB), SamplingParams.greedy(max_tokens=n, ignore_eos=True))
            assert len(r.token_ids) == n
            assert teacher_forced_greedy(hf, prompt, r.token_ids) == r.token_ids
            held.append((s.kv.num_tokens, list(s.kv.blocks), eng.block_manager.num_used, s.kv_bytes))
        (short, short_slots, short_used, short_bytes), (long, long_slots, long_used, long_bytes) = held
        assert long > short + 300
        assert len(short_slots) == len(long_slots) == 1 and short_used == long_used == 1
        assert short_bytes == long_bytes == STATE_BYTES


def test_the_snapshot_cache_stays_within_capacity_and_eviction_changes_no_result(mamba):
    hf, loaded = mamba
    params = SamplingParams.greedy(max_tokens=6)
    prompts = [words(500 + i, 30 + 5 * i, VOCAB) for i in range(8)]
    with Engine(loaded, kv_memory=64 * STATE_BYTES, state_snapshots=3) as eng:
        bm = eng.block_manager
        ids = [eng.input.encode(p) for p in prompts]
        first = []
        for p in prompts:
            first.append(eng.generate(p, params)[0])
            bm.check()
            assert len(bm.snapshots) <= 3
        assert bm.evictions > 0 and bm.snapshots_taken > 3
        # the first prompts' snapshots were evicted: computed again from the start
        again = eng.generate(prompts[0], params)[0]
        assert again.cached_tokens == 0
        # the last prompt's last block edge is still cached: only the rest is computed
        last = eng.generate(prompts[-1], params)[0]
        assert last.cached_tokens == len(ids[-1]) - len(ids[-1]) % 16
        assert len(bm.snapshots) <= 3
    want = [hf_greedy(hf, i, 6) for i in ids]
    assert [r.token_ids for r in first] == want
    assert again.token_ids == want[0] and last.token_ids == want[-1]


def test_which_prompt_edges_are_snapshotted():
    """Block size 4. A 50-token prompt keeps edges at blocks 1, 2, 4, 8 and its last (12); a second
    prompt sharing 22 tokens resumes at block 4 (16 tokens) and keeps the branch point at block 5
    (20: the first prompt went through it, its next edge is new) besides its own; a third prompt
    sharing the same 22 tokens then resumes at 20."""
    bs = 4
    pool = StatePool({"x": (3,)}, 1, 32, bs)
    bm = StateManager(32, bs, pool.copy_block, snapshot_capacity=20)
    a = list(range(100, 150))
    b = a[:22] + list(range(200, 240))
    c = a[:22] + list(range(300, 330))

    def run_prompt(prompt: list[int]) -> tuple[int, list[int]]:
        seq = KVSequence()
        added = bm.match_prefix(seq, prompt, len(prompt) - 1)
        assert bm.reserve(seq, len(prompt))
        slots = bm.chunk_slots(seq, prompt[seq.num_tokens:], prompt)
        pool.data["x"][0, slots.live] = float(len(prompt))      # what the model leaves in the live slot
        for edge, slot in slots.snapshots:
            pool.data["x"][0, slot] = float(edge)                # ... and at the edges inside the chunk
        bm.commit(seq, prompt[seq.num_tokens:])
        bm.check()
        bm.free_sequence(seq)
        return added, sorted(e for e, h in edges_of(prompt).items() if h in bm.snapshots)

    def edges_of(prompt):
        return {bs * (i + 1): h for i, h in enumerate(prefix_hashes(prompt, bs))}

    assert run_prompt(a) == (0, [4, 8, 16, 32, 48])
    # the last edge (48) is inside the single chunk too; its snapshot holds the state at 48
    assert pool.data["x"][0, bm.snapshots[edges_of(a)[48]]].tolist() == [48.0] * 3
    added, kept = run_prompt(b)
    assert added == 16 and kept == [4, 8, 16, 20, 32, 60]
    added, _ = run_prompt(c)
    assert added == 20
    # a prompt ending exactly on an edge: the snapshot is copied from the live state at commit
    d = list(range(400, 412))
    run_prompt(d)
    assert pool.data["x"][0, bm.snapshots[edges_of(d)[12]]].tolist() == [12.0] * 3


def test_bad_state_settings_are_refused_clearly(mamba, tmp_path):
    _, loaded = mamba
    with pytest.raises(InvalidParameterError, match=f"holds no recurrent state.*takes {STATE_BYTES} bytes"):
        Engine(loaded, kv_memory=STATE_BYTES - 1)
    with pytest.raises(InvalidParameterError, match="state_snapshots must be a non-negative integer"):
        Engine(loaded, kv_memory=4 * STATE_BYTES, state_snapshots=-1)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    with pytest.raises(InvalidParameterError, match="keeps a KV cache, not a recurrent state"):
        Engine(load_model(str(save_hf_folder(llama, tmp_path, VOCAB))), kv_memory="1MB", state_snapshots=4)


def test_more_conversations_than_states_take_turns_through_offload(mamba):
    """Three states in the pool, six conversations at once: a turn waiting for a state gets the
    one of an idle session, whose state moves to host memory (one state's bytes); that session's
    follow-up turn brings it back and computes only the new turn. Every reply is transformers'."""
    hf, loaded = mamba
    users = [words(700 + i, 6 + i, VOCAB) for i in range(6)]
    with Engine(loaded, kv_memory=3 * STATE_BYTES, host_memory=64 * STATE_BYTES) as eng:
        sessions = [eng.session(sampling=SamplingParams.greedy(max_tokens=6)) for _ in users]
        handles = [s.send(u) for s, u in zip(sessions, users)]
        firsts = [h.result() for h in handles]
        eng.block_manager.check()
        assert eng.block_manager.num_used == 3 and eng.scheduler.offloads == 3
        s = sessions[0]
        assert eng.kv_tier(s) == "host"
        assert eng.store.counters()["host_bytes"] == 3 * STATE_BYTES
        history = s.kv.num_tokens
        second = s.chat(users[0] + " w9")
        assert eng.kv_tier(s) == "pool" and second.cached_tokens == history
        prompts = [eng.input.encode([{"role": "user", "content": u}], chat=True) for u in users]
        follow = eng.input.encode([{"role": "user", "content": users[0]},
                                   {"role": "assistant", "content": firsts[0].text},
                                   {"role": "user", "content": users[0] + " w9"}], chat=True)
    assert [r.token_ids for r in firsts] == [hf_greedy(hf, p, 6) for p in prompts]
    assert second.token_ids == hf_greedy(hf, follow, 6)
