"""One benchmark engine in its own process: ``python -m edgellm.bench.worker --engine E ...``.

Engines: ``ours`` (edgellm), ``ours-spec`` (edgellm with and without speculative decoding on a
shipped workload: ``edgellm bench --speculative``, see :mod:`edgellm.bench.speculative`),
``transformers`` (HF, GGUF loaded and dequantised to float32), ``llama.cpp`` (llama-cpp-python;
``--lookup K``: its prompt-lookup drafting) and ``membw`` (the memory-bandwidth probe). A worker loads its
engine once, does one warm-up generation (not counted), prints ``{"event": "ready", ...}`` and then
answers commands read from stdin, one JSON object per line:

* ``{"cmd": "run"}`` -> one timed generation: ``{"event": "result", ...}`` (``ours-spec``:
  ``{"cmd": "run", "variant": "spec" | "plain"}``);
* ``{"cmd": "profile", "steps": N}`` (ours only) -> ``{"event": "profile", ...}``, where a decode
  step's time goes;
* ``{"cmd": "quit"}`` or end of input -> exit.

An input problem is answered ``{"event": "error", "kind": <EdgeLLMError subclass>, "problem", "fix"}``
and exit status 2; any other failure ``{"event": "error", "kind": "crash", ...}`` and status 1.
Protocol lines go to the original stdout only: the worker points file descriptor 1 at stderr,
so that whatever a library prints (llama.cpp logs, transformers warnings) cannot corrupt them.

``ours`` runs ``LLM.generate``, a facade over the ``Engine`` that ``edgellm serve`` runs: one
request through the same admission, scheduler, model runner, sampler and output processing, its
prompt computed in full each run (the facade clears the prefix cache first).

Timing conventions, the same for every engine (all wall clock, ``time.perf_counter``):

* ``prefill_s``: the forward pass over the prompt ids (to the last position's logits);
* ``ttft_s``: from the call to the first generated token chosen (prefill + first greedy pick);
* ``decode_s``: from the first generated token to the last one, i.e. ``gen_tokens - 1`` decode
  steps, each a one-token forward pass plus the greedy pick; ``decode_tok_s = (gen - 1) / decode_s``;
* ``peak_rss_mb``: ``ru_maxrss`` of this process so far (load included), in MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

from edgellm.errors import InvalidParameterError
from edgellm.util import hwm_mb, peak_rss_mb, reset_hwm, rss_now_mb

# The prompt text: a fixed English text present on every Debian/Ubuntu machine, with a
# built-in paragraph (repeated) where it is not.
PROMPT_FILES = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0")
BUILTIN_PARAGRAPH = (
    "The history of computing is a history of moving data. A processor can add two numbers in a "
    "fraction of a nanosecond, but fetching those numbers from main memory takes a hundred times "
    "longer, so the designers of every machine since the nineteen-sixties have spent most of their "
    "ingenuity on caches, prefetchers and wide buses rather than on arithmetic. Language models make "
    "the point again: to produce one word, a model reads every one of its weights once, and the time "
    "that takes is set by how fast the memory can deliver them, not by how fast the cores can "
    "multiply. This is why a small model quantised to four bits can run faster on a laptop than a "
    "large one in full precision on a server, and why engineers measure bandwidth before they "
    "measure anything else.\n\n")

# Warm-up generation: the full prompt and this many tokens (all code paths, fewer seconds).
WARMUP_TOKENS = 8
# Memory-bandwidth probe: copy a tensor of this size, this many timed times (after one untimed).
MEMBW_BYTES = 256 * 2**20
MEMBW_COPIES = 5


def _cpu_time() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_busy_s() -> float | None:
    """CPU seconds all processes of the machine have been busy since boot (from /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)          # idle + iowait
    busy = sum(fields[:8]) - idle                                     # guest time is inside user
    return busy / os.sysconf("SC_CLK_TCK")


def prompt_text() -> tuple[str, str]:
    """(text, where it came from)."""
    for name in PROMPT_FILES:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > 1000:
            return text, name
    return BUILTIN_PARAGRAPH, "built-in paragraph"


