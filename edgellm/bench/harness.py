"""The parent side of `edgellm bench`: workers, interleaved repeats, medians, ratios, the ceiling.

Each engine runs in its own worker process (:mod:`edgellm.bench.worker`), loaded once and warmed
up once. The repeats are interleaved: round ``i`` asks every engine (and the bandwidth probe) for
one measurement before round ``i + 1`` asks any, and the order inside a round rotates, so that a
burst of load from other jobs on the machine falls on all engines alike. Figures are medians over
the rounds; a ratio is ours / peer of those medians (the per-round paired ratios' median is in the
JSON too).

Decode ceiling = memory bandwidth / bytes read per decode step, where the bandwidth is the median
of the probe's rounds (copy of a 256 MiB float32 tensor, bytes read + written per second, at the
benchmark's thread count) and the bytes per step are all the weights (read once per token; a
tied embedding counts once, as the lm_head) plus the KV cache (in its --kv-dtype) at the mean decode context.

This module imports no torch: the workers do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import edgellm.errors as errors_mod
from edgellm.errors import EdgeLLMError, InvalidParameterError
from edgellm.runtime.scheduler import common_prefix

OURS = "ours"
MEMBW = "membw"
# peer name -> (module that must be importable, how to install it)
PEERS = {
    "transformers": ("transformers", "pip install 'transformers>=4.46' gguf  (or: pip install -e '.[reference]')"),
    "llama.cpp": ("llama_cpp", "pip install llama-cpp-python  (compiles llama.cpp: takes minutes)"),
    # ours again with int8 activations (--activations int8), the exact path's opt-in fast mode
    "ours-int8": ("edgellm", "nothing to install: it is edgellm"),
    # ours again with bf16 prefill (--dtype bfloat16), the other opt-in fast mode
    "ours-bf16": ("edgellm", "nothing to install: it is edgellm"),
}
PEER_ALIASES = {"transformers": "transformers", "hf": "transformers", "huggingface": "transformers",
                "llama.cpp": "llama.cpp", "llamacpp": "llama.cpp", "llama_cpp": "llama.cpp",
                "llama-cpp": "llama.cpp", "llama-cpp-python": "llama.cpp", "ours-int8": "ours-int8", "int8": "ours-int8",
                "ours-bf16": "ours-bf16", "bf16": "ours-bf16"}
# Figures of one generation that get medians (and ratios: tok/s higher is better, the rest lower).
METRICS = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "run_peak_rss_mb", "prefill_s", "decode_s", "rss_mb", "cpu_share", "others_cores")
HIGHER_IS_BETTER = ("prefill_tok_s", "decode_tok_s")
RATIO_METRICS = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb")

find_spec = importlib.util.find_spec   # module-level so that tests can pretend a peer is missing


@dataclass
class BenchOptions:
    model: str | None = None
    prompt_tokens: int = 512
    gen_tokens: int = 128
    threads: int = 2
    repeat: int = 5
    dtype: str = "auto"
    peers: list[str] = field(default_factory=list)
    profile_steps: int | None = None        # None: no profile
    weights: str | None = None              # ours: convert the weights at load time (--weights)
    keep: str = ""                          # ours: comma-separated --keep patterns
    kv_dtype: str = "fp32"                  # ours: KV cache precision
    pipeline: int = 1                       # ours: pipeline-parallel ranks (threads // ranks each)
    tensor: int = 1                         # ours: tensor-parallel ranks
    activations: str = "fp32"               # ours: fp32 (exact) or int8 activations


# ---------------------------------------------------------------------------------------------
# input checks (before any process starts; the context-window check is the ours worker's)
# ---------------------------------------------------------------------------------------------
def parse_peers(spec: str | None) -> list[str]:
    if not spec:
        return []
    out: list[str] = []
    for raw in spec.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name not in PEER_ALIASES:
            raise InvalidParameterError(f"unknown peer {raw.strip()!r} in --peers",
                                        "use one or more of: " + ", ".join(PEERS) + " (comma-separated)")
        if PEER_ALIASES[name] not in out:
            out.append(PEER_ALIASES[name])
    return out


def validate(opts: BenchOptions) -> None:
    def positive(flag: str, value: int, fix: str) -> None:
        if value < 1:
            raise InvalidParameterError(f"{flag} must be at least 1, got {value}", fix)

    positive("--prompt-tokens", opts.prompt_tokens, "pass a prompt length of 1 or more tokens, e.g. 512")
    positive("--gen-tokens", opts.gen_tokens, "generate 1 or more tokens, e.g. 128")
    positive("--repeat", opts.repeat, "repeat at least once, e.g. --repeat 5")
    positive("--threads", opts.threads, "pass a positive thread count, e.g. --threads 2")
    if opts.profile_steps is not None and opts.pipeline * opts.tensor > 1:
        raise InvalidParameterError("--profile-decode traces one process; it does not go with a split model",
                                    "drop --profile-decode, or --pipeline-parallel/--tensor-parallel")
    if opts.profile_steps is not None and opts.profile_steps < 1:
        raise InvalidParameterError(f"--profile-decode must time at least 1 step, got {opts.profile_steps}",
                                    "pass a positive number of steps, or no number to time --gen-tokens steps")
    for p in opts.peers:
        if p not in PEERS:
            raise InvalidParameterError(f"unknown peer {p!r}", "use one or more of: " + ", ".join(PEERS))


# ---------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------
class WorkerFailed(Exception):
    def __init__(self, engine: str, msg: dict, stderr_tail: str):
        super().__init__(msg.get("problem", "worker failed"))
        self.engine, self.msg, self.stderr_tail = engine, msg, stderr_tail


class Worker:
    """One engine in a subprocess, spoken to in JSON lines."""

    def __init__(self, engine: str, args: list[str], threads: int):
        self.engine = engine
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgellm.bench.worker", "--engine", engine, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, encoding="utf-8", env=env)
        self.ready: dict | None = None

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            self.stderr.flush()
            self.stderr.seek(0)
            return "".join(self.stderr.readlines()[-lines:])
        except (OSError, ValueError):
            return ""

    def receive(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                problem = f"the {self.engine} worker exited (status {self.proc.returncode})"
                if self.proc.returncode == -signal.SIGILL:
                    problem += (": an illegal instruction -- the engine was compiled for CPU features this "
                                "machine (or its VM) does not enable; for llama.cpp rebuild it portable: "
                                "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' "
                                "pip install --force-reinstall --no-cache-dir llama-cpp-python")
                raise WorkerFailed(self.engine, {"kind": "crash", "problem": problem}, self.stderr_tail())
            line = line.strip()
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if msg.get("event") == "error":
                self.proc.wait()
                raise WorkerFailed(self.engine, msg, self.stderr_tail())
            return msg

    def wait_ready(self) -> dict:
        self.ready = self.receive()
        return self.ready

    def ask(self, cmd: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass   # receive() reports the exit
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def as_user_error(err: WorkerFailed) -> EdgeLLMError:
    """An input problem found by a worker, re-raised here as the same EdgeLLMError class."""
    kind = err.msg.get("kind", "crash")
    cls = getattr(errors_mod, kind, None)
    if isinstance(cls, type) and issubclass(cls, EdgeLLMError):
        return cls(err.msg.get("problem", ""), err.msg.get("fix"))
    tail = err.stderr_tail.strip()
    return EdgeLLMError(f"the {err.engine} worker failed: {err.msg.get('problem')}" + (f"\n{tail}" if tail else ""),
                        "this is a bug in the benchmark or the engine; the lines above are the worker's stderr")


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rotated(rounds: list[str], i: int) -> list[str]:
    """Round ``i``'s order of the engines: each round starts one engine later, so that no engine
    always runs first (or right after the same neighbour) on a machine whose load drifts."""
    k = i % len(rounds)
    return rounds[k:] + rounds[:k]


def write_prompt_file(ids: list[int], prefix: str) -> str:
    """The prompt's token ids in a temporary JSON file, for peer workers (delete with close_all)."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(ids, f)
    return path


