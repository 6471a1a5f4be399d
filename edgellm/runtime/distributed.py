"""The ranks of a split model: process-group set-up and collectives with timeouts (torch.distributed).

Two ways to start, one protocol:

* **Local** (``--pipeline-parallel N`` or ``--tensor-parallel N`` on one machine): the command's
  own process is rank 0 and starts ranks 1 .. N-1 as child processes (``python -m
  edgellm.runtime.parallel_runner``) that meet it on a free loopback port.
* **torchrun** (several machines): every process runs the same command; ``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by torchrun) say who is who. Rank 0
  runs the command; the others only compute (:func:`launched_by_torchrun`).

The backend is gloo: edgellm computes on CPUs, and NCCL moves only GPU tensors.

Failure. Every collective waits at most ``timeout_s`` (``--dist-timeout``; start-up and loading
get :data:`STARTUP_TIMEOUT_S`); a peer that exits closes its sockets, which gloo reports at once. Either way the call
raises :class:`RankError` and the group is marked broken: later calls fail at once with the first
error. Rank 0 also watches the children it started (an exit is noticed within
:data:`WATCH_INTERVAL_S`), and pings idle ranks every ``timeout_s / 4`` so that a rank waiting for
work learns within ``timeout_s`` that rank 0 is gone (``edgellm.runtime.parallel_runner``).
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from edgellm.errors import EdgeLLMError, InvalidParameterError

#: seconds a collective may wait for a peer before the ranks give up (``--dist-timeout``)
DEFAULT_TIMEOUT_S = 20.0
#: seconds the ranks may take to start and load their parts (the process group's own timeout;
#: every collective after that waits at most the shorter ``timeout_s``)
STARTUP_TIMEOUT_S = 600.0
#: how often rank 0 checks that the ranks it started are alive
WATCH_INTERVAL_S = 0.5
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankError(EdgeLLMError):
    """A rank of a split model died, failed or stopped answering; the split model cannot go on."""


@dataclass(frozen=True)
class ParallelConfig:
    pipeline: int = 1            # pipeline stages (contiguous runs of blocks)
    tensor: int = 1              # tensor-parallel ranks (heads and MLP columns)
    timeout_s: float = DEFAULT_TIMEOUT_S
    threads: int | None = None   # torch threads of each rank (default 1 when started locally)

    def __post_init__(self) -> None:
        for flag, n in (("--pipeline-parallel", self.pipeline), ("--tensor-parallel", self.tensor)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise InvalidParameterError(f"{flag} must be a positive integer, got {n!r}", f"pass e.g. {flag} 2")
        if self.pipeline > 1 and self.tensor > 1:
            raise InvalidParameterError("--pipeline-parallel and --tensor-parallel cannot be combined yet",
                                        "split the model one way: pipeline stages or tensor-parallel shards")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise InvalidParameterError(f"--dist-timeout must be a positive number of seconds, got {self.timeout_s!r}",
                                        f"pass e.g. --dist-timeout {DEFAULT_TIMEOUT_S:g}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InvalidParameterError(f"threads per rank must be a positive integer, got {self.threads!r}",
                                        "pass e.g. --threads 1")

    @property
    def world(self) -> int:
        return self.pipeline * self.tensor

    @property
    def mode(self) -> str:
        return "tensor" if self.tensor > 1 else "pipeline"


def launched_by_torchrun() -> bool:
    """Whether torchrun (or anything setting its variables) started this process."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def torchrun_rank() -> int:
    return int(os.environ["RANK"])


