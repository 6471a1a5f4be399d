"""Offload of inactive sessions: host memory, disk, and the degraded path (recompute), on the real
default model; plus the OffloadStore alone."""

from __future__ import annotations

import warnings

import pytest
import torch

from edgellm.kv.cache import KVCache
from edgellm.kv.offload import OffloadStore, OffloadWarning
from edgellm.runtime.engine import Engine
from edgellm.runtime.types import Phase
from edgellm.sampling import SamplingParams

BS = 4
N = 4
SYSTEM = "Be brief."
TURNS = ["Name a colour.", "And a fruit?"]
# A plain prompt long enough that, with a small pool, it pushes the idle session out.
PRESSURE = ("Here is a long story about a small robot who lived in a lighthouse by the sea and counted "
            "ships every night, writing each name in a notebook.")


def greedy(n: int = N) -> SamplingParams:
    return SamplingParams.greedy(max_tokens=n)


@pytest.fixture(scope="module")
def expected(smollm2_llm):
    """The conversation run on the single-sequence path: both turns' token ids and the pool size
    (in blocks of BS) that holds the first turn and the pressure prompt, but not both."""
    llm = smollm2_llm
    msgs = [{"role": "system", "content": SYSTEM}]
    out = []
    for text in TURNS:
        msgs.append({"role": "user", "content": text})
        c = llm.generate(llm.tokenizer.encode_chat(msgs), greedy())
        out.append(c.token_ids)
        msgs.append({"role": "assistant", "content": c.text})
    held = len(llm.tokenizer.encode_chat(msgs[:2])) + N - 1     # KV of turn 1 (+ reserved)
    conv2 = len(llm.tokenizer.encode_chat(msgs[:4]))
    pressure = len(llm.tokenizer.encode(PRESSURE)) + 1
    blocks = -(-held // BS) + -(-pressure // BS) - 1
    assert blocks * BS > conv2 + N, "the pool must hold the second turn alone"
    return {"turns": out, "blocks": blocks}


def make_engine(llm, expected, **kw) -> Engine:
    return Engine(llm, kv_memory=expected["blocks"] * KVCache.bytes_per_block(llm.cfg, BS), block_size=BS, **kw)


def two_turns(eng: Engine, expected, between=None):
    """Turn 1, pressure from another request, (between), turn 2; returns (session, turn-2 result)."""
    s = eng.session(system=SYSTEM)
    r1 = s.send(TURNS[0], greedy()).result()
    assert r1.token_ids == expected["turns"][0]
    assert s.phase == Phase.INACTIVE and s.kv.blocks
    eng.generate([PRESSURE], greedy(1))
    if between:
        between(s)
    r2 = s.send(TURNS[1], greedy()).result()
    return s, r2


def test_host_offload_under_pressure_and_identical_output(llm, expected):
    eng = make_engine(llm, expected, host_memory="64MB")
    held = []

    def check(s):
        assert s.phase == Phase.OFFLOADED_HOST and s.kv_tier == "host" and not s.kv.blocks
        assert eng.block_manager.offloaded_host > 0
        held.append(s.kv_tokens)

    s, r2 = two_turns(eng, expected, check)
    assert r2.token_ids == expected["turns"][1]
    assert r2.cached_tokens == held[0], "the restored history was recomputed"
    assert eng.stats()["offload"]["restored_host"] == 1
    assert Phase.OFFLOADED_HOST in [t[2] for t in s.transitions]
    assert s.clock.phase_seconds()["offloaded_host"] > 0
    s.close()
    assert eng.block_manager.num_used == 0 and not eng.store.entries and eng.store.host_used == 0


def test_disk_offload_and_retire_leaves_no_file(llm, expected, tmp_path):
    eng = make_engine(llm, expected, host_memory=0, disk_dir=tmp_path / "kv")
    files = []

    def check(s):
        assert s.phase == Phase.OFFLOADED_DISK and s.kv_tier == "disk"
        files.extend(eng.store.files())
        assert len(files) == 1 and files[0].stat().st_size > 0
        assert not [p for p in (tmp_path / "kv").iterdir() if p.name.endswith(".tmp")]

    s, r2 = two_turns(eng, expected, check)
    assert r2.token_ids == expected["turns"][1]
    assert eng.stats()["offload"]["restored_disk"] == 1
    assert not files[0].exists(), "a restored entry's file must be deleted"
    # offload again (explicitly), then retire: every tier freed, no file left
    assert eng.offload_idle() == 1 and s.phase == Phase.OFFLOADED_DISK and eng.store.files()
    s.close()
    assert eng.block_manager.num_used == 0 and not eng.store.entries
    assert list((tmp_path / "kv").iterdir()) == []


def test_host_spills_to_disk(llm, expected, tmp_path):
    eng = Engine(llm, kv_memory="8MB", block_size=BS, host_memory=1, disk_dir=tmp_path)
    a, b = eng.session(system=SYSTEM), eng.session(system=SYSTEM)
    a.send("Hi", greedy(1)).result()
    b.send("Hello", greedy(1)).result()
    eng.store.host_bytes = a.kv_bytes + 16 * 1024    # room for one session in host memory
    assert eng.offload_idle(1) == 1 and a.phase == Phase.OFFLOADED_HOST
    assert eng.offload_idle(1) == 1 and b.phase == Phase.OFFLOADED_HOST
    assert a.phase == Phase.OFFLOADED_DISK and len(eng.store.files()) == 1   # LRU went down a tier
    eng.close()
    assert eng.store.files() == [] and a.phase == b.phase == Phase.RETIRED


def test_unwritable_disk_degrades_to_recompute(llm, expected, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    eng = make_engine(llm, expected, host_memory=0, disk_dir=blocker / "kv")

    def check(s):
        assert s.kv_tier == "none" and s.phase == Phase.INACTIVE and s.kv_tokens == 0

    with pytest.warns(OffloadWarning, match="recomputed"):
        s, r2 = two_turns(eng, expected, check)
    assert r2.token_ids == expected["turns"][1], "the session must survive a failing disk"
    assert eng.stats()["offload"]["disk_failures"] >= 1
    s.close()
    assert eng.block_manager.num_used == 0


def test_full_disk_degrades_to_recompute(llm, expected, tmp_path):
    # A real write failure part way through the file: the process's file-size limit (RLIMIT_FSIZE)
    # makes the kernel refuse the write (EFBIG), as a full device refuses it with ENOSPC.
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # else the signal kills the process
    eng = make_engine(llm, expected, host_memory=0, disk_dir=tmp_path)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        with pytest.warns(OffloadWarning, match="File too large"):
            s, r2 = two_turns(eng, expected)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert r2.token_ids == expected["turns"][1], "the session must survive a full disk"
    assert eng.stats()["offload"]["disk_failures"] >= 1
    assert list(tmp_path.iterdir()) == [], "a failed write must not leave a partial file"
    s.close()
    assert eng.block_manager.num_used == 0


# ---- the store alone (no model) --------------------------------------------------------------
def blob(n: int) -> dict:
    return {"kv": torch.arange(n, dtype=torch.float32)}


def test_store_budget_spill_and_discard(tmp_path):
    st = OffloadStore(host_bytes=100, disk_dir=tmp_path, prefix="t")
    assert st.put("a", blob(20), 1) == [] and st.tier("a") == "host"     # 80 bytes
    assert st.put("b", blob(20), 1) == [] and st.tier("b") == "host"     # a spills
    assert st.tier("a") == "disk" and len(st.files()) == 1
    assert st.put("c", blob(50), 2) == [] and st.tier("c") == "disk"     # larger than the host budget
    assert torch.equal(st.take("a")["kv"], blob(20)["kv"]) and st.tier("a") is None
    assert st.blocks_in("disk") == 2 and st.blocks_in("host") == 1
    st.discard("c")
    st.discard("b")
    assert st.files() == [] and st.host_used == 0 and st.disk_used == 0


def test_store_without_disk_drops(tmp_path):
    st = OffloadStore(host_bytes=100)
    assert st.put("a", blob(20), 1) == []
    assert st.put("b", blob(20), 1) == ["a"]      # no disk tier: the oldest is dropped
    assert st.take("a") is None and st.dropped == 1
    st2 = OffloadStore(host_bytes=0, disk_dir=tmp_path, disk_bytes=10, prefix="t")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert st2.put("x", blob(20), 1) == ["x"]
    assert any(issubclass(x.category, OffloadWarning) for x in w)


def test_store_unreadable_file_means_recompute(tmp_path):
    st = OffloadStore(host_bytes=0, disk_dir=tmp_path, prefix="t")
    st.put("a", blob(4), 1)
    st.files()[0].write_bytes(b"garbage")
    with pytest.warns(OffloadWarning):
        assert st.take("a") is None
    assert st.files() == []
