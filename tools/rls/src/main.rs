//! llm-rls: Envoy's rate limit service (`envoy.service.ratelimit.v3.RateLimitService`) on top of
//! Limitador's Redis storage. Every instance pointed at the same Redis shares every counter, so
//! several Envoys (each calling its nearest instance, or one shared one) enforce one limit.
//!
//! ```text
//! llm-rls [--listen 127.0.0.1:8081] [--redis redis://127.0.0.1:6379]
//! ```
//! `--listen 127.0.0.1:0` picks a free port; the first line on stdout is always
//! `listening on HOST:PORT`.
//!
//! Limits come from the requests: llm-meter sends each rule's limit as the descriptor's `limit`
//! override (`requests_per_unit` per `unit`), and the descriptor's entries (`rule`, `key`,
//! `model`, `period`) qualify the counter. A descriptor without an override has no limit here
//! and is answered OK, as envoyproxy/ratelimit answers descriptors it has no limit for.
//!
//! Counting follows envoyproxy/ratelimit: every hit is added, also those over the limit, and a
//! request is over the limit when its hits do not fit. That is what makes usage reports work: a
//! report of 1,500 tokens against a limit of 1,000 is recorded (and answered OVER_LIMIT), and the
//! next request is refused. Limitador's windows start at a counter's first hit.
//!
//! Units (see `unit_seconds`): SECOND 1, MINUTE 2, HOUR 3, DAY 4, MONTH 5 (30 days), YEAR 6
//! (365 days) and WEEK 7 (7 days, the number `RateLimitResponse.RateLimit.Unit` gives it).
//! Calendar windows (a day, a week, a month) are not Limitador's to know: llm-meter sends them
//! as a `period` descriptor entry naming the window (`period=2026-11-01`), so each calendar
//! window is a counter of its own, and asks for a unit at least as long as the window (day →
//! DAY, week → WEEK, month → YEAR). A counter's first hit falls inside its period, so its
//! Limitador window (first hit + unit) never ends before the period does, whatever day the
//! period's first request came; the next period is another counter, and Redis expires the old
//! one when its window ends (a month's, asked for as YEAR, a year after its first hit).
//! That relies on windows that start at the first hit: envoyproxy/ratelimit aligns its windows
//! to the Unix epoch instead (a WEEK there turns over on Thursdays 00:00 UTC, a YEAR every 365
//! days from 1970), so only its DAY matches a calendar day, and only a UTC one.
//!
//! Limitador 0.6 checks a counter and then increments it, two Redis round trips that are not one
//! atomic step, so two concurrent hits could both see room for one. This service therefore
//! serializes check-and-add per counter (a lock per counter hash): exact for every Envoy that
//! calls one instance. Several instances sharing a Redis can admit a few hits too many at a
//! window's edge (envoyproxy/ratelimit, whose increment is atomic, does not).
//!
//! A Redis failure is a gRPC `UNAVAILABLE`; the caller's `failure_mode` decides.

mod proto;

use limitador::limit::Limit;
use limitador::storage::redis::AsyncRedisStorage;
use limitador::AsyncRateLimiter;
use proto::{
    DescriptorStatus, Duration as PbDuration, RateLimit, RateLimitDescriptor, RateLimitRequest, RateLimitResponse,
};
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};

const USAGE: &str = "usage: llm-rls [--listen HOST:PORT] [--redis URL]";

/// `RateLimitResponse.Code`.
const OK: i32 = 1;
const OVER_LIMIT: i32 = 2;

/// Seconds per unit of a descriptor's `limit` override. The override's field is an
/// `envoy.type.v3.RateLimitUnit` (SECOND 1 … DAY 4, MONTH 5, YEAR 6), which has no week;
/// `RateLimitResponse.RateLimit.Unit` in `rls.proto` has `WEEK = 7` (Envoy #37494, December
/// 2024), and envoyproxy/ratelimit reads an override's number as that enum (so 7 is a week
/// there too, since its #812). A month is 30 days and a year 365, as in envoyproxy/ratelimit:
/// calendar windows are the caller's (see the crate docs).
fn unit_seconds(unit: i32) -> Option<u64> {
    const DAY: u64 = 86_400;
    Some(match unit {
        1 => 1,
        2 => 60,
        3 => 3_600,
        4 => DAY,
        5 => 30 * DAY,
        6 => 365 * DAY,
        7 => 7 * DAY,
        _ => return None,
    })
}

