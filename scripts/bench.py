#!/usr/bin/env python3
"""`just bench`: what llm-meter costs an Envoy, measured against plain Envoy and Python proxies.

One machine, one run, the same load from wrk against every setup, in alternating rounds:

  a        plain Envoy (the shipped envoy/envoy.yaml without the wasm filter)
  b        Envoy + llm-meter, metrics only (the shipped metrics/pricing configuration, no limits)
  bo       (b) with per-request records off (`records.enabled: false`): what publishing a record
           per request costs is (b) against (bo)
  c        Envoy + llm-meter, metrics + 2 rate-limit rules (rpm and tpm per x-api-key, set so high
           that nothing is ever rejected)
  r        Envoy + llm-meter, metrics + resilience (b plus a circuit breaker and fallback chains;
           the upstream never fails, so no circuit opens: what resilience costs while all is well)
  py       a typical Python exporter proxy: FastAPI + uvicorn + httpx + prometheus_client
           (bench/py_proxy.py, venv .venv-bench from bench/requirements-py-proxy.txt)
  litellm  LiteLLM proxy (venv .venv-litellm from bench/requirements-litellm.txt), when it installs
  n        Envoy + an empty proxy-wasm filter (generated here, ~400 bytes) in llm-meter's place:
           what any wasm filter costs in Envoy + V8, to tell it apart from llm-meter's own work
  f, fc    only with --floor: Envoy + the hostcall floor filter (tools/floor-filter, built here with
           `cargo build --release --target wasm32-wasip1 -p floor-filter`) in llm-meter's place. (f)
           makes the hostcalls (b) makes per exchange, (fc) those of (c), in the same order with the
           same sizes, and does nothing else: what any filter with llm-meter's features pays on this
           Envoy, the most (b) and (c) could reach. They also run in stream-trickle; (f), not (fc),
           also in the global-limit workloads, next to (fg) below

The global-limit workloads (chat-global, chat-global-1conn) run four setups of their own, all
calling one rate limit service (target/release/llm-rls, `just rls`, on a redis-server started here
on a free port, no persistence), pinned off the proxy's CPU:

  a        plain Envoy
  b        Envoy + llm-meter, metrics only
  g        (b) plus one `scope: global` request rule (per x-api-key, a limit nothing reaches)
  ng       plain Envoy + Envoy's native C++ rate limit filter (envoy.filters.http.ratelimit) with
           the equivalent descriptor (domain llm, rule=rpm, key=<x-api-key>, the same limit as a
           `limit` override, which llm-rls counts by), answering with x-ratelimit-limit, -remaining
           and -reset (enable_x_ratelimit_headers: DRAFT_VERSION_03) as (g) answers with its
           x-ratelimit-*-requests headers; --native-without-headers leaves them out

With --floor they also run (f) and

  fg       Envoy + the hostcall floor filter making (b)'s hostcalls plus those (g) makes for its
           global rule: per request one gRPC ShouldRateLimit call (the same cluster, service,
           method and timeout, a RateLimitRequest of the size and shape (g) sends, over 8 keys as
           (g)'s 8 x-api-key values), the request paused until the answer arrives, the answer
           copied into the VM and the request resumed, and (g)'s other hostcall for the rule (the
           x-ratelimit-* headers written); nothing decoded or checked, and a 100 ms
           timer as (g)'s. (fg) - (f) is the least a proxy-wasm filter's global check costs on this
           Envoy, printed next to (g) - (b) and (ng) - (a), with whether even it is within 1.2x of
           the native filter

Every front of those workloads also carries an `envoy.filters.http.set_metadata` filter (the
dynamic metadata (ng)'s override is read from), so that (g) - (b) and (ng) - (a) (and (fg) - (f))
all isolate the rate limit check.

The shipped JSON access log is left out of every setup (it would measure Envoy's logger, the same
in each); `--access-log` keeps it in all of them, printing every record.

All forward to one upstream that is not the bottleneck: a second Envoy whose listeners answer
with `direct_response` (an OpenAI chat completion JSON of ~1 KB with `usage`, or an SSE stream of
200 `chat.completion.chunk` events + a usage chunk + `data: [DONE]`). Workloads: non-streaming
chat and streaming chat (requests WITH stream_options.include_usage, so llm-meter has nothing to
inject). The stream-trickle workload instead streams from tools/mock-llm (target/release/mock-llm,
`just mock`), which writes each of the stream's events as a chunk of its own 2 ms apart, as real
gateways do: the load is bench/sse_client.py (N streams, C at a time), the measure the front
Envoy's CPU time per stream. Then a memory check: 10 MB SSE responses streamed concurrently
through Envoy+llm-meter and through plain Envoy, recording Envoy's /memory and the process RSS
before, during (peak) and after.

CPU layout on a 2-core machine (default, when `taskset` exists): the proxy under test (each front
Envoy with --concurrency 1, each Python proxy with one worker) on CPU 0; wrk (1 thread) and the
upstream Envoy on CPU 1. The proxy is then the only thing on its core and the bottleneck, so the
throughput ratio is its CPU cost ratio. `--no-pin` leaves placement to the scheduler.

Usage: scripts/bench.py [--smoke] [--rounds N] [--duration S] [--warmup S] [--connections N]
                        [--concurrency N] [--no-pin] [--no-litellm] [--no-python] [--no-noop] [--floor]
                        [--no-memory] [--workloads chat,chat-1conn,stream,stream-trickle,chat-global,
                        chat-global-1conn] [--quiet-wait S] [--retries N] [--perf] [--trickle-streams N]
                        [--trickle-concurrency N] [--no-hostcalls] [--mem-streams N] [--mem-rounds N]
                        [--mem-include-usage]
Environment: BENCH_SMOKE=1, BENCH_ROUNDS, BENCH_DURATION, BENCH_WARMUP, BENCH_CONNECTIONS,
BENCH_CONCURRENCY, BENCH_PIN=0, BENCH_LITELLM=0, BENCH_PYTHON=0, BENCH_NOOP=0, BENCH_FLOOR=1, BENCH_MEMORY=0,
BENCH_WORKLOADS, BENCH_QUIET_WAIT, BENCH_RETRIES, BENCH_PERF=1, BENCH_HOSTCALLS=0,
BENCH_TRICKLE_STREAMS, BENCH_TRICKLE_CONCURRENCY. The machine may be shared: before each
measurement the script waits (up to --quiet-wait s) until other processes are idle, and repeats a
measurement during which they used more than 10% of a core (at most --retries times).
At the start (not in --smoke) `EXCHANGE_HOSTCALLS_ONLY=1 cargo bench -p llm-meter --bench exchange`
counts the filter's hostcalls per exchange; at the end issue 19's targets are printed, met or not.
--smoke: 1 round x 2 s (20 trickled streams), no LiteLLM, a small memory check, no hostcall count:
proves the harness works, asserts no timing. Ports: 19001-19012, 19100-19103, 19190, 19901-19912,
and two free ones (redis-server, llm-rls); with --floor also 19013-19015 and 19913-19915. Work files
and logs: .run/bench/.
"""

import argparse
import atexit
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".run" / "bench"
ENVOY = ROOT / ".venv" / "bin" / "envoy"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "llm_meter.wasm"
SHIPPED = ROOT / "envoy" / "envoy.yaml"
LUA = ROOT / "bench" / "chat.lua"
PY_VENV = ROOT / ".venv-bench"
PY_REQS = ROOT / "bench" / "requirements-py-proxy.txt"
LL_VENV = ROOT / ".venv-litellm"
LL_REQS = ROOT / "bench" / "requirements-litellm.txt"
SSE_CLIENT = ROOT / "bench" / "sse_client.py"
MOCK = ROOT / "target" / "release" / "mock-llm"
RLS = ROOT / "target" / "release" / "llm-rls"
SHIPPED_GLOBAL = ROOT / "envoy" / "envoy-global.yaml"
FLOOR_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "floor_filter.wasm"
# --floor: the hostcall floor filter's setups and the configuration selecting its mode: the
# hostcalls of (b) (no limits) or of (c) (2 limit rules), or (fg, the global-limit workloads only)
# those of (b) plus (g)'s global rule: one ShouldRateLimit call per request to the rate limit service,
# the request paused until the answer. See tools/floor-filter. (fg)'s `global` is filled in below,
# from GLOBAL_RULE.
FLOOR_SETUPS = {"f": {"limits": 0}, "fc": {"limits": 2}, "fg": {"limits": 0}}

PORT = {
    "a": 19001, "b": 19002, "c": 19003, "py": 19004, "litellm": 19005, "n": 19006, "r": 19007, "bo": 19008,
    "g": 19009, "ng": 19010, "mem_a": 19011, "mem_b": 19012, "f": 19013, "fc": 19014, "fg": 19015,
    "up_json": 19100, "up_sse": 19101, "up_big": 19102, "up_trickle": 19103, "up_admin": 19190,
    "a_admin": 19901, "b_admin": 19902, "c_admin": 19903, "n_admin": 19906, "r_admin": 19907, "bo_admin": 19908,
    "g_admin": 19909, "ng_admin": 19910, "mem_a_admin": 19911, "mem_b_admin": 19912,
    "f_admin": 19913, "fc_admin": 19914, "fg_admin": 19915,
}
LIMIT_RULES = [
    {"name": "rpm", "key": "header:x-api-key", "requests_per_minute": 100000000},
    {"name": "tpm", "key": "header:x-api-key", "tokens_per_minute": 100000000000},
]
# Setup (g): one global request rule, per x-api-key, counted by the rate limit service (llm-rls);
# the limit is never reached (the run fails on a rejection), and the timeout (1 s, as (ng)'s) is
# generous: a late answer fails the run too, and this VM is shared. (ng) sends the service the same
# descriptor: domain, rule, key (here the header's value; llm-meter sends its SHA-256), limit.
GLOBAL_LIMIT = 1000000000  # per minute: fits the protocol's uint32
GLOBAL_RULE = {"name": "rpm", "key": "header:x-api-key", "requests_per_minute": GLOBAL_LIMIT, "scope": "global",
               "service": {"cluster": "rate_limit_service", "domain": "llm", "timeout_ms": 1000,
                           "failure_mode": "allow"}}
# (fg): the floor's call is (g)'s: the same cluster, domain, rule name, limit and timeout; the
# descriptor's key is one of `keys` fixed 32-character stand-ins for llm-meter's hashes of the
# x-api-key values (bench/chat.lua rotates 8), taken in turn, so the service counts as many keys.
FLOOR_SETUPS["fg"]["global"] = {"cluster": GLOBAL_RULE["service"]["cluster"], "domain": GLOBAL_RULE["service"]["domain"],
                                "rule": GLOBAL_RULE["name"], "requests_per_minute": GLOBAL_RULE["requests_per_minute"],
                                "timeout_ms": GLOBAL_RULE["service"]["timeout_ms"], "keys": 8}
