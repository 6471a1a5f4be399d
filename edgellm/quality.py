"""What a precision format costs in quality: perplexity on a text, and greedy agreement with fp32.

* :func:`perplexity`: sliding-window perplexity (the Hugging Face recipe): windows of
  ``context`` tokens every ``stride`` tokens; each window scores only the tokens the previous
  windows did not, each conditioned on at least ``context - stride`` tokens before it. All logits
  of a window come from one forward pass through the model (``logit_rows`` = every scored row),
  with the KV cache in the dtype under test (prefill attention reads keys/values back from it).
* :func:`greedy_continuations` / :func:`agreement`: greedy continuations of a set of prompts,
  compared with those of the float32 model: ``agreement`` is the fraction of identical tokens at
  identical positions (one early divergence costs the rest of that continuation);
  ``top1_agreement`` feeds the fp32 continuation to the model under test and counts the
  positions where its own greedy choice is the same token (no cascade: a per-token measure).
  The continuations come from the engine (8 sequences at a time, the decode kernels' batch),
  ignoring end-of-sequence.
* :func:`measure_speed`: medians of ``LLM.generate`` prefill and decode tokens/s.

The default corpus is the GNU GPL version 3 (``/usr/share/common-licenses/GPL-3``, 35 kB of
English, ~7.9k SmolLM2 tokens), shipped by Debian's ``base-files`` on every machine the project
runs on; any UTF-8 text can be given instead.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgellm.errors import InvalidParameterError, ModelNotFoundError

DEFAULT_CORPUS = "/usr/share/common-licenses/GPL-3"
# scored rows whose logits are materialised at once (bounds memory: rows x vocab floats)
_LOGIT_ROWS = 256

PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "The largest planet in our solar system is",
    "In computer science, a linked list is",
    "The French Revolution began in",
    "Photosynthesis is the process by which plants",
    "My favourite thing about the weekend is",
    "The quick brown fox",
    "A good way to learn a new language is to",
    "The theory of relativity was developed by",
    "def fibonacci(n):\n",
    "The most important rule of cooking is",
    "When the train arrived at the station,",
)


def read_corpus(path: str | os.PathLike | None = None) -> str:
    path = Path(path or DEFAULT_CORPUS)
    if not path.is_file():
        hint = " (Debian's base-files package ships it)" if str(path) == DEFAULT_CORPUS else ""
        raise ModelNotFoundError(f"corpus file {path} does not exist{hint}", "pass --corpus FILE, any English text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidParameterError(f"corpus {path} is not UTF-8 text", "pass a UTF-8 text file") from None
    if not text.strip():
        raise InvalidParameterError(f"corpus {path} is empty", "pass a file with some text")
    return text


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float               # mean negative log-likelihood (nats a token)
    tokens: int              # tokens scored
    windows: int
    context: int
    stride: int
    seconds: float
    tokens_per_s: float      # tokens run through the model per second (all windows)

    def to_dict(self) -> dict:
        return asdict(self)


def check_window(context: int, stride: int | None, cfg) -> int:
    if context < 2:
        raise InvalidParameterError(f"--context must be at least 2, got {context}", "use e.g. --context 512")
    if context > cfg.context_length:
        raise InvalidParameterError(f"--context {context} exceeds the model's context window {cfg.context_length}",
                                    f"use --context {cfg.context_length} or less")
    stride = context // 2 if stride is None else stride
    if not 1 <= stride <= context - 1:
        raise InvalidParameterError(f"--stride must be between 1 and context - 1 ({context - 1}), got {stride}",
                                    f"use e.g. --stride {context // 2}")
    return stride


@torch.inference_mode()
def perplexity(model, cfg, ids: list[int], context: int = 512, stride: int | None = None, kv_dtype="fp32",
               progress=None) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` (a LlamaModel) on token ids ``ids``."""
    from edgellm.kv.cache import BLOCK_SIZE, KVCache
    from edgellm.layers.attention import AttentionBatch

    stride = check_window(context, stride, cfg)
    n = len(ids)
    if n < 2:
        raise InvalidParameterError(f"the corpus has {n} token(s); perplexity needs at least 2",
                                    "pass a longer text or a larger --max-tokens")
    cache = KVCache(cfg, math.ceil(context / BLOCK_SIZE), BLOCK_SIZE, kv_dtype)
    all_ids = torch.tensor(ids, dtype=torch.int64)
    total_nll, scored, windows, run_tokens = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)       # first target index this window scores
        if first < end:
            tokens = all_ids[begin:end]
            length = end - begin
            rows = torch.arange(first - begin - 1, end - begin - 1)    # logits row r predicts token begin+r+1
            h_rows = torch.arange(length)
            batch = AttentionBatch.build([(length, length, slice(0, length))])
            logits_all = model.forward(tokens, h_rows, batch, cache, rows)
            for r0 in range(0, len(rows), _LOGIT_ROWS):
                lg = logits_all[r0:r0 + _LOGIT_ROWS].float()
                tgt = all_ids[first + r0: first + r0 + lg.shape[0]]
                lp = torch.log_softmax(lg, dim=-1).gather(1, tgt[:, None])
                total_nll -= float(lp.sum())
            scored += len(rows)
            run_tokens += length
            windows += 1
            if progress:
                progress(scored, n - 1)
        prev_end = end
        if end == n:
            break
    secs = time.perf_counter() - t0
    nll = total_nll / scored
    return PerplexityResult(math.exp(nll), nll, scored, windows, context, stride, secs, run_tokens / secs)