/// Locks serializing check-and-add, by counter hash (see the crate docs).
const LOCKS: usize = 64;

#[derive(Clone)]
struct Rls {
    limiter: Arc<AsyncRateLimiter>,
    locks: Arc<Vec<tokio::sync::Mutex<()>>>,
    /// The limits given to the limiter, by [`identity`]: each is added once (see [`Rls::register`]).
    registered: Arc<std::sync::Mutex<HashSet<String>>>,
}

/// What makes two limits the same, in an order that does not depend on a hash set's iteration.
fn identity(limit: &Limit) -> String {
    let mut conditions: Vec<String> = limit.conditions().into_iter().collect();
    let mut variables: Vec<String> = limit.variables().into_iter().collect();
    conditions.sort();
    variables.sort();
    format!("{:?} {} {} {conditions:?} {variables:?}", limit.namespace(), limit.seconds(), limit.max_value())
}

impl Rls {
    /// The limit a descriptor asks for (its override), qualified by every entry key and
    /// restricted to the descriptor's `rule`, so two rules never share a counter.
    /// `Err`: why the descriptor is invalid.
    fn limit(domain: &str, d: &RateLimitDescriptor) -> Result<Option<Limit>, String> {
        let Some(o) = &d.limit else { return Ok(None) };
        let seconds = unit_seconds(o.unit).ok_or_else(|| format!("unknown rate limit unit {}", o.unit))?;
        let mut conditions = Vec::new();
        let mut variables = Vec::new();
        for e in &d.entries {
            if e.key.is_empty() || !e.key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("descriptor key {:?}: only [A-Za-z0-9_] is supported", e.key));
            }
            if e.key == "rule" {
                // Limitador's condition strings have no escapes: rule names are plain.
                if e.value.is_empty() || !e.value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                    return Err(format!("rule {:?}: only [A-Za-z0-9_-] is supported", e.value));
                }
                conditions.push(format!("rule == '{}'", e.value));
            } else {
                variables.push(e.key.clone());
            }
        }
        let max = i64::from(o.requests_per_unit);
        let limit = Limit::new(domain, max, seconds, conditions.iter().map(String::as_str), variables);
        Ok(Some(limit))
    }

    /// Gives `limit` to the limiter the first time it is seen. Limitador 0.6 hashes a limit's
    /// variables in the iteration order of their `HashSet`, which differs between two equal
    /// limits: adding the same limit with two or more variables (`key` and `model`, `key` and
    /// `period`) on every request stored it once per order, and each copy counted every hit
    /// (seen: 6,000 counted for 3,000 tokens).
    fn register(&self, limit: Limit) {
        let id = identity(&limit);
        let mut registered = self.registered.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if registered.insert(id) {
            self.limiter.add_limit(limit);
        }
    }

    async fn should_rate_limit(&self, req: RateLimitRequest) -> Result<RateLimitResponse, tonic::Status> {
        if req.domain.is_empty() {
            return Err(tonic::Status::invalid_argument("domain is required"));
        }
        let hits = i64::from(req.hits_addend.max(1));
        let mut response = RateLimitResponse { overall_code: OK, statuses: Vec::new() };
        for d in &req.descriptors {
            let Some(limit) = Self::limit(&req.domain, d).map_err(tonic::Status::invalid_argument)? else {
                response.statuses.push(DescriptorStatus { code: OK, ..Default::default() });
                continue;
            };
            let (max, unit) = (limit.max_value(), d.limit.as_ref().map_or(0, |o| o.unit));
            self.register(limit);
            let values: HashMap<String, String> = d.entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect();
            let namespace = req.domain.as_str().into();
            let unavailable = |e: limitador::errors::LimitadorError| tonic::Status::unavailable(e.to_string());
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (&req.domain, &d.entries.iter().map(|e| (&e.key, &e.value)).collect::<Vec<_>>()).hash(&mut hasher);
            let lock =
                self.locks.get(hasher.finish() as usize % LOCKS).ok_or_else(|| tonic::Status::internal("lock"))?;
            let _serialized = lock.lock().await;
            let result = self
                .limiter
                .check_rate_limited_and_update(&namespace, &values, hits, true)
                .await
                .map_err(unavailable)?;
            if result.limited {
                // Counted anyway (see the crate docs): usage reports must land.
                self.limiter.update_counters(&namespace, &values, hits).await.map_err(unavailable)?;
                response.overall_code = OVER_LIMIT;
            }
            let counter = result.counters.iter().find(|c| c.max_value() == max);
            response.statuses.push(DescriptorStatus {
                code: if result.limited { OVER_LIMIT } else { OK },
                current_limit: Some(RateLimit {
                    name: String::new(),
                    requests_per_unit: u32::try_from(max.max(0)).unwrap_or(u32::MAX),
                    unit,
                }),
                limit_remaining: counter
                    .and_then(|c| c.remaining())
                    .map_or(0, |r| u32::try_from(r.max(0)).unwrap_or(u32::MAX)),
                duration_until_reset: counter.and_then(|c| c.expires_in()).map(|d| PbDuration {
                    seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
                }),
            });
        }
        Ok(response)
    }
}

