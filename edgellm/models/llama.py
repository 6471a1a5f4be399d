"""The Llama-family decoder: Llama 2/3, SmolLM2, Mistral (sliding window) and Qwen2 (q/k/v biases).

One forward pass serves prefill and decode alike: tokens of every sequence in the step are laid
end to end ([T]), each with its position, and attention reads and writes the KV cache through
the step's ``AttentionBatch``. A decode-only step can instead run every block in one native call
(:meth:`LlamaModel.decode_blocks_fused`); the runner chooses. Only the rows whose next token is wanted go through the final
norm and the vocabulary projection (a 49k x 576 matrix is the largest single read per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgellm.config import ModelConfig
from edgellm.kernels import native
from edgellm.kv.cache import KVCache
from edgellm.layers.attention import AttentionBatch, attend, write_kv
from edgellm.layers.rope import RotaryEmbedding
from edgellm.models.trace import Trace
from edgellm.quant.base import Weight
from edgellm.quant.bf16 import decode_in_bf16


@dataclass
class BlockWeights:
    attn_norm: torch.Tensor
    qkv: Weight                     # q, k and v stacked: [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None
    o: Weight
    ffn_norm: torch.Tensor
    gate_up: Weight                 # gate and up stacked: [2 * ffn, hidden]
    down: Weight

    def matrices(self) -> list[Weight]:
        """Every matrix of the block (a mixture-of-experts block has more: edgellm.models.moe)."""
        return [self.qkv, self.o, self.gate_up, self.down]

    @property
    def nbytes(self) -> int:
        vectors = self.attn_norm.numel() + self.ffn_norm.numel()
        return sum(m.nbytes for m in self.matrices()) + vectors * 4


@dataclass
class ModelWeights:
    embed: Weight                   # [vocab, hidden]
    blocks: list[BlockWeights]
    final_norm: torch.Tensor
    lm_head: Weight                 # the embedding itself when tied

    @property
    def nbytes(self) -> int:
        # a rank of a split model (edgellm.runtime.sharding) may hold no embedding or head
        total = (self.embed.nbytes if self.embed is not None else 0) + \
            (self.final_norm.numel() * 4 if self.final_norm is not None else 0)
        if self.lm_head is not self.embed and self.lm_head is not None:
            total += self.lm_head.nbytes
        return total + sum(b.nbytes for b in self.blocks)


class LlamaModel:
    """The forward pass as public parts, which a runner composes: :meth:`embed`, then either
    :meth:`forward_layers` (any step) or :meth:`decode_blocks_fused` (a decode-only step, see
    :meth:`fused_decode_supported`), then :meth:`logits`. Which of the two, and on how many threads,
    is the runner's choice (``edgellm.runtime.model_runner``). Each part takes an optional
    :class:`~edgellm.models.trace.Trace` and marks its ops in it."""

    activations = "fp32"   # or "int8": edgellm.quant.activations.set_activations
    # what prefill attention multiplies in: bfloat16 under --dtype bfloat16 where the CPU has AMX
    # (set by the loader, edgellm.quant.bf16.prefill_attention_dtype)
    prefill_attention_dtype = torch.float32

    def __init__(self, cfg: ModelConfig, weights: ModelWeights):
        self.cfg = cfg
        self.weights = weights
        self.rope = RotaryEmbedding(cfg)
        self._native_blocks = _native_block_args(weights)
        self._windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
        # --dtype bfloat16's block matrices (the loader marks them: edgellm.quant.bf16)
        self._bf16_blocks = bool(weights.blocks) and getattr(weights.blocks[0].qkv, "bf16_mode", False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                cache: KVCache, logit_rows: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """tokens, positions: [T]. Returns float32 logits [len(logit_rows), vocab]. Always the
        per-layer path (callers that want the fused decode step go through a ModelRunner)."""
        h = self.embed(tokens, trace)
        h = self.forward_layers(h, self.rope_tables(positions, trace), batch, cache, trace)
        return self.logits(h, logit_rows, trace)

    __call__ = forward

    def embed(self, tokens: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """The tokens' embedding rows, [T, hidden] float32."""
        if trace is not None:
            trace.begin()
        h = self.weights.embed.rows(tokens)
        if trace is not None:
            trace.end("embedding", None)
        return h

    def rope_tables(self, positions: torch.Tensor, trace: Trace | None = None):
        """cos/sin of the positions, looked up once per pass (traced as part of "rope")."""
        if trace is not None:
            trace.begin()
        rope = self.rope.tables(positions)
        if trace is not None:
            trace.end("rope", None)
        return rope

    def logits(self, h: torch.Tensor, logit_rows: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """The final norm and vocabulary projection of the rows ``logit_rows`` of h."""
        if trace is not None:
            trace.begin()
        if not (h.shape[0] == 1 and logit_rows.shape[0] == 1):   # (one row wanted of one: row 0, no gather)
            h = h.index_select(0, logit_rows)
        h = F.rms_norm(h, (self.cfg.hidden_size,), self.weights.final_norm, self.cfg.rms_norm_eps)
        if trace is not None:
            trace.end("final_norm", None)
        out = self.weights.lm_head.matmul(h)
        if trace is not None:
            trace.end("lm_head", None)
        return out

    @torch.inference_mode()
    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final hidden states of one sequence [T, hidden] (float32, after the final norm, the
        vectors the vocabulary projection reads), for embeddings. Runs the per-layer path over a
        scratch KV cache of its own (float32, T slots), so it never touches a serving pool and
        never the fused decode step."""
        n = int(tokens.shape[0])
        cache = KVCache(self.cfg, max(1, -(-n // 16)), 16, torch.float32)
        batch = AttentionBatch.build([(n, n, slice(0, n))])
        h = self.embed(tokens)
        h = self.forward_layers(h, self.rope_tables(torch.arange(n, dtype=torch.int64)), batch, cache)
        return F.rms_norm(h, (self.cfg.hidden_size,), self.weights.final_norm, self.cfg.rms_norm_eps)

    def forward_layers(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch,
                       cache: KVCache, trace: Trace | None = None, layers: list[int] | None = None) -> torch.Tensor:
        """The blocks, one after the other, op by op (prefill, mixed and large decode steps);
        ``layers``: only these blocks, in this order (a speculative draft), default all."""
        if trace is not None:
            trace.begin()
        blocks = self.weights.blocks
        for i in range(len(blocks)) if layers is None else layers:
            h = self.block(h, rope, blocks[i], batch, cache, i, trace)
        return h

    @property
    def has_fused_decode(self) -> bool:
        """Whether every block matrix is in a format the fused native decode step reads."""
        return self._native_blocks is not None

    def fused_decode_supported(self, batch: AttentionBatch, cache: KVCache) -> bool:
        """Whether :meth:`decode_blocks_fused` can run this step: native blocks, decode rows only,
        a float32 or float16 cache, and one window (or none) for every layer: the native step reads
        one history per row for all blocks."""
        return (self._native_blocks is not None and not batch.prefills
                and cache.dtype in (torch.float32, torch.float16) and len(set(self._windows)) == 1)

    def decode_blocks_fused(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch,
                            cache: KVCache, threads: int, trace: Trace | None = None,
                            layers: list[int] | None = None) -> None:
        """Every block of a decode-only step in one native call (one parallel region of ``threads``
        threads); updates h in place. Only where :meth:`fused_decode_supported` says so.
        ``layers``: only these blocks, in this order, each on its own KV layer (a speculative
        draft), default all."""
        cfg = self.cfg
        tensors, formats, biases = self._native_blocks
        batch = batch.windowed(self._windows[0])   # Mistral: every row's last `window` positions
        T = h.shape[0]
        if trace is not None:
            trace.begin()
        args = (rope[0].view(T, -1), rope[1].view(T, -1), cache.data, batch.write_index, batch.decode_index,
                batch.decode_lens, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_size, cfg.rms_norm_eps, threads)
        if layers is not None:   # a draft's blocks, each on the KV layer it names
            tensors = [t for i in layers for t in tensors[6 * i:6 * i + 6]]
            formats = [f for i in layers for f in formats[4 * i:4 * i + 4]]
            biases = [biases[i] for i in layers] if biases else []
        native().decode_blocks_on(h, tensors, formats, biases, *args, [] if layers is None else list(layers),
                                  self.decode_arithmetic())
        if trace is not None:
            trace.end("decode_blocks", None)

    @property
    def bf16_decode(self) -> bool:
        """Whether the fused decode step multiplies with bf16 dot products: --dtype bfloat16's
        blocks where the CPU has them, the same test the block matrices make for their own
        decode matmuls (edgellm.quant.bf16.decode_in_bf16)."""
        return self._bf16_blocks and decode_in_bf16()

    def decode_arithmetic(self) -> int:
        """How the fused decode step multiplies (decode_blocks_on's ``arith``): 0 exactly, 1 with
        int8 activation blocks (edgellm.quant.activations), 2 with bf16 dot products (bf16_decode)."""
        return 1 if self.activations == "int8" else 2 if self.bf16_decode else 0

    def block(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], w: BlockWeights,
              batch: AttentionBatch, cache: KVCache, layer: int, trace: Trace | None = None) -> torch.Tensor:
        """One transformer block; each op ends with a mark in ``trace`` (a None check when off)."""
        h = self.attention_half(h, rope, w, batch, cache, layer, trace)
        return self.mlp_half(h, w, layer, trace)

    def attention_half(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], w: BlockWeights,
                       batch: AttentionBatch, cache: KVCache, layer: int, trace: Trace | None = None) -> torch.Tensor:
        """attn_norm, q/k/v, RoPE and the KV write, attention, o_proj and the residual add."""
        cfg = self.cfg
        x = F.rms_norm(h, (cfg.hidden_size,), w.attn_norm, cfg.rms_norm_eps)
        if trace is not None:
            trace.end("attn_norm", layer)
        qkv = w.qkv.matmul(x)
        if w.qkv_bias is not None:
            qkv = qkv + w.qkv_bias
        if trace is not None:
            trace.end("qkv_proj", layer)
        qkv = self.norm_qk(qkv, w)
        q = write_kv(qkv, rope, cache, layer, batch, cfg.n_heads, cfg.n_kv_heads)
        if trace is not None:
            trace.end("rope", layer)
        attn = attend(q, cache, layer, batch, self._windows[layer], self.prefill_attention_dtype)
        if trace is not None:
            trace.end("attention", layer)
        h = self.project_add(w.o, attn, h)
        if trace is not None:
            trace.end("o_proj+attn_add", layer)
        return h

    def norm_qk(self, qkv: torch.Tensor, w: BlockWeights) -> torch.Tensor:
        """Per-head norms of queries and keys before RoPE: none in Llama (Qwen3-MoE has them)."""
        return qkv

    def mlp_half(self, h: torch.Tensor, w: BlockWeights, layer: int, trace: Trace | None = None) -> torch.Tensor:
        """ffn_norm, gate/up, SiLU(gate) x up, down and the residual add."""
        cfg = self.cfg
        x = F.rms_norm(h, (cfg.hidden_size,), w.ffn_norm, cfg.rms_norm_eps)
        if trace is not None:
            trace.end("ffn_norm", layer)
        gate_up = w.gate_up.matmul(x)
        if trace is not None:
            trace.end("gate_up_proj", layer)
        act = silu_mul(gate_up)
        if trace is not None:
            trace.end("mlp_act", layer)
        h = self.project_add(w.down, act, h)
        if trace is not None:
            trace.end("down_proj+ffn_add", layer)
        return h


    def project_add(self, w: Weight, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x @ w.T: a block half's output projection and residual add. A
        tensor-parallel shard (``edgellm.runtime.parallel_runner``) overrides it to sum the ranks'
        partial products first."""
        return w.matmul_add(x, residual)


def _native_block_args(weights: ModelWeights):
    """Arguments of the native decode path, or None when some block matrix has another format."""
    from edgellm.quant.gguf_weights import GGUFBlockWeight

    if native() is None:
        return None
    tensors, formats, biases = [], [], []
    for b in weights.blocks:
        mats = (b.qkv, b.o, b.gate_up, b.down)
        if not all(isinstance(m, GGUFBlockWeight) for m in mats):
            return None
        tensors += [b.attn_norm.contiguous(), b.qkv.raw, b.o.raw, b.ffn_norm.contiguous(), b.gate_up.raw, b.down.raw]
        formats += [m.code for m in mats]
        if b.qkv_bias is not None:
            biases.append(b.qkv_bias.contiguous())
    if biases and len(biases) != len(weights.blocks):
        return None
    return tensors, formats, biases


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the stacked [.., 2 * ffn] projection."""
    ext = native()
    if ext is not None and gate_up.dtype == torch.float32:
        return ext.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