# Setup (r): the configuration of issue 16. The benchmark's model (gpt-4o) has its own label, so it
# has a circuit (one shared-data read per request) and the `*` chain; it never fails.
RESILIENCE = {
    "circuit_breaker": {"failures": 3, "open_seconds": 30, "half_open_requests": 1,
                        "on": ["upstream_rate_limit", "server_error", "timeout", "network"]},
    "fallbacks": {"gpt-4.1": ["claude-sonnet-4", "gemini-2.5-flash"], "*": ["deepseek-v3.2"]},
}
SETUPS = {
    "a": "plain Envoy (no wasm)",
    "b": "Envoy + llm-meter (metrics)",
    "bo": "Envoy + llm-meter (records off)",
    "c": "Envoy + llm-meter (metrics + 2 limits)",
    "r": "Envoy + llm-meter (metrics+resilience)",
    "py": "Python proxy (FastAPI+httpx+prom)",
    "litellm": "LiteLLM proxy",
    "n": "Envoy + empty wasm filter (V8)",
    "g": "Envoy + llm-meter (metrics + global)",
    "ng": "Envoy + native ratelimit filter (C++)",
    "f": "Envoy + hostcall floor of (b)",
    "fc": "Envoy + hostcall floor of (c)",
    "fg": "Envoy + hostcall floor of (g)",
}
# name: (streaming, wrk connections (None: --connections), title, description)
WORKLOADS = {
    "chat": (False, None, "non-streaming chat",
             "POST /v1/chat/completions (208-byte body) -> 1 KB JSON with usage"),
    "chat-1conn": (False, 1, "non-streaming chat, one connection (latency without queueing)",
                   "the same with a single wrk connection: one request at a time, so latency is "
                   "the proxy's own added time, not a queue"),
    "stream": (True, None, "streaming chat (SSE, include_usage sent by the client)",
               "streaming request WITH stream_options.include_usage -> SSE: 200 chat.completion.chunk "
               "events + usage chunk + [DONE], {sse} bytes"),
    "stream-trickle": (True, None, "streaming chat, trickled (one SSE event per chunk, 2 ms apart)",
                       "the streaming request -> tools/mock-llm: 200 chat.completion.chunk events + usage "
                       "chunk + [DONE], each event its own chunk (one write, so one body callback each) "
                       "2 ms apart"),
    "chat-global": (False, None, "non-streaming chat, global limit: llm-meter's vs Envoy's native rate limit filter",
                    "the chat request through (a) plain, (b) llm-meter, (g) llm-meter + a global rule, (ng) "
                    "plain + the native ratelimit filter; (g) and (ng) call one llm-rls on redis-server"),
    "chat-global-1conn": (False, 1, "non-streaming chat, global limit, one connection (latency without queueing)",
                          "the same with a single wrk connection: the rate limit checks' own added latency"),
}
ENVOY_SETUPS = ("a", "n", "b", "bo", "c", "r", "g", "ng", "f", "fc", "fg")
# The llm-meter setups, whose metering is checked after each workload.
METER_SETUPS = ("b", "bo", "c", "r", "g")
TRICKLE = "stream-trickle"
GLOBAL_WORKLOADS = ("chat-global", "chat-global-1conn")
GLOBAL_SETUPS = ("a", "b", "g", "ng")
# --floor adds these to the global-limit workloads: (fg) - (f) is the floor of (g) - (b).
GLOBAL_FLOOR_SETUPS = ("f", "fg")
# The setups that call the rate limit service (their fronts get its cluster).
SERVICE_SETUPS = ("g", "ng", "fg")
# The trickled stream (tools/mock-llm's x-mock-* knobs): 198 content events between the role and
# the finish chunks (200 chat.completion.chunk events, as in `stream`), the usage chunk, [DONE].
TRICKLE_EVENTS = 201  # SSE events per stream, [DONE] not counted
TRICKLE_GAP_MS = 2
TRICKLE_HEADERS = {"x-mock-chunk-delay-ms": str(TRICKLE_GAP_MS), "x-mock-completion-tokens": "198",
                   "x-mock-prompt-tokens": "29", "x-app-id": "bench"}
CPU_PROXY, CPU_LOAD = "0", "1"
# LiteLLM's proxy refuses to start without a master key, and then checks it on every request; all
# setups get the same `authorization: Bearer` header. A local benchmark value, not a credential.
MASTER_KEY = "sk-bench-5f0c3a9e7d2b4186a1c9e0f3b7d64a25c8e1f0a3b6d9c2e5"


def log(msg=""):
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes: every one we start is in its own session (Ctrl-C reaches only us) and is stopped by
# its own process group id when we exit, however we exit.

class Procs:
    def __init__(self, pin):
        self.pin = pin
        self.running = []

    def start(self, name, argv, cpus=None, env=None, cwd=ROOT):
        if cpus is not None and self.pin:
            argv = ["taskset", "-c", cpus] + list(argv)
        logf = open(WORK / f"{name}.log", "ab")
        p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=logf,
                             stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd)
        p.bench_name = name
        logf.close()
        self.running.append(p)
        return p

    def signal(self, p, sig):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    def pause(self, p):
        """Stops a proxy that is not under test (LiteLLM alone uses ~10% of a core when idle)."""
        self.signal(p, signal.SIGSTOP)

    def resume(self, p):
        self.signal(p, signal.SIGCONT)

    def stop(self, p):
        if p not in self.running:
            return
        self.running.remove(p)
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        # Anything the process left in its group (uvicorn/LiteLLM workers).
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self):
        for p in list(reversed(self.running)):
            self.stop(p)


PROCS = None


def on_signal(signum, _frame):
    print(f"\nbench: {signal.Signals(signum).name}, stopping the processes it started", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def cleanup():
    if PROCS is not None:
        PROCS.stop_all()


# ---------------------------------------------------------------------------------------------
# HTTP helpers (stdlib only: this script runs on the system python3).

def http(url, data=None, headers=None, timeout=5.0):
    status, body, _ = http_with_headers(url, data, headers, timeout)
    return status, body


def http_with_headers(url, data=None, headers=None, timeout=5.0):
    """`http`, plus the response headers."""
    req = urllib.request.Request(url, data=data, headers=headers or {},
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def wait_ready(url, proc, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if http(url, timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    tail = (WORK / f"{proc.bench_name}.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{what} did not come up on {url}; its log ends with:\n{tail}")


def port_free(port):
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# ---------------------------------------------------------------------------------------------
# Response bodies served by the upstream Envoy.

CHUNK_ID = "chatcmpl-BenchX9q2mW7cT4rYz1LkPq8vN3sD"
WORDS = ("Hamlet, Prince of Denmark, learns from his father's ghost that his uncle Claudius "
         "murdered the king and married Queen Gertrude; feigning madness, he hesitates, stages a "
         "play to prove the guilt, kills Polonius by mistake and is sent to England. He returns, "
         "duels Laertes, and the tragedy ends with the deaths of the whole royal family and "
         "Fortinbras taking the throne of Denmark as the last survivor tells the story.").split()


def chat_completion_json():
    content = " ".join(WORDS[:60])
    body = {
        "id": CHUNK_ID, "object": "chat.completion", "created": 1763900000,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content,
                                              "refusal": None, "annotations": []},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 31, "completion_tokens": 78, "total_tokens": 109,
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                "accepted_prediction_tokens": 0,
                                                "rejected_prediction_tokens": 0}},
        "service_tier": "default", "system_fingerprint": "fp_f9f4fb6dbf",
    }
    return json.dumps(body, indent=2).encode() + b"\n"


def sse_event(obj):
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chunk_event(delta, finish=None):
    return sse_event({
        "id": CHUNK_ID, "object": "chat.completion.chunk", "created": 1763900000,
        "model": "gpt-4o-2024-08-06", "service_tier": "default",
        "system_fingerprint": "fp_f9f4fb6dbf",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    })


def usage_event(prompt, completion):
    return sse_event({
        "id": CHUNK_ID, "object": "chat.completion.chunk", "created": 1763900000,
        "model": "gpt-4o-2024-08-06", "service_tier": "default",
        "system_fingerprint": "fp_f9f4fb6dbf", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                "accepted_prediction_tokens": 0,
                                                "rejected_prediction_tokens": 0}},
    })


