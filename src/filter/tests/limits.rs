//! Rate limits through the exchange: local rules, global rules and the rate limit service.

use super::*;

#[test]
fn limits_hold_the_whole_body_reject_with_a_local_reply_and_reconcile() {
    let mut host = FakeHost { now: 1_000 * 60_000 * MS, ..FakeHost::default() };
    let mut w = worker(
        r#"{"limits":[{"name":"rpm","key":"global","requests_per_minute":1},
                      {"name":"tpm","key":"global","tokens_per_minute":1000}]}"#,
    );
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    host.code = Some(200);

    // The model is in the first chunk, but `max_tokens` may follow: held to the end.
    let mut x = Exchange::new();
    assert_eq!(x.on_request_headers(&mut host, &mut w, false), Flow::Hold);
    assert_eq!(x.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o","#, false), Flow::Hold);
    assert_eq!(x.on_request_body(&mut host, &mut w, br#""max_tokens":100}"#, true), Flow::Continue);
    x.on_response_headers(&mut host, &mut w);
    let h = |host: &FakeHost, n: &str| host.response_headers.get(n).map(|v| String::from_utf8_lossy(v).into_owned());
    assert_eq!(h(&host, "x-ratelimit-remaining-requests").as_deref(), Some("0"));
    // 34 bytes -> 9 input tokens + 100 output reserved.
    assert_eq!(h(&host, "x-ratelimit-remaining-tokens").as_deref(), Some("891"));
    x.on_response_body(&mut host, CHAT_JSON.as_bytes(), true);
    x.on_log(&mut host, &mut w);
    // Reconciled to the real usage (19 input + 10 output).
    let mut y = Exchange::new();
    host.request_headers.insert(":path".into(), b"/v1/embeddings".to_vec());
    y.on_request_headers(&mut host, &mut w, true);
    assert_eq!(host.sent.as_ref().map(|s| s.0), Some(429), "the request rule is exhausted");
    let (_, headers, body) = host.sent.clone().unwrap();
    assert!(headers.contains(&("retry-after".to_string(), "60".to_string())), "{headers:?}");
    assert!(body.contains("\"code\":\"rpm\""), "{body}");
    host.code = Some(429);
    y.on_log(&mut host, &mut w);
    assert_eq!(counter(&host, "model=.=unknown;.;rule=.=rpm;.;mode=.=enforce;.;llm_ratelimit_rejected_total"), 1);
    assert_eq!(
        counter(&host, "model=.=unknown;.;app=.=unknown;.;operation=.=embeddings;.;status=.=429;.;error_type=.=rate_limited;.;llm_requests_total"),
        1
    );
    assert_eq!(host.gauges.get("model=.=unknown;.;llm_active_requests"), None, "rejected requests never become active");
    // The next window: the token bucket holds exactly the real usage.
    host.now += 60_000 * MS;
    host.sent = None;
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    let mut z = Exchange::new();
    z.on_request_headers(&mut host, &mut w, false);
    // No max_tokens: gpt-4o's average output (10, from the response above) is reserved, with
    // 18 bytes = 5 input tokens, in a window that starts empty.
    assert_eq!(z.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o"}"#, true), Flow::Continue);
    assert_eq!(host.sent, None);
    host.response_headers.clear();
    host.response_headers.insert(":status".into(), b"200".to_vec());
    z.on_response_headers(&mut host, &mut w);
    assert_eq!(h(&host, "x-ratelimit-remaining-tokens").as_deref(), Some("985"));
    assert_eq!(host.gauges.get("model=.=gpt-4o;.;llm_output_tokens_estimate"), Some(&10));

    // The upstream's own token limit is the tighter one: its three headers stay together;
    // the request family is still this filter's.
    host.response_headers.clear();
    for (k, v) in [
        (":status", "200"),
        ("x-ratelimit-limit-tokens", "30000"),
        ("x-ratelimit-remaining-tokens", "29"),
        ("x-ratelimit-reset-tokens", "6ms"),
    ] {
        host.response_headers.insert(k.into(), v.as_bytes().to_vec());
    }
    host.now += 60_000 * MS;
    let mut z = Exchange::new();
    z.on_request_headers(&mut host, &mut w, false);
    z.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o"}"#, true);
    z.on_response_headers(&mut host, &mut w);
    assert_eq!(h(&host, "x-ratelimit-limit-tokens").as_deref(), Some("30000"));
    assert_eq!(h(&host, "x-ratelimit-remaining-tokens").as_deref(), Some("29"));
    assert_eq!(h(&host, "x-ratelimit-reset-tokens").as_deref(), Some("6ms"));
    assert_eq!(h(&host, "x-ratelimit-limit-requests").as_deref(), Some("1"));
}

#[test]
fn global_rules_wait_for_the_service_then_forward_reject_or_follow_the_failure_mode() {
    let config = r#"{"limits":[
        {"name":"local","key":"global","tokens_per_minute":1000},
        {"name":"g-rpm","key":"header:authorization","requests_per_minute":100,"scope":"global",
         "service":{"cluster":"rls","domain":"llm","timeout_ms":50}},
        {"name":"g-tpm","key":"global","tokens_per_hour":5000,"token_type":"output","scope":"global",
         "service":{"cluster":"rls","domain":"llm-t","failure_mode":"deny"}}]}"#;
    let mut host = FakeHost { now: 1_000 * 60_000 * MS, ..FakeHost::default() };
    let mut w = worker(config);
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.request_headers.insert("authorization".into(), b"Bearer sk-1".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    host.code = Some(200);
    let ok = [0x08, 1];
    let over = [0x08, 2];

    // Admitted by both services: forwarded, then the output tokens are reported, less the
    // one token the check added.
    let mut x = Exchange::new();
    assert_eq!(x.on_request_headers(&mut host, &mut w, false), Flow::Hold);
    assert_eq!(x.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o"}"#, true), Flow::Hold);
    assert!(x.is_waiting() && !x.is_holding() && x.is_buffering());
    assert_eq!(host.grpc_calls.len(), 2);
    let (service, message, timeout) = host.grpc_calls[0].clone();
    assert_eq!((service, timeout), (crate::limit::rls::encode_grpc_service("rls"), 50));
    let d = |key: &str| crate::limit::rls::Descriptor {
        entries: vec![("rule", "g-rpm".into()), ("key", key.into())],
        limit: Some((100, crate::limit::rls::Unit::Minute)),
    };
    assert_eq!(message, crate::limit::rls::encode_request("llm", &[d(&key_entry(&message))], 1));
    assert_eq!(x.on_global_answer(&mut host, &mut w, 2, Ok(&ok)), None, "one answer of two");
    assert_eq!(x.on_global_answer(&mut host, &mut w, 2, Ok(&ok)), None, "a token answers once");
    assert_eq!(x.on_global_answer(&mut host, &mut w, 1, Ok(&ok)), Some(Flow::Continue));
    assert!(!x.is_waiting());
    assert_eq!(host.gauges.get("model=.=gpt-4o;.;llm_active_requests"), Some(&1));
    x.on_response_headers(&mut host, &mut w);
    x.on_response_body(&mut host, CHAT_JSON.as_bytes(), true);
    x.on_log(&mut host, &mut w);
    let reports = w.take_reports();
    assert_eq!(reports.len(), 1, "only the token rule reports");
    assert_eq!(reports[0].rule, 2);
    let tpm = crate::limit::rls::Descriptor {
        entries: vec![("rule", "g-tpm".into()), ("key", "global".into())],
        limit: Some((5000, crate::limit::rls::Unit::Hour)),
    };
    assert_eq!(reports[0].message, crate::limit::rls::encode_request("llm-t", &[tpm], 9), "10 output tokens - 1");

    // Over the limit: a 429 naming the rule; the local reservation is given back.
    host.grpc_calls.clear();
    let mut y = Exchange::new();
    y.on_request_headers(&mut host, &mut w, false);
    assert_eq!(y.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o"}"#, true), Flow::Hold);
    assert_eq!(y.on_global_answer(&mut host, &mut w, 1, Ok(&over)), Some(Flow::Respond));
    assert_eq!(host.sent.as_ref().map(|s| s.0), Some(429));
    assert!(host.sent.as_ref().unwrap().2.contains("\"code\":\"g-rpm\""));
    assert_eq!(y.on_global_answer(&mut host, &mut w, 2, Ok(&ok)), None, "answered already");
    host.code = Some(429);
    y.on_log(&mut host, &mut w);
    assert!(w.take_reports().is_empty());
    assert_eq!(counter(&host, "model=.=gpt-4o;.;rule=.=g-rpm;.;mode=.=enforce;.;llm_ratelimit_rejected_total"), 1);
    assert_eq!(host.gauges.get("model=.=gpt-4o;.;llm_active_requests"), Some(&0));

    // A failed call: g-rpm follows the top-level failure_mode (allow), g-tpm its own (deny).
    host.grpc_calls.clear();
    host.sent = None;
    let mut z = Exchange::new();
    z.on_request_headers(&mut host, &mut w, false);
    z.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o"}"#, true);
    assert_eq!(z.on_global_answer(&mut host, &mut w, 1, Err(())), None, "allowed; g-tpm still awaited");
    assert_eq!(counter(&host, "rule=.=g-rpm;.;llm_ratelimit_service_errors_total"), 1);
    assert_eq!(z.on_global_answer(&mut host, &mut w, 2, Ok(&[0x08])), Some(Flow::Respond), "undecodable");
    assert_eq!(host.sent.as_ref().map(|s| s.0), Some(503));
    assert_eq!(counter(&host, "rule=.=g-tpm;.;llm_ratelimit_service_errors_total"), 1);
    assert!(host.warnings.borrow().iter().any(|w| w.contains("rate limit service of rule 'g-rpm'")));

    // The service cannot even be called: the same, at once.
    host.grpc_down = true;
    host.sent = None;
    let mut v = Exchange::new();
    v.on_request_headers(&mut host, &mut w, false);
    assert_eq!(v.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o"}"#, true), Flow::Respond);
    assert_eq!(host.sent.as_ref().map(|s| s.0), Some(503));
    assert_eq!(counter(&host, "rule=.=g-rpm;.;llm_ratelimit_service_errors_total"), 2);
    assert_eq!(counter(&host, "rule=.=g-tpm;.;llm_ratelimit_service_errors_total"), 2);
}

#[test]
fn a_global_rejection_gives_back_every_local_charge() {
    let config = r#"{"limits":[
        {"name":"rpm","key":"header:authorization","requests_per_minute":10},
        {"name":"tpm","key":"header:authorization","tokens_per_minute":1000},
        {"name":"conc","key":"global","max_concurrent":1},
        {"name":"g","key":"global","requests_per_minute":5,"scope":"global",
         "service":{"cluster":"rls","domain":"llm"}}]}"#;
    let mut host = FakeHost { now: 1_000 * 60_000 * MS, ..FakeHost::default() };
    let mut w = worker(config);
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.request_headers.insert("authorization".into(), b"Bearer sk-1".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    let body = br#"{"model":"gpt-4o","max_tokens":50}"#;
    let estimate = crate::limit::enforce::estimate_input(&w.config, body.len() as u64) + 50;
    let h = |host: &FakeHost, n: &str| host.response_headers.get(n).map(|v| String::from_utf8_lossy(v).into_owned());

    // The local rules admit it, the service refuses it.
    let mut x = Exchange::new();
    x.on_request_headers(&mut host, &mut w, false);
    assert_eq!(x.on_request_body(&mut host, &mut w, body, true), Flow::Hold);
    assert_eq!(x.on_global_answer(&mut host, &mut w, 1, Ok(&[0x08, 2])), Some(Flow::Respond));
    assert_eq!(host.sent.as_ref().map(|s| s.0), Some(429));

    // While the rejected exchange has not even ended, the next one sees all of its limits:
    // its request, tokens and the one concurrency slot were given back.
    let mut y = Exchange::new();
    y.on_request_headers(&mut host, &mut w, false);
    assert_eq!(y.on_request_body(&mut host, &mut w, body, true), Flow::Hold, "the slot is free");
    assert_eq!(y.on_global_answer(&mut host, &mut w, 2, Ok(&[0x08, 1])), Some(Flow::Continue));
    y.on_response_headers(&mut host, &mut w);
    assert_eq!(h(&host, "x-ratelimit-remaining-requests").as_deref(), Some("9"));
    assert_eq!(h(&host, "x-ratelimit-remaining-tokens"), Some((1000 - estimate).to_string()));

    // The rejected exchange ends: nothing is given back twice.
    host.code = Some(429);
    x.on_log(&mut host, &mut w);
    y.on_response_body(&mut host, CHAT_JSON.as_bytes(), true);
    host.code = Some(200);
    y.on_log(&mut host, &mut w);
    let mut z = Exchange::new();
    z.on_request_headers(&mut host, &mut w, false);
    z.on_request_body(&mut host, &mut w, body, true);
    assert_eq!(z.on_global_answer(&mut host, &mut w, 3, Ok(&[0x08, 1])), Some(Flow::Continue));
    z.on_response_headers(&mut host, &mut w);
    assert_eq!(h(&host, "x-ratelimit-remaining-requests").as_deref(), Some("8"));
    // y used 19 + 10 tokens (CHAT_JSON), z reserved its estimate.
    assert_eq!(h(&host, "x-ratelimit-remaining-tokens"), Some((1000 - 29 - estimate).to_string()));
    assert_eq!(counter(&host, "kind=.=ratelimit;.;llm_meter_errors_total"), 0);
}

#[test]
fn usage_missing_counts_only_completed_responses() {
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"text/event-stream".to_vec());
    host.code = Some(200);
    let start = "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    // The client leaves mid-stream, then the upstream resets one: failures, not blind spots.
    for flag in [flags::DOWNSTREAM_CONNECTION_TERMINATION, flags::UPSTREAM_CONNECTION_TERMINATION] {
        host.flags = Some(flag);
        let mut x = Exchange::new();
        x.on_request_headers(&mut host, &mut w, false);
        x.on_request_body(&mut host, &mut w, br#"{"model":"m","stream":true}"#, true);
        x.on_response_headers(&mut host, &mut w);
        x.on_response_body(&mut host, start.as_bytes(), false);
        x.on_log(&mut host, &mut w);
    }
    assert_eq!(counter(&host, "model=.=m;.;llm_usage_missing_total"), 0);
    let failed: u64 = host
        .counters
        .iter()
        .filter(|(k, _)| k.contains("llm_requests_total") && !k.contains("error_type=.=none;"))
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(failed, 2, "{:?}", host.counters);
    // The same stream completed without usage is one.
    host.flags = Some(0);
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"m"}"#,
        200,
        "text/event-stream",
        &[start.as_bytes(), b"data: [DONE]\n\n"],
    );
    assert_eq!(counter(&host, "model=.=m;.;llm_usage_missing_total"), 1);
}

#[test]
fn cost_and_usd_budgets_price_by_the_same_model() {
    // The request names an unpriced alias, the response the priced model.
    let mut host = FakeHost { now: 1_000 * 3_600_000 * MS, ..FakeHost::default() };
    let mut w = worker(
        r#"{"pricing":{"gpt-4o-2024-08-06":{"input":100,"output":100}},
            "limits":[{"name":"usd","key":"global","usd_per_hour":1}]}"#,
    );
    chat_json(&mut host, &mut w);
    // 29 tokens at 100 USD per 1M: 2,900 µUSD in the metric ...
    assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;llm_cost_microusd_total"), 2900);
    assert_eq!(counter(&host, "reason=.=unpriced;.;llm_meter_skips_total"), 0);
    // ... and the same in the budget.
    let bucket = host
        .store
        .data
        .borrow()
        .iter()
        .find(|(k, _)| k.contains(".rl.usd."))
        .map(|(_, (v, _))| u64::from_le_bytes(v[8..16].try_into().unwrap()));
    assert_eq!(bucket, Some(2_900_000_000), "pico-USD charged to the budget");
    // A model no price resolves for: counted as unpriced, not charged.
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"free"}"#,
        200,
        "application/json",
        &[br#"{"model":"free","usage":{"prompt_tokens":5,"completion_tokens":5}}"#],
    );
    assert_eq!(counter(&host, "reason=.=unpriced;.;llm_meter_skips_total"), 1);
}

