"""Prometheus metrics of the server: latency histograms and counters it observes, gauges read from
the engine at scrape time.

Observed per finished completion (one choice): time to first token (submission to first token,
queueing included) and time per output token (decode time over the tokens after the first).
Counted: HTTP requests by endpoint and status, completions by finish reason, prompt tokens
(and how many of them came from the KV cache), generated tokens. Read from ``Engine.stats()``
at every scrape: sessions per phase, KV blocks by state (used, free, cached, offloaded to host
or disk), waiting and running sequences, the server's requests in flight.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds. TTFT on a CPU ranges from tens of ms (short prompt, idle) to seconds (a queue).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0)

PHASES = ("waiting", "prefill", "followup_prefill", "decode", "inactive", "preempted", "offloaded_host",
          "offloaded_disk")


class EngineCollector:
    """Gauges computed from one ``Engine.stats()`` snapshot per scrape."""

    def __init__(self, engine, in_flight):
        self.engine = engine
        self.in_flight = in_flight      # callable: the server's engine requests not yet finished

    def collect(self):
        st = self.engine.stats()
        phases = GaugeMetricFamily("edgellm_sessions", "Live sessions (and one-shot requests) per phase",
                                   labels=["phase"])
        by_phase = st["sessions"]["by_phase"]
        for p in PHASES:
            phases.add_metric([p], by_phase.get(p, 0))
        yield phases
        b = st["blocks"]
        blocks = GaugeMetricFamily("edgellm_kv_blocks", "KV blocks by state (offloaded ones live outside the pool)",
                                   labels=["state"])
        for state in ("used", "free", "cached", "offloaded_host", "offloaded_disk"):
            blocks.add_metric([state], b[state])
        yield blocks
        yield GaugeMetricFamily("edgellm_kv_blocks_total", "Blocks in the KV pool", value=b["total"])
        yield GaugeMetricFamily("edgellm_kv_block_bytes", "Bytes of one KV block", value=st["kv"]["bytes_per_block"])
        yield GaugeMetricFamily("edgellm_queue_depth", "Sequences waiting to be scheduled",
                                value=st["scheduler"]["waiting"])
        yield GaugeMetricFamily("edgellm_running_sequences", "Sequences in the running batch",
                                value=st["scheduler"]["running"])
        yield GaugeMetricFamily("edgellm_requests_in_flight", "Engine requests the server submitted, not finished",
                                value=self.in_flight())
        yield GaugeMetricFamily("edgellm_preemptions", "Preemptions since start", value=st["scheduler"]["preemptions"])
        yield GaugeMetricFamily("edgellm_engine_steps", "Engine steps since start", value=st["steps"]["steps"])
        spec = st.get("speculative")
        if spec is not None:      # speculative decoding: counters the engine keeps (vLLM's names)
            yield CounterMetricFamily("vllm:spec_decode_num_draft_tokens", "Tokens proposed for verification",
                                      value=spec["proposed"])
            yield CounterMetricFamily("vllm:spec_decode_num_accepted_tokens", "Proposed tokens accepted",
                                      value=spec["accepted"])
            yield CounterMetricFamily("vllm:spec_decode_num_drafts", "Verify passes (steps with a proposal)",
                                      value=spec["steps"])
            yield GaugeMetricFamily("edgellm_spec_decode_tokens_per_verify_step",
                                    "Tokens committed per verify pass (1 + accepted proposals), since start",
                                    value=spec["tokens_per_verify_step"])


class Metrics:
    def __init__(self, engine, in_flight):
        self.registry = CollectorRegistry()
        r = self.registry
        # Engine gauges first: a scrape that sees no request in flight then sees every counter of them.
        r.register(EngineCollector(engine, in_flight))
        self.ttft = Histogram("edgellm_time_to_first_token_seconds", "Submission to first token, per completion",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("edgellm_time_per_output_token_seconds", "Decode time per token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.http = Counter("edgellm_http_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.completions = Counter("edgellm_completions", "Completions (choices) finished", ["finish_reason"],
                                   registry=r)
        self.prompt_tokens = Counter("edgellm_prompt_tokens", "Prompt tokens of finished completions", registry=r)
        self.cached_tokens = Counter("edgellm_prompt_tokens_cached",
                                     "Prompt tokens whose KV was reused from the cache", registry=r)
        self.generated = Counter("edgellm_generation_tokens", "Tokens generated", registry=r)

    def observe(self, result) -> None:
        """A finished completion (``TurnResult``)."""
        self.completions.labels(result.finish_reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.cached_tokens.inc(result.cached_tokens)
        n = len(result.token_ids)
        self.generated.inc(n)
        if n and result.ttft_s > 0:
            self.ttft.observe(result.ttft_s)
        if n > 1 and result.decode_s > 0:
            self.tpot.observe(result.decode_s / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
