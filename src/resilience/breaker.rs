//! One model's circuit, in Envoy's shared data so that every worker sees one state.
//!
//! The value is `open_until_ms ‖ probe_since_ms (u64 LE) ‖ failures ‖ probes (u32 LE)`, updated
//! by compare-and-swap like the rate-limit buckets ([`crate::limit::limiter`]): read, compute,
//! write with the token read, re-read on a conflict. The state is derived from it and the
//! clock:
//! - **closed**: `open_until_ms` is 0. `failures` counts consecutive failures; reaching the
//!   threshold opens the circuit.
//! - **open**: `now < open_until_ms`. Requests go elsewhere (a fallback) or are answered 503.
//! - **half-open**: `open_until_ms` has passed. Up to `half_open_requests` requests are let
//!   through as probes (`probes`, counted from `probe_since_ms`); a probe's success closes the
//!   circuit, its failure opens it again for another `open_seconds`. A probe that never
//!   reports (its VM failed) frees its place after `open_seconds`, so a model cannot stay
//!   half-open for good.
//!
//! Half-open needs no write to enter: the first probe records it. So a request to a closed
//! model costs one shared-data read, and a success on a model without failures no write.

use crate::meter::labels::{cas_update, SharedStore};

/// How often a compare-and-swap is retried before giving up (the request then goes through
/// as if the circuit were closed: fail-open).
const CAS_RETRIES: usize = 64;

/// What a circuit's configuration says (see `resilience.circuit_breaker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Consecutive failures that open it.
    pub failures: u32,
    /// How long it stays open, ms.
    pub open_ms: u64,
    /// Probes let through while half-open.
    pub half_open_requests: u32,
}

/// A circuit's stored value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Circuit {
    /// 0 when closed; else when it stops being open.
    pub open_until_ms: u64,
    /// When the current half-open period's first probe went.
    pub probe_since_ms: u64,
    /// Consecutive failures while closed.
    pub failures: u32,
    /// Probes let through in the current half-open period.
    pub probes: u32,
}

/// A circuit's state as seen at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Traffic flows.
    Closed,
    /// Probes may go.
    HalfOpen,
    /// No traffic until the given time (ms).
    Open,
}

impl State {
    /// The `state` label and `model_state` gauge value.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    /// The `model_state` gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> u64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

impl Circuit {
    /// The state at `now_ms`.
    pub fn state(&self, now_ms: u64) -> State {
        match self.open_until_ms {
            0 => State::Closed,
            until if now_ms < until => State::Open,
            _ => State::HalfOpen,
        }
    }

    fn decode(bytes: &[u8]) -> Option<Circuit> {
        let u64_at = |i: usize| Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?));
        let u32_at = |i: usize| Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?));
        (bytes.len() == 24).then_some(())?;
        Some(Circuit {
            open_until_ms: u64_at(0)?,
            probe_since_ms: u64_at(8)?,
            failures: u32_at(16)?,
            probes: u32_at(20)?,
        })
    }

    fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        let parts: [&[u8]; 4] = [
            &self.open_until_ms.to_le_bytes(),
            &self.probe_since_ms.to_le_bytes(),
            &self.failures.to_le_bytes(),
            &self.probes.to_le_bytes(),
        ];
        let mut at = 0;
        for p in parts {
            if let Some(slot) = out.get_mut(at..at + p.len()) {
                slot.copy_from_slice(p);
            }
            at += p.len();
        }
        out
    }
}

/// The shared store failed, or kept conflicting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreFailed;

/// Read-modify-write of `key` with compare-and-swap (see [`cas_update`]): `f` gets the circuit
/// (default when the key does not exist) and returns the new one, or `None` to leave it.
/// Returns what was read and what was written.
fn update<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    mut f: impl FnMut(Circuit) -> Option<Circuit>,
) -> Result<(Circuit, Option<Circuit>), StoreFailed> {
    let (read, written) =
        cas_update(store, key, CAS_RETRIES, Circuit::decode, Circuit::encode, |c| f(c.unwrap_or_default()))
            .map_err(|_| StoreFailed)?;
    Ok((read.unwrap_or_default(), written))
}

/// May a request go to this model?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Closed: go. `failures`: the count seen, so a success with none to reset writes nothing.
    Closed {
        /// Consecutive failures seen when admitted.
        failures: u32,
    },
    /// Half-open and this request took a probe's place. `first`: it entered half-open.
    Probe {
        /// This request's probe started the half-open period.
        first: bool,
    },
    /// Open (or half-open with every probe's place taken) until `until_ms`.
    Open {
        /// When a request may be let through again (the end of the open period, or when a
        /// lost probe's place is freed).
        until_ms: u64,
    },
}

