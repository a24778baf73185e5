//! What one whole exchange costs in the filter's own code, and how many hostcalls it makes.
//!
//! Runs [`Exchange`] through the events Envoy delivers for a non-streaming chat completion (the
//! `just bench` workload: 208-byte request, 1 KB JSON response with usage) and for a streaming
//! one (200 chunks + a usage chunk), over an in-memory host that behaves like the wasm glue
//! (metric ids cached by name, headers in maps, the clock read once per callback). It counts
//! the hostcalls the glue would make: one per host method call, plus the copy of each body
//! chunk into the VM. Natively this is the logic's cost without V8; in Envoy the same code runs
//! slower and every hostcall also costs a VM exit.
//!
//! `cargo bench -p llm-meter --bench exchange`. With `EXCHANGE_HOSTCALLS_ONLY=1` it prints the
//! hostcall counts (and, natively, the heap allocations per exchange) and skips the timing
//! (`just bench` reads them that way).
//!
//! Built for wasm32 (`just bench-v8`), the same exchanges run inside V8 under node with the flags
//! Envoy gives V8 (no Liftoff: every function compiled by TurboFan), timed by a plain loop: the
//! filter's own code as Envoy runs it, without Envoy, so it can be profiled per function.

mod exchange {
    use llm_meter::config::Config;
    use llm_meter::filter::{Exchange, Flow, Host, MetricKind, Worker};
    use llm_meter::meter::deltas::Deltas;
    use llm_meter::meter::labels::{SharedStore, StoreError};
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;
    use std::hint::black_box;

    /// Envoy in memory, counting the hostcalls the glue would make.
    #[derive(Default)]
    struct BenchHost {
        shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        request_headers: Vec<(String, Vec<u8>)>,
        /// What the upstream sends; `response_headers` starts from it in every exchange.
        upstream_headers: Vec<(String, Vec<u8>)>,
        response_headers: Vec<(String, Vec<u8>)>,
        /// Stat ids by name, as the glue caches them (`define_metric` once per name).
        ids: HashMap<String, u32>,
        values: Vec<i64>,
        now: Cell<u64>,
        /// The glue reads the clock once per callback.
        now_read: Cell<bool>,
        hostcalls: Cell<u64>,
        /// Counter and gauge updates held until a flush, as in the glue.
        deltas: Deltas,
        /// Hostcalls by kind, while `tracing`.
        trace: RefCell<std::collections::BTreeMap<&'static str, u64>>,
        tracing: Cell<bool>,
        /// The token of the latest gRPC call.
        grpc_token: Cell<u32>,
        /// The serialized record (the glue reuses one buffer).
        record_buffer: Vec<u8>,
    }

    impl BenchHost {
        fn call(&self, what: &'static str) {
            self.hostcalls.set(self.hostcalls.get() + 1);
            if self.tracing.get() {
                *self.trace.borrow_mut().entry(what).or_default() += 1;
            }
        }

        /// A new callback from Envoy; `body`: the glue copies a body chunk into the VM first.
        fn callback(&self, body: bool) {
            self.now_read.set(false);
            if body {
                self.call("get_buffer_bytes");
            }
        }
    }