def close_all(workers: dict[str, Worker], prompt_file: str | None) -> None:
    """End every worker and delete the prompt file (the end of a run, however it ended)."""
    for w in workers.values():
        w.close()
    if prompt_file:
        try:
            os.unlink(prompt_file)
        except OSError:      # already gone: nothing to clean
            pass


def run_bench(opts: BenchOptions, log: Callable[[str], None] | None = None) -> dict:
    """Run the whole benchmark; returns the summary (the ``--json`` object)."""
    log = log or (lambda s: None)
    validate(opts)
    peer_status: dict[str, dict] = {}
    for p in opts.peers:
        module, install = PEERS[p]
        if find_spec(module) is None:
            peer_status[p] = {"status": "skipped", "reason": f"Python package {module} is not installed",
                              "install": install}
    load_start = loadavg()
    common = ["--threads", str(opts.threads), "--prompt-tokens", str(opts.prompt_tokens),
              "--gen-tokens", str(opts.gen_tokens)]
    workers: dict[str, Worker] = {}
    prompt_file = None
    try:
        log(f"loading ours ({opts.model or 'default model'}) and the bandwidth probe ...")
        ours_args = common + ["--dtype", opts.dtype, "--kv-dtype", opts.kv_dtype] + \
            (["--model", opts.model] if opts.model else []) + (["--weights", opts.weights] if opts.weights else []) + \
            (["--keep", opts.keep] if opts.keep else []) + ["--activations", opts.activations] + \
            ["--pipeline-parallel", str(opts.pipeline), "--tensor-parallel", str(opts.tensor)]
        workers[OURS] = Worker(OURS, ours_args, opts.threads)
        workers[MEMBW] = Worker(MEMBW, common, opts.threads)
        try:
            ours_info = workers[OURS].wait_ready()["info"]
        except WorkerFailed as err:
            raise as_user_error(err) from None
        prompt = ours_info.pop("prompt_ids")
        prompt_file = write_prompt_file(prompt, "edgellm-bench-")
        runnable = [p for p in opts.peers if p not in peer_status]
        for p in runnable:
            log(f"loading {p} ...")
            workers[p] = Worker(p, common + ["--model-path", ours_info["model_path"], "--prompt-file", prompt_file],
                                opts.threads)
        try:
            workers[MEMBW].wait_ready()
        except WorkerFailed as err:
            raise as_user_error(err) from None
        peer_info: dict[str, dict] = {}
        for p in runnable:
            try:
                peer_info[p] = workers[p].wait_ready()["info"]
            except WorkerFailed as err:
                peer_status[p] = peer_failure(err)
                workers.pop(p).close()
                log(f"{p}: failed to start: {peer_status[p]['reason']}")

        engines = [OURS] + [p for p in runnable if p in workers]
        rounds = [MEMBW] + engines
        samples: dict[str, list[dict]] = {e: [] for e in rounds}
        for i in range(opts.repeat):
            for e in rotated(rounds, i):
                if e not in workers:
                    continue
                try:
                    r = workers[e].ask({"cmd": "run"})
                except WorkerFailed as err:
                    if e in (OURS, MEMBW):
                        raise as_user_error(err) from None
                    peer_status[e] = peer_failure(err)
                    workers.pop(e).close()
                    log(f"{e}: failed: {peer_status[e]['reason']}")
                    continue
                samples[e].append(r)
                log(_progress(i, opts.repeat, e, r))

        profile = None
        if opts.profile_steps is not None:
            log(f"profiling {opts.profile_steps} decode steps of ours ...")
            try:
                profile = workers[OURS].ask({"cmd": "profile", "steps": opts.profile_steps})
            except WorkerFailed as err:
                raise as_user_error(err) from None
            profile.pop("event", None)
    finally:
        close_all(workers, prompt_file)
    summary = summarize(opts, ours_info, samples, peer_info, peer_status, profile)
    summary["machine"] = {"cpu_count": os.cpu_count(), "loadavg_1min_start": load_start,
                          "loadavg_1min_end": loadavg(),
                          # inherited by every worker; OMP_WAIT_POLICY changes how OpenMP threads wait
                          "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "EDGELLM_NATIVE")
                                  if k in os.environ}}
    return summary


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def peer_failure(err: WorkerFailed) -> dict:
    reason = err.msg.get("problem") or "failed"
    out = {"status": "failed", "reason": reason}
    if err.msg.get("fix"):
        out["fix"] = err.msg["fix"]
    tail = err.stderr_tail.strip()
    if tail:
        out["stderr_tail"] = tail
    return out


