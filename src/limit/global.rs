//! Rules with `scope: global`: counted by a rate limit service that every Envoy replica shares
//! (Envoy's rate limit protocol, [`crate::limit::rls`]), instead of this Envoy's shared data, which is
//! per process.
//!
//! Per rule and request, one `ShouldRateLimit` call with `hits_addend` 1 decides before the
//! request is forwarded: a request rule counts the request; a token rule checks that the window
//! still has room (the protocol cannot ask without adding: 0 means 1, so the check adds one
//! token). When the response has been metered, a token rule reports the real usage minus that
//! one token in a second call that nobody waits for, so the service's count is exactly the
//! tokens used. The limits themselves travel in each descriptor's `limit` override, so this
//! filter's configuration is the one place the numbers live.
//!
//! Descriptor entries: `rule` (the rule name), `key` (`global`, `absent`, or the SHA-256 of the
//! header value or client IP: keys never leave Envoy in clear) and, with `per_model`, `model`.

use crate::config::{Config, Limit, Rule};
use crate::limit::calendar::Period;
use crate::limit::enforce::{self, KeyIds, LimitHost, Rejection};
use crate::limit::rls::{self, Code, Descriptor, Unit};
use crate::meter::labels::sanitize;
use crate::meter::pricing::Price;
use crate::scan::usage::Usage;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

/// A global rule that applies to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// Index of the rule in `limits`.
    pub rule: usize,
    descriptor: Descriptor,
    /// Hits the request's call adds: 1 (a request; a token rule's room check), or a USD rule's
    /// estimated cost in cost units.
    pub hits: u32,
    /// The window the request falls in (its number), for the USD ledger.
    window: u64,
    /// The window's end, ms: `Retry-After` of calendar windows (the service counts other
    /// lengths, see [`Unit::of`]).
    window_end_ms: Option<u64>,
}

/// A call to make: the rule it is for, the hits it adds and the encoded `RateLimitRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub rule: usize,
    pub hits: u32,
    /// The descriptor's `key` entry (`global`, `absent` or a hash), for logs.
    pub key: String,
    pub message: Vec<u8>,
}

/// The global rules that apply to a request (in rule order), and the rules whose key could not
/// be determined (a client IP on a Unix socket listener), which follow `failure_mode`.
/// `estimate`: the request's usage estimate, which a USD rule reserves at its cost; `ledger`:
/// what the service last said is left of each USD budget (a reservation never asks more).
pub fn charges<H: LimitHost>(
    host: &H,
    config: &Config,
    model: Option<&str>,
    estimate: &Usage,
    ledger: &Ledger,
) -> (Vec<Charge>, Vec<usize>) {
    let mut charges = Vec::new();
    let mut unknown = Vec::new();
    let mut key_ids = KeyIds::default();
    let now_ms = host.now_ms();
    for (i, rule) in config.limits.rules.iter().enumerate() {
        let (Some(service), true) = (rule.global.as_ref(), enforce::applies(rule, model)) else { continue };
        let Some(period) = rule.period() else { continue };
        let Some(key) = key_ids.get(host, &rule.key) else {
            unknown.push(i);
            continue;
        };
        let mut entries = Vec::with_capacity(4);
        entries.extend([("rule", rule.name.clone()), ("key", key.to_string())]);
        if rule.per_model {
            entries.push(("model", model.map_or_else(|| "unknown".to_string(), sanitize)));
        }
        let span = period.at(now_ms);
        if period.is_calendar() {
            // Each day, week or month is a counter of its own.
            entries.push(("period", period.start_date(&span)));
        }
        let descriptor = Descriptor { entries, limit: Some((service.max_hits, Unit::of(period.window))) };
        let hits = match rule.limit {
            Limit::Usd { .. } => {
                let cost = enforce::estimated_cost(config, model, estimate);
                let units = cost.div_ceil(service.cost_unit_pico.max(1));
                let left = ledger.remaining(&descriptor, span.index).map_or(u64::MAX, u64::from);
                u32::try_from(units.min(left).max(1)).unwrap_or(u32::MAX)
            }
            _ => 1,
        };
        let window_end_ms = period.is_calendar().then_some(span.end_ms);
        charges.push(Charge { rule: i, descriptor, hits, window: span.index, window_end_ms });
    }
    (charges, unknown)
}