def greedy_continuations(loaded, prompts: list[list[int]], n_tokens: int = 32, kv_dtype="fp32",
                         batch: int = 8) -> list[list[int]]:
    """Greedy continuations (``n_tokens`` each, end-of-sequence ignored) of tokenised prompts,
    generated by the engine (the served path) ``batch`` sequences at a time."""
    from edgellm.kv.cache import BLOCK_SIZE, KVCache
    from edgellm.runtime.engine import Engine
    from edgellm.sampling import SamplingParams

    cfg = loaded.config
    longest = max(len(p) for p in prompts) + n_tokens
    if longest > cfg.context_length:
        raise InvalidParameterError("a prompt plus the continuation exceeds the context window",
                                    "use shorter prompts or fewer tokens")
    blocks = batch * math.ceil(longest / BLOCK_SIZE)
    engine = Engine(loaded, kv_memory=blocks * KVCache.bytes_per_block(cfg, BLOCK_SIZE, kv_dtype), host_memory=0,
                    max_batch_seqs=batch, kv_dtype=kv_dtype)
    try:
        results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True))
    finally:
        engine.close()
    return [r.token_ids for r in results]


@torch.inference_mode()
def teacher_forced_top1(model, cfg, prompts: list[list[int]], references: list[list[int]], kv_dtype="fp32") -> float:
    """Fraction of positions where the model's greedy choice, given the reference history, is
    the reference token."""
    from edgellm.kv.cache import BLOCK_SIZE, KVCache
    from edgellm.layers.attention import AttentionBatch

    same = total = 0
    for p, ref in zip(prompts, references):
        ids = p + ref[:-1]
        n = len(ids)
        cache = KVCache(cfg, math.ceil(n / BLOCK_SIZE), BLOCK_SIZE, kv_dtype)
        rows = torch.arange(len(p) - 1, n)
        logits = model.forward(torch.tensor(ids), torch.arange(n), AttentionBatch.build([(n, n, slice(0, n))]),
                               cache, rows)
        pred = logits.argmax(dim=-1)
        same += int((pred == torch.tensor(ref)).sum())
        total += len(ref)
    return same / total


def match_fraction(candidates: list[list[int]], references: list[list[int]]) -> float:
    same = sum(a == b for c, r in zip(candidates, references) for a, b in zip(c, r))
    return same / sum(len(r) for r in references)


def agreement(loaded, prompts: list[list[int]], references: list[list[int]], kv_dtype="fp32") -> dict:
    """Agreement of ``loaded`` (a LoadedModel) with reference (fp32) greedy continuations of ``prompts``."""
    n_tokens = len(references[0])
    t0 = time.perf_counter()
    cand = greedy_continuations(loaded, prompts, n_tokens, kv_dtype)
    return {"agreement": match_fraction(cand, references),
            "top1_agreement": teacher_forced_top1(loaded.model, loaded.config, prompts, references, kv_dtype),
            "prompts": len(prompts), "tokens_per_prompt": n_tokens, "seconds": time.perf_counter() - t0,
            "continuations": cand}


# --------------------------------------------------------------------------------------------
# speed and memory

def measure_speed(loaded, kv_dtype="fp32", prompt_ids: list[int] | None = None, prompt_tokens: int = 128,
                  gen_tokens: int = 64, repeats: int = 3) -> dict:
    """Medians over ``repeats`` runs of ``LLM.generate`` (after one warm-up run)."""
    from edgellm.llm import LLM
    from edgellm.sampling import SamplingParams

    if prompt_ids is None:
        prompt_ids = loaded.tokenizer.encode(read_corpus())
    ids = list(prompt_ids[:prompt_tokens])
    llm = LLM(loaded=loaded, kv_dtype=kv_dtype)
    params = SamplingParams(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
    runs = []
    llm.generate(ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    for _ in range(repeats):
        c = llm.generate(ids, params)
        runs.append((c.prefill_tok_s, c.decode_tok_s))
    return {"prefill_tok_s": statistics.median(r[0] for r in runs),
            "decode_tok_s": statistics.median(r[1] for r in runs),
            "runs": runs, "prompt_tokens": len(ids), "gen_tokens": gen_tokens, "threads": torch.get_num_threads()}


def interleaved_speed(models: dict, kv_dtypes: dict, prompt_ids: list[int], prompt_tokens: int = 128,
                      gen_tokens: int = 64, rounds: int = 5, log=None) -> dict:
    """Prefill/decode tokens/s of several configurations measured in turns (round r times every
    configuration once before round r + 1), so that a change in the machine's load falls on all
    of them alike. ``models``: {label: LoadedModel}; ``kv_dtypes``: {label: kv dtype}.
    Returns {label: {"prefill_tok_s", "decode_tok_s" (medians), "runs"}}."""
    from edgellm.llm import LLM
    from edgellm.sampling import SamplingParams

    ids = list(prompt_ids[:prompt_tokens])
    llms = {label: LLM(loaded=m, kv_dtype=kv_dtypes.get(label, "fp32")) for label, m in models.items()}
    params = SamplingParams(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
    for llm in llms.values():                        # warm-up: first calls allocate and compile
        llm.generate(ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in llms}
    for r in range(rounds):
        for label, llm in llms.items():
            c = llm.generate(ids, params)
            runs[label].append((c.prefill_tok_s, c.decode_tok_s))
        if log:
            log(f"round {r + 1}/{rounds} done")
    return {label: {"prefill_tok_s": statistics.median(x[0] for x in v),
                    "decode_tok_s": statistics.median(x[1] for x in v), "runs": v} for label, v in runs.items()}
