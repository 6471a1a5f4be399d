"""The runtime on the real default model: sessions, continuous batching, prefix reuse, preemption,
admission. Greedy outputs are compared token for token with the same prompt run alone
(``LLM.generate``, whose tokens tests/test_parity.py checks against HF transformers)."""

from __future__ import annotations

import threading

import pytest

from edgellm.errors import ContextOverflowError, InvalidParameterError
from edgellm.kv.cache import KVCache
from edgellm.runtime.engine import Engine
from edgellm.runtime.scheduler import common_prefix
from edgellm.runtime.types import Phase, PhaseClock, Request
from edgellm.sampling import SamplingParams
from edgellm.util import parse_size

N = 4   # tokens generated per request: short, to stay fast

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "My favourite fruit is",
    "In 1969, the first man on the moon was",
    "The quick brown fox",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which plants",
    "The largest planet in the solar system is",
    "Q: What is 7 times 8?\nA:",
    "A haiku about the sea:\n",
    "import numpy as np\nx =",
    "The opposite of hot is",
    ("Here is a long story about a small robot who lived in a lighthouse by the sea and counted "
     "ships every night, writing each name in a notebook with a blue pencil. One night"),
]


@pytest.fixture(scope="module")
def ref(smollm2_llm):
    """Greedy tokens of the single-sequence path, memoised: ref(prompt_or_ids, n)."""
    memo: dict = {}

    def get(prompt, n: int = N) -> list[int]:
        key = tuple(prompt) if isinstance(prompt, list) else prompt
        have = memo.get(key)
        if have is None or (len(have) < n and len(have) == have_n[key]):
            have = smollm2_llm.generate(prompt, SamplingParams.greedy(max_tokens=max(n, N))).token_ids
            memo[key] = have
            have_n[key] = max(n, N)
        return have[:n]

    have_n: dict = {}
    return get


def greedy(n: int = N, **kw) -> SamplingParams:
    return SamplingParams.greedy(max_tokens=n, **kw)


def test_parse_size():
    assert parse_size("512MB") == 512 * 2 ** 20
    assert parse_size("2GB") == 2 * 2 ** 30
    assert parse_size("1.5GiB") == int(1.5 * 2 ** 30)
    assert parse_size(1000) == 1000 and parse_size("64k") == 65536
    for bad in ("lots", "12XB", "-1MB", "", -5, True):
        with pytest.raises(InvalidParameterError):
            parse_size(bad)


def test_engine_arguments(llm):
    with pytest.raises(InvalidParameterError):
        Engine(llm, kv_memory="1KB")            # not even one block
    with pytest.raises(InvalidParameterError):
        Engine(llm, kv_memory="oops")
    with pytest.raises(InvalidParameterError):
        Engine(llm, kv_memory="8MB", preemption="sometimes")


