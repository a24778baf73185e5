//! `metrics.naming`: the OpenTelemetry GenAI instruments through the real Envoy and a real
//! Prometheus. Two Envoys run the shipped `envoy/envoy.yaml` (its `stats_tags` and
//! `histogram_bucket_settings`) in front of the mock gateway, one with `"naming": "otel"`, one
//! with the default naming; one Prometheus scrapes both, with the shipped scrape job. Both get
//! the same traffic: OpenAI chat (non-streaming, a stream of many tokens, an upstream 500),
//! legacy completions, the Responses API, an Anthropic Messages stream, Gemini generateContent
//! and streamGenerateContent, and embeddings.
//!
//! With `otel`, Prometheus must hold the four GenAI instruments with exactly their label names
//! and values, the OpenTelemetry advisory bucket boundaries, counts equal to what was sent (and
//! exact token buckets), token sums agreeing with `llm_tokens_total`, and none of the default
//! histograms, while the counters stay. With the default naming: no `gen_ai_*` series at all, and
//! the default histograms with their labels and buckets, as before the option existed.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, eventually, http_get, send, Envoy, Mock, Prometheus};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

// ---- Samples of a real Prometheus scraping several Envoys ----

/// Instant query: every sample as (labels including `__name__`, value).
fn query_samples(prom: &Prometheus, expr: &str) -> Vec<Sample> {
    prom.query(expr)
        .iter()
        .map(|r| {
            let labels = r["metric"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            let value = r["value"][1].as_str().unwrap().parse().unwrap();
            Sample { labels, value }
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn name(&self) -> &str {
        &self.labels["__name__"]
    }

    fn get(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or_else(|| panic!("no label {key} in {:?}", self.labels))
    }

    fn le(&self) -> f64 {
        let le = self.get("le");
        if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or_else(|_| panic!("le={le:?}"))
        }
    }

    /// The labels that name the series of a histogram: all but `__name__` and `le`.
    fn series_key(&self) -> BTreeMap<String, String> {
        self.labels
            .iter()
            .filter(|(k, _)| *k != "__name__" && *k != "le")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The values of `keys`, in that order.
    fn values(&self, keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| self.get(k).to_string()).collect()
    }
}

// ---- The traffic ----

/// One request sent to each Envoy, and what it must be metered as.
struct Call {
    path: String,
    body: Value,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
    /// `gen_ai_operation_name`, `gen_ai_provider_name`, `gen_ai_request_model` (= `model`).
    op: &'static str,
    provider: &'static str,
    model: &'static str,
    error_type: &'static str,
    /// Answered as a stream (time to first token is recorded).
    stream: bool,
    /// Input and output tokens metered, when the usage is known.
    tokens: Option<(u64, u64)>,
}

/// The Anthropic stream waits this long before its response headers: its request duration and
/// time to first token are at least that.
const ANTHROPIC_DELAY_MS: &str = "200";
/// The long OpenAI stream sends its events this far apart: its time per output token is more.
const CHUNK_DELAY_MS: &str = "30";

/// Token counts are chosen away from every token bucket boundary (1, 4, 16, 64, …), so that
/// Envoy's binning (two significant digits) cannot move one across a boundary.
fn traffic() -> Vec<Call> {
    let messages = json!([{"role": "user", "content": "hi"}]);
    let gemini_body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
    vec![
        Call {
            path: "/v1/chat/completions".into(),
            body: json!({"model": "gpt-4o", "messages": messages}),
            headers: vec![("x-mock-prompt-tokens", "100"), ("x-mock-completion-tokens", "20")],
            status: 200,
            op: "chat",
            provider: "openai",
            model: "gpt-4o",
            error_type: "none",
            stream: false,
            tokens: Some((100, 20)),
        },
        // A stream of many tokens, 30 ms apart (the filter adds include_usage).
        Call {
            path: "/v1/chat/completions".into(),
            body: json!({"model": "gpt-4o", "messages": messages, "stream": true}),
            headers: vec![
                ("x-mock-prompt-tokens", "300"),
                ("x-mock-completion-tokens", "10"),
                ("x-mock-chunk-delay-ms", CHUNK_DELAY_MS),
            ],
            status: 200,
            op: "chat",
            provider: "openai",
            model: "gpt-4o",
            error_type: "none",
            stream: true,
            tokens: Some((300, 10)),
        },
        // An upstream 500: a request duration with error_type server_error, no token usage.
        Call {
            path: "/v1/chat/completions".into(),
            body: json!({"model": "gpt-4o", "messages": messages}),
            headers: vec![("x-mock-scenario", "server_error")],
            status: 500,
            op: "chat",
            provider: "openai",
            model: "gpt-4o",
            error_type: "server_error",
            stream: false,
            tokens: None,
        },
        Call {
            path: "/v1/completions".into(),
            body: json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}),
            headers: vec![("x-mock-prompt-tokens", "10"), ("x-mock-completion-tokens", "6")],
            status: 200,
            op: "text_completion",
            provider: "openai",
            model: "gpt-3.5-turbo-instruct",
            error_type: "none",
            stream: false,
            tokens: Some((10, 6)),
        },
        Call {
            path: "/v1/responses".into(),
            body: json!({"model": "gpt-4.1-mini", "input": "hi"}),
            headers: vec![("x-mock-prompt-tokens", "2000"), ("x-mock-completion-tokens", "40")],
            status: 200,
            op: "chat",
            provider: "openai",
            model: "gpt-4.1-mini",
            error_type: "none",
            stream: false,
            tokens: Some((2000, 40)),
        },
        Call {
            path: "/v1/messages".into(),
            body: json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": messages, "stream": true}),
            headers: vec![
                ("x-mock-prompt-tokens", "700"),
                ("x-mock-completion-tokens", "30"),
                ("x-mock-delay-ms", ANTHROPIC_DELAY_MS),
                ("x-mock-chunk-delay-ms", "2"),
            ],
            status: 200,
            op: "chat",
            provider: "anthropic",
            model: "claude-sonnet-4-5",
            error_type: "none",
            stream: true,
            tokens: Some((700, 30)),
        },
        Call {
            path: "/v1beta/models/gemini-2.5-flash:generateContent".into(),
            body: gemini_body.clone(),
            headers: vec![("x-mock-prompt-tokens", "5000"), ("x-mock-completion-tokens", "200")],
            status: 200,
            op: "generate_content",
            provider: "gcp.gemini",
            model: "gemini-2.5-flash",
            error_type: "none",
            stream: false,
            tokens: Some((5000, 200)),
        },
        Call {
            path: "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse".into(),
            body: gemini_body,
            headers: vec![("x-mock-prompt-tokens", "40"), ("x-mock-completion-tokens", "12")],
            status: 200,
            op: "generate_content",
            provider: "gcp.gemini",
            model: "gemini-2.5-flash",
            error_type: "none",
            stream: true,
            tokens: Some((40, 12)),
        },
        Call {
            path: "/v1/embeddings".into(),
            body: json!({"model": "text-embedding-3-small", "input": "hi"}),
            headers: vec![("x-mock-prompt-tokens", "50"), ("x-mock-dimensions", "8")],
            status: 200,
            op: "embeddings",
            provider: "openai",
            model: "text-embedding-3-small",
            error_type: "none",
            stream: false,
            tokens: Some((50, 0)),
        },
    ]
}

