#!/usr/bin/env python3
"""The proxy-wasm hostcalls a filter makes per exchange, as a real Envoy reports them.

    tools/floor-filter/trace.py [--requests N] [SETUP ...]      (default setups: b f c fc g fg)

Runs each setup of scripts/bench.py (its configurations: (b) llm-meter with metrics, (c) with 2
limit rules, (g) with one global rule, (f)/(fc)/(fg) the floor filter in the mode of (b)/(c)/(g))
as one front Envoy with the `wasm` log component at trace level, behind the bench's upstream, and
sends it N chat requests and then N streaming ones (the bench's bodies and headers, one keep-alive
connection); (g) and (fg) get N chat requests only, in the configuration of the bench's
global-limit workloads (the set_metadata filter, the rate limit service's cluster), calling a
llm-rls on a redis-server started here as the bench starts them (`just rls`, redis-server). At trace
level Envoy's V8 runtime logs every call into the VM (`[host->vm] proxy_on_request_body(2, 208,
1)`) and every hostcall out of it (`[vm->host] env.proxy_get_buffer_bytes(1, 0, 208, ...)`).
Printed per setup and workload: the last exchange's callbacks and hostcalls, with pointers left
out and sizes kept (buffer sizes, key and value lengths, header map sizes, the allocation sizes the
host asks the VM for), and what the root context's timer did meanwhile. Then each floor setup is
compared line by line with the llm-meter setup it mirrors ((f) with (b), (fc) with (c), (fg) with
(g)).

Needs what the bench needs (`just envoy`, `just build`, for (g)/(fg) `just rls` and redis-server;
the floor filter is built here). Ports 29001, 29100-29102, 29190, 29901, and two free ones (llm-rls,
redis-server). Logs: .run/floor-trace/.
"""

import argparse
import difflib
import http.client
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402  (scripts/bench.py: its configurations, bodies and process handling)

bench.WORK = ROOT / ".run" / "floor-trace"
bench.PORT.update(up_json=29100, up_sse=29101, up_big=29102, up_admin=29190)
FRONT, ADMIN = 29001, 29901
MIRRORS = {"f": "b", "fc": "c", "fg": "g"}
# The setups that call the rate limit service: traced in the bench's global-limit configuration,
# with chat requests only (as the bench's global-limit workloads send).
GLOBAL = ("g", "fg")

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
    # The gRPC service (serialized GrpcService), service and method names, initial metadata and
    # message sizes, and the timeout (ms).
    "proxy_grpc_call": (1, 3, 5, 7, 9, 10),
    "proxy_continue_stream": (0,),  # stream type (0: the request)
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
    """Per HTTP context: its callbacks and the hostcalls each made, normalized; and the timer's.

    Envoy delivers a gRPC call's answer to the root context (`proxy_on_grpc_receive(root, token,
    size)`); the SDK then makes the HTTP context that made the call the effective one
    (`proxy_set_effective_context(ctx)`): from there on, that callback is counted as the
    exchange's. Answers no HTTP context takes (calls the root context made) are left out."""
    root, per, ticks, current, pending = None, {}, [], None, None
    periods = set()
    for direction, name, args, ret in events:
        if name == "proxy_set_tick_period_milliseconds" and args:
            periods.add(int(args[0]))
        if direction == "host->vm" and name != "proxy_on_memory_allocate":
            ctx = args[0] if args else None
            pending = None
            if name == "proxy_on_context_create" and len(args) == 2 and args[1] == "0":
                root = ctx
            if name == "proxy_on_tick":
                current = ["proxy_on_tick"]
                ticks.append(current)
                continue
            if name.startswith("proxy_on_grpc_") and ctx == root:
                # The token is Envoy's call counter; the rest (size or status) is kept.
                current = pending = [f"{name}({', '.join(['root', 'token'] + args[2:])})"]
                continue
            if ctx == root or ctx is None:
                current = None
                continue
            current = per.setdefault(ctx, [])
            current.append(f"{name}({', '.join(['ctx'] + args[1:])})")
            continue
        if name == "proxy_set_effective_context" and pending is not None and current is pending:
            target = args[0] if args else None
            if target in per:
                per[target].extend(pending)
                current = per[target]
            else:
                current = None
            pending = None
        if current is None:
            continue
        if name == "proxy_on_memory_allocate":
            current.append(f"    . VM allocates {args[0]} bytes for the host")
            continue
        kept = ", ".join(args[i] for i in KEEP.get(name, ()) if i < len(args))
        current.append(f"    {name}({kept})" + (f" -> status {ret}" if ret else ""))
    return per, ticks, periods


