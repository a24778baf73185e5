//! The real `mock-llm` binary over real sockets: what Envoy and the integration tests rely on.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Mock {
    child: Child,
    port: u16,
}

impl Mock {
    fn start() -> Mock {
        Mock::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Mock {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mock-llm"))
            .args(["--port", "0", "--quiet"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mock-llm");
        let mut banner = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut banner).unwrap();
        let addr = banner.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("banner {banner:?}"));
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        Mock { child, port }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn post(path: &str, headers: &str, body: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\n\r\n{body}", body.len())
}

/// Reads one response (head and body, by content-length or chunked). `Err` carries what was read
/// before the connection failed or ended early.
fn read_response(r: &mut BufReader<TcpStream>) -> Result<(String, Vec<u8>), String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return Err(head),
            Ok(_) => {}
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size = String::new();
            if r.read_line(&mut size).unwrap_or(0) == 0 {
                return Err(head);
            }
            let n = usize::from_str_radix(size.trim(), 16).map_err(|_| head.clone())?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).map_err(|_| head.clone())?;
            if n == 0 {
                return Ok((head, body));
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    let len: usize =
        lower.lines().find_map(|l| l.strip_prefix("content-length: ")).map(|v| v.trim().parse().unwrap()).unwrap_or(0);
    body.resize(len, 0);
    r.read_exact(&mut body).map_err(|_| head.clone())?;
    Ok((head, body))
}

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#;

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let mock = Mock::start();
    let mut s = mock.connect();
    let mut r = BufReader::new(s.try_clone().unwrap());
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: mock\r\n\r\n").unwrap();
    let (head, body) = read_response(&mut r).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"));
    assert_eq!(body, b"ok\n");
    s.write_all(post("/v1/chat/completions", "x-mock-completion-tokens: 3\r\n", CHAT).as_bytes()).unwrap();
    let (head, body) = read_response(&mut r).unwrap();
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains(r#""completion_tokens":3"#) && body.ends_with("data: [DONE]\n\n"), "{body}");
    // A chunked request body, announced with Expect: 100-continue.
    let body = r#"{"model":"text-embedding-3-small","input":"hello","dimensions":4}"#;
    write!(
        s,
        "POST /v1/embeddings HTTP/1.1\r\nhost: mock\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    )
    .unwrap();
    let (head, _) = read_response(&mut r).unwrap();
    assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head}");
    let (head, body) = read_response(&mut r).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 4);
    assert_eq!(v["usage"]["prompt_tokens"], 2);
}

#[test]
fn split_pieces_arrive_separately_and_paced() {
    let mock = Mock::start();
    let mut s = mock.connect();
    let headers = "x-mock-split: 10\r\nx-mock-split-delay-ms: 5\r\nx-mock-completion-tokens: 2\r\n";
    s.write_all(post("/v1/chat/completions", headers, CHAT).as_bytes()).unwrap();
    let start = Instant::now();
    let mut r = BufReader::new(s);
    let (_, body) = read_response(&mut r).unwrap();
    // Every chunk of the chunked encoding holds at most 10 bytes, 5 ms apart.
    let pieces = body.len().div_ceil(10);
    assert!(
        start.elapsed() >= Duration::from_millis(5 * (pieces as u64 - 1)),
        "{:?} for {pieces} pieces",
        start.elapsed()
    );
    assert!(String::from_utf8(body).unwrap().ends_with("data: [DONE]\n\n"));
}

#[test]
fn delays_hold_back_headers_and_events() {
    let mock = Mock::start();
    let mut s = mock.connect();
    let headers = "x-mock-delay-ms: 200\r\nx-mock-chunk-delay-ms: 30\r\nx-mock-completion-tokens: 4\r\n";
    let start = Instant::now();
    s.write_all(post("/v1/chat/completions", headers, CHAT).as_bytes()).unwrap();
    let mut first = [0u8; 1];
    (&s).read_exact(&mut first).unwrap();
    let ttfb = start.elapsed();
    assert!(ttfb >= Duration::from_millis(200), "{ttfb:?}");
    let (_, body) = read_response(&mut BufReader::new(s)).expect("the rest of the response");
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    // role + 4 words + finish + usage + [DONE] = 8 events, 7 gaps of 30 ms.
    assert!(start.elapsed() >= Duration::from_millis(200 + 7 * 30), "{:?}", start.elapsed());
}

#[test]
fn reset_mid_stream_cuts_the_connection() {
    let mock = Mock::start();
    let mut s = mock.connect();
    let headers = "x-mock-scenario: reset_mid_stream\r\nx-mock-completion-tokens: 20\r\n";
    s.write_all(post("/v1/chat/completions", headers, CHAT).as_bytes()).unwrap();
    let mut raw = Vec::new();
    let err = s.read_to_end(&mut raw).expect_err("a reset, not a clean close");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.contains("\"delta\":{\"content\":\"Hello\"}") || text.contains("Hello"),
        "some events arrived: {text}"
    );
    assert!(!text.contains("[DONE]") && !text.ends_with("0\r\n\r\n"), "{text}");
}