fn send_all(envoy: &Envoy, calls: &[Call]) {
    let agent = client();
    for c in calls {
        let r = send(&agent, &envoy.url(&c.path), &c.headers, &c.body.to_string());
        assert_eq!(r.status, c.status, "{} {}: {}", c.path, c.body, r.body);
        if c.stream {
            assert!(
                r.body.starts_with("data:") || r.body.starts_with("event:"),
                "{}: not a stream: {}",
                c.path,
                r.body
            );
        }
    }
}

// ---- Expectations ----

const OP: &str = "gen_ai_operation_name";
const PROVIDER: &str = "gen_ai_provider_name";
const MODEL: &str = "gen_ai_request_model";
const TOKEN_TYPE: &str = "gen_ai_token_type";

/// The OpenTelemetry GenAI advisory boundaries (durations in ms), as envoy.yaml ships them.
const DURATION_BUCKETS: [f64; 14] =
    [10., 20., 40., 80., 160., 320., 640., 1280., 2560., 5120., 10240., 20480., 40960., 81920.];
const TTFT_BUCKETS: [f64; 16] =
    [1., 5., 10., 20., 40., 60., 80., 100., 250., 500., 750., 1000., 2500., 5000., 7500., 10000.];
const TPOT_BUCKETS: [f64; 15] =
    [10., 25., 50., 75., 100., 150., 200., 300., 400., 500., 750., 1000., 2500., 5000., 10000.];