/// The value of the `key` entry of the first descriptor of an encoded request (a hash:
/// tests cannot predict it without re-hashing).
fn key_entry(message: &[u8]) -> String {
    let text = String::from_utf8_lossy(message);
    let start = text.find("key").unwrap() + 5;
    text[start..start + 32].to_string()
}

#[test]
fn a_global_usd_budget_reserves_warns_shows_its_use_and_a_shadow_rule_only_counts() {
    let config = r#"{"pricing":{"gpt-4o":{"input":2.5,"output":10}},"limits":[
        {"name":"team","key":"global","usd_per_month":1,"warn_at":0.8,"scope":"global",
         "service":{"cluster":"rls","domain":"llm"}},
        {"name":"try-rpm","key":"global","requests_per_minute":1,"mode":"shadow"}]}"#;
    let mut host = FakeHost { now: 1_000 * 60_000 * MS, ..FakeHost::default() };
    let mut w = worker(config);
    w.init_shared(&mut host);
    // The budget's limit is exported at configuration (in micro-USD), its use at 0.
    assert_eq!(host.gauges.get("rule=.=team;.;llm_ratelimit_limit"), Some(&1_000_000));
    assert_eq!(host.gauges.get("rule=.=team;.;llm_ratelimit_used"), Some(&0));
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    host.code = Some(200);
    // The service's answers: limit 10,000 units (0.0001 USD each), then 2,064 left (7,936 used)
    // and 1,999 left (8,001 used: the second request crossed 0.8).
    let ok = |remaining: [u8; 2]| {
        let status = [0x08, 1, 0x12, 3, 0x08, 0x90, 0x4e, 0x18, remaining[0], remaining[1]];
        let mut out = vec![0x08, 1, 0x12, status.len() as u8];
        out.extend(status);
        out
    };
    for (round, remaining) in [[0x90, 0x10], [0xcf, 0x0f]].into_iter().enumerate() {
        let mut x = Exchange::new();
        x.on_request_headers(&mut host, &mut w, false);
        assert_eq!(x.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o","max_tokens":20}"#, true), Flow::Hold);
        // 35 bytes = 9 input tokens at 2.5 USD/1M + 20 output at 10: 0.0002225 USD, 3 units.
        let (_, message, _) = host.grpc_calls.last().cloned().unwrap();
        assert_eq!(message.last(), Some(&3), "hits_addend 3");
        let token = host.grpc_calls.len() as u32;
        assert_eq!(x.on_global_answer(&mut host, &mut w, token, Ok(&ok(remaining))), Some(Flow::Continue));
        host.response_headers.retain(|k, _| k == ":status" || k == "content-type");
        x.on_response_headers(&mut host, &mut w);
        let h = |n: &str| host.response_headers.get(n).map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(h("x-ratelimit-limit-usd").as_deref(), Some("1"));
        let want = [(Some("0.2064"), None), (Some("0.1999"), Some("team"))][round];
        assert_eq!((h("x-ratelimit-remaining-usd").as_deref(), h("x-ratelimit-warning").as_deref()), want);
        assert!(h("x-ratelimit-remaining-requests").is_none(), "a shadow rule shows nothing");
        x.on_response_body(&mut host, CHAT_JSON.as_bytes(), true);
        x.on_log(&mut host, &mut w);
    }
    assert_eq!(host.gauges.get("rule=.=team;.;llm_ratelimit_used"), Some(&800_100));
    assert_eq!(counter(&host, "rule=.=team;.;llm_ratelimit_warnings_total"), 1);
    assert!(host.warnings.borrow().iter().any(|m| m.contains("rule 'team' key global passed its warning threshold")));
    // The shadow rule (1 per minute) would have rejected the second request: counted, not done.
    assert_eq!(counter(&host, "model=.=gpt-4o;.;rule=.=try-rpm;.;mode=.=shadow;.;llm_ratelimit_rejected_total"), 1);
    assert!(host.sent.is_none());
    // The real cost (19 input + 10 output tokens: 0.0001475 USD, 1.475 units) is under the 3
    // reserved: nothing to report; the credit stays with this worker.
    assert!(w.take_reports().is_empty());
}

#[test]
fn a_global_answer_is_read_as_of_the_requests_arrival_without_a_clock_read() {
    let config = r#"{"limits":[
        {"name":"g-rpm","key":"global","requests_per_minute":100,"scope":"global",
         "service":{"cluster":"rls","domain":"llm"}}]}"#;
    // The request arrives 10 s into a minute; the answer comes 5 s later (the fake clock moves,
    // as Envoy's would), without the service saying when its window resets.
    let arrival = 1_000 * 60_000 * MS + 10_000 * MS;
    let mut host = FakeHost { now: arrival, ..FakeHost::default() };
    let mut w = worker(config);
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    let mut x = Exchange::new();
    x.on_request_headers(&mut host, &mut w, false);
    assert_eq!(x.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o"}"#, true), Flow::Hold);
    host.now = arrival + 5_000 * MS;
    assert_eq!(x.on_global_answer(&mut host, &mut w, 1, Ok(&[0x08, 2])), Some(Flow::Respond));
    let (status, headers, _) = host.sent.clone().unwrap();
    assert_eq!(status, 429);
    // 50 s from the arrival to the end of its minute (45 s if the answer's time were used).
    assert!(headers.contains(&("retry-after".to_string(), "50".to_string())), "{headers:?}");
}