    impl SharedStore for BenchHost {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.call("get_shared_data");
            self.shared.borrow().get(key).cloned()
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.call("set_shared_data");
            let mut shared = self.shared.borrow_mut();
            let entry = shared.entry(key.to_string()).or_insert_with(|| (Vec::new(), 0));
            if cas.is_some_and(|c| c != entry.1) {
                return Err(StoreError::CasMismatch);
            }
            entry.0 = value.to_vec();
            entry.1 += 1;
            Ok(())
        }
    }

    fn find(headers: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
        headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    impl Host for BenchHost {
        /// A call to the rate limit service: answered by [`exchange`] in the next callback.
        fn grpc_call(&mut self, _: &[u8], _: &str, _: &str, _: &[u8], _: u64) -> Option<u32> {
            self.call("grpc_call");
            let token = self.grpc_token.get() + 1;
            self.grpc_token.set(token);
            Some(token)
        }
        fn request_header(&self, name: &str) -> Option<Vec<u8>> {
            self.call("get_header_map_value");
            find(&self.request_headers, name)
        }
        /// One map read for more than one name, as the glue does.
        fn request_headers(&self, names: &[String]) -> Vec<Option<Vec<u8>>> {
            if names.len() < 2 {
                return names.iter().map(|name| self.request_header(name)).collect();
            }
            self.call("get_header_map_pairs");
            names.iter().map(|name| find(&self.request_headers, name)).collect()
        }
        fn response_headers(&self) -> Vec<(String, Vec<u8>)> {
            self.call("get_header_map_pairs");
            self.response_headers.clone()
        }
        fn now_nanos(&self) -> u64 {
            if !self.now_read.replace(true) {
                self.call("get_current_time_nanoseconds");
                self.now.set(self.now.get() + 1_000_000);
            }
            self.now.get()
        }
        fn response_code(&self) -> Option<u16> {
            self.call("get_property");
            Some(200)
        }
        fn response_flags(&self) -> Option<u64> {
            self.call("get_property");
            Some(0)
        }
        fn define_metric(&mut self, _kind: MetricKind, name: &str) -> Option<u32> {
            if let Some(&id) = self.ids.get(name) {
                return Some(id);
            }
            self.call("define_metric");
            let id = u32::try_from(self.values.len()).ok()?;
            self.ids.insert(name.to_string(), id);
            self.values.push(0);
            Some(id)
        }
        /// Held until the next flush, as the glue does (`metrics.flush_interval_ms`): no hostcall
        /// per update; a flush sends one per changed stat, whatever the number of requests.
        fn metric_add(&mut self, id: u32, delta: i64) {
            self.deltas.add(id, delta);
            if let Some(v) = self.values.get_mut(id as usize) {
                *v += delta;
            }
        }
        fn metric_record(&mut self, id: u32, value: u64) {
            self.call("record_metric");
            if let Some(v) = self.values.get_mut(id as usize) {
                *v = value as i64;
            }
        }
        fn log_warn(&self, _message: &str) {
            self.call("log");
        }
        fn publish_record(&mut self, _name: &str, record: &llm_meter::record::Record) {
            self.call("set_property");
            // One buffer reused, as the glue does.
            let mut buffer = std::mem::take(&mut self.record_buffer);
            buffer.clear();
            record.write_struct(&mut buffer);
            self.record_buffer = std::hint::black_box(buffer);
        }
        fn client_address(&self) -> Option<Vec<u8>> {
            self.call("get_property");
            Some(b"127.0.0.1:5000".to_vec())
        }
        fn send_response(&mut self, _status: u16, _headers: &[(String, String)], _body: &[u8]) {
            self.call("send_http_response");
        }
        fn set_response_header(&mut self, name: &str, value: &str) {
            self.call("replace_header_map_value");
            self.response_headers.retain(|(k, _)| k != name);
            self.response_headers.push((name.to_string(), value.as_bytes().to_vec()));
        }
        /// The whole map in one call for more than one header, as the glue does.
        fn set_response_headers(&mut self, current: &[(String, Vec<u8>)], set: &[(&str, &str)]) {
            if set.len() < 2 {
                for (name, value) in set {
                    self.set_response_header(name, value);
                }
                return;
            }
            self.call("set_header_map_pairs");
            let mut headers: Vec<(String, Vec<u8>)> =
                current.iter().filter(|(n, _)| !set.iter().any(|(s, _)| s == n)).cloned().collect();
            headers.extend(set.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())));
            self.response_headers = black_box(headers);
        }
        fn remove_response_header(&mut self, name: &str) {
            self.call("remove_header_map_value");
            self.response_headers.retain(|(k, _)| k != name);
        }
        fn set_request_header(&mut self, _name: &str, _value: &str) {
            self.call("replace_header_map_value");
        }
        fn remove_request_header(&mut self, _name: &str) {
            self.call("remove_header_map_value");
        }
        fn request_body(&self) -> Option<Vec<u8>> {
            self.call("get_buffer_bytes");
            None
        }
        fn set_request_body(&mut self, _body: &[u8]) {
            self.call("set_buffer_bytes");
        }
    }

    const REQUEST: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in one short sentence, please."}],"max_tokens":64}"#;

    fn response_json() -> String {
        let content = "Hello! ".repeat(120);
        format!(
            r#"{{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":21,"completion_tokens":78,"total_tokens":99,"prompt_tokens_details":{{"cached_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0}}}},"system_fingerprint":"fp_bench"}}"#
        )
    }

    fn response_sse() -> String {
        let mut s = String::new();
        for i in 0..200 {
            s.push_str(&format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
            ));
        }
        s.push_str("data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":21,\"completion_tokens\":200,\"total_tokens\":221}}\n\ndata: [DONE]\n\n");
        s
    }

    const CONFIG: &str = r#"{"metrics": {"app_header": "x-app-id"},
        "pricing": {"gpt-4o-mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075}}}"#;
    const LIMITS: &str = r#"{"metrics": {"app_header": "x-app-id"},
        "pricing": {"gpt-4o-mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075}},
        "limits": [{"name": "rpm", "key": "header:x-api-key", "requests_per_minute": 100000000},
                   {"name": "tpm", "key": "header:x-api-key", "tokens_per_minute": 100000000000}]}"#;

    /// The metrics configuration plus one global request rule, counted by a rate limit service
    /// (`just bench`'s setup (g)).
    const GLOBAL: &str = r#"{"metrics": {"app_header": "x-app-id"},
        "pricing": {"gpt-4o-mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075}},
        "limits": [{"name": "rpm", "key": "header:x-api-key", "requests_per_minute": 1000000000,
                    "scope": "global", "service": {"cluster": "rate_limit_service", "domain": "llm",
                    "timeout_ms": 1000, "failure_mode": "allow"}}]}"#;

    /// The metrics configuration without per-request records.
    const RECORDS_OFF: &str = r#"{"metrics": {"app_header": "x-app-id"},
        "pricing": {"gpt-4o-mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075}},
        "records": {"enabled": false}}"#;

    /// The metrics configuration plus a circuit breaker and a fallback chain (no circuit open).
    const RESILIENCE: &str = r#"{"metrics": {"app_header": "x-app-id"},
        "pricing": {"gpt-4o-mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075}},
        "resilience": {"circuit_breaker": {"failures": 3, "open_seconds": 30},
                       "fallbacks": {"gpt-4o-mini": ["gpt-4.1-mini"]}}}"#;

    fn host(content_type: &str) -> BenchHost {
        let mut host = BenchHost::default();
        for (k, v) in [
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":authority", "localhost"),
            ("content-type", "application/json"),
            ("content-length", "208"),
            ("x-app-id", "bench"),
            ("x-api-key", "sk-bench-0123456789"),
            ("authorization", "Bearer sk-bench-5f0c3a9e7d2b4186a1c9e0f3b7d64a25c8e1f0a3b6d9c2e5"),
            ("user-agent", "wrk"),
        ] {
            host.request_headers.push((k.to_string(), v.as_bytes().to_vec()));
        }
        for (k, v) in [
            (":status", "200"),
            ("content-type", content_type),
            ("date", "Mon, 23 Nov 2026 12:00:00 GMT"),
            ("server", "envoy"),
            ("x-envoy-upstream-service-time", "0"),
        ] {
            host.upstream_headers.push((k.to_string(), v.as_bytes().to_vec()));
        }
        host
    }

    /// llm-rls's answer to a global rule's call: OK, with the rule's status (limit, remaining,
    /// time to reset), as `RateLimitResponse` protobuf.
    fn rls_answer() -> Vec<u8> {
        fn varint(out: &mut Vec<u8>, mut n: u64) {
            while n >= 0x80 {
                out.push((n as u8) | 0x80);
                n >>= 7;
            }
            out.push(n as u8);
        }
        fn message(out: &mut Vec<u8>, tag: u8, inner: &[u8]) {
            out.push(tag);
            varint(out, inner.len() as u64);
            out.extend_from_slice(inner);
        }
        let mut limit = vec![0x08];
        varint(&mut limit, 1_000_000_000);
        limit.extend_from_slice(&[0x10, 2]);
        let mut status = vec![0x08, 1];
        message(&mut status, 0x12, &limit);
        status.push(0x18);
        varint(&mut status, 999_999_000);
        message(&mut status, 0x22, &[0x08, 42, 0x10, 0x80, 0xe1, 0xeb, 0x17]);
        let mut out = vec![0x08, 1];
        message(&mut out, 0x12, &status);
        out
    }

    /// One exchange as Envoy delivers it; the response arrives in `chunks`.
    fn exchange(host: &mut BenchHost, worker: &mut Worker, chunks: &[&[u8]]) {
        host.response_headers.clone_from(&host.upstream_headers);
        let mut x = Exchange::new();
        host.callback(false);
        x.on_request_headers(host, worker, false);
        host.callback(true);
        if x.on_request_body(host, worker, REQUEST.as_bytes(), true) == Flow::Hold {
            // A global rule asked the rate limit service: the answer's callback (the glue reads
            // its message, then resumes the request).
            host.callback(true);
            let answer = x.on_global_answer(host, worker, host.grpc_token.get(), Ok(&rls_answer()));
            if answer == Some(Flow::Continue) {
                host.call("resume_http_request");
            }
        }
        host.callback(false);
        x.on_response_headers(host, worker);
        for (i, chunk) in chunks.iter().enumerate() {
            host.callback(true);
            black_box(x.on_response_body(host, chunk, i + 1 == chunks.len()));
        }
        host.callback(false);
        x.on_log(host, worker);
    }

    /// Times a case: its name, the bytes one exchange moves, and one exchange to run.
    pub type Timer<'t> = dyn FnMut(&str, u64, &mut dyn FnMut()) + 't;

    /// Runs one case: counts its hostcalls, then hands `time` a closure doing one exchange.
    pub fn case(time: &mut Timer, name: &str, config: &str, content_type: &str, body: &str, chunk: usize) {
        let mut worker = Worker::new(Config::parse(config.as_bytes()).expect("config"));
        let mut host = host(content_type);
        let chunks: Vec<&[u8]> = body.as_bytes().chunks(chunk).collect();
        // Warm: labels admitted, metrics defined; then count one steady-state exchange.
        exchange(&mut host, &mut worker, &chunks);
        host.deltas = Deltas::default();
        host.hostcalls.set(0);
        host.tracing.set(true);
        exchange(&mut host, &mut worker, &chunks);
        host.tracing.set(false);
        let trace: Vec<String> = host.trace.borrow().iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "{name}: {} hostcalls per exchange ({} response chunks): {}; {} counter/gauge updates held \
             (a flush sends one per changed stat per interval, whatever the request rate)",
            host.hostcalls.get(),
            chunks.len(),
            trace.join(", "),
            host.deltas.len()
        );
        // Allocations in the steady state (natively: the bench's counting allocator), averaged
        // over 64 exchanges: batched work (the output estimate's sizes) comes and goes.
        if let Some(count) = crate::allocations::count(&mut || {
            for _ in 0..64 {
                exchange(&mut host, &mut worker, &chunks);
            }
        }) {
            println!(
                "{name}: {:.1} allocations per exchange (the in-memory host's own included: its header map copies, \
                 as the glue makes them)",
                count as f64 / 64.0
            );
        }
        if std::env::var_os("EXCHANGE_HOSTCALLS_ONLY").is_some() {
            return;
        }
        time(name, (REQUEST.len() + body.len()) as u64, &mut || exchange(&mut host, &mut worker, &chunks));
    }

    /// Every case, in the order they print.
    pub fn all(time: &mut Timer) {
        let json = response_json();
        let sse = response_sse();
        case(time, "chat_json_metrics", CONFIG, "application/json", &json, 16384);
        case(time, "chat_json_metrics_records_off", RECORDS_OFF, "application/json", &json, 16384);
        case(time, "chat_json_metrics_2_limits", LIMITS, "application/json", &json, 16384);
        case(time, "chat_json_metrics_resilience", RESILIENCE, "application/json", &json, 16384);
        case(time, "chat_json_metrics_global", GLOBAL, "application/json", &json, 16384);
        // Envoy hands a 60 KB upstream body to filters in chunks of up to 16 KiB.
        case(time, "chat_sse_metrics", CONFIG, "text/event-stream", &sse, 16384);
    }
}

