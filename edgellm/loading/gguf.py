"""Read and write GGUF files: validated, lazy (memory-mapped) and fast.

Reading parses the GGUF header with our own bounds-checked parser (``gguf.GGUFReader`` takes
seconds on a 49k-token vocabulary because it builds a numpy view per string, and it fails on
damaged files with IndexError/ValueError/struct errors); tensor data are views into one
read-only ``numpy.memmap`` of the file, so nothing is read until it is used. Writing goes
through ``gguf.GGUFWriter`` into a temporary file that replaces the target atomically.

Every problem with the input raises an :class:`~edgellm.errors.EdgeLLMError` subclass whose
message names the file and the problem.
"""

from __future__ import annotations

import hashlib
import marshal
import mmap
import os
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from edgellm.errors import EdgeLLMError, ModelFormatError, ModelNotFoundError, UnsupportedModelError
from edgellm.quant import gguf_blocks
from edgellm.util import cache_dir

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# GGUF metadata value types.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALAR_FMT = {_UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I", _INT32: "i",
               _FLOAT32: "f", _BOOL: "?", _UINT64: "Q", _INT64: "q", _FLOAT64: "d"}
_SCALAR_NP = {_UINT8: "<u1", _INT8: "<i1", _UINT16: "<u2", _INT16: "<i2", _UINT32: "<u4", _INT32: "<i4",
              _FLOAT32: "<f4", _BOOL: "?", _UINT64: "<u8", _INT64: "<i8", _FLOAT64: "<f8"}
_TYPE_NAMES = {_UINT8: "UINT8", _INT8: "INT8", _UINT16: "UINT16", _INT16: "INT16", _UINT32: "UINT32",
               _INT32: "INT32", _FLOAT32: "FLOAT32", _BOOL: "BOOL", _STRING: "STRING", _ARRAY: "ARRAY",
               _UINT64: "UINT64", _INT64: "INT64", _FLOAT64: "FLOAT64"}
_TYPE_IDS = {v: k for k, v in _TYPE_NAMES.items()}


