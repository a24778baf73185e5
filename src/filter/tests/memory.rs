//! The memory budget through the exchange.

use super::*;

/// A chat completion of 6,000,000 bytes of content, usage at the end.
fn big_chat() -> Vec<u8> {
    format!(
        r#"{{"model":"m","choices":[{{"message":{{"content":"{}"}}}}],"usage":{{"prompt_tokens":3,"completion_tokens":7}}}}"#,
        "abcdefghij".repeat(600_000)
    )
    .into_bytes()
}

/// [`big_chat`] brotli-compressed with a 16 MiB window (quality 5, lgwin 24): 98 bytes, kept as
/// a file because the brotli encoder built for wasm32 crashes node 20's V8 when the test
/// process exits (`just unit-wasm`); the decoder, which is what the filter runs, does not.
const BIG_CHAT_BR: &[u8] = include_bytes!("big_chat.br");

#[test]
fn the_compressed_big_chat_is_the_big_chat() {
    let mut body = Vec::new();
    brotli::BrotliDecompress(&mut &BIG_CHAT_BR[..], &mut body).unwrap();
    assert!(body == big_chat(), "big_chat.br decodes to {} bytes", body.len());
}

fn brotli_exchange(host: &mut FakeHost, w: &mut Worker, compressed: &[u8]) -> Vec<Option<Vec<u8>>> {
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    host.response_headers.insert("content-encoding".into(), b"br".to_vec());
    host.code = Some(200);
    let mut x = Exchange::new();
    x.on_request_headers(host, w, false);
    x.on_request_body(host, w, br#"{"model":"m"}"#, true);
    x.on_response_headers(host, w);
    let chunks: Vec<&[u8]> = compressed.chunks(16 * 1024).collect();
    let mut forwarded = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        forwarded.push(x.on_response_body(host, c, i + 1 == chunks.len()));
        x.sync_memory(host, w);
    }
    x.on_log(host, w);
    forwarded
}

#[test]
fn the_memory_budget_skips_what_does_not_fit_and_gives_everything_back() {
    let compressed = BIG_CHAT_BR;
    // Other tests on this thread (all of them, on wasm32) share the VM's pool: compare with it.
    let base = Pool::with(Pool::held);
    // Default budget: the body decodes (its ring buffer grows to 8 MiB) and is metered; the
    // gauge saw it and is back at 0.
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    w.init_shared(&mut host);
    assert_eq!(host.gauges.get("llm_meter_memory_budget_bytes"), Some(&(256 << 20)));
    let forwarded = brotli_exchange(&mut host, &mut w, compressed);
    assert!(forwarded.iter().all(Option::is_none), "the client's bytes pass untouched");
    assert_eq!(counter(&host, "model=.=m;.;app=.=unknown;.;token_type=.=output;.;llm_tokens_total"), 7);
    assert_eq!(host.gauges.get("llm_meter_memory_bytes"), Some(&0));
    assert!(host.gauge_peaks["llm_meter_memory_bytes"] > 8 << 20, "{:?}", host.gauge_peaks);
    assert_eq!(Pool::with(Pool::held), base);
    assert!(Pool::with(Pool::peak) > 8 << 20, "peak {}", Pool::with(Pool::peak));

    // A stream cap below what the body needs: refused mid-body, counted, unmetered, bytes
    // untouched, everything given back.
    let mut host = FakeHost::default();
    let mut w = worker(r#"{"memory":{"max_stream_bytes":1048576}}"#);
    let forwarded = brotli_exchange(&mut host, &mut w, compressed);
    assert!(forwarded.iter().all(Option::is_none));
    assert_eq!(counter(&host, "reason=.=memory_budget;.;llm_meter_skips_total"), 1);
    assert_eq!(counter(&host, "model=.=m;.;app=.=unknown;.;token_type=.=output;.;llm_tokens_total"), 0);
    assert_eq!(counter(&host, "reason=.=compressed;.;llm_meter_skips_total"), 0, "not a corrupt body");
    assert_eq!(Pool::with(Pool::held), base);

    // A VM budget full of open streams refuses the next one at its headers.
    let mut host = FakeHost::default();
    let mut w = worker(r#"{"memory":{"max_stream_bytes_total":262144}}"#);
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    host.code = Some(200);
    let fit = 262_144 / RESPONSE_SCAN_BYTES;
    let mut open: Vec<Exchange> = (0..=fit)
        .map(|_| {
            let mut x = Exchange::new();
            x.on_request_headers(&mut host, &mut w, false);
            x.on_request_body(&mut host, &mut w, br#"{"model":"m"}"#, true);
            x.on_response_headers(&mut host, &mut w);
            x
        })
        .collect();
    assert_eq!(open.iter().filter(|x| x.scans_response()).count(), fit);
    for x in &mut open {
        x.on_response_body(&mut host, CHAT_JSON.as_bytes(), true);
        x.on_log(&mut host, &mut w);
    }
    assert_eq!(counter(&host, "reason=.=memory_budget;.;llm_meter_skips_total"), 1);
    assert_eq!(counter(&host, "model=.=m;.;app=.=unknown;.;token_type=.=output;.;llm_tokens_total"), 10 * fit as u64);
    assert_eq!(Pool::with(Pool::held), base);
    Pool::with(|p| p.set_max_total(crate::memory::DEFAULT_MAX_TOTAL));
}
