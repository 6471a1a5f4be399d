"""Load test of `edgellm serve`: many concurrent streaming clients, some hanging up mid-stream.

::

    python -m edgellm.serve.loadtest                      # starts its own server (default model)
    python -m edgellm.serve.loadtest --url http://127.0.0.1:8000 --clients 64 --requests 3

First every prompt is served alone (greedy, one request at a time): the reference. Then
``--clients`` clients each send ``--requests`` streamed greedy chat requests back to back, all at
once; every ``--disconnect-every``-th request is dropped after its first tokens. Checked: every
completed response equals its reference text and finish reason, the server stays up, and
afterwards no request is in flight and no KV block is in use (cached prefixes aside). Printed:
throughput (generated tokens of completed requests per second of the loaded phase), requests/s,
and time to first token (client side: request sent to first content chunk) p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass

import httpx

from edgellm.serve.process import ServerProcess, metric

PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "Write a haiku about the sea.",
    "Why is the sky blue?", "Give me a synonym for happy.", "What is 7 times 8?",
    "Tell me a fun fact about octopuses.", "How do I boil an egg?", "Translate 'thank you' into Spanish.",
    "What is photosynthesis?", "Suggest a name for a cat.", "What does a CPU do?",
    "Describe the moon in one sentence.", "List two fruits that are red.", "What is the opposite of cold?",
    "Who wrote Romeo and Juliet?",
]


@dataclass
class Outcome:
    prompt: int
    text: str
    finish: str | None
    tokens: int
    ttft_s: float | None
    total_s: float
    disconnected: bool


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


async def chat_stream(client: httpx.AsyncClient, model: str, prompt: int, max_tokens: int,
                      drop_after: int | None) -> Outcome:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[prompt]}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, pieces, finish, tokens, seen = None, [], None, 0, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            for c in ev.get("choices", []):
                text = c["delta"].get("content")
                if text:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    pieces.append(text)
                    seen += 1
                finish = c.get("finish_reason") or finish
            if drop_after is not None and seen >= drop_after:
                break       # leaving the block closes the connection mid-stream
    return Outcome(prompt, "".join(pieces), finish, tokens, ttft, time.perf_counter() - t0, drop_after is not None)


async def reference(url: str, model: str, max_tokens: int, headers: dict) -> dict[int, tuple[str, str]]:
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as client:
        out = {}
        for i in range(len(PROMPTS)):
            o = await chat_stream(client, model, i, max_tokens, None)
            out[i] = (o.text, o.finish)
        return out


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int, disconnect_every: int,
               headers: dict) -> tuple[list[Outcome], float, list[str]]:
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as client:
        async def one_client(c: int) -> list[Outcome]:
            done = []
            for j in range(requests):
                k = c * requests + j                  # this request's number
                drop = 2 if disconnect_every and k % disconnect_every == disconnect_every - 1 else None
                try:
                    done.append(await chat_stream(client, model, k % len(PROMPTS), max_tokens, drop))
                except Exception as err:            # recorded: a load test reports failures, it does not stop
                    errors.append(f"client {c} request {j}: {type(err).__name__}: {err}")
            return done

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return [o for rs in results for o in rs], wall, errors


def after_state(url: str, headers: dict, timeout: float = 10.0) -> dict:
    """Wait until nothing is in flight; report KV blocks and server health."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
        in_flight = metric(text, "edgellm_requests_in_flight")
        if in_flight == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    health = httpx.get(url + "/health", timeout=30).status_code
    return {"in_flight": in_flight, "health": health, "preemptions": metric(text, "edgellm_preemptions"),
            **{f"kv_{s}": metric(text, "edgellm_kv_blocks", f'state="{s}"') for s in ("used", "cached", "free")}}


