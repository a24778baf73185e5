//! `mock-llm`: a small LLM gateway for llm-meter's demo (`just run`), its integration tests and
//! its benchmarks, speaking OpenAI's, Anthropic's and Gemini's wire formats. Nothing here calls a
//! model: every answer is generated from the request and a few `x-mock-*` request headers, so a
//! test can script exactly the token counts, timing and failures it wants to see metered.
//!
//! ```text
//! mock-llm [--host 127.0.0.1] [--port 8000] [--quiet] [--name NAME]
//! ```
//!
//! `--port 0` picks a free port. `--name NAME` adds `x-mock-server: NAME` to every answer, so a
//! test behind a proxy with two mocks (a primary and a secondary gateway) sees which one served. The first line on stdout is always `listening on HOST:PORT`;
//! one line per request goes to stderr unless `--quiet`.
//!
//! # Endpoints
//! - `POST /v1/chat/completions`: non-streaming, or SSE with `"stream": true`; the final usage
//!   chunk (`"choices": []`) is sent only with `"stream_options": {"include_usage": true}`, and
//!   the other chunks then carry `"usage": null`, as OpenAI does.
//! - `POST /v1/completions`: the legacy text completions API, streaming or not.
//! - `POST /v1/embeddings`: `input` as a string, strings, or token arrays; `dimensions`;
//!   `encoding_format` `float` or `base64`.
//! - `POST /v1/responses` (suffix `/responses`): OpenAI's Responses API. Non-streaming: a
//!   `response` object (`status` `completed`, one `message` output item with one `output_text`
//!   part, `usage` with `input_tokens`, `input_tokens_details.cached_tokens`, `output_tokens`,
//!   `output_tokens_details.reasoning_tokens`, `total_tokens`). With `"stream": true`: SSE
//!   `event: <type>` / `data: <json>` events, each with `sequence_number` from 0:
//!   `response.created` and `response.in_progress` (status `in_progress`, `"usage": null`),
//!   `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`
//!   (one per piece), `response.output_text.done`, `response.content_part.done`,
//!   `response.output_item.done`, then `response.completed` whose `response` carries the usage
//!   (see `x-mock-responses-final`). No `[DONE]`. Input estimated from `instructions` and `input`;
//!   output defaults to `max_output_tokens`, else 16.
//! - `POST /v1/messages` (suffix `/v1/messages`): Anthropic's Messages API. Non-streaming: a
//!   `message` (`content` one `text` block, `stop_reason` `end_turn`, `usage` with
//!   `input_tokens`, `cache_creation_input_tokens`, `cache_read_input_tokens`, `output_tokens`).
//!   With `"stream": true`: SSE `event: <type>` / `data: <json>`: `message_start` (usage with the
//!   input and cache counts and `output_tokens: 1`), `content_block_start`, `ping`,
//!   `content_block_delta` (`text_delta`, one per piece), `content_block_stop`, `message_delta`
//!   (`usage: {"output_tokens": M}`), `message_stop`. Input estimated like chat, plus `system`;
//!   output defaults to `max_tokens`, else 16. Errors are `{"type": "error", "error": {"type",
//!   "message"}, "request_id"}`; responses carry a `request-id` header.
//! - `POST …/models/{model}:generateContent` and `POST …/models/{model}:streamGenerateContent`:
//!   Gemini (e.g. `/v1beta/models/gemini-2.5-flash:generateContent`; the model comes from the
//!   path). A `GenerateContentResponse`: `candidates[0]` (`content.parts[0].text`, `role` `model`,
//!   `finishReason` `STOP`, `index` 0), `usageMetadata` (`promptTokenCount`,
//!   `candidatesTokenCount`, `totalTokenCount` = prompt + candidates + thoughts,
//!   `promptTokensDetails`, and `thoughtsTokenCount`, `cachedContentTokenCount` and
//!   `cacheTokensDetails` only when not 0), `modelVersion`, `responseId`. Streaming with
//!   `?alt=sse`: `data: <json>\r\n\r\n` events, one chunk per piece, each with `usageMetadata`
//!   counting up (`candidatesTokenCount` = candidates × (i+1) / n, prompt and thoughts constant),
//!   `finishReason` on the last. Without `alt=sse`: one JSON array, `[` + chunk, `,\r\n` + chunk,
//!   …, `]`, each element its own piece (`content-type: application/json; charset=UTF-8`). Prompt
//!   estimated from `contents` and `systemInstruction`; candidates default to
//!   `generationConfig.maxOutputTokens`, else 16. Errors are `{"error": {"code", "message",
//!   "status"}}`.
//! - `GET /v1/models`, `GET /healthz`.
//!
//! Paths are matched by suffix (before any `?`), so `/openai/v1/chat/completions` works too.
//! Request bodies arrive with `content-length` or chunked; connections are kept alive. A bad
//! control header, bad body or wrong method gets a 400/405 in the API's own error shape.
//!
//! Every 2xx answer carries rate-limit headers (`x-mock-ratelimit-*` change them): OpenAI's
//! endpoints `x-ratelimit-limit-requests: 5000`, `x-ratelimit-remaining-requests: 4999`,
//! `x-ratelimit-limit-tokens: 2000000`, `x-ratelimit-remaining-tokens: 1999000`,
//! `x-ratelimit-reset-requests: 12ms`, `x-ratelimit-reset-tokens: 30ms`; Anthropic's
//! `anthropic-ratelimit-requests-limit: 1000`, `anthropic-ratelimit-requests-remaining: 999`,
//! `anthropic-ratelimit-requests-reset`, `anthropic-ratelimit-tokens-limit: 100000`,
//! `anthropic-ratelimit-tokens-remaining: 99000`, `anthropic-ratelimit-tokens-reset` (RFC 3339,
//! now + 1 s); Gemini none.
//!
//! # Control headers
//! | header | effect |
//! |---|---|
//! | `x-mock-prompt-tokens` | reported prompt tokens (OpenAI `prompt_tokens`/`input_tokens`, Anthropic `input_tokens`, Gemini `promptTokenCount`; default: estimated from the request, ~4 bytes of text per token) |
//! | `x-mock-completion-tokens` | reported completion tokens (OpenAI `completion_tokens`/`output_tokens`, Anthropic `output_tokens`, Gemini `candidatesTokenCount`; default: `max_completion_tokens`, `max_tokens`, `max_output_tokens` or `maxOutputTokens`, else 16) |
//! | `x-mock-cached-tokens` | `prompt_tokens_details.cached_tokens`, `input_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`, Gemini `cachedContentTokenCount` (default 0; at most the prompt tokens except on Anthropic, whose `input_tokens` excludes cache reads) |
//! | `x-mock-cache-creation-tokens` | Anthropic `cache_creation_input_tokens` (default 0) |
//! | `x-mock-reasoning-tokens` | `completion_tokens_details.reasoning_tokens` and `output_tokens_details.reasoning_tokens` (default 0, at most the completion tokens), Gemini `thoughtsTokenCount` (on top of the candidates) |
//! | `x-mock-content` | the assistant's text (default: generated, one word per visible completion token, capped at 4096 words) |
//! | `x-mock-chunks` | number of content events in a stream (default: one per word) |
//! | `x-mock-delay-ms` | wait before sending the response headers |
//! | `x-mock-chunk-delay-ms` | wait between stream events |
//! | `x-mock-split` | write the body in pieces of this many bytes, each flushed on its own, ignoring event boundaries (after compression: the compressed bytes are split) |
//! | `x-mock-split-delay-ms` | wait between those pieces (default 2) |
//! | `x-mock-dimensions` | embedding dimensions (default: the request's `dimensions`, else 1536) |
//! | `x-mock-scenario` | `ok` (default), `rate_limit` (429 with `retry-after: 1` and the API's rate-limit headers: OpenAI `x-ratelimit-*` with limit 500 requests, Anthropic `rate_limit_error` with `anthropic-ratelimit-requests-remaining: 0`, Gemini `RESOURCE_EXHAUSTED` without `retry-after`), `server_error` (500; Anthropic `api_error`, Gemini `INTERNAL`), `unavailable` (503; Anthropic 529 `overloaded_error`, Gemini `UNAVAILABLE`), `slow` (headers after 5 s and 500 ms between events unless the delay headers say otherwise), `reset_mid_stream` (200 and half the body, then a TCP reset: for Anthropic `message_start`, `content_block_start`, `ping` and half the deltas), `no_usage` (no usage anywhere), `malformed` (a truncated JSON body, or events that are not JSON) |
//! | `x-mock-echo` | answer with the request body, byte for byte (status: the header's value if it is a status 200–599, else 200), for hostile-input tests; `x-mock-content-type` sets the content type (default `application/json`) |
//! | `x-mock-encoding` | `gzip`, `deflate` (zlib), `raw-deflate` (a raw deflate stream, labelled `content-encoding: deflate`), `br` or `identity` (default): compresses the body (errors included) and sets `content-encoding`; `content-length` is the compressed length. A stream is compressed with a sync flush after every event, so each chunk decodes on arrival; the stream's end rides on the last event's chunk |
//! | `x-mock-brotli-lgwin` | with `x-mock-encoding: br`: the brotli window, log2, 10 to 24 (default 22, 4 MiB; 24 is a 16 MiB window, which a decoder must hold for a long body); a 400 without `br` |
//! | `x-mock-pad-bytes` | non-streaming chat and completions: the assistant's text is padded with generated prose (deterministic; about 23:1 with brotli, 20 MB to 0.86 MB) to this many bytes (at most 256 MiB), so the JSON body is that size plus a few hundred bytes, usage still at the end. Such a body is built and compressed once per distinct answer (knobs, model, counts, encoding, window) and then served from memory, so repeats carry the first one's `id` and `created`. A 400 on a stream or another API. Trickle it with `x-mock-split` and `x-mock-split-delay-ms` |
//! | `x-mock-ratelimit-limit-requests`, `x-mock-ratelimit-remaining-requests`, `x-mock-ratelimit-limit-tokens`, `x-mock-ratelimit-remaining-tokens` | override the 2xx rate-limit numbers in the API's header family; when only a limit is given, remaining is limit − 1 (requests) or limit − 1000 (tokens) |
//! | `x-mock-ratelimit-style` | `provider` (default: the family above), `generic` (only `x-ratelimit-limit` and `x-ratelimit-remaining`, the request numbers, on every API including Gemini, whose defaults are 1000/999), `none` |
//! | `x-mock-usage-in-headers` | `1`/`true`: the answer carries `x-usage-input-tokens`, `x-usage-output-tokens`, and `x-usage-cached-tokens`, `x-usage-reasoning-tokens`, `x-usage-cache-creation-tokens` when not 0, and its body no usage (as with `no_usage`); `0`/`false` (default) |
//! | `x-mock-anthropic-final-usage` | `full`: Anthropic's `message_delta` usage also repeats `input_tokens`, `cache_creation_input_tokens` and `cache_read_input_tokens`; `output` (default): only `output_tokens` |
//! | `x-mock-delta-input-tokens` | with `x-mock-anthropic-final-usage: full`, the `input_tokens` in `message_delta` (default: the same as `message_start`); a 400 without it |
//! | `x-mock-responses-final` | `completed` (default), `incomplete` (final event `response.incomplete`: status `incomplete`, `incomplete_details: {"reason": "max_output_tokens"}`, usage present), `failed` (`response.failed`: status `failed`, `error: {"code": "server_error", …}`, usage present); non-streaming answers get the same status |
//! | `x-mock-fail-model` | `<model>=<status>[,<model>=<status>…]` (status 400–599): when the model the request names (body `model`; for Gemini the path's `models/{model}`) is listed, the answer is that status with the API's error body (OpenAI `{"error": {…}}` with type `requests`/code `rate_limit_exceeded` on 429, `server_error` on 5xx, else `invalid_request_error`; Anthropic `{"type": "error", …}` with `rate_limit_error`, `overloaded_error` on 529, `api_error` on other 5xx, …; Gemini `RESOURCE_EXHAUSTED`, `UNAVAILABLE`, `INTERNAL`, …), `content-length` framed, streaming requested or not, no usage and no 2xx rate-limit headers; other models answer normally. Checked before `x-mock-fail-times`, and whatever `x-mock-scenario` says |
//! | `x-mock-fail-times`, `x-mock-fail-key` | `x-mock-fail-times: N` (0–1,000,000) with `x-mock-fail-key: K` (1–256 bytes; each needs the other): the first N requests that carry key K fail (as `x-mock-fail-model` does, status `x-mock-fail-status`), later ones with K answer normally. Counted per mock process (two mocks count apart) and per key, in a map of at most 10,000 keys (a new key beyond that forgets the others); a request `x-mock-fail-model` failed is not counted |
//! | `x-mock-fail-status` | with `x-mock-fail-times`: the status of its failures, 400–599 (default 503); a 400 without it |
//! | `x-mock-fail-on` | `<name>[,<name>…]`: the scripted failures (`x-mock-fail-model`, `x-mock-fail-times`) apply only on the mocks started with one of these `--name`s; elsewhere the request answers normally and is not counted against `x-mock-fail-times` (a mock without `--name` matches none). A 400 without `x-mock-fail-model` or `x-mock-fail-times` |
//! | `x-mock-retry-after` | seconds (0–86,400): a scripted failure (`x-mock-fail-model` or `x-mock-fail-times`) with status 429 carries `retry-after: <seconds>`; without this header, or with another status, no `retry-after` |
//!
//! Every answer reports the model it received: `model` in OpenAI's, the Responses API's and
//! Anthropic's bodies (streamed chunks and events included) is the request body's `model`, and
//! Gemini's `modelVersion` is the path's model. A proxy that rewrites the model (llm-meter's
//! fallbacks) is therefore visible in the answer.
//!
//! A control header with a bad value gets a 400 whose message names the header.

