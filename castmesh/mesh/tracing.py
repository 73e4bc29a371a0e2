"""The one tracing setup: OpenTelemetry, configured only by the standard OTEL_* variables.

With OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) set, spans go over OTLP (gRPC,
or HTTP/protobuf when OTEL_EXPORTER_OTLP_PROTOCOL says so) through a batch processor; the SDK itself reads
OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_* and the exporter's
headers, timeout and TLS settings. With no endpoint, or OTEL_SDK_DISABLED=true, nothing is set up and the
API's no-op tracer costs next to nothing: the process stays silent.

Every gRPC call, client and server, is traced by opentelemetry-instrumentation-grpc's aio instrumentors,
which must be installed before any channel or server exists (setup() runs first thing in the CLI).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

_provider: TracerProvider | None = None


def endpoint(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or env.get("OTEL_TRACES_EXPORTER") == "none":
        return ""
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or ""


def _exporter() -> SpanExporter:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter()


def setup(service: str) -> bool:
    """Trace this process as `service` (unless OTEL_SERVICE_NAME names it); False if tracing stays off."""
    global _provider
    if _provider is not None:
        return True
    if not endpoint():
        return False
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(_exporter()))
    trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer

    GrpcAioInstrumentorClient().instrument()
    GrpcAioInstrumentorServer().instrument()
    _provider = provider
    return True


def shutdown() -> None:
    """Flush what the batch processor holds (on a clean stop)."""
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


class SessionSpan:
    """A long media session (a publish, a viewer) as a span that ends with the session, with its key
    moments as span events, plus a short "<name>.progress" span every `every` seconds linked to it, so that
    a session that lasts hours shows up in Jaeger while it runs, not only when it ends. Its numbers come
    from `counters`, read at each progress span and at the end: nothing is done per frame, and nothing at
    all when tracing is off."""

    def __init__(self, name: str, attributes: dict[str, str | int],
                 counters: Callable[[], dict[str, int]] | None = None, every: float | None = None) -> None:
        self.name = name
        self.span = tracer("castmesh.sessions").start_span(name, kind=trace.SpanKind.SERVER, attributes=attributes)
        self.counters = counters or dict
        self.every = every if every is not None else float(os.environ.get("CASTMESH_TRACE_PROGRESS_S", "5"))
        self.timer: asyncio.TimerHandle | None = None
        if self.span.is_recording():
            self.timer = asyncio.get_running_loop().call_later(self.every, self._progress)

    def event(self, name: str, **attributes: str | int) -> None:
        if self.span.is_recording():
            self.span.add_event(name, attributes=attributes)

    def _progress(self) -> None:
        link = trace.Link(self.span.get_span_context())
        with tracer("castmesh.sessions").start_as_current_span(f"{self.name}.progress", links=[link],
                                                               attributes=self.counters()):
            pass
        self.timer = asyncio.get_running_loop().call_later(self.every, self._progress)

    def end(self, reason: str, **totals: str | int) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.span.is_recording():
            self.span.set_attributes({**self.counters(), **totals, "castmesh.end_reason": reason})
            self.span.add_event("end", attributes={"reason": reason})
            self.span.end()