/// The gRPC routing tonic's code generator would write for this one-method service.
#[derive(Clone)]
struct RlsServer(Rls);

impl tonic::server::NamedService for RlsServer {
    const NAME: &'static str = "envoy.service.ratelimit.v3.RateLimitService";
}

impl<B> Service<http::Request<B>> for RlsServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::BoxBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        struct Unary(Rls);
        impl tonic::server::UnaryService<RateLimitRequest> for Unary {
            type Response = RateLimitResponse;
            type Future = BoxFuture<tonic::Response<RateLimitResponse>, tonic::Status>;
            fn call(&mut self, request: tonic::Request<RateLimitRequest>) -> Self::Future {
                let rls = self.0.clone();
                Box::pin(async move { rls.should_rate_limit(request.into_inner()).await.map(tonic::Response::new) })
            }
        }
        let rls = self.0.clone();
        if req.uri().path() == "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" {
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic::codec::ProstCodec::default());
                Ok(grpc.unary(Unary(rls), req).await)
            })
        } else {
            Box::pin(async move { Ok(tonic::Status::unimplemented("only ShouldRateLimit").into_http()) })
        }
    }
}

struct Args {
    listen: String,
    redis: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { listen: "127.0.0.1:8081".into(), redis: "redis://127.0.0.1:6379".into() };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => args.listen = it.next().ok_or("--listen needs HOST:PORT")?,
            "--redis" => args.redis = it.next().ok_or("--redis needs a URL")?,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let storage = match AsyncRedisStorage::new(&args.redis).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("llm-rls: cannot connect to Redis at {}: {e}", args.redis);
            std::process::exit(1);
        }
    };
    let rls = Rls {
        limiter: Arc::new(AsyncRateLimiter::new_with_storage(Box::new(storage))),
        locks: Arc::new((0..LOCKS).map(|_| tokio::sync::Mutex::new(())).collect()),
        registered: Arc::new(std::sync::Mutex::new(HashSet::new())),
    };
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("llm-rls: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    println!("listening on {addr}");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let serve = tonic::transport::Server::builder().add_service(RlsServer(rls)).serve_with_incoming(incoming);
    tokio::select! {
        r = serve => if let Err(e) = r { eprintln!("llm-rls: {e}"); std::process::exit(1); },
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_meter::limit::rls as filter;
    use prost::Message;
    use proto::{Entry, RateLimitOverride};

    fn descriptor(entries: &[(&str, &str)], limit: Option<(u32, i32)>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
            limit: limit.map(|(n, unit)| RateLimitOverride { requests_per_unit: n, unit }),
        }
    }

    #[test]
    fn the_filters_requests_decode_as_protobuf() {
        let d = filter::Descriptor {
            entries: vec![("rule", "key-tpm".into()), ("key", "0f".repeat(16)), ("model", "gpt-4o".into())],
            limit: Some((2_000_000, filter::Unit::Minute)),
        };
        let bytes = filter::encode_request("llm", &[d], 1499);
        let got = RateLimitRequest::decode(bytes.as_slice()).unwrap();
        let want = RateLimitRequest {
            domain: "llm".into(),
            descriptors: vec![descriptor(
                &[("rule", "key-tpm"), ("key", &"0f".repeat(16)), ("model", "gpt-4o")],
                Some((2_000_000, 2)),
            )],
            hits_addend: 1499,
        };
        assert_eq!(got, want);
    }

    #[test]
    fn this_services_responses_decode_in_the_filter() {
        let response = RateLimitResponse {
            overall_code: OVER_LIMIT,
            statuses: vec![DescriptorStatus {
                code: OVER_LIMIT,
                current_limit: Some(RateLimit { name: "x".into(), requests_per_unit: 600, unit: 2 }),
                limit_remaining: 0,
                duration_until_reset: Some(PbDuration { seconds: 17, nanos: 250_000_000 }),
            }],
        };
        let got = filter::decode_response(&response.encode_to_vec()).unwrap();
        assert_eq!(got.overall, filter::Code::OverLimit);
        assert_eq!(
            got.statuses,
            vec![filter::Status {
                code: filter::Code::OverLimit,
                limit: Some(600),
                remaining: 0,
                reset_ms: Some(17_250)
            }]
        );
        let ok = RateLimitResponse { overall_code: OK, statuses: vec![] };
        assert_eq!(filter::decode_response(&ok.encode_to_vec()).unwrap().overall, filter::Code::Ok);
    }

    #[test]
    fn equal_limits_have_one_identity_whatever_their_sets_order() {
        let d = descriptor(&[("rule", "r"), ("key", "k"), ("model", "m"), ("period", "2026-11-01")], Some((9, 6)));
        let first = identity(&Rls::limit("llm", &d).unwrap().unwrap());
        for _ in 0..50 {
            assert_eq!(identity(&Rls::limit("llm", &d).unwrap().unwrap()), first);
        }
        let other = descriptor(&[("rule", "r"), ("key", "k")], Some((9, 6)));
        assert_ne!(identity(&Rls::limit("llm", &other).unwrap().unwrap()), first);
    }

    #[test]
    fn limits_come_from_the_override_and_are_qualified_by_the_entries() {
        let d = descriptor(&[("rule", "key-rpm"), ("key", "abc"), ("model", "m")], Some((60, 2)));
        let limit = Rls::limit("llm", &d).unwrap().unwrap();
        assert_eq!((limit.max_value(), limit.seconds()), (60, 60));
        let mut vars: Vec<String> = limit.variables().into_iter().collect();
        vars.sort();
        assert_eq!(vars, vec!["key".to_string(), "model".to_string()]);
        assert_eq!(Rls::limit("llm", &descriptor(&[("rule", "r")], None)), Ok(None), "no override: no limit here");
        assert!(Rls::limit("llm", &descriptor(&[("rule", "r")], Some((1, 9)))).unwrap_err().contains("unit"));
        assert!(Rls::limit("llm", &descriptor(&[("rule", "r")], Some((1, 0)))).unwrap_err().contains("unit"));
        assert!(Rls::limit("llm", &descriptor(&[("rule", "r'x")], Some((1, 1)))).unwrap_err().contains("rule"));
        assert!(Rls::limit("llm", &descriptor(&[("a.b", "x")], Some((1, 1)))).unwrap_err().contains("descriptor key"));
    }

    #[test]
    fn every_unit_of_the_protocol_has_its_length_week_included() {
        const DAY: u64 = 86_400;
        let units = [(1, 1), (2, 60), (3, 3_600), (4, DAY), (5, 30 * DAY), (6, 365 * DAY), (7, 7 * DAY)];
        for (unit, seconds) in units {
            assert_eq!(unit_seconds(unit), Some(seconds), "unit {unit}");
        }
        assert_eq!(unit_seconds(0), None, "UNKNOWN");
        assert_eq!(unit_seconds(8), None);
        // A weekly override becomes a Limitador limit of a week; the window's first day names it.
        let d = descriptor(&[("rule", "team-weekly"), ("key", "abc"), ("period", "2026-11-02")], Some((5_000, 7)));
        let limit = Rls::limit("llm", &d).unwrap().unwrap();
        assert_eq!((limit.max_value(), limit.seconds()), (5_000, 7 * DAY));
        assert!(limit.variables().contains("period"), "each calendar window is a counter of its own");
        // The unit llm-meter asks for covers its calendar window (at a fixed UTC offset: a day is
        // 24 h), the longest of each kind: a month is asked for as YEAR, since MONTH (30 days)
        // ends inside a 31-day month.
        assert_eq!(unit_seconds(4), Some(DAY));
        assert_eq!(unit_seconds(7), Some(7 * DAY));
        assert!(unit_seconds(5).unwrap() < 31 * DAY && unit_seconds(6).unwrap() >= 31 * DAY);
    }
}