def prompt_ids(encode, n: int) -> tuple[list[int], str]:
    """Exactly ``n`` token ids of the fixed prompt text, repeated as often as needed."""
    text, source = prompt_text()
    ids = list(encode(text))
    reps = 1
    while len(ids) < n:
        reps += 1
        longer = list(encode("\n\n".join([text] * reps)))
        if len(longer) <= len(ids):   # a tokenizer that folds the whole text into a few tokens
            raise InvalidParameterError(
                f"the model's tokenizer turns the benchmark text ({source}) into {len(ids)} tokens, however "
                f"often it is repeated, so a prompt of {n} tokens cannot be made",
                "use a model with a real tokenizer, or ask for fewer --prompt-tokens")
        ids = longer
    if reps > 1:
        source += f" (x{reps})"
    return ids[:n], source


def _result(prefill_s: float, ttft_s: float, decode_s: float, n_prompt: int, token_ids: list[int],
            **extra) -> dict:
    n_gen = len(token_ids)
    return {"event": "result", "prefill_s": prefill_s, "ttft_s": ttft_s, "decode_s": decode_s,
            "prefill_tok_s": n_prompt / prefill_s if prefill_s > 0 else 0.0,
            "decode_tok_s": (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0.0,
            "prompt_tokens": n_prompt, "completion_tokens": n_gen, "token_ids": token_ids,
            "peak_rss_mb": peak_rss_mb(), "run_peak_rss_mb": hwm_mb(), "rss_mb": rss_now_mb(), **extra}


# ---------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------
class OursEngine:
    name = "ours"

    def __init__(self, args):
        from edgellm.llm import LLM

        self.baseline_rss_mb = rss_now_mb()
        keep = [k for k in (args.keep or "").split(",") if k]
        from edgellm.kv.cache import BLOCK_SIZE
        from edgellm.runtime.engine import pool_bytes_per_block

        split, threads = None, args.threads
        if args.pipeline_parallel * args.tensor_parallel > 1:     # the model split across local ranks
            from edgellm.runtime.distributed import ParallelConfig
            from edgellm.runtime.parallel_runner import SplitModel

            threads = max(1, args.threads // (args.pipeline_parallel * args.tensor_parallel))
            split = SplitModel(ParallelConfig(args.pipeline_parallel, args.tensor_parallel, threads=threads),
                               args.model, args.dtype)
        self.llm = LLM(args.model, dtype=args.dtype, threads=threads, weights=args.weights, keep=keep,
                       kv_dtype=args.kv_dtype, parallel=split, activations=args.activations)
        cfg = self.llm.cfg
        self.gen = args.gen_tokens
        if args.prompt_tokens + args.gen_tokens > cfg.context_length:
            raise InvalidParameterError(
                f"--prompt-tokens {args.prompt_tokens} plus --gen-tokens {args.gen_tokens} is more than "
                f"the model's context window of {cfg.context_length} tokens",
                f"ask for at most {cfg.context_length} tokens in all, e.g. --prompt-tokens "
                f"{max(1, cfg.context_length - args.gen_tokens)} --gen-tokens {args.gen_tokens}")
        self.ids, self.prompt_source = prompt_ids(self.llm.tokenizer.encode, args.prompt_tokens)
        if len(self.ids) < args.prompt_tokens:
            raise InvalidParameterError(f"could not build a prompt of {args.prompt_tokens} tokens",
                                        "ask for fewer --prompt-tokens")
        loaded = self.llm.loaded
        weights = loaded.model.weights
        formats = sorted({w.format for w in block_matrices(weights)})
        self.info = {
            "model_name": loaded.source.name, "model_path": str(loaded.source.path),
            "model_kind": loaded.source.kind, "file_bytes": loaded.file_bytes,
            "weight_bytes": loaded.weight_bytes, "dtype": loaded.dtype, "weight_formats": formats,
            "lm_head_format": weights.lm_head.format, "tied_embeddings": weights.lm_head is weights.embed,
            "n_layers": cfg.n_layers, "context_length": cfg.context_length,
            "kv_bytes_per_token": pool_bytes_per_block(loaded, BLOCK_SIZE, self.llm.kv_dtype) / BLOCK_SIZE,
            # what one sequence holds at the run's mean decode context and at its end, as the engine
            # counts it: a sliding-window layer its window, a recurrent model one state
            "kv_bytes_mean_context": self._kv_bytes(loaded, args.prompt_tokens + args.gen_tokens / 2),
            "kv_bytes_run": self._kv_bytes(loaded, args.prompt_tokens + args.gen_tokens),
            "kv_dtype": self.llm.kv_dtype, "architecture": cfg.architecture,
            "prompt_ids": self.ids, "prompt_source": self.prompt_source,
            "baseline_rss_mb": self.baseline_rss_mb, "loaded_rss_mb": rss_now_mb(), "load_peak_rss_mb": peak_rss_mb(),
            "load_s": loaded.load_s, "activations": args.activations,
        }
        reset_hwm()   # from here VmHWM is the peak of the runs alone (see harness.memory_breakdown)

    def _kv_bytes(self, loaded, n_tokens: float) -> float:
        """Bytes of KV one sequence holds and a decode step reads at a context of ``n_tokens``: a
        sliding-window layer only its window, a recurrent model its one state, whatever the length."""
        from edgellm.runtime.engine import is_recurrent, pool_bytes_per_block

        if is_recurrent(loaded):
            return float(pool_bytes_per_block(loaded, 1, self.llm.kv_dtype))
        cfg = loaded.config
        per_layer_token = pool_bytes_per_block(loaded, 1, self.llm.kv_dtype, split=True) / cfg.n_layers
        return per_layer_token * cfg.kv_positions(n_tokens)

    def _params(self, n: int):
        from edgellm.sampling import SamplingParams
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    def warmup(self) -> None:
        self.llm.engine(len(self.ids) + self.gen)   # the timed runs' KV pool, allocated before them
        self.llm.generate(self.ids, self._params(min(self.gen, WARMUP_TOKENS)))

    def run(self) -> dict:
        chooser = self.llm.engine().runner.thread_chooser
        before = dict(chooser.steps_by_threads)
        c = self.llm.generate(self.ids, self._params(self.gen))
        # fused decode steps per thread count: fewer than --threads means the contention fallback ran
        steps = {n: k - before.get(n, 0) for n, k in chooser.steps_by_threads.items() if k - before.get(n, 0)}
        return _result(c.prefill_s, c.ttft_s, c.decode_s, c.prompt_tokens, c.token_ids,
                       decode_steps_by_threads={str(n): k for n, k in sorted(steps.items())},
                       decode_max_threads=chooser.max_threads)

    def profile(self, steps: int) -> dict:
        return profile_decode(self.llm, self.ids, steps)


class OursInt8Engine(OursEngine):
    """``--peers ours-int8``: our engine again, with int8 activations (``--activations int8``), on the
    model file the harness resolved; measured in the same rounds as the exact path and the peers."""

    name = "ours-int8"

    def __init__(self, args):
        args.model = args.model or args.model_path
        args.activations = "int8"
        super().__init__(args)


class OursBf16Engine(OursEngine):
    """``--peers ours-bf16``: our engine again, with bf16 prefill (``--dtype bfloat16``), on the model
    file the harness resolved; measured in the same rounds as the exact path and the peers."""

    name = "ours-bf16"

    def __init__(self, args):
        args.model = args.model or args.model_path
        args.dtype = "bfloat16"
        super().__init__(args)


class OursSpeculativeEngine:
    """``edgellm bench --speculative``: one loaded model, two LLMs over it -- one with speculative
    decoding, one without -- answering ``{"cmd": "run", "variant": "spec" | "plain"}`` on the same
    chat-rendered workload prompt, greedy, EOS respected (``--gen-tokens`` at most)."""

    name = "ours-spec"

    def __init__(self, args):
        from edgellm.bench.workloads import get_workload
        from edgellm.llm import LLM
        from edgellm.runtime.speculative import parse_speculative

        workload = get_workload(args.workload)
        parse_speculative(args.speculative, args.draft_tokens)     # refused before loading
        keep = [k for k in (args.keep or "").split(",") if k]
        self.plain = LLM(args.model, dtype=args.dtype, threads=args.threads, weights=args.weights, keep=keep,
                         kv_dtype=args.kv_dtype)
        self.spec = LLM(loaded=self.plain.loaded, kv_dtype=args.kv_dtype, speculative=args.speculative,
                        draft_tokens=args.draft_tokens)
        cfg = self.plain.cfg
        self.ids = self.plain.encode_prompt(workload["prompt"], chat=True)
        self.gen = args.gen_tokens
        if len(self.ids) + self.gen > cfg.context_length:
            raise InvalidParameterError(
                f"the {args.workload} prompt ({len(self.ids)} tokens) plus --gen-tokens {self.gen} is more than "
                f"the model's context window of {cfg.context_length} tokens", "ask for fewer --gen-tokens")
        loaded = self.plain.loaded
        weights = loaded.model.weights
        formats = sorted({w.format for b in weights.blocks for w in b.matrices()})   # MoE: experts too
        self.info = {
            "model_name": loaded.source.name, "model_path": str(loaded.source.path),
            "model_kind": loaded.source.kind, "file_bytes": loaded.file_bytes, "weight_bytes": loaded.weight_bytes,
            "weight_formats": formats, "dtype": loaded.dtype, "kv_dtype": self.plain.kv_dtype,
            "architecture": cfg.architecture, "n_layers": cfg.n_layers, "context_length": cfg.context_length,
            "prompt_ids": self.ids, "speculative": self.spec.speculative.name,
            "draft_tokens": self.spec.speculative.draft_tokens, "load_s": loaded.load_s,
        }

    def _params(self, n: int):
        from edgellm.sampling import SamplingParams
        return SamplingParams(temperature=0.0, max_tokens=n)

    def warmup(self) -> None:
        """One full generation of each variant (untimed); ``info["completion_tokens"]``: how many
        tokens the greedy reply has (the peers generate as many)."""
        plain = self.plain.generate(self.ids, self._params(self.gen))
        spec = self.spec.generate(self.ids, self._params(self.gen))
        self.info["completion_tokens"] = len(plain.token_ids)
        self.info["finish_reason"] = plain.finish_reason
        self.info["warmup_same_tokens"] = plain.token_ids == spec.token_ids

    def run(self, variant: str = "spec") -> dict:
        llm = self.spec if variant == "spec" else self.plain
        sp = llm.engine().speculator
        before = (sp.verify_steps, sp.verify_tokens) if sp is not None else (0, 0)
        c = llm.generate(self.ids, self._params(self.gen))
        extra = {"variant": variant, "finish_reason": c.finish_reason}
        if sp is not None:
            s = c.speculative or {}
            steps, tokens = sp.verify_steps - before[0], sp.verify_tokens - before[1]
            extra.update(proposed=s.get("proposed", 0), accepted=s.get("accepted", 0), verify_steps=steps,
                         verify_tokens=tokens,
                         acceptance_rate=s["accepted"] / s["proposed"] if s.get("proposed") else 0.0,
                         tokens_per_verify_step=tokens / steps if steps else 0.0)
        return _result(c.prefill_s, c.ttft_s, c.decode_s, c.prompt_tokens, c.token_ids, **extra)


#: the model's attention calls, timed as the trace's "rope" (RoPE + KV write) and "attention" ops of a block
ATTENTION_FUNCTIONS = ["write_kv", "attend"]


def _split_step(step) -> dict:
    """One traced forward pass's time by kind: the matrix-multiply ops (the lm_head also apart),
    attention (per-block RoPE + KV write and attention), the fused all-blocks call."""
    from edgellm.models.trace import MATMUL_OPS

    out = {"tokens": step.tokens, "total": step.seconds, "matmul": 0.0, "lm_head": 0.0, "attention": 0.0,
           "blocks": 0.0, "matmul_calls": 0}
    for op, layer, seconds in step.ops:
        if op in MATMUL_OPS:
            out["matmul"] += seconds
            out["matmul_calls"] += 1
            if op == "lm_head":
                out["lm_head"] += seconds
        elif op in ("rope", "attention") and layer is not None:   # the cos/sin look-up is "other"
            out["attention"] += seconds
        elif op == "decode_blocks":
            out["blocks"] += seconds
    return out


def block_matrices(weights) -> list:
    """The matrices of a model's blocks (a recurrent model's weights list theirs: ``matrices()``;
    a mixture-of-experts block lists its experts too)."""
    if hasattr(weights, "matrices"):
        return weights.matrices()
    return [w for b in weights.blocks for w in b.matrices()]


def _traced_generation(llm, ids: list[int], steps: int):
    """Greedy generation of ``steps + 1`` tokens on an Engine whose runner traces every forward pass;
    returns (the trace, the request's result)."""
    from edgellm.kv.cache import BLOCK_SIZE, KVCache
    from edgellm.models.trace import Trace
    from edgellm.runtime.engine import Engine
    from edgellm.sampling import SamplingParams

    n_new = min(steps + 1, llm.cfg.context_length - len(ids))
    blocks = -(-(len(ids) + n_new) // BLOCK_SIZE) + 1
    engine = Engine(llm, kv_memory=blocks * KVCache.bytes_per_block(llm.cfg, BLOCK_SIZE, llm.kv_dtype))
    try:
        engine.runner.trace = Trace()
        result = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True))[0]
        return engine.runner.trace, result
    finally:
        engine.close()


def profile_decode(llm, ids: list[int], steps: int) -> dict:
    """Time ``steps`` decode steps after a prefill of ``ids``, splitting each step's time into the
    matrix-multiply kernels (the projections; the lm_head separately), attention (RoPE, KV write,
    attention proper), the fused all-blocks native call where decode takes it, and the rest of the
    forward pass (Python, norms, SiLU, embedding look-up, small tensors), plus the time outside the
    forward pass (greedy pick, detokenisation, the engine's loop). All from the trace of the model's
    op scopes (``edgellm.models.trace``), on an engine of its own sharing the model.
    """
    trace, c = _traced_generation(llm, ids, steps)
    decode = [_split_step(s) for s in trace.steps if s.tokens == 1]
    if not decode:
        return {"event": "profile", "steps": 0}
    total = sum(f["total"] for f in decode)
    matmul = sum(f["matmul"] for f in decode)
    lm = sum(f["lm_head"] for f in decode)
    attn = sum(f["attention"] for f in decode)
    blocks = sum(f["blocks"] for f in decode)
    token_time = max(c.decode_s, total)      # forward passes + everything between them
    outside = token_time - total
    med = statistics.median
    return {
        "event": "profile", "steps": len(decode),
        "context_first": len(ids) + 1, "context_last": len(ids) + len(decode),
        "step_ms_median": 1e3 * med(f["total"] for f in decode),
        "token_ms_mean": 1e3 * token_time / len(decode),
        "matmul_ms_median": 1e3 * med(f["matmul"] for f in decode),
        "lm_head_ms_median": 1e3 * med(f["lm_head"] for f in decode),
        "attention_ms_median": 1e3 * med(f["attention"] for f in decode),
        "blocks_ms_median": 1e3 * med(f["blocks"] for f in decode),
        "other_ms_median": 1e3 * med(f["total"] - f["matmul"] - f["attention"] - f["blocks"] for f in decode),
        "matmul_calls_per_step": decode[0]["matmul_calls"],
        "attention_functions": ATTENTION_FUNCTIONS,
        # fractions of the whole per-token time (they add up to 1)
        "fractions": {
            "matmul": matmul / token_time,
            "lm_head": lm / token_time,            # part of matmul
            "attention": attn / token_time,
            "native_blocks": blocks / token_time,
            "other_in_forward": (total - matmul - attn - blocks) / token_time,
            "outside_forward": outside / token_time,
        },
    }


class TransformersEngine:
    name = "transformers"

    def __init__(self, args):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(args.threads)
        self.torch = torch
        path = Path(args.model_path)
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        kwargs = {dtype_kw: torch.float32}
        if path.is_file():
            kwargs["gguf_file"] = path.name
            folder = path.parent
        else:
            folder = path
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).eval()
        self.ids = torch.tensor([read_prompt(args.prompt_file)], dtype=torch.long)
        self.gen = args.gen_tokens
        pad = self.model.generation_config.pad_token_id
        eos = self.model.generation_config.eos_token_id
        self.pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos) or 0
        self.info = {"version": transformers.__version__, "dtype": "float32", "load_s": time.perf_counter() - t0,
                     "timing": "one generate() call with a streamer timestamping the prompt and each token"}

    def _generate(self, n: int) -> tuple[list[float], list[int], float]:
        from transformers.generation.streamers import BaseStreamer

        clock = time.perf_counter

        class Stamps(BaseStreamer):
            def __init__(self):
                self.t: list[float] = []

            def put(self, value):
                self.t.append(clock())

            def end(self):
                pass

        s = Stamps()
        with self.torch.inference_mode():
            t0 = clock()
            out = self.model.generate(self.ids, attention_mask=self.torch.ones_like(self.ids), do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n, streamer=s, pad_token_id=self.pad)
        return s.t, out[0, self.ids.shape[1]:].tolist(), t0

    def warmup(self) -> None:
        self._generate(min(self.gen, WARMUP_TOKENS))

    def run(self) -> dict:
        stamps, toks, t0 = self._generate(self.gen)
        # stamps[0]: the prompt handed to the streamer before the first forward; stamps[i]: token i
        t_prompt, t_first, t_last = stamps[0], stamps[1], stamps[-1]
        return _result(t_first - t_prompt, t_first - t0, t_last - t_first, self.ids.shape[1], toks)


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, args):
        import llama_cpp
        import numpy as np

        self.np, self.lc = np, llama_cpp
        path = Path(args.model_path)
        if not path.is_file():
            from edgellm.errors import UnsupportedModelError
            raise UnsupportedModelError(f"llama.cpp needs a .gguf file, and {path} is a folder",
                                        "benchmark a .gguf model to compare with llama.cpp")
        self.ids = read_prompt(args.prompt_file)
        self.gen = args.gen_tokens
        self.lookup = args.lookup
        draft = None
        if self.lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
            draft = LlamaPromptLookupDecoding(num_pred_tokens=self.lookup)
        t0 = time.perf_counter()
        # n_ctx: room for the proposals of the last step too
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads,
                                   n_ctx=len(self.ids) + self.gen + self.lookup + 1, n_batch=512, verbose=False,
                                   draft_model=draft,
                                   # with a draft model llama-cpp-python keeps every position's logits but
                                   # sizes that buffer by logits_all alone (0.3.36: a ValueError without it)
                                   logits_all=bool(self.lookup))
        self.n_vocab = self.llm.n_vocab()
        self.info = {"version": llama_cpp.__version__, "load_s": time.perf_counter() - t0,
                     "n_ctx": self.llm.n_ctx(), "n_batch": 512,
                     "timing": "wall clock: reset(); eval(prompt ids); then eval([token]) one at a time, "
                               "greedy = numpy argmax of the last logits; llama.cpp's own perf counters "
                               "reported alongside (internal_*)"}
        if self.lookup:
            self.info.update(prompt_lookup_tokens=self.lookup, timing=(
                "wall clock: reset(); Llama.generate(prompt ids, temp=0) with draft_model="
                f"LlamaPromptLookupDecoding(num_pred_tokens={self.lookup}) (llama-cpp-python's prompt lookup, "
                "each step evaluates the pending token and the proposal in one batch), stopped after "
                "--gen-tokens tokens (EOS not checked); first token = first yield"))

    def _greedy(self) -> int:
        ptr = self.lc.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def _generate(self, n: int) -> dict:
        clock = time.perf_counter
        ctx = self.llm._ctx.ctx
        self.lc.llama_perf_context_reset(ctx)
        self.llm.reset()
        t0 = clock()
        self.llm.eval(self.ids)
        t1 = clock()
        tok = self._greedy()
        t_first = clock()
        out = [tok]
        for _ in range(n - 1):
            self.llm.eval([tok])
            tok = self._greedy()
            out.append(tok)
        t_end = clock()
        perf = self.lc.llama_perf_context(ctx)
        internal = {}
        if perf.n_p_eval > 0 and perf.t_p_eval_ms > 0:
            internal["internal_prefill_tok_s"] = perf.n_p_eval / (perf.t_p_eval_ms / 1e3)
        if perf.n_eval > 0 and perf.t_eval_ms > 0:
            internal["internal_decode_tok_s"] = perf.n_eval / (perf.t_eval_ms / 1e3)
        return _result(t1 - t0, t_first - t0, t_end - t_first, len(self.ids), out, **internal)

    def _generate_lookup(self, n: int) -> dict:
        """llama-cpp-python's own speculative loop (``Llama.generate`` with the prompt-lookup draft)."""
        clock = time.perf_counter
        self.lc.llama_perf_context_reset(self.llm._ctx.ctx)
        self.llm.reset()
        out: list[int] = []
        t0 = clock()
        t_first = t_end = t0
        for tok in self.llm.generate(self.ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                     reset=False):
            t_end = clock()
            if not out:
                t_first = t_end
            out.append(int(tok))
            if len(out) >= n:
                break
        # prefill is not separable from the first sample here: the time to the first token stands for it
        return _result(t_first - t0, t_first - t0, t_end - t_first, len(self.ids), out)

    def warmup(self) -> None:
        if self.lookup:
            self._generate_lookup(min(self.gen, WARMUP_TOKENS))
        else:
            self._generate(min(self.gen, WARMUP_TOKENS))

    def run(self) -> dict:
        return self._generate_lookup(self.gen) if self.lookup else self._generate(self.gen)