mod anthropic;
mod cache;
mod encoding;
mod fail;
mod gemini;
mod http;
mod knobs;
mod openai;
mod responses;
mod route;
mod shape;
mod text;

use std::io::Write;
use std::net::{TcpListener, ToSocketAddrs};
use std::process::ExitCode;

const USAGE: &str = "usage: mock-llm [--host ADDR] [--port PORT] [--quiet] [--name NAME]";

#[derive(Debug)]
struct Args {
    host: String,
    port: u16,
    quiet: bool,
    name: Option<String>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args { host: "127.0.0.1".into(), port: 8000, quiet: false, name: None };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--host" => parsed.host = args.next().ok_or("--host needs a value")?,
            "--port" => {
                let v = args.next().ok_or("--port needs a value")?;
                parsed.port = v.parse().map_err(|_| format!("--port: not a port number: {v:?}"))?;
            }
            "--quiet" => parsed.quiet = true,
            "--name" => {
                let v = args.next().ok_or("--name needs a value")?;
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!("--name: expected visible ASCII without spaces, got {v:?}"));
                }
                parsed.name = Some(v);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(parsed)
}

/// [`route::plan`], plus `x-mock-server` when the mock has a `--name`.
fn plan(req: &http::Request) -> http::Plan {
    let mut plan = route::plan(req);
    if let Some(name) = fail::NAME.get() {
        plan.headers.push(("x-mock-server".into(), name.clone()));
    }
    plan
}

