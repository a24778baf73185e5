//! Harness for the integration tests: the real Envoy (`.venv/bin/envoy`, installed by
//! `just envoy`) running the release filter in front of the mock gateway
//! (`target/release/mock-llm`), both on ephemeral ports, and a small reader for Envoy's
//! `/stats/prometheus`.
//!
//! Envoy's configuration is the shipped `envoy/envoy.yaml` with only the ports, the `.wasm` path,
//! the stats flush interval and the filter configuration block swapped, so the tests exercise the
//! stats tags and histogram buckets users get.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The filter's default `metrics.flush_interval_ms`: counters reach Envoy at most this long
/// after the request that moved them.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require(path: &Path, how: &str) -> PathBuf {
    assert!(path.exists(), "{} is missing: run `{how}` first (or `just test`)", path.display());
    path.to_path_buf()
}

fn scratch_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir =
        std::env::temp_dir().join(format!("llm-meter-it-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The mock OpenAI-compatible gateway, on an ephemeral port.
pub struct Mock {
    child: Child,
    pub port: u16,
}

/// A port that was free a moment ago (for servers that must listen on a port known in advance).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("local addr").port()
}

impl Mock {
    pub fn start() -> Mock {
        Mock::start_on(0)
    }

    /// Starts the mock on `port` (0: any free port).
    pub fn start_on(port: u16) -> Mock {
        Mock::spawn(&["--host", "127.0.0.1", "--port", &port.to_string()])
    }

    /// Starts `target/release/mock-llm` with `args` and reads the port from its banner.
    fn spawn(args: &[&str]) -> Mock {
        let bin = require(&root().join("target/release/mock-llm"), "just mock");
        let mut child =
            Command::new(bin).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn mock-llm");
        let stdout = child.stdout.take().expect("mock stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read mock banner");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected mock banner {line:?}"));
        Mock { child, port }
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The default filter configuration of these tests: app label from `x-app-id`, gpt-4o priced.
pub const DEFAULT_CONFIG: &str = r#"{
  "metrics": {"app_header": "x-app-id"},
  "pricing": {"gpt-4o": {"input": 2.5, "output": 10, "cached_input": 1.25},
              "text-embedding-3-small": {"input": 0.02, "output": 0}}
}"#;

/// A real Envoy running the shipped configuration with `filter_config` as the filter's JSON.
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin: u16,
    dir: PathBuf,
}

/// Renders the shipped envoy.yaml for the given upstream port and filter configuration, with
/// ephemeral listener and admin ports.
pub fn render_config(upstream_port: u16, filter_config: &str) -> String {
    render_shipped("envoy/envoy.yaml", upstream_port, filter_config)
}

/// Like [`render_config`], for another shipped Envoy configuration (`envoy/envoy-global.yaml`).
pub fn render_shipped(file: &str, upstream_port: u16, filter_config: &str) -> String {
    let shipped = std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"));
    let wasm = require(&root().join("target/wasm32-wasip1/release/llm_meter.wasm"), "just build");
    let begin = shipped.find("# llm-meter configuration begin").expect("begin marker");
    let end = shipped.find("# llm-meter configuration end").expect("end marker");
    let indent = " ".repeat(18);
    let block: String = std::iter::once(format!("# llm-meter configuration begin\n{indent}value: |\n"))
        .chain(filter_config.lines().map(|l| format!("{indent}  {l}\n")))
        .chain(std::iter::once(indent.clone()))
        .collect();
    let mut cfg = format!("{}{}{}", &shipped[..begin], block, &shipped[end..]);
    for (from, to) in [
        ("port_value: 10000", "port_value: 0".to_string()),
        ("port_value: 9901", "port_value: 0".to_string()),
        ("port_value: 8000", format!("port_value: {upstream_port}")),
        ("filename: target/wasm32-wasip1/release/llm_meter.wasm", format!("filename: {}", wasm.display())),
        // Histograms reach /stats/prometheus at each flush; flush often so tests are quick.
        ("stats_flush_interval: 5s", "stats_flush_interval: 0.2s".to_string()),
    ] {
        assert!(cfg.contains(from), "envoy.yaml no longer contains {from:?}");
        cfg = cfg.replace(from, &to);
    }
    cfg
}

/// The shipped configuration split for a listener served from a file (LDS from the filesystem),
/// so a test can change the filter configuration of a running Envoy the way a control plane
/// does: `(bootstrap, listener resources)`. The listener listens on `listen_port`; write the
/// resources to `lds_path` before starting Envoy and replace the file (atomically, by rename)
/// to reload.
pub fn render_dynamic(upstream_port: u16, filter_config: &str, listen_port: u16, lds_path: &Path) -> (String, String) {
    let full = render_config(upstream_port, filter_config);
    let begin = full.find("  listeners:\n").expect("listeners section");
    let end = full.find("\n  clusters:\n").expect("clusters section") + 1;
    let listener: String = full[begin + "  listeners:\n".len()..end]
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(listener.starts_with("- name: llm\n"), "{listener}");
    let listener = listener.replacen(
        "- name: llm\n",
        "- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: llm\n",
        1,
    );
    assert_eq!(listener.matches("port_value: 0").count(), 1);
    let resources =
        format!("resources:\n{}\n", listener.replace("port_value: 0", &format!("port_value: {listen_port}")));
    let dir = lds_path.parent().expect("lds dir").display().to_string();
    let bootstrap = format!(
        "{}{}node: {{ id: llm-meter-test, cluster: llm-meter-test }}\n\
         dynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    path_config_source:\n      \
         path: {}\n      watched_directory: {{ path: {dir} }}\n",
        &full[..begin],
        &full[end..],
        lds_path.display()
    );
    (bootstrap, resources)
}

impl Envoy {
    pub fn start(upstream_port: u16, filter_config: &str) -> Envoy {
        match Envoy::try_start(upstream_port, filter_config) {
            Ok(e) => e,
            Err(log) => panic!("Envoy did not start:\n{log}"),
        }
    }

    /// Starts Envoy; `Err(log)` if it exits during start-up (e.g. it refused the configuration).
    pub fn try_start(upstream_port: u16, filter_config: &str) -> Result<Envoy, String> {
        Envoy::try_start_yaml(&render_config(upstream_port, filter_config))
    }

    /// Starts Envoy with a full configuration (see [`render_config`]).
    pub fn try_start_yaml(yaml: &str) -> Result<Envoy, String> {
        let envoy = require(&root().join(".venv/bin/envoy"), "just envoy");
        let dir = scratch_dir();
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, yaml).expect("write config");
        let admin_path = dir.join("admin-address");
        let log = std::fs::File::create(dir.join("envoy.log")).expect("create log");
        let mut child = Command::new(envoy)
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", "2", "--disable-hot-restart", "--log-level", "info"])
            // The access log (the filter's records) reaches the log file within 0.2 s, not 10 s.
            .args(["--file-flush-interval-msec", "200"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn envoy");
        let start = Instant::now();
        let admin = loop {
            if let Some(status) = child.try_wait().expect("poll envoy") {
                return Err(format!(
                    "exit {status}\n{}",
                    std::fs::read_to_string(dir.join("envoy.log")).unwrap_or_default()
                ));
            }
            let addr = std::fs::read_to_string(&admin_path).unwrap_or_default();
            if let Some(port) = addr.trim().rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) {
                if http_get(port, "/ready").is_some_and(|(code, _)| code == 200) {
                    break port;
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                return Err(format!(
                    "not ready after 30 s\n{}",
                    std::fs::read_to_string(dir.join("envoy.log")).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let (_, listeners) = http_get(admin, "/listeners?format=json").expect("listeners");
        let v: serde_json::Value = serde_json::from_str(&listeners).expect("listeners json");
        // 0 for a listener on a Unix socket.
        let port =
            v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"].as_u64().unwrap_or(0) as u16;
        Ok(Envoy { child, port, admin, dir })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// Current `/stats/prometheus`.
    pub fn metrics(&self) -> Metrics {
        let (code, body) = http_get(self.admin, "/stats/prometheus").expect("scrape");
        assert_eq!(code, 200);
        Metrics::parse(&body)
    }

    /// Polls `/stats/prometheus` until `series` (with exactly these labels) has `value`.
    ///
    /// The filter holds counter and gauge updates for up to `metrics.flush_interval_ms` (250 ms
    /// by default) and sends them together, while histograms and set gauges move at once: the
    /// returned scrape is taken a flush interval after the one that matched (and matches too),
    /// so every update made before the match has arrived, whatever `series` is.
    pub fn wait_value(&self, series: &str, value: f64) -> Metrics {
        let mut last = None;
        let found = (0..200).find_map(|_| {
            let m = self.metrics();
            let v = m.value(series);
            if v == Some(value) {
                let again = self.after_batch();
                if again.value(series) == Some(value) {
                    return Some(again);
                }
            }
            last = Some((v, m.raw.clone()));
            std::thread::sleep(Duration::from_millis(50));
            None
        });
        found.unwrap_or_else(|| {
            let (v, raw) = last.unwrap_or_default();
            let llm: Vec<&str> = raw.lines().filter(|l| l.starts_with("llm_") && !l.contains("_bucket{")).collect();
            panic!(
                "{series} = {v:?}, want {value}; llm series:\n{}\nenvoy log tail:\n{}",
                llm.join("\n"),
                tail(&self.log(), 30)
            )
        })
    }

    /// Polls `/stats/prometheus` until `done` holds (panics after `timeout`); like
    /// [`Envoy::wait_value`], returns a scrape taken after the matching one.
    pub fn wait_for(&self, timeout: Duration, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
        eventually(timeout, what, || {
            if !done(&self.metrics()) {
                return None;
            }
            let again = self.after_batch();
            done(&again).then_some(again)
        })
    }

    /// A scrape once the filter has sent every counter update it held: two scrapes a flush
    /// interval apart that agree on every `llm_` series (for a "before" snapshot, or counters
    /// that must not have moved).
    pub fn settled(&self) -> Metrics {
        eventually(Duration::from_secs(10), "the filter's counters to settle", || {
            let first = self.metrics();
            std::thread::sleep(FLUSH_INTERVAL + Duration::from_millis(50));
            let second = self.metrics();
            let llm =
                |m: &Metrics| m.raw.lines().filter(|l| l.starts_with("llm_")).map(str::to_string).collect::<Vec<_>>();
            (llm(&first) == llm(&second)).then_some(second)
        })
    }

    /// A scrape a flush interval after the one just taken: every counter update made before
    /// that one has been sent by then.
    fn after_batch(&self) -> Metrics {
        std::thread::sleep(FLUSH_INTERVAL + Duration::from_millis(60));
        self.metrics()
    }

    /// Envoy's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Envoy's heap (`/memory` `allocated`) and the process' resident set (which also holds the
    /// Wasm VMs' linear memory, allocated outside Envoy's heap), in bytes.
    pub fn memory(&self) -> (u64, u64) {
        let (_, body) = http_get(self.admin, "/memory").expect("/memory");
        let v: serde_json::Value = serde_json::from_str(&body).expect("/memory json");
        let allocated = v["allocated"].as_str().and_then(|s| s.parse().ok()).expect("allocated");
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        (allocated, rss_kib * 1024)
    }

    /// True while the Envoy process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Minimal blocking GET over a fresh connection (for the admin interface).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    Some((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A parsed Prometheus text exposition.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// `name{labels}` (labels sorted by key) → value.
    pub series: BTreeMap<String, f64>,
    pub raw: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut series = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            series.insert(canonical(key), value);
        }
        Metrics { series, raw: text.to_string() }
    }

    /// Value of a series given as `name{k="v",…}` in any label order; `None` if absent.
    pub fn value(&self, series: &str) -> Option<f64> {
        self.series.get(&canonical(series)).copied()
    }

    /// Sum over all series of `name` whose labels include every `(key, value)` in `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|(k, _)| {
                let (n, labels) = split(k);
                n == name && filter.iter().all(|(fk, fv)| labels.get(*fk).map(String::as_str) == Some(*fv))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Every series name (with labels) starting with `prefix`.
    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.series.keys().filter(|k| k.starts_with(prefix)).cloned().collect()
    }
}

fn split(key: &str) -> (&str, BTreeMap<String, String>) {
    let Some((name, rest)) = key.split_once('{') else { return (key, BTreeMap::new()) };
    let body = rest.trim_end_matches('}');
    let labels = body
        .split("\",")
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once("=\"")?;
            Some((k.to_string(), v.trim_end_matches('"').to_string()))
        })
        .collect();
    (name, labels)
}

fn canonical(key: &str) -> String {
    let (name, labels) = split(key);
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// A blocking HTTP client that returns every status as a value.
pub fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// A response: status, headers (names lower-case), body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn header_u64(&self, name: &str) -> u64 {
        let v = self.header(name).unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers));
        v.parse().unwrap_or_else(|_| panic!("{name}: {v:?}"))
    }
}