const TOKEN_BUCKETS: [f64; 14] =
    [1., 4., 16., 64., 256., 1024., 4096., 16384., 65536., 262144., 1048576., 4194304., 16777216., 67108864.];
/// The default histograms' boundaries (envoy.yaml), unchanged by the option.
const DEFAULT_DURATION_BUCKETS: [f64; 16] =
    [10., 25., 50., 100., 250., 500., 1000., 2500., 5000., 10000., 20000., 30000., 60000., 120000., 300000., 600000.];
const DEFAULT_TTFT_BUCKETS: [f64; 16] =
    [10., 25., 50., 100., 200., 300., 500., 750., 1000., 1500., 2000., 3000., 5000., 10000., 30000., 60000.];
const DEFAULT_TOKENS_BUCKETS: [f64; 16] =
    [1., 10., 50., 100., 250., 500., 1000., 2000., 4000., 8000., 16000., 32000., 64000., 128000., 256000., 1000000.];

/// An instrument: its Prometheus name, its own label keys (in addition to Prometheus' `job`,
/// `instance` and the scrape job's `gateway`), its boundaries.
struct Instrument {
    name: &'static str,
    keys: &'static [&'static str],
    buckets: &'static [f64],
}

const OTEL: [Instrument; 4] = [
    Instrument { name: "gen_ai_client_token_usage", keys: &[OP, PROVIDER, MODEL, TOKEN_TYPE], buckets: &TOKEN_BUCKETS },
    Instrument {
        name: "gen_ai_server_request_duration_ms",
        keys: &[OP, PROVIDER, MODEL, "error_type"],
        buckets: &DURATION_BUCKETS,
    },
    Instrument { name: "gen_ai_server_time_to_first_token_ms", keys: &[OP, PROVIDER, MODEL], buckets: &TTFT_BUCKETS },
    Instrument { name: "gen_ai_server_time_per_output_token_ms", keys: &[OP, PROVIDER, MODEL], buckets: &TPOT_BUCKETS },
];

const DEFAULT_HISTOGRAMS: [Instrument; 4] = [
    Instrument { name: "llm_request_duration_ms", keys: &["model"], buckets: &DEFAULT_DURATION_BUCKETS },
    Instrument { name: "llm_time_to_first_token_ms", keys: &["model"], buckets: &DEFAULT_TTFT_BUCKETS },
    Instrument { name: "llm_time_per_output_token_ms", keys: &["model"], buckets: &TPOT_BUCKETS },
    Instrument { name: "llm_tokens_per_request", keys: &["model", "token_type"], buckets: &DEFAULT_TOKENS_BUCKETS },
];

/// The labels Prometheus adds to every series of the shipped scrape job.
const SCRAPE_LABELS: [&str; 3] = ["gateway", "instance", "job"];

/// The values each series of an instrument must have recorded (series: its own label values in
/// `keys` order), from the traffic.
fn otel_expected(calls: &[Call]) -> BTreeMap<&'static str, BTreeMap<Vec<String>, Vec<u64>>> {
    let mut out: BTreeMap<&'static str, BTreeMap<Vec<String>, Vec<u64>>> = BTreeMap::new();
    let key = |c: &Call, extra: Option<&str>| -> Vec<String> {
        let mut k = vec![c.op.to_string(), c.provider.to_string(), c.model.to_string()];
        k.extend(extra.map(str::to_string));
        k
    };
    for c in calls {
        // Durations are not known in advance: 0 stands for "one sample".
        out.entry("gen_ai_server_request_duration_ms")
            .or_default()
            .entry(key(c, Some(c.error_type)))
            .or_default()
            .push(0);
        if c.stream {
            out.entry("gen_ai_server_time_to_first_token_ms").or_default().entry(key(c, None)).or_default().push(0);
        }
        if let Some((input, output)) = c.tokens {
            let usage = out.entry("gen_ai_client_token_usage").or_default();
            usage.entry(key(c, Some("input"))).or_default().push(input);
            // Embeddings have no output tokens: no output sample (the default histogram has one).
            if c.op != "embeddings" {
                usage.entry(key(c, Some("output"))).or_default().push(output);
            }
            if c.stream && output >= 2 {
                out.entry("gen_ai_server_time_per_output_token_ms")
                    .or_default()
                    .entry(key(c, None))
                    .or_default()
                    .push(0);
            }
        }
    }
    out
}

