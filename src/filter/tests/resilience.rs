//! The circuit breaker and fallback chains through the exchange.

use super::*;

/// One chat request for `model` through the exchange: the upstream answers `status` (with
/// `extra` response headers) and, for a 200, a body naming the model it received. Returns the
/// local reply if the filter answered, and the body the upstream got.
fn resilient_exchange(
    host: &mut FakeHost,
    w: &mut Worker,
    model: &str,
    status: u16,
    extra: &[(&str, &str)],
) -> (Option<Sent>, Vec<u8>) {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    host.sent = None;
    host.request_headers.clear();
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.request_headers.insert("content-length".into(), body.len().to_string().into_bytes());
    host.request_body = Some(body.clone().into_bytes());
    host.response_headers.clear();
    let mut x = Exchange::new();
    assert_eq!(x.on_request_headers(host, w, false), Flow::Hold);
    if x.on_request_body(host, w, body.as_bytes(), true) == Flow::Respond {
        host.code = host.sent.as_ref().map(|s| s.0);
        x.on_log(host, w);
        return (host.sent.clone(), Vec::new());
    }
    let upstream_got = host.request_body.clone().unwrap();
    let served: serde_json::Value = serde_json::from_slice(&upstream_got).unwrap();
    host.response_headers.insert(":status".into(), status.to_string().into_bytes());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    for (k, v) in extra {
        host.response_headers.insert(k.to_string(), v.as_bytes().to_vec());
    }
    host.code = Some(status);
    x.on_response_headers(host, w);
    let answer =
        format!(r#"{{"model":{},"choices":[],"usage":{{"prompt_tokens":4,"completion_tokens":2}}}}"#, served["model"]);
    x.on_response_body(host, answer.as_bytes(), true);
    x.on_log(host, w);
    (None, upstream_got)
}

#[test]
fn an_open_circuit_sends_requests_down_the_fallback_chain_then_answers_503() {
    let mut host = FakeHost { now: 1_000_000 * MS, ..FakeHost::default() };
    let mut w = worker(
        r#"{"resilience":{"circuit_breaker":{"failures":3,"open_seconds":2},
            "fallbacks":{"gpt-4.1":["claude-sonnet-4","gemini-2.5-flash"]}}}"#,
    );
    let model_of = |body: &[u8]| serde_json::from_slice::<serde_json::Value>(body).unwrap()["model"].clone();
    // Three 503s open gpt-4.1's circuit.
    for _ in 0..3 {
        let (sent, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 503, &[]);
        assert_eq!((sent, model_of(&got)), (None, serde_json::json!("gpt-4.1")));
    }
    assert_eq!(host.gauges.get("model=.=gpt-4.1;.;llm_model_state"), Some(&2));
    assert_eq!(counter(&host, "model=.=gpt-4.1;.;state=.=open;.;llm_circuit_transitions_total"), 1);
    // The 4th goes to claude-sonnet-4: rewritten body, metered as claude, header for the client.
    let (sent, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 200, &[]);
    assert_eq!((sent, model_of(&got)), (None, serde_json::json!("claude-sonnet-4")));
    assert_eq!(host.request_headers.get("content-length"), Some(&got.len().to_string().into_bytes()));
    assert_eq!(host.response_headers.get("x-llm-fallback-from").map(Vec::as_slice), Some(&b"gpt-4.1"[..]));
    assert_eq!(counter(&host, "model=.=gpt-4.1;.;to=.=claude-sonnet-4;.;llm_fallbacks_total"), 1);
    // The record names the model asked for and the one that served it.
    let r = &host.records.last().expect("a record").1;
    assert_eq!(
        (r.request_model.as_deref(), r.model.as_deref(), r.response_model.as_deref(), &*r.model_label),
        (Some("gpt-4.1"), Some("claude-sonnet-4"), Some("claude-sonnet-4"), "claude-sonnet-4")
    );
    assert_eq!(counter(&host, "model=.=claude-sonnet-4;.;app=.=unknown;.;token_type=.=output;.;llm_tokens_total"), 2);
    assert_eq!(
        counter(&host, "model=.=claude-sonnet-4;.;app=.=unknown;.;operation=.=chat;.;status=.=200;.;error_type=.=none;.;llm_requests_total"),
        1
    );
    // claude says when to come back (3 s): open until then, whatever the failure count.
    let (_, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 429, &[("retry-after", "3")]);
    assert_eq!(model_of(&got), serde_json::json!("claude-sonnet-4"));
    assert_eq!(host.gauges.get("model=.=claude-sonnet-4;.;llm_model_state"), Some(&2));
    // gemini fails three times too: the whole chain is open, answered here, not forwarded.
    for _ in 0..3 {
        let (_, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 500, &[]);
        assert_eq!(model_of(&got), serde_json::json!("gemini-2.5-flash"));
    }
    host.now += 100 * MS;
    let (sent, _) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 200, &[]);
    let (status, headers, body) = sent.expect("answered locally");
    assert_eq!(status, 503);
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (reply["error"]["type"].clone(), reply["error"]["code"].clone()),
        (serde_json::json!("server_error"), serde_json::json!("model_unavailable"))
    );
    assert!(body.contains("gpt-4.1, claude-sonnet-4, gemini-2.5-flash"), "{body}");
    let r = &host.records.last().expect("a record").1;
    assert_eq!((r.status, r.error_type, r.rejected_by.as_deref()), (503, "circuit_open", Some("circuit_open")));
    // gpt-4.1 opened at t0 for 2 s; 100 ms have passed, so it reopens first, in 2 s (rounded up).
    assert_eq!(headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.as_str()), Some("2"));
    assert_eq!(
        counter(&host, "model=.=gpt-4.1;.;app=.=unknown;.;operation=.=chat;.;status=.=503;.;error_type=.=circuit_open;.;llm_requests_total"),
        1
    );
    assert_eq!(
        counter(&host, "model=.=gpt-4.1;.;rule=.=circuit_open;.;mode=.=enforce;.;llm_ratelimit_rejected_total"),
        0,
        "not a rate limit"
    );
    // After open_seconds gpt-4.1 is half-open: one probe goes, its success closes the circuit.
    host.now += 2_000 * MS;
    let (sent, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 200, &[]);
    assert_eq!((sent, model_of(&got)), (None, serde_json::json!("gpt-4.1")));
    assert_eq!(counter(&host, "model=.=gpt-4.1;.;state=.=half_open;.;llm_circuit_transitions_total"), 1);
    assert_eq!(counter(&host, "model=.=gpt-4.1;.;state=.=closed;.;llm_circuit_transitions_total"), 1);
    assert_eq!(host.gauges.get("model=.=gpt-4.1;.;llm_model_state"), Some(&0));
    let (_, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 200, &[]);
    assert_eq!(model_of(&got), serde_json::json!("gpt-4.1"));
}