# What wrk sends (bench/chat.lua): the bodies, and the headers but Host and Content-Length.
CHAT_BODY = ('{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},'
             '{"role":"user","content":"Summarize the plot of Hamlet in two sentences, please."}],'
             '"max_tokens":256,"temperature":0.7}')
STREAM_BODY = ('{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},'
               '{"role":"user","content":"Summarize Hamlet in two sentences."}],'
               '"stream":true,"stream_options":{"include_usage":true},"max_tokens":256}')


# The global-limit workload: the x-api-key values rotate over 8, as bench/chat.lua rotates them (and
# the floor of (g) its 8 keys), and the exchange shown is the 9th or later, so that its key is not
# new to the rate limit service (whose answer to a counter's first hit has no reset time: shorter).
GLOBAL_KEYS = 8


def send(port, stream, n, keys=1):
    body = (STREAM_BODY if stream else CHAT_BODY).encode()
    headers = {"content-type": "application/json", "x-api-key": "sk-bench-0001", "x-app-id": "bench",
               "authorization": f"Bearer {bench.MASTER_KEY}", "content-length": str(len(body))}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for i in range(n):
        headers["x-api-key"] = f"sk-bench-{i % keys + 1:04d}"
        conn.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200 or b'"completion_tokens"' not in data:
            raise RuntimeError(f"unexpected answer {r.status}: {data[:200]!r}")
    conn.close()


def trace(procs, shipped, setup, workload, n, rls_port=None):
    stream = workload == "stream"
    upstream = bench.PORT["up_sse" if stream else "up_json"]
    name = f"front_{setup}_{workload}"
    log_path = bench.WORK / f"{name}.log"
    log_path.unlink(missing_ok=True)
    cfg = bench.front_yaml(setup, FRONT, ADMIN, upstream, shipped, rls_port)
    (bench.WORK / f"{name}.yaml").write_text(cfg)
    p = procs.start(name, [bench.ENVOY, "-c", bench.WORK / f"{name}.yaml", "--concurrency", "1",
                           "--disable-hot-restart", "--log-level", "warn", "--component-log-level", "wasm:trace"])
    bench.wait_ready(f"http://127.0.0.1:{ADMIN}/ready", p, f"Envoy {name}")
    time.sleep(0.3)  # a timer tick or two before the traffic
    if rls_port is not None:
        n = max(n, GLOBAL_KEYS + 1)
    send(FRONT, stream, n, GLOBAL_KEYS if rls_port is not None else 1)
    time.sleep(0.6)  # and after it: the counter flush
    procs.stop(p)
    per, ticks, periods = exchanges(parse(log_path.read_text(errors="replace")))
    if len(per) < n:
        raise RuntimeError(f"{name}: {len(per)} exchanges in the trace, expected {n} (no wasm trace?)")
    last = per[list(per)[-1]]
    return last, ticks, n, periods


def calls(lines):
    return [line for line in lines if line.startswith("    ") and not line.startswith("    .")]


def header_write_size(line):
    """The size a `proxy_set_header_map_pairs` line writes, else None."""
    m = re.fullmatch(r"    proxy_set_header_map_pairs\(\d+, (\d+)\)", line)
    return int(m.group(1)) if m else None


GRPC_ANSWER = re.compile(r"(proxy_on_grpc_receive\(root, token, |    proxy_get_buffer_bytes\(5, 0, |    \. VM allocates )(\d+)")


def without_answer_sizes(lines):
    """`lines` with the size of the rate limit service's answers left out (the size of the gRPC
    message, of its copy into the VM and of the allocation for it), and those sizes."""
    out, sizes, answer = [], [], False
    for line in lines:
        m = GRPC_ANSWER.match(line)
        if m and (not m.group(1).startswith("    .") or answer):
            answer = m.group(1).startswith("proxy_on_grpc_receive") or m.group(1).startswith("    proxy_get")
            if m.group(1).startswith("proxy_on_grpc_receive"):
                sizes.append(int(m.group(2)))
            line = line[:m.start(2)] + "N" + line[m.end(2):]
        else:
            answer = False
        out.append(line)
    return out, sizes


