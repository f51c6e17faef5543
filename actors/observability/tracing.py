"""OpenTelemetry tracing of a request across the fleet's processes: one trace per request.

The ingress opens the request's root span; admission, routing and each replica hop are its children; the
replica that serves a hop continues the trace from W3C trace-context headers carried inside the Ray call
(`GenerateCall.trace_headers`), and hands them to vLLM (`AsyncLLM.generate(trace_headers=...)`), whose own
`llm_request` span joins the same trace. A live migration is a span of the source replica, and the
destination resumes the request as its child, so a migrated request reads as one tree.

Off by default (`tracing:` absent from the spec): no provider is built, spans are OpenTelemetry's
non-recording ones and no headers travel. On, each process exports through an OTLP exporter with a batch
processor. The provider stays rayfleet's own (not OpenTelemetry's global one): vLLM installs its own global
provider in the replica process when its tracing is on, and the two must not fight over it.

Spans are started with explicit parents, never "current span" context: a request's stream is an async
generator whose steps run in whichever task reads it, where context-variable scopes do not hold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field

_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: Tracer = trace.NoOpTracer()
_provider = None


class TracingConfig(BaseModel):
    """The spec's `tracing:` section: where every process of the fleet sends its spans."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    otlp_endpoint: str = Field(
        description="OTLP receiver: http://host:4318/v1/traces for http/protobuf, host:4317 for grpc.")
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="Share of requests traced (parent-based).")
    service_name: str = "rayfleet"
    export_delay_s: float = Field(5.0, gt=0, description="How long spans wait in the batch before export.")
    trace_engines: bool = Field(
        True, description="Also turn on vLLM's own request spans in every replica (its otlp_traces_endpoint).")


def setup_tracing(config: TracingConfig | None, component: str, exporter=None) -> None:
    """Build this process's tracer from the spec (once; later calls are no-ops). None keeps tracing off.

    `exporter` replaces the OTLP exporter the config names (e.g. the SDK's in-memory exporter)."""
    global _tracer, _provider
    if config is None or _provider is not None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({"service.name": config.service_name, "rayfleet.component": component,
                                "process.pid": os.getpid()})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(exporter or _exporter(config),
                                                   schedule_delay_millis=config.export_delay_s * 1e3))
    _provider = provider
    _tracer = provider.get_tracer("rayfleet")


def flush(timeout_s: float = 5.0) -> None:
    """Export the spans still batched in this process (before it stops)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1e3))


def _exporter(config: TracingConfig):
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.otlp_endpoint)


def engine_tracing_env(config: TracingConfig | None) -> dict[str, str]:
    """What a replica's environment needs for vLLM to export its spans the way the spec says."""
    if config is None or not config.trace_engines:
        return {}
    return {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": config.protocol, "OTEL_SERVICE_NAME": config.service_name}


def start_span(name: str, parent: Context | Mapping[str, str] | None = None, kind: SpanKind = SpanKind.INTERNAL,
               attributes: Mapping[str, object] | None = None) -> Span:
    """A span under `parent`: a context of this process, trace headers from another one, or None for a root."""
    if parent is not None and not isinstance(parent, Context):
        parent = _PROPAGATOR.extract(dict(parent))
    return _tracer.start_span(name, context=parent, kind=kind, attributes=_clean(attributes))


def context_of(span: Span | None) -> Context | None:
    """The context that makes `span` the parent of the next spans started with it."""
    return None if span is None else trace.set_span_in_context(span)


def headers_of(span: Span | None) -> dict[str, str] | None:
    """W3C trace-context headers that continue `span`'s trace in another process; None when not traced."""
    if span is None or not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def extract(headers: Mapping[str, str] | None) -> Context | None:
    """The context of incoming headers (a client's `traceparent`), None when they carry none."""
    if not headers:
        return None
    context = _PROPAGATOR.extract(dict(headers))
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def end_span(span: Span | None, error: BaseException | None = None, **attributes: object) -> None:
    """Set the final attributes (None values skipped), mark an error, end the span (None: nothing to end)."""
    if span is None:
        return
    span.set_attributes(_clean(attributes))
    if error is not None:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


def _clean(attributes: Mapping[str, object] | None) -> dict:
    return {k: v for k, v in (attributes or {}).items() if v is not None}
