//! Just enough HTTP/1.1 for a gateway behind Envoy: keep-alive, `content-length` and chunked
//! request bodies, `Expect: 100-continue`, and responses written piece by piece as a [`Plan`]
//! says, so tests control exactly how the body reaches the proxy.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Largest request head (request line and headers) read.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body read: generous, since the filter is tested with multi-megabyte prompts.
const MAX_BODY: usize = 256 * 1024 * 1024;

/// A parsed request. Header names are lower-cased.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub keep_alive: bool,
}

impl Request {
    /// The first value of `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Why no request could be read.
#[derive(Debug, PartialEq)]
pub enum ReadError {
    /// The peer closed the connection between requests.
    Closed,
    /// A malformed or oversized request: answered with this status and message, then closed.
    Bad(u16, String),
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> Self {
        ReadError::Closed
    }
}

fn bad(msg: impl Into<String>) -> ReadError {
    ReadError::Bad(400, msg.into())
}

/// Reads one line (up to `\n`), counting it against `budget`.
fn read_line(r: &mut impl BufRead, budget: &mut usize) -> Result<Vec<u8>, ReadError> {
    let mut line = Vec::new();
    let n = r.by_ref().take(*budget as u64 + 1).read_until(b'\n', &mut line)?;
    if n > *budget {
        return Err(ReadError::Bad(431, "request head too large".into()));
    }
    *budget -= n;
    if !line.ends_with(b"\n") {
        return Err(ReadError::Closed);
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Ok(line)
}

/// Reads one request. `interim` receives a `100 Continue` when the client asks for it.
pub fn read_request(r: &mut impl BufRead, interim: &mut impl Write) -> Result<Request, ReadError> {
    let mut budget = MAX_HEAD;
    let mut line = read_line(r, &mut budget)?;
    // Tolerate stray blank lines between requests (RFC 9112 §2.2).
    while line.is_empty() {
        line = read_line(r, &mut budget)?;
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!("malformed request line {line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad(505, format!("unsupported version {version:?}")));
    }
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut budget)?;
        if line.is_empty() {
            break;
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("malformed header line {line:?}")));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut req = Request {
        method: method.to_string(),
        path: target.to_string(),
        headers,
        body: Vec::new(),
        keep_alive: version == "HTTP/1.1",
    };
    match req.header("connection").map(str::to_ascii_lowercase) {
        Some(c) if c.contains("close") => req.keep_alive = false,
        Some(c) if c.contains("keep-alive") => req.keep_alive = true,
        _ => {}
    }
    let chunked = req.header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    let length = match req.header("content-length") {
        Some(v) if !chunked => Some(v.parse::<usize>().map_err(|_| bad(format!("bad content-length {v:?}")))?),
        _ => None,
    };
    if length.is_some_and(|n| n > MAX_BODY) {
        return Err(ReadError::Bad(413, "request body too large".into()));
    }
    if (chunked || length.is_some_and(|n| n > 0))
        && req.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        interim.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        interim.flush()?;
    }
    if chunked {
        req.body = read_chunked(r)?;
    } else if let Some(n) = length {
        req.body = vec![0; n];
        r.read_exact(&mut req.body)?;
    }
    Ok(req)
}

fn read_chunked(r: &mut impl BufRead) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let mut budget = MAX_HEAD;
        let line = read_line(r, &mut budget)?;
        let line = String::from_utf8_lossy(&line);
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| bad(format!("bad chunk size {size:?}")))?;
        if size == 0 {
            // Trailers, up to the blank line.
            while !read_line(r, &mut budget)?.is_empty() {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(ReadError::Bad(413, "request body too large".into()));
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        if !read_line(r, &mut budget)?.is_empty() {
            return Err(bad("chunk not followed by CRLF"));
        }
    }
}

/// How the body of a response is framed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Framing {
    /// `content-length`: the pieces add up to one body.
    Length,
    /// `transfer-encoding: chunked`, one chunk per piece (an SSE stream), each chunk one `write`.
    Chunked,
}

/// A scripted response: what to send, in which pieces, with which pauses, and whether to cut
/// the connection part-way.
#[derive(Debug, Clone)]
pub struct Plan {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Wait before the status line.
    pub delay: Duration,
    pub framing: Framing,
    /// The body, each piece written and flushed on its own.
    pub pieces: Vec<Vec<u8>>,
    /// Wait between pieces.
    pub gap: Duration,
    /// Reset the connection (TCP RST) instead of writing piece `n` and anything after it.
    pub reset_before: Option<usize>,
}