/// Pending connections the listener queues (the kernel caps it at `net.core.somaxconn`): a proxy
/// opening a thousand upstream connections at once must not see SYNs dropped, as with std's 128.
const BACKLOG: i32 = 4096;

fn listen(host: &str, port: u16) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address"))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // As std does on Unix: a restarted mock may reuse a port in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("mock-llm: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(name) = args.name.clone() {
        let _ = fail::NAME.set(name);
    }
    let listener = match listen(&args.host, args.port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mock-llm: cannot listen on {}:{}: {e}", args.host, args.port);
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mock-llm: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The banner is the only stdout output: harnesses read it to learn the port, then may close
    // the pipe.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening on {addr}").and_then(|_| out.flush());
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let quiet = args.quiet;
                std::thread::spawn(move || http::serve_connection(stream, quiet, plan));
            }
            Err(e) => eprintln!("mock-llm: accept: {e}"),
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, String> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        let a = args(&[]).unwrap();
        assert_eq!((a.host.as_str(), a.port, a.quiet), ("127.0.0.1", 8000, false));
        let a = args(&["--host", "0.0.0.0", "--port", "0", "--quiet"]).unwrap();
        assert_eq!((a.host.as_str(), a.port, a.quiet, a.name), ("0.0.0.0", 0, true, None));
        assert_eq!(args(&["--name", "primary"]).unwrap().name.as_deref(), Some("primary"));
        assert!(args(&["--name", "a b"]).unwrap_err().contains("--name"));
        assert!(args(&["--name"]).is_err());
        assert!(args(&["--port", "http"]).unwrap_err().contains("--port"));
        assert!(args(&["--port"]).is_err());
        assert!(args(&["--verbose"]).unwrap_err().contains("--verbose"));
    }
}