impl Charge {
    /// The call deciding the request.
    pub fn request(&self, config: &Config) -> Option<Call> {
        self.call(config, self.hits)
    }

    /// The call reporting the real usage after the response, if anything is left to add: a
    /// token rule adds the tokens less the one the request's call added; a USD rule settles its
    /// reservation with the real cost through `ledger` (see [`Ledger::settle`]).
    pub fn report(&self, config: &Config, usage: &Usage, price: Option<&Price>, ledger: &mut Ledger) -> Option<Call> {
        let rule = config.limits.rules.get(self.rule)?;
        let hits = match rule.limit {
            Limit::Tokens { token_type, .. } => {
                // Usage is bounded (`usage::MAX_TOKENS` per count, so a total of at most 2·10⁹):
                // it fits the protocol's uint32. A count that did not would not be clamped into
                // the service's counter.
                u32::try_from(enforce::tokens_of(usage, token_type).saturating_sub(1)).ok()?
            }
            Limit::Usd { .. } => {
                let unit = rule.global.as_ref()?.cost_unit_pico;
                let cost = price.and_then(|p| p.cost_pico(usage)).unwrap_or(0);
                ledger.settle(&self.descriptor, self.window, u64::from(self.hits), cost, unit)
            }
            _ => return None,
        };
        (hits > 0).then(|| self.call(config, hits)).flatten()
    }

    /// Notes what the service said of this charge's budget (USD rules; see [`Ledger`]).
    pub fn learn(&self, config: &Config, ledger: &mut Ledger, status: Option<&rls::Status>) {
        let usd = config.limits.rules.get(self.rule).is_some_and(|r| matches!(r.limit, Limit::Usd { .. }));
        if let (true, Some(status)) = (usd, status) {
            ledger.learn(&self.descriptor, self.window, status.remaining);
        }
    }

    fn call(&self, config: &Config, hits: u32) -> Option<Call> {
        let service = config.limits.rules.get(self.rule)?.global.as_ref()?;
        let message = rls::encode_request(&service.domain, std::slice::from_ref(&self.descriptor), hits);
        Some(Call { rule: self.rule, hits, key: self.key().to_string(), message })
    }

    /// The descriptor's `key` entry.
    pub fn key(&self) -> &str {
        self.descriptor.entries.get(1).map_or("", |(_, v)| v.as_str())
    }

    /// The window's end, for calendar windows.
    pub fn window_end_ms(&self) -> Option<u64> {
        self.window_end_ms
    }
}

/// Most budgets (rule, key, window) a worker's [`Ledger`] remembers; beyond, a budget is settled
/// without memory (a reservation above the real cost then stays counted: the safe side).
pub const MAX_LEDGER_ENTRIES: usize = 10_000;

/// What this worker knows of each global USD budget it charged: the service counts only
/// additions (a hit cannot be taken back), so a reservation above the real cost would stay
/// counted. The ledger remembers the excess (credit) and nets it against the next real costs of
/// the same budget, which then report less; and it remembers what the service last said is left,
/// so a reservation never asks for more (a request the budget cannot cover is admitted while
/// anything is left, and then overshoots by at most its own cost).
#[derive(Debug, Default)]
pub struct Ledger {
    entries: HashMap<u64, LedgerEntry>,
}

#[derive(Debug, Default, Clone, Copy)]
struct LedgerEntry {
    window: u64,
    /// Pico-USD the service counted beyond the real cost (reservations not spent).
    credit: u64,
    /// Cost units left, as the service last said.
    remaining: Option<u32>,
}

impl Ledger {
    fn id(descriptor: &Descriptor) -> u64 {
        let mut h = DefaultHasher::new();
        descriptor.entries.hash(&mut h);
        h.finish()
    }