class Group:
    """This process's place among the ranks, and the collectives it uses, each bounded by the
    timeout. Thread-safe: one collective at a time (``lock``)."""

    def __init__(self, rank: int, world: int, timeout_s: float, children: list[subprocess.Popen] | None = None):
        self.rank = rank
        self.world = world
        self.timeout_s = timeout_s
        self.timeout = timedelta(seconds=timeout_s)
        self.children = children or []
        self.lock = threading.RLock()
        self.broken: RankError | None = None
        self._watch: threading.Thread | None = None

    # ---- collectives ------------------------------------------------------------------------------
    def _guard(self, what: str, call):
        if self.broken is not None:
            raise self.broken
        try:
            return call()
        except RankError:
            raise
        except Exception as err:       # gloo: a closed connection or a timeout, as RuntimeError
            self.fail(self._dead_child() or RankError(
                f"rank {self.rank}: {what} failed: {_first_line(err)}",
                "a rank of the split model died or stopped answering; see its own messages, then restart the command"))
            raise self.broken from None

    def _dead_child(self, wait_s: float = 1.0) -> RankError | None:
        """Rank 0: the error naming a rank it started that has exited (waiting up to ``wait_s`` for
        the exit to show: a killed peer's socket can close first)."""
        deadline = time.monotonic() + wait_s
        while self.children:
            for r, child in enumerate(self.children, start=1):
                code = child.poll()
                if code is not None:
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    return RankError(f"rank {r} (pid {child.pid}) {how}",
                                     "see that rank's messages above; restart the command")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        return None

    def _wait(self, work, timeout_s: float | None) -> None:
        work.wait(timedelta(seconds=self.timeout_s if timeout_s is None else timeout_s))

    def isend(self, t: torch.Tensor, dst: int):
        return self._guard(f"sending to rank {dst}", lambda: dist.isend(t, dst))

    def wait(self, work, what: str) -> None:
        self._guard(what, lambda: self._wait(work, None))

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._guard(f"receiving from rank {src}", lambda: self._wait(dist.irecv(t, src), None))
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0, timeout_s: float | None = None) -> torch.Tensor:
        self._guard("a broadcast", lambda: self._wait(dist.broadcast(t, src, async_op=True), timeout_s))
        return t

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._guard("an all-reduce", lambda: self._wait(dist.all_reduce(t, async_op=True), None))
        return t

    def broadcast_object(self, obj=None, src: int = 0, timeout_s: float | None = None):
        """``obj`` from rank ``src`` (pickled), returned on every rank; each of the two transfers
        (length, bytes) waits at most ``timeout_s`` (default: the group's timeout)."""
        if self.rank == src:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self.broadcast(size, src, timeout_s)
        if self.rank != src:
            data = torch.empty(int(size), dtype=torch.uint8)
        self.broadcast(data, src, timeout_s)
        return obj if self.rank == src else pickle.loads(data.numpy().tobytes())

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, on every rank (waits up to the start-up timeout: ranks loading)."""
        out = [None] * self.world
        self._guard("an all-gather", lambda: dist.all_gather_object(out, obj))
        return out

    # ---- failure and shutdown ----------------------------------------------------------------------
    def fail(self, err: RankError) -> None:
        if self.broken is None:
            self.broken = err

    def watch_children(self, on_failure) -> None:
        """Rank 0: poll the ranks it started; the first that exits breaks the group and calls
        ``on_failure(err)``."""
        if not self.children or self._watch is not None:
            return

        def watch() -> None:
            while self.broken is None:
                dead = self._dead_child(wait_s=0)
                if dead is not None:
                    self.fail(dead)
                    on_failure(self.broken)
                    return
                time.sleep(WATCH_INTERVAL_S)

        self._watch = threading.Thread(target=watch, name="edgellm-rank-watch", daemon=True)
        self._watch.start()

    def close(self) -> None:
        """Leave the group; rank 0 waits a moment for the ranks it started, then ends them."""
        self.fail(RankError("the split model was closed"))
        for child in self.children:
            try:
                child.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def _first_line(err: BaseException) -> str:
    """The gist of a gloo error: its first sentence, without the source path in brackets."""
    text = re.sub(r"^\[[^\]]*\.cc:\d+\]\s*", "", str(err).strip())
    return text.split(". ")[0].splitlines()[0] if text else type(err).__name__


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(config: ParallelConfig) -> Group:
    """Rank 0's group: under torchrun, join the others; else start ranks 1 .. N-1 here."""
    timeout = timedelta(seconds=max(STARTUP_TIMEOUT_S, config.timeout_s))
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != config.world:
            raise InvalidParameterError(
                f"torchrun started {world} processes but the command asks for {config.world} ranks",
                f"pass --nproc-per-node x --nnodes = {config.world} to torchrun")
        dist.init_process_group("gloo", init_method="env://", rank=torchrun_rank(), world_size=world, timeout=timeout)
        return Group(torchrun_rank(), world, config.timeout_s)
    port = _free_port()
    children = []
    for r in range(1, config.world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(config.world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "LOCAL_RANK": str(r), "EDGELLM_DIST_TIMEOUT": str(config.timeout_s),
               "EDGELLM_RANK0_PID": str(os.getpid())}
        children.append(subprocess.Popen([sys.executable, "-m", "edgellm.runtime.parallel_runner"], env=env))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=config.world,
                                timeout=timeout)
    except Exception as err:
        for c in children:
            c.kill()
        raise RankError(f"the {config.world} local ranks did not meet within {timeout.total_seconds():g} s: "
                        f"{_first_line(err)}", "see the ranks' messages above") from None
    return Group(0, config.world, config.timeout_s, children)


def join_group(timeout_s: float | None = None) -> Group:
    """A computing rank's group, from the variables its starter set (the local rank 0 or torchrun);
    ``timeout_s``: default $EDGELLM_DIST_TIMEOUT (set by a local rank 0), else the default."""
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise InvalidParameterError(f"a computing rank needs {', '.join(missing)} in its environment",
                                    "start it with torchrun, or let `edgellm ... --pipeline-parallel N` start it")
    rank, world = torchrun_rank(), int(os.environ["WORLD_SIZE"])
    if timeout_s is None:
        timeout_s = float(os.environ.get("EDGELLM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=max(STARTUP_TIMEOUT_S, timeout_s)))
    return Group(rank, world, timeout_s)


def exit_with_rank0(rank: int) -> None:
    """A rank started locally: exit as soon as the rank 0 that started it is gone (also while
    starting or loading, when no collective would notice for :data:`STARTUP_TIMEOUT_S`)."""
    parent = os.environ.get("EDGELLM_RANK0_PID")
    if parent is None:          # started by torchrun: the collectives' timeouts are the watch
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(WATCH_INTERVAL_S)
        print(f"edgellm rank {rank}: stopping: rank 0 (pid {parent}) is gone", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="edgellm-rank0-watch", daemon=True).start()
