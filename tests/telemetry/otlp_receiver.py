"""A real OTLP/HTTP trace receiver, run as its own process by the tests.

It serves `POST /v1/traces` and `POST /v1/metrics` (metric data points go to
`<out>.metrics`) (binary protobuf, optionally gzip), decodes each request with
the OTLP protocol's own classes (`opentelemetry-proto`), appends one JSON line per span
received to `--out` (duplicates included: it never dedupes) and answers with an
`ExportTraceServiceResponse`. It prints `PORT <n>` once listening.

    python otlp_receiver.py --port 0 --out spans.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def value_of(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value_of(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def spans_of(req: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    out = []
    for rs in req.resource_spans:
        resource = {kv.key: value_of(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append({
                    "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(), "name": s.name,
                    "kind": int(s.kind), "start": int(s.start_time_unix_nano),
                    "end": int(s.end_time_unix_nano),
                    "attributes": {kv.key: value_of(kv.value) for kv in s.attributes},
                    "events": [e.name for e in s.events],
                    "status": int(s.status.code), "scope": ss.scope.name,
                    "schema_url": ss.schema_url or rs.schema_url,
                    "service": resource.get("service.name"),
                })
    return out


def points_of(req: ExportMetricsServiceRequest) -> list[dict[str, Any]]:
    """One line per data point: metric name, kind, attributes, sum / count / value."""
    out = []
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                for p in getattr(m, kind).data_points:
                    row: dict[str, Any] = {
                        "metric": m.name, "kind": kind, "unit": m.unit,
                        "attributes": {kv.key: value_of(kv.value) for kv in p.attributes},
                        "time": int(p.time_unix_nano)}
                    if kind == "histogram":
                        row.update(sum=p.sum, count=int(p.count))
                    else:
                        row["value"] = p.as_double if p.HasField("as_double") else p.as_int
                    out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lock = threading.Lock()
    out = open(args.out, "a", encoding="utf-8")  # noqa: SIM115

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_POST(self) -> None:
            if self.path not in ("/v1/traces", "/v1/metrics"):
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path == "/v1/metrics":
                mreq = ExportMetricsServiceRequest()
                mreq.ParseFromString(body)
                rows = "".join(json.dumps(p) + "\n" for p in points_of(mreq))
                with lock, open(args.out + ".metrics", "a", encoding="utf-8") as f:
                    f.write(rows)
                self.reply(ExportMetricsServiceResponse().SerializeToString())
                return
            req = ExportTraceServiceRequest()
            try:
                req.ParseFromString(body)
            except Exception:
                self.send_error(400)
                return
            now = time.time()
            lines = "".join(json.dumps({**s, "received": now}) + "\n" for s in spans_of(req))
            with lock:  # written before the answer: what was acked is on disk
                out.write(lines)
                out.flush()
            self.reply(ExportTraceServiceResponse().SerializeToString())

        def reply(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