def compare(meter, floor, workload, a, b):
    """Prints whether the floor's exchange `b` makes the hostcalls of llm-meter's `a`."""
    head = f"({floor}) vs ({meter}), {workload}"
    if a == b:
        print(f"{head}: the same {len(calls(a))} hostcalls, callbacks, arguments and allocations")
        return
    # The rate limit service's answer is 31 or 32 bytes (the nanoseconds of its reset time are a
    # varint: 4 or 5 bytes): what the service sent, not what the filter did.
    (na, sa), (nb, sb) = without_answer_sizes(a), without_answer_sizes(b)
    if na == nb and sa != sb:
        print(f"{head}: the same {len(calls(a))} hostcalls, callbacks, arguments and allocations, but the rate "
              f"limit service's answer was {', '.join(f'{x} vs {y}' for x, y in zip(sa, sb))} bytes (the "
              "nanoseconds of its reset time are a varint)")
        return
    # llm-meter's x-ratelimit-reset-* values follow the window: (c)'s are 2 or 3 characters ("8s",
    # "42s") by the second of the minute and 5 in its last second ("420ms"), the floor's 3; (g)'s,
    # from the rate limit service, "9s" to "1m0s" (or "420ms"), the floor's 4. (c) writes two.
    sizes = [(header_write_size(x), header_write_size(y)) for x, y in zip(a, b) if x != y]
    if len(a) == len(b) and sizes and all(x is not None and y is not None and 0 < abs(y - x) <= 4 for x, y in sizes):
        print(f"{head}: the same {len(calls(a))} hostcalls, callbacks, arguments and allocations, but the response "
              f"header map written is {', '.join(f'{x} vs {y}' for x, y in sizes)} bytes (llm-meter's "
              "x-ratelimit-reset-* values follow the window: 2 to 5 characters; the floor's are fixed)")
        return
    print(f"{head}: {len(calls(b))} vs {len(calls(a))} hostcalls; differences:")
    for line in difflib.unified_diff(a, b, f"({meter})", f"({floor})", lineterm="", n=1):
        print("   " + line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("setups", nargs="*", default=["b", "f", "c", "fc", "g", "fg"])
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
        rls_port = None
        if any(s in GLOBAL for s in args.setups):
            for path, how in ((bench.RLS, "just rls"), (Path("/usr/bin/redis-server"), "apt-get install redis-server")):
                if not (path.exists() or shutil.which(path.name)):
                    raise RuntimeError(f"(g) and (fg) need {path.name} ({how})")
            rls_port, _ = bench.rate_limit_service(procs)
        got, timers = {}, {}
        for workload in ("chat", "stream", "chat-global"):
            for setup in args.setups:
                if (setup in GLOBAL) != (workload == "chat-global"):
                    continue
                last, ticks, n, periods = trace(procs, shipped, setup, workload, args.requests,
                                                rls_port if workload == "chat-global" else None)
                got[setup, workload] = last
                timers[setup] = periods
                print(f"== ({setup}) {bench.SETUPS[setup]}, {workload}: last of {n} exchanges, "
                      f"{len(calls(last))} hostcalls")
                print("\n".join(last))
                tick_calls = [line.strip() for t in ticks for line in calls(t)]
                kinds = sorted({c.split("(")[0] for c in tick_calls})
                print(f"   timer: every {'/'.join(map(str, sorted(periods))) or '-'} ms; {len(ticks)} ticks, "
                      f"{len(tick_calls)} hostcalls in them ({', '.join(kinds) or '-'}; the log interleaves "
                      "the main thread's and the worker's)")
                print()
        for floor, meter in MIRRORS.items():
            for workload in ("chat", "stream", "chat-global"):
                if (floor, workload) not in got or (meter, workload) not in got:
                    continue
                compare(meter, floor, workload, got[meter, workload], got[floor, workload])
            if floor in timers and meter in timers and timers[floor] != timers[meter]:
                print(f"({floor}) vs ({meter}): the timer's period differs: {sorted(timers[floor])} vs "
                      f"{sorted(timers[meter])} ms")
        if rls_port is not None:
            # What the service made of the calls: (g)'s counters (the SHA-256 of each x-api-key) and
            # the floor's (its stand-in keys, `f0...0` to `f0...7`) should differ in the key only.
            _, keys = bench.redis_command(procs.redis_port, "KEYS", "*")
            others = sorted(k for k in keys if "counter:" not in k)
            floor_keys = sorted(k for k in keys if "counter:" in k and re.search(r"f0{24}[0-9a-f]{7}", k))
            meter_keys = sorted(k for k in keys if "counter:" in k and k not in floor_keys)
            if others:
                print(f"redis-server's other keys: {others}")
            print(f"the rate limit service's counters: {len(meter_keys)} of (g), {len(floor_keys)} of (fg); e.g.")
            for k in meter_keys[:1] + floor_keys[:1]:
                print(f"   {k!r}")
    finally:
        procs.stop_all()


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        print(f"trace failed: {e}", file=sys.stderr)
        sys.exit(1)