/// POSTs JSON through `agent`; returns the whole reply.
pub fn send(agent: &ureq::Agent, url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut req = agent.post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send(body).unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    Reply { status, headers, body }
}

/// POSTs JSON with extra headers; returns status and body.
pub fn post(url: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut req = client().post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send(body).unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    (status, body)
}

/// Parses a `/stats/prometheus` text with Prometheus' own parser (`promtool check metrics`, from
/// the Debian `prometheus` package). Lint findings (Envoy prints no HELP lines) are not errors;
/// a text the parser rejects is `Err` with promtool's message.
pub fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed: .ci/run installs it");
    let mut stdin = child.stdin.take().expect("promtool stdin");
    let text = text.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().expect("run promtool");
    let _ = writer.join();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Exit 3: lint problems only; 1: the text did not parse.
    match out.status.code() {
        Some(0) | Some(3) if !said.contains("error while") && !said.contains("parsing error") => Ok(()),
        _ => Err(format!("promtool check metrics: {}: {}", out.status, tail(&said, 5))),
    }
}

/// Starts a streaming chat request over a raw connection (so the test can walk away from it
/// mid-stream) and reads until the response status line: the stream is running when this
/// returns. `completion_tokens` and `chunk_delay_ms` set how long the mock streams.
pub fn open_stream(port: u16, body: &str, completion_tokens: u32, chunk_delay_ms: u32) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
         x-mock-completion-tokens: {completion_tokens}\r\nx-mock-chunk-delay-ms: {chunk_delay_ms}\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).expect("read the response head");
    let head = String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// The master key of the LiteLLM proxy these tests start (LiteLLM refuses to start without one).
