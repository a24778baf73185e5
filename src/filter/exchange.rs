//! One HTTP exchange, in the order Envoy calls it: request headers, request body chunks (held
//! while the model, the limits or `include_usage` injection need them), rate limit service
//! answers, response headers, response body chunks (scanned, decoded, stripped), and the log
//! callback that records everything once. See [`crate::filter`] for what it changes and why.

use super::host::{Host, InternalError};
use super::worker::{Stat, Worker};
use crate::config::FailureMode;
use crate::config::KeySource;
use crate::limit::enforce::{self, LimitHost, Rejection, RequestFacts, Reservation, Verdict};
use crate::limit::estimate;
use crate::limit::global::{self, Answer};
use crate::memory::Lease;
use crate::meter::classify::{classify, ErrorType};
use crate::meter::labels::{SharedStore, UNKNOWN};
use crate::meter::metrics::Metric;
use crate::meter::upstream::{usage_from_headers, RateLimits};
use crate::record::{self, Record, RecordUsage};
use crate::resilience::breaker::Admit;
use crate::resilience::retry_after;
use crate::scan::body::{BodyFormat, RequestScanner, ResponseScanner, Skip, Skips, RESPONSE_SCAN_BYTES};
use crate::scan::decode::{DecodeError, Decoder, Encoding, MAX_DECODED_BYTES};
use crate::scan::inject::{rewrite_request, Forward, Unchanged, UsageChunkStripper};
use crate::scan::operation::Operation;
use crate::scan::usage::{Usage, UsageFormat};
use std::rc::Rc;

mod route;

/// What [`Exchange::with_held_body`] made of the held request body.
enum BodyCopy<R> {
    /// The memory budget had no room for the copy (counted).
    Refused,
    /// The host would not hand the body over.
    Unreadable,
    /// What the closure returned.
    Read(R),
}

/// Replaces the held request body, fixing `content-length` when the request has one.
fn replace_body<H: Host>(host: &mut H, body: &[u8]) {
    host.set_request_body(body);
    if host.request_header("content-length").is_some() {
        host.set_request_header("content-length", &body.len().to_string());
    }
}

/// A header's value from a list of headers.
fn header_value<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
}

/// A [`Host`] seen as the [`LimitHost`] the rate limits need, with the request headers they
/// read copied when the request headers arrived: Envoy lets a filter read request headers only
/// until it forwards them, and without a hold the limits are checked after that, at the end of
/// the body. The third field, when set, is the time to use (ms) instead of reading the clock;
/// the fourth, the worker's key hashes (a key is hashed once, not per request).
struct Limits<'a, H>(&'a H, &'a [(String, Vec<u8>)], Option<u64>, &'a crate::record::KeyHashes);

impl<H: Host> SharedStore for Limits<'_, H> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.0.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), crate::meter::labels::StoreError> {
        self.0.set(key, value, cas)
    }
}

impl<H: Host> LimitHost for Limits<'_, H> {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        header_value(self.1, name).map(<[u8]>::to_vec)
    }
    fn client_address(&self) -> Option<Vec<u8>> {
        self.0.client_address()
    }
    fn now_ms(&self) -> u64 {
        self.2.unwrap_or_else(|| self.0.now_nanos() / 1_000_000)
    }
    fn bucket_id(&self, value: &[u8]) -> String {
        self.3.bucket_id(value)
    }
}

/// What the glue does with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Forward what arrived.
    Continue,
    /// Hold the headers (and buffer the body so far) until the model is known: the model is
    /// what per-model decisions and labels need, and upstream may fail before the body is read.
    Hold,
    /// The filter answered the request itself (a rejection); stop forwarding it.
    Respond,
}

/// One HTTP exchange (request and its response).
#[derive(Default)]
pub struct Exchange {
    operation: Option<Operation>,
    /// The model named in the path (Gemini), if any; the body's `model` wins.
    path_model: Option<String>,
    /// Usage read from the configured response headers (`usage_headers`), the fallback when the
    /// body reports none.
    header_usage: Option<Usage>,
    /// Body bytes scanned while holding the request; `None` when not holding.
    held_bytes: Option<usize>,
    started_nanos: u64,
    request: RequestScanner,
    app: String,
    model_label: Option<String>,
    /// The `active_requests` gauge this exchange incremented.
    active: Option<u32>,
    /// The stat series of `model_label` and `app`.
    series: Option<usize>,
    response: Option<ResponseScanner>,
    response_skips: Skips,
    status: u16,
    first_data_nanos: Option<u64>,
    response_end_nanos: Option<u64>,
    finished: bool,
    /// The limits were checked (or can no longer be: the response started).
    limits_checked: bool,
    /// Charges to release when the exchange ends.
    reservation: Option<Reservation>,
    /// The request headers the limits and the record's key read, kept when the request headers
    /// arrived (see [`Limits`] and [`Worker::kept_headers`]).
    kept_headers: Vec<(String, Vec<u8>)>,
    /// The rule that rejected the request, when this filter answered it.
    rejected_by: Option<String>,
    /// Global rules that apply to the request (see [`crate::limit::global`]).
    global_charges: Vec<global::Charge>,
    /// Rate limit service calls awaited before the request is forwarded: (token, charge index).
    global_pending: Vec<(u32, usize)>,
    /// What the rate limit service said of admitted global rules: their `x-ratelimit-*`
    /// families, and the rules at their `warn_at`.
    global_shown: Vec<enforce::Shown>,
    global_warned: Vec<String>,
    /// Skips found while checking limits.
    limit_skips: Skips,
    /// Decodes a copy of a compressed response body for the scanner.
    decoder: Option<Decoder>,
    /// A streaming chat/completions request may need `include_usage` added: the body is held to
    /// its end to decide (see [`crate::scan::inject`]).
    inject_pending: bool,
    /// The body was too large to hold whole for `include_usage` to be added.
    inject_abandoned: bool,
    /// `include_usage` was added: the usage-only chunk is removed from the client's stream.
    injected: bool,
    stripper: Option<UsageChunkStripper>,
    /// This stream's share of the VM's memory budget, taken when it first needs one.
    lease: Option<Rc<Lease>>,
    /// The circuit breaker decided where the request goes (see [`crate::resilience`]).
    routed: bool,
    /// The model a fallback serves the request with (it asked for `fallback_from`).
    served: Option<String>,
    /// The model the client asked for, when a fallback serves it.
    fallback_from: Option<String>,
    /// The circuit this request reports to when it ends, and what it said at admission.
    circuit: Option<(String, Admit)>,
    /// When a rate-limited upstream wants to be asked again, ms from its answer.
    come_back_ms: Option<u64>,
    /// The error type of a request the filter answered for a reason other than a limit.
    local_error: Option<ErrorType>,
    /// The response is a stream (server-sent events).
    streamed: bool,
}