def _progress(i: int, n: int, engine: str, r: dict) -> str:
    if engine == MEMBW:
        return f"[{i + 1}/{n}] memory bandwidth {r['bandwidth_gb_s']:.1f} GB/s"
    line = (f"[{i + 1}/{n}] {engine:<12} prefill {r['prefill_tok_s']:8.1f} tok/s  decode {r['decode_tok_s']:7.1f} tok/s"
            f"  TTFT {r['ttft_s']:.3f} s  peak RSS {r['peak_rss_mb']:.0f} MB  other jobs {r.get('others_cores', 0):.1f} cores")
    steps = r.get("decode_steps_by_threads") or {}
    if any(int(t) != r.get("decode_max_threads") for t in steps):   # the contention fallback ran
        line += "  decode steps by threads " + ", ".join(f"{t}: {k}" for t, k in steps.items())
    return line


def _medians(runs: list[dict]) -> dict:
    out = {m: median([r[m] for r in runs if m in r]) for m in METRICS}
    for extra in ("internal_prefill_tok_s", "internal_decode_tok_s"):
        vals = [r[extra] for r in runs if extra in r]
        if vals:
            out[extra] = median(vals)
    return out


def summarize(opts: BenchOptions, info: dict, samples: dict[str, list[dict]], peer_info: dict[str, dict],
              peer_status: dict[str, dict], profile: dict | None) -> dict:
    ours_runs = samples[OURS]
    ours = _medians(ours_runs)
    bw_runs = [r["bandwidth_gb_s"] for r in samples[MEMBW]]
    bandwidth = median(bw_runs)
    mean_context = opts.prompt_tokens + opts.gen_tokens / 2
    kv_bytes = info.get("kv_bytes_mean_context", info["kv_bytes_per_token"] * mean_context)
    step_bytes = info["weight_bytes"] + kv_bytes
    ceiling = bandwidth * 1e9 / step_bytes
    ours_tokens = ours_runs[-1]["token_ids"] if ours_runs else []

    def fraction(decode_tok_s: float) -> float:
        return decode_tok_s / ceiling if ceiling > 0 else float("nan")

    peers: dict[str, dict] = {}
    for p in opts.peers:
        if p in peer_status:
            peers[p] = peer_status[p]
            continue
        runs = samples.get(p, [])
        med = _medians(runs)
        ratio, paired = {}, {}
        for m in RATIO_METRICS:
            ratio[m] = ours[m] / med[m] if med[m] else float("nan")
            pairs = [a[m] / b[m] for a, b in zip(ours_runs, runs) if b[m]]
            paired[m] = median(pairs)
        peers[p] = {"status": "ok", **med, "ceiling_fraction": fraction(med["decode_tok_s"]),
                    "ratio": ratio, "paired_ratio": paired, "repeats": len(runs),
                    "same_tokens_as_ours": common_prefix(ours_tokens, runs[-1]["token_ids"]) if runs else 0,
                    "info": peer_info.get(p, {})}

    summary = {
        "model": {k: info[k] for k in ("model_name", "model_path", "model_kind", "architecture", "file_bytes",
                                       "weight_bytes", "weight_formats", "lm_head_format", "tied_embeddings",
                                       "dtype", "kv_dtype", "n_layers", "context_length", "kv_bytes_per_token")},
        "settings": {"prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens, "threads": opts.threads,
                     "pipeline_parallel": opts.pipeline, "tensor_parallel": opts.tensor,
                     "repeat": opts.repeat, "prompt_source": info["prompt_source"],
                     "warmup": "one generation per worker (full prompt, up to 8 tokens), not counted"},
        **ours,
        "ceiling_fraction": fraction(ours["decode_tok_s"]),
        "decode_ceiling_tok_s": ceiling,
        "memory_bandwidth_gb_s": bandwidth,
        "bytes_per_decode_step": step_bytes,
        "kv_bytes_at_mean_context": kv_bytes,
        "mean_decode_context": mean_context,
        "baseline_rss_mb": info["baseline_rss_mb"],
        "memory_budget_mb": (1.5 * info["file_bytes"] + info.get(
            "kv_bytes_run", info["kv_bytes_per_token"] * (opts.prompt_tokens + opts.gen_tokens))) / 2**20,
        "memory": memory_breakdown(info, ours.get("run_peak_rss_mb", ours["peak_rss_mb"]),
                                   opts.prompt_tokens + opts.gen_tokens),
        "repeats": {e: [{k: v for k, v in r.items() if k not in ("event", "token_ids")} for r in rs]
                    for e, rs in samples.items() if e in (OURS, MEMBW)},
        "peers": peers,
    }
    if profile is not None:
        summary["profile"] = profile
    return summary