def test_alone_matches_single_sequence_path(llm, ref):
    eng = Engine(llm, kv_memory="16MB")
    [r] = eng.generate([PROMPTS[0]], greedy())
    assert r.token_ids == ref(PROMPTS[0])
    assert r.prompt_tokens == len(llm.tokenizer.encode(PROMPTS[0])) and r.finish_reason in ("length", "stop")
    # token ids in, and a chat session's first turn
    ids = llm.tokenizer.encode(PROMPTS[1])
    assert eng.generate(ids, greedy())[0].token_ids == ref(PROMPTS[1])
    s = eng.session(system="Be brief.")
    pieces = list(s.send("Name a colour.", greedy()))
    turn = s.results[-1]
    conv = llm.tokenizer.encode_chat([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Name a colour."}])
    assert turn.token_ids == ref(conv)
    assert "".join(pieces) == turn.text
    assert s.phase == Phase.INACTIVE
    phases = [t[2] for t in s.transitions]
    assert phases[:4] == [Phase.WAITING, Phase.PREFILL, Phase.DECODE, Phase.INACTIVE]
    assert all(a[0] <= b[0] for a, b in zip(s.transitions, s.transitions[1:]))
    s.close()
    assert s.phase == Phase.RETIRED
    assert eng.block_manager.num_used == 0
    with pytest.raises(InvalidParameterError):
        s.send("again")


def test_batch_of_16_mixed_prefill_and_decode(llm, ref):
    # A small token budget makes the long prompt's prefill span several steps next to decode rows.
    eng = Engine(llm, kv_memory="32MB", max_batch_tokens=24)
    first = [eng.submit(Request(p, greedy())) for p in PROMPTS[:6]]
    eng.step()
    eng.step()                                  # the first six are decoding now
    rest = [eng.submit(Request(p, greedy())) for p in PROMPTS[6:]]
    handles = first + rest
    starved = shared_steps = 0
    while not all(h.done for h in handles):
        # decode is never starved: every sequence that was decoding gets its token in every step
        decoding = {h: len(h.seq.out_ids) for h in handles if h.seq is not None and h.seq.out_ids and not h.done}
        long_seq = rest[-1].seq
        before = long_seq.kv.num_tokens if long_seq is not None else 0
        eng.step()
        starved += sum(len(h.seq.out_ids) != n + 1 for h, n in decoding.items())
        if decoding and long_seq is not None and not long_seq.out_ids and long_seq.kv.num_tokens > before:
            shared_steps += 1                   # a chunk of the long prompt ran beside decode rows
    assert starved == 0
    assert shared_steps >= 1
    for p, h in zip(PROMPTS, handles):
        assert h.result().token_ids == ref(p), p
    steps = eng.stats()["steps"]
    assert steps["by_kind"]["mixed"]["steps"] > 0, "decode rows and prefill chunks shared no step"
    assert steps["max_batch_rows"] >= 10
    assert_pool_empty(eng)


def assert_pool_empty(eng: Engine) -> None:
    """Nothing holds a block: every block is free or an unreferenced prefix-cache entry."""
    bm = eng.block_manager
    bm.check()
    assert bm.num_used == 0 and bm.num_free + bm.num_cached == bm.num_blocks
    assert not eng.store.entries and eng.store.host_used == 0
    eng.clear_prefix_cache()                    # forgetting the prefix cache leaves every block free
    assert bm.num_free == bm.num_blocks
    bm.check()


def test_followup_prefill_computes_only_new_tokens(llm, ref):
    eng = Engine(llm, kv_memory="16MB")
    s = eng.session(system="Be brief.")
    r1 = s.send("Name a colour.", greedy()).result()
    held = list(s.kv.token_ids)
    assert held == r1_prompt(llm, s)[: len(held)] and len(held) == r1.prompt_tokens + len(r1.token_ids) - 1
    r2 = s.send("And a fruit?", greedy()).result()
    conv2 = llm.tokenizer.encode_chat(s.messages[:-1])
    reusable = common_prefix(held, conv2, len(conv2) - 1)
    assert r2.prompt_tokens == len(conv2)
    assert r2.cached_tokens == reusable
    assert r2.computed_prompt_tokens == len(conv2) - reusable
    # the new turn is the user message and the template around it: a few dozen tokens at most,
    # while the conversation so far is not recomputed
    new_turn = len(conv2) - r1.prompt_tokens - len(r1.token_ids)
    assert r2.computed_prompt_tokens <= new_turn + 2
    assert s.clock.tokens["followup_prefill"] == r2.computed_prompt_tokens
    assert r2.token_ids == ref(conv2)
    assert Phase.FOLLOWUP_PREFILL in [t[2] for t in s.transitions]
    s.close()


def r1_prompt(llm, s):
    return llm.tokenizer.encode_chat(s.messages, add_generation_prompt=False)


def test_shared_prefix_is_stored_once(llm):
    eng = Engine(llm, kv_memory="16MB")
    system = ("You are a careful assistant for a library. Answer questions about opening hours, "
              "borrowing rules and events. Keep every answer to one short sentence.")
    one = greedy(1)
    a = eng.session(system=system)
    a.send("Hello", one).result()
    shared = len(llm.tokenizer.encode_chat([{"role": "system", "content": system}],
                                           add_generation_prompt=False)) // eng.block_size
    assert shared >= 2
    b = eng.session(system=system)
    rb = b.send("When do you open?", one).result()
    assert rb.cached_tokens >= shared * eng.block_size
    assert a.kv.blocks[:shared] == b.kv.blocks[:shared]
    used_two = eng.block_manager.num_used
    assert used_two == len(a.kv.blocks) + len(b.kv.blocks) - shared
    # two more arriving in the same step compute the prefix concurrently; it is merged after
    c, d = eng.session(system=system), eng.session(system=system)
    eng.clear_prefix_cache()
    hc, hd = c.send("Hi", one), d.send("Hey", one)
    hc.result(), hd.result()
    assert c.kv.blocks[:shared] == d.kv.blocks[:shared] == a.kv.blocks[:shared]
    for s in (a, b, c, d):
        s.close()
    assert eng.block_manager.num_used == 0
    eng.block_manager.check()


def test_prompt_larger_than_pool_refused_while_other_session_works(llm, ref):
    bpb = KVCache.bytes_per_block(llm.cfg, 16)
    eng = Engine(llm, kv_memory=6 * bpb)         # 96 tokens
    s = eng.session()
    h = eng.submit(Request(PROMPTS[2], greedy()))
    eng.step()
    with pytest.raises(ContextOverflowError) as e:
        eng.submit(Request(PROMPTS[15] * 3, greedy()))
    assert "KV pool" in str(e.value) and "kv_memory" in str(e.value)
    with pytest.raises(ContextOverflowError) as e:
        eng.submit(Request([1] * llm.cfg.context_length, greedy()))
    assert "context window" in str(e.value)
    with pytest.raises(ContextOverflowError):
        s.send("word " * 120)
    assert not s.busy and s.messages == []      # the session is still usable
    with pytest.raises(InvalidParameterError):
        eng.submit(Request("", greedy()))
    assert h.result().token_ids == ref(PROMPTS[2])


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_loses_no_token(llm, ref, mode):
    # block_size 4 and 8 blocks: four sequences of ~6 prompt + 8 output tokens cannot all fit.
    bs = 4
    eng = Engine(llm, kv_memory=8 * KVCache.bytes_per_block(llm.cfg, bs), block_size=bs, preemption=mode,
                 host_memory="64MB")
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[4], PROMPTS[14]]
    handles = [eng.submit(Request(p, greedy(8))) for p in prompts]
    results = [h.result() for h in handles]
    assert sum(r.preemptions for r in results) > 0
    assert eng.stats()["scheduler"]["preemptions"] > 0
    for p, r in zip(prompts, results):
        assert r.token_ids == ref(p, 8), p
    assert_pool_empty(eng)


def test_cancel_frees_blocks_within_a_step(llm):
    eng = Engine(llm, kv_memory="16MB")
    h = eng.submit(Request(PROMPTS[3], greedy(50, ignore_eos=True)))
    events = h.events()
    next(events)
    assert eng.block_manager.num_used > 0
    h.cancel()
    eng.step()
    assert h.done and h.result().finish_reason == "cancelled"
    assert eng.block_manager.num_used == 0


def test_background_thread_and_threads_submitting(llm, ref):
    eng = Engine(llm, kv_memory="16MB").start()
    try:
        out: dict = {}

        def user(i):
            s = eng.session()
            seen = []
            handle = eng.submit(Request(PROMPTS[i], greedy(), on_event=lambda ev: seen.append(ev.token_id)))
            out[i] = (handle.result(timeout=120), seen)
            s.close()

        threads = [threading.Thread(target=user, args=(i,)) for i in (5, 7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in (5, 7):
            r, seen = out[i]
            assert r.token_ids == ref(PROMPTS[i])
            assert [t for t in seen if t is not None] == r.token_ids
    finally:
        eng.close()
    assert eng.block_manager.num_used == 0


def test_stats_aggregate_phases(llm):
    eng = Engine(llm, kv_memory="16MB")
    s = eng.session(system="Be brief.")
    s.send("Hi", greedy(2)).result()
    st = eng.stats()
    # 2 tokens: the first from the prefill, the second from one decode step of one token
    assert st["phase_s"]["prefill"] > 0 and st["phase_s"]["decode"] > 0
    assert st["tokens"]["prefill"] == s.results[0].prompt_tokens
    assert st["tokens"]["decode"] == 1
    assert st["tokens"]["generated"] == 2
    assert st["sessions"]["by_phase"] == {"inactive": 1}
    assert st["blocks"]["used"] == len(s.kv.blocks)
    assert s.stats()["kv_bytes"] == len(s.kv.blocks) * eng.kv_bytes_per_block
    s.close()
    st = eng.stats()
    assert st["sessions"]["retired"] == 1 and st["blocks"]["used"] == 0
    assert st["tokens"]["generated"] == 2          # retired sessions stay in the totals


def test_phase_clock_by_hand():
    """Time per phase from given timestamps: each phase gets the span until the next transition,
    the current one counts up to `now`, and a retired session stops counting."""
    c = PhaseClock(Phase.WAITING, now=10.0)
    c.to(Phase.PREFILL, now=10.5)
    c.to(Phase.DECODE, now=11.25)
    c.to(Phase.DECODE, now=11.5)                # no transition: the same phase
    c.to(Phase.INACTIVE, now=13.0)
    got = c.phase_seconds(now=14.0)
    assert (got["waiting"], got["prefill"], got["decode"], got["inactive"]) == (0.5, 0.75, 1.75, 1.0)
    assert [(t, a.value, b.value) for t, a, b in c.transitions] == [
        (10.5, "waiting", "prefill"), (11.25, "prefill", "decode"), (13.0, "decode", "inactive")]
    c.to(Phase.RETIRED, now=15.0)
    assert c.phase_seconds(now=100.0)["inactive"] == 2.0 and c.phase_seconds(now=100.0)["retired"] == 0.0


def test_idle_sessions_retire(llm):
    import time

    eng = Engine(llm, kv_memory="16MB", idle_retire_s=0.05)
    s = eng.session()
    s.send("Hi", greedy(1)).result()
    assert eng.block_manager.num_used > 0
    time.sleep(0.1)
    assert eng.reap_idle() == 1
    assert s.phase == Phase.RETIRED and s.retire_reason == "idle"
    assert eng.block_manager.num_used == 0
    with pytest.raises(InvalidParameterError):
        s.send("still there?")


def test_chat_command_reuses_the_conversation(smollm2_path):
    """`edgellm chat` runs on a session: the second turn computes only its own tokens."""
    import re
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "edgellm", "chat", "--model", str(smollm2_path), "--threads", "2",
                        "--temperature", "0", "--max-tokens", "3", "--stats", "--kv-memory", "16MB"],
                       input="Name a colour.\nAnd a fruit?\n/exit\n", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    stats = re.findall(r"\[(\d+) prompt tokens \((\d+) reused, (\d+) computed\)", p.stderr)
    assert len(stats) == 2, p.stderr
    (p1, r1, c1), (p2, r2, c2) = [tuple(map(int, t)) for t in stats]
    assert r1 == 0 and c1 == p1
    assert p2 > p1 and r2 + c2 == p2 and r2 >= p1, "the second turn recomputed the first"
    assert c2 < p2 - p1 + 8


def test_sessions_bench_small_run(llm):
    """The benchmark's own bookkeeping on a tiny run: every decode step of 2 sessions counted, a
    follow-up turn of about 20 new tokens, KV bytes per session from the model's shape."""
    from edgellm.bench.sessions import run_sessions_bench

    r = run_sessions_bench(llm=llm, concurrency=(1, 2), decode_tokens=3, histories=(40,), users=0, repeat=1,
                           profile=False, threads=None, kv_memory="4MB")
    assert [d["sessions"] for d in r["decode"]] == [1, 2] and all(d["steps_timed"] == 3 for d in r["decode"])
    [f] = r["followup"]
    assert 18 <= f["new_tokens"] <= 22 and f["history_tokens"] >= 30
    per_token = 2 * llm.cfg.n_layers * llm.cfg.n_kv_heads * llm.cfg.head_dim * 4
    assert r["kv_bytes_per_token"] == per_token
    assert f["session_kv_bytes"] == per_token * 16 * -(-f["history_tokens"] // 16)


def test_sessions_bench_profile_times_both_paths(llm):
    """The decode-batch profile reads the model's op scopes: every figure positive, the fused call
    timed at every batch size where the model has it (the per-layer blocks are the rest)."""
    from edgellm.bench.sessions import profile_decode_batch

    rows = profile_decode_batch(llm, [1, 3], context=20, repeat=1)
    assert [r["batch"] for r in rows] == [1, 3]
    assert llm.loaded.model.has_fused_decode
    for r in rows:
        assert r["per_layer_ms"] > 0 and r["lm_head_ms"] > 0 and r["fused_ms"] > 0


def test_bench_sessions_scenario_bad_input(capsys):
    from edgellm.cli.main import main

    assert main(["bench", "--scenario", "sessions", "--repeat", "0"]) == 2
    err = capsys.readouterr().err
    assert "--repeat must be at least 1" in err