/// Asks whether a request may go to the model of `key` at `now_ms`: one shared-data read when
/// closed or open, a compare-and-swap to take a probe's place when half-open.
pub fn admit<S: SharedStore + ?Sized>(store: &S, key: &str, p: Params, now_ms: u64) -> Result<Admit, StoreFailed> {
    let mut verdict = Admit::Closed { failures: 0 };
    update(store, key, |c| match c.state(now_ms) {
        State::Closed => {
            verdict = Admit::Closed { failures: c.failures };
            None
        }
        State::Open => {
            verdict = Admit::Open { until_ms: c.open_until_ms };
            None
        }
        State::HalfOpen => {
            // A period whose probes never reported (their VM died) is over after open_ms.
            let lost = c.probes > 0 && now_ms >= c.probe_since_ms.saturating_add(p.open_ms);
            let probes = if lost { 0 } else { c.probes };
            if probes >= p.half_open_requests {
                verdict = Admit::Open { until_ms: c.probe_since_ms.saturating_add(p.open_ms) };
                return None;
            }
            verdict = Admit::Probe { first: c.probes == 0 && !lost };
            let since = if probes == 0 { now_ms } else { c.probe_since_ms };
            Some(Circuit { probes: probes + 1, probe_since_ms: since, ..c })
        }
    })?;
    Ok(verdict)
}

/// How an admitted request ended, for its model's circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded.
    Success,
    /// It failed in a class the breaker counts.
    Failure,
    /// The upstream said how long to stay away (a 429 with `retry-after` or a reset time):
    /// the circuit opens until then, whatever the failure count.
    ComeBackAfter {
        /// Milliseconds from now.
        ms: u64,
    },
    /// Neither (a class the breaker does not count, a client that went away).
    Neutral,
}

/// Records how a request to the model of `key` ended. `admitted`: what [`admit`] said for it.
/// Returns the state the circuit entered, if this changed it. A success of a closed model
/// that had no failures, and a neutral outcome, cost no shared-data access at all.
pub fn report<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    p: Params,
    now_ms: u64,
    admitted: Admit,
    outcome: Outcome,
) -> Result<Option<State>, StoreFailed> {
    let probe = matches!(admitted, Admit::Probe { .. });
    match (outcome, admitted) {
        (Outcome::Neutral, _) | (_, Admit::Open { .. }) => return Ok(None),
        (Outcome::Success, Admit::Closed { failures: 0 }) => return Ok(None),
        _ => {}
    }
    let mut entered = None;
    update(store, key, |c| {
        entered = None;
        let state = c.state(now_ms);
        match outcome {
            Outcome::Neutral => None,
            Outcome::Success => match state {
                // The probe succeeded: closed, counting afresh.
                State::HalfOpen if probe => {
                    entered = Some(State::Closed);
                    Some(Circuit::default())
                }
                State::Closed if c.failures > 0 => Some(Circuit { failures: 0, ..c }),
                _ => None,
            },
            Outcome::Failure | Outcome::ComeBackAfter { .. } => {
                let after = match outcome {
                    Outcome::ComeBackAfter { ms } => Some(now_ms.saturating_add(ms.max(1))),
                    _ => None,
                };
                let open_for =
                    |until: u64| Circuit { open_until_ms: until.max(1), probe_since_ms: 0, failures: 0, probes: 0 };
                match state {
                    State::Closed => {
                        let failures = c.failures.saturating_add(1);
                        if failures >= p.failures || after.is_some() {
                            entered = Some(State::Open);
                            Some(open_for(after.unwrap_or(now_ms.saturating_add(p.open_ms))))
                        } else {
                            Some(Circuit { failures, ..c })
                        }
                    }
                    // A probe failed: open for another period (or as long as the upstream said).
                    State::HalfOpen if probe => {
                        entered = Some(State::Open);
                        Some(open_for(after.unwrap_or(now_ms.saturating_add(p.open_ms))))
                    }
                    // Already open: an upstream that asks for a longer pause gets it.
                    State::Open => match after {
                        Some(until) if until > c.open_until_ms => Some(Circuit { open_until_ms: until, ..c }),
                        _ => None,
                    },
                    State::HalfOpen => None,
                }
            }
        }
    })?;
    Ok(entered)
}