fn parse_u64(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

fn parse_status(value: &[u8]) -> u16 {
    std::str::from_utf8(value).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

impl Exchange {
    /// A new exchange; nothing happens until request headers arrive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Request headers: decides whether the exchange is metered, starts its clock, and holds the
    /// headers when a body with the model follows (see [`Flow::Hold`]).
    pub fn on_request_headers<H: Host>(&mut self, host: &mut H, worker: &mut Worker, end_of_stream: bool) -> Flow {
        // `:path` (first), the app header and the kept headers, in one read.
        let mut values = host.request_headers(&worker.request_header_names);
        let path = values.first_mut().and_then(Option::take).unwrap_or_default();
        self.operation = Operation::from_path(&path);
        if self.operation.is_none() {
            return Flow::Continue;
        }
        self.path_model = Operation::model_from_path(&path);
        self.inject_pending = worker.config.inject_stream_usage
            && matches!(self.operation, Some(Operation::Chat | Operation::Completion));
        self.started_nanos = host.now_nanos();
        let at = |name: &str| worker.request_header_names.iter().position(|n| n == name);
        // Copied: the app header may be a kept header too.
        let app =
            worker.config.metrics.app_header.as_deref().and_then(at).and_then(|i| values.get(i).cloned().flatten());
        for name in &worker.kept_headers {
            if let Some(value) = at(name).and_then(|i| values.get_mut(i)).and_then(Option::take) {
                self.kept_headers.push((name.clone(), value));
            }
        }
        self.app = worker.app_label(host, app.as_deref());
        if end_of_stream {
            if let Some(flow) = self.route(host, worker, true) {
                return flow;
            }
            if let Some(flow) = self.check_limits(host, worker) {
                return flow;
            }
            self.start_active(host, worker);
            return Flow::Continue;
        }
        if worker.config.request.model_lookahead_bytes == 0 || !worker.holds.allows_hold() {
            return Flow::Continue;
        }
        if self.path_model.is_some()
            && !worker.config.limits.is_active()
            && !self.inject_pending
            && !worker.config.resilience.is_active()
        {
            // The model is known already; nothing to wait for.
            return Flow::Continue;
        }
        self.held_bytes = Some(0);
        Flow::Hold
    }

    /// A request body chunk (only the bytes not seen before): scanned for the model, passed on
    /// untouched. The request stays held until the model is found, the body ends, or
    /// `request.model_lookahead_bytes` have been held; scanning goes on after that.
    pub fn on_request_body<H: Host>(
        &mut self,
        host: &mut H,
        worker: &mut Worker,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Flow {
        if self.rejected_by.is_some() {
            // Envoy wants filters to keep stopping a stream they answered themselves.
            return Flow::Respond;
        }
        if self.operation.is_none() || self.active.is_some() {
            return self.release();
        }
        self.request.feed(chunk);
        if self.is_waiting() {
            // The rate limit service has not answered yet: the body waits with the headers.
            return Flow::Hold;
        }
        if end_of_stream {
            // Where it goes first: a fallback rewrites the body injection then reads.
            if let Some(flow) = self.route(host, worker, true) {
                return flow;
            }
            if self.inject_pending {
                self.inject_usage(host, worker);
                if self.lease.is_some() {
                    worker.sync_memory(host);
                }
            }
            if let Some(flow) = self.check_limits(host, worker) {
                return flow;
            }
            self.start_active(host, worker);
            return self.release();
        }
        // With limits to check or `include_usage` to add, the whole body is read first (it sizes
        // the token estimate and may name `max_tokens` or `stream` after the model), up to the
        // lookahead.
        let limits_pending = (worker.config.limits.is_active() && !self.limits_checked)
            || self.inject_pending
            || (worker.config.resilience.is_active() && !self.routed);
        let Some(held) = self.held_bytes.map(|h| h.saturating_add(chunk.len())) else { return Flow::Continue };
        self.held_bytes = Some(held);
        let enough = !limits_pending && self.request_model().is_some();
        if !enough && held < worker.config.request.model_lookahead_bytes {
            return Flow::Hold;
        }
        if self.inject_pending {
            // Too large to hold whole: if it is a stream that lacks `include_usage`, it stays
            // unmetered (counted at the end, when the scan knows).
            self.inject_pending = false;
            self.inject_abandoned = true;
        }
        if let Some(flow) = self.route(host, worker, false) {
            return flow;
        }
        if let Some(flow) = self.check_limits(host, worker) {
            return flow;
        }
        self.release()
    }

    /// The whole request body is held: adds `stream_options.include_usage` if it is a streaming
    /// request without it, and fixes `content-length`.
    fn inject_usage<H: Host>(&mut self, host: &mut H, worker: &mut Worker) {
        self.inject_pending = false;
        if !self.request.stream_lacks_usage() {
            // Not a stream, or one that asks for usage: nothing to add (the scan saw the whole
            // body), so the body is neither copied nor parsed again.
            return;
        }
        if self.held_bytes.is_none() {
            // Part of the body was forwarded already (the hold was released).
            self.limit_skips.add(Skip::NotInjected);
            return;
        }
        match self.with_held_body(host, worker, rewrite_request) {
            BodyCopy::Refused => {}
            BodyCopy::Read(Ok(rewritten)) => {
                replace_body(host, &rewritten);
                // The usage chunk is cut from the stream, which needs it uncompressed.
                host.remove_request_header("accept-encoding");
                self.injected = true;
            }
            BodyCopy::Read(Err(Unchanged::NotNeeded)) => {}
            // The body the scan took for a stream without usage could not be read back or
            // rewritten: it stays unmetered, and says so.
            BodyCopy::Read(Err(Unchanged::NotJson)) | BodyCopy::Unreadable => self.limit_skips.add(Skip::NotInjected),
        }
    }

    /// Hands a copy of the held request body to `f`. The copy, its parse and the result (about
    /// three times the body) are charged to the stream's memory lease for this callback; when
    /// the budget refuses, nothing is read and the refusal is counted (`memory_budget`).
    fn with_held_body<H: Host, R>(&mut self, host: &mut H, worker: &Worker, f: impl FnOnce(&[u8]) -> R) -> BodyCopy<R> {
        let lease = self.lease(worker);
        let need = self.held_bytes.unwrap_or(0).saturating_mul(3);
        if !lease.try_take(need) {
            self.limit_skips.add(Skip::MemoryBudget);
            self.release_memory();
            return BodyCopy::Refused;
        }
        let result = host.request_body().map(|body| f(&body));
        lease.give(need);
        result.map_or(BodyCopy::Unreadable, BodyCopy::Read)
    }

    /// Checks the rate limits once, when the request is known as well as it will be before it is
    /// forwarded. `Some(Flow::Respond)` when it was rejected (the reply is sent).
    fn check_limits<H: Host>(&mut self, host: &mut H, worker: &mut Worker) -> Option<Flow> {
        if self.limits_checked || !worker.config.limits.is_active() {
            return None;
        }
        self.limits_checked = true;
        let content_length = header_value(&self.kept_headers, "content-length").and_then(parse_u64).unwrap_or(0);
        let max_output = self.request.max_output_tokens();
        // A request that does not say its output reserves its model's average (one read).
        let mut label = None;
        let mut output_average = None;
        if max_output.is_none() && worker.config.limits.reserves_output() {
            let l = label.insert(worker.model_label(host, self.request_model()));
            output_average = estimate::read(&*host, &estimate::key(&worker.config.metrics.prefix, l));
        }
        let facts = RequestFacts {
            model: self.request_model(),
            body_bytes: content_length.max(self.request.bytes()),
            max_output,
            output_average,
        };
        // The request is admitted as of its arrival (its headers): no clock read at its body.
        let limits = Limits(&*host, &self.kept_headers, Some(self.arrival_ms()), &worker.key_hashes);
        let (verdict, notes) = enforce::check(&limits, &worker.config, facts, &mut worker.admitted);
        for rule in &notes.overflowed {
            let name = worker.name(Metric::RatelimitKeyOverflowTotal, &[rule]);
            host.counter_add(&name, 1);
        }
        for _ in 0..notes.failures {
            worker.limiter_failed(host);
        }
        if !(notes.shadow_rejected.is_empty() && notes.crossed.is_empty() && notes.used.is_empty()) {
            let label = match label {
                Some(label) => label,
                None => worker.model_label(host, self.request_model()),
            };
            worker.note_limits(host, &label, &notes.shadow_rejected, &notes.crossed, &notes.used);
        }
        match verdict {
            Verdict::Admit(reservation) => {
                let estimate = enforce::usage_estimate(&worker.config, &facts);
                self.reservation = Some(reservation);
                self.check_global(host, worker, &estimate)
            }
            Verdict::Reject(rejection) => Some(self.reject(host, worker, rejection)),
        }
    }

    /// Asks the rate limit service of every global rule that applies (the local rules admitted
    /// the request). `Some(Flow::Hold)` while answers are awaited; `Some(Flow::Respond)` when a
    /// failure under `failure_mode: deny` rejected it at once.
    fn check_global<H: Host>(&mut self, host: &mut H, worker: &mut Worker, estimate: &Usage) -> Option<Flow> {
        if !worker.has_global_limits() {
            return None;
        }
        // Charged as of the request's arrival, as the local rules are: no clock read here.
        let (charges, unknown) = global::charges(
            &Limits(&*host, &self.kept_headers, Some(self.arrival_ms()), &worker.key_hashes),
            &worker.config,
            self.request_model(),
            estimate,
            &worker.ledger,
        );
        for rule in unknown {
            worker.limiter_failed(host);
            if worker.config.limits.failure_mode == FailureMode::Deny {
                let name = worker.config.limits.rules.get(rule).map_or_else(String::new, |r| r.name.clone());
                return Some(self.reject(host, worker, enforce::unavailable(&name)));
            }
        }
        for (i, charge) in charges.iter().enumerate() {
            let Some(call) = charge.request(&worker.config) else { continue };
            match worker.call_service(host, &call) {
                Some(token) => self.global_pending.push((token, i)),
                None => {
                    if let Some(flow) = self.global_failed(host, worker, charge.rule) {
                        return Some(flow);
                    }
                }
            }
        }
        self.global_charges = charges;
        if self.global_pending.is_empty() {
            return None;
        }
        // Waiting for the service is not a hold for the model: the hold watchdog stays out of it
        // (Envoy times the calls out).
        self.held_bytes = None;
        Some(Flow::Hold)
    }

    /// A global rule's service gave no usable answer: counted; the rule's `failure_mode`
    /// decides. `Some(Flow::Respond)` when it rejects the request.
    fn global_failed<H: Host>(&mut self, host: &mut H, worker: &mut Worker, rule: usize) -> Option<Flow> {
        worker.count_service_error(host, rule);
        let r = worker.config.limits.rules.get(rule)?;
        match r.global.as_ref()?.failure_mode {
            FailureMode::Allow => None,
            FailureMode::Deny => {
                let rejection = enforce::unavailable(&r.name);
                self.global_pending.clear();
                Some(self.reject(host, worker, rejection))
            }
        }
    }

    /// The answer to the rate limit service call `token` (`Err(())`: the call failed or timed
    /// out). `Some(Flow::Continue)` when it was the last one awaited and the request may go on
    /// (the glue resumes it); `Some(Flow::Respond)` when it was rejected (the reply is sent).
    pub fn on_global_answer<H: Host>(
        &mut self,
        host: &mut H,
        worker: &mut Worker,
        token: u32,
        result: Result<&[u8], ()>,
    ) -> Option<Flow> {
        let pos = self.global_pending.iter().position(|(t, _)| *t == token)?;
        let (_, i) = self.global_pending.swap_remove(pos);
        if self.rejected_by.is_some() || self.finished {
            return None;
        }
        // As of the request's arrival, as the charge was made and the local rules admit: no
        // clock read for the answer. A reset the filter computes (the service said none) is
        // then longer by the few ms the call took: the safe side.
        let now_ms = self.arrival_ms();
        // Borrowed, not cloned: the fields below are disjoint from `global_charges`.
        let charge = self.global_charges.get(i)?;
        let rule = charge.rule;
        let answer = global::answer(&worker.config, charge, result, now_ms);
        if let Answer::Admit(status) | Answer::Shadow(status) = &answer {
            charge.learn(&worker.config, &mut worker.ledger, status.as_ref());
            let seen = status.as_ref().and_then(|s| {
                global::seen(&worker.config, rule, charge.key(), charge.hits, s, now_ms, charge.window_end_ms())
            });
            if let Some(seen) = seen {
                worker.note_global(host, rule, &seen, now_ms);
                let enforced = worker.config.limits.rules.get(rule).filter(|r| !r.shadow);
                if let Some(r) = enforced {
                    if seen.warned {
                        self.global_warned.push(r.name.clone());
                    }
                    self.global_shown.extend(seen.shown);
                }
            }
        }
        match answer {
            Answer::Admit(_) => {}
            Answer::Shadow(_) => {
                let label = worker.model_label(host, self.request_model());
                let name = worker.config.limits.rules.get(rule).map_or_else(String::new, |r| r.name.clone());
                worker.count_rejection(host, &label, &name, true);
            }
            Answer::Reject(rejection) => {
                self.global_pending.clear();
                return Some(self.reject(host, worker, rejection));
            }
            Answer::Failed => {
                if let Some(flow) = self.global_failed(host, worker, rule) {
                    return Some(flow);
                }
            }
        }
        if !self.global_pending.is_empty() {
            return None;
        }
        self.start_active(host, worker);
        Some(self.release())
    }

    fn reject<H: Host>(&mut self, host: &mut H, worker: &mut Worker, rejection: Rejection) -> Flow {
        if let Some(reservation) = self.reservation.take() {
            // The local rules admitted it, then a rate limit service refused it: it never
            // reaches the upstream, so nothing of the local limits is spent on it.
            for _ in 0..enforce::give_back(&Limits(&*host, &self.kept_headers, None, &worker.key_hashes), &reservation)
            {
                worker.count_error(host, InternalError::RateLimit);
            }
        }
        let label = worker.model_label(host, self.request_model());
        worker.count_rejection(host, &label, &rejection.rule, false);
        self.respond(host, worker, rejection)
    }

    /// Answers the request locally instead of forwarding it.
    fn respond<H: Host>(&mut self, host: &mut H, worker: &mut Worker, rejection: Rejection) -> Flow {
        let label = worker.model_label(host, self.request_model());
        host.send_response(rejection.status, &rejection.headers, rejection.body.as_bytes());
        self.status = rejection.status;
        self.model_label = Some(label);
        self.rejected_by = Some(rejection.rule);
        self.held_bytes = None;
        Flow::Respond
    }

    fn release(&mut self) -> Flow {
        self.held_bytes = None;
        Flow::Continue
    }

    /// Response headers: picks how to read the body.
    pub fn on_response_headers<H: Host>(&mut self, host: &mut H, worker: &mut Worker) {
        if self.operation.is_none() || self.rejected_by.is_some() {
            return;
        }
        // Too late for limits once the upstream answers (it may, before the body ended).
        self.limits_checked = true;
        // The upstream may answer before the request body ended (e.g. an early 4xx).
        self.start_active(host, worker);
        // One hostcall for all of them: the lookups below are many (rate-limit header families).
        let headers = host.response_headers();
        let header = |name: &str| header_value(&headers, name).map(<[u8]>::to_vec);
        let label = self.model_label.clone().unwrap_or_else(|| UNKNOWN.to_string());
        let series = self.series_of(worker, &label);
        for (kind, quota) in RateLimits::from_headers(header).reported() {
            if let Some(v) = quota.remaining {
                worker.record(host, series, Stat::UpstreamRemaining(kind), v);
            }
            if let Some(v) = quota.limit {
                worker.record(host, series, Stat::UpstreamLimit(kind), v);
            }
        }
        if !worker.config.usage_headers.is_empty() {
            match usage_from_headers(&worker.config.usage_headers, header) {
                Ok(u) => self.header_usage = u,
                Err(_) => self.response_skips.add(Skip::UsageInvalid),
            }
        }
        let ours = self.limit_response_headers();
        if !ours.is_empty() {
            // Per family (`requests`, `tokens`): when the upstream's own remaining is the lower,
            // its limit, remaining and reset stay, all three, so they describe one limit.
            let theirs_tighter = |family: &str| {
                ours.iter().any(|(name, ours)| {
                    name.strip_prefix("x-ratelimit-remaining-") == Some(family)
                        && header_value(&headers, name)
                            .and_then(parse_u64)
                            .is_some_and(|theirs| ours.parse::<u64>().is_ok_and(|ours| theirs < ours))
                })
            };
            let keep = [theirs_tighter("requests"), theirs_tighter("tokens")];
            let set: Vec<(&str, &str)> = ours
                .iter()
                .filter(|(name, _)| {
                    let family = name.rsplit('-').next().unwrap_or_default();
                    !((family == "requests" && keep[0]) || (family == "tokens" && keep[1]))
                })
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            host.set_response_headers(&headers, &set);
        }
        self.status = header_value(&headers, ":status").map_or(0, parse_status);
        if let Some(from) = &self.fallback_from {
            host.set_response_header("x-llm-fallback-from", from);
        }
        // Retries Envoy made below the filter (`include_attempt_count_in_response`): the filter
        // sees one request and its final response whatever happened below.
        if let Some(attempts) = header_value(&headers, "x-envoy-attempt-count").and_then(parse_u64) {
            if attempts > 1 {
                let name = worker.name(Metric::UpstreamRetriesTotal, &[&label]);
                host.counter_add(&name, attempts - 1);
            }
        }
        if self.status == 429 && self.circuit.is_some() {
            let now_ms = host.now_nanos() / 1_000_000;
            self.come_back_ms = retry_after::come_back_after(|n| header_value(&headers, n).map(<[u8]>::to_vec), now_ms);
        }
        if !(200..300).contains(&self.status) {
            return;
        }
        let encoding = match Encoding::from_header(header_value(&headers, "content-encoding").unwrap_or_default()) {
            Ok(encoding) => encoding,
            Err(_) => {
                self.response_skips.add(Skip::Compressed);
                return;
            }
        };
        // The scan's own bounded state comes out of the stream's memory budget first.
        let lease = self.lease(worker);
        if !lease.try_take(RESPONSE_SCAN_BYTES) {
            self.out_of_memory();
            worker.sync_memory(host);
            return;
        }
        // A copy is decoded for the scanners; the client gets the bytes as they are. The decoder
        // charges what it allocates to the same lease.
        self.decoder = encoding.map(|e| Decoder::with_lease(e, MAX_DECODED_BYTES, lease.clone()));
        let format = BodyFormat::from_content_type(header_value(&headers, "content-type").unwrap_or_default());
        let usage_format = self.operation.map_or(UsageFormat::OpenAiChat, Operation::usage_format);
        self.streamed = format == BodyFormat::Sse;
        self.response = Some(ResponseScanner::new(format, usage_format));
        if self.injected && format == BodyFormat::Sse && self.decoder.is_none() {
            // The client did not ask for the usage chunk: it is cut from its stream, so the
            // length changes.
            host.remove_response_header("content-length");
            self.stripper = Some(UsageChunkStripper::with_lease(lease));
        }
        worker.sync_memory(host);
    }

    /// The `x-ratelimit-*` headers of an admitted request, local and global rules together (see
    /// [`enforce::response_headers`]).
    fn limit_response_headers(&self) -> Vec<(&'static str, String)> {
        let (mut shown, mut warned): (Vec<&enforce::Shown>, Vec<&str>) = match &self.reservation {
            Some(r) => (r.shown.iter().collect(), r.warned.iter().map(String::as_str).collect()),
            None => (Vec::new(), Vec::new()),
        };
        shown.extend(self.global_shown.iter());
        warned.extend(self.global_warned.iter().map(String::as_str));
        enforce::response_headers(&shown, &warned)
    }

    /// A response body chunk: scanned for usage. Passed on untouched, except that a usage chunk
    /// the filter asked for is cut out: then the bytes to forward instead are returned.
    pub fn on_response_body<H: Host>(&mut self, host: &mut H, chunk: &[u8], end_of_stream: bool) -> Option<Vec<u8>> {
        if let Some(scanner) = self.response.as_mut() {
            let first_data = match self.decoder.as_mut() {
                None => scanner.feed(chunk),
                Some(decoder) => {
                    let mut first = false;
                    match decoder.feed(chunk, &mut |decoded| first |= scanner.feed(decoded)) {
                        Ok(()) => {}
                        Err(DecodeError::Memory) => self.out_of_memory(),
                        Err(_) => {
                            // Corrupt or beyond the size bound: stop reading this body.
                            self.response_skips.add(Skip::Compressed);
                            self.decoder = None;
                            self.response = None;
                            self.release_memory();
                        }
                    }
                    first
                }
            };
            if first_data && self.first_data_nanos.is_none() {
                self.first_data_nanos = Some(host.now_nanos());
            }
        }
        if end_of_stream && self.operation.is_some() {
            self.response_end_nanos = Some(host.now_nanos());
        }
        let stripper = self.stripper.as_mut()?;
        let forward = stripper.forward(chunk, end_of_stream);
        if stripper.gave_up() && self.response_skips.count(Skip::MemoryBudget) == 0 {
            // Refused memory: the stream falls back to passing through, unmetered.
            self.out_of_memory();
        }
        match forward {
            Forward::Unchanged => None,
            Forward::Bytes(out) => Some(out),
        }
    }

    /// End of the stream, however it ended: records every metric of the exchange, once.
    pub fn on_log<H: Host>(&mut self, host: &mut H, worker: &mut Worker) {
        if self.operation.is_none() || self.finished {
            return;
        }
        self.finished = true;
        // First, so that a scrape that sees this request counted also sees it no longer active.
        if let Some(active) = self.active.take() {
            host.metric_add(active, -1);
        }
        let end = self.response_end_nanos.unwrap_or_else(|| host.now_nanos());
        if let Some(r) = self.response.as_mut() {
            if self.response_end_nanos.is_some() {
                r.finish();
            } else {
                r.abandon();
            }
        }
        let usage = self.response.as_ref().and_then(ResponseScanner::usage).or(self.header_usage);
        let response_model = self.response.as_ref().and_then(|r| r.model().map(str::to_string));
        let request_model = self.request_model().map(str::to_string);

        let label = match (&self.model_label, &request_model) {
            (Some(label), Some(_)) => label.clone(),
            // No model in the request: fall back to the one the response names.
            _ => worker.model_label(host, request_model.as_deref().or(response_model.as_deref())),
        };
        let series = self.series_of(worker, &label);
        // Response headers that passed through the filter carry the final status; the property
        // is only needed when none did (e.g. the client went away first).
        let status = match self.status {
            0 => host.response_code().unwrap_or(0),
            status => status,
        };
        // Flags explain failures and interruptions. A 1xx-3xx response whose end passed through
        // the filter was completed by the upstream and is counted as such (one property read
        // less per request); a client that leaves while Envoy writes its last bytes does not
        // make it `canceled`.
        let completed = self.response_end_nanos.is_some() && (100..400).contains(&status);
        let flags = if completed { 0 } else { host.response_flags().unwrap_or(0) };
        let error = self.local_error.unwrap_or_else(|| classify(status, flags, self.rejected_by.is_some()));
        // Ended as the upstream sent it: its end passed through the filter, or nothing (no
        // response flag) says it was cut off (a response that ended with its headers).
        let ended = completed || flags == 0;
        self.record(host, worker, series, status, error, usage, ended);
        self.report_circuit(host, worker, error, end);
        // One price for the cost metric and the USD budgets.
        let price = worker.config.pricing.resolve(request_model.as_deref(), response_model.as_deref()).copied();

        if let Some(reservation) = self.reservation.take() {
            let failed = error != ErrorType::None;
            // Settled as of the response's end, read when it passed (no second clock read).
            let released = enforce::release(
                &Limits(&*host, &self.kept_headers, Some(end / 1_000_000), &worker.key_hashes),
                &worker.config,
                price.as_ref(),
                &reservation,
                usage.as_ref(),
                failed,
            );
            for _ in 0..released.failures {
                worker.count_error(host, InternalError::RateLimit);
            }
            if released.unpriced {
                self.limit_skips.add(Skip::Unpriced);
            }
            if !(released.crossed.is_empty() && released.used.is_empty()) {
                worker.note_limits(host, &label, &[], &released.crossed, &released.used);
            }
        }

        // Global token and USD rules learn the real usage (a request still waiting when the
        // client left was never forwarded: nothing to report). A forwarded request that failed
        // without usage still settles a USD reservation (its cost: none).
        let forwarded = self.rejected_by.is_none() && self.global_pending.is_empty();
        let settled = usage.or_else(|| (error != ErrorType::None).then(Usage::default));
        if let Some(u) = settled.as_ref().filter(|_| forwarded) {
            for c in &self.global_charges {
                if let Some(call) = c.report(&worker.config, u, price.as_ref(), &mut worker.ledger) {
                    worker.queue_report(host, call);
                }
            }
        }
        self.global_pending.clear();

        // Every completed response teaches its model's output size (for requests that do not
        // say theirs).
        if let Some(u) = usage.as_ref().filter(|_| error == ErrorType::None && worker.config.limits.reserves_output()) {
            worker.learn_output(host, &label, u.output, end);
        }

        let cost_pico = usage.as_ref().zip(price).and_then(|(u, p)| p.cost_pico(u));
        if let Some(pico) = cost_pico {
            if let Some(s) = worker.series.get_mut(series) {
                let micro = s.cost.add(pico);
                worker.add(host, series, Stat::Cost, micro);
            }
        }

        let ms = |nanos: u64| nanos.saturating_sub(self.started_nanos) / 1_000_000;
        let duration_ms = ms(end);
        let ttft_ms = self.first_data_nanos.map(ms);
        let streamed = self.streamed || self.response.as_ref().is_some_and(ResponseScanner::is_streaming);
        // Time per output token after the first: only a stream shows when the first token came.
        let tpot_ms = match (streamed, usage, self.first_data_nanos) {
            (true, Some(u), Some(first)) if u.output >= 2 => {
                // To the microsecond: the record's JSON shows no float noise.
                let ms = end.saturating_sub(first) as f64 / 1e6 / (u.output - 1) as f64;
                Some((ms * 1000.0).round() / 1000.0)
            }
            _ => None,
        };
        let naming = worker.config.metrics.naming;
        if naming.default_histograms() {
            worker.record(host, series, Stat::Duration, duration_ms);
            if let Some(t) = ttft_ms {
                worker.record(host, series, Stat::Ttft, t);
            }
            if let Some(t) = tpot_ms {
                worker.record(host, series, Stat::Tpot, t.round() as u64);
            }
        }
        if let Some(op) = self.operation.filter(|_| naming.otel()) {
            worker.record_otel(host, series, Metric::GenAiServerRequestDuration, op, error.as_str(), duration_ms);
            if let Some(t) = ttft_ms {
                worker.record_otel(host, series, Metric::GenAiServerTimeToFirstToken, op, "", t);
            }
            if let Some(t) = tpot_ms {
                worker.record_otel(host, series, Metric::GenAiServerTimePerOutputToken, op, "", t.round() as u64);
            }
            if let Some(u) = usage {
                worker.record_otel(host, series, Metric::GenAiClientTokenUsage, op, "input", u.input);
                // Embeddings produce no output tokens: no 0 sample to drag the output distribution down.
                if op != Operation::Embeddings {
                    worker.record_otel(host, series, Metric::GenAiClientTokenUsage, op, "output", u.output);
                }
            }
        }

        if worker.config.records.enabled {
            let record = Record {
                request_model: self
                    .fallback_from
                    .as_deref()
                    .or(self.request.model())
                    .or(self.path_model.as_deref())
                    .map(|m| record::bounded_model(m).into()),
                model: request_model.as_deref().map(|m| record::bounded_model(m).into()),
                response_model: response_model.as_deref().map(|m| record::bounded_model(m).into()),
                model_label: label.as_str().into(),
                app: self.app.as_str().into(),
                operation: self.operation.map_or(UNKNOWN, Operation::as_str),
                provider: self.operation.map_or(UNKNOWN, Operation::provider),
                stream: streamed,
                status,
                error_type: error.as_str(),
                usage: usage.map(|u| RecordUsage {
                    input: u.input,
                    output: u.output,
                    cached_input: u.cached_input,
                    cache_creation_input: u.cache_creation_input,
                    reasoning: u.reasoning,
                }),
                cost_microusd: cost_pico.map(|p| p as f64 / 1e6),
                ttft_ms,
                tpot_ms,
                duration_ms,
                rejected_by: self.rejected_by.as_deref().map(Into::into),
                key_hash: match &worker.config.records.key {
                    KeySource::Header(name) => header_value(&self.kept_headers, name)
                        .filter(|v| !v.is_empty())
                        .map(|v| worker.key_hashes.get(v).into()),
                    KeySource::Ip => host
                        .client_address()
                        .and_then(|a| enforce::client_ip(&a))
                        .map(|ip| worker.key_hashes.get(ip.to_string().as_bytes()).into()),
                    KeySource::Global => None,
                },
            };
            host.publish_record(&worker.config.records.filter_state, &record);
        }

        let mut skips = *self.request.skips();
        if self.inject_abandoned && self.request.stream_lacks_usage() {
            skips.add(Skip::NotInjected);
        }
        skips.merge(&self.response_skips);
        skips.merge(&self.limit_skips);
        if let Some(r) = &self.response {
            skips.merge(r.skips());
        }
        worker.record_skips(host, &skips, &label);
        // Everything the stream held goes back to the VM's memory budget, however it ended.
        self.decoder = None;
        self.stripper = None;
        self.response = None;
        if let Some(lease) = self.lease.take() {
            lease.release();
            worker.sync_memory(host);
        }
    }

    /// Counts the request and its usage. `ended`: the response ended as the upstream sent it;
    /// only a complete 2xx without usage is a metering blind spot (`usage_missing`), a stream
    /// the client or the network cut off is a failed request (`canceled`, `network`).
    #[allow(clippy::too_many_arguments)]
    fn record<H: Host>(
        &self,
        host: &mut H,
        worker: &mut Worker,
        series: usize,
        status: u16,
        error: ErrorType,
        usage: Option<Usage>,
        ended: bool,
    ) {
        let operation = self.operation.map_or(UNKNOWN, Operation::as_str);
        if let Some(id) = worker.requests_stat(host, series, operation, status, error) {
            host.metric_add(id, 1);
        }
        match usage {
            Some(u) => {
                let counts = [u.input, u.output, u.cached_input, u.reasoning, u.cache_creation_input];
                for (i, n) in counts.into_iter().enumerate() {
                    worker.add(host, series, Stat::Tokens(i), n);
                }
                if worker.config.metrics.naming.default_histograms() {
                    worker.record(host, series, Stat::PerRequest(0), u.input);
                    worker.record(host, series, Stat::PerRequest(1), u.output);
                }
            }
            None if ended && error == ErrorType::None && (200..300).contains(&status) => {
                worker.add(host, series, Stat::UsageMissing, 1)
            }
            None => {}
        }
    }

    /// The request is complete (or the response started): the model is as known as it will be
    /// before the response, so the exchange becomes an active request under that model.
    fn start_active<H: Host>(&mut self, host: &mut H, worker: &mut Worker) {
        if self.active.is_some() || self.finished {
            return;
        }
        let label = worker.model_label(host, self.request_model());
        let series = worker.series(&label, &self.app);
        if let Some(id) = worker.stat(host, series, Stat::Active) {
            host.metric_add(id, 1);
            self.active = Some(id);
        }
        self.series = Some(series);
        self.model_label = Some(label);
    }

    /// The stat series of model label `label` and this exchange's app: the one found when the
    /// request became active, unless the label changed since (a model learnt from the response).
    fn series_of(&self, worker: &mut Worker, label: &str) -> usize {
        match self.series {
            Some(series) if self.model_label.as_deref() == Some(label) => series,
            _ => worker.series(label, &self.app),
        }
    }

    /// When the request arrived (its headers), ms: the time its rate limits are checked and
    /// answered as of, so that neither needs a clock read of its own.
    fn arrival_ms(&self) -> u64 {
        self.started_nanos / 1_000_000
    }

    /// The request's model: the body's top-level `model`, else the one in the path.
    fn request_model(&self) -> Option<&str> {
        self.served.as_deref().or(self.request.model()).or(self.path_model.as_deref())
    }

    /// This stream's memory lease, taken on first use with the configured per-stream cap.
    fn lease(&mut self, worker: &Worker) -> Rc<Lease> {
        self.lease.get_or_insert_with(|| Lease::new(worker.config.memory.max_stream_bytes)).clone()
    }

    /// The memory budget refused this stream something: it is no longer decoded, scanned or
    /// stripped (its bytes pass as they come; the stripper forwards what it held with the next
    /// chunk), and what it held is given back. Counted once as `memory_budget`.
    fn out_of_memory(&mut self) {
        if self.response_skips.count(Skip::MemoryBudget) == 0 {
            self.response_skips.add(Skip::MemoryBudget);
        }
        self.decoder = None;
        self.response = None;
        if let Some(stripper) = self.stripper.as_mut() {
            stripper.abandon();
        }
        self.release_memory();
    }

    /// Gives back everything the stream holds of the budget.
    fn release_memory(&mut self) {
        if let Some(lease) = &self.lease {
            lease.release();
        }
    }

    /// After a callback that may have changed what this stream holds: tells the memory gauge
    /// (no hostcall unless the VM's total moved by a step, see [`Pool::gauge_delta`]).
    pub fn sync_memory<H: Host>(&self, host: &mut H, worker: &mut Worker) {
        if self.lease.is_some() {
            worker.sync_memory(host);
        }
    }

    /// True when the request path is an LLM operation this filter meters.
    pub fn is_metered(&self) -> bool {
        self.operation.is_some()
    }

    /// True while request body chunks are still of use (the model is not final yet), or must be
    /// stopped (the filter answered the request itself).
    pub fn wants_request_body(&self) -> bool {
        self.operation.is_some() && (self.active.is_none() || self.rejected_by.is_some()) && !self.finished
    }

    /// True when response body callbacks matter (end-of-stream time, scanning).
    pub fn wants_response_body(&self) -> bool {
        self.operation.is_some() && !self.finished
    }

    /// True when the response body bytes are scanned (a 2xx, uncompressed response).
    pub fn scans_response(&self) -> bool {
        self.response.is_some()
    }

    /// True when response chunks may be rewritten (see [`Exchange::on_response_body`]).
    pub fn rewrites_response(&self) -> bool {
        self.stripper.is_some()
    }

    /// True while the request waits for rate limit service answers.
    pub fn is_waiting(&self) -> bool {
        !self.global_pending.is_empty()
    }

    /// True while the request is held for its model (watched by [`crate::filter::hold`]).
    pub fn is_holding(&self) -> bool {
        self.held_bytes.is_some()
    }

    /// True while Envoy buffers the request body for this filter (held for the model, or
    /// waiting for the rate limit service): the glue then reads only the newly buffered bytes.
    pub fn is_buffering(&self) -> bool {
        self.held_bytes.is_some() || self.is_waiting()
    }

    /// The glue released the request without the filter deciding to (a stalled hold, see
    /// [`crate::filter::hold`]): body chunks that follow are new bytes again, scanned but not held.
    pub fn stop_holding(&mut self) {
        self.held_bytes = None;
    }
}
