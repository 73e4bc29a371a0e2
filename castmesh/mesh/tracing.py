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

import os

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
