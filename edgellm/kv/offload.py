"""Where KV goes when it leaves the pool: host memory, then disk, then nowhere (recompute).

An :class:`OffloadStore` keeps, per key (a session), what :meth:`KVCache.export_blocks` returned
-- treated as an opaque dict of tensors, so a quantised KV format with scales passes through
unchanged -- together with how many blocks' worth it is.

* **host**: entries in RAM up to ``host_bytes``; when a new entry does not fit, the least
  recently stored entries spill to disk until it does.
* **disk**: one file per entry in ``disk_dir`` (``torch.save``, written to a temporary name and
  renamed, so a crash never leaves a half-written file under the real name), up to
  ``disk_bytes`` when given.
* **dropped**: when the disk tier is absent, full (the budget, or the device: ENOSPC) or
  unwritable, the entry is dropped with a warning; its owner recomputes the KV from the tokens
  on its next turn. Nothing raises: a failing disk costs time, never a session.

Everything stored under a key is gone after :meth:`discard` (the file deleted) -- retiring a
session frees every tier.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("edgellm.offload")

HOST, DISK = "host", "disk"


class OffloadWarning(UserWarning):
    """The disk tier failed (full, unwritable, unreadable); KV is dropped and recomputed."""


def _nbytes(saved: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in saved.values())


@dataclass
class _Entry:
    tier: str
    n_blocks: int
    nbytes: int
    saved: dict[str, torch.Tensor] | None = None   # host tier
    path: Path | None = None                       # disk tier


class OffloadStore:
    def __init__(self, host_bytes: int = 0, disk_dir: str | os.PathLike | None = None,
                 disk_bytes: int | None = None, prefix: str | None = None):
        self.host_bytes = max(0, int(host_bytes))
        self.disk_bytes = disk_bytes
        self.disk_dir: Path | None = Path(disk_dir) if disk_dir is not None else None
        self.prefix = prefix or f"edgellm-kv-{os.getpid()}-{id(self):x}"
        self.entries: OrderedDict[str, _Entry] = OrderedDict()   # least recently stored first
        self.host_used = 0
        self.disk_used = 0
        self._disk_ready = False
        # counters
        self.stored = {HOST: 0, DISK: 0}
        self.restored = {HOST: 0, DISK: 0}
        self.dropped = 0
        self.failures = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.io_s = 0.0

    # ---- queries -----------------------------------------------------------------------------
    def tier(self, key: str) -> str | None:
        e = self.entries.get(key)
        return e.tier if e else None

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def blocks_in(self, tier: str) -> int:
        return sum(e.n_blocks for e in self.entries.values() if e.tier == tier)

    def files(self) -> list[Path]:
        """Files of this store on disk now (for tests and clean-up checks)."""
        if self.disk_dir is None or not self.disk_dir.is_dir():
            return []
        return sorted(p for p in self.disk_dir.iterdir() if p.name.startswith(self.prefix))

    def counters(self) -> dict:
        return {"host_entries": sum(e.tier == HOST for e in self.entries.values()),
                "disk_entries": sum(e.tier == DISK for e in self.entries.values()),
                "host_bytes": self.host_used, "disk_bytes": self.disk_used,
                "host_budget_bytes": self.host_bytes, "disk_dir": str(self.disk_dir) if self.disk_dir else None,
                "stored_host": self.stored[HOST], "stored_disk": self.stored[DISK],
                "restored_host": self.restored[HOST], "restored_disk": self.restored[DISK],
                "dropped": self.dropped, "disk_failures": self.failures,
                "bytes_written": self.bytes_written, "bytes_read": self.bytes_read, "io_s": self.io_s}

    # ---- storing -----------------------------------------------------------------------------
    def put(self, key: str, saved: dict[str, torch.Tensor], n_blocks: int) -> list[str]:
        """Store ``saved`` under ``key`` (replacing what was there). Returns the keys whose KV was
        dropped on the way (possibly ``key`` itself): their owners must recompute."""
        self.discard(key)
        nbytes = _nbytes(saved)
        dropped: list[str] = []
        if nbytes <= self.host_bytes:
            # Spill the oldest host entries to disk until this one fits.
            for old in [k for k, e in self.entries.items() if e.tier == HOST]:
                if self.host_used + nbytes <= self.host_bytes:
                    break
                if not self._spill(old):
                    dropped.append(old)
            self.entries[key] = _Entry(HOST, n_blocks, nbytes, saved=saved)
            self.host_used += nbytes
            self.stored[HOST] += 1
            return dropped
        if self._write(key, saved, n_blocks, nbytes):
            return dropped
        return dropped + [key]

    def _spill(self, key: str) -> bool:
        """Move a host entry to disk; on failure drop it. True when it is on disk."""
        e = self.entries[key]
        self.host_used -= e.nbytes
        del self.entries[key]
        return self._write(key, e.saved, e.n_blocks, e.nbytes)

    def _ensure_dir(self) -> bool:
        if self.disk_dir is None:
            return False
        if not self._disk_ready:
            self.disk_dir.mkdir(parents=True, exist_ok=True)   # OSError is handled by the caller
            self._disk_ready = True
        return True

    def _write(self, key: str, saved: dict, n_blocks: int, nbytes: int) -> bool:
        if self.disk_dir is None:
            self.dropped += 1
            log.info("no disk tier: KV of %s dropped (will be recomputed)", key)
            return False
        if self.disk_bytes is not None and self.disk_used + nbytes > self.disk_bytes:
            return self._fail(key, f"the disk tier is full ({self.disk_used + nbytes} > {self.disk_bytes} bytes)")
        t0 = time.perf_counter()
        tmp = None
        try:
            self._ensure_dir()
            path = self.disk_dir / f"{self.prefix}-{key}.pt"
            # Serialised in memory first: a short write then fails as the OSError the OS gave
            # (ENOSPC, EFBIG, EDQUOT...), where torch.save's own writer reports a bare position.
            buf = io.BytesIO()
            torch.save(saved, buf)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.prefix}-{key}-", suffix=".tmp", dir=self.disk_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        except (OSError, RuntimeError) as err:
            return self._fail(key, f"writing to {self.disk_dir} failed: {err}")
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            self.io_s += time.perf_counter() - t0
        self.entries[key] = _Entry(DISK, n_blocks, nbytes, path=path)
        self.disk_used += nbytes
        self.bytes_written += nbytes
        self.stored[DISK] += 1
        return True

    def _fail(self, key: str, why: str) -> bool:
        self.failures += 1
        self.dropped += 1
        warnings.warn(f"KV offload: {why}; the KV of {key} is dropped and will be recomputed on its next turn "
                      f"(fix: point disk_dir at a writable folder with free space, or raise host_memory)",
                      OffloadWarning, stacklevel=3)
        log.warning("KV offload: %s; dropped %s", why, key)
        return False

    # ---- restoring / discarding ----------------------------------------------------------------
    def take(self, key: str) -> dict[str, torch.Tensor] | None:
        """Remove and return the KV stored under ``key``; None when it is absent or unreadable
        (then the owner recomputes)."""
        e = self.entries.pop(key, None)
        if e is None:
            return None
        if e.tier == HOST:
            self.host_used -= e.nbytes
            self.restored[HOST] += 1
            return e.saved
        self.disk_used -= e.nbytes
        t0 = time.perf_counter()
        try:
            saved = torch.load(e.path, map_location="cpu", weights_only=True)
        except Exception as err:   # damaged or vanished file: recompute instead
            self.failures += 1
            warnings.warn(f"KV offload: reading {e.path} failed ({err}); the KV of {key} will be recomputed",
                          OffloadWarning, stacklevel=2)
            saved = None
        finally:
            self._unlink(e.path)
            self.io_s += time.perf_counter() - t0
        if saved is not None:
            self.bytes_read += e.nbytes
            self.restored[DISK] += 1
        return saved

    def discard(self, key: str) -> None:
        e = self.entries.pop(key, None)
        if e is None:
            return
        if e.tier == HOST:
            self.host_used -= e.nbytes
        else:
            self.disk_used -= e.nbytes
            self._unlink(e.path)

    def clear(self) -> None:
        for key in list(self.entries):
            self.discard(key)

    @staticmethod
    def _unlink(path: Path | None) -> None:
        if path is None:
            return
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("could not delete %s: %s", path, err)