/// Counts the heap allocations a piece of code makes (natively: this binary's global allocator
/// counts while asked to; in V8: not counted).
mod allocations {
    #[cfg(not(target_arch = "wasm32"))]
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

        pub static ON: AtomicBool = AtomicBool::new(false);
        pub static COUNT: AtomicU64 = AtomicU64::new(0);

        /// The system allocator, counting `alloc` and `realloc` calls while [`ON`].
        struct Counting;

        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                if ON.load(Ordering::Relaxed) {
                    COUNT.fetch_add(1, Ordering::Relaxed);
                }
                System.alloc(layout)
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                System.dealloc(ptr, layout)
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
                if ON.load(Ordering::Relaxed) {
                    COUNT.fetch_add(1, Ordering::Relaxed);
                }
                System.realloc(ptr, layout, size)
            }
        }

        #[global_allocator]
        static GLOBAL: Counting = Counting;
    }

    /// Allocations (and reallocations) `run` made, natively; `None` inside V8.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn count(run: &mut dyn FnMut()) -> Option<u64> {
        use std::sync::atomic::Ordering;
        counting::COUNT.store(0, Ordering::SeqCst);
        counting::ON.store(true, Ordering::SeqCst);
        run();
        counting::ON.store(false, Ordering::SeqCst);
        Some(counting::COUNT.load(Ordering::SeqCst))
    }

    #[cfg(target_arch = "wasm32")]
    pub fn count(_run: &mut dyn FnMut()) -> Option<u64> {
        None
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    use criterion::{Criterion, Throughput};
    let mut c = Criterion::default().configure_from_args();
    exchange::all(&mut |name, bytes, run| {
        let mut group = c.benchmark_group("exchange");
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(name, |b| b.iter(&mut *run));
        group.finish();
    });
    c.final_summary();
}