impl Plan {
    /// A 200 `text/event-stream` answer: `events` sent `gap` apart, chunked, with the API's
    /// request-id header.
    pub fn sse(events: Vec<Vec<u8>>, gap: Duration, request_id: (String, String)) -> Plan {
        Plan {
            status: 200,
            headers: vec![
                ("content-type".into(), "text/event-stream; charset=utf-8".into()),
                ("cache-control".into(), "no-cache".into()),
                request_id,
            ],
            delay: Duration::ZERO,
            framing: Framing::Chunked,
            pieces: events,
            gap,
            reset_before: None,
        }
    }

    /// The whole body, as a client would see it if nothing were cut.
    pub fn body(&self) -> Vec<u8> {
        self.pieces.concat()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        529 => "Overloaded",
        _ => "Unknown",
    }
}

/// Writes `plan`. Returns whether the connection can carry another request.
pub fn write_plan(w: &mut impl Write, plan: &Plan, keep_alive: bool, reset: impl FnOnce()) -> io::Result<bool> {
    if !plan.delay.is_zero() {
        std::thread::sleep(plan.delay);
    }
    let mut head = format!("HTTP/1.1 {} {}\r\n", plan.status, reason(plan.status));
    for (k, v) in &plan.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match plan.framing {
        Framing::Length => {
            head.push_str(&format!("content-length: {}\r\n", plan.pieces.iter().map(Vec::len).sum::<usize>()))
        }
        Framing::Chunked => head.push_str("transfer-encoding: chunked\r\n"),
    }
    if !keep_alive {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.flush()?;
    for (i, piece) in plan.pieces.iter().enumerate() {
        if i > 0 && !plan.gap.is_zero() {
            std::thread::sleep(plan.gap);
        }
        if plan.reset_before == Some(i) {
            // Give the proxy time to read what was sent: a reset can make the peer's kernel drop
            // data it has received but not yet handed over.
            std::thread::sleep(plan.gap.max(Duration::from_millis(50)));
            reset();
            return Ok(false);
        }
        match plan.framing {
            Framing::Length => w.write_all(piece)?,
            Framing::Chunked => {
                if piece.is_empty() {
                    continue; // an empty chunk would end the body
                }
                // Size line, data and CRLF in one write: each piece reaches the proxy as one
                // segment (one read, one body callback), as a real server's event does, instead of
                // three on this TCP_NODELAY socket.
                let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                chunk.reserve(piece.len() + 2);
                chunk.extend_from_slice(piece);
                chunk.extend_from_slice(b"\r\n");
                w.write_all(&chunk)?;
            }
        }
        w.flush()?;
    }
    if plan.framing == Framing::Chunked {
        w.write_all(b"0\r\n\r\n")?;
        w.flush()?;
    }
    Ok(keep_alive)
}

/// Serves requests on one connection until either side closes it.
pub fn serve_connection(stream: TcpStream, quiet: bool, plan_for: fn(&Request) -> Plan) {
    // Pieces must leave as written: that is what split tests rely on.
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut writer = &stream;
    loop {
        let req = match read_request(&mut reader, &mut writer) {
            Ok(req) => req,
            Err(ReadError::Closed) => return,
            Err(ReadError::Bad(status, msg)) => {
                let plan = crate::openai::error_plan(status, "invalid_request_error", &msg, None);
                let _ = write_plan(&mut writer, &plan, false, || {});
                return;
            }
        };
        let plan = plan_for(&req);
        if !quiet {
            let bytes: usize = plan.pieces.iter().map(Vec::len).sum();
            eprintln!("{} {} -> {} ({bytes} body bytes)", req.method, req.path, plan.status);
        }
        let reset = || {
            // Closing with a zero linger time sends RST instead of FIN.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        };
        match write_plan(&mut writer, &plan, req.keep_alive, reset) {
            Ok(true) => {}
            _ => return, // dropping the stream closes it (with RST after a reset)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(raw: &[u8]) -> (Result<Request, ReadError>, Vec<u8>) {
        let mut interim = Vec::new();
        let r = read_request(&mut &raw[..], &mut interim);
        (r, interim)
    }

    #[test]
    fn content_length_body_and_headers() {
        let (r, interim) =
            read(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Mock-Split: 7\r\nContent-Length: 5\r\n\r\nhello");
        let r = r.unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/v1/chat/completions"));
        assert_eq!(r.header("x-mock-split"), Some("7"));
        assert_eq!(r.body, b"hello");
        assert!(r.keep_alive);
        assert!(interim.is_empty());
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers_and_continue() {
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n\
                    3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: 1\r\n\r\n";
        let (r, interim) = read(raw);
        let r = r.unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(!r.keep_alive);
        assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn two_requests_on_one_connection() {
        let raw = b"GET /healthz HTTP/1.1\r\n\r\n\r\nGET /v1/models HTTP/1.0\r\n\r\n";
        let mut r = &raw[..];
        let mut sink = Vec::new();
        assert_eq!(read_request(&mut r, &mut sink).unwrap().path, "/healthz");
        let second = read_request(&mut r, &mut sink).unwrap();
        assert_eq!(second.path, "/v1/models");
        assert!(!second.keep_alive, "HTTP/1.0 closes by default");
        assert_eq!(read_request(&mut r, &mut sink).unwrap_err(), ReadError::Closed);
    }

    #[test]
    fn malformed_requests_are_refused_not_panicked_on() {
        for raw in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"GET / HTTP/2\r\n\r\n",
        ] {
            assert!(matches!(read(raw).0, Err(ReadError::Bad(..))), "{:?}", String::from_utf8_lossy(raw));
        }
        let huge = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(read(huge.as_bytes()).0, Err(ReadError::Bad(431, _))));
        let big = format!("POST / HTTP/1.1\r\ncontent-length: {}\r\n\r\n", MAX_BODY + 1);
        assert!(matches!(read(big.as_bytes()).0, Err(ReadError::Bad(413, _))));
        // Truncated input is a closed connection.
        assert_eq!(read(b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc").0.unwrap_err(), ReadError::Closed);
        assert_eq!(read(b"GET / HT").0.unwrap_err(), ReadError::Closed);
    }

    fn plan(framing: Framing, pieces: &[&str], reset_before: Option<usize>) -> Plan {
        Plan {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            delay: Duration::ZERO,
            framing,
            pieces: pieces.iter().map(|p| p.as_bytes().to_vec()).collect(),
            gap: Duration::ZERO,
            reset_before,
        }
    }

    #[test]
    fn writes_chunked_and_length_framing() {
        let mut out = Vec::new();
        let keep = write_plan(&mut out, &plan(Framing::Chunked, &["ab", "", "cde"], None), true, || {}).unwrap();
        assert!(keep);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
        );
        let mut out = Vec::new();
        let keep = write_plan(&mut out, &plan(Framing::Length, &["ab", "cde"], None), false, || {}).unwrap();
        assert!(!keep);
        assert!(String::from_utf8(out).unwrap().ends_with("content-length: 5\r\nconnection: close\r\n\r\nabcde"));
    }

    /// Records every `write` call apart, as the socket sees them.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_chunk_is_one_write() {
        let mut out = Writes::default();
        write_plan(&mut out, &plan(Framing::Chunked, &["data: a\n\n", "", "data: [DONE]\n\n"], None), true, || {})
            .unwrap();
        let writes: Vec<String> = out.0.iter().map(|w| String::from_utf8_lossy(w).into_owned()).collect();
        assert_eq!(writes.len(), 4, "{writes:?}");
        assert!(writes[0].starts_with("HTTP/1.1 200 OK\r\n") && writes[0].ends_with("\r\n\r\n"));
        assert_eq!(writes[1..], ["9\r\ndata: a\n\n\r\n", "e\r\ndata: [DONE]\n\n\r\n", "0\r\n\r\n"]);
    }

    #[test]
    fn reset_stops_before_the_named_piece() {
        let mut out = Vec::new();
        let mut reset = false;
        let keep = write_plan(&mut out, &plan(Framing::Chunked, &["a", "b", "c"], Some(2)), true, || reset = true);
        assert!(!keep.unwrap());
        assert!(reset);
        assert!(String::from_utf8(out).unwrap().ends_with("1\r\na\r\n1\r\nb\r\n"), "no terminating chunk");
    }
}