/// The circuit of `key` as stored (closed when absent or unreadable), for gauges and tests.
pub fn read<S: SharedStore + ?Sized>(store: &S, key: &str) -> Circuit {
    store.get(key).and_then(|(bytes, _)| Circuit::decode(&bytes)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::labels::tests::FakeStore;

    const P: Params = Params { failures: 3, open_ms: 30_000, half_open_requests: 1 };

    fn closed(f: u32) -> Admit {
        Admit::Closed { failures: f }
    }

    #[test]
    fn consecutive_failures_open_a_success_resets_and_closed_successes_write_nothing() {
        let s = FakeStore::default();
        let k = "cb.m";
        assert_eq!(admit(&s, k, P, 0), Ok(closed(0)));
        assert_eq!(report(&s, k, P, 1, closed(0), Outcome::Success), Ok(None));
        assert!(s.get(k).is_none(), "nothing written for a success without failures");
        assert_eq!(report(&s, k, P, 1, closed(0), Outcome::Failure), Ok(None));
        assert_eq!(report(&s, k, P, 2, closed(0), Outcome::Failure), Ok(None));
        assert_eq!(admit(&s, k, P, 3), Ok(closed(2)));
        // A success between failures resets the count.
        assert_eq!(report(&s, k, P, 3, closed(2), Outcome::Success), Ok(None));
        assert_eq!(read(&s, k).failures, 0);
        for t in 0..2 {
            assert_eq!(report(&s, k, P, 10 + t, closed(0), Outcome::Failure), Ok(None));
        }
        assert_eq!(report(&s, k, P, 20, closed(2), Outcome::Failure), Ok(Some(State::Open)));
        assert_eq!(admit(&s, k, P, 21), Ok(Admit::Open { until_ms: 30_020 }));
        // Failures of requests admitted before it opened change nothing more.
        assert_eq!(report(&s, k, P, 22, closed(2), Outcome::Failure), Ok(None));
        assert_eq!(read(&s, k).open_until_ms, 30_020);
        // Neutral outcomes are not counted.
        let t = FakeStore::default();
        assert_eq!(report(&t, k, P, 0, closed(0), Outcome::Neutral), Ok(None));
        assert!(t.get(k).is_none());
    }

    #[test]
    fn half_open_lets_probes_through_and_their_outcome_decides() {
        let s = FakeStore::default();
        let k = "cb.m";
        report(&s, k, Params { failures: 1, ..P }, 0, closed(0), Outcome::Failure).unwrap();
        assert_eq!(Circuit::default().state(0), State::Closed);
        assert_eq!(read(&s, k).state(29_999), State::Open);
        assert_eq!(read(&s, k).state(30_000), State::HalfOpen);
        // One probe's place; a second request waits.
        let probe = admit(&s, k, P, 30_000).unwrap();
        assert_eq!(probe, Admit::Probe { first: true });
        assert_eq!(admit(&s, k, P, 30_001), Ok(Admit::Open { until_ms: 60_000 }));
        // The probe fails: open for another period.
        assert_eq!(report(&s, k, P, 30_100, probe, Outcome::Failure), Ok(Some(State::Open)));
        assert_eq!(admit(&s, k, P, 30_101), Ok(Admit::Open { until_ms: 60_100 }));
        // Next period: the probe succeeds and closes it.
        let probe = admit(&s, k, P, 60_100).unwrap();
        assert_eq!(report(&s, k, P, 60_200, probe, Outcome::Success), Ok(Some(State::Closed)));
        assert_eq!(read(&s, k), Circuit::default());
        assert_eq!(admit(&s, k, P, 60_201), Ok(closed(0)));
    }

    #[test]
    fn several_probes_and_a_lost_probe() {
        let s = FakeStore::default();
        let k = "cb.m";
        let p = Params { half_open_requests: 2, ..P };
        report(&s, k, Params { failures: 1, ..p }, 0, closed(0), Outcome::Failure).unwrap();
        assert_eq!(admit(&s, k, p, 30_000), Ok(Admit::Probe { first: true }));
        assert_eq!(admit(&s, k, p, 30_001), Ok(Admit::Probe { first: false }));
        assert_eq!(admit(&s, k, p, 30_002), Ok(Admit::Open { until_ms: 60_000 }));
        // Neither probe reported (their VM failed): after open_ms their places are free again.
        assert_eq!(admit(&s, k, p, 60_000), Ok(Admit::Probe { first: false }));
        assert_eq!(read(&s, k).probes, 1);
    }

    #[test]
    fn an_upstream_that_says_when_to_come_back_opens_until_then() {
        let s = FakeStore::default();
        let k = "cb.m";
        // Even with no failure before (threshold 3), for exactly as long as it said.
        assert_eq!(report(&s, k, P, 1000, closed(0), Outcome::ComeBackAfter { ms: 3000 }), Ok(Some(State::Open)));
        assert_eq!(admit(&s, k, P, 3999), Ok(Admit::Open { until_ms: 4000 }));
        // A longer pause asked while open extends it; a shorter one does not shorten it.
        report(&s, k, P, 1500, closed(0), Outcome::ComeBackAfter { ms: 10_000 }).unwrap();
        assert_eq!(read(&s, k).open_until_ms, 11_500);
        report(&s, k, P, 1600, closed(0), Outcome::ComeBackAfter { ms: 10 }).unwrap();
        assert_eq!(read(&s, k).open_until_ms, 11_500);
    }

    #[test]
    fn conflicts_are_retried_and_broken_stores_reported() {
        let s = FakeStore::default();
        s.conflicts.set(CAS_RETRIES - 1);
        assert_eq!(report(&s, "k", Params { failures: 1, ..P }, 0, closed(0), Outcome::Failure), Ok(Some(State::Open)));
        s.conflicts.set(CAS_RETRIES);
        assert_eq!(report(&s, "k2", P, 0, closed(0), Outcome::Failure), Err(StoreFailed));
        s.set("bad", b"garbage", None).unwrap();
        assert_eq!(admit(&s, "bad", P, 0), Err(StoreFailed));
        assert_eq!(read(&s, "bad"), Circuit::default());
    }
}