/// Inside V8: each case warms for 0.5 s (TurboFan compiles every function before its first
/// call when Liftoff is off, as in Envoy), then runs for `EXCHANGE_SECONDS` (default 2) and
/// prints the median of 10 slices in µs per exchange.
#[cfg(target_arch = "wasm32")]
fn main() {
    use std::time::{Duration, Instant};
    let seconds: f64 = std::env::var("EXCHANGE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let slice = Duration::from_secs_f64(seconds / 10.0);
    // `-- NAME`: only the cases whose name contains NAME (as criterion's filter natively);
    // `-- =NAME`: only the case named NAME.
    let only = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    exchange::all(&mut |name, _bytes, run| {
        let skip = match only.as_deref() {
            Some(exact) if exact.starts_with('=') => exact.get(1..) != Some(name),
            Some(part) => !name.contains(part),
            None => false,
        };
        if skip {
            return;
        }
        let warm = Instant::now();
        while warm.elapsed() < Duration::from_millis(500) {
            run();
        }
        let mut per: Vec<f64> = (0..10)
            .map(|_| {
                let start = Instant::now();
                let mut n = 0u64;
                while start.elapsed() < slice {
                    run();
                    n += 1;
                }
                start.elapsed().as_secs_f64() * 1e6 / n as f64
            })
            .collect();
        per.sort_by(f64::total_cmp);
        println!("{name}: {:.2} µs per exchange in V8 (median of 10; {:.2}..{:.2})", per[5], per[0], per[9]);
    });
}