/// A local test value, not a credential.
pub const LITELLM_KEY: &str = "sk-llm-meter-test-3b9f1c7e5a2d4068b1e9c3f7a5d2e8b4";

/// What `just litellm` runs to install the LiteLLM proxy the tests start (the venv `just bench`
/// uses too).
pub const LITELLM_INSTALL: &str =
    "python3 -m venv .venv-litellm && .venv-litellm/bin/pip install -r bench/requirements-litellm.txt";

/// A real LiteLLM proxy (PyPI `litellm[proxy]` as pinned in bench/requirements-litellm.txt,
/// installed into `.venv-litellm` by `just litellm`), on a port of its own, in its own process
/// group (stopped whole on drop).
pub struct LiteLlm {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl LiteLlm {
    /// Starts LiteLLM with `model_list` (YAML list items, `  - model_name: …`) as its models, no
    /// retries (an upstream error reaches the client as the upstream sent it) and
    /// [`LITELLM_KEY`]; returns once `/health/liveliness` answers.
    pub fn start(model_list: &str) -> LiteLlm {
        let bin = root().join(".venv-litellm/bin/litellm");
        assert!(bin.exists(), "{} is missing: run `just litellm` first (it runs `{LITELLM_INSTALL}`)", bin.display());
        let dir = scratch_dir();
        let config = dir.join("litellm.yaml");
        std::fs::write(
            &config,
            format!(
                "model_list:\n{model_list}\nlitellm_settings:\n  num_retries: 0\n  telemetry: false\n\
                 general_settings:\n  master_key: {LITELLM_KEY}\n"
            ),
        )
        .expect("write litellm.yaml");
        let port = free_port();
        let log = std::fs::File::create(dir.join("litellm.log")).expect("create log");
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--num_workers", "1"])
            .current_dir(&dir)
            // The model cost map shipped in the package (no download), no telemetry, no UI.
            .envs([
                ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
                ("LITELLM_TELEMETRY", "False"),
                ("LITELLM_LOG", "ERROR"),
                ("NO_DOCS", "True"),
                ("DISABLE_ADMIN_UI", "True"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn litellm");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("poll litellm") {
                panic!("LiteLLM exited during start-up ({status}):\n{}", tail(&read_log(&dir), 40));
            }
            if http_get(port, "/health/liveliness").is_some_and(|(code, _)| code == 200) {
                break;
            }
            if start.elapsed() > Duration::from_secs(180) {
                let log = tail(&read_log(&dir), 40);
                stop_group(&mut child);
                panic!("LiteLLM not ready after 180 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        LiteLlm { child, port, dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        read_log(&self.dir)
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("litellm.log")).unwrap_or_default()
}

/// Kills `child`'s process group (started with `process_group(0)`, so its id is the child's)
/// and reaps the child.
fn stop_group(child: &mut Child) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).stderr(Stdio::null()).status();
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for LiteLlm {
    fn drop(&mut self) {
        stop_group(&mut self.child);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The filter configuration `envoy/envoy.yaml` ships (the JSON between its "llm-meter
/// configuration" markers), for tests that must run exactly what operators deploy.
pub fn shipped_filter_config() -> String {
    let shipped = std::fs::read_to_string(root().join("envoy/envoy.yaml")).expect("read envoy/envoy.yaml");
    let begin = shipped.find("# llm-meter configuration begin").expect("begin marker");
    let end = shipped.find("# llm-meter configuration end").expect("end marker");
    let block = &shipped[begin..end];
    let json_start = block.find("value: |\n").expect("value: | in the configuration block") + "value: |\n".len();
    let lines: Vec<&str> = block[json_start..].lines().filter(|l| !l.trim().is_empty()).collect();
    let indent = lines.iter().map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
    let json: String = lines.iter().map(|l| format!("{}\n", &l[indent..])).collect();
    serde_json::from_str::<serde_json::Value>(&json).unwrap_or_else(|e| panic!("shipped configuration: {e}\n{json}"));
    json
}

/// `yaml` (a rendered shipped configuration) made ready for `connections` concurrent
/// connections: the listener's accept queue (`tcp_backlog_size`, Envoy's default 128) and the
/// upstream cluster's circuit breakers (`max_connections`, `max_pending_requests`,
/// `max_requests`, Envoy's default 1024 each) raised to `connections`. Nothing else changes.
pub fn for_many_connections(yaml: &str, connections: u32) -> String {
    let listener = "    filter_chains:\n";
    let cluster = "    connect_timeout: 2s\n";
    assert_eq!(yaml.matches(listener).count(), 1, "one listener with filter_chains");
    assert_eq!(yaml.matches(cluster).count(), 1, "one cluster with connect_timeout: 2s");
    yaml.replace(listener, &format!("    tcp_backlog_size: {connections}\n{listener}")).replace(
        cluster,
        &format!(
            "{cluster}    circuit_breakers:\n      thresholds:\n      - max_connections: {connections}\n        \
             max_pending_requests: {connections}\n        max_requests: {connections}\n"
        ),
    )
}

/// Makes sure this process (and the Envoy and mock it starts, which inherit it) may open at least
/// `min` file descriptors: raises the soft `RLIMIT_NOFILE` (with util-linux `prlimit`) when it is
/// lower, up to the hard limit. Returns the soft limit in force.
pub fn ensure_fd_limit(min: u64) -> u64 {
    let read = || -> (u64, u64) {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default();
        let mut n = line.split_whitespace().skip(3).map(|v| v.parse().unwrap_or(u64::MAX));
        (n.next().unwrap_or(0), n.next().unwrap_or(0))
    };
    let (soft, hard) = read();
    if soft >= min {
        return soft;
    }
    let want = min.min(hard);
    let status = Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &format!("--nofile={want}:{hard}")])
        .status();
    let (soft, _) = read();
    assert!(
        soft >= min,
        "need {min} file descriptors, have {soft} (hard limit {hard}; prlimit: {status:?}): raise `ulimit -n`"
    );
    soft
}

// ---- Wasm VM failure (tests/vm_failure.rs) ----

/// The test-only filter that traps on demand (cargo feature `trap-on-demand`: the request header
/// `x-llm-meter-trap` names the callback to trap in), built by `just build-trap` into its own
/// target directory so it never replaces the release build.
pub fn trap_wasm() -> PathBuf {
    require(&root().join("target/trap/wasm32-wasip1/release/llm_meter.wasm"), "just build-trap")
}

/// Like [`render_config`], with the filter loaded from `wasm` instead of the release build.
pub fn render_config_with_wasm(upstream_port: u16, filter_config: &str, wasm: &Path) -> String {
    let release = root().join("target/wasm32-wasip1/release/llm_meter.wasm");
    let from = format!("filename: {}\n", release.display());
    let yaml = render_config(upstream_port, filter_config);
    assert_eq!(yaml.matches(&from).count(), 1, "one filter loading {}", release.display());
    yaml.replace(&from, &format!("filename: {}\n", wasm.display()))
}

impl Envoy {
    /// Connections each worker thread accepted on the listener (`listener.<address>.worker_<n>.
    /// downstream_cx_total`), by worker number.
    pub fn accepted_by_worker(&self) -> BTreeMap<usize, u64> {
        let (_, text) = http_get(self.admin, "/stats?filter=worker_[0-9]+\\.downstream_cx_total$").expect("/stats");
        text.lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(": ")?;
                let worker = name.rsplit_once(".worker_")?.1.strip_suffix(".downstream_cx_total")?;
                Some((worker.parse().ok()?, value.trim().parse().ok()?))
            })
            .collect()
    }

    /// A connection to the listener that worker `worker` accepted. Linux spreads connections over
    /// the workers' listening sockets (SO_REUSEPORT) by a hash of the addresses: this connects
    /// until one lands on `worker` (told by its accepted-connections counter) and closes the
    /// others. Make no other connections to this Envoy meanwhile.
    pub fn connect_on_worker(&self, worker: usize) -> TcpStream {
        for _ in 0..200 {
            let before = self.accepted_by_worker();
            let s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
            let landed = eventually(Duration::from_secs(5), "the accepted connection in /stats", || {
                let after = self.accepted_by_worker();
                after.iter().find(|(w, n)| before.get(w).copied().unwrap_or(0) < **n).map(|(w, _)| *w)
            });
            if landed == worker {
                return s;
            }
        }
        panic!("no connection landed on worker {worker} in 200 attempts: {:?}", self.accepted_by_worker());
    }
}

/// A response read off a raw connection, as far as it came.
#[derive(Debug, Default)]
pub struct RawReply {
    /// 0 when no response head arrived.
    pub status: u16,
    /// Names lower-case.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked), as far as it arrived.
    pub body: Vec<u8>,
    /// The body arrived whole (its content-length, or the last chunk).
    pub complete: bool,
    /// The connection ended (closed, reset, or silent for the timeout) while this was read.
    pub closed: bool,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Writes a POST of `body` (JSON) to `path` on a raw HTTP/1.1 connection.
pub fn raw_post(stream: &mut TcpStream, path: &str, headers: &[(&str, &str)], body: &str) -> std::io::Result<()> {
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads one response off `stream` (content-length, chunked, or until the connection closes),
/// giving up after `timeout` without data. Never panics on a cut connection: that is the result.
pub fn read_reply(stream: &mut TcpStream, timeout: Duration) -> RawReply {
    let mut reply = RawReply::default();
    stream.set_read_timeout(Some(timeout)).expect("read timeout");
    let mut raw: Vec<u8> = Vec::new();
    let mut buf = [0u8; 16384];
    // false when the connection ended (EOF, reset or timeout).
    let mut more = |raw: &mut Vec<u8>, closed: &mut bool| match stream.read(&mut buf) {
        Ok(0) | Err(_) => {
            *closed = true;
            false
        }
        Ok(n) => {
            raw.extend_from_slice(buf.get(..n).unwrap_or_default());
            true
        }
    };
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if !more(&mut raw, &mut reply.closed) {
            return reply;
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    reply.status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    reply.headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut rest: Vec<u8> = raw[head_end + 4..].to_vec();
    if let Some(len) = reply.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < len && more(&mut rest, &mut reply.closed) {}
        reply.complete = rest.len() >= len;
        rest.truncate(len);
        reply.body = rest;
    } else if reply.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            // A whole chunk (size line, data, CRLF) at the front of `rest`?
            let parsed = rest.windows(2).position(|w| w == b"\r\n").and_then(|eol| {
                let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).ok()?;
                (rest.len() >= eol + 2 + size + 2).then_some((eol, size))
            });
            match parsed {
                Some((eol, 0)) => {
                    rest.drain(..eol + 4);
                    reply.complete = true;
                    break;
                }
                Some((eol, size)) => {
                    reply.body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
                    rest.drain(..eol + 2 + size + 2);
                }
                None if more(&mut rest, &mut reply.closed) => {}
                None => break,
            }
        }
    } else {
        while more(&mut rest, &mut reply.closed) {}
        reply.body = rest;
        reply.complete = reply.closed;
    }
    reply
}

// ---- Retries and provider failover (tests/resilience_envoy.rs) ----

impl Mock {
    /// Starts a mock on any free port that names itself `name` (`--name`: every answer carries
    /// `x-mock-server: <name>`, and `x-mock-fail-on` can pick it).
    pub fn start_named(name: &str) -> Mock {
        Mock::spawn(&["--host", "127.0.0.1", "--port", "0", "--quiet", "--name", name])
    }
}

/// The shipped `envoy/envoy-resilience.yaml` for a primary and a secondary gateway on these
/// ports, with `filter_config` as the filter's JSON (see [`render_shipped`]).
pub fn render_resilience(primary_port: u16, secondary_port: u16, filter_config: &str) -> String {
    let yaml = render_shipped("envoy/envoy-resilience.yaml", primary_port, filter_config);
    assert_eq!(yaml.matches("port_value: 8001").count(), 1, "one secondary gateway on port 8001");
    yaml.replace("port_value: 8001", &format!("port_value: {secondary_port}"))
}

impl Envoy {
    /// A counter or gauge of Envoy's own `/stats` (e.g. `cluster.llm_primary.upstream_rq_total`),
    /// 0 when absent.
    pub fn stat(&self, name: &str) -> u64 {
        // The filter is a regex (a dot matches any character); the exact name is matched below.
        let (_, text) = http_get(self.admin, &format!("/stats?filter={name}")).expect("/stats");
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.trim().parse().ok()).unwrap_or(0)
    }
}

/// A real Prometheus (Debian's `prometheus`) scraping Envoys' admin ports every second with the
/// shipped scrape job (`envoy/prometheus/prometheus.yml`), with or without the shipped alert and
/// recording rules.
pub struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Scrapes `admins` (Envoy admin ports); `rules`: load `envoy/prometheus/alerts.yml`.
    pub fn start(admins: &[u16], rules: bool) -> Prometheus {
        let bin = PathBuf::from("/usr/bin/prometheus");
        assert!(bin.exists(), "prometheus is missing: install Debian's `prometheus` package (.ci/run does)");
        let dir = std::env::temp_dir().join(format!("llm-meter-prom-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let shipped = std::fs::read_to_string(root().join("envoy/prometheus/prometheus.yml")).unwrap();
        let targets: Vec<String> = admins.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let rule_files = if rules {
            format!("rule_files:\n  - {}\n", root().join("envoy/prometheus/alerts.yml").display())
        } else {
            String::new()
        };
        let mut config = shipped;
        for (from, to) in [
            ("scrape_interval: 15s", "scrape_interval: 1s".to_string()),
            ("evaluation_interval: 15s", "evaluation_interval: 1s".to_string()),
            ("rule_files:\n  - alerts.yml\n", rule_files),
            ("\"127.0.0.1:9901\"", targets.join(", ")),
        ] {
            assert!(config.contains(from), "envoy/prometheus/prometheus.yml no longer contains {from:?}");
            config = config.replace(from, &to);
        }
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus { child, port, dir };
        eventually(Duration::from_secs(30), "Prometheus ready", || {
            http_get(p.port, "/-/ready").filter(|(c, _)| *c == 200)
        });
        p
    }

    /// A GET of the HTTP API, as JSON.
    pub fn api(&self, path: &str) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let mut resp = client().get(&url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let body = resp.body_mut().read_to_string().unwrap();
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    /// Instant query; the `data.result` array (panics on a query error, e.g. a PromQL typo).
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let mut resp = client().get(&url).query("query", expr).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let body = resp.body_mut().read_to_string().unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["status"], "success", "query {expr}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The first sample's value of an instant query.
    pub fn scalar(&self, expr: &str) -> Option<f64> {
        self.query(expr).first()?["value"][1].as_str()?.parse().ok()
    }

    /// Prometheus's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}
