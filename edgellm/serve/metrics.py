"""Prometheus metrics of the server: latency histograms and counters it observes, gauges read from
the engine at scrape time.

Observed per finished completion (one choice): time to first token (submission to first token,
queueing included) and time per output token (decode time over the tokens after the first).
Counted: HTTP requests by endpoint and status, completions by finish reason, prompt tokens
(and how many of them came from the KV cache), generated tokens. Read from ``Engine.stats()``
at every scrape: sessions per phase, KV blocks by state (used, free, cached, offloaded to host
or disk), waiting and running sequences, the server's requests in flight.

vLLM's names too, so dashboards made for vLLM (its Grafana board) work unchanged: every ``vllm:``
metric carries a ``model_name`` label (the served model id) and means what vLLM's does --
``vllm:num_requests_running`` / ``_waiting``, ``vllm:kv_cache_usage_perc`` (0..1, blocks used),
``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``, ``vllm:num_preemptions_total``,
``vllm:request_success_total{finished_reason}``, and the histograms
``vllm:time_to_first_token_seconds``, ``vllm:time_per_output_token_seconds``,
``vllm:e2e_request_latency_seconds``, ``vllm:request_queue_time_seconds``,
``vllm:request_prefill_time_seconds``, ``vllm:request_decode_time_seconds``,
``vllm:request_prompt_tokens``, ``vllm:request_generation_tokens``. Counters only grow:
``edgellm_steps_total`` (engine steps). The process's own metrics (``process_resident_memory_bytes``,
CPU seconds, open files) come from prometheus_client's process collector.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds. TTFT on a CPU ranges from tens of ms (short prompt, idle) to seconds (a queue).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0)
# A whole request, its queueing, its prefill, its decode: milliseconds to minutes on a CPU.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
VLLM_LABEL = ["model_name"]

PHASES = ("waiting", "prefill", "followup_prefill", "decode", "inactive", "preempted", "offloaded_host",
          "offloaded_disk")


class EngineCollector:
    """Gauges computed from one ``Engine.stats()`` snapshot per scrape."""

    def __init__(self, engine, in_flight, model_name: str = ""):
        self.engine = engine
        self.in_flight = in_flight      # callable: the server's engine requests not yet finished
        self.model_name = model_name

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
        yield CounterMetricFamily("edgellm_steps", "Engine steps since start", value=st["steps"]["steps"])
        # vLLM's names (see the module docstring)
        m = [self.model_name]
        for name, doc, value in (
                ("vllm:num_requests_running", "Requests in the running batch", st["scheduler"]["running"]),
                ("vllm:num_requests_waiting", "Requests waiting to be scheduled", st["scheduler"]["waiting"]),
                ("vllm:kv_cache_usage_perc", "Fraction of the KV pool's blocks in use (1 = full)",
                 b["used"] / b["total"] if b["total"] else 0.0)):
            g = GaugeMetricFamily(name, doc, labels=VLLM_LABEL)
            g.add_metric(m, value)
            yield g
        c = CounterMetricFamily("vllm:num_preemptions", "Preemptions since start", labels=VLLM_LABEL)
        c.add_metric(m, st["scheduler"]["preemptions"])
        yield c
        spec = st.get("speculative")
        if spec is not None:      # speculative decoding: counters the engine keeps (vLLM's names)
            for name, doc, value in (
                    ("vllm:spec_decode_num_draft_tokens", "Tokens proposed for verification", spec["proposed"]),
                    ("vllm:spec_decode_num_accepted_tokens", "Proposed tokens accepted", spec["accepted"]),
                    ("vllm:spec_decode_num_drafts", "Verify passes (steps with a proposal)", spec["steps"])):
                c = CounterMetricFamily(name, doc, labels=VLLM_LABEL)
                c.add_metric(m, value)
                yield c
            yield GaugeMetricFamily("edgellm_spec_decode_tokens_per_verify_step",
                                    "Tokens committed per verify pass (1 + accepted proposals), since start",
                                    value=spec["tokens_per_verify_step"])


class Metrics:
    def __init__(self, engine, in_flight, model_name: str = ""):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r = self.registry
        # Engine gauges first: a scrape that sees no request in flight then sees every counter of them.
        r.register(EngineCollector(engine, in_flight, model_name))
        ProcessCollector(registry=r)        # process_resident_memory_bytes, CPU seconds, ...
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
        self.embedding_tokens = Counter("edgellm_embedding_tokens", "Input tokens of /v1/embeddings", registry=r)
        v = {"labelnames": VLLM_LABEL, "registry": r}
        self.v_prompt = Counter("vllm:prompt_tokens", "Prompt tokens processed", **v)
        self.v_generated = Counter("vllm:generation_tokens", "Tokens generated", **v)
        self.v_success = Counter("vllm:request_success", "Requests finished, by reason",
                                 labelnames=["model_name", "finished_reason"], registry=r)
        self.v_ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS, **v)
        self.v_tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token after the first",
                                buckets=TPOT_BUCKETS, **v)
        self.v_e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, **v)
        self.v_queue = Histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled step",
                                 buckets=LATENCY_BUCKETS, **v)
        self.v_prefill = Histogram("vllm:request_prefill_time_seconds", "First scheduled step to first token",
                                   buckets=LATENCY_BUCKETS, **v)
        self.v_decode = Histogram("vllm:request_decode_time_seconds", "First token to last token",
                                  buckets=LATENCY_BUCKETS, **v)
        self.v_prompt_len = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request",
                                      buckets=TOKEN_BUCKETS, **v)
        self.v_gen_len = Histogram("vllm:request_generation_tokens", "Generated tokens per request",
                                   buckets=TOKEN_BUCKETS, **v)

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
        m = self.model_name
        self.v_prompt.labels(m).inc(result.prompt_tokens)
        self.v_generated.labels(m).inc(n)
        # vLLM's reasons are stop, length and abort; an engine error counts as abort there too
        reason = {"stop": "stop", "length": "length"}.get(result.finish_reason, "abort")
        self.v_success.labels(m, reason).inc()
        if n and result.ttft_s > 0:
            self.v_ttft.labels(m).observe(result.ttft_s)
        if n > 1 and result.decode_s > 0:
            self.v_tpot.labels(m).observe(result.decode_s / (n - 1))
        self.v_e2e.labels(m).observe(max(result.ttft_s, result.queue_s + result.prefill_s) + result.decode_s)
        self.v_queue.labels(m).observe(result.queue_s)
        if n:
            self.v_prefill.labels(m).observe(result.prefill_s)
            self.v_decode.labels(m).observe(result.decode_s)
        self.v_prompt_len.labels(m).observe(result.prompt_tokens)
        self.v_gen_len.labels(m).observe(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
