"""A typical Python "LLM metrics exporter" proxy, the kind users write today, for `just bench`.

FastAPI + uvicorn in front of an OpenAI-compatible upstream, forwarding with httpx and recording
the metrics llm-meter records, with prometheus_client:

- `llm_requests_total{model,status}`: requests by model and HTTP status;
- `llm_tokens_total{model,token_type}`: input/output/cached_input/reasoning tokens, parsed from
  the response JSON (`usage`) or, for streams, from the SSE chunk that carries `usage`;
- `llm_request_duration_seconds{model}`: request start to the end of the response (or stream).

Metrics are served on `/metrics`. Run (as scripts/bench.py does):

    UPSTREAM=http://127.0.0.1:19100 .venv-bench/bin/uvicorn --app-dir bench py_proxy:app \
        --host 127.0.0.1 --port 19004 --workers 1 --no-access-log --log-level warning

It is written the way such proxies usually are (one shared AsyncClient with keep-alive, the
request JSON parsed for `model`/`stream`, every SSE `data:` line parsed with json.loads), not
tuned for speed beyond that: no access log, uvloop and httptools (uvicorn[standard]).
"""

import json
import os
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import Counter, Histogram, make_asgi_app

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:8000")

REQUESTS = Counter("llm_requests_total", "LLM API requests", ["model", "status"])
TOKENS = Counter("llm_tokens_total", "LLM tokens", ["model", "token_type"])
DURATION = Histogram(
    "llm_request_duration_seconds",
    "LLM request duration",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)

# Hop-by-hop and length headers are not forwarded; httpx and uvicorn set their own.
HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
       "proxy-connection", "accept-encoding"}
RESPONSE_HOP = HOP | {"content-encoding", "date", "server"}

client = httpx.AsyncClient(
    base_url=UPSTREAM,
    timeout=httpx.Timeout(300.0, connect=2.0),
    limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
)
app = FastAPI()
app.mount("/metrics", make_asgi_app())


def record_usage(model: str, usage) -> None:
    if not isinstance(usage, dict):
        return
    TOKENS.labels(model, "input").inc(usage.get("prompt_tokens") or 0)
    TOKENS.labels(model, "output").inc(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    if cached:
        TOKENS.labels(model, "cached_input").inc(cached)
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    if reasoning:
        TOKENS.labels(model, "reasoning").inc(reasoning)


def forward_headers(headers) -> dict:
    return {k: v for k, v in headers.items() if k.lower() not in HOP}


def response_headers(headers) -> dict:
    return {k: v for k, v in headers.items() if k.lower() not in RESPONSE_HOP}


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    start = time.perf_counter()
    body = await request.body()
    try:
        payload = json.loads(body)
        model = str(payload.get("model") or "unknown")
        stream = payload.get("stream") is True
    except (ValueError, AttributeError):
        model, stream = "unknown", False
    upstream_request = client.build_request(
        "POST", request.url.path, content=body, headers=forward_headers(request.headers)
    )

    if not stream:
        upstream = await client.send(upstream_request)
        if 200 <= upstream.status_code < 300:
            try:
                record_usage(model, upstream.json().get("usage"))
            except ValueError:
                pass
        REQUESTS.labels(model, str(upstream.status_code)).inc()
        DURATION.labels(model).observe(time.perf_counter() - start)
        return Response(upstream.content, status_code=upstream.status_code,
                        headers=response_headers(upstream.headers))

    upstream = await client.send(upstream_request, stream=True)

    async def relay():
        try:
            async for line in upstream.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    try:
                        chunk = json.loads(line[6:])
                    except ValueError:
                        chunk = None
                    if isinstance(chunk, dict) and chunk.get("usage"):
                        record_usage(model, chunk["usage"])
                yield line + "\n"
        finally:
            await upstream.aclose()
            REQUESTS.labels(model, str(upstream.status_code)).inc()
            DURATION.labels(model).observe(time.perf_counter() - start)

    return StreamingResponse(relay(), status_code=upstream.status_code,
                             headers=response_headers(upstream.headers))