    fn entry(&mut self, descriptor: &Descriptor, window: u64) -> Option<&mut LedgerEntry> {
        let id = Self::id(descriptor);
        if self.entries.len() >= MAX_LEDGER_ENTRIES && !self.entries.contains_key(&id) {
            // Full: forget the budgets of windows that are over first.
            self.entries.retain(|_, e| e.window >= window);
            if self.entries.len() >= MAX_LEDGER_ENTRIES {
                return None;
            }
        }
        let e = self.entries.entry(id).or_default();
        if e.window != window {
            *e = LedgerEntry { window, ..LedgerEntry::default() };
        }
        Some(e)
    }

    /// Cost units left of a budget in `window`, as the service last said.
    pub fn remaining(&self, descriptor: &Descriptor, window: u64) -> Option<u32> {
        self.entries.get(&Self::id(descriptor)).filter(|e| e.window == window).and_then(|e| e.remaining)
    }

    /// The service answered a call for this budget: `remaining` units are left.
    pub fn learn(&mut self, descriptor: &Descriptor, window: u64, remaining: u32) {
        if let Some(e) = self.entry(descriptor, window) {
            e.remaining = Some(remaining);
        }
    }

    /// A request that reserved `reserved` units (of `unit` pico-USD) cost `cost` pico-USD: the
    /// units to report so the service's count catches up with the real cost, after using the
    /// budget's credit; what was reserved beyond the cost becomes credit.
    pub fn settle(&mut self, descriptor: &Descriptor, window: u64, reserved: u64, cost: u64, unit: u64) -> u32 {
        let unit = unit.max(1);
        let mut fresh = LedgerEntry::default();
        let e = self.entry(descriptor, window).unwrap_or(&mut fresh);
        let counted = e.credit.saturating_add(reserved.saturating_mul(unit));
        if counted >= cost {
            e.credit = counted - cost;
            return 0;
        }
        let owed = cost - counted;
        let units = owed.div_ceil(unit);
        e.credit = units * unit - owed;
        u32::try_from(units).unwrap_or(u32::MAX)
    }
}

/// What the service's answer to a request's call means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Under the limit; what the service said of the descriptor, if it said.
    Admit(Option<rls::Status>),
    /// Over the limit: send this 429.
    Reject(Rejection),
    /// Over the limit of a rule in `mode: shadow`: counted, the request goes on.
    Shadow(Option<rls::Status>),
    /// No usable answer (call failed, timed out, error status, undecodable or `UNKNOWN`):
    /// counted; the rule's `failure_mode` decides.
    Failed,
}

/// Reads the answer to `charge`'s call: `Err(())` when the call itself failed.
pub fn answer(config: &Config, charge: &Charge, result: Result<&[u8], ()>, now_ms: u64) -> Answer {
    let (Some(r), Some(response)) = (config.limits.rules.get(charge.rule), decision(result)) else {
        return Answer::Failed;
    };
    let status = response.statuses.first().copied();
    match response.overall {
        Code::OverLimit if r.shadow => Answer::Shadow(status),
        Code::OverLimit => Answer::Reject(rejection(r, charge, status, now_ms)),
        _ => Answer::Admit(status),
    }
}

/// The service's decision (OK or OVER_LIMIT), if the call gave one: `None` when it failed, the
/// answer does not decode, or it says UNKNOWN. Usage reports only need to know that.
pub fn decision(result: Result<&[u8], ()>) -> Option<rls::Response> {
    rls::decode_response(result.ok()?).ok().filter(|r| r.overall != Code::Unknown)
}

/// What a global rule's answer shows: used and limit in the rule's unit (requests, tokens,
/// pico-USD), whether `hits` took it across `warn_at`, and the `x-ratelimit-*` family headers for
/// an admitted response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The descriptor's key (`global`, `absent` or a hash).
    pub key: String,
    /// Used and limit in the rule's unit (pico-USD for USD rules).
    pub amounts: (u64, u64),
    /// The bucket crossed `warn_at` with these hits.
    pub crossed: bool,
    /// At or above `warn_at`.
    pub warned: bool,
    /// The rule's `x-ratelimit-*` family for an admitted response.
    pub shown: Option<enforce::Shown>,
}

