"""What the observability rows of ``inprocess.py --observability`` share: the maker options.

``OBSERVED``: statement counts per request and both slow logs, with thresholds no request reaches
(nothing is logged: the cost measured is the counting). ``traced()``: OpenTelemetry with an SDK
tracer provider whose processor drops every span (the cost of making them, no export). It is
given to the maker, not made global, so FastAPI's own request spans (made when a global provider
is set) stay off and the row shows what this package adds.
"""

from __future__ import annotations

from typing import Any

OBSERVED: dict[str, Any] = {"stats": True, "slow_query_ms": 60_000, "slow_request_ms": 60_000}


def traced() -> dict[str, Any]:
    """The maker options of the traced rows: an SDK tracer provider whose spans go nowhere."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    return {"tracing": provider}
