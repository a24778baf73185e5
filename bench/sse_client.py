#!/usr/bin/env python3
"""The client of `just bench`'s stream-trickle workload (standard library only, like
scripts/bench.py, which runs it pinned next to the upstream).

  sse_client.py --port P --streams N --concurrency C --body FILE [--header 'name: value' ...]
                [--keys K] [--timeout S]

Sends N streaming chat requests (POST /v1/chat/completions with the body in FILE) over C
keep-alive connections, one stream at a time on each, so C streams are in flight until fewer than
C are left; `x-api-key` rotates over K values (sk-bench-0001 ...) as bench/chat.lua does. Each
response is read to its end: a 200, `transfer-encoding: chunked` (its end is the last chunk), the
usage chunk in it. Prints one JSON object: streams completed and failed (a few failures
described), the SSE events per stream (`data: ` lines, [DONE] included) and bytes per stream
(min and max), and each stream's time from its request to its first body byte and to its last
byte (p50, p99, ms). Exit status 1 when any stream failed or the run took longer than --timeout.
"""

import argparse
import asyncio
import json
import re
import sys
import time

TERMINAL = b"\r\n0\r\n\r\n"


class Load:
    def __init__(self, requests, streams):
        self.requests = requests
        self.left = streams
        self.sent = 0
        self.done = []      # (ms to first body byte, ms to last byte, events, bytes)
        self.failed = []    # descriptions

    def next_request(self):
        if self.left == 0:
            return None
        self.left -= 1
        req = self.requests[self.sent % len(self.requests)]
        self.sent += 1
        return req


class Connection(asyncio.Protocol):
    """One keep-alive connection: a stream, read to its end, then the next."""

    def __init__(self, load, closed):
        self.load, self.closed = load, closed
        self.transport = None
        self.buf = None

    def connection_made(self, transport):
        self.transport = transport
        self.send()

    def send(self):
        req = self.load.next_request()
        if req is None:
            self.buf = None
            self.transport.close()
            return
        self.buf, self.head, self.first = bytearray(), None, None
        self.t0 = time.perf_counter()
        self.transport.write(req)

    def data_received(self, data):
        now = time.perf_counter()
        if self.buf is None:
            return
        self.buf += data
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").lower()
            try:
                status = int(head.split(" ", 2)[1])
            except (IndexError, ValueError):
                status = 0
            m = re.search(r"\r\ncontent-length:\s*(\d+)", head)
            self.head = (status, "\r\ntransfer-encoding: chunked" in head, int(m.group(1)) if m else None, end + 4)
        status, chunked, length, start = self.head
        if self.first is None and len(self.buf) > start:
            self.first = now
        if chunked:
            if not self.buf.endswith(TERMINAL):
                return
        elif length is None or len(self.buf) - start < length:
            return
        body = bytes(self.buf[start:])
        if status != 200 or not chunked or b'"completion_tokens"' not in body:
            self.load.failed.append(f"status {status}, chunked {chunked}: {body[:200]!r}")
        else:
            self.load.done.append(((self.first - self.t0) * 1e3, (now - self.t0) * 1e3,
                                   body.count(b"data: "), len(body)))
        self.send()

    def connection_lost(self, exc):
        if self.buf is not None:
            self.load.failed.append(f"connection closed mid-stream ({exc or 'EOF'}) after {len(self.buf)} bytes")
        if not self.closed.done():
            self.closed.set_result(None)


def percentile(xs, q):
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, int(len(xs) * q + 0.999999) - 1))] if xs else None


async def run(args, requests):
    loop = asyncio.get_running_loop()
    load = Load(requests, args.streams)
    closed = []
    t0 = time.perf_counter()
    for _ in range(min(args.concurrency, args.streams)):
        fut = loop.create_future()
        await loop.create_connection(lambda f=fut: Connection(load, f), "127.0.0.1", args.port)
        closed.append(fut)
    await asyncio.wait_for(asyncio.gather(*closed), args.timeout)
    return load, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--streams", type=int, required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--body", required=True, help="file with the request body")
    ap.add_argument("--header", action="append", default=[], help="'name: value', repeatable")
    ap.add_argument("--keys", type=int, default=8, help="x-api-key values to rotate over")
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    body = open(args.body, "rb").read()
    requests = []
    for i in range(1, max(1, args.keys) + 1):
        head = (f"POST {args.path} HTTP/1.1\r\nhost: 127.0.0.1:{args.port}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nx-api-key: sk-bench-{i:04d}\r\n"
                + "".join(f"{h.strip()}\r\n" for h in args.header) + "\r\n")
        requests.append(head.encode() + body)
    try:
        load, wall = asyncio.run(run(args, requests))
    except (asyncio.TimeoutError, OSError) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    firsts = [d[0] for d in load.done]
    lasts = [d[1] for d in load.done]
    out = {
        "streams": len(load.done), "failed": len(load.failed), "failures": load.failed[:3], "wall_s": wall,
        "events": [min((d[2] for d in load.done), default=0), max((d[2] for d in load.done), default=0)],
        "bytes": [min((d[3] for d in load.done), default=0), max((d[3] for d in load.done), default=0)],
        "first_ms": {"p50": percentile(firsts, 0.5), "p99": percentile(firsts, 0.99)},
        "last_ms": {"p50": percentile(lasts, 0.5), "p99": percentile(lasts, 0.99)},
    }
    print(json.dumps(out))
    return 1 if load.failed or len(load.done) != args.streams else 0


if __name__ == "__main__":
    sys.exit(main())
