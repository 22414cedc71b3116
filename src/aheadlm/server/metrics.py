"""Prometheus text for `GET /metrics`: request counts by endpoint and status, token and
speculation counters, queue gauges (the counters live in `scheduler.Metrics`)."""

from __future__ import annotations

from .scheduler import Scheduler

OTHER = "other"
"""The endpoint label of every path the server does not serve: one series, not one per probe."""


def endpoint_label(path: str, known: set[str]) -> str:
    return path if path in known else OTHER


def _label(value: str) -> str:
    # the exposition format's escapes: a quote or newline in a label would break every later scrape
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(sch: Scheduler) -> str:
    m = sch.metrics
    lines = [
        "# HELP aheadlm_requests_total HTTP requests by endpoint and status.",
        "# TYPE aheadlm_requests_total counter",
    ]
    for (path, code), n in sorted(m.requests.items()):
        lines.append(f'aheadlm_requests_total{{endpoint="{_label(path)}",status="{code}"}} {n}')
    emitted = max(0, m.completion_tokens)
    rows = [
        ("prompt_tokens_total", "counter", "Prompt tokens processed.", m.prompt_tokens),
        (
            "cached_prompt_tokens_total",
            "counter",
            "Prompt tokens whose K/V a batch row kept from an earlier request (not prefilled again).",
            m.cached_prompt_tokens,
        ),
        ("completion_tokens_total", "counter", "Tokens generated.", emitted),
        ("drafted_tokens_total", "counter", "Draft tokens proposed.", m.drafted),
        ("accepted_tokens_total", "counter", "Draft tokens accepted.", m.accepted),
        ("target_forwards_total", "counter", "Decode-phase target forwards.", m.target_forwards),
        (
            "mean_accepted_length",
            "gauge",
            "Tokens per target forward (tau).",
            round(m.completion_tokens / m.target_forwards, 4) if m.target_forwards else 0,
        ),
        ("acceptance_rate", "gauge", "Accepted / drafted.", round(m.accepted / m.drafted, 4) if m.drafted else 0),
        (
            "tokens_per_second",
            "gauge",
            "Generated tokens per second of request decode time.",
            round(emitted / m.decode_seconds, 3) if m.decode_seconds else 0,
        ),
        ("queue_depth", "gauge", "Requests waiting for a batch row.", sch.queue_depth),
        ("running_requests", "gauge", "Requests decoding now.", sch.running),
    ]
    for name, kind, help_, value in rows:
        lines += [f"# HELP aheadlm_{name} {help_}", f"# TYPE aheadlm_{name} {kind}", f"aheadlm_{name} {value}"]
    return "\n".join(lines) + "\n"