#[test]
fn rate_limit_and_bad_requests() {
    let mock = Mock::start();
    let mut s = mock.connect();
    let mut r = BufReader::new(s.try_clone().unwrap());
    s.write_all(post("/v1/chat/completions", "x-mock-scenario: rate_limit\r\n", CHAT).as_bytes()).unwrap();
    let (head, body) = read_response(&mut r).unwrap();
    assert!(head.starts_with("HTTP/1.1 429 Too Many Requests"), "{head}");
    assert!(head.contains("retry-after: 1\r\n") && head.contains("x-ratelimit-limit-requests: 500\r\n"), "{head}");
    assert!(String::from_utf8(body).unwrap().contains("rate_limit_exceeded"));
    s.write_all(post("/v1/chat/completions", "x-mock-chunks: many\r\n", CHAT).as_bytes()).unwrap();
    let (head, body) = read_response(&mut r).unwrap();
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(String::from_utf8(body).unwrap().contains("x-mock-chunks"));
    // A request that is not HTTP gets a 400 and the connection closes.
    s.write_all(b"HELLO\r\n\r\n").unwrap();
    let (head, _) = read_response(&mut r).unwrap();
    assert!(head.starts_with("HTTP/1.1 400") && head.contains("connection: close"), "{head}");
    assert!(read_response(&mut r).is_err());
}

/// The value of header `name` (lower-case) in a response head.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// Sends one request on a fresh connection and reads the whole response.
fn exchange(mock: &Mock, request: &str) -> (String, Vec<u8>) {
    let mut s = mock.connect();
    s.write_all(request.as_bytes()).unwrap();
    read_response(&mut BufReader::new(s)).unwrap()
}

/// `(event name, data)` of an SSE body with `event:` lines.
fn named_events(body: &[u8]) -> Vec<(String, serde_json::Value)> {
    let body = std::str::from_utf8(body).unwrap();
    assert!(body.ends_with("\n\n"), "{body}");
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap().to_string();
            (name, serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap())
        })
        .collect()
}