/// The default histograms' series, as [`otel_expected`].
fn default_expected(calls: &[Call]) -> BTreeMap<&'static str, BTreeMap<Vec<String>, Vec<u64>>> {
    let mut out: BTreeMap<&'static str, BTreeMap<Vec<String>, Vec<u64>>> = BTreeMap::new();
    for c in calls {
        let m = vec![c.model.to_string()];
        out.entry("llm_request_duration_ms").or_default().entry(m.clone()).or_default().push(0);
        if c.stream {
            out.entry("llm_time_to_first_token_ms").or_default().entry(m.clone()).or_default().push(0);
        }
        if let Some((input, output)) = c.tokens {
            let per = out.entry("llm_tokens_per_request").or_default();
            per.entry(vec![c.model.to_string(), "input".into()]).or_default().push(input);
            per.entry(vec![c.model.to_string(), "output".into()]).or_default().push(output);
            if c.stream && output >= 2 {
                out.entry("llm_time_per_output_token_ms").or_default().entry(m).or_default().push(0);
            }
        }
    }
    out
}

/// Every histogram series of `inst` in `samples` (one instance's): label names exactly the
/// instrument's (plus the scrape labels, plus `le` on buckets), label values and counts exactly
/// `want`'s, buckets exactly `inst.buckets` and `+Inf`, cumulative, ending at `_count`. With
/// `exact_buckets`, the values of `want` are the recorded values and every bucket count must be
/// what they give. Returns the `_sum` of each series.
fn check_histogram(
    samples: &[Sample],
    inst: &Instrument,
    want: &BTreeMap<Vec<String>, Vec<u64>>,
    exact_buckets: bool,
) -> BTreeMap<Vec<String>, f64> {
    let of = |suffix: &str| -> Vec<&Sample> {
        let name = format!("{}{suffix}", inst.name);
        samples.iter().filter(|s| s.name() == name).collect()
    };
    let (buckets, sums, counts) = (of("_bucket"), of("_sum"), of("_count"));
    let own: BTreeSet<String> = inst.keys.iter().chain(SCRAPE_LABELS.iter()).map(|k| k.to_string()).collect();
    for (suffix, list) in [("_sum", &sums), ("_count", &counts)] {
        for s in list {
            let names: BTreeSet<String> = s.series_key().into_keys().collect();
            assert_eq!(names, own, "label names of {}{suffix}: {:?}", inst.name, s.labels);
        }
    }
    let mut with_le = own.clone();
    with_le.insert("le".into());
    for s in &buckets {
        let names: BTreeSet<String> = s.labels.keys().filter(|k| *k != "__name__").cloned().collect();
        assert_eq!(names, with_le, "label names of {}_bucket: {:?}", inst.name, s.labels);
    }

    let got_counts: BTreeMap<Vec<String>, f64> = counts.iter().map(|s| (s.values(inst.keys), s.value)).collect();
    let want_counts: BTreeMap<Vec<String>, f64> = want.iter().map(|(k, v)| (k.clone(), v.len() as f64)).collect();
    assert_eq!(got_counts, want_counts, "{}_count series (label values {:?} -> count)", inst.name, inst.keys);
    let got_sums: BTreeMap<Vec<String>, f64> = sums.iter().map(|s| (s.values(inst.keys), s.value)).collect();
    assert_eq!(got_sums.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{}_sum series", inst.name);

    for (series, values) in want {
        let mut les: Vec<(f64, f64)> =
            buckets.iter().filter(|s| &s.values(inst.keys) == series).map(|s| (s.le(), s.value)).collect();
        les.sort_by(|a, b| a.0.total_cmp(&b.0));
        let bounds: Vec<f64> = les.iter().map(|(le, _)| *le).collect();
        let mut want_bounds = inst.buckets.to_vec();
        want_bounds.push(f64::INFINITY);
        assert_eq!(bounds, want_bounds, "{} {series:?}: bucket boundaries (le)", inst.name);
        assert!(les.windows(2).all(|w| w[0].1 <= w[1].1), "{} {series:?}: buckets not cumulative: {les:?}", inst.name);
        assert_eq!(les.last().unwrap().1, values.len() as f64, "{} {series:?}: +Inf bucket != count", inst.name);
        if exact_buckets {
            let want_les: Vec<(f64, f64)> =
                want_bounds.iter().map(|&b| (b, values.iter().filter(|&&v| v as f64 <= b).count() as f64)).collect();
            assert_eq!(les, want_les, "{} {series:?}: bucket counts for the values {values:?}", inst.name);
        }
    }
    got_sums
}

/// `_sum` is Envoy's approximation (values are binned to two significant digits, see
/// docs/metrics.md): within 5 % of the exact total.
fn assert_close(what: &str, got: f64, exact: f64) {
    assert!((got - exact).abs() <= exact * 0.05 + 1e-9, "{what}: _sum {got}, exact {exact} (more than 5 % apart)");
}

/// The raw `/stats/prometheus` of an Envoy: every name is a plain metric name (no label segment
/// `key=.=value;.;` left in it, which a tag that was not extracted would leave).
fn check_raw(envoy: &Envoy) -> String {
    let (code, raw) = http_get(envoy.admin, "/stats/prometheus").expect("scrape Envoy");
    assert_eq!(code, 200);
    let broken: Vec<&str> = raw.lines().filter(|l| l.contains("=.=") || l.contains(";.;")).collect();
    assert!(broken.is_empty(), "names with an encoded label segment left in them:\n{}", broken.join("\n"));
    raw
}

fn instance(envoy: &Envoy) -> String {
    format!("127.0.0.1:{}", envoy.admin)
}

#[test]
fn otel_naming_exports_the_gen_ai_instruments_to_prometheus_and_default_naming_is_unchanged() {
    let started = Instant::now();
    let mock = Mock::start();
    let config = |naming: &str| {
        format!(
            r#"{{
  "metrics": {{"app_header": "x-app-id"{naming}}},
  "pricing": {{"gpt-4o": {{"input": 2.5, "output": 10}}}}
}}"#
        )
    };
    let otel = Envoy::start(mock.port, &config(r#", "naming": "otel""#));
    let plain = Envoy::start(mock.port, &config(""));
    let prom = Prometheus::start(&[otel.admin, plain.admin], false);
    let (otel_i, plain_i) = (instance(&otel), instance(&plain));

    let calls = traffic();
    send_all(&otel, &calls);
    send_all(&plain, &calls);
    println!("envoys, Prometheus and traffic: {:.1?}", started.elapsed());

    let n = calls.len() as f64;
    let otel_want = otel_expected(&calls);
    let default_want = default_expected(&calls);
    let total = |want: &BTreeMap<&'static str, BTreeMap<Vec<String>, Vec<u64>>>| -> f64 {
        want.values().flat_map(|s| s.values()).map(|v| v.len() as f64).sum()
    };
    let (otel_total, default_total) = (total(&otel_want), total(&default_want));
    // Everything is in Prometheus: the counters, and the histograms after Envoy's stats flush.
    eventually(Duration::from_secs(30), "both Envoys' metrics in Prometheus", || {
        let ok = prom.scalar(&format!(r#"sum(llm_requests_total{{instance="{otel_i}"}})"#)) == Some(n)
            && prom.scalar(&format!(r#"sum(llm_requests_total{{instance="{plain_i}"}})"#)) == Some(n)
            && prom.scalar(&format!(r#"sum({{__name__=~"gen_ai_.+_count",instance="{otel_i}"}})"#)) == Some(otel_total)
            && prom.scalar(&format!(
                r#"sum({{__name__=~"llm_(request_duration_ms|time_to_first_token_ms|time_per_output_token_ms|tokens_per_request)_count",instance="{plain_i}"}})"#
            )) == Some(default_total);
        ok.then_some(())
    });
    println!("in Prometheus after {:.1?}", started.elapsed());

    // ---- naming: otel ----
    let raw = check_raw(&otel);
    let gen_ai_raw: Vec<&str> = raw.lines().filter(|l| l.contains("gen_ai_") && !l.contains("_bucket{")).collect();
    println!("otel Envoy /stats/prometheus, gen_ai_* lines but buckets:\n{}", gen_ai_raw.join("\n"));
    let gemini_buckets: Vec<&str> = raw
        .lines()
        .filter(|l| {
            l.starts_with("gen_ai_client_token_usage_bucket{") && l.contains("gcp.gemini") && l.contains("\"input\"")
        })
        .collect();
    println!("and the buckets of one series:\n{}", gemini_buckets.join("\n"));
    for inst in &OTEL {
        assert!(raw.contains(&format!("# TYPE {} histogram\n", inst.name)), "no `# TYPE {} histogram` line", inst.name);
    }
    let samples = query_samples(&prom, &format!(r#"{{__name__=~"gen_ai_.+",instance="{otel_i}"}}"#));
    let names: BTreeSet<&str> = samples.iter().map(Sample::name).collect();
    let want_names: BTreeSet<String> =
        OTEL.iter().flat_map(|i| ["_bucket", "_sum", "_count"].map(|s| format!("{}{s}", i.name))).collect();
    assert_eq!(names, want_names.iter().map(String::as_str).collect(), "gen_ai_* metric names");
    let mut sums = BTreeMap::new();
    for inst in &OTEL {
        // Token counts are known exactly; durations only as a count of samples.
        let exact = inst.name == "gen_ai_client_token_usage";
        sums.insert(inst.name, check_histogram(&samples, inst, &otel_want[inst.name], exact));
    }

    // The token sums agree with the llm_tokens_total counter (and what was sent), per model and
    // token type.
    let counters = query_samples(&prom, &format!(r#"llm_tokens_total{{instance="{otel_i}"}}"#));
    assert!(!counters.is_empty(), "llm_tokens_total missing in otel mode");
    for (series, sum) in &sums["gen_ai_client_token_usage"] {
        let (model, token_type) = (&series[2], &series[3]);
        let counter: f64 = counters
            .iter()
            .filter(|s| s.get("model") == model && s.get("token_type") == token_type)
            .map(|s| s.value)
            .sum();
        let sent: u64 = otel_want["gen_ai_client_token_usage"][series].iter().sum();
        assert_eq!(counter, sent as f64, "llm_tokens_total{{model={model},token_type={token_type}}}");
        assert_close(&format!("gen_ai_client_token_usage {series:?}"), *sum, counter);
    }
    for token_type in ["input", "output"] {
        let counter =
            prom.scalar(&format!(r#"sum(llm_tokens_total{{instance="{otel_i}",token_type="{token_type}"}})"#));
        let sum = prom.scalar(&format!(
            r#"sum(gen_ai_client_token_usage_sum{{instance="{otel_i}",gen_ai_token_type="{token_type}"}})"#
        ));
        println!("{token_type} tokens: llm_tokens_total {counter:?}, gen_ai_client_token_usage_sum {sum:?}");
        assert_close(&format!("{token_type} tokens"), sum.unwrap(), counter.unwrap());
    }
    // Request duration counts every request, once.
    assert_eq!(
        prom.scalar(&format!(r#"sum(gen_ai_server_request_duration_ms_count{{instance="{otel_i}"}})"#)),
        Some(n)
    );

    // The durations fall into the buckets they must: the Anthropic stream's headers came after
    // 200 ms, the long OpenAI stream's events 30 ms apart.
    let bucket = |name: &str, selector: &str, le: &str| -> f64 {
        let q = format!(r#"{name}_bucket{{instance="{otel_i}",{selector},le="{le}"}}"#);
        prom.scalar(&q).unwrap_or_else(|| panic!("no {q}"))
    };
    let anthropic = r#"gen_ai_provider_name="anthropic""#;
    assert_eq!(bucket("gen_ai_server_request_duration_ms", anthropic, "160"), 0.0);
    assert_eq!(bucket("gen_ai_server_request_duration_ms", anthropic, "+Inf"), 1.0);
    assert_eq!(bucket("gen_ai_server_time_to_first_token_ms", anthropic, "100"), 0.0);
    assert_eq!(bucket("gen_ai_server_time_to_first_token_ms", anthropic, "+Inf"), 1.0);
    let gpt = r#"gen_ai_request_model="gpt-4o""#;
    assert_eq!(bucket("gen_ai_server_time_per_output_token_ms", gpt, "25"), 0.0);
    assert_eq!(bucket("gen_ai_server_time_per_output_token_ms", gpt, "+Inf"), 1.0);
    let duration_sum = &sums["gen_ai_server_request_duration_ms"]
        [&vec!["chat".into(), "anthropic".into(), "claude-sonnet-4-5".into(), "none".into()]];
    assert!(
        *duration_sum >= ANTHROPIC_DELAY_MS.parse::<f64>().unwrap() * 0.95,
        "Anthropic request duration _sum {duration_sum}"
    );
    let tpot_sum =
        &sums["gen_ai_server_time_per_output_token_ms"][&vec!["chat".into(), "openai".into(), "gpt-4o".into()]];
    assert!(*tpot_sum >= CHUNK_DELAY_MS.parse::<f64>().unwrap() * 0.95, "gpt-4o time per output token _sum {tpot_sum}");

    // No default histogram in otel mode; the counters and gauges are there.
    let defaults = query_samples(
        &prom,
        &format!(
            r#"{{__name__=~"llm_(request_duration_ms|time_to_first_token_ms|time_per_output_token_ms|tokens_per_request)(_bucket|_sum|_count)?",instance="{otel_i}"}}"#
        ),
    );
    assert!(defaults.is_empty(), "default histograms exported in otel mode: {defaults:#?}");
    for inst in &DEFAULT_HISTOGRAMS {
        assert!(!raw.contains(inst.name), "{} in the otel Envoy's /stats/prometheus", inst.name);
    }
    let requests = query_samples(&prom, &format!(r#"llm_requests_total{{instance="{otel_i}"}}"#));
    let mut by_op: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for s in &requests {
        *by_op.entry((s.get("model").into(), s.get("operation").into(), s.get("error_type").into())).or_default() +=
            s.value;
    }
    assert_eq!(by_op.values().sum::<f64>(), n, "llm_requests_total: {by_op:?}");
    assert_eq!(by_op.get(&("gpt-4o".into(), "chat".into(), "server_error".into())), Some(&1.0), "{by_op:?}");
    assert_eq!(
        by_op.get(&("gemini-2.5-flash".into(), "generate_content".into(), "none".into())),
        Some(&2.0),
        "{by_op:?}"
    );
    assert_eq!(by_op.get(&("claude-sonnet-4-5".into(), "messages".into(), "none".into())), Some(&1.0), "{by_op:?}");
    assert_eq!(
        prom.scalar(&format!(r#"sum(llm_active_requests{{instance="{otel_i}"}})"#)),
        Some(0.0),
        "llm_active_requests (a gauge) in otel mode"
    );
    assert!(
        prom.scalar(&format!(r#"sum(llm_cost_microusd_total{{instance="{otel_i}",model="gpt-4o"}})"#)).unwrap_or(0.0)
            > 0.0,
        "llm_cost_microusd_total in otel mode"
    );

    // ---- default naming ----
    let raw = check_raw(&plain);
    let default_raw: Vec<&str> =
        raw.lines().filter(|l| l.starts_with("llm_") && (l.contains("_count{") || l.contains("_ms_sum{"))).collect();
    println!("default-naming Envoy /stats/prometheus, histogram counts:\n{}", default_raw.join("\n"));
    assert!(!raw.contains("gen_ai"), "gen_ai in the default-naming Envoy's /stats/prometheus");
    let gen_ai = query_samples(&prom, &format!(r#"{{__name__=~"gen_ai.*",instance="{plain_i}"}}"#));
    assert!(gen_ai.is_empty(), "gen_ai_* series with the default naming: {gen_ai:#?}");
    let samples = query_samples(&prom, &format!(r#"{{__name__=~"llm_.+",instance="{plain_i}"}}"#));
    let mut default_sums = BTreeMap::new();
    for inst in &DEFAULT_HISTOGRAMS {
        let exact = inst.name == "llm_tokens_per_request";
        default_sums.insert(inst.name, check_histogram(&samples, inst, &default_want[inst.name], exact));
    }
    for (series, sum) in &default_sums["llm_tokens_per_request"] {
        let sent: u64 = default_want["llm_tokens_per_request"][series].iter().sum();
        assert_close(&format!("llm_tokens_per_request {series:?}"), *sum, sent as f64);
    }
    // The same counters as the otel Envoy.
    for metric in ["llm_requests_total", "llm_tokens_total", "llm_cost_microusd_total"] {
        let of = |i: &str| prom.scalar(&format!(r#"sum({metric}{{instance="{i}"}})"#));
        assert_eq!(of(&plain_i), of(&otel_i), "{metric}: default naming vs otel");
    }
    println!("done in {:.1?}", started.elapsed());
}
