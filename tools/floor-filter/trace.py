#!/usr/bin/env python3
"""The proxy-wasm hostcalls a filter makes per exchange, as a real Envoy reports them.

    tools/floor-filter/trace.py [--requests N] [SETUP ...]      (default setups: b f c fc)

Runs each setup of scripts/bench.py (its configurations: (b) llm-meter with metrics, (c) with 2
limit rules, (f)/(fc) the floor filter in the mode of (b)/(c)) as one front Envoy with the
`wasm` log component at trace level, behind the bench's upstream, and sends it N chat requests
and then N streaming ones (the bench's bodies and headers, one keep-alive connection). At trace
level Envoy's V8 runtime logs every call into the VM (`[host->vm] proxy_on_request_body(2, 208,
1)`) and every hostcall out of it (`[vm->host] env.proxy_get_buffer_bytes(1, 0, 208, ...)`).
Printed per setup and workload: the last exchange's callbacks and hostcalls, with pointers left
out and sizes kept (buffer sizes, key and value lengths, header map sizes, the allocation sizes the
host asks the VM for), and what the root context's timer did meanwhile. Then each floor setup is
compared line by line with the llm-meter setup it mirrors ((f) with (b), (fc) with (c)).

Needs what the bench needs (`just envoy`, `just build`; the floor filter is built here).
Ports 29001, 29100-29102, 29190, 29901. Logs: .run/floor-trace/.
"""

import argparse
import difflib
import http.client
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402  (scripts/bench.py: its configurations, bodies and process handling)

bench.WORK = ROOT / ".run" / "floor-trace"
bench.PORT.update(up_json=29100, up_sse=29101, up_big=29102, up_admin=29190)
FRONT, ADMIN = 29001, 29901
MIRRORS = {"f": "b", "fc": "c"}

# Which arguments of a hostcall say something about the work (sizes, kinds); the rest are pointers
# or values that differ between filters (metric ids, CAS tokens, histogram values).
KEEP = {
    "proxy_get_header_map_pairs": (0,),  # map type
    "proxy_set_header_map_pairs": (0, 2),  # map type, serialized size
    "proxy_get_header_map_value": (0, 2),
    "proxy_replace_header_map_value": (0, 2, 4),
    "proxy_get_buffer_bytes": (0, 1, 2),  # buffer type, start, max
    "proxy_set_buffer_bytes": (0, 1, 2, 4),
    "proxy_get_shared_data": (1,),  # key length
    "proxy_set_shared_data": (1, 3),  # key length, value length
    "proxy_get_property": (1,),
    "proxy_set_property": (1, 3),  # name length, value length
    "proxy_define_metric": (0, 2),
    "proxy_set_tick_period_milliseconds": (0,),
    "proxy_call_foreign_function": (1, 3),
    "proxy_log": (0,),
}
LINE = re.compile(r"\[(host->vm|vm->host|vm<-host)\] (?:env\.)?([\w.]+)(?:\((.*)\)| return: (-?\d+))")


def parse(log_text):
    """The trace as events: (direction, name, args, return) in log order."""
    events = []
    for m in LINE.finditer(log_text):
        direction, name, args, ret = m.groups()
        if direction == "vm<-host":
            if events and events[-1][1] == name and ret not in (None, "0"):
                events[-1] = events[-1][:3] + (ret,)
            continue
        values = [a.strip() for a in args.split(",")] if args else []
        events.append((direction, name, values, None))
    return events


def exchanges(events):
    """Per HTTP context: its callbacks and the hostcalls each made, normalized; and the timer's."""
    root, per, ticks, current = None, {}, [], None
    for direction, name, args, ret in events:
        if direction == "host->vm" and name != "proxy_on_memory_allocate":
            ctx = args[0] if args else None
            if name == "proxy_on_context_create" and len(args) == 2 and args[1] == "0":
                root = ctx
            if name == "proxy_on_tick":
                current = ["proxy_on_tick"]
                ticks.append(current)
                continue
            if ctx == root or ctx is None:
                current = None
                continue
            current = per.setdefault(ctx, [])
            current.append(f"{name}({', '.join(['ctx'] + args[1:])})")
            continue
        if current is None:
            continue
        if name == "proxy_on_memory_allocate":
            current.append(f"    . VM allocates {args[0]} bytes for the host")
            continue
        kept = ", ".join(args[i] for i in KEEP.get(name, ()) if i < len(args))
        current.append(f"    {name}({kept})" + (f" -> status {ret}" if ret else ""))
    return per, ticks


# What wrk sends (bench/chat.lua): the bodies, and the headers but Host and Content-Length.
CHAT_BODY = ('{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},'
             '{"role":"user","content":"Summarize the plot of Hamlet in two sentences, please."}],'
             '"max_tokens":256,"temperature":0.7}')
STREAM_BODY = ('{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},'
               '{"role":"user","content":"Summarize Hamlet in two sentences."}],'
               '"stream":true,"stream_options":{"include_usage":true},"max_tokens":256}')


def send(port, stream, n):
    body = (STREAM_BODY if stream else CHAT_BODY).encode()
    headers = {"content-type": "application/json", "x-api-key": "sk-bench-0001", "x-app-id": "bench",
               "authorization": f"Bearer {bench.MASTER_KEY}", "content-length": str(len(body))}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(n):
        conn.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200 or b'"completion_tokens"' not in data:
            raise RuntimeError(f"unexpected answer {r.status}: {data[:200]!r}")
    conn.close()