const MESSAGES: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn anthropic_messages_non_streaming_and_streaming() {
    let mock = Mock::start();
    let headers = "x-mock-prompt-tokens: 100\r\nx-mock-cached-tokens: 400\r\nx-mock-cache-creation-tokens: 30\r\n";
    let (head, body) = exchange(&mock, &post("/v1/messages", headers, MESSAGES));
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(header(&head, "anthropic-ratelimit-requests-limit").as_deref(), Some("1000"));
    assert_eq!(header(&head, "anthropic-ratelimit-tokens-remaining").as_deref(), Some("99000"));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((v["type"].as_str(), v["stop_reason"].as_str()), (Some("message"), Some("end_turn")));
    assert_eq!(v["content"][0]["text"], "Hello there this");
    assert_eq!(
        v["usage"],
        serde_json::json!({"input_tokens": 100, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 400,
                           "output_tokens": 3})
    );

    let stream = MESSAGES.replacen('{', r#"{"stream":true,"#, 1);
    let headers = format!("{headers}x-mock-anthropic-final-usage: full\r\nx-mock-delta-input-tokens: 120\r\n");
    let (head, body) = exchange(&mock, &post("/anthropic/v1/messages", &headers, &stream));
    assert!(head.contains("content-type: text/event-stream") && head.contains("transfer-encoding: chunked"), "{head}");
    let ev = named_events(&body);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(ev[0].1["message"]["usage"]["input_tokens"], 100);
    assert_eq!(ev[0].1["message"]["usage"]["output_tokens"], 1);
    assert_eq!(
        ev[7].1["usage"],
        serde_json::json!({"input_tokens": 120, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 400,
                           "output_tokens": 3})
    );
}

const RESPONSES: &str = r#"{"model":"gpt-4.1","input":"hi","stream":true}"#;

#[test]
fn responses_api_streams_and_objects() {
    let mock = Mock::start();
    let headers = "x-mock-prompt-tokens: 50\r\nx-mock-completion-tokens: 4\r\nx-mock-reasoning-tokens: 2\r\nx-mock-cached-tokens: 10\r\n";
    let usage = serde_json::json!({
        "input_tokens": 50, "input_tokens_details": {"cached_tokens": 10},
        "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 54,
    });
    let (head, body) = exchange(&mock, &post("/v1/responses", headers, RESPONSES));
    assert_eq!(header(&head, "x-ratelimit-limit-requests").as_deref(), Some("5000"));
    let ev = named_events(&body);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert!(ev.iter().enumerate().all(|(i, (_, d))| d["sequence_number"] == i));
    assert!(ev[0].1["response"]["usage"].is_null());
    assert_eq!(ev[9].1["response"]["usage"], usage);

    let headers = format!("{headers}x-mock-responses-final: incomplete\r\n");
    let (_, body) = exchange(&mock, &post("/v1/responses", &headers, RESPONSES));
    let ev = named_events(&body);
    let (name, last) = ev.last().unwrap();
    assert_eq!(name, "response.incomplete");
    assert_eq!(last["response"]["status"], "incomplete");
    assert_eq!(last["response"]["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(last["response"]["usage"], usage);

    let (head, body) =
        exchange(&mock, &post("/v1/responses", "", r#"{"model":"gpt-4.1","input":"hi","max_output_tokens":3}"#));
    assert!(head.contains("content-type: application/json"), "{head}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((v["object"].as_str(), v["status"].as_str()), (Some("response"), Some("completed")));
    assert_eq!(v["output"][0]["content"][0]["text"], "Hello there this");
    assert_eq!(v["usage"]["output_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], v["usage"]["input_tokens"].as_u64().unwrap() + 3);
}

const GEMINI: &str =
    r#"{"contents":[{"role":"user","parts":[{"text":"hi there"}]}],"generationConfig":{"maxOutputTokens":3}}"#;

#[test]
fn gemini_generate_and_stream() {
    let mock = Mock::start();
    let headers = "x-mock-prompt-tokens: 40\r\nx-mock-reasoning-tokens: 5\r\nx-mock-cached-tokens: 8\r\n";
    let (head, body) = exchange(&mock, &post("/v1beta/models/gemini-2.5-flash:generateContent", headers, GEMINI));
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("content-length: "), "{head}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["modelVersion"], "gemini-2.5-flash");
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    let u = &v["usageMetadata"];
    assert_eq!(
        (u["promptTokenCount"].as_u64(), u["candidatesTokenCount"].as_u64(), u["thoughtsTokenCount"].as_u64()),
        (Some(40), Some(3), Some(5))
    );
    assert_eq!((u["cachedContentTokenCount"].as_u64(), u["totalTokenCount"].as_u64()), (Some(8), Some(48)));

    let path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
    let (head, body) = exchange(&mock, &post(path, headers, GEMINI));
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let body = String::from_utf8(body).unwrap();
    let chunks: Vec<serde_json::Value> = body
        .split("\r\n\r\n")
        .filter(|e| !e.is_empty())
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    assert_eq!(chunks.len(), 3);
    let counts: Vec<u64> =
        chunks.iter().map(|c| c["usageMetadata"]["candidatesTokenCount"].as_u64().unwrap()).collect();
    assert_eq!(counts, [1, 2, 3]);
    assert_eq!(chunks[2]["usageMetadata"]["totalTokenCount"], 48);

    let path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent";
    let (head, body) = exchange(&mock, &post(path, headers, GEMINI));
    assert!(head.contains("content-type: application/json") && head.contains("transfer-encoding: chunked"), "{head}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[2]["usageMetadata"]["candidatesTokenCount"], 3);
}

fn decompress(encoding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => flate2::read::GzDecoder::new(data).read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(data).read_to_end(&mut out),
        "raw-deflate" => flate2::read::DeflateDecoder::new(data).read_to_end(&mut out),
        "br" => brotli::Decompressor::new(data, 4096).read_to_end(&mut out),
        other => panic!("{other}"),
    }
    .unwrap();
    out
}

#[test]
fn compressed_bodies_decompress_to_the_plain_body() {
    let mock = Mock::start();
    // Embeddings are deterministic: the same request gives the same bytes.
    let body = r#"{"model":"text-embedding-3-small","input":["alpha","beta"],"dimensions":64}"#;
    let (head, plain) = exchange(&mock, &post("/v1/embeddings", "", body));
    assert!(header(&head, "content-encoding").is_none());
    for (encoding, label) in [("gzip", "gzip"), ("deflate", "deflate"), ("raw-deflate", "deflate"), ("br", "br")] {
        let (head, compressed) =
            exchange(&mock, &post("/v1/embeddings", &format!("x-mock-encoding: {encoding}\r\n"), body));
        assert_eq!(header(&head, "content-encoding").as_deref(), Some(label), "{head}");
        let len: usize = header(&head, "content-length").unwrap().parse().unwrap();
        assert_eq!(len, compressed.len());
        assert!(compressed.len() < plain.len(), "{encoding}");
        assert_eq!(decompress(encoding, &compressed), plain, "{encoding}");
        // Split pieces carry the compressed bytes.
        let headers = format!("x-mock-encoding: {encoding}\r\nx-mock-split: 100\r\nx-mock-split-delay-ms: 0\r\n");
        let (_, split) = exchange(&mock, &post("/v1/embeddings", &headers, body));
        assert_eq!(decompress(encoding, &split), plain, "{encoding} split");
    }
    // A compressed stream decodes to the same events.
    let (_, plain) = exchange(&mock, &post("/v1/messages", "", &MESSAGES.replacen('{', r#"{"stream":true,"#, 1)));
    let (head, compressed) = exchange(
        &mock,
        &post("/v1/messages", "x-mock-encoding: br\r\n", &MESSAGES.replacen('{', r#"{"stream":true,"#, 1)),
    );
    assert_eq!(header(&head, "content-encoding").as_deref(), Some("br"));
    let names = |b: &[u8]| named_events(b).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    assert_eq!(names(&decompress("br", &compressed)), names(&plain));
}

/// Reads one chunk of a chunked body; `None` at the last chunk.
fn read_chunk(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut size = String::new();
    r.read_line(&mut size).unwrap();
    let n = usize::from_str_radix(size.trim(), 16).unwrap();
    let mut chunk = vec![0; n + 2];
    r.read_exact(&mut chunk).unwrap();
    chunk.truncate(n);
    (n > 0).then_some(chunk)
}

#[test]
fn gzip_stream_events_decode_as_they_arrive() {
    let mock = Mock::start();
    let mut s = mock.connect();
    // role, 2 words, finish, usage, [DONE]: 6 events, 300 ms apart.
    let headers = "x-mock-encoding: gzip\r\nx-mock-chunk-delay-ms: 300\r\nx-mock-completion-tokens: 2\r\n";
    s.write_all(post("/v1/chat/completions", headers, CHAT).as_bytes()).unwrap();
    let start = Instant::now();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    assert_eq!(header(&head, "content-encoding").as_deref(), Some("gzip"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"));
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    decoder.write_all(&read_chunk(&mut r).unwrap()).unwrap();
    decoder.flush().unwrap();
    let first = String::from_utf8(decoder.get_ref().clone()).unwrap();
    let first_at = start.elapsed();
    assert!(first_at < Duration::from_millis(1000), "{first_at:?}");
    let data = first.strip_prefix("data: ").and_then(|e| e.strip_suffix("\n\n")).unwrap_or_else(|| panic!("{first:?}"));
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["choices"][0]["delta"]["role"], "assistant");
    let mut chunks = 1;
    while let Some(chunk) = read_chunk(&mut r) {
        decoder.write_all(&chunk).unwrap();
        chunks += 1;
    }
    assert_eq!(chunks, 6, "one chunk per event");
    assert!(start.elapsed() >= first_at + Duration::from_millis(5 * 300 - 100), "{:?}", start.elapsed());
    let all = String::from_utf8(decoder.finish().unwrap()).unwrap();
    assert!(all.starts_with(&first) && all.ends_with("data: [DONE]\n\n"), "{all}");
    assert!(all.contains(r#""completion_tokens":2"#));
}

#[test]
fn padded_brotli_answers_are_built_once_and_trickled() {
    let mock = Mock::start();
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let headers = "x-mock-encoding: br\r\nx-mock-brotli-lgwin: 24\r\nx-mock-pad-bytes: 2000000\r\n\
                   x-mock-completion-tokens: 7\r\nx-mock-split: 4096\r\nx-mock-split-delay-ms: 2\r\n";
    let request = post("/v1/chat/completions", headers, body);
    let (head, first) = exchange(&mock, &request);
    assert_eq!(header(&head, "content-encoding").as_deref(), Some("br"));
    assert_eq!(header(&head, "content-length"), Some(first.len().to_string()));
    assert_eq!(first[0] & 0x0f, 0x0f, "WBITS 24");
    let text = decompress("br", &first);
    assert!(text.len() > 2_000_000 && text.len() < 2_001_000, "{}", text.len());
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 7);
    // Many at once: the listener queues them all (backlog) and every one gets the same bytes,
    // built once.
    let start = Instant::now();
    let bodies: Vec<Vec<u8>> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..300).map(|_| s.spawn(|| exchange(&mock, &request).1)).collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(bodies.iter().all(|b| *b == first));
    let pieces = first.len().div_ceil(4096) as u32;
    assert!(start.elapsed() >= Duration::from_millis(2) * (pieces - 1), "trickled");
}

#[test]
fn named_mocks_count_scripted_failures_apart() {
    let primary = Mock::start_with(&["--name", "primary"]);
    let secondary = Mock::start_with(&["--name", "secondary"]);
    let once =
        "x-mock-fail-times: 1\r\nx-mock-fail-key: e2e-once\r\nx-mock-fail-status: 429\r\nx-mock-retry-after: 1\r\n";
    let body = CHAT.replace(r#""stream":true"#, r#""stream":false"#);
    for (mock, name) in [(&primary, "primary"), (&secondary, "secondary")] {
        // Each process counts the key on its own: the first request to each fails.
        let (head, body1) = exchange(mock, &post("/v1/chat/completions", once, &body));
        assert!(head.starts_with("HTTP/1.1 429"), "{head}");
        assert_eq!(header(&head, "retry-after").as_deref(), Some("1"));
        assert_eq!(header(&head, "x-mock-server").as_deref(), Some(name));
        let v: serde_json::Value = serde_json::from_slice(&body1).unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        let (head, body2) = exchange(mock, &post("/v1/chat/completions", once, &body));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(header(&head, "x-mock-server").as_deref(), Some(name));
        let v: serde_json::Value = serde_json::from_slice(&body2).unwrap();
        assert_eq!(v["model"], "gpt-4o");
    }
    // x-mock-fail-model on a stream: an error answer, not a stream.
    let (head, body) = exchange(&primary, &post("/v1/chat/completions", "x-mock-fail-model: gpt-4o=503\r\n", CHAT));
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(header(&head, "content-type").unwrap().starts_with("application/json"), "{head}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    let (head, _) = exchange(&Mock::start(), "GET /healthz HTTP/1.1\r\nhost: mock\r\n\r\n");
    assert_eq!(header(&head, "x-mock-server"), None, "no --name, no header");
}