def memory_breakdown(info: dict, run_peak_mb: float, tokens: int) -> dict:
    """Where the peak RSS of our runs goes (MiB): the bare process, the weights, the rest of
    loading (tokenizer, RoPE tables, library code pages), the KV cache of one run, and what
    generation adds on top (activations, allocator slack). ``run_peak_mb``: the peak after
    loading (VmHWM reset once the model was loaded); loading's own peak is reported beside it.
    The budget of the issue counts from the bare process."""
    if "loaded_rss_mb" not in info:
        return {}
    weights = info["weight_bytes"] / 2**20
    kv = info.get("kv_bytes_run", info["kv_bytes_per_token"] * tokens) / 2**20
    base, loaded = info["baseline_rss_mb"], info["loaded_rss_mb"]
    return {"runtime_mb": base, "weights_mb": weights, "other_load_mb": loaded - base - weights, "kv_mb": kv,
            "generation_mb": run_peak_mb - loaded - kv, "run_peak_mb": run_peak_mb,
            "load_peak_mb": info["load_peak_rss_mb"], "over_runtime_mb": run_peak_mb - base}


# ---------------------------------------------------------------------------------------------
# the text report
# ---------------------------------------------------------------------------------------------
def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MB"


def _rng(runs: list[dict], m: str, fmt: str) -> str:
    vals = [r[m] for r in runs if m in r]
    if len(vals) < 2:
        return ""
    return f"[{format(min(vals), fmt)}-{format(max(vals), fmt)}]"