/// Reads a status the service sent for `rule` after `hits` were added.
pub fn seen(
    config: &Config,
    rule: usize,
    key: &str,
    hits: u32,
    status: &rls::Status,
    now_ms: u64,
    window_end_ms: Option<u64>,
) -> Option<Seen> {
    let r = config.limits.rules.get(rule)?;
    let service = r.global.as_ref()?;
    let max = u64::from(status.limit.unwrap_or(service.max_hits));
    let remaining = u64::from(status.remaining).min(max);
    let used = max - remaining;
    let before = used.saturating_sub(u64::from(hits));
    let (crossed, warned) = match r.warn_threshold(max) {
        Some(t) => (before < t && used >= t, used >= t),
        None => (false, false),
    };
    let to_unit = |v: u64| match r.limit {
        Limit::Usd { .. } => v.saturating_mul(service.cost_unit_pico),
        _ => v,
    };
    let reset_ms = reset_ms(status.reset_ms, window_end_ms, r, now_ms);
    let shown = enforce::Shown::of(r, to_unit(max), to_unit(remaining), reset_ms);
    Some(Seen { key: key.to_string(), amounts: (to_unit(used), to_unit(max)), crossed, warned, shown })
}

/// When a global rule's window resets: a calendar window's end (the service's own reset counts
/// the longer unit it was asked for), else what the service said, else the end of the
/// epoch-aligned window, as envoyproxy/ratelimit counts (Limitador's windows start at a
/// counter's first hit, but it sends the reset).
fn reset_ms(service_reset: Option<u64>, window_end_ms: Option<u64>, rule: &Rule, now_ms: u64) -> u64 {
    if let Some(end) = window_end_ms {
        return end.saturating_sub(now_ms);
    }
    let period = rule.period().unwrap_or(Period::utc(crate::config::Window::Second));
    service_reset.unwrap_or_else(|| period.at(now_ms).reset_ms(now_ms))
}

