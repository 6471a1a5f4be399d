"""`edgellm serve`: the OpenAI-compatible HTTP server (see docs/serving.md)."""

from __future__ import annotations

import argparse
import os

from edgellm.cli.common import (
    add_model_arguments,
    add_parallel_arguments,
    add_precision_arguments,
    add_speculative_arguments,
    check_precision,
    speculative_config,
    start_split,
)
from edgellm.util import pause_gc_for_startup, resume_gc_after_startup

HELP = ("serve a model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions with structured output "
        "and tool calls, /v1/embeddings), a sessions API, Prometheus metrics (/metrics, vLLM's names too) and a "
        "live page (/)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_precision_arguments(p)
    add_speculative_arguments(p)
    add_parallel_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics; repeat for several clients, "
                        "each seeing only its own sessions (default: $EDGELLM_API_KEY, else none)")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without the API key (with --api-key it needs the key by default)")
    p.add_argument("--max-sessions", type=int, default=256, metavar="N",
                   help="most live sessions (POST /v1/sessions); beyond it 429 with Retry-After (default 256)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the model's registry name "
                        "or file name)")
    p.add_argument("--kv-memory", default="256MB", metavar="SIZE",
                   help="KV cache pool size, e.g. 512MB or 2GB (default 256MB); a larger load queues, "
                        "preempts or offloads")
    p.add_argument("--state-snapshots", type=int, default=None, metavar="N",
                   help="recurrent models (Mamba, RWKV) only: most prompt-prefix state snapshots kept in the "
                        "--kv-memory pool for reuse (default: a quarter of its states; 0: none)")
    p.add_argument("--host-memory", default=None, metavar="SIZE",
                   help="host-memory budget for KV offloaded out of the pool (default: as large as the pool)")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="the disk tier: KV of idle sessions that the host budget cannot hold is written here "
                        "(created if missing; default: no disk tier)")
    p.add_argument("--preemption", default="recompute", choices=["recompute", "swap"],
                   help="when the KV pool runs out, a preempted sequence's KV is dropped and recomputed later "
                        "(recompute, the default) or copied to host memory and back (swap)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="most completions in flight (running or waiting); beyond it requests get 429 "
                        "with Retry-After (default 256)")
    p.add_argument("--max-batch-tokens", type=int, default=512,
                   help="tokens per engine step (decode rows + prefill chunks; default 512)")
    p.add_argument("--max-body", default="1MB", metavar="SIZE",
                   help="largest request body accepted; larger ones get 413 (default 1MB)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="cancel a generation not finished this long after it was accepted and answer 504 "
                        "(a stream ends with an error event) (default 600; 0: no limit)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request's headers (from the connection or the previous response), then its body, "
                        "not received within this long get 408 (default 30; 0: no limit)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="close idle keep-alive connections after this long (default 5)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (any port). Without --api-key on a "
                        "loopback address only localhost, 127.0.0.1 and [::1] are answered (403 otherwise), "
                        "against DNS rebinding; giving --allow-host turns that check on for any address")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://app.example:8080, or * for any) call the API "
                        "from a browser (CORS); repeatable (default: none)")
    p.add_argument("--session-idle-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="retire sessions idle this long (default 1800; 0 keeps them)")
    p.add_argument("--log-stats-interval", type=float, default=10.0, metavar="SECONDS",
                   help="log one line of throughput, queue and KV use this often while requests run "
                        "(default 10; 0: never)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default info)")


def run(args: argparse.Namespace) -> int:
    from edgellm.errors import InvalidParameterError
    from edgellm.util import parse_size

    if not 0 < args.port < 65536:
        raise InvalidParameterError(f"--port must be between 1 and 65535, got {args.port}", "pass e.g. --port 8000")
    if args.max_queue < 1:
        raise InvalidParameterError(f"--max-queue must be at least 1, got {args.max_queue}", "pass e.g. --max-queue 256")
    if args.max_sessions < 1:
        raise InvalidParameterError(f"--max-sessions must be at least 1, got {args.max_sessions}",
                                    "pass e.g. --max-sessions 256")
    for flag, value in (("--request-timeout", args.request_timeout), ("--body-timeout", args.body_timeout)):
        if not value >= 0:
            raise InvalidParameterError(f"{flag} must be >= 0 seconds, got {value}",
                                        f"pass e.g. {flag} 600 (0: no limit)")
    if not args.keep_alive_timeout > 0:
        raise InvalidParameterError(f"--keep-alive-timeout must be > 0 seconds, got {args.keep_alive_timeout}",
                                    "pass e.g. --keep-alive-timeout 5")
    if any(not h.strip() or "/" in h for h in args.allow_host):
        raise InvalidParameterError(f"--allow-host takes a host name, got {args.allow_host!r}",
                                    "pass e.g. --allow-host my-box.local")
    if not args.log_stats_interval >= 0:
        raise InvalidParameterError(f"--log-stats-interval must be >= 0 seconds, got {args.log_stats_interval}",
                                    "pass e.g. --log-stats-interval 10 (0: never)")
    if args.session_idle_timeout < 0:
        raise InvalidParameterError(f"--session-idle-timeout must be >= 0, got {args.session_idle_timeout}",
                                    "pass e.g. --session-idle-timeout 1800 (0 keeps idle sessions)")
    if args.state_snapshots is not None and args.state_snapshots < 0:
        raise InvalidParameterError(f"--state-snapshots must be >= 0, got {args.state_snapshots}",
                                    "pass e.g. --state-snapshots 64 (0: no prefix reuse for a recurrent model)")
    check_precision(args)       # --weights/--keep/--kv-dtype, before the model is loaded
    speculative = speculative_config(args)
    if args.offload_dir is not None:
        from pathlib import Path

        offload = Path(args.offload_dir)
        if offload.exists() and not offload.is_dir():
            raise InvalidParameterError(f"--offload-dir {args.offload_dir!r} exists and is not a folder",
                                        "pass a folder (it is created if missing), e.g. --offload-dir /tmp/edgellm-kv")
        try:
            offload.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InvalidParameterError(f"--offload-dir {args.offload_dir!r} cannot be created ({err.strerror})",
                                        "pass a folder this user may write, e.g. --offload-dir /tmp/edgellm-kv") from None
    api_keys = args.api_key
    if api_keys is None and os.environ.get("EDGELLM_API_KEY") is not None:
        api_keys = [os.environ["EDGELLM_API_KEY"]]
    from edgellm.serve.app import (
        check_api_keys,
        check_cors_origins,
        create_app,
        default_allowed_hosts,
        header_timeout_protocol,
    )
    api_keys = check_api_keys(api_keys)     # refuses empty keys and keys padded with whitespace
    cors_origins = check_cors_origins(args.cors_origin)
    max_body = parse_size(args.max_body, "--max-body")
    if max_body < 1024:
        raise InvalidParameterError(f"--max-body {args.max_body!r} is under 1 KiB", "pass e.g. --max-body 1MB")

    import uvicorn

    pause_gc_for_startup()   # until the model is loaded (edgellm.util says why)
    from edgellm.llm import LLM
    from edgellm.runtime.engine import Engine

    split = start_split(args)       # a model split across ranks, or None (this process alone)
    llm = LLM(args.model, dtype=args.dtype, threads=args.threads, weights=args.weights, keep=args.keep,
              kv_dtype=args.kv_dtype, speculative=speculative, parallel=split, activations=args.activations)
    resume_gc_after_startup()   # a split model is not loaded by load_model
    engine = Engine(llm, kv_memory=args.kv_memory, host_memory=args.host_memory,
                    max_batch_tokens=args.max_batch_tokens, disk_dir=args.offload_dir, preemption=args.preemption,
                    idle_retire_s=args.session_idle_timeout or None, state_snapshots=args.state_snapshots)
    model_id = args.served_model_name or llm.loaded.source.name
    aliases = (args.model,) if args.model and args.model != model_id else ()
    app = create_app(engine, model_id, aliases, api_key=api_keys, max_queue=args.max_queue, max_body=max_body,
                     max_sessions=args.max_sessions, metrics_public=args.metrics_public,
                     request_timeout=args.request_timeout or None, body_timeout=args.body_timeout or None,
                     allowed_hosts=default_allowed_hosts(args.host, api_keys, args.allow_host),
                     cors_origins=cors_origins, stats_interval=args.log_stats_interval or None)
    # The server's own lines (warnings, the stats line) at --log-level, as uvicorn's are.
    import logging

    serve_log = logging.getLogger("edgellm.serve")
    if not serve_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        serve_log.addHandler(handler)
        serve_log.setLevel(args.log_level.upper())
    pool = (f"state pool {engine.num_blocks} sequences' states" if engine.per_sequence_state else
            f"KV pool {engine.num_blocks} blocks, {engine.pool_tokens} tokens")
    print(f"edgellm serve: {model_id} on http://{args.host}:{args.port}  ({pool}, KV {llm.kv_dtype}, weights {llm.loaded.dtype}, preemption {args.preemption}, "
          f"speculative {speculative.name if speculative else 'off'}; "
          f"{_split_text(split)}"
          "live page at /, metrics at /metrics)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                    timeout_keep_alive=args.keep_alive_timeout,
                    http=header_timeout_protocol(args.body_timeout) if args.body_timeout else "auto")
    finally:
        if split is not None:       # the other ranks exit with it
            split.close()
    return 0


def _split_text(split) -> str:
    if split is None:
        return ""
    c = split.config
    return f"{c.world} ranks ({'pipeline' if c.pipeline > 1 else 'tensor'} parallel); "
