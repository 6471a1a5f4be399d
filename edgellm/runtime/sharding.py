"""Which part of a model each rank holds: pipeline stages (contiguous blocks) and tensor-parallel
shards (heads and MLP columns), cut from loaded weights without leaving their storage format.

Pipeline parallel: ``pp`` ranks each hold a contiguous run of blocks (:func:`pipeline_stages`).
Rank 0 also holds the embedding, the final norm and the head, because it samples: what crosses
the last link back to it is one hidden vector per sequence, not a row of logits (49k floats
for SmolLM2), and a tied head stays one matrix.

Tensor parallel (Megatron-LM's split): rank ``r`` of ``tp`` keeps query heads
``r*H/tp .. (r+1)*H/tp - 1`` with their KV heads, and MLP columns ``r*F/tp ..``: q/k/v and
gate/up are split by output rows (column-parallel), o and down by input columns (row-parallel),
so each block half ends in one all-reduce of the hidden-size output. A GGUF block matrix keeps
its raw blocks: a row split takes whole rows, a column split whole blocks of each row (32 weights,
or 256 for the repacked K-quants), so a Q4_1 model stays Q4_1 on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from edgellm.config import ModelConfig
from edgellm.errors import InvalidParameterError
from edgellm.models.llama import BlockWeights, ModelWeights
from edgellm.quant import gguf_blocks, repack
from edgellm.quant.base import Weight
from edgellm.quant.dense import DenseWeight
from edgellm.quant.gguf_weights import GGUFBlockWeight, GGUFSlabWeight

_RAW_BLOCK_BYTES = {**gguf_blocks.BLOCK_BYTES, **repack.BLOCK_BYTES}


# ---- pipeline stages ------------------------------------------------------------------------------
def pipeline_stages(n_layers: int, pp: int) -> list[range]:
    """``pp`` contiguous runs of blocks, as even as they go; the longer runs are the last ones
    (rank 0 also runs the embedding and the head)."""
    if pp > n_layers:
        raise InvalidParameterError(f"--pipeline-parallel {pp} needs at least {pp} blocks; this model has {n_layers}",
                                    f"use --pipeline-parallel {n_layers} or fewer")
    base, extra = divmod(n_layers, pp)
    sizes = [base + (r >= pp - extra) for r in range(pp)]
    starts = [sum(sizes[:r]) for r in range(pp)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def stage_config(cfg: ModelConfig, blocks: range) -> ModelConfig:
    """The config of a rank holding ``blocks``: its KV cache has their layers only."""
    if cfg.sliding_layers is not None:    # per-layer windows would need renumbering (Gemma 3)
        raise InvalidParameterError(f"{cfg.architecture} models (with per-layer attention windows) cannot be split "
                                    "across ranks yet", "run this model in one process")
    return replace(cfg, n_layers=len(blocks))


# ---- tensor parallel -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorShare:
    """What one tensor-parallel rank holds of every block: KV heads ``kv_heads`` with their query
    heads, and MLP columns ``ffn``."""

    kv_heads: range
    ffn: range


def tensor_shares(cfg: ModelConfig, tp: int) -> list[TensorShare]:
    """Each rank's share: KV heads (with their query heads) and MLP columns as even as whole heads
    and whole quantisation blocks allow. 9 heads over 2 ranks (SmolLM2: 3 KV heads of 3) go 6 + 3,
    the ranks with more heads first. Refused when there are fewer KV heads than ranks."""
    if tp > cfg.n_kv_heads:
        raise InvalidParameterError(
            f"--tensor-parallel {tp} needs at least {tp} KV heads to give each rank one; this model has "
            f"{cfg.n_kv_heads}", f"use --tensor-parallel {cfg.n_kv_heads} or fewer, or --pipeline-parallel")
    unit = next(u for u in _FFN_UNITS if cfg.ffn_size % u == 0)
    if cfg.ffn_size // unit < tp:
        raise InvalidParameterError(f"the MLP width {cfg.ffn_size} cannot be cut into {tp} shares of whole "
                                    f"{unit}-column blocks", "use a smaller --tensor-parallel, or --pipeline-parallel")
    return [TensorShare(_even_part(cfg.n_kv_heads, tp, r), _scaled(_even_part(cfg.ffn_size // unit, tp, r), unit))
            for r in range(tp)]


def shard_config(cfg: ModelConfig, share: TensorShare) -> ModelConfig:
    """The config one tensor-parallel rank computes with: its heads and MLP width."""
    group = cfg.n_heads // cfg.n_kv_heads
    n_kv = len(share.kv_heads)
    return replace(cfg, n_heads=n_kv * group, n_kv_heads=n_kv, ffn_size=len(share.ffn))


def shard_block(cfg: ModelConfig, b: BlockWeights, share: TensorShare) -> BlockWeights:
    """One rank's share of one block (``cfg``: the whole model's config)."""
    D, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    kv = share.kv_heads
    q_cols = range(kv.start * group * D, kv.stop * group * D)     # its query heads, as o's inputs
    kv_rows = torch.arange(kv.start * D, kv.stop * D)
    qkv_rows = torch.cat([torch.arange(q_cols.start, q_cols.stop), cfg.q_size + kv_rows,
                          cfg.q_size + cfg.kv_size + kv_rows])
    ffn_rows = torch.arange(share.ffn.start, share.ffn.stop)
    return BlockWeights(
        attn_norm=b.attn_norm, ffn_norm=b.ffn_norm,
        qkv=take_rows(b.qkv, qkv_rows, "attention q/k/v"),
        qkv_bias=None if b.qkv_bias is None else b.qkv_bias.index_select(0, qkv_rows).contiguous(),
        o=take_columns(b.o, q_cols.start, q_cols.stop, "attention output"),
        gate_up=take_rows(b.gate_up, torch.cat([ffn_rows, cfg.ffn_size + ffn_rows]), "MLP gate/up"),
        down=take_columns(b.down, share.ffn.start, share.ffn.stop, "MLP down"))


def shard_weights(cfg: ModelConfig, weights: ModelWeights, share: TensorShare) -> ModelWeights:
    """One rank's share of every block; the embedding, final norm and head are kept as they are
    (rank 0 uses them, the others hold None there)."""
    return ModelWeights(embed=weights.embed, blocks=[shard_block(cfg, b, share) for b in weights.blocks],
                        final_norm=weights.final_norm, lm_head=weights.lm_head)


#: MLP columns go to ranks in multiples of the first of these that divides the width (K-quant
#: blocks hold 256 weights, the others 32), so that the down projection's split falls on blocks
_FFN_UNITS = (256, 32, 1)


def _even_part(n: int, parts: int, r: int) -> range:
    """Part ``r`` of 0..n-1 cut into ``parts`` consecutive runs, the longer ones first."""
    base, extra = divmod(n, parts)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def _scaled(r: range, unit: int) -> range:
    return range(r.start * unit, r.stop * unit)


def take_rows(w: Weight, rows: torch.Tensor, what: str) -> Weight:
    """Output rows ``rows`` of ``w`` in its own format."""
    if isinstance(w, (GGUFBlockWeight, GGUFSlabWeight)):
        return type(w)(w.raw.index_select(0, rows), w.ggml_type, w.shape[1])
    if isinstance(w, DenseWeight):
        return DenseWeight(w.tensor.index_select(0, rows))
    raise _unsplittable(w, what)


def take_columns(w: Weight, c0: int, c1: int, what: str) -> Weight:
    """Input columns ``c0 .. c1 - 1`` of ``w`` in its own format: for block formats, whole blocks
    of every row, so ``c0`` and ``c1`` must fall on block boundaries."""
    if isinstance(w, DenseWeight):
        return DenseWeight(w.tensor[:, c0:c1])
    if not isinstance(w, (GGUFBlockWeight, GGUFSlabWeight)):
        raise _unsplittable(w, what)
    n_cols, row_bytes = w.shape[1], w.raw.shape[1]
    block_bytes = _RAW_BLOCK_BYTES[w.ggml_type]
    per_block = n_cols * block_bytes // row_bytes       # weights per block (32, or 256 for K-quants)
    if c0 % per_block or c1 % per_block:
        raise InvalidParameterError(
            f"the {what} matrix is stored in {w.ggml_type} blocks of {per_block} weights, and a tensor-parallel "
            f"rank's share (columns {c0}..{c1 - 1}) does not fall on block boundaries",
            "use a smaller --tensor-parallel, or --pipeline-parallel")
    b0, b1 = c0 // per_block * block_bytes, c1 // per_block * block_bytes
    return type(w)(w.raw[:, b0:b1].contiguous(), w.ggml_type, c1 - c0)


def _unsplittable(w: Weight, what: str) -> InvalidParameterError:
    return InvalidParameterError(
        f"tensor parallel splits GGUF block matrices and dense ones; the {what} matrix is {w.format} "
        f"({type(w).__name__})", "load the model as stored (without --weights), or use --pipeline-parallel")