def format_report(s: dict, out: TextIO) -> None:
    m, st = s["model"], s["settings"]
    w = out.write
    w(f"edgellm bench: {m['model_name']} ({Path(m['model_path']).name}), {m['architecture']}, "
      f"{m['n_layers']} layers\n")
    w(f"  weights {_mb(m['weight_bytes'])} in memory ({', '.join(m['weight_formats'])}; lm_head "
      f"{m['lm_head_format']}{', tied' if m['tied_embeddings'] else ''}), file {_mb(m['file_bytes'])}, "
      f"compute dtype {m['dtype']}, KV cache {m.get('kv_dtype', 'fp32')}\n")
    w(f"  prompt {st['prompt_tokens']} tokens ({st['prompt_source']}, our tokenizer, same ids for every engine), "
      f"{st['gen_tokens']} generated tokens (greedy, EOS ignored), {st['threads']} threads, "
      f"median of {st['repeat']} interleaved repeats after one warm-up\n")
    ranks = st.get("pipeline_parallel", 1) * st.get("tensor_parallel", 1)
    if ranks > 1:       # ours split across local ranks: the threads are shared out among them
        kind = "pipeline" if st["pipeline_parallel"] > 1 else "tensor"
        w(f"  ours on {ranks} {kind}-parallel ranks, {max(1, st['threads'] // ranks)} thread(s) each; "
          f"weights and peak RSS are rank 0's\n")
    w("\n")

    runs = s["repeats"][OURS]
    rows = [("ours", s, runs)]
    for name, p in s["peers"].items():
        if p.get("status") == "ok":
            rows.append((name, p, None))
    w(f"  {'engine':<13}{'prefill tok/s':>14}{'decode tok/s':>14}{'TTFT s':>10}{'peak RSS MB':>13}"
      f"{'of ceiling':>12}{'other jobs':>12}\n")
    for name, r, _ in rows:
        w(f"  {name:<13}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>14.1f}{r['ttft_s']:>10.3f}"
          f"{r['peak_rss_mb']:>13.0f}{100 * r['ceiling_fraction']:>11.1f}%{r.get('others_cores') or 0:>7.1f} cores\n")
    if len(runs) > 1:
        w(f"  {'ours min-max':<13}{_rng(runs, 'prefill_tok_s', '.0f'):>14} {_rng(runs, 'decode_tok_s', '.1f'):>13} "
          f"{_rng(runs, 'ttft_s', '.2f'):>9}\n")
    for name, p in s["peers"].items():
        if p.get("status") == "skipped":
            w(f"  {name:<13}skipped: {p['reason']}; install with: {p['install']}\n")
        elif p.get("status") == "failed":
            w(f"  {name:<13}failed: {p['reason']}\n")
            if p.get("fix"):
                w(f"  {'':<13}fix: {p['fix']}\n")
    ok = [(n, p) for n, p in s["peers"].items() if p.get("status") == "ok"]
    if ok:
        w(f"\n  {'ours / peer':<13}{'prefill tok/s':>14}{'decode tok/s':>14}{'TTFT':>10}{'peak RSS':>13}"
          f"{'same greedy tokens':>21}\n")
        for name, p in ok:
            r = p["ratio"]
            w(f"  {name:<13}{r['prefill_tok_s']:>13.2f}x{r['decode_tok_s']:>13.2f}x{r['ttft_s']:>9.2f}x"
              f"{r['peak_rss_mb']:>12.2f}x{p['same_tokens_as_ours']:>14d} of {st['gen_tokens']}\n")
        w("  (tok/s ratios above 1: ours faster; TTFT and RSS ratios below 1: ours better)\n")
        for name, p in ok:
            if "internal_decode_tok_s" in p:
                w(f"  ({name}'s own perf counters: prefill {p['internal_prefill_tok_s']:.1f} tok/s, "
                  f"decode {p['internal_decode_tok_s']:.1f} tok/s)\n")

    w(f"\n  memory bandwidth {s['memory_bandwidth_gb_s']:.2f} GB/s (copy of a 256 MiB float32 tensor, bytes "
      f"read + written, {st['threads']} threads, median over rounds {_rng(s['repeats'][MEMBW], 'bandwidth_gb_s', '.1f')})\n")
    w(f"  bytes read per decode step {_mb(s['bytes_per_decode_step'])} = weights {_mb(m['weight_bytes'])} + "
      f"{s.get('model', {}).get('kv_dtype', 'fp32')} KV {_mb(s['kv_bytes_at_mean_context'])} at the mean context of {s['mean_decode_context']:.0f} tokens\n")
    w(f"  decode ceiling {s['decode_ceiling_tok_s']:.1f} tok/s; ours reaches {100 * s['ceiling_fraction']:.1f}% of it\n")
    w(f"  peak RSS {s['peak_rss_mb']:.0f} MB (the bare Python + torch process: {s['baseline_rss_mb']:.0f} MB; "
      f"1.5 x file + KV cache = {s['memory_budget_mb']:.0f} MB)\n")
    mem = s.get("memory")
    if mem:
        w(f"  peak RSS of the runs {mem['run_peak_mb']:.0f} MB = runtime {mem['runtime_mb']:.0f} + weights {mem['weights_mb']:.0f} + tokenizer, RoPE tables and "
          f"library pages {mem['other_load_mb']:.0f} + KV {mem['kv_mb']:.0f} + activations and allocator slack "
          f"{mem['generation_mb']:.0f} MB: {mem['over_runtime_mb']:.0f} MB over the bare process "
          f"(budget {s['memory_budget_mb']:.0f}); loading peaked at {mem['load_peak_mb']:.0f} MB\n")

    mach = s.get("machine") or {}
    if mach.get("loadavg_1min_start") is not None:
        w(f"  machine: {mach['cpu_count']} cores, 1-minute load average {mach['loadavg_1min_start']:.2f} at the start, "
          f"{mach['loadavg_1min_end']:.2f} at the end; 'other jobs': cores the rest of the machine kept busy "
          f"during the timed runs (median), the noise in these figures\n")
        if mach.get("env"):
            w("  environment: " + " ".join(f"{k}={v}" for k, v in mach["env"].items()) + "\n")

    prof = s.get("profile")
    if prof and prof.get("steps"):
        f = prof["fractions"]
        w(f"\n  where a decode step's time goes (ours, {prof['steps']} steps at context "
          f"{prof['context_first']}-{prof['context_last']}, timers on):\n")
        w(f"    forward pass median {prof['step_ms_median']:.2f} ms; whole token (with the greedy pick, "
          f"detokenisation, loop) mean {prof['token_ms_mean']:.2f} ms\n")
        w(f"    matrix-multiply kernels {100 * f['matmul']:5.1f}%  ({prof['matmul_ms_median']:.2f} ms median, "
          f"{prof['matmul_calls_per_step']} calls/step; lm_head alone {100 * f['lm_head']:.1f}%)\n")
        w(f"    attention               {100 * f['attention']:5.1f}%  ({prof['attention_ms_median']:.2f} ms median: "
          f"the model's attention call: {', '.join(prof.get('attention_functions', []))}, "
          f"with RoPE and the KV write where fused into it)\n")
        if f.get("native_blocks"):
            w(f"    fused native blocks     {100 * f['native_blocks']:5.1f}%  ({prof['blocks_ms_median']:.2f} ms median: "
              f"all transformer blocks in one C++ call -- their matmuls, norms, RoPE, KV write, attention)\n")
        w(f"    rest of the forward     {100 * f['other_in_forward']:5.1f}%  ({prof['other_ms_median']:.2f} ms median: "
          f"Python, norms, SiLU, embedding, small tensors)\n")
        w(f"    outside the forward     {100 * f['outside_forward']:5.1f}%  (greedy pick, detokenisation, stop checks)\n")