def trace(procs, shipped, setup, workload, n):
    stream = workload == "stream"
    upstream = bench.PORT["up_sse" if stream else "up_json"]
    name = f"front_{setup}_{workload}"
    log_path = bench.WORK / f"{name}.log"
    log_path.unlink(missing_ok=True)
    cfg = bench.front_yaml(setup, FRONT, ADMIN, upstream, shipped)
    (bench.WORK / f"{name}.yaml").write_text(cfg)
    p = procs.start(name, [bench.ENVOY, "-c", bench.WORK / f"{name}.yaml", "--concurrency", "1",
                           "--disable-hot-restart", "--log-level", "warn", "--component-log-level", "wasm:trace"])
    bench.wait_ready(f"http://127.0.0.1:{ADMIN}/ready", p, f"Envoy {name}")
    time.sleep(0.3)  # a timer tick or two before the traffic
    send(FRONT, stream, n)
    time.sleep(0.6)  # and after it: the counter flush
    procs.stop(p)
    per, ticks = exchanges(parse(log_path.read_text(errors="replace")))
    if len(per) < n:
        raise RuntimeError(f"{name}: {len(per)} exchanges in the trace, expected {n} (no wasm trace?)")
    last = per[list(per)[-1]]
    return last, ticks


def calls(lines):
    return [line for line in lines if line.startswith("    ") and not line.startswith("    .")]


def header_write_size(line):
    """The size a `proxy_set_header_map_pairs` line writes, else None."""
    m = re.fullmatch(r"    proxy_set_header_map_pairs\(\d+, (\d+)\)", line)
    return int(m.group(1)) if m else None


def compare(meter, floor, workload, a, b):
    """Prints whether the floor's exchange `b` makes the hostcalls of llm-meter's `a`."""
    head = f"({floor}) vs ({meter}), {workload}"
    if a == b:
        print(f"{head}: the same {len(calls(a))} hostcalls, callbacks, arguments and allocations")
        return
    # llm-meter's x-ratelimit-reset-* values are 2 or 3 characters ("8s", "42s") by the second
    # of the minute; the floor writes 3.
    sizes = [(header_write_size(x), header_write_size(y)) for x, y in zip(a, b) if x != y]
    if len(a) == len(b) and sizes and all(x is not None and y is not None and 0 < y - x <= 2 for x, y in sizes):
        print(f"{head}: the same {len(calls(a))} hostcalls, callbacks, arguments and allocations, but the response "
              f"header map written is {', '.join(f'{x} vs {y}' for x, y in sizes)} bytes (llm-meter's "
              "x-ratelimit-reset-* values have 2 characters in the last 10 s of a minute, the floor's 3)")
        return
    print(f"{head}: {len(calls(b))} vs {len(calls(a))} hostcalls; differences:")
    for line in difflib.unified_diff(a, b, f"({meter})", f"({floor})", lineterm="", n=1):
        print("   " + line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("setups", nargs="*", default=["b", "f", "c", "fc"])
    ap.add_argument("--requests", type=int, default=3, help="exchanges per workload (the last one is shown)")
    args = ap.parse_args()
    bench.WORK.mkdir(parents=True, exist_ok=True)
    if any(s in bench.FLOOR_SETUPS for s in args.setups):
        bench.build_floor()
    files = {"json": bench.chat_completion_json(), "sse": bench.sse_stream(200)}
    paths = {}
    for k, body in files.items():
        paths[k] = bench.WORK / f"body_{k}.txt"
        paths[k].write_bytes(body)
    for k, _, _ in bench.MEMORY_SHAPES:
        paths[k] = paths["json"]
    procs = bench.PROCS = bench.Procs(pin=False)
    try:
        (bench.WORK / "upstream.yaml").write_text(bench.upstream_yaml(paths))
        procs.upstream = procs.start("upstream", [bench.ENVOY, "-c", bench.WORK / "upstream.yaml", "--concurrency",
                                                  "1", "--disable-hot-restart", "--log-level", "warn"])
        bench.wait_ready(f"http://127.0.0.1:{bench.PORT['up_admin']}/ready", procs.upstream, "the upstream Envoy")
        shipped = bench.SHIPPED.read_text()
        got = {}
        for workload in ("chat", "stream"):
            for setup in args.setups:
                last, ticks = trace(procs, shipped, setup, workload, args.requests)
                got[setup, workload] = last
                print(f"== ({setup}) {bench.SETUPS[setup]}, {workload}: last of {args.requests} exchanges, "
                      f"{len(calls(last))} hostcalls")
                print("\n".join(last))
                tick_calls = [line.strip() for t in ticks for line in calls(t)]
                kinds = sorted({c.split("(")[0] for c in tick_calls})
                print(f"   timer: {len(ticks)} ticks, {len(tick_calls)} hostcalls in them ({', '.join(kinds) or '-'})")
                print()
        for floor, meter in MIRRORS.items():
            for workload in ("chat", "stream"):
                if (floor, workload) not in got or (meter, workload) not in got:
                    continue
                compare(meter, floor, workload, got[meter, workload], got[floor, workload])
    finally:
        procs.stop_all()


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        print(f"trace failed: {e}", file=sys.stderr)
        sys.exit(1)