def sse_stream(events, piece=None):
    """`events` chunk.completion.chunk events: role, events-2 content pieces, finish; usage; DONE."""
    out = [chunk_event({"role": "assistant", "content": "", "refusal": None})]
    for i in range(events - 2):
        out.append(chunk_event({"content": piece if piece else " " + WORDS[i % len(WORDS)]}))
    out.append(chunk_event({}, "stop"))
    out.append(usage_event(29, events - 2))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def big_sse(size):
    """About `size` bytes of SSE: ~1 KB events, then the usage chunk and [DONE]."""
    piece = (" lorem ipsum dolor sit amet" * 40)[:800]
    one = len(chunk_event({"content": piece}))
    return sse_stream(max(3, size // one), piece)


# The memory check's responses: (name, size in MiB, one event?). Each is served under /NAME/.
MEMORY_SHAPES = [("sse-1m", 1, False), ("sse-10m", 10, False), ("sse-50m", 50, False), ("one-event-10m", 10, True)]


def one_event_sse(size):
    """A stream whose content is one `size`-byte event (no line breaks), then usage and [DONE]."""
    piece = ("x" * 1023 + " ") * (size // 1024)
    return b"".join([chunk_event({"role": "assistant", "content": piece}),
                     chunk_event({}, "stop"), usage_event(29, size // 4), b"data: [DONE]\n\n"])


# ---------------------------------------------------------------------------------------------
# An empty proxy-wasm filter (setup n): every callback llm-meter gets, each returning at once. It
# prices what any wasm filter pays in Envoy + V8 per request (context create, one VM entry per
# callback), apart from what llm-meter itself does.

def noop_wasm():
    def leb(n):
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            if n:
                out.append(b | 0x80)
            else:
                out.append(b)
                return bytes(out)

    def vec(items):
        return leb(len(items)) + b"".join(items)

    def section(sid, payload):
        return bytes([sid]) + leb(len(payload)) + payload

    def name(text):
        return leb(len(text)) + text.encode()

    i32 = b"\x7f"
    types = [([], []), ([i32], [i32]), ([i32, i32], []), ([i32, i32], [i32]), ([i32] * 3, [i32]), ([i32], [])]
    const = lambda v: b"\x41" + bytes([v]) + b"\x0b"  # i32.const v (0..63); end
    funcs = [  # (export name, type index, body)
        ("proxy_abi_version_0_2_1", 0, b"\x0b"),
        ("proxy_on_memory_allocate", 1, b"\x41\x80\x08\x0b"),  # i32.const 1024: never called (no data is fetched)
        ("proxy_on_context_create", 2, b"\x0b"),
        ("proxy_on_vm_start", 3, const(1)),
        ("proxy_on_configure", 3, const(1)),
        ("proxy_on_request_headers", 4, const(0)),   # 0: Continue
        ("proxy_on_request_body", 4, const(0)),
        ("proxy_on_response_headers", 4, const(0)),
        ("proxy_on_response_body", 4, const(0)),
        ("proxy_on_log", 5, b"\x0b"),
        ("proxy_on_done", 1, const(1)),
        ("proxy_on_delete", 5, b"\x0b"),
    ]
    return (b"\0asm\x01\0\0\0"
            + section(1, vec([b"\x60" + vec(p) + vec(r) for p, r in types]))
            + section(3, vec([leb(t) for _, t, _ in funcs]))
            + section(5, vec([b"\x00\x02"]))  # memory: 2 pages
            + section(7, vec([name("memory") + b"\x02\x00"]
                             + [name(n) + b"\x00" + leb(i) for i, (n, _, _) in enumerate(funcs)]))
            + section(10, vec([leb(len(b"\x00" + body)) + b"\x00" + body for _, _, body in funcs])))


# ---------------------------------------------------------------------------------------------
# Envoy configurations.

ROUTER = """          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"""


def upstream_yaml(files):
    """The upstream: one Envoy, one direct_response listener per body kind."""
    listeners = []
    for name, port, routes in [
        ("up_json", PORT["up_json"], [("/", files["json"], "application/json")]),
        ("up_sse", PORT["up_sse"], [("/", files["sse"], "text/event-stream")]),
        ("up_big", PORT["up_big"], [(f"/{name}/", files[name], "text/event-stream") for name, _, _ in MEMORY_SHAPES]),
    ]:
        route_yaml = "".join(f"""
              - match: {{ prefix: "{prefix}" }}
                direct_response: {{ status: 200, body: {{ filename: "{path}" }} }}
                response_headers_to_add:
                - header: {{ key: content-type, value: "{ctype}" }}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD""" for prefix, path, ctype in routes)
        listeners.append(f"""
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            max_direct_response_body_size_bytes: 67108864
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:{route_yaml}
          http_filters:
          # Read the whole request before answering: a response that ends before its request
          # makes Envoy close the connection (no keep-alive, a new connection per request).
          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: 1048576
{ROUTER}""")
    return f"""# Generated by scripts/bench.py: the upstream, answering every request with a fixed body.
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {PORT["up_admin"]} }} }}
static_resources:
  listeners:{"".join(listeners)}
"""


def shipped_filter_config(shipped):
    begin = shipped.find("# llm-meter configuration begin")
    end = shipped.find("# llm-meter configuration end")
    if begin < 0 or end < 0:
        raise RuntimeError("envoy/envoy.yaml has no '# llm-meter configuration begin/end' markers")
    block = shipped[begin:end].split("\n")
    start = next(i for i, line in enumerate(block) if line.strip() == "value: |")
    text = "\n".join(block[start + 1:])
    return json.loads(text)


# The global-limit workloads: every front sets the dynamic metadata (ng)'s descriptor takes its limit
# override from (llm-rls counts a descriptor only by the limit it carries), so that the differences
# (g) - (b) and (ng) - (a) hold the rate limit checks alone.
SET_METADATA = f"""          - name: envoy.filters.http.set_metadata
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config
              metadata:
              - metadata_namespace: bench.ratelimit
                value: {{ limit: {{ requests_per_unit: {GLOBAL_LIMIT}, unit: MINUTE }} }}
"""
# (ng): Envoy's native rate limit filter, calling the same service with the same timeout and
# failure mode as (g)'s rule, and (unless --native-without-headers) answering with x-ratelimit-limit,
# -remaining and -reset as llm-meter answers with x-ratelimit-*-requests...
NATIVE_RATELIMIT = """          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: llm
              timeout: 1s
              failure_mode_deny: false
              rate_limit_service:
                transport_api_version: V3
                grpc_service:
                  envoy_grpc: { cluster_name: rate_limit_service }
"""
# ...and the route's descriptor: rule=rpm, key=<x-api-key>, the limit as an override.
NATIVE_DESCRIPTOR = """                  rate_limits:
                  - actions:
                    - generic_key: { descriptor_key: rule, descriptor_value: rpm }
                    - request_headers: { header_name: x-api-key, descriptor_key: key }
                    limit:
                      dynamic_metadata:
                        metadata_key: { key: bench.ratelimit, path: [ { key: limit } ] }
"""


def rls_cluster(rls_port):
    """The rate limit service's cluster as envoy/envoy-global.yaml defines it, on `rls_port`."""
    text = SHIPPED_GLOBAL.read_text()
    start = text.find("  - name: rate_limit_service\n")
    if start < 0 or "port_value: 8081" not in text[start:]:
        raise RuntimeError("envoy/envoy-global.yaml: the rate_limit_service cluster (port 8081) not found")
    block = "\n".join(line for line in text[start:].rstrip().split("\n") if not line.strip().startswith("#"))
    return block.replace("port_value: 8081", f"port_value: {rls_port}") + "\n"


def insert_before(cfg, marker, text):
    at = cfg.find(marker)
    if at < 0:
        raise RuntimeError(f"envoy/envoy.yaml: {marker.strip()!r} not found")
    return cfg[:at] + text + cfg[at:]


def front_yaml(setup, listen, admin, upstream, shipped, rls_port=None):
    """The shipped envoy.yaml with its ports swapped; (a) without the wasm filter, (b)/(c)/(r) with
    the filter configuration replaced, (n) with the empty filter and (f)/(fc)/(fg) with the hostcall
    floor filter in llm-meter's place. With
    `rls_port` (the global-limit workloads): the set_metadata filter first in every setup, and for
    (g) a global rule, for (ng) the native rate limit filter and for (fg) the floor's global call,
    each with the service's cluster."""
    cfg = shipped
    wasm = WORK / "noop.wasm" if setup == "n" else FLOOR_WASM if setup in FLOOR_SETUPS else WASM
    for old, new in [("port_value: 10000", f"port_value: {listen}"),
                     ("port_value: 9901", f"port_value: {admin}"),
                     ("port_value: 8000", f"port_value: {upstream}"),
                     ("filename: target/wasm32-wasip1/release/llm_meter.wasm", f"filename: {wasm}")]:
        if old not in cfg:
            raise RuntimeError(f"envoy/envoy.yaml no longer contains {old!r}")
        cfg = cfg.replace(old, new)
    wasm_start = cfg.find("          - name: envoy.filters.http.wasm")
    router_start = cfg.find("          - name: envoy.filters.http.router")
    if wasm_start < 0 or router_start < wasm_start:
        raise RuntimeError("envoy/envoy.yaml: wasm filter entry before the router not found")
    if not ACCESS_LOG:
        log_start = cfg.find("          # One JSON line per request")
        log_end = cfg.find("          route_config:")
        if log_start < 0 or log_end < log_start:
            raise RuntimeError("envoy/envoy.yaml: the access_log block before route_config not found")
        cfg = cfg[:log_start] + cfg[log_end:]
        wasm_start = cfg.find("          - name: envoy.filters.http.wasm")
        router_start = cfg.find("          - name: envoy.filters.http.router")
    if rls_port is not None:
        if setup in SERVICE_SETUPS:
            # The clusters end the shipped file: the service's goes last.
            if not cfg.rstrip().endswith(f"port_value: {upstream} }}"):
                raise RuntimeError("envoy/envoy.yaml no longer ends with its clusters")
            cfg = cfg.rstrip("\n") + "\n" + rls_cluster(rls_port)
        if setup == "ng":
            cfg = insert_before(cfg, "          http_filters:\n", NATIVE_DESCRIPTOR)
            native = NATIVE_RATELIMIT
            if NATIVE_HEADERS:
                native += "              enable_x_ratelimit_headers: DRAFT_VERSION_03\n"
            cfg = insert_before(cfg, "          - name: envoy.filters.http.router", native)
        cfg = cfg.replace("          http_filters:\n", "          http_filters:\n" + SET_METADATA, 1)
        wasm_start = cfg.find("          - name: envoy.filters.http.wasm")
        router_start = cfg.find("          - name: envoy.filters.http.ratelimit" if setup == "ng"
                                else "          - name: envoy.filters.http.router")
    if setup in ("a", "ng"):
        return cfg[:wasm_start] + cfg[router_start:]
    if setup in FLOOR_SETUPS:
        filter_cfg = dict(FLOOR_SETUPS[setup])
    else:
        filter_cfg = {} if setup == "n" else metrics_config(shipped)
    if setup == "bo":
        filter_cfg["records"] = {"enabled": False}
    if setup == "c":
        filter_cfg["limits"] = LIMIT_RULES
    if setup == "r":
        filter_cfg["resilience"] = json.loads(json.dumps(RESILIENCE))
    if setup == "g":
        filter_cfg["limits"] = [json.loads(json.dumps(GLOBAL_RULE))]
    if setup != "n" and setup not in FLOOR_SETUPS:
        merge(filter_cfg, FILTER_EXTRA)
    begin = cfg.find("# llm-meter configuration begin")
    end = cfg.find("# llm-meter configuration end")
    indent = " " * 18
    block = (f"# llm-meter configuration begin\n{indent}value: |\n"
             + "".join(f"{indent}  {line}\n" for line in json.dumps(filter_cfg, indent=2).split("\n"))
             + indent)
    return cfg[:begin] + block + cfg[end:]


# --access-log: keep the shipped access log in every setup.
ACCESS_LOG = False
# (ng) tells the client its limit in x-ratelimit-* headers as llm-meter does (--native-without-headers: not).
NATIVE_HEADERS = True

# --filter-extra: JSON merged into the (b), (c), (r) and (g) filter configurations (an experiment's knob).
FILTER_EXTRA = {}


def merge(into, extra):
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v


def metrics_config(shipped):
    """The shipped filter configuration without its limits: metrics, pricing, the rest."""
    cfg = shipped_filter_config(shipped)
    for key in ("limits", "max_input_tokens"):
        cfg.pop(key, None)
    return cfg


# ---------------------------------------------------------------------------------------------
# Measuring.

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_duration_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk duration {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(out):
    res = {"rps": None, "p50": None, "p99": None, "requests": 0, "non2xx": 0, "socket_errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        if m:
            res[key] = parse_duration_ms(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = sum(int(x) for x in m.groups())
    return res


def proc_tree(root_pid):
    """root_pid and its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds():
    """CPU time all processes of the machine used so far (user, nice, system, irq, softirq)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return sum(int(x) for x in f[1:4] + f[6:8]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(proxy_pid, up_pids, run, svc_pids=()):
    """One load run (`run()`: wrk, or the SSE client; both children of this script), with the CPU
    each party used meanwhile: the proxy (its process tree), the upstream (`up_pids`), the rate
    limit service (`svc_pids`: llm-rls and redis-server) and the load generator."""
    pids = proc_tree(proxy_pid)
    c0, u0, s0 = cpu_seconds(pids), cpu_seconds(up_pids), cpu_seconds(svc_pids)
    w0, m0 = children_cpu_seconds(), machine_busy_seconds()
    t0 = time.monotonic()
    r = run()
    wall = time.monotonic() - t0
    proxy = cpu_seconds(proc_tree(proxy_pid)) - c0
    upstream_cpu = cpu_seconds(up_pids) - u0
    service_cpu = cpu_seconds(svc_pids) - s0
    wrk_cpu = children_cpu_seconds() - w0
    r["cpu_proxy"] = proxy / wall
    # CPU time the proxy spent per request: its cost, whether or not it was the bottleneck. The SSE
    # client reports how many streams it completed ("per"): per stream, over the whole run.
    if r.get("per"):
        r["cpu_us_per_req"] = proxy / r["per"] * 1e6
        r["svc_us_per_req"] = service_cpu / r["per"] * 1e6
    else:
        r["cpu_us_per_req"] = proxy / wall / r["rps"] * 1e6 if r["rps"] else None
        r["svc_us_per_req"] = service_cpu / wall / r["rps"] * 1e6 if r["rps"] else None
    r["cpu_upstream"] = upstream_cpu / wall
    r["cpu_service"] = service_cpu / wall
    r["cpu_wrk"] = wrk_cpu / wall
    # Everything else the machine ran meanwhile: other processes (and the kernel's own share).
    r["cpu_other"] = max(0.0, machine_busy_seconds() - m0 - proxy - upstream_cpu - service_cpu - wrk_cpu) / wall
    return r


# A measurement during which other processes used more than this much of a core is repeated
# (--retries times at most).
OTHER_MAX = 0.10


def wait_quiet(limit):
    """Waits until the machine is idle for a second (other processes using < OTHER_MAX of a core),
    at most `limit` seconds: this machine may be shared."""
    deadline = time.monotonic() + limit
    waited = False
    while True:
        b0 = machine_busy_seconds()
        time.sleep(1.0)
        if machine_busy_seconds() - b0 < OTHER_MAX or time.monotonic() > deadline:
            if waited:
                log("   ...quiet again" if time.monotonic() <= deadline else "   ...still busy; measuring anyway")
            return
        if not waited:
            log("   the machine is busy (other processes); waiting for it to be idle...")
            waited = True


def run_wrk(url, duration, connections, stream, pin, label):
    env = dict(os.environ, BENCH_STREAM="1" if stream else "0", BENCH_AUTH=MASTER_KEY)
    # --timeout 30s: LiteLLM's streams take seconds; wrk's default (2 s) would count them as errors.
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "30s", "--latency", "-s", str(LUA), url]
    if pin:
        argv = ["taskset", "-c", CPU_LOAD] + argv
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 60)
    with open(WORK / "wrk.log", "a") as f:
        f.write(f"=== {label}\n{p.stdout}{p.stderr}\n")
    res = parse_wrk(p.stdout)
    if p.returncode != 0 or res["rps"] is None:
        raise RuntimeError(f"wrk failed ({label}):\n{p.stdout}\n{p.stderr}")
    return res


# ---------------------------------------------------------------------------------------------
# Setups.

def chat_request(stream, key="sk-bench-0001"):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 16}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return (json.dumps(body).encode(),
            {"content-type": "application/json", "x-api-key": key, "x-app-id": "bench",
             "authorization": f"Bearer {MASTER_KEY}"})


def check_answer(setup, port, stream, want_header=None):
    """One request through the setup: 200 and the usage arrives at the client (and, if given,
    the response header `want_header`)."""
    data, headers = chat_request(stream)
    status, body, got = http_with_headers(f"http://127.0.0.1:{port}/v1/chat/completions", data, headers, timeout=30)
    if status != 200 or b'"completion_tokens"' not in body:
        raise RuntimeError(f"setup {setup}: unexpected answer {status}: {body[:300]!r}")
    if want_header and got.get(want_header) is None:
        raise RuntimeError(f"setup {setup}: no {want_header} header in its answer: {dict(got)}")


def wanted_header(setup, rls_port):
    """The rate limit header a global-limit setup's answer must carry: (g) and (fg) always, (ng)
    unless --native-without-headers."""
    if rls_port is None:
        return None
    if setup in ("g", "fg"):
        return "x-ratelimit-limit-requests"
    if setup == "ng" and NATIVE_HEADERS:
        return "x-ratelimit-limit"
    return None


def start_envoy(procs, name, config_text, admin, concurrency, cpus):
    path = WORK / f"{name}.yaml"
    path.write_text(config_text)
    p = procs.start(name, [ENVOY, "-c", path, "--concurrency", concurrency, "--disable-hot-restart",
                           "--log-level", "warn"], cpus=cpus)
    wait_ready(f"http://127.0.0.1:{admin}/ready", p, f"Envoy {name}")
    return p


def start_python_proxy(procs, upstream_port):
    env = dict(os.environ, UPSTREAM=f"http://127.0.0.1:{upstream_port}")
    p = procs.start("py", [PY_VENV / "bin" / "uvicorn", "--app-dir", ROOT / "bench", "py_proxy:app",
                           "--host", "127.0.0.1", "--port", PORT["py"], "--workers", "1",
                           "--no-access-log", "--log-level", "warning"], cpus=CPU_PROXY, env=env)
    wait_ready(f"http://127.0.0.1:{PORT['py']}/metrics", p, "the Python proxy")
    return p


def start_litellm(procs, upstream_port):
    cfg = WORK / "litellm.yaml"
    cfg.write_text(f"""# Generated by scripts/bench.py: LiteLLM proxy in front of the bench upstream.
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: sk-bench-upstream
litellm_settings:
  callbacks: ["prometheus"]
  telemetry: false
general_settings:
  master_key: {MASTER_KEY}
""")
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False",
               LITELLM_LOG="ERROR", NO_DOCS="True", DISABLE_ADMIN_UI="True")
    p = procs.start("litellm", [LL_VENV / "bin" / "litellm", "--config", cfg, "--host", "127.0.0.1",
                                "--port", PORT["litellm"], "--num_workers", "1"],
                    cpus=CPU_PROXY, env=env)
    wait_ready(f"http://127.0.0.1:{PORT['litellm']}/health/liveliness", p, "LiteLLM", timeout=180)
    return p


def ensure_venv(venv, reqs, what, timeout):
    marker = venv / ".bench-requirements"
    want = reqs.read_text()
    if marker.exists() and marker.read_text() == want:
        return True
    log(f"installing {what} into {venv.name} from {reqs.relative_to(ROOT)} (PyPI)...")
    t0 = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check",
                        "-r", reqs], check=True, timeout=timeout)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        log(f"  could not install {what}: {e}")
        return False
    marker.write_text(want)
    log(f"  done in {time.monotonic() - t0:.0f} s")
    return True


# ---------------------------------------------------------------------------------------------
# Statistics and the table.

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def summarize(results, setups):
    """results[setup] = list of per-round wrk results (rounds aligned)."""
    s = {}
    for k in setups:
        rs = results[k]
        s[k] = {"rps": med([r["rps"] for r in rs]), "p50": med([r["p50"] for r in rs]),
                "p99": med([r["p99"] for r in rs]), "cpu_us": med([r["cpu_us_per_req"] for r in rs]),
                "cpu": med([r["cpu_proxy"] for r in rs]), "up_cpu": med([r["cpu_upstream"] for r in rs]),
                "wrk_cpu": med([r["cpu_wrk"] for r in rs]), "other_cpu": med([r["cpu_other"] for r in rs]),
                "svc_cpu": med([r.get("cpu_service") for r in rs]), "svc_us": med([r.get("svc_us_per_req") for r in rs]),
                "errors": sum(r["non2xx"] + r["socket_errors"] for r in rs),
                "rounds": [round(r["rps"]) for r in rs]}
    for k in setups:
        for base in ("a", "b"):
            if base in s and k != base and s[base]["rps"]:
                s[k][f"ratio_{base}"] = s[k]["rps"] / s[base]["rps"]
                pairs = [(x["rps"] / y["rps"]) for x, y in zip(results[k], results[base])]
                s[k][f"ratio_{base}_range"] = (min(pairs), max(pairs))
                for q in ("p50", "p99"):
                    s[k][f"d{q}_{base}"] = med([x[q] - y[q] for x, y in zip(results[k], results[base])])
                s[k][f"dcpu_{base}"] = med([x["cpu_us_per_req"] - y["cpu_us_per_req"]
                                            for x, y in zip(results[k], results[base])])
    return s


def print_table(title, s, setups, args, connections, load_name="wrk"):
    log()
    log(f"== {title}")
    log(f"   {args.rounds} round(s) x {args.duration} s per setup, wrk -t1 -c{connections}, "
        f"front Envoys --concurrency {args.concurrency}, {'pinned' if args.pin else 'unpinned'}; "
        "medians over rounds")
    hdr = (f"   {'setup':<41} {'req/s':>7} {'vs a':>6} {'(rounds)':>9} {'vs b':>6} {'p50 ms':>7} {'p99 ms':>7} "
           f"{'p50-a':>7} {'p99-a':>7} {'p50-b':>7} {'p99-b':>7} {'cpu us':>7} {'-a':>6} {'err':>4}")
    log(hdr)
    log("   " + "-" * (len(hdr) - 3))
    for k in setups:
        r = s[k]
        rng = r.get("ratio_a_range")
        rng_s = f"{rng[0]:.2f}-{rng[1]:.2f}" if rng else ""
        log(f"   {k + '  ' + SETUPS[k]:<41} {fmt(r['rps'], '7.0f')} {fmt(r.get('ratio_a'), '6.3f')} "
            f"{rng_s:>9} {fmt(r.get('ratio_b'), '6.3f')} {fmt(r['p50'], '7.3f')} {fmt(r['p99'], '7.3f')} "
            f"{fmt(r.get('dp50_a'), '+7.3f')} {fmt(r.get('dp99_a'), '+7.3f')} "
            f"{fmt(r.get('dp50_b'), '+7.3f')} {fmt(r.get('dp99_b'), '+7.3f')} "
            f"{fmt(r['cpu_us'], '7.1f')} {fmt(r.get('dcpu_a'), '+6.1f')} {r['errors']:>4}")
    log("   vs a, vs b: throughput ratio (median req/s / median req/s); (rounds): min-max of the per-round "
        "ratios vs a; p50-a etc.: median over rounds of the latency difference, ms; cpu us: CPU time of the "
        "proxy per request, microseconds (-a: minus plain Envoy's)")
    log("   req/s per round: " + "; ".join(f"{k} {s[k]['rounds']}" for k in setups))
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"
    svc = any(s[k].get("svc_cpu") for k in setups)
    log("   CPU per wall second (100% = one core), medians: " + "; ".join(
        f"{k}: proxy {pct(s[k]['cpu'])}, upstream {pct(s[k]['up_cpu'])}, "
        + (f"rate limit service {pct(s[k]['svc_cpu'])}, " if svc else "")
        + f"{load_name} {pct(s[k]['wrk_cpu'])}, other {pct(s[k]['other_cpu'])}" for k in setups))
    other = max((s[k]["other_cpu"] or 0) for k in setups)
    if other > 0.10:
        log(f"   WARNING: other processes used up to {100 * other:.0f}% of a core during the rounds: "
            "the numbers are disturbed")


# ---------------------------------------------------------------------------------------------
# Metrics sanity (not timings): did the meters meter?

def prom_sum(text, metric, match=""):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric) and (line[len(metric)] in "{ ") and match in line:
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total


def llm_counters(text):
    """The llm_* counter samples of a /stats/prometheus text: {series: value}."""
    counters, out = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE llm_"):
            parts = line.split()
            if len(parts) >= 4 and parts[3] == "counter":
                counters.add(parts[2])
        elif line.startswith("llm_"):
            series, _, value = line.rpartition(" ")
            if series.split("{", 1)[0] in counters:
                out[series] = value
    return out


# The filter batches its counter and gauge updates per worker and flushes them on its root timer
# (every <= 250 ms, never later than 1 s): numbers read right after the traffic may be incomplete.
FLUSH_WAIT = 1.2


def stats_flushed(admins, timeout=20.0):
    """Each Envoy's /stats/prometheus text (`admins`: name -> admin port) once its llm_* counters
    are unchanged across two reads FLUSH_WAIT s apart, i.e. the filter's last flush has landed."""
    def read(admin):
        _, body = http(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=10)
        text = body.decode(errors="replace")
        return text, llm_counters(text)

    last = {k: read(a) for k, a in admins.items()}
    out, deadline = {}, time.monotonic() + timeout
    while len(out) < len(admins):
        time.sleep(FLUSH_WAIT)
        for k, a in admins.items():
            if k in out:
                continue
            now = read(a)
            if now[1] == last[k][1]:
                out[k] = now[0]
            elif time.monotonic() > deadline:
                log(f"   WARNING: ({k})'s llm_* counters still changed after {timeout:.0f} s; reading them anyway")
                out[k] = now[0]
            last[k] = now
    return out


def meter_report(text):
    return {"requests": prom_sum(text, "llm_requests_total"),
            "ok": prom_sum(text, "llm_requests_total", 'status="200"'),
            "output_tokens": prom_sum(text, "llm_tokens_total", 'token_type="output"'),
            "rejected": prom_sum(text, "llm_ratelimit_rejected_total"),
            "fallbacks": prom_sum(text, "llm_fallbacks_total"),
            "circuit_open": prom_sum(text, "llm_requests_total", 'error_type="circuit_open"'),
            "skips": prom_sum(text, "llm_meter_skips_total"),
            "errors": prom_sum(text, "llm_meter_errors_total"),
            "service_errors": prom_sum(text, "llm_ratelimit_service_errors_total"),
            "usage_missing": prom_sum(text, "llm_usage_missing_total")}


# ---------------------------------------------------------------------------------------------
# The throughput/latency workloads.

def run_workload(procs, workload, args, setups, shipped, files_sizes):
    stream, connections, title, desc = WORKLOADS[workload]
    connections = connections or args.connections
    upstream = PORT["up_sse" if stream else "up_json"]
    glob = workload in GLOBAL_WORKLOADS
    log()
    log(f"-- workload {workload}: " + desc.format(**files_sizes))
    svc_pids, rls_port = [], None
    if glob:
        setups = [k for k in GLOBAL_SETUPS + (GLOBAL_FLOOR_SETUPS if args.floor else ())
                  if k not in args.skip.split(",")]
        rls_port, svc_pids = rate_limit_service(procs)
        log(f"   rate limit service: llm-rls on 127.0.0.1:{rls_port}, redis-server on 127.0.0.1:{procs.redis_port}"
            + (f", both on CPU {CPU_LOAD}" if args.pin else "") + "; every front carries the set_metadata filter")
    started = {}
    for k in [k for k in setups if k in ENVOY_SETUPS]:
        started[k] = start_envoy(procs, f"front_{k}",
                                 front_yaml(k, PORT[k], PORT[f"{k}_admin"], upstream, shipped, rls_port),
                                 PORT[f"{k}_admin"], str(args.concurrency), CPU_PROXY)
    if "py" in setups:
        started["py"] = start_python_proxy(procs, upstream)
    if "litellm" in setups:
        try:
            started["litellm"] = start_litellm(procs, upstream)
        except RuntimeError as e:
            log(f"   LiteLLM skipped: {e}")
            setups = [k for k in setups if k != "litellm"]
    active = []
    for k in setups:
        try:
            check_answer(k, PORT[k], stream, wanted_header(k, rls_port))
            active.append(k)
        except (RuntimeError, OSError) as e:
            if k in ("litellm",):
                log(f"   LiteLLM skipped: {e}")
                continue
            raise
    setups = active
    url = {k: f"http://127.0.0.1:{PORT[k]}/v1/chat/completions" for k in setups}
    up_pids = [procs.upstream.pid]
    if args.warmup > 0:
        log(f"   warm-up: {args.warmup} s per setup (V8 tiers the filter up; connection pools fill)")
        for k in setups:
            run_wrk(url[k], args.warmup, connections, stream, args.pin, f"{workload} warmup {k}")
    results = {k: [] for k in setups}
    for rnd in range(args.rounds):
        line = []
        for k in setups:
            label = f"{workload} round {rnd + 1} {k}"
            # Only the proxy under test runs; the others are stopped (SIGSTOP) meanwhile.
            for other in setups:
                (procs.resume if other == k else procs.pause)(started[other])
            for attempt in range(args.retries + 1):
                if args.quiet_wait:
                    wait_quiet(args.quiet_wait)
                r = measure(started[k].pid, up_pids,
                            lambda: run_wrk(url[k], args.duration, connections, stream, args.pin, label), svc_pids)
                if not args.quiet_wait or r["cpu_other"] <= OTHER_MAX or attempt == args.retries:
                    break
                log(f"   {label}: other processes used {100 * r['cpu_other']:.0f}% of a core meanwhile; "
                    "measuring again")
            if glob:
                # Let the requests wrk abandoned at its end finish their service calls before this
                # Envoy is stopped: stopped with a call in flight, it would find the call's timer
                # expired when it resumes and count a timeout (or, (ng), an error) that no measured
                # request had.
                time.sleep(0.5)
            results[k].append(r)
            line.append(f"{k} {r['rps']:.0f}")
        log(f"   round {rnd + 1}/{args.rounds}: " + ", ".join(line) + " req/s")
    for k in setups:
        procs.resume(started[k])
    s = summarize(results, setups)
    print_table(title, s, setups, args, connections)
    if "r" in s and "b" in s:
        r = s["r"]
        log(f"   (r) resilience next to (b): throughput {fmt(r.get('ratio_b'), '.3f')} of (b), CPU per request "
            f"{fmt(r.get('dcpu_b'), '+.1f')} us, p50 {fmt(r.get('dp50_b'), '+.3f')} ms, "
            f"p99 {fmt(r.get('dp99_b'), '+.3f')} ms (medians over rounds of the per-round differences)")
    floor_report(s, results, setups)
    if glob:
        global_comparison(s, results)
    if args.perf:
        perf_pass(procs, started, setups, url, args, stream, connections, workload, s)
    sent = {k: sum(r["requests"] for r in results[k]) for k in setups}
    meters = [k for k in METER_SETUPS if k in setups]
    texts = stats_flushed({k: PORT[f"{k}_admin"] for k in meters})
    for k in meters:
        m = meter_report(texts[k])
        log(f"   ({k}) metered {m['requests']:.0f} requests ({m['ok']:.0f} with status 200; wrk completed "
            f"{sent[k]} in the rounds, plus warm-up and check), {m['output_tokens']:.0f} output tokens, "
            f"rejected {m['rejected']:.0f}, usage missing {m['usage_missing']:.0f}, skips {m['skips']:.0f}, "
            f"errors {m['errors']:.0f}" + (f", fallbacks {m['fallbacks']:.0f}, circuit_open "
                                           f"{m['circuit_open']:.0f}" if k == "r" else "")
            + (f", rate limit service errors {m['service_errors']:.0f}" if k == "g" else ""))
        if m["requests"] == 0 or m["output_tokens"] == 0:
            raise RuntimeError(f"setup {k} metered nothing: the filter is not running?")
        if m["rejected"]:
            raise RuntimeError(f"setup {k} rejected {m['rejected']:.0f} requests: the limits are not high enough")
        if m["fallbacks"] or m["circuit_open"]:
            raise RuntimeError(f"setup {k}: a circuit opened ({m['fallbacks']:.0f} fallbacks, "
                               f"{m['circuit_open']:.0f} circuit_open): the upstream failed?")
        if m["service_errors"]:
            raise RuntimeError(f"setup {k}: {m['service_errors']:.0f} calls to the rate limit service failed")
    if glob:
        check_global(setups, sent, procs)
    check_floor(setups)
    if "py" in setups:
        _, text = http(f"http://127.0.0.1:{PORT['py']}/metrics")
        text = text.decode()
        output = prom_sum(text, "llm_tokens_total", 'token_type="output"')
        log(f"   (py) metered {prom_sum(text, 'llm_requests_total'):.0f} requests, {output:.0f} output tokens")
    if "litellm" in setups:
        _, text = http(f"http://127.0.0.1:{PORT['litellm']}/metrics", headers={"authorization": f"Bearer {MASTER_KEY}"})
        text = text.decode(errors="replace")
        log(f"   (litellm) metered {prom_sum(text, 'litellm_proxy_total_requests_metric_total'):.0f} requests, "
            f"{prom_sum(text, 'litellm_output_tokens_metric_total'):.0f} output tokens")
    for p in started.values():
        procs.stop(p)
    return {"setups": setups, "summary": s, "rounds": results}


# ---------------------------------------------------------------------------------------------
# The trickled streams: tools/mock-llm writes each SSE event as a chunk of its own, 2 ms apart, so
# the front Envoy reads one event at a time and hands the filter one event per body callback.

def trickle_request():
    """The streaming request of bench/chat.lua (include_usage), in a file for the SSE client."""
    path = WORK / "trickle_request.json"
    path.write_text('{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},'
                    '{"role":"user","content":"Summarize Hamlet in two sentences."}],'
                    '"stream":true,"stream_options":{"include_usage":true},"max_tokens":256}')
    return path


def run_sse_client(port, streams, concurrency, pin, label):
    """bench/sse_client.py: `streams` trickled streams, `concurrency` at a time (pinned with the
    upstream); a result shaped like run_wrk's (requests/s are streams/s, p50/p99 the streams'
    durations), with "per": the streams, to divide the proxy's CPU time by."""
    headers = dict(TRICKLE_HEADERS, authorization=f"Bearer {MASTER_KEY}")
    argv = [sys.executable, SSE_CLIENT, "--port", port, "--streams", streams, "--concurrency", concurrency,
            "--body", WORK / "trickle_request.json"] + [a for k, v in headers.items() for a in ("--header", f"{k}: {v}")]
    if pin:
        argv = ["taskset", "-c", CPU_LOAD] + argv
    timeout = 60 + 3 * (streams // max(1, concurrency) + 1) * (TRICKLE_EVENTS + 1) * TRICKLE_GAP_MS / 1000
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    with open(WORK / "sse_client.log", "a") as f:
        f.write(f"=== {label}\n{p.stdout}{p.stderr}\n")
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"the SSE client failed ({label}):\n{p.stdout}\n{p.stderr}")
    if p.returncode != 0 or "error" in out:
        raise RuntimeError(f"the SSE client failed ({label}): {json.dumps(out)}\n{p.stderr}")
    if out["events"] != [TRICKLE_EVENTS + 1] * 2:
        raise RuntimeError(f"{label}: streams of {out['events']} events (min, max), expected "
                           f"{TRICKLE_EVENTS} and [DONE]")
    return {"rps": out["streams"] / out["wall_s"], "requests": out["streams"], "per": out["streams"],
            "p50": out["last_ms"]["p50"], "p99": out["last_ms"]["p99"], "first_p50": out["first_ms"]["p50"],
            "bytes": out["bytes"][0], "non2xx": 0, "socket_errors": 0}


def run_trickle(procs, args, setups, shipped):
    _, _, title, desc = WORKLOADS[TRICKLE]
    setups = [k for k in setups if k in ENVOY_SETUPS]
    n, conc = args.trickle_streams, args.trickle_concurrency
    log()
    log(f"-- workload {TRICKLE}: {desc}; {n} streams per round and setup, {conc} at a time")
    trickle_request()
    mock = procs.start("mock", [MOCK, "--host", "127.0.0.1", "--port", PORT["up_trickle"], "--quiet"], cpus=CPU_LOAD)
    wait_ready(f"http://127.0.0.1:{PORT['up_trickle']}/healthz", mock, "mock-llm")
    started, through = {}, {k: 0 for k in setups}
    for k in setups:
        started[k] = start_envoy(procs, f"front_{k}", front_yaml(k, PORT[k], PORT[f"{k}_admin"], PORT["up_trickle"], shipped),
                                 PORT[f"{k}_admin"], str(args.concurrency), CPU_PROXY)
        through[k] += run_sse_client(PORT[k], 1, 1, args.pin, f"{TRICKLE} check {k}")["requests"]
    if args.warmup > 0:
        warm = min(n, 2 * conc)
        log(f"   warm-up: {warm} streams per setup")
        for k in setups:
            through[k] += run_sse_client(PORT[k], warm, conc, args.pin, f"{TRICKLE} warmup {k}")["requests"]
    results = {k: [] for k in setups}
    for rnd in range(args.rounds):
        line = []
        for k in setups:
            label = f"{TRICKLE} round {rnd + 1} {k}"
            for other in setups:
                (procs.resume if other == k else procs.pause)(started[other])
            for attempt in range(args.retries + 1):
                if args.quiet_wait:
                    wait_quiet(args.quiet_wait)
                r = measure(started[k].pid, [mock.pid], lambda: run_sse_client(PORT[k], n, conc, args.pin, label))
                through[k] += r["requests"]
                if not args.quiet_wait or r["cpu_other"] <= OTHER_MAX or attempt == args.retries:
                    break
                log(f"   {label}: other processes used {100 * r['cpu_other']:.0f}% of a core meanwhile; "
                    "measuring again")
            results[k].append(r)
            line.append(f"{k} {r['cpu_us_per_req']:.0f}")
        log(f"   round {rnd + 1}/{args.rounds}: " + ", ".join(line) + " us of front Envoy CPU per stream")
    for k in setups:
        procs.resume(started[k])
    s = summarize(results, setups)
    for k in setups:
        s[k]["first_p50"] = med([r["first_p50"] for r in results[k]])
        s[k]["bytes"] = results[k][0]["bytes"] if results[k] else None
    print_trickle_table(title, s, setups, args, results)
    floor_report(s, results, setups, per="stream", throughput=False)
    meters = [k for k in METER_SETUPS if k in setups]
    texts = stats_flushed({k: PORT[f"{k}_admin"] for k in meters})
    for k in meters:
        m = meter_report(texts[k])
        log(f"   ({k}) metered {m['requests']:.0f} streams of the {through[k]} sent ({m['ok']:.0f} with status 200), "
            f"{m['output_tokens']:.0f} output tokens (198 per stream: {198 * through[k]}), usage missing "
            f"{m['usage_missing']:.0f}, skips {m['skips']:.0f}, errors {m['errors']:.0f}")
        if m["requests"] < through[k] or m["output_tokens"] < 198 * through[k]:
            raise RuntimeError(f"setup {k} metered {m['requests']:.0f} of {through[k]} trickled streams and "
                               f"{m['output_tokens']:.0f} of {198 * through[k]} output tokens")
        if m["rejected"] or m["fallbacks"] or m["circuit_open"]:
            raise RuntimeError(f"setup {k}: rejected {m['rejected']:.0f}, fallbacks {m['fallbacks']:.0f}, "
                               f"circuit_open {m['circuit_open']:.0f} on trickled streams")
    check_floor(setups)
    for p in list(started.values()) + [mock]:
        procs.stop(p)
    return {"setups": setups, "summary": s, "rounds": results}


def print_trickle_table(title, s, setups, args, results):
    log()
    log(f"== {title}")
    log(f"   {args.rounds} round(s) x {args.trickle_streams} streams per setup, {args.trickle_concurrency} at a time, "
        f"{TRICKLE_EVENTS} events + [DONE] per stream ({fmt(s[setups[0]].get('bytes'), 'd')} bytes), front Envoys "
        f"--concurrency {args.concurrency}, {'pinned' if args.pin else 'unpinned'}; medians over rounds")
    hdr = (f"   {'setup':<41} {'streams/s':>9} {'first ms':>8} {'p50 ms':>7} {'p99 ms':>7} {'cpu us':>7} "
           f"{'-a':>6} {'-a/event':>8} {'-a % a':>7} {'err':>4}")
    log(hdr)
    log("   " + "-" * (len(hdr) - 3))
    base = s.get("a", {}).get("cpu_us")
    for k in setups:
        r = s[k]
        d = r.get("dcpu_a")
        log(f"   {k + '  ' + SETUPS[k]:<41} {fmt(r['rps'], '9.1f')} {fmt(r['first_p50'], '8.2f')} "
            f"{fmt(r['p50'], '7.1f')} {fmt(r['p99'], '7.1f')} {fmt(r['cpu_us'], '7.0f')} {fmt(d, '+6.0f')} "
            f"{fmt(d / TRICKLE_EVENTS if d is not None else None, '+8.2f')} "
            f"{'-' if d is None or not base else format(100 * d / base, '+6.1f') + '%':>7} {r['errors']:>4}")
    log(f"   cpu us: the front Envoy's CPU time per stream (its whole run / streams completed); -a: minus plain "
        f"Envoy's (median over rounds of the per-round differences); -a/event: that over the {TRICKLE_EVENTS} events; "
        "-a % a: that as a share of plain Envoy's own; first ms: time to the first body byte (p50); p50/p99: "
        "the streams' durations, ms")
    log("   us per stream per round: " + "; ".join(f"{k} {[round(r['cpu_us_per_req']) for r in results[k]]}"
                                                  for k in setups))
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"
    log("   CPU per wall second (100% = one core), medians: " + "; ".join(
        f"{k}: proxy {pct(s[k]['cpu'])}, mock-llm {pct(s[k]['up_cpu'])}, client {pct(s[k]['wrk_cpu'])}, "
        f"other {pct(s[k]['other_cpu'])}" for k in setups))
    other = max((s[k]["other_cpu"] or 0) for k in setups)
    if other > 0.10:
        log(f"   WARNING: other processes used up to {100 * other:.0f}% of a core during the rounds: "
            "the numbers are disturbed")


# ---------------------------------------------------------------------------------------------
# The global-limit workloads: a rate limit service (llm-rls on redis-server) shared by (g) and (ng).

def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_command(port, *words):
    """One command to redis-server (RESP), its reply's first line and, for a bulk or an array of
    bulk strings, their values."""
    import socket
    msg = f"*{len(words)}\r\n".encode() + b"".join(f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(msg)
        f = sock.makefile("rb")
        first = f.readline().rstrip(b"\r\n").decode(errors="replace")
        values = []
        count = int(first[1:]) if first[:1] == "*" else (1 if first[:1] == "$" and first != "$-1" else 0)
        for _ in range(count):
            head = first if first[:1] == "$" else f.readline().rstrip(b"\r\n").decode()
            n = int(head[1:])
            if n >= 0:
                values.append(f.read(n + 2)[:-2].decode(errors="replace"))
        return first, values


def rate_limit_service(procs):
    """redis-server (no persistence) and llm-rls on free ports, pinned with the upstream; started
    once, for every global-limit workload of the run. Returns llm-rls's port and both pids."""
    if getattr(procs, "rls", None) is None:
        procs.redis_port, rls_port = free_port(), free_port()
        data = WORK / "redis"
        data.mkdir(exist_ok=True)
        procs.redis = procs.start("redis", ["redis-server", "--port", procs.redis_port, "--bind", "127.0.0.1",
                                            "--save", "", "--appendonly", "no", "--dir", data], cpus=CPU_LOAD)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis_command(procs.redis_port, "PING")[0] == "+PONG":
                    break
            except OSError:
                pass
            if procs.redis.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not come up; its log ends with:\n"
                                   + (WORK / "redis.log").read_text(errors="replace")[-2000:])
            time.sleep(0.1)
        procs.rls = procs.start("rls", [RLS, "--listen", f"127.0.0.1:{rls_port}", "--redis",
                                        f"redis://127.0.0.1:{procs.redis_port}"], cpus=CPU_LOAD)
        deadline = time.monotonic() + 10
        while "listening on" not in (WORK / "rls.log").read_text(errors="replace"):
            if procs.rls.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("llm-rls did not come up; its log ends with:\n"
                                   + (WORK / "rls.log").read_text(errors="replace")[-2000:])
            time.sleep(0.1)
        procs.rls_port = rls_port
    return procs.rls_port, [procs.rls.pid, procs.redis.pid]


def envoy_counters(admin, prefix):
    """Envoy's own counters whose names start with `prefix` (/stats, text), by name."""
    _, body = http(f"http://127.0.0.1:{admin}/stats?filter=^{prefix}", timeout=10)
    out = {}
    for line in body.decode(errors="replace").splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


# (what, the result's key, unit, format) of the global comparison.
GLOBAL_MEASURES = (("p50", "p50", "ms", "+.3f"), ("p99", "p99", "ms", "+.3f"), ("CPU per request", "cpu_us_per_req", "us", "+.1f"))


def floor_global(results):
    """--floor: (fg) - (f) per measure of GLOBAL_MEASURES (median over rounds of the per-round
    differences), the least a proxy-wasm filter's global check adds; None without them."""
    if not all(k in results for k in ("f", "fg")):
        return None
    return {what: med([x[key] - y[key] for x, y in zip(results["fg"], results["f"])
                       if x[key] is not None and y[key] is not None])
            for what, key, _, _ in GLOBAL_MEASURES}


def global_comparison(s, results):
    """(g) - (b) against (ng) - (a): what each rate limit check adds (issue 19's target: 1.2x); with
    --floor also (fg) - (f), the least any proxy-wasm filter making (g)'s call adds."""
    if not all(k in s for k in ("g", "ng")):
        return
    g, ng = s["g"], s["ng"]
    native = dict(zip([m[0] for m in GLOBAL_MEASURES], (ng.get("dp50_a"), ng.get("dp99_a"), ng.get("dcpu_a"))))
    meter = dict(zip([m[0] for m in GLOBAL_MEASURES], (g.get("dp50_b"), g.get("dp99_b"), g.get("dcpu_b"))))
    floor = floor_global(results)

    def against_native(added):
        parts = []
        for what, _, unit, spec in GLOBAL_MEASURES:
            v, nv = added.get(what), native.get(what)
            ratio = f" ({v / nv:.2f}x)" if v is not None and nv and nv > 0 else ""
            parts.append(f"{what} {fmt(v, spec)} vs {fmt(nv, spec)} {unit}{ratio}")
        return "; ".join(parts)

    log("   global check, llm-meter (g)-(b) vs native (ng)-(a): " + against_native(meter)
        + " (medians over rounds of the per-round differences)")
    if floor is not None:
        log("   global check, hostcall floor (fg)-(f) vs native (ng)-(a): " + against_native(floor)
            + " (the same; (fg) makes (g)'s hostcalls and nothing else)")
        log("   llm-meter's global check over the floor's, (g)-(b) - ((fg)-(f)): " + "; ".join(
            f"{what} {fmt(None if meter.get(what) is None or floor.get(what) is None else meter[what] - floor[what], spec)}"
            f" {unit}" for what, _, unit, spec in GLOBAL_MEASURES) + " (its own work around the call)")
        verdicts = []
        for what, _, _, _ in GLOBAL_MEASURES:
            v, nv = floor.get(what), native.get(what)
            if v is None or nv is None:
                verdicts.append(f"{what} not measured")
            elif nv <= 0:
                verdicts.append(f"{what} {'yes' if v <= 0 else 'no'} (the native filter added nothing measurable)")
            else:
                verdicts.append(f"{what} {'yes' if v <= 1.2 * nv else 'NO'} ({v / nv:.2f}x)")
        reach = all(floor.get(w) is not None and native.get(w) is not None and floor[w] <= 1.2 * max(native[w], 0)
                    for w, _, _, _ in GLOBAL_MEASURES)
        log("   is even the floor within 1.2x of the native filter? " + ", ".join(verdicts) + ": "
            + ("the target is within reach of a proxy-wasm filter making this call" if reach else
               "where it is not, no proxy-wasm filter making this call meets the target on this Envoy"))
    svc = lambda k: fmt(s[k].get("svc_us"), ".1f")
    log(f"   rate limit service (llm-rls + redis-server) CPU per request: (g) {svc('g')} us, (ng) {svc('ng')} us"
        + (f", (fg) {svc('fg')} us" if "fg" in s else ""))


def check_global(setups, sent, procs):
    """After a global-limit workload: (g), (ng) and (fg) each called the service once per request,
    nothing was rejected and no call failed (the filter's counters are checked with the other
    meters'; (fg)'s failures with its own counter)."""
    for k in [k for k in SERVICE_SETUPS if k in setups]:
        admin = PORT[f"{k}_admin"]
        calls = envoy_counters(admin, "cluster.rate_limit_service.upstream_rq_total").get(
            "cluster.rate_limit_service.upstream_rq_total", 0)
        downstream = envoy_counters(admin, "http.llm.downstream_rq_total").get("http.llm.downstream_rq_total", 0)
        svc = envoy_counters(admin, "cluster.rate_limit_service.upstream_rq_")
        line = (f"   ({k}) {downstream} requests, {calls} calls to the rate limit service "
                f"({calls / downstream if downstream else 0:.3f} per request; timeouts "
                f"{svc.get('cluster.rate_limit_service.upstream_rq_timeout', 0)}, 5xx "
                f"{svc.get('cluster.rate_limit_service.upstream_rq_5xx', 0)})")
        if k == "ng":
            rl = {name.rsplit(".", 1)[1]: v for name, v in envoy_counters(admin, "cluster.llm_gateway.ratelimit.").items()}
            line += (f"; native filter: ok {rl.get('ok', 0)}, over_limit {rl.get('over_limit', 0)}, "
                     f"error {rl.get('error', 0)}, failure_mode_allowed {rl.get('failure_mode_allowed', 0)}")
            log(line)
            if rl.get("error", 0) or rl.get("failure_mode_allowed", 0):
                raise RuntimeError(f"setup ng: {rl.get('error', 0)} calls to the rate limit service failed")
            if rl.get("over_limit", 0):
                raise RuntimeError(f"setup ng: {rl['over_limit']} requests over the limit: the limit is too low")
            if rl.get("ok", 0) < sent[k]:
                raise RuntimeError(f"setup ng: the service said ok {rl.get('ok', 0)} times for {sent[k]} requests "
                                   "completed: the native filter did not check every request")
        elif k == "fg":
            _, body = http(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=10)
            failed = prom_sum(body.decode(errors="replace"), "floor_global_failures_total")
            log(line + f"; floor filter: {failed:.0f} calls failed")
            if failed:
                raise RuntimeError(f"setup fg: {failed:.0f} calls to the rate limit service failed")
        else:
            log(line)
        if calls < sent[k]:
            raise RuntimeError(f"setup {k}: {calls} calls to the rate limit service for {sent[k]} requests completed")
    # The service counted both setups' descriptors: (ng)'s keys are the header's values, (g)'s hashes.
    _, keys = redis_command(procs.redis_port, "KEYS", "*")
    native = sum(1 for key in keys if "sk-bench-" in key)
    floor = sum(1 for key in keys if re.search(r'"key":"f0{24}[0-9a-f]{7}"', key))
    log(f"   redis-server holds {len(keys)} keys, {native} of them (ng)'s counters (one per x-api-key)"
        + (f", {floor} (fg)'s (one per stand-in key)" if "fg" in setups else ""))
    if "ng" in setups and not native:
        raise RuntimeError("setup ng: no counter of its descriptors in Redis: the limit override did not reach llm-rls")


def perf_pass(procs, started, setups, url, args, stream, connections, workload, summary):
    """--perf: one more wrk run per Envoy setup with `perf record -e cpu-clock -g` on the front
    Envoy; where its CPU goes, by shared object ("under wasm": V8 JIT code and what it calls)."""
    if not shutil.which("perf"):
        log("   --perf: perf not found (Debian: linux-perf); skipped")
        return
    log(f"   perf (cpu-clock, call graphs; a separate {args.duration} s run per Envoy setup): share of the "
        "front Envoy's CPU, and us per request with the rounds' CPU per request")
    for k in [k for k in setups if k in ENVOY_SETUPS]:
        for other in setups:
            (procs.resume if other == k else procs.pause)(started[other])
        data = WORK / f"perf_{workload}_{k}.data"
        if args.quiet_wait:
            wait_quiet(args.quiet_wait)
        rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "-g", "-o", str(data),
                                "-p", str(started[k].pid), "--", "sleep", str(max(1, args.duration - 2))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run_wrk(url[k], args.duration, connections, stream, args.pin, f"{workload} perf {k}")
        rec.wait()
        rep = subprocess.run(["perf", "report", "-i", str(data), "--children", "--sort", "dso", "--stdio", "-g", "none"],
                             capture_output=True, text=True).stdout
        children, self_ = {}, {}
        for line in rep.splitlines():
            m = re.match(r"\s+([\d.]+)%\s+([\d.]+)%\s+(.+?)\s*$", line)
            if m:
                name = "jit" if m.group(3).startswith("[JIT]") else m.group(3)
                children[name] = children.get(name, 0) + float(m.group(1))
                self_[name] = self_.get(name, 0) + float(m.group(2))
        jit_self, jit_all = self_.get("jit", 0.0), children.get("jit", 0.0)
        hostcalls = max(0.0, jit_all - jit_self)
        parts = {"Envoy outside wasm": self_.get("envoy", 0.0) - hostcalls, "wasm code (JIT)": jit_self,
                 "hostcalls from wasm": hostcalls, "kernel": self_.get("[kernel.kallsyms]", 0.0),
                 "libc+vdso": self_.get("libc.so.6", 0.0) + self_.get("[vdso]", 0.0)}
        us = summary[k]["cpu_us"] or 0.0
        log(f"     {k}: " + ", ".join(f"{name} {pct:.0f}% ({pct * us / 100:.0f} us)" for name, pct in parts.items()))
    for k in setups:
        procs.resume(started[k])


# ---------------------------------------------------------------------------------------------
# Memory: 10 MB streams through Envoy + llm-meter and through plain Envoy.

def read_memory(admin, pid):
    _, body = http(f"http://127.0.0.1:{admin}/memory", timeout=5)
    m = json.loads(body)
    rss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"allocated": int(m["allocated"]), "heap_size": int(m["heap_size"]), "rss": rss}


def stream_clients(port, path, n, first_out, include_usage):
    data, headers = chat_request(stream=True)
    if not include_usage:
        # Without include_usage: the filter injects it and cuts the usage chunk, its most work.
        body = json.loads(data)
        body.pop("stream_options")
        data = json.dumps(body).encode()
    procs = []
    for i in range(n):
        out = first_out if i == 0 else "/dev/null"
        argv = ["curl", "-s", "-o", str(out), "-w", "%{http_code} %{size_download}\n",
                f"http://127.0.0.1:{port}{path}", "--data-binary", data.decode()]
        for k, v in headers.items():
            argv += ["-H", f"{k}: {v}"]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    return [(int(o[0]), int(o[1])) for o in outs]


def memory_pass(procs, args, shipped, shape, size_mib, one_event):
    """Fresh plain and llm-meter fronts; args.mem_rounds x args.mem_streams concurrent streams of
    this shape through each; /memory and RSS before, peak (sampled), after each round, after."""
    out = {}
    for k, name in (("a", "mem_a"), ("b", "mem_b")):
        admin = PORT[f"{name}_admin"]
        p = start_envoy(procs, f"front_{name}", front_yaml(k, PORT[name], admin, PORT["up_big"], shipped),
                        admin, str(args.concurrency), CPU_PROXY)
        before = read_memory(admin, p.pid)
        peak, stop = dict(before), threading.Event()

        def sampler():
            while not stop.is_set():
                try:
                    m = read_memory(admin, p.pid)
                except (OSError, ValueError):
                    continue
                for key in m:
                    peak[key] = max(peak[key], m[key])
                time.sleep(0.02)

        t = threading.Thread(target=sampler, daemon=True)
        t.start()
        answers, rounds = [], []
        for _ in range(args.mem_rounds):
            answers += stream_clients(PORT[name], f"/{shape}/v1/chat/completions", args.mem_streams,
                                      WORK / f"mem_{k}_{shape}.out", args.mem_include_usage)
            time.sleep(0.3)
            rounds.append(read_memory(admin, p.pid))
        stop.set()
        t.join()
        time.sleep(1.0)
        after = read_memory(admin, p.pid)
        bad = [a for a in answers if a[0] != 200]
        if bad:
            raise RuntimeError(f"memory check through {k}: {len(bad)} of {len(answers)} streams failed: {bad[:3]}")
        metered = meter_report(stats_flushed({k: admin})[k]) if k == "b" else None
        procs.stop(p)
        out[k] = {"before": before, "peak": peak, "after": after, "rounds": rounds, "metered": metered,
                  "client_bytes": sorted({a[1] for a in answers}), "streams": len(answers)}
    usage_chunk = b'"choices":[]' in (WORK / f"mem_b_{shape}.out").read_bytes()
    out["usage_cut"] = not usage_chunk if not args.mem_include_usage else usage_chunk
    return out


def run_memory(procs, args, shipped, sizes):
    log()
    log(f"-- memory: SSE responses of 1, 10 and 50 MiB (~1 KB events; no 50 MiB in --smoke) and one 10 MiB event, each "
        f"{args.mem_rounds} x {args.mem_streams} concurrent streams through a fresh plain Envoy and a "
        "fresh Envoy + llm-meter (metrics config)")
    if args.mem_include_usage:
        log("   requests WITH include_usage (--mem-include-usage): llm-meter only reads the stream")
    else:
        log("   requests WITHOUT include_usage: llm-meter injects it and cuts the usage chunk from the "
            "client's stream, the path that keeps the most state (the pending event, <= 64 KiB) and "
            "rewrites every response chunk")
    report = {}
    shapes = [m for m in MEMORY_SHAPES if not (args.smoke and m[1] > 10)]
    for shape, size_mib, one_event in shapes:
        report[shape] = memory_pass(procs, args, shipped, shape, size_mib, one_event)
    mib = lambda v: f"{v / 1048576:7.1f}"
    log()
    log("   Envoy /memory `allocated` and `heap_size`, process RSS (MiB): before, peak (sampled every "
        "~20 ms), after; growth = peak - before")
    hdr = (f"   {'response':<14} {'front':<12} {'allocated':>9} {'peak':>7} {'after':>7} {'growth':>7} "
           f"{'heap':>7} {'peak':>7} {'growth':>7} {'RSS':>7} {'peak':>7} {'growth':>7}")
    log(hdr)
    log("   " + "-" * (len(hdr) - 3))
    for shape, size_mib, one_event in shapes:
        for k in ("a", "b"):
            r = report[shape][k]
            b, pk, af = r["before"], r["peak"], r["after"]
            log(f"   {shape if k == 'a' else '':<14} {'plain' if k == 'a' else 'llm-meter':<12} "
                f"{mib(b['allocated']):>9} {mib(pk['allocated'])} {mib(af['allocated'])} "
                f"{mib(pk['allocated'] - b['allocated'])} {mib(b['heap_size'])} {mib(pk['heap_size'])} "
                f"{mib(pk['heap_size'] - b['heap_size'])} {mib(b['rss'])} {mib(pk['rss'])} {mib(pk['rss'] - b['rss'])}")
    for shape, _, _ in shapes:
        r = report[shape]
        m = r["b"]["metered"]
        log(f"   {shape}: allocated after each round (MiB) plain "
            + ", ".join(f"{x['allocated'] / 1048576:.2f}" for x in r["a"]["rounds"]) + "; llm-meter "
            + ", ".join(f"{x['allocated'] / 1048576:.2f}" for x in r["b"]["rounds"])
            + f"; client bytes plain {r['a']['client_bytes']}, llm-meter {r['b']['client_bytes']} "
            f"(usage chunk {'as the client asked' if args.mem_include_usage else 'cut'}: "
            f"{'yes' if r['usage_cut'] else 'NO'}); llm-meter metered {m['requests']:.0f} "
            f"streams, {m['output_tokens']:.0f} output tokens, usage missing {m['usage_missing']:.0f}, "
            f"skips {m['skips']:.0f}, errors {m['errors']:.0f}")
    return report


# ---------------------------------------------------------------------------------------------

def build_floor():
    """--floor: builds the hostcall floor filter (tools/floor-filter) for setups (f) and (fc)."""
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    argv = [cargo, "build", "--release", "--target", "wasm32-wasip1", "-p", "floor-filter"]
    log("--floor: " + " ".join(argv[1:]))
    try:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        sys.exit(f"--floor: cannot build the floor filter: {e}")
    (WORK / "floor-build.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not FLOOR_WASM.exists():
        sys.exit(f"--floor: building the floor filter failed (exit {p.returncode}); its output: "
                 f"{(WORK / 'floor-build.log').relative_to(ROOT)}")


def floor_report(s, results, setups, per="request", throughput=True):
    """--floor: each llm-meter setup next to the hostcall floor of its configuration: (b) next to (f),
    (c) next to (fc). `s`: the summary, `results`: the per-round results (rounds aligned);
    `throughput`: the load saturates the proxy, so requests/s ratios mean something."""
    for meter, floor in (("b", "f"), ("c", "fc")):
        if floor not in setups:
            continue
        f = s[floor]
        line = f"   hostcall floor ({floor}): {fmt(f.get('dcpu_a'), '+.1f')} us CPU per {per} over (a)"
        if throughput:
            line += f", {fmt(f.get('ratio_a'), '.3f')} of (a)'s {per}s/s"
        line += f": the least ({meter}) could cost"
        if meter in setups:
            dcpu = med([x["cpu_us_per_req"] - y["cpu_us_per_req"] for x, y in zip(results[meter], results[floor])])
            line += f"; ({meter}) uses {fmt(dcpu, '+.1f')} us CPU per {per} over it (its own work)"
            if throughput and s[meter]["rps"] and f["rps"]:
                line += f" and does {s[meter]['rps'] / f['rps']:.3f} of its {per}s/s"
        log(line)


def check_floor(setups):
    """--floor: the floor filters ran (their batched request counter moved)."""
    floors = [k for k in FLOOR_SETUPS if k in setups]
    if not floors:
        return
    time.sleep(FLUSH_WAIT)  # their counters are batched too (flushed every 250 ms)
    for k in floors:
        _, body = http(f"http://127.0.0.1:{PORT[f'{k}_admin']}/stats/prometheus", timeout=10)
        n = prom_sum(body.decode(errors="replace"), "floor_requests_total")
        log(f"   ({k}) floor filter counted {n:.0f} requests")
        if n == 0:
            raise RuntimeError(f"setup {k}: the floor filter counted nothing: is it running?")


# Hostcalls per non-streaming exchange (the exchange bench's names): the setup it stands for, the most.
HOSTCALL_TARGETS = {"chat_json_metrics": ("b", 8), "chat_json_metrics_2_limits": ("c", 14)}


def count_hostcalls():
    """`EXCHANGE_HOSTCALLS_ONLY=1 cargo bench -p llm-meter --bench exchange` (it builds the bench
    first): {name: hostcalls per exchange}, or why there are none (a str)."""
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    log("hostcalls per exchange: EXCHANGE_HOSTCALLS_ONLY=1 cargo bench -p llm-meter --bench exchange")
    try:
        p = subprocess.run([cargo, "bench", "-p", "llm-meter", "--bench", "exchange"], cwd=ROOT, capture_output=True,
                           text=True, env=dict(os.environ, EXCHANGE_HOSTCALLS_ONLY="1"), timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"   could not run it: {e}")
        return f"cargo bench could not run ({e})"
    (WORK / "hostcalls.log").write_text(p.stdout + p.stderr)
    counts = {m.group(1): int(m.group(2))
              for m in re.finditer(r"^(\S+): (\d+) hostcalls per exchange", p.stdout, re.M)}
    if p.returncode != 0 or not counts:
        log(f"   failed (exit {p.returncode}); its output: {(WORK / 'hostcalls.log').relative_to(ROOT)}")
        return f"cargo bench failed (exit {p.returncode})"
    for line in p.stdout.splitlines():
        if " hostcalls per exchange " in line or " allocations per exchange " in line:
            log("   " + line)
    return counts


def print_targets(workloads, hostcalls, smoke):
    """Issue 19's targets, each met or not with the number measured (reported, never asserted)."""
    log()
    log("issue 19's targets" + (" (--smoke: the numbers mean nothing)" if smoke else "")
        + "; medians over rounds (differences: of the per-round differences)")
    ok = lambda good: "met" if good else "NOT met"

    def row(workload, text, result):
        log(f"   {workload:<18} {text}: {result}")

    def summary(w, k):
        return workloads.get(w, {}).get("summary", {}).get(k)

    for w, minima in (("chat", {"b": 0.80, "c": 0.70}), ("stream", {"b": 0.85, "c": 0.80})):
        for k, least in minima.items():
            r = summary(w, k)
            ratio = r.get("ratio_a") if r else None
            row(w, f"({k})/(a) throughput >= {least:.2f}",
                "not measured" if ratio is None else f"{ratio:.3f} {ok(ratio >= least)}")
    for k in ("b", "c"):
        r, a = summary(TRICKLE, k), summary(TRICKLE, "a")
        d = r.get("dcpu_a") if r else None
        if d is None or not a or not a.get("cpu_us"):
            row(TRICKLE, f"({k}) added CPU per stream <= 10% of plain Envoy's", "not measured")
            continue
        share = d / a["cpu_us"]
        row(TRICKLE, f"({k}) added CPU per stream <= 10% of plain Envoy's",
            f"{d:+.0f} us per stream ({d / TRICKLE_EVENTS:+.2f} us per event), {100 * share:.1f}% of "
            f"{a['cpu_us']:.0f} us {ok(share <= 0.10)}")
    for k in ("b", "c"):
        r = summary("chat-1conn", k)
        d = r.get("dp99_a") if r else None
        row("chat-1conn", f"({k}) p99 added <= 0.2 ms", "not measured" if d is None else f"{d:+.3f} ms {ok(d <= 0.2)}")
    for name, (k, most) in HOSTCALL_TARGETS.items():
        n = hostcalls.get(name) if isinstance(hostcalls, dict) else None
        why = hostcalls if isinstance(hostcalls, str) else "not in the bench's output"
        row("hostcalls", f"({k}) {name} <= {most} per exchange",
            f"not measured ({why})" if n is None else f"{n} {ok(n <= most)}")
    for w in GLOBAL_WORKLOADS:
        g, ng = summary(w, "g"), summary(w, "ng")
        for what, gk, nk, unit, spec in (("p50", "dp50_b", "dp50_a", "ms", "+.3f"), ("p99", "dp99_b", "dp99_a", "ms", "+.3f"),
                                         ("CPU per request", "dcpu_b", "dcpu_a", "us", "+.1f")):
            text = f"{what} added, (g)-(b) <= 1.2 x (ng)-(a)"
            gv, nv = (g or {}).get(gk), (ng or {}).get(nk)
            if gv is None or nv is None:
                row(w, text, "not measured")
                continue
            good = gv <= 1.2 * nv if nv > 0 else gv <= 0
            ratio = f" ({gv / nv:.2f}x)" if nv > 0 else " (the native filter added nothing measurable)"
            row(w, text, f"{format(gv, spec)} vs {format(nv, spec)} {unit}{ratio} {ok(good)}")
        # --floor: whether the target is within reach of any proxy-wasm filter making (g)'s call.
        floor = floor_global(workloads.get(w, {}).get("rounds", {}))
        for (what, _, unit, spec), nk in zip(GLOBAL_MEASURES, ("dp50_a", "dp99_a", "dcpu_a")):
            fv, nv = (floor or {}).get(what), (ng or {}).get(nk)
            if floor is None or fv is None or nv is None:
                continue
            ratio = f" ({fv / nv:.2f}x)" if nv > 0 else " (the native filter added nothing measurable)"
            good = fv <= 1.2 * nv if nv > 0 else fv <= 0
            row(w, f"{what} added, the floor (fg)-(f) <= 1.2 x (ng)-(a)",
                f"{format(fv, spec)} vs {format(nv, spec)} {unit}{ratio} {'within' if good else 'NOT within'}")


def env_flag(name, default):
    v = os.environ.get(name)
    return default if v is None else v not in ("0", "false", "no", "")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", default=env_flag("BENCH_SMOKE", False),
                    help="1 round x 2 s, no LiteLLM, small memory check: proves the harness works")
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 5)))
    ap.add_argument("--duration", type=int, default=int(os.environ.get("BENCH_DURATION", 10)), help="seconds per round and setup")
    ap.add_argument("--warmup", type=int, default=int(os.environ.get("BENCH_WARMUP", 3)), help="seconds per setup before the rounds")
    ap.add_argument("--connections", type=int, default=int(os.environ.get("BENCH_CONNECTIONS", 16)))
    ap.add_argument("--concurrency", type=int, default=int(os.environ.get("BENCH_CONCURRENCY", 1)), help="front Envoys' --concurrency")
    ap.add_argument("--no-pin", dest="pin", action="store_false", default=env_flag("BENCH_PIN", True))
    ap.add_argument("--no-litellm", dest="litellm", action="store_false", default=env_flag("BENCH_LITELLM", True))
    ap.add_argument("--no-python", dest="python", action="store_false", default=env_flag("BENCH_PYTHON", True))
    ap.add_argument("--no-noop", dest="noop", action="store_false", default=env_flag("BENCH_NOOP", True),
                    help="skip setup n (Envoy + an empty wasm filter: the cost of any wasm filter)")
    ap.add_argument("--floor", action="store_true", default=env_flag("BENCH_FLOOR", False),
                    help="add setups f and fc: the hostcall floor filter (tools/floor-filter, built first) making "
                         "the hostcalls of (b) and (c) and nothing else, the most (b) and (c) could reach")
    ap.add_argument("--no-memory", dest="memory", action="store_false", default=env_flag("BENCH_MEMORY", True))
    ap.add_argument("--workloads", default=os.environ.get(
        "BENCH_WORKLOADS", "chat,chat-1conn,stream,stream-trickle,chat-global,chat-global-1conn"),
                    help="comma-separated, from: " + ", ".join(WORKLOADS))
    ap.add_argument("--quiet-wait", type=int, default=int(os.environ.get("BENCH_QUIET_WAIT", 600)),
                    help="before each measurement wait up to this many seconds for the machine to be idle "
                         "(0: never wait, never repeat)")
    ap.add_argument("--retries", type=int, default=int(os.environ.get("BENCH_RETRIES", 3)),
                    help="repeat a measurement disturbed by other processes at most this many times")
    ap.add_argument("--filter", default=os.environ.get("BENCH_FILTER", ""),
                    help="the llm-meter .wasm to measure in (b), (c), (r) and (g) (default: the `just build` output), "
                         "e.g. another commit's build, to compare builds")
    ap.add_argument("--filter-extra", default=os.environ.get("BENCH_FILTER_EXTRA", ""),
                    help="JSON object merged into the llm-meter configuration of (b), (c), (r) and (g), e.g. "
                         "'{\"request\":{\"model_lookahead_bytes\":0}}' to measure a configuration's cost")
    ap.add_argument("--skip", default=os.environ.get("BENCH_SKIP", ""),
                    help="comma-separated setups to leave out (e.g. bo for a filter build without records)")
    ap.add_argument("--access-log", action="store_true", default=env_flag("BENCH_ACCESS_LOG", False),
                    help="keep the shipped JSON access log (stdout, one line per request) in every Envoy setup")
    ap.add_argument("--native-without-headers", dest="native_headers", action="store_false",
                    default=env_flag("BENCH_NATIVE_HEADERS", True),
                    help="(ng): the native filter sends no x-ratelimit-* headers (llm-meter always does; by default "
                         "(ng) sends them too, enable_x_ratelimit_headers: DRAFT_VERSION_03)")
    ap.add_argument("--perf", action="store_true", default=env_flag("BENCH_PERF", False),
                    help="after each workload's rounds, profile each Envoy setup with perf (cpu-clock) "
                         "and print where its CPU goes")
    ap.add_argument("--trickle-streams", type=int, default=int(os.environ.get("BENCH_TRICKLE_STREAMS", 400)),
                    help="stream-trickle: streams per round and setup")
    ap.add_argument("--trickle-concurrency", type=int, default=int(os.environ.get("BENCH_TRICKLE_CONCURRENCY", 50)),
                    help="stream-trickle: streams in flight at a time")
    ap.add_argument("--no-hostcalls", dest="hostcalls", action="store_false", default=env_flag("BENCH_HOSTCALLS", True),
                    help="skip counting the hostcalls per exchange (cargo bench -p llm-meter --bench exchange) at the start")
    ap.add_argument("--mem-streams", type=int, default=8, help="concurrent streams in the memory check")
    ap.add_argument("--mem-rounds", type=int, default=3, help="rounds of concurrent streams per response size")
    ap.add_argument("--mem-include-usage", action="store_true",
                    help="memory check with requests that ask for usage themselves (nothing to inject or cut)")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.duration, args.warmup, args.litellm, args.quiet_wait = 1, 2, 0, False, 0
        args.mem_streams, args.mem_rounds = 2, 1
        args.trickle_streams, args.trickle_concurrency, args.hostcalls = 20, 10, False
    args.workloads = [w for w in args.workloads.split(",") if w]
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r} ({', '.join(WORKLOADS)})")
    return args


