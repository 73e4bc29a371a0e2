"""The one tracing setup: OpenTelemetry, configured only by the standard OTEL_* variables.

With OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) set, spans go over OTLP (gRPC,
or HTTP/protobuf when OTEL_EXPORTER_OTLP_PROTOCOL says so) through a batch processor; the SDK itself reads
OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_* and the exporter's
headers, timeout and TLS settings. With no endpoint, or OTEL_SDK_DISABLED=true, nothing is set up and the
API's no-op tracer costs next to nothing: the process stays silent.

Every gRPC call, client and server, is traced by opentelemetry-instrumentation-grpc's aio interceptors,
which castmesh.mesh.grpcutil puts on every channel and server it makes (none at all while tracing is off).
The two media calls, Relay.Publish and Relay.Subscribe, are the exception: one of them lives as long as
two nodes talk, hours, and the library's span would only show up when it ends; and a client interceptor
costs something on every message. Their channels have no interceptors; media_call, end_at_setup and
media_call_served make the same kind of spans by hand and end them once the call is set up (its first
response).
What flows on those calls is traced per stream instead: trace contexts travel in PublishOpen,
SubscribeOpen and StreamHeader (carrier() and the parent/link helpers below), once per stream and never
per frame, so a viewer's trace leads hop by hop to the publisher's session.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
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
    _provider = provider
    return True


MEDIA_CALLS = ("/castmesh.v1.Relay/Publish", "/castmesh.v1.Relay/Subscribe")


def _is_media_call(details: Any) -> bool:
    method = details.method
    return (method.decode() if isinstance(method, bytes) else method) in MEDIA_CALLS


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """For a new channel: the library's interceptors, for every call but the media calls (see
    media_call). None while tracing is off: an untraced process pays nothing per call."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors
    from opentelemetry.instrumentation.grpc.filters import negate

    return list(aio_client_interceptors(filter_=negate(_is_media_call)))


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """For a new server: the library's interceptor, for every call but the media calls (whose handlers
    make their own span with media_call_served). It works when a call starts, not per message."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.instrumentation.grpc.filters import negate

    return [aio_server_interceptor(filter_=negate(_is_media_call))]


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


_pending: set[asyncio.Task[None]] = set()


def media_call(method: str) -> tuple[trace.Span, list[tuple[str, str]]]:
    """A media call's client span (a child of the current span) and the call metadata that carries its
    context. Media calls go on channels with no interceptors (grpcutil.channel(traced=False)): an
    interceptor, even one that passes a call through untouched, puts every message through extra queues."""
    if _provider is None:
        return trace.INVALID_SPAN, []
    span = tracer("castmesh.grpc").start_span(method, kind=trace.SpanKind.CLIENT, attributes=_rpc_attributes(method))
    context: dict[str, str] = {}
    propagate.inject(context, context=trace.set_span_in_context(span))
    return span, list(context.items())


def end_at_setup(span: trace.Span, call: Any) -> None:
    """End a media call's client span once the call is set up: when the relay's first response (and with
    it the initial metadata) arrives, or the call fails first."""
    if not span.is_recording():
        return

    async def wait() -> None:
        try:
            await call.initial_metadata()
            if call.done() and (code := await call.code()) != grpc.StatusCode.OK:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_status(trace.StatusCode.ERROR, f"{code.name}: {await call.details()}")
            else:
                span.add_event("set up")
        finally:
            span.end()

    task = asyncio.get_running_loop().create_task(wait())
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def set_up(span: trace.Span, outcome: str = "set up", **attributes: int) -> trace.Span:
    """End a call's or a stream's span at its setup (or at its end, if it never got that far), with the
    outcome as an event; the invalid span, which later calls leave alone."""
    if span is not trace.INVALID_SPAN:
        span.add_event(outcome, attributes)
        span.end()
    return trace.INVALID_SPAN


def media_call_served(method: str, context: grpc.aio.ServicerContext) -> trace.Span:
    """A media call's server span, a child of the caller's: its handler ends it at its first response."""
    if _provider is None:
        return trace.INVALID_SPAN
    incoming = {key: value for key, value in context.invocation_metadata() or ()}
    return tracer("castmesh.grpc").start_span(method, context=propagate.extract(incoming), kind=trace.SpanKind.SERVER,
                                              attributes={**_rpc_attributes(method), "net.peer": context.peer()})


def shutdown() -> None:
    """Flush what the batch processor holds (on a clean stop)."""
    if _provider is not None:
        _provider.shutdown()


@functools.cache
def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)  # a proxy until setup() sets the provider, then the real one


Carrier = Mapping[str, str]


def carrier(span: trace.Span | None) -> dict[str, str]:
    """`span`'s trace context as text (for PublishOpen, SubscribeOpen, StreamHeader); empty when it is
    not recorded (tracing off, or not sampled), so an untraced cluster sends nothing."""
    found: dict[str, str] = {}
    if span is not None and span.is_recording():
        propagate.inject(found, context=trace.set_span_in_context(span))
    return found


def parent(context: Carrier) -> Context | None:
    return propagate.extract(dict(context)) if context else None


def links(*contexts: Carrier) -> list[trace.Link]:
    """Links to the spans these carriers name (those that name one)."""
    found = []
    for context in contexts:
        if context:
            span_context = trace.get_current_span(propagate.extract(dict(context))).get_span_context()
            if span_context.is_valid:
                found.append(trace.Link(span_context))
    return found


def start(name: str, attributes: dict[str, str | int], kind: trace.SpanKind = trace.SpanKind.INTERNAL,
          context: Carrier | None = None) -> trace.Span:
    """A short span: a child of the span `context` names (else of the current one). With tracing off,
    the invalid span, whose methods do nothing."""
    if _provider is None:
        return trace.INVALID_SPAN
    return tracer("castmesh.media").start_span(name, context=parent(context) if context else None, kind=kind,
                                               attributes=attributes)


def http_span(method: str, route: str, path: str, headers: Mapping[str, str]) -> trace.Span:
    """An HTTP request's server span, a child of the caller's if its headers carry a trace context."""
    if _provider is None:
        return trace.INVALID_SPAN
    return start(f"{method} {route}", {"http.request.method": method, "http.route": route, "url.path": path},
                 kind=trace.SpanKind.SERVER, context={key.lower(): value for key, value in headers.items()})


def enabled() -> bool:
    return _provider is not None


def http_done(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(trace.StatusCode.ERROR)
    span.end()


NOTHING = nullcontext()


def current(span: trace.Span | None) -> AbstractContextManager[Any]:
    """Make `span` the current one (what RPCs and spans started inside become children of). With tracing
    off (no span, or the invalid one) this costs nothing: it is on every LL-HLS playlist request."""
    if span is None or span is trace.INVALID_SPAN:
        return NOTHING
    return trace.use_span(span, end_on_exit=False)


class SessionSpan:
    """A long media session (a publish, a viewer) as a span that ends with the session, with its key
    moments as span events, plus a short "<name>.progress" span every `every` seconds linked to it, so that
    a session that lasts hours shows up in Jaeger while it runs, not only when it ends. Its numbers come
    from `counters`, read at each progress span and at the end: nothing is done per frame, and nothing at
    all when tracing is off."""

    def __init__(self, name: str, attributes: dict[str, str | int],
                 counters: Callable[[], dict[str, int]] | None = None, every: float | None = None,
                 kind: trace.SpanKind = trace.SpanKind.SERVER, context: Carrier | None = None) -> None:
        self.name = name
        self.span = tracer("castmesh.sessions").start_span(name, context=parent(context) if context else None,
                                                           kind=kind, attributes=attributes)
        self.linked: set[str] = set()
        self.counters = counters or dict
        self.every = every if every is not None else float(os.environ.get("CASTMESH_TRACE_PROGRESS_S", "5"))
        self.timer: asyncio.TimerHandle | None = None
        if self.span.is_recording() and self.every > 0:
            self.timer = asyncio.get_running_loop().call_later(self.every, self._progress)

    def event(self, name: str, **attributes: str | int) -> None:
        if self.span.is_recording():
            self.span.add_event(name, attributes=attributes)

    def carrier(self) -> dict[str, str]:
        return carrier(self.span)

    def link(self, context: Carrier, why: str) -> None:
        """Link this session to the span `context` names (the publisher's session, once a header names
        it), once per span."""
        if not self.span.is_recording() or not context:
            return
        key = repr(sorted(context.items()))
        if key in self.linked:
            return
        self.linked.add(key)
        for found in links(context):
            self.span.add_link(found.context, {"castmesh.link": why})

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