class MemoryBandwidthEngine:
    """Copies a 256 MiB float32 tensor into another: (bytes read + bytes written) / median time."""

    name = "membw"

    def __init__(self, args):
        import torch

        torch.set_num_threads(args.threads)
        self.torch = torch
        self.info = {"bytes": MEMBW_BYTES, "copies": MEMBW_COPIES, "threads": args.threads}

    def warmup(self) -> None:
        pass

    def run(self) -> dict:
        torch = self.torch
        src = torch.ones(MEMBW_BYTES // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        dst.copy_(src)                       # untimed: faults the pages in
        times = []
        for _ in range(MEMBW_COPIES):
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
        del src, dst
        t = statistics.median(times)
        return {"event": "result", "bandwidth_gb_s": 2 * MEMBW_BYTES / t / 1e9, "copy_s": times}


ENGINES = {e.name: e for e in (OursEngine, OursInt8Engine, OursBf16Engine, OursSpeculativeEngine, TransformersEngine, LlamaCppEngine,
                                MemoryBandwidthEngine)}


def read_prompt(path: str | None) -> list[int]:
    if not path:
        raise SystemExit("--prompt-file is required for this engine")
    ids = json.loads(Path(path).read_text())
    return [int(t) for t in ids]


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgellm.bench.worker")
    p.add_argument("--engine", required=True, choices=sorted(ENGINES))
    p.add_argument("--model", default=None, help="model spec (ours)")
    p.add_argument("--model-path", default=None, help="resolved .gguf file or HF folder (peers)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--weights", default=None)
    p.add_argument("--keep", default="")
    p.add_argument("--kv-dtype", default="fp32")
    p.add_argument("--activations", default="fp32", help="ours: fp32 or int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pipeline-parallel", type=int, default=1, help="ours: ranks of a pipeline split")
    p.add_argument("--tensor-parallel", type=int, default=1, help="ours: ranks of a tensor-parallel split")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--prompt-file", default=None, help="JSON list of prompt ids (peers)")
    p.add_argument("--speculative", default=None, help="ours-spec: the speculative method")
    p.add_argument("--draft-tokens", type=int, default=None, help="ours-spec: the most tokens proposed per step")
    p.add_argument("--workload", default="code-edit", help="ours-spec: the workload whose prompt is run")
    p.add_argument("--lookup", type=int, default=0,
                   help="llama.cpp: prompt-lookup drafting with this many tokens per step (0: plain decoding)")
    args = p.parse_args(argv)

    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)                      # stray prints from libraries go to stderr

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    from edgellm.errors import EdgeLLMError

    try:
        engine = ENGINES[args.engine](args)
        engine.warmup()
        send({"event": "ready", "engine": args.engine, "info": engine.info, "peak_rss_mb": peak_rss_mb()})
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd.get("cmd") == "run":
                busy0, cpu0, t0 = _machine_busy_s(), _cpu_time(), time.perf_counter()
                result = engine.run(cmd["variant"]) if "variant" in cmd else engine.run()
                wall = time.perf_counter() - t0
                own = _cpu_time() - cpu0
                busy1 = _machine_busy_s()
                # CPU time this process got per thread-second of wall clock (below 1: its threads
                # waited for cores), and the cores the rest of the machine kept busy meanwhile.
                result["cpu_share"] = own / (wall * args.threads) if wall > 0 else 0.0
                if busy0 is not None and busy1 is not None and wall > 0:
                    result["others_cores"] = max(0.0, (busy1 - busy0 - own) / wall)
                send(result)
            elif cmd.get("cmd") == "profile":
                send(engine.profile(int(cmd["steps"])))
            elif cmd.get("cmd") == "quit":
                break
            else:
                send({"event": "error", "kind": "crash", "problem": f"unknown command {cmd!r}", "fix": None})
        return 0
    except EdgeLLMError as err:
        send({"event": "error", "kind": type(err).__name__, "problem": err.problem, "fix": err.fix})
        return 2
    except Exception as err:  # noqa: BLE001 -- reported to the parent, which decides
        traceback.print_exc()
        send({"event": "error", "kind": "crash", "problem": f"{type(err).__name__}: {err}", "fix": None})
        return 1


if __name__ == "__main__":
    sys.exit(main())
