"""A model split across ranks: each rank's part, the step protocol, and rank 0's runner.

Rank 0 owns the tokenizer, the sampler, the scheduler and any HTTP server: everything of the
engine. Its :class:`ParallelRunner` has :class:`~edgellm.runtime.model_runner.ModelRunner`'s
``run(chunks) -> logits``, so the engine's one generation path is unchanged; behind it, each
step is broadcast to the ranks (token ids, positions, slots: the ``SeqChunk`` list) and every
rank runs its :class:`Part`. The other ranks run :func:`serve_rank` and only compute.

Pipeline parallel (``pipeline > 1``): rank r holds blocks ``pipeline_stages(...)[r]`` and their
KV layers; rank 0 also the embedding and head. A step's sequences are cut into up to ``pipeline``
micro-batches: rank 0 embeds and runs micro-batch 1, sends its hidden states on
(``isend``) and starts micro-batch 2 while rank 1 runs micro-batch 1, and so on; the last rank
sends the rows whose logits are wanted back to rank 0, which applies the head. A single
sequence is one micro-batch: its stages run one after the other (no overlap, only a split).

Tensor parallel (``tensor > 1``): every rank holds its share of every block (heads with their KV
heads, MLP columns; ``edgellm.runtime.sharding``) and of the KV pool; rank 0 broadcasts the
embedded tokens, each block half ends in an all-reduce, and rank 0 applies the head.

Commands, broadcast by rank 0 as pickled tuples: ``("cache", blocks, block_size, kv_dtype)`` (a
new pool, as each engine makes one), ``("step", micro_batches)``, ``("copy", src, dst)`` (the block
manager's copy-on-write), ``("ping",)`` (sent when idle for ``timeout / 4``, so a waiting rank
learns within the timeout that rank 0 is gone), ``("stop",)``.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch

from edgellm import heap
from edgellm.errors import EdgeLLMError, InvalidParameterError
from edgellm.kv.cache import KVCache
from edgellm.layers.attention import AttentionBatch
from edgellm.loading.load import LoadedModel, load_model
from edgellm.models.llama import LlamaModel
from edgellm.quant.base import Weight
from edgellm.runtime.distributed import (
    STARTUP_TIMEOUT_S,
    Group,
    ParallelConfig,
    RankError,
    exit_with_rank0,
    join_group,
    start_group,
)
from edgellm.runtime.model_runner import ModelRunner, SeqChunk, step_inputs
from edgellm.runtime.sharding import (
    pipeline_stages,
    shard_config,
    shard_weights,
    stage_config,
    tensor_shares,
)

log = logging.getLogger("edgellm.parallel")


class ShardModel(LlamaModel):
    """One rank's part of a Llama-family model: some blocks (pipeline) or a share of every block
    (tensor parallel, ``tp_group`` set: the output projections' partial sums are all-reduced)."""

    def __init__(self, cfg, weights, tp_group: Group | None = None):
        super().__init__(cfg, weights)
        self.tp_group = tp_group

    def project_add(self, w: Weight, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return super().project_add(w, x, residual)
        return residual + self.tp_group.all_reduce(w.matmul(x))

    def fused_decode_supported(self, batch: AttentionBatch, cache: KVCache) -> bool:
        # the fused native step runs every block in one call: no all-reduce can go between halves
        return self.tp_group is None and super().fused_decode_supported(batch, cache)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        raise InvalidParameterError("embeddings are not available while the model is split across ranks",
                                    "serve embeddings from a process without --pipeline-parallel/--tensor-parallel")


@dataclass(frozen=True)
class Job:
    """What rank 0 tells every rank once: which model, how split."""

    model: str          # a path every rank can read (resolved by rank 0)
    dtype: str
    use_native: bool
    pipeline: int
    tensor: int
    threads: int        # torch threads of each rank


def check_split(cfg, config: ParallelConfig) -> None:
    """Refuse, before any rank starts, a split this model cannot take."""
    if cfg.architecture not in ("llama", "qwen2", "mistral"):
        raise InvalidParameterError(f"{cfg.architecture} models cannot be split across ranks yet",
                                    "run this model in one process")
    if config.pipeline > 1:
        for blocks in pipeline_stages(cfg.n_layers, config.pipeline):
            stage_config(cfg, blocks)
    if config.tensor > 1:
        tensor_shares(cfg, config.tensor)


def load_part(job: Job, group: Group) -> LoadedModel:
    """This rank's part of the model: only its blocks are read (pipeline), or all blocks then cut
    to its share (tensor parallel: a rank reads whole matrices, keeps 1/tp of each). Rank 0 also
    loads the embedding, final norm and head."""
    rank = group.rank
    if job.pipeline > 1:
        from edgellm.loading.convert import peek_config

        blocks = pipeline_stages(peek_config(job.model)[1].n_layers, job.pipeline)[rank]
        loaded = load_model(job.model, job.dtype, job.use_native, layers=blocks, ends=rank == 0)
        loaded.model = ShardModel(stage_config(loaded.config, blocks), loaded.model.weights)
    else:
        loaded = load_model(job.model, job.dtype, job.use_native, ends=rank == 0)
        cfg = loaded.config
        share = tensor_shares(cfg, job.tensor)[rank]
        weights = shard_weights(cfg, loaded.model.weights, share)
        loaded.model = ShardModel(shard_config(cfg, share), weights, group)
    heap.release_free_heap()       # the rest of the file's matrices are gone
    return loaded


def micro_batches(chunks: list[SeqChunk], n: int) -> list[list[SeqChunk]]:
    """Up to ``n`` consecutive groups of chunks (sequences), as even in count as they go."""
    n = max(1, min(n, len(chunks)))
    base, extra = divmod(len(chunks), n)
    groups, start = [], 0
    for i in range(n):
        size = base + (i < extra)
        groups.append(chunks[start:start + size])
        start += size
    return groups


class Part:
    """This rank's model part, its KV pool, and how it runs a step."""

    def __init__(self, group: Group, job: Job, model: ShardModel):
        self.group = group
        self.job = job
        self.model = model
        self.runner: ModelRunner | None = None

    def set_cache(self, num_blocks: int, block_size: int, kv_dtype) -> KVCache:
        self.runner = None          # the old pool goes before the new one is allocated
        self.runner = ModelRunner(self.model, KVCache(self.model.cfg, num_blocks, block_size, kv_dtype))
        return self.runner.cache

    def step(self, groups: list[list[SeqChunk]]) -> torch.Tensor | None:
        """Run this rank's part of one step; rank 0 gets the logits, the others None."""
        if self.runner is None:
            raise RankError("a step arrived before the KV pool was set up")
        if self.job.pipeline > 1:
            return self._pipeline_step(groups)
        return self._tensor_step([c for g in groups for c in g])

    def _tensor_step(self, chunks: list[SeqChunk]) -> torch.Tensor | None:
        model, rank = self.model, self.group.rank
        tokens, positions, batch, logit_rows = step_inputs(chunks)
        h = model.embed(tokens) if rank == 0 else torch.empty(tokens.shape[0], model.cfg.hidden_size)
        self.group.broadcast(h, 0)
        h = self.runner.run_blocks(h, model.rope_tables(positions), batch)
        return model.logits(h, logit_rows) if rank == 0 else None

    def _pipeline_step(self, groups: list[list[SeqChunk]]) -> torch.Tensor | None:
        model, group = self.model, self.group
        rank, last, hidden = group.rank, group.world - 1, model.cfg.hidden_size
        sending, wanted = [], []        # (work, tensor): a buffer must live until its send is done
        for chunks in groups:
            tokens, positions, batch, logit_rows = step_inputs(chunks)
            wanted.append(logit_rows.shape[0])
            if rank == 0:
                h = model.embed(tokens)
            else:
                h = group.recv(torch.empty(tokens.shape[0], hidden), rank - 1)
            h = self.runner.run_blocks(h, model.rope_tables(positions), batch)
            if rank < last:
                out = h
            elif wanted[-1]:            # the last stage returns only the rows to sample from
                out = h.index_select(0, logit_rows).contiguous()
            else:
                continue
            sending.append((group.isend(out, rank + 1 if rank < last else 0), out))
        outs = [group.recv(torch.empty(n, hidden), last) for n in wanted if n] if rank == 0 else []
        for work, _ in sending:
            group.wait(work, f"sending to rank {rank + 1 if rank < last else 0}")
        if rank != 0:
            return None
        h = torch.cat(outs) if outs else torch.empty(0, hidden)
        return model.logits(h, torch.arange(h.shape[0]))


class SplitModel:
    """Rank 0's handle on the ranks of a split model: starts (or joins) them, loads its own part,
    sends them commands, keeps them alive while idle and notices when one dies."""

    def __init__(self, config: ParallelConfig, model: str | None = None, dtype: str = "auto",
                 use_native: bool = True):
        from edgellm.loading.convert import peek_config

        src, cfg = peek_config(model)
        check_split(cfg, config)
        self.config = config
        self.group = start_group(config)
        self.failure: RankError | None = None
        job = Job(str(src.path), dtype, use_native, config.pipeline, config.tensor, config.threads or 1)
        torch.set_num_threads(job.threads)
        try:
            self.group.broadcast_object(job)
            self.loaded, problem = None, None
            try:
                self.loaded = load_part(job, self.group)
            except EdgeLLMError as err:
                problem = str(err)
            problems = self.group.gather_objects(problem)
        except BaseException:
            self.group.close()
            raise
        bad = [(r, p) for r, p in enumerate(problems) if p]
        if bad:             # every rank saw the problems: the others exit on their own
            self.group.close()
            raise RankError("; ".join(f"rank {r} could not load its part: {p}" for r, p in bad))
        self.part = Part(self.group, job, self.loaded.model)
        self._last_command = time.monotonic()
        self._closed = False
        self.group.watch_children(self._failed)
        self._keepalive = threading.Thread(target=self._ping_while_idle, name="edgellm-rank-ping", daemon=True)
        self._keepalive.start()
        atexit.register(self.close)

    @property
    def healthy(self) -> bool:
        return self.group.broken is None

    def command(self, cmd: tuple) -> None:
        """Send ``cmd`` to every rank (the caller holds ``group.lock`` when a step follows)."""
        with self.group.lock:
            try:
                self.group.broadcast_object(cmd)
            except RankError as err:
                self._failed(err)
                raise
            self._last_command = time.monotonic()

    def runner(self, num_blocks: int, block_size: int, kv_dtype) -> "ParallelRunner":
        return ParallelRunner(self, num_blocks, block_size, kv_dtype)

    def _failed(self, err: RankError) -> None:
        if self.failure is None:
            self.failure = err
            log.error("the split model stopped: %s", err)
            print(f"edgellm: the split model stopped: {err}", file=sys.stderr, flush=True)

    def _ping_while_idle(self) -> None:
        every = self.config.timeout_s / 4
        while not self._closed and self.group.broken is None:
            time.sleep(min(every, 1.0))
            if time.monotonic() - self._last_command >= every:
                try:
                    self.command(("ping",))
                except RankError:
                    return

    def close(self) -> None:
        """Stop every rank (they exit) and leave the group."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self.group.broken is None:
            try:
                self.command(("stop",))
            except RankError:
                pass
        self.group.close()


class ParallelRunner:
    """ModelRunner's interface over a split model: ``run(chunks)`` broadcasts the step and runs
    rank 0's part; the logits come back to rank 0. ``healthy`` goes False when a rank dies (the
    engine then reports itself not running: the server answers 503)."""

    def __init__(self, split: SplitModel, num_blocks: int, block_size: int, kv_dtype):
        self.split = split
        with split.group.lock:
            split.command(("cache", num_blocks, block_size, kv_dtype))
            local = split.part.set_cache(num_blocks, block_size, kv_dtype)
        self.cache = ShardedKVCache(split, local)
        self.model = split.part.model
        self.trace = None             # per-op tracing is not wired through the ranks

    @property
    def healthy(self) -> bool:
        return self.split.healthy

    @property
    def thread_chooser(self):
        return self.split.part.runner.thread_chooser

    def run(self, chunks: list[SeqChunk], layers: list[int] | None = None) -> torch.Tensor:
        if layers is not None:
            raise InvalidParameterError("a draft over some blocks (speculative early-exit) cannot run on a split model",
                                        "run without --speculative, or in one process")
        groups = micro_batches(chunks, self.split.config.pipeline)
        with self.split.group.lock:
            self.split.command(("step", groups))
            try:
                return self.split.part.step(groups)
            except RankError as err:
                self.split._failed(err)
                raise


class ShardedKVCache:
    """The engine's view of a pool spread over the ranks: rank 0's local part answers for its
    geometry (blocks, slots); block copies go to every rank. Moving KV out of the pool (host or
    disk offload, swap) is not supported: a split engine drops and recomputes instead."""

    def __init__(self, split: SplitModel, local: KVCache):
        self.split = split
        self.local = local
        self.num_blocks = local.num_blocks
        self.block_size = local.block_size
        self.kv_dtype = local.kv_dtype
        self.dtype = local.dtype
        self.cfg = local.cfg

    @property
    def nbytes(self) -> int:
        """Bytes of the pool on all ranks together: the whole model's KV for these blocks."""
        return KVCache.bytes_per_block(self.split.loaded.config, self.block_size, self.kv_dtype) * self.num_blocks

    def block_slots(self, block_table: list[int], length: int):
        return self.local.block_slots(block_table, length)

    def copy_block(self, src: int, dst: int) -> None:
        with self.split.group.lock:
            self.split.command(("copy", src, dst))
            self.local.copy_block(src, dst)

    def export_blocks(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        # Only reached with a zero host budget (the engine forces it), where the copy is dropped
        return self.local.export_blocks(blocks)

    def import_blocks(self, blocks: list[int], saved: dict[str, torch.Tensor]) -> None:
        raise InvalidParameterError("KV moved out of a split model's pool cannot be brought back",
                                    "run a split model without --host-memory/--offload-dir/--preemption swap")


def serve_rank(timeout_s: float | None = None) -> int:
    """A computing rank (1 .. N-1): join the group, load this rank's part, run steps until told to
    stop. Returns the exit status: 1 when a rank died or rank 0 went away."""
    exit_with_rank0(int(os.environ.get("RANK", "0")))
    group = join_group(timeout_s)
    prefix = f"edgellm rank {group.rank}"
    try:
        job: Job = group.broadcast_object(timeout_s=STARTUP_TIMEOUT_S)
        torch.set_num_threads(job.threads)
        loaded, problem = None, None
        try:
            loaded = load_part(job, group)
        except EdgeLLMError as err:
            problem = str(err)
        if any(group.gather_objects(problem)):
            return 1
        part = Part(group, job, loaded.model)
        while True:
            cmd = group.broadcast_object()
            kind = cmd[0]
            if kind == "step":
                part.step(cmd[1])
            elif kind == "cache":
                part.set_cache(*cmd[1:])
            elif kind == "copy":
                part.runner.cache.copy_block(*cmd[1:])
            elif kind == "stop":
                return 0
    except RankError as err:
        print(f"{prefix}: stopping: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        group.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(serve_rank())