def run_load_test(url: str, model: str, clients: int = 64, requests: int = 3, max_tokens: int = 16,
                  disconnect_every: int = 10, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ref = asyncio.run(reference(url, model, max_tokens, headers))
    outcomes, wall, errors = asyncio.run(load(url, model, clients, requests, max_tokens, disconnect_every, headers))
    completed = [o for o in outcomes if not o.disconnected]
    mismatches = [(o.prompt, o.text, ref[o.prompt][0]) for o in completed
                  if (o.text, o.finish) != ref[o.prompt]]
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    tokens = sum(o.tokens for o in completed)
    state = after_state(url, headers)
    return {"clients": clients, "requests": len(outcomes) + len(errors), "completed": len(completed),
            "disconnected": len(outcomes) - len(completed), "errors": errors, "mismatches": mismatches,
            "wall_s": wall, "generated_tokens": tokens, "tok_s": tokens / wall, "req_s": len(completed) / wall,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p99_s": percentile(ttfts, 99) if ttfts else None, "after": state}


def offline_peer(model: str, kv_memory: str, threads: int | None, prompts: list[list[int]], max_tokens: int) -> dict:
    """The same requests through the engine in this process, without HTTP: one thread per client
    (``prompts[c]``: client c's prompt numbers), each submitting back to back to the engine's
    background loop, as the HTTP clients did (none hangs up). The engine's own throughput on this
    workload: the ceiling the server is compared with."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from edgellm.runtime.engine import Engine
    from edgellm.runtime.types import Request
    from edgellm.sampling import SamplingParams

    if threads:
        torch.set_num_threads(threads)
    params = SamplingParams.greedy(max_tokens=max_tokens)
    with Engine(model, kv_memory=kv_memory) as engine:
        engine.start()

        def one_client(mine: list[int]) -> int:
            return sum(len(engine.submit(Request([{"role": "user", "content": PROMPTS[i]}], params, chat=True))
                           .result().token_ids) for i in mine)

        one_client([0])     # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            tokens = sum(pool.map(one_client, prompts))
        wall = time.perf_counter() - t0
    return {"requests": sum(map(len, prompts)), "wall_s": wall, "generated_tokens": tokens, "tok_s": tokens / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgellm.serve.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start `edgellm serve` on a free port)")
    p.add_argument("--model", default="smollm2-135m", help="model id (and, without --url, the model to serve)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=3, help="requests per client, back to back")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--disconnect-every", type=int, default=10, help="every N-th request hangs up after 2 chunks")
    p.add_argument("--kv-memory", default="256MB", help="without --url: the server's KV pool")
    p.add_argument("--threads", type=int, default=None, help="without --url: the server's CPU threads")
    p.add_argument("--no-offline", action="store_true",
                   help="without --url: skip the offline peer (the same requests through the engine in-process)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)

    server = None
    url = args.url
    if url is None:
        extra = ["--threads", str(args.threads)] if args.threads else []
        server = ServerProcess(["--model", args.model, "--kv-memory", args.kv_memory,
                                "--max-queue", str(max(256, args.clients * 2)), *extra]).start()
        url = server.url
    try:
        rep = run_load_test(url, args.model, args.clients, args.requests, args.max_tokens, args.disconnect_every,
                            args.api_key)
        if server is not None:
            rep["server_alive"] = server.alive
    finally:
        if server is not None:
            server.stop()
    if server is not None and not args.no_offline:
        per_client = [[(c * args.requests + j) % len(PROMPTS) for j in range(args.requests)]
                      for c in range(args.clients)]
        rep["offline"] = offline_peer(args.model, args.kv_memory, args.threads, per_client, args.max_tokens)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        a = rep["after"]
        print(f"{rep['clients']} clients, {rep['requests']} streamed requests: {rep['completed']} completed, "
              f"{rep['disconnected']} disconnected mid-stream, {len(rep['errors'])} errors")
        print(f"wall {rep['wall_s']:.1f} s; throughput {rep['tok_s']:.1f} generated tok/s, {rep['req_s']:.2f} req/s")
        print(f"TTFT p50 {rep['ttft_p50_s'] * 1000:.0f} ms, p99 {rep['ttft_p99_s'] * 1000:.0f} ms")
        if "offline" in rep:
            off = rep["offline"]
            print(f"offline peer (the engine in-process, {rep['clients']} threads, {off['requests']} completions, no HTTP): "
                  f"{off['tok_s']:.1f} tok/s; served/offline = {rep['tok_s'] / off['tok_s']:.2f}")
        print(f"completed responses equal to the prompt served alone: {rep['completed'] - len(rep['mismatches'])}"
              f"/{rep['completed']}")
        print(f"after: health {a['health']}, in flight {a['in_flight']:.0f}, KV blocks used {a['kv_used']:.0f}, "
              f"cached {a['kv_cached']:.0f}, free {a['kv_free']:.0f}; preemptions during the run {a['preemptions']:.0f}")
        for e in rep["errors"][:5]:
            print("error:", e)
        for prompt, got, want in rep["mismatches"][:5]:
            print(f"mismatch on prompt {prompt}: {got!r} != {want!r}")
    ok = not rep["errors"] and not rep["mismatches"] and rep["after"]["kv_used"] == 0 and rep["after"]["health"] == 200
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
