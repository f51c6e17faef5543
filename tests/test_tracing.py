"""OpenTelemetry tracing: off by default; on, one trace per request across the ingress and the replicas.

The span tree of a migrated request spans four processes (the ingress, the source and destination replicas,
vLLM inside them): each exports with the OTLP exporter the spec configures, to the receiver the test fleet
points them at (tests/otlp_receiver.py). The span mechanics inside one process are checked with the SDK's
in-memory exporter.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import pytest

from test_live_migration import mig_pool, where  # noqa: F401 (mig_pool is a fixture)

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_tracing_is_off_by_default():
    from rayfleet.control_plane.spec import parse_spec

    assert parse_spec({"pools": [{"name": "a", "model": "/m"}]}).tracing is None
    # A fresh process with the default: spans record nothing and no headers travel in calls.
    probe = ("from rayfleet.actors.observability import tracing; tracing.setup_tracing(None, 'probe'); "
             "span = tracing.start_span('request'); print(span.is_recording(), tracing.headers_of(span))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "None"]


def test_a_span_continues_under_the_headers_a_call_carries():
    """What a replica does with `GenerateCall.trace_headers`, seen by the SDK's in-memory exporter."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from rayfleet.actors.observability import tracing

    exporter = InMemorySpanExporter()
    tracing.setup_tracing(tracing.TracingConfig(otlp_endpoint="http://unused:4318/v1/traces"), "test",
                          exporter=exporter)
    root = tracing.start_span("request", tracing.extract({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}))
    hop = tracing.start_span("hop generate", tracing.context_of(root))
    served = tracing.start_span("replica.generate", tracing.headers_of(hop))  # across a Ray call: headers only
    tracing.end_span(served, RuntimeError("engine died"), **{"rayfleet.output_tokens": 3, "skipped": None})
    tracing.end_span(hop)
    tracing.end_span(root)
    tracing.flush()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {span.context.trace_id for span in spans.values()} == {int("ab" * 16, 16)}, "the client's trace continues"
    assert spans["request"].parent.span_id == int("cd" * 8, 16)
    assert spans["hop generate"].parent.span_id == spans["request"].context.span_id
    assert spans["replica.generate"].parent.span_id == spans["hop generate"].context.span_id
    assert spans["replica.generate"].status.status_code.name == "ERROR"
    assert dict(spans["replica.generate"].attributes) == {"rayfleet.output_tokens": 3}


@pytest.mark.engines
async def test_migrated_request_is_one_span_tree_across_ingress_and_replicas(fleet, async_client, otlp_receiver,
                                                                              mig_pool):  # noqa: F811
    trace_id, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    stream = await async_client.chat.completions.create(
        model="mig", messages=[{"role": "user", "content": "Describe live migration of a running request."}],
        max_tokens=120, stream=True, extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"}, **GREEDY)
    chunks, record = 0, None
    async for chunk in stream:
        chunks += 1
        if chunks == 5:  # early: merged deltas and a lagging client could otherwise see the request finish
            src = await asyncio.to_thread(where, fleet, chunk.id)
            dst = next(r for r in mig_pool if r != src)
            record = await fleet.controller.migrate.remote(chunk.id, src, dst, "stop_and_copy")
    assert record["outcome"] == "migrated", record

    def tree(spans):
        by_name = {}
        for span in spans:
            by_name.setdefault(span.name, []).append(span)
        done = {"POST /v1/chat/completions", "hop attach", "replica.resume", "migrate_out"} <= set(by_name)
        return by_name if done and len(by_name.get("llm_request", [])) >= 1 else None

    spans = otlp_receiver.wait_for(lambda _: tree(otlp_receiver.trace(trace_id)), what="the request's spans")
    one = {name: found[0] for name, found in spans.items()}
    root = one["POST /v1/chat/completions"]

    def children(parent) -> set[str]:
        return {span.name for span in otlp_receiver.trace(trace_id) if span.parent_span_id == parent.span_id}

    assert root.parent_span_id == client_span, "the client's traceparent is continued"
    assert root.resource["rayfleet.component"] == "ingress"
    assert {"admission", "routing", "hop generate", "hop attach"} <= children(root)
    assert one["routing"].attributes["rayfleet.replica"] == src
    assert one["hop generate"].attributes["rayfleet.replica"] == src
    assert one["hop attach"].attributes["rayfleet.replica"] == dst
    served = one["replica.generate"]
    assert served.parent_span_id == one["hop generate"].span_id, "context crossed the Ray call"
    assert served.resource["rayfleet.component"] == f"replica {src}"
    migration = one["migrate_out"]
    assert migration.parent_span_id == served.span_id
    assert migration.attributes["rayfleet.outcome"] == "migrated" and migration.attributes["rayfleet.dst"] == dst
    resumed = one["replica.resume"]
    assert resumed.parent_span_id == migration.span_id and resumed.resource["rayfleet.component"] == f"replica {dst}"
    # vLLM's own request span joins under the replica's span that ran it.
    assert "llm_request" in children(resumed)