/// The 429 of a global rule, with what the service said (remaining, reset) where it did.
fn rejection(rule: &Rule, charge: &Charge, status: Option<rls::Status>, now_ms: u64) -> Rejection {
    let scale = match (rule.limit, rule.global.as_ref()) {
        (Limit::Usd { .. }, Some(s)) => s.cost_unit_pico,
        _ => 1,
    };
    let max = rule.global.as_ref().map_or(0, |s| u64::from(s.max_hits));
    let reset_ms = reset_ms(status.and_then(|s| s.reset_ms), charge.window_end_ms, rule, now_ms);
    let remaining = status.map_or(0, |s| u64::from(s.remaining));
    let retry_after = reset_ms.div_ceil(1000).max(1);
    enforce::too_many(
        rule,
        max.saturating_mul(scale),
        remaining.saturating_mul(scale),
        reset_ms,
        retry_after,
        "its window is used up on every gateway replica",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::labels::{SharedStore, StoreError};

    struct Host(Vec<(&'static str, &'static str)>);

    impl SharedStore for Host {
        fn get(&self, _: &str) -> Option<(Vec<u8>, u32)> {
            None
        }
        fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<(), StoreError> {
            Err(StoreError::Other)
        }
    }

    impl LimitHost for Host {
        fn request_header(&self, name: &str) -> Option<Vec<u8>> {
            self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_bytes().to_vec())
        }
        fn client_address(&self) -> Option<Vec<u8>> {
            None
        }
        fn now_ms(&self) -> u64 {
            0
        }
    }

    fn config() -> Config {
        Config::parse(
            br#"{"limits":[
                {"name":"local","key":"global","requests_per_minute":5},
                {"name":"rpm","key":"header:authorization","requests_per_minute":300,"scope":"global",
                 "service":{"cluster":"rls","domain":"llm"}},
                {"name":"tpm","key":"global","per_model":true,"tokens_per_hour":100000,"token_type":"output",
                 "scope":"global","service":{"cluster":"rls","domain":"llm-tokens"}},
                {"name":"by-ip","key":"ip","requests_per_second":9,"scope":"global",
                 "service":{"cluster":"rls","domain":"llm"}},
                {"name":"mini","key":"global","models":["gpt-4o-mini"],"requests_per_second":1,"scope":"global",
                 "service":{"cluster":"rls","domain":"llm"}}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn descriptors_carry_the_rule_a_hashed_key_the_model_and_the_limit() {
        let c = config();
        let (found, unknown) = charges(
            &Host(vec![("authorization", "Bearer sk-secret")]),
            &c,
            Some("gpt-4o"),
            &Usage::default(),
            &Ledger::default(),
        );
        assert_eq!(unknown, vec![3], "no client address: the ip rule cannot be keyed");
        assert_eq!(found.iter().map(|c| c.rule).collect::<Vec<_>>(), vec![1, 2], "local and other-model rules skipped");
        let rpm = &found[0].descriptor;
        assert_eq!(rpm.entries[0], ("rule", "rpm".to_string()));
        assert_eq!(rpm.entries[1].0, "key");
        assert_eq!(rpm.entries[1].1.len(), 32);
        assert!(!rpm.entries[1].1.contains("secret"));
        assert_eq!(rpm.limit, Some((300, Unit::Minute)));
        let tpm = &found[1].descriptor;
        assert_eq!(tpm.entries[1], ("key", "global".to_string()));
        assert_eq!(tpm.entries[2], ("model", "gpt-4o".to_string()));
        assert_eq!(tpm.limit, Some((100_000, Unit::Hour)));
        // An absent key header is its own key.
        let (found, _) = charges(&Host(vec![]), &c, Some("gpt-4o-mini"), &Usage::default(), &Ledger::default());
        assert_eq!(found[0].descriptor.entries[1].1, "absent");
        assert_eq!(found.iter().map(|c| c.rule).collect::<Vec<_>>(), vec![1, 2, 4]);
    }

    #[test]
    fn a_request_adds_one_and_a_report_the_rest_of_the_tokens() {
        let c = config();
        let (found, _) = charges(&Host(vec![]), &c, Some("gpt-4o"), &Usage::default(), &Ledger::default());
        let rpm = found[0].request(&c).unwrap();
        assert_eq!(rpm.message, rls::encode_request("llm", &[found[0].descriptor.clone()], 1));
        let usage = Usage { input: 50, output: 120, ..Usage::default() };
        assert_eq!(found[0].report(&c, &usage, None, &mut Ledger::default()), None, "request rules report nothing");
        let report = found[1].report(&c, &usage, None, &mut Ledger::default()).unwrap();
        assert_eq!(report.message, rls::encode_request("llm-tokens", &[found[1].descriptor.clone()], 119));
        assert_eq!(found[1].report(&c, &Usage { output: 1, ..Usage::default() }, None, &mut Ledger::default()), None);
        assert_eq!(found[1].report(&c, &Usage::default(), None, &mut Ledger::default()), None);
    }

    fn budget() -> Config {
        Config::parse(
            br#"{"pricing":{"m":{"input":10,"output":30}},"limits":[
                {"name":"team","key":"global","usd_per_month":5,"warn_at":0.8,"scope":"global",
                 "service":{"cluster":"rls","domain":"llm"}},
                {"name":"trial","key":"global","usd_per_week":1,"mode":"shadow","scope":"global",
                 "service":{"cluster":"rls","domain":"llm"}}]}"#,
        )
        .unwrap()
    }

    /// An encoded OK or OVER_LIMIT answer with one status: limit and remaining.
    fn status_answer(over: bool, limit: u32, remaining: u32) -> Vec<u8> {
        let mut limit_msg = vec![0x08];
        super::rls::tests_put_varint(&mut limit_msg, u64::from(limit));
        let mut status = vec![0x08, if over { 2 } else { 1 }, 0x12, limit_msg.len() as u8];
        status.extend(limit_msg);
        status.push(0x18);
        super::rls::tests_put_varint(&mut status, u64::from(remaining));
        let mut out = vec![0x08, if over { 2 } else { 1 }, 0x12, status.len() as u8];
        out.extend(status);
        out
    }

    #[test]
    fn usd_budgets_reserve_their_cost_in_units_and_net_what_was_not_spent() {
        let c = budget();
        // 100 input + 200 output tokens at 10 / 30 USD per 1M: 0.007 USD = 70 units of 0.0001.
        let estimate = Usage { input: 100, output: 200, ..Usage::default() };
        let mut ledger = Ledger::default();
        let (found, _) = charges(&Host(vec![]), &c, Some("m"), &estimate, &ledger);
        let team = &found[0];
        assert_eq!(team.hits, 70);
        // The month travels as a `period` entry; the unit asked is a year (longer than any month).
        assert_eq!(team.descriptor.entries[2], ("period", "1970-01-01".to_string()));
        assert_eq!(team.descriptor.limit, Some((50_000, Unit::Year)));
        assert_eq!(found[1].descriptor.limit, Some((10_000, Unit::Week)));
        assert_eq!(
            team.request(&c).unwrap().message,
            rls::encode_request("llm", std::slice::from_ref(&team.descriptor), 70)
        );
        let price = c.pricing.get("m");
        // It cost 0.0025 USD (25 units): nothing to report, 45 units of credit...
        let real = Usage { input: 100, output: 50, ..Usage::default() };
        assert_eq!(team.report(&c, &real, price, &mut ledger), None);
        // ...which the next request's real cost (80 units, 70 reserved) uses: 35 left.
        let dear = Usage { input: 200, output: 200, ..Usage::default() };
        assert_eq!(team.report(&c, &dear, price, &mut ledger), None);
        // A request that cost 200 units: 70 reserved + 35 credit, 95 reported.
        let dearer = Usage { input: 200, output: 600, ..Usage::default() };
        let report = team.report(&c, &dearer, price, &mut ledger).unwrap();
        assert_eq!(
            (report.hits, report.message.clone()),
            (95, rls::encode_request("llm", std::slice::from_ref(&team.descriptor), 95))
        );
        // Fractions of a unit: 0.00015 USD reserved as 2 units, cost 0.00025 (2.5 units): 1 more
        // unit, and the half unit over is credit for next time.
        let (small, _) = charges(&Host(vec![]), &c, Some("m"), &Usage { input: 15, ..Usage::default() }, &ledger);
        assert_eq!(small[0].hits, 2);
        let r = small[0].report(&c, &Usage { input: 25, ..Usage::default() }, price, &mut ledger).unwrap();
        assert_eq!(r.hits, 1);
        // 1.5 units against 2 reserved and half a unit of credit: nothing; 1 unit of credit.
        assert_eq!(small[0].report(&c, &Usage { input: 15, ..Usage::default() }, price, &mut ledger), None);
        let r = small[0].report(&c, &Usage { input: 40, ..Usage::default() }, price, &mut ledger).unwrap();
        assert_eq!(r.hits, 1, "4 units against 2 reserved and 1 of credit");
        // A failed request (cost 0) leaves its whole reservation as credit; an unpriced model too.
        assert_eq!(small[0].report(&c, &Usage::default(), price, &mut ledger), None);
        // Reservations never ask more than the service last said is left; at least 1 unit.
        team.learn(
            &c,
            &mut ledger,
            Some(&rls::Status { code: Code::Ok, limit: Some(50_000), remaining: 30, reset_ms: None }),
        );
        let (found, _) = charges(&Host(vec![]), &c, Some("m"), &estimate, &ledger);
        assert_eq!(found[0].hits, 30);
        team.learn(
            &c,
            &mut ledger,
            Some(&rls::Status { code: Code::Ok, limit: Some(50_000), remaining: 0, reset_ms: None }),
        );
        let (found, _) = charges(&Host(vec![]), &c, Some("m"), &estimate, &ledger);
        assert_eq!(found[0].hits, 1);
        // An unpriced model reserves 1 unit (the protocol's least).
        let (found, _) = charges(&Host(vec![]), &c, Some("free"), &estimate, &Ledger::default());
        assert_eq!(found[0].hits, 1);
    }

    #[test]
    fn the_ledger_forgets_a_window_that_ended() {
        let d = Descriptor { entries: vec![("rule", "r".into())], limit: None };
        let mut ledger = Ledger::default();
        assert_eq!(ledger.settle(&d, 7, 100, 10, 1), 0);
        assert_eq!(ledger.settle(&d, 7, 0, 50, 1), 0, "90 of credit");
        assert_eq!(ledger.settle(&d, 8, 0, 50, 1), 50, "a new window: the credit was the old counter's");
        ledger.learn(&d, 8, 3);
        assert_eq!((ledger.remaining(&d, 8), ledger.remaining(&d, 9)), (Some(3), None));
    }

    #[test]
    fn usd_answers_in_usd_and_shadow_rules_never_reject() {
        let c = budget();
        let estimate = Usage { input: 100, output: 200, ..Usage::default() };
        let (found, _) = charges(&Host(vec![]), &c, Some("m"), &estimate, &Ledger::default());
        // Over the limit with 12 units (0.0012 USD) left: a 429 in USD terms, resetting at the end
        // of the calendar month (January 1970 here: 31 days from day 0), not the service's year.
        let Answer::Reject(r) = answer(&c, &found[0], Ok(&status_answer(true, 50_000, 12)), 0) else { panic!() };
        let h = |n: &str| r.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(h("x-ratelimit-limit-usd"), Some("5"));
        assert_eq!(h("x-ratelimit-remaining-usd"), Some("0.0012"));
        assert_eq!(h("retry-after"), Some((31 * 86_400).to_string().as_str()));
        assert!(r.body.contains("5 USD per month"), "{}", r.body);
        // The shadow rule's OVER_LIMIT lets the request through.
        assert!(matches!(answer(&c, &found[1], Ok(&status_answer(true, 10_000, 0)), 0), Answer::Shadow(Some(_))));
        // What an answer shows: 40,000 of 50,000 units used after these 70: warn_at 0.8 crossed.
        let status = rls::decode_response(&status_answer(false, 50_000, 10_000)).unwrap().statuses[0];
        let seen = seen(&c, 0, "global", 70, &status, 0, found[0].window_end_ms()).unwrap();
        assert_eq!(seen.amounts, (4_000_000_000_000, 5_000_000_000_000));
        assert_eq!(c.limits.rules[0].gauge_value(seen.amounts.0), 4_000_000, "micro-USD");
        assert!(seen.crossed && seen.warned);
        let status = rls::decode_response(&status_answer(false, 50_000, 9_000)).unwrap().statuses[0];
        let later = super::seen(&c, 0, "global", 70, &status, 0, None).unwrap();
        assert!(!later.crossed && later.warned, "crossed once");
        let shown = later.shown.unwrap();
        assert!(shown.headers().contains(&("x-ratelimit-remaining-usd", "0.9".to_string())));
    }

    #[test]
    fn answers() {
        let c = config();
        let (found, _) = charges(&Host(vec![]), &c, Some("gpt-4o"), &Usage::default(), &Ledger::default());
        let (rpm, tpm) = (&found[0], &found[1]);
        let ok = [0x08, 1];
        assert_eq!(answer(&c, rpm, Ok(&ok), 0), Answer::Admit(None));
        assert_eq!(answer(&c, rpm, Err(()), 0), Answer::Failed);
        assert_eq!(answer(&c, rpm, Ok(&[0x08]), 0), Answer::Failed, "truncated");
        assert_eq!(answer(&c, rpm, Ok(&[]), 0), Answer::Failed, "UNKNOWN");
        // OVER_LIMIT with a status: remaining 0, reset in 42 s.
        let over = [0x08, 2, 0x12, 8, 0x08, 2, 0x18, 0, 0x22, 2, 0x08, 42];
        let Answer::Reject(r) = answer(&c, rpm, Ok(&over), 0) else { panic!() };
        assert_eq!((r.status, r.rule.as_str()), (429, "rpm"));
        let h = |n: &str| r.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(h("retry-after"), Some("42"));
        assert_eq!(h("x-ratelimit-limit-requests"), Some("300"));
        assert_eq!(h("x-ratelimit-remaining-requests"), Some("0"));
        assert!(r.body.contains("\"code\":\"rpm\""), "{}", r.body);
        // Without a status: the window's end.
        let Answer::Reject(r) = answer(&c, tpm, Ok(&[0x08, 2]), 3_600_000 + 600_000) else { panic!() };
        assert!(r.headers.contains(&("retry-after".to_string(), "3000".to_string())), "{:?}", r.headers);
        assert!(r.headers.iter().any(|(k, _)| k == "x-ratelimit-limit-tokens"));
    }
}