# ggml tensor types: id -> (name, elements per block, bytes per block), from ggml's block layouts
# (an fp16 scale "d" is 2 bytes, K-quant super-blocks hold 256 elements). Written out here rather
# than read from the gguf package, whose import costs ~0.13 s of every start; a type id not listed
# here (one newer than this table) is looked up in the gguf package.
_QK_K = 256
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 28: ("F64", 1, 8),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    2: ("Q4_0", 32, 2 + 16),              # d, 32 nibbles
    3: ("Q4_1", 32, 2 + 2 + 16),          # d, m, 32 nibbles
    6: ("Q5_0", 32, 2 + 4 + 16),          # d, 32 high bits, 32 nibbles
    7: ("Q5_1", 32, 2 + 2 + 4 + 16),
    8: ("Q8_0", 32, 2 + 32),              # d, 32 int8
    9: ("Q8_1", 32, 4 + 4 + 32),          # fp32 d and sum, 32 int8
    10: ("Q2_K", _QK_K, 2 + 2 + _QK_K // 16 + _QK_K // 4),
    11: ("Q3_K", _QK_K, 2 + _QK_K // 4 + _QK_K // 8 + 12),
    12: ("Q4_K", _QK_K, 2 + 2 + _QK_K // 2 + 12),
    13: ("Q5_K", _QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
    14: ("Q6_K", _QK_K, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
    15: ("Q8_K", _QK_K, 4 + _QK_K + _QK_K // 8),
}


def ggml_type_info(type_id: int) -> tuple[str, int, int] | None:
    """(name, block elements, block bytes) of a ggml type id, or None for an id nobody knows."""
    info = _GGML_TYPES.get(type_id)
    if info is None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            t = GGMLQuantizationType(type_id)
        except ValueError:
            return None
        if t not in GGML_QUANT_SIZES:
            return None
        info = (t.name, *GGML_QUANT_SIZES[t])
    return info


def ggml_type_id(name: str) -> int | None:
    """The ggml type id of a type name ("Q4_1"), or None if unknown."""
    for tid, (tname, _, _) in _GGML_TYPES.items():
        if tname == name:
            return tid
    from gguf.constants import GGMLQuantizationType

    t = GGMLQuantizationType.__members__.get(name)
    return None if t is None else int(t)


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file; ``data`` is a read-only memmap of exactly its bytes."""

    name: str
    shape: tuple[int, ...]   # PyTorch order, e.g. (out_features, in_features)
    ggml_type: str           # "Q4_1", "F32", ...
    data: np.ndarray         # uint8, memory-mapped
    offset: int = 0          # absolute byte offset of the data in the file
    path: Path | None = None  # the file, when ``data`` maps it (copies then read it directly)

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def copy_bytes(self, piece: int = 4 << 20) -> np.ndarray:
        """A private copy of the raw bytes (uint8, flat).

        Read from the file with ``readinto`` when the tensor knows its file: the kernel copies
        from the page cache in large pieces, while copying out of the mapping faults it in a
        page (4 KiB) at a time -- for SmolLM2's 90 MB that was most of the weights' load time,
        and the mapping never becomes resident (no RSS next to the copy). Otherwise the mapping
        is copied ``piece`` bytes at a time with each piece's file pages dropped once copied:
        the copy never sits next to a resident mapping of the whole tensor (a 30 MB embedding
        otherwise raised peak memory while loading by 30 MB)."""
        flat = self.data.reshape(-1)
        out = np.empty(flat.shape[0], dtype=np.uint8)
        if self.path is not None and self._read_file_into(out):
            return out
        for start in range(0, flat.shape[0], piece):
            end = min(flat.shape[0], start + piece)
            out[start:end] = flat[start:end]
            self.release(start, end)
        return out

    def _read_file_into(self, out: np.ndarray) -> bool:
        """Fill ``out`` with the tensor's bytes read from its file; False if the file changed or
        could not be read (the caller then copies from the mapping, which reports errors)."""
        view = memoryview(out)
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset)
                done = 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        return False
                    done += n
        except OSError:
            return False
        return True

    def release(self, start: int = 0, end: int | None = None) -> None:
        """Drop the file pages of bytes ``start:end`` of this tensor (all of it by default) from
        the process's resident memory, after a loader has copied them: otherwise the mapped file
        stays counted in RSS next to the copy. Reading ``data`` again re-faults it."""
        mm = getattr(self.data.base, "_mmap", None) or getattr(self.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        page = mmap.PAGESIZE
        end = self.nbytes if end is None else end
        start = (self.offset + start) // page * page
        end = -(-(self.offset + end) // page) * page
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, min(end, len(mm)) - start)
        except (OSError, ValueError):   # an advice, not a requirement
            pass

    def mapped_bytes(self) -> np.ndarray:
        """The raw bytes (uint8, flat) in place: a view of a private, copy-on-write mapping of
        this tensor's pages of the file, made no copy of and taking no new memory. For blocks
        the kernels read as stored: mapped pages come straight from the page cache when first
        touched, while a copy writes into fresh memory, whose first touch this VM serves slowly
        (readinto of SmolLM2's whole file: 0.05 s or 0.8 s, bimodal; mapping it and touching
        every page: 0.01 s). A mapping of its own per tensor, so the kernel's fault-around (up
        to 64 KiB per fault) maps no neighbour's pages; it is unmapped with its last view.
        Writes to the view stay in this process: the file is never changed. Falls back to
        :meth:`copy_bytes` for a tensor that knows no file, or whose file cannot be mapped."""
        if self.path is not None:
            try:
                return np.memmap(self.path, dtype=np.uint8, mode="c", offset=self.offset, shape=(self.nbytes,))
            except (OSError, ValueError):   # gone or shorter now: copy_bytes reports it
                pass
        return self.copy_bytes()

    def dequantize(self) -> torch.Tensor:
        """The tensor as float32, shape ``self.shape``."""
        if self.ggml_type not in gguf_blocks.BLOCK_ELEMS:
            raise UnsupportedModelError(
                f"tensor '{self.name}' has type {self.ggml_type}, which edgellm cannot decode",
                f"use a model quantised to one of: {', '.join(gguf_blocks.DEQUANTIZE_TYPES)}")
        return gguf_blocks.dequantize(self.data, self.ggml_type, self.shape)


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata as plain Python values, tensors as lazy views."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    file_size: int = 0
    version: int = 3
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0
    #: GGUF value type of each metadata key: "UINT32", "STRING", ... or ("ARRAY", "INT32").
    metadata_types: dict[str, Any] = field(default_factory=dict, repr=False)

    def config(self):
        """The model's :class:`~edgellm.config.ModelConfig`."""
        from edgellm.config import ModelConfig
        try:
            return ModelConfig.from_gguf_metadata(self.metadata, set(self.tensors))
        except EdgeLLMError as e:
            raise type(e)(f"{self.path}: {e.problem}", e.fix) from None


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

class _Truncated(Exception):
    pass


class _Parser:
    """Bounds-checked little-endian reader over a bytes-like buffer."""

    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(what)

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar("I", what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return _decode(s)

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALAR_FMT:
            return self.scalar(_SCALAR_FMT[vtype], f"value of '{key}'")
        if vtype == _STRING:
            return self.string(f"value of '{key}'")
        if vtype == _ARRAY:
            itype = self.u32(f"array type of '{key}'")
            count = self.u64(f"array length of '{key}'")
            if itype in _SCALAR_NP:
                dt = np.dtype(_SCALAR_NP[itype])
                self.need(count * dt.itemsize, f"array '{key}' ({count} items)")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr.tolist()
            if itype == _STRING:
                # Each string needs at least its 8-byte length: reject absurd counts up front.
                self.need(count * 8, f"array '{key}' ({count} strings)")
                out = []
                buf, pos, size = self.buf, self.pos, self.size
                unpack = struct.Struct("<Q").unpack_from
                append = out.append
                # The loop of a 49k-token vocabulary: kept to the bare minimum per string (slicing
                # the mmap already makes bytes; _decode's call only for the rare invalid UTF-8).
                for _ in range(count):
                    if pos + 8 > size:
                        raise _Truncated(f"array '{key}'")
                    (n,) = unpack(buf, pos)
                    end = pos + 8 + n
                    if end > size:
                        raise _Truncated(f"array '{key}'")
                    raw = buf[pos + 8:end]
                    try:
                        append(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        append(_decode(raw))
                    pos = end
                self.pos = pos
                return out
            if itype == _ARRAY:
                if depth >= _MAX_ARRAY_NESTING:
                    raise _TooDeep(key)
                self.need(count * 12, f"array '{key}' ({count} arrays)")
                return [self.value(_ARRAY, key, depth + 1) for _ in range(count)]
            raise _BadValueType(itype, key)
        raise _BadValueType(vtype, key)


_MAX_ARRAY_NESTING = 8


class _TooDeep(Exception):
    pass


class _BadValueType(Exception):
    def __init__(self, vtype: int, key: str):
        super().__init__(vtype, key)
        self.vtype = vtype
        self.key = key


def _decode(b: bytes) -> str:
    # Tokens of byte-level vocabularies may not be valid UTF-8 on their own; keep their bytes
    # recoverable with s.encode("utf-8", "surrogateescape") instead of failing.
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("utf-8", "surrogateescape")


def _fmt_err(path: Path, problem: str, fix: str | None = None) -> ModelFormatError:
    return ModelFormatError(f"{path}: {problem}",
                            fix or "the file is damaged or incomplete; download or export it again")


def read_gguf(path, *, allow_unsupported: bool = False) -> GGUFFile:
    """Parse the GGUF file at ``path`` (lazily: tensor data stay on disk until touched).

    Raises ``ModelNotFoundError`` (missing path, directory), ``ModelFormatError`` (not GGUF,
    truncated, impossible shapes, overlapping/duplicate tensors, bad metadata) or
    ``UnsupportedModelError`` (GGUF version, big-endian file, unknown tensor type id, or — unless
    ``allow_unsupported`` — a tensor type edgellm cannot decode).
    """
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"model file {path} does not exist",
                                 "check the path, or give a model name that edgellm knows")
    if path.is_dir():
        raise ModelNotFoundError(f"{path} is a directory, not a GGUF file",
                                 "give the path of the .gguf file inside it")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelNotFoundError(f"cannot read {path}: {e.strerror or e}", "check the path and its permissions") from None
    if size == 0:
        raise _fmt_err(path, "the file is empty (0 bytes), not a GGUF model")
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelNotFoundError(f"cannot open {path}: {e.strerror or e}", "check the file's permissions") from None
    try:
        return _parse(path, mm, size, allow_unsupported)
    except EdgeLLMError:
        raise
    except _Truncated as e:
        raise _fmt_err(path, f"file truncated: it ends ({size} bytes) inside the header, while reading {e}") from None
    except _BadValueType as e:
        raise _fmt_err(path, f"metadata key '{e.key}' has unknown value type {e.vtype}") from None
    except _TooDeep as e:
        raise _fmt_err(path, f"metadata key '{e}' nests arrays more than {_MAX_ARRAY_NESTING} deep") from None
    except (ValueError, IndexError, KeyError, struct.error, OverflowError, MemoryError, TypeError,
            RecursionError) as e:
        raise _fmt_err(path, f"malformed GGUF header ({type(e).__name__}: {e})") from None
    finally:
        try:
            mm.close()
        except BufferError:   # a numpy view of the header still alive (only on an error path)
            pass


@dataclass
class _Header:
    """What the header says: everything before the tensor data, as plain Python values."""

    version: int
    metadata: dict[str, Any]
    types: dict[str, Any]
    infos: list[tuple[str, list[int], int, int]]   # (name, ggml dims, type id, relative offset)
    alignment: int
    data_offset: int


def _parse(path: Path, mm: mmap.mmap, size: int, allow_unsupported: bool) -> GGUFFile:
    header = _read_cached_header(path, size)
    if header is None:
        header = _parse_header(path, mm, size)
        _write_cached_header(path, size, header)
    return _tensors(path, header, size, allow_unsupported)


def _parse_header(path: Path, mm: mmap.mmap, size: int) -> _Header:
    if size < 4 or mm[:4] != GGUF_MAGIC:
        head = bytes(mm[:4])
        raise _fmt_err(path, f"not a GGUF file (magic {head!r}, expected b'GGUF')",
                       "give a .gguf model file (safetensors/PyTorch checkpoints need converting "
                       "with llama.cpp's convert_hf_to_gguf.py)")
    p = _Parser(mm, size)
    p.pos = 4
    version = p.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        if version in (0x02000000, 0x03000000):   # 2 or 3 read with the wrong byte order
            raise UnsupportedModelError(f"{path}: big-endian GGUF files are not supported",
                                        "convert the model again on (or for) a little-endian machine")
        raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported (edgellm reads "
                                    f"versions {', '.join(map(str, SUPPORTED_VERSIONS))})",
                                    "re-export the model with a current llama.cpp")
    n_tensors = p.u64("the tensor count")
    n_kv = p.u64("the metadata count")
    # Every key/value takes at least 8+4+1 bytes, every tensor info at least 8+4+4+8 bytes.
    if n_kv * 13 > size or n_tensors * 24 > size:
        raise _fmt_err(path, f"header claims {n_tensors} tensors and {n_kv} metadata keys, more than "
                             f"a {size}-byte file can hold")

    metadata: dict[str, Any] = {}
    types: dict[str, Any] = {}
    for _ in range(n_kv):
        key = p.string("a metadata key")
        vtype = p.u32(f"the type of '{key}'")
        start = p.pos
        value = p.value(vtype, key)
        if key in metadata:
            raise _fmt_err(path, f"metadata key '{key}' appears twice")
        metadata[key] = value
        if vtype == _ARRAY:
            (itype,) = struct.unpack_from("<I", mm, start)
            types[key] = ("ARRAY", _TYPE_NAMES.get(itype, str(itype)))
        else:
            types[key] = _TYPE_NAMES[vtype]

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise _fmt_err(path, f"general.alignment is {alignment!r}; it must be a positive power of two")

    infos = []
    for i in range(n_tensors):
        name = p.string(f"the name of tensor #{i}")
        n_dims = p.u32(f"the dimension count of '{name}'")
        if n_dims == 0 or n_dims > MAX_DIMS:
            raise _fmt_err(path, f"tensor '{name}' has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        p.need(8 * n_dims, f"the shape of '{name}'")
        ne = list(struct.unpack_from(f"<{n_dims}q", mm, p.pos))
        p.pos += 8 * n_dims
        type_id = p.u32(f"the type of '{name}'")
        offset = p.u64(f"the data offset of '{name}'")
        infos.append((name, ne, type_id, offset))

    data_offset = -(-p.pos // alignment) * alignment
    if data_offset > size and infos:
        raise _fmt_err(path, f"file truncated: it ends ({size} bytes) before the tensor data "
                             f"(which start at byte {data_offset})")

    return _Header(version, metadata, types, infos, alignment, data_offset)


# ---- the header cache ---------------------------------------------------------------------
# A vocabulary's strings are most of a small model's header (SmolLM2: 98k strings, ~0.1 s of the
# ~2.7 s start to the first token), decoded one by one. A header of HEADER_CACHE_MIN_BYTES or more
# is kept after its first parse, marshalled (read back in a few milliseconds), under a key made
# of the file's identity (real path, size, modification time, inode) and this module's source, so
# an edited or replaced file, or a new edgellm, parses afresh. Like the tokenizer's recipes in the
# same cache directory: a damaged or unreadable entry is parsed again, an unwritable one skipped.
HEADER_CACHE_MIN_BYTES = 256 << 10
_HEADER_CACHE_FORMAT = 1


def _header_cache_path(path: Path, size: int) -> Path | None:
    try:
        real = path.resolve()
        st = real.stat()
    except OSError:
        return None
    if st.st_size != size:   # changed since it was opened
        return None
    h = hashlib.sha256(f"{_HEADER_CACHE_FORMAT} {sys.version_info[:2]} {marshal.version} {real} {st.st_size} "
                       f"{st.st_mtime_ns} {st.st_ino} {st.st_dev}".encode("utf-8", "surrogateescape"))
    h.update(Path(__file__).read_bytes())
    return cache_dir() / "gguf-headers" / f"{h.hexdigest()[:32]}.header"


def _read_cached_header(path: Path, size: int) -> _Header | None:
    cache = _header_cache_path(path, size) if size >= HEADER_CACHE_MIN_BYTES else None
    if cache is None:
        return None
    try:
        header = _Header(*marshal.loads(cache.read_bytes()))
        if not isinstance(header.metadata, dict) or header.data_offset > size:
            return None
        return header
    except Exception:  # noqa: BLE001 - missing, damaged or unreadable: parsed again
        return None


def _write_cached_header(path: Path, size: int, header: _Header) -> None:
    """Written to a temporary file renamed into place (no reader sees half a file)."""
    if header.data_offset < HEADER_CACHE_MIN_BYTES:
        return
    cache = _header_cache_path(path, size)
    if cache is None:
        return
    try:
        data = marshal.dumps((header.version, header.metadata, header.types, header.infos,
                              header.alignment, header.data_offset))
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{cache.stem}.", suffix=".tmp", dir=cache.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, cache)
        except BaseException:
            os.unlink(tmp)
            raise
    except (OSError, ValueError):   # a read-only home, or a value marshal cannot write: no cache
        pass


def _tensors(path: Path, header: _Header, size: int, allow_unsupported: bool) -> GGUFFile:
    """The tensors the header lists, checked against the file's size and each other."""
    version, metadata, types, infos = header.version, header.metadata, header.types, header.infos
    alignment, data_offset = header.alignment, header.data_offset
    whole = np.memmap(path, dtype=np.uint8, mode="r") if infos else None
    tensors: dict[str, GGUFTensor] = {}
    spans = []
    for name, ne, type_id, offset in infos:
        if name in tensors:
            raise _fmt_err(path, f"tensor name '{name}' appears twice")
        info = ggml_type_info(type_id)
        if info is None:
            raise UnsupportedModelError(f"{path}: tensor '{name}' has unknown tensor type id {type_id}",
                                        "the file is damaged, or was made by a newer llama.cpp than "
                                        "edgellm understands; use a Q4_K/Q8_0/F16 model")
        tname, be, bb = info
        if tname not in gguf_blocks.BLOCK_ELEMS and not allow_unsupported:
            raise UnsupportedModelError(
                f"{path}: tensor '{name}' has type {tname}, which edgellm does not run",
                f"use a model quantised to one of: {', '.join(gguf_blocks.DEQUANTIZE_TYPES)}")
        if any(d <= 0 for d in ne):
            raise _fmt_err(path, f"tensor '{name}' has an impossible shape {tuple(reversed(ne))} "
                                 "(every dimension must be positive)")
        n_el = 1
        for d in ne:
            n_el *= d
        if n_el >= 1 << 62:
            raise _fmt_err(path, f"tensor '{name}' has an impossible shape {tuple(reversed(ne))} (too large)")
        if ne[0] % be:
            raise _fmt_err(path, f"tensor '{name}' of type {tname} has rows of {ne[0]} elements, not a "
                                 f"multiple of the {tname} block size {be}")
        n_bytes = n_el // be * bb
        if offset % alignment:
            raise _fmt_err(path, f"tensor '{name}' data offset {offset} is not a multiple of the "
                                 f"alignment {alignment}")
        start = data_offset + offset
        end = start + n_bytes
        if end > size:
            raise _fmt_err(path, f"tensor '{name}' ({tname}, shape {tuple(reversed(ne))}, {n_bytes} bytes) "
                                 f"runs past the end of the file (it needs bytes {start}..{end}, the file "
                                 f"has {size}): the file is truncated or the tensor's shape is wrong")
        spans.append((start, end, name))
        tensors[name] = GGUFTensor(name=name, shape=tuple(reversed(ne)), ggml_type=tname,
                                   data=whole[start:end], offset=start, path=path)

    spans.sort()
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise _fmt_err(path, f"tensor '{n0}' ({e0 - s0} bytes by its shape and type) overlaps "
                                 f"tensor '{n1}': its shape does not match the bytes stored for it")

    return GGUFFile(path=path, metadata=metadata, tensors=tensors, file_size=size, version=version,
                    alignment=alignment, data_offset=data_offset, metadata_types=types)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def _infer_type(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return "BOOL"
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 1 << 32:
            return "UINT32"
        if -(1 << 31) <= v < 0:
            return "INT32"
        return "UINT64" if v >= 0 else "INT64"
    if isinstance(value, (float, np.floating)):
        return "FLOAT32"
    if isinstance(value, str):
        return "STRING"
    if isinstance(value, (bytes, bytearray)):
        return ("ARRAY", "UINT8")
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        if not items:
            raise ValueError("empty array")
        if all(isinstance(x, str) for x in items):
            return ("ARRAY", "STRING")
        if all(isinstance(x, (bool, np.bool_)) for x in items):
            return ("ARRAY", "BOOL")
        if all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in items):
            lo, hi = min(items), max(items)
            return ("ARRAY", "INT32" if -(1 << 31) <= lo and hi < 1 << 31 else "INT64")
        if all(isinstance(x, (int, float, np.integer, np.floating)) for x in items):
            return ("ARRAY", "FLOAT32")
        raise ValueError("array items must all be strings, all numbers or all booleans")
    raise ValueError(f"unsupported value of type {type(value).__name__}")


def _as_raw(data, ggml_type: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Tensor bytes for the writer: raw uint8 bytes are checked, float data are encoded."""
    n_el = 1
    for s in shape:
        n_el *= s
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, torch.Tensor):
        if data.dtype == torch.uint8:
            data = data.detach().cpu().contiguous().numpy()
        else:
            data = data.detach().to("cpu", torch.float32).numpy()
    data = np.asarray(data)
    if data.dtype == np.uint8:
        want = gguf_blocks.nbytes(ggml_type, n_el) if ggml_type in gguf_blocks.BLOCK_ELEMS else \
            n_el // ggml_type_info(ggml_type_id(ggml_type))[1] * ggml_type_info(ggml_type_id(ggml_type))[2]
        if data.size != want:
            raise ValueError(f"tensor '{name}': {data.size} bytes given, {ggml_type} of shape {shape} "
                             f"takes {want}")
        return np.ascontiguousarray(data).reshape(-1)
    if data.size != n_el:
        raise ValueError(f"tensor '{name}': {data.size} values given for shape {shape}")
    return gguf_blocks.quantize(np.asarray(data, dtype=np.float32).reshape(-1, shape[-1]), ggml_type)


def write_gguf(path, metadata: dict[str, Any],
               tensors: Iterable[tuple[str, Any, str, Sequence[int]]],
               metadata_types: dict[str, Any] | None = None) -> None:
    """Write a GGUF v3 file atomically (temporary file in the same folder, then ``os.replace``).

    ``tensors`` are ``(name, data, ggml_type, shape)`` with ``shape`` in PyTorch order; ``data``
    is either the raw bytes of the tensor (uint8 numpy array/tensor or ``bytes``) or float values
    (numpy/torch), which are encoded with :func:`gguf_blocks.quantize`. Metadata values are
    plain Python; their GGUF types are inferred (int -> UINT32/INT32/..., float -> FLOAT32,
    list of int -> INT32 array) unless ``metadata_types`` (as in ``GGUFFile.metadata_types``)
    names them. A failure leaves no file behind (and an existing ``path`` untouched).
    """
    import gguf
    from gguf.constants import GGMLQuantizationType, GGUFValueType

    path = Path(path)
    metadata_types = dict(metadata_types or {})
    arch = metadata.get("general.architecture")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    writer = None
    try:
        os.chmod(tmp, 0o644)
        writer = gguf.GGUFWriter(tmp, arch=str(arch) if arch is not None else "")
        writer.kv_data[0].pop("general.architecture", None)   # added again below, in order
        for key, value in metadata.items():
            vt = metadata_types.get(key) or _infer_type(value)
            if key == "general.alignment":
                writer.data_alignment = int(value)
            if isinstance(vt, (tuple, list)):
                sub = GGUFValueType[vt[1]]
                items = list(value)
                if sub in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
                    items = [float(x) for x in items]
                elif sub == GGUFValueType.BOOL:
                    items = [bool(x) for x in items]
                elif sub not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                    items = [int(x) for x in items]
                if not items:
                    raise ValueError(f"metadata '{key}' is an empty array, which GGUF cannot store")
                writer.add_key_value(key, items, GGUFValueType.ARRAY, sub_type=sub)
            else:
                t = GGUFValueType[vt]
                if t in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
                    value = float(value)
                elif t == GGUFValueType.BOOL:
                    value = bool(value)
                elif t != GGUFValueType.STRING:
                    value = int(value)
                writer.add_key_value(key, value, t)
        for name, data, ggml_type, shape in tensors:
            shape = tuple(int(s) for s in shape)
            type_id = ggml_type_id(ggml_type)
            if type_id is None:
                raise UnsupportedModelError(f"cannot write tensor '{name}' as {ggml_type!r}: unknown tensor type")
            qtype = GGMLQuantizationType(type_id)
            be, bb = ggml_type_info(type_id)[1:]
            if not shape or any(d <= 0 for d in shape) or shape[-1] % be:
                raise ValueError(f"tensor '{name}': shape {shape} is impossible for {ggml_type} "
                                 f"(positive dims, last one a multiple of {be})")
            raw = _as_raw(data, ggml_type, shape, name)
            byte_shape = (*shape[:-1], shape[-1] // be * bb)
            writer.add_tensor(name, raw.reshape(byte_shape), raw_shape=byte_shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
