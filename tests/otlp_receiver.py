"""A real OTLP/gRPC trace receiver for tests, on the TraceService generated in the opentelemetry-proto
package: it keeps every span it is sent, with the service that sent it and when it arrived."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span


@dataclass
class Received:
    service: str
    span: Span
    at: float


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        now = time.monotonic()
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend(Received(service, span, now) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def services(self) -> set[str]:
        with self.lock:
            return {r.service for r in self.spans}

    def named(self, service: str) -> list[Span]:
        with self.lock:
            return [r.span for r in self.spans if r.service == service]

    def arrived(self) -> set[tuple[str, str]]:
        """(service, span name) of everything received so far."""
        with self.lock:
            return {(r.service, r.span.name) for r in self.spans}

    def names(self) -> set[str]:
        with self.lock:
            return {r.span.name for r in self.spans}

    def all(self) -> list[tuple[str, Span]]:
        with self.lock:
            return [(r.service, r.span) for r in self.spans]

    def stop(self) -> None:
        self.server.stop(0)
