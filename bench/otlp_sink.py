"""`python -m bench.otlp_sink --port N`: an OTLP/HTTP collector stand-in for the tracing
scenarios. It answers POST /v1/traces as a collector does and counts requests, bytes and
spans (decoded with opentelemetry-proto); GET /stats returns the counts as JSON."""
from __future__ import annotations

import argparse
import json

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    stats = {"requests": 0, "bytes": 0, "spans": 0}
    ok = ExportTraceServiceResponse().SerializeToString()

    async def traces(request: web.Request) -> web.Response:
        data = await request.read()
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(data)
        stats["requests"] += 1
        stats["bytes"] += len(data)
        stats["spans"] += sum(len(ss.spans) for rs in msg.resource_spans for ss in rs.scope_spans)
        return web.Response(body=ok, content_type="application/x-protobuf")

    async def get_stats(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(stats), content_type="application/json")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", get_stats)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