def check_tools(args):
    if not shutil.which("wrk"):
        if os.geteuid() == 0 and shutil.which("apt-get"):
            log("wrk is missing: apt-get install -y wrk")
            subprocess.run(["apt-get", "update", "-qq"], check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"], check=False,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if not shutil.which("wrk"):
            sys.exit("just bench needs wrk (Debian/Ubuntu: apt-get install wrk)")
    if not shutil.which("curl"):
        sys.exit("just bench needs curl (apt-get install curl)")
    needs = [(ENVOY, "just envoy"), (WASM, "just build")]
    if TRICKLE in args.workloads:
        needs.append((MOCK, "just mock"))
    if any(w in GLOBAL_WORKLOADS for w in args.workloads):
        needs.append((RLS, "just rls"))
        if not shutil.which("redis-server"):
            sys.exit("the global-limit workloads need redis-server (Debian: apt-get install redis-server)")
    for path, how in needs:
        if not path.exists():
            sys.exit(f"{path.relative_to(ROOT)} is missing: run `{how}` (or use `just bench`)")
    if args.pin and not shutil.which("taskset"):
        log("taskset not found (util-linux): running unpinned")
        args.pin = False
    if args.pin and os.cpu_count() < 2:
        log("fewer than 2 CPUs: running unpinned")
        args.pin = False


def machine():
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    envoy_version = subprocess.run([ENVOY, "--version"], capture_output=True, text=True).stdout.strip().split()[-1]
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    return f"{os.cpu_count()} CPUs ({cpu}), Envoy {envoy_version}, {wrk_version}, filter {WASM.stat().st_size} bytes"


def main():
    global PROCS, WASM, ACCESS_LOG, NATIVE_HEADERS
    args = parse_args()
    ACCESS_LOG = args.access_log
    NATIVE_HEADERS = args.native_headers
    if args.filter:
        WASM = Path(args.filter).resolve()
    if args.filter_extra:
        try:
            extra = json.loads(args.filter_extra)
        except ValueError as e:
            sys.exit(f"--filter-extra: not JSON: {e}")
        if not isinstance(extra, dict):
            sys.exit("--filter-extra: not a JSON object")
        FILTER_EXTRA.update(extra)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    atexit.register(cleanup)
    check_tools(args)
    WORK.mkdir(parents=True, exist_ok=True)
    for f in WORK.glob("*.log"):
        f.unlink()
    busy = [p for p in PORT.values() if not port_free(p)]
    if busy:
        sys.exit(f"ports already in use: {busy} (a previous bench still running?)")

    setups = (["a", "b", "bo", "r", "c"] + (["n"] if args.noop else [])
              + ([k for k in FLOOR_SETUPS if k != "fg"] if args.floor else []))
    setups = [k for k in setups if k not in args.skip.split(",")]
    if args.python:
        if ensure_venv(PY_VENV, PY_REQS, "the Python proxy (FastAPI, uvicorn, httpx, prometheus-client)", 600):
            setups.append("py")
        else:
            sys.exit("cannot install the Python proxy's packages (see above); --no-python skips it")
    if args.litellm:
        if ensure_venv(LL_VENV, LL_REQS, "LiteLLM proxy", 300):
            setups.append("litellm")
        else:
            log("LiteLLM skipped: its install failed or took more than 5 minutes")

    if args.floor:
        build_floor()
    log(f"just bench{' --smoke (timings meaningless)' if args.smoke else ''}: {machine()}")
    if args.floor:
        log(f"--floor: hostcall floor filter {FLOOR_WASM.relative_to(ROOT)} ({FLOOR_WASM.stat().st_size} bytes) "
            "in (f) (the hostcalls of (b)) and (fc) (those of (c)); in the global-limit workloads (f) and (fg) "
            "(those of (g))")
    if FILTER_EXTRA:
        log(f"--filter-extra merged into the (b), (c), (r) and (g) configurations: {json.dumps(FILTER_EXTRA)}")
    log(f"front Envoys: --concurrency {args.concurrency}; "
        + (f"pinned: proxies under test on CPU {CPU_PROXY}, wrk and the upstream Envoy on CPU {CPU_LOAD}"
           if args.pin else "unpinned"))

    shipped = SHIPPED.read_text()
    files = {"json": chat_completion_json(), "sse": sse_stream(200)}
    if args.memory:
        for name, size_mib, one_event in MEMORY_SHAPES:
            files[name] = (one_event_sse if one_event else big_sse)(size_mib * 1024 * 1024)
    paths = {}
    for name, body in files.items():
        paths[name] = WORK / f"body_{name}.txt"
        paths[name].write_bytes(body)
    sizes = {k: len(v) for k, v in files.items()}
    log(f"upstream bodies: chat JSON {sizes['json']} bytes, SSE {sizes['sse']} bytes"
        + "".join(f", {name} {sizes[name]} bytes" for name, _, _ in MEMORY_SHAPES if name in sizes))

    (WORK / "noop.wasm").write_bytes(noop_wasm())
    procs = PROCS = Procs(args.pin)
    for name, _, _ in MEMORY_SHAPES:
        paths.setdefault(name, paths["json"])  # --no-memory: routes still need a file
    (WORK / "upstream.yaml").write_text(upstream_yaml(paths))
    procs.upstream = procs.start("upstream", [ENVOY, "-c", WORK / "upstream.yaml", "--concurrency", "1",
                                              "--disable-hot-restart", "--log-level", "warn"], cpus=CPU_LOAD)
    wait_ready(f"http://127.0.0.1:{PORT['up_admin']}/ready", procs.upstream, "the upstream Envoy")

    out = {"machine": machine(), "args": {k: v for k, v in vars(args).items()}, "workloads": {}}
    out["hostcalls"] = count_hostcalls() if args.hostcalls else "--smoke or --no-hostcalls"
    for w in args.workloads:
        if w == TRICKLE:
            out["workloads"][w] = run_trickle(procs, args, setups, shipped)
        else:
            out["workloads"][w] = run_workload(procs, w, args, setups, shipped, sizes)
    for p in (getattr(procs, "rls", None), getattr(procs, "redis", None)):
        if p is not None:
            procs.stop(p)
    if args.memory:
        out["memory"] = run_memory(procs, args, shipped, sizes)
    (WORK / "results.json").write_text(json.dumps(out, indent=2, default=str))
    print_targets(out["workloads"], out["hostcalls"], args.smoke)
    log()
    log(f"raw wrk output: {WORK.relative_to(ROOT)}/wrk.log; all numbers: {WORK.relative_to(ROOT)}/results.json")
    if args.smoke:
        log("smoke run: the harness works (timings from a 2 s round mean nothing)")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        sys.exit(1)