#[test]
fn without_resilience_nothing_changes() {
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    for _ in 0..5 {
        let (sent, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 503, &[]);
        assert!(sent.is_none());
        assert!(String::from_utf8(got).unwrap().contains("gpt-4.1"));
    }
    assert!(host.store.data.borrow().keys().all(|k| !k.contains(".cb.")), "no circuit kept");
    assert!(host.counters.keys().all(|k| !k.contains("circuit") && !k.contains("fallbacks")));
}

#[test]
fn the_state_gauge_follows_the_clock_without_requests() {
    let mut host = FakeHost { now: 1_000_000 * MS, ..FakeHost::default() };
    let mut w = worker(r#"{"resilience":{"circuit_breaker":{"failures":1,"open_seconds":2}}}"#);
    resilient_exchange(&mut host, &mut w, "gpt-4.1", 503, &[]);
    assert_eq!(host.gauges.get("model=.=gpt-4.1;.;llm_model_state"), Some(&2));
    // Open for 2 s: the timer changes nothing before, and shows half-open after.
    host.now += 1_500 * MS;
    w.refresh_circuits(&mut host);
    assert_eq!(host.gauges.get("model=.=gpt-4.1;.;llm_model_state"), Some(&2));
    // (At most once a second: the next look is at 2.5 s.)
    host.now += 1_000 * MS;
    w.refresh_circuits(&mut host);
    assert_eq!(host.gauges.get("model=.=gpt-4.1;.;llm_model_state"), Some(&1));
    // Another worker's probe closed it: shown closed, and no longer looked at.
    host.store.data.borrow_mut().remove("llm_meter.llm.cb.gpt-4.1");
    host.now += 1_000 * MS;
    w.refresh_circuits(&mut host);
    assert_eq!(host.gauges.get("model=.=gpt-4.1;.;llm_model_state"), Some(&0));
    let reads = host.store.reads.get();
    host.now += 1_000 * MS;
    w.refresh_circuits(&mut host);
    assert_eq!(host.store.reads.get(), reads, "closed circuits cost nothing");
}
