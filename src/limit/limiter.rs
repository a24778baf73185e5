//! Rate-limit buckets in proxy-wasm shared data, shared by all Envoy workers.
//!
//! Each bucket is one shared-data value, `window index (u64 LE) ‖ used (u64 LE)`, updated by
//! compare-and-swap: read, compute, write with the token read; on a conflict (another worker wrote
//! in between) read again, at most [`CAS_RETRIES`] times. So every worker sees one count and the
//! limits hold exactly however requests are spread over workers.
//!
//! Windows come from [`crate::limit::calendar`]: fixed ones aligned to the Unix epoch (a minute
//! resets at :00), calendar days, weeks and months; each has a number, stored with the count,
//! which makes "admitted per window" exact and `Retry-After` precise. Token and USD buckets are reserved with
//! an estimate at request time and reconciled with the real usage at the end ([`Limiter::release`]):
//! a response that used more than was reserved charges the difference, and whatever a window
//! ends up above its limit is carried into the next window as debt, so no usage goes unrecorded.
//!
//! Shared data is never freed, so the keys are bounded: each rule admits at most `max_keys`
//! distinct keys (a counter in shared data, CAS-incremented); later keys share one overflow bucket.

use crate::limit::calendar::Period;
use crate::meter::labels::{cas_update, decode_pair, encode_pair, SharedStore};
use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};

/// The buckets this worker has seen admitted. Admission is permanent (the bucket and the rule's
/// key count live in shared data, which is never deleted), so a bucket known to exist needs no
/// shared-data read to be admitted again: one hostcall less per rule and request. Holds 64-bit
/// hashes of bucket keys, at most `max_keys` per rule.
#[derive(Debug, Default)]
pub struct AdmittedKeys {
    seen: HashSet<u64>,
}

impl AdmittedKeys {
    fn hash(bucket: &str) -> u64 {
        let mut h = DefaultHasher::new();
        bucket.hash(&mut h);
        h.finish()
    }

    /// True when `bucket` was admitted before on this worker.
    fn contains(&self, bucket: &str) -> bool {
        self.seen.contains(&Self::hash(bucket))
    }

    /// Remembers that `bucket` is admitted.
    fn insert(&mut self, bucket: &str) {
        self.seen.insert(Self::hash(bucket));
    }
}

/// How often a compare-and-swap is retried before the limiter gives up (a limiter failure,
/// handled by `failure_mode`).
pub const CAS_RETRIES: usize = 64;

/// One bucket charge a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// Index of the rule in the configuration.
    pub rule: usize,
    /// Shared-data key of the bucket.
    pub key: String,
    /// What kind of bucket.
    pub kind: BucketKind,
    /// The limit.
    pub max: u64,
    /// Amount reserved (requests: 1; tokens; pico-USD; concurrency: 1).
    pub amount: u64,
    /// The count at which the bucket crosses its rule's `warn_at`, if it has one.
    pub warn: Option<u64>,
}

/// How a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketKind {
    /// Requests per window: charged once, never reconciled.
    Requests {
        /// The window.
        period: Period,
    },
    /// Tokens or pico-USD per window: reserved, then reconciled; excess carries over as debt.
    Metered {
        /// The window.
        period: Period,
    },
    /// In-flight requests: +1 on admission, −1 when the request ends.
    Concurrent,
}

impl BucketKind {
    /// The window `now_ms` falls in and the ms until it resets; (0, 0) for concurrency.
    fn window_at(self, now_ms: u64) -> (u64, u64) {
        match self {
            BucketKind::Requests { period } | BucketKind::Metered { period } => {
                let span = period.at(now_ms);
                (span.index, span.reset_ms(now_ms))
            }
            BucketKind::Concurrent => (0, 0),
        }
    }
}

/// A charge that was admitted, with the bucket state right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// What was charged.
    pub charge: Charge,
    /// Window the charge went to.
    pub window: u64,
    /// Left in the window after this charge.
    pub remaining: u64,
    /// Milliseconds until the window resets (0 for concurrency).
    pub reset_ms: u64,
    /// Used in the window after this charge (may exceed the limit: debt).
    pub used: u64,
    /// This charge took the bucket across its `warn_at` threshold (the first charge of a window
    /// that starts above it counts as crossing).
    pub crossed: bool,
}

/// What [`Limiter::release`] left in a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settled {
    /// Used in the current window after the release, when the bucket was written.
    pub used: Option<u64>,
    /// The reconciliation took the bucket across its `warn_at` threshold.
    pub crossed: bool,
}

/// Result of [`Limiter::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// Every charge fit; they are held until released.
    Admitted(Vec<Held>),
    /// A charge did not fit; nothing is held (earlier charges were rolled back).
    Rejected {
        /// The charge that did not fit.
        charge: Charge,
        /// Left in its window.
        remaining: u64,
        /// Milliseconds until it resets (concurrency: 0).
        reset_ms: u64,
    },
    /// The store failed for this charge; nothing is held.
    Failed {
        /// Index of the rule whose bucket could not be updated.
        rule: usize,
    },
}

/// Decoded bucket value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct State {
    window: u64,
    used: u64,
}

fn decode(bytes: &[u8]) -> Option<State> {
    decode_pair(bytes).map(|(window, used)| State { window, used })
}

fn encode(s: State) -> [u8; 16] {
    encode_pair(s.window, s.used)
}

/// The limiter failed to update shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreFailed;

/// Read-modify-write with compare-and-swap (see [`cas_update`]). `f` gets the current state
/// (`None`: the key does not exist) and returns the state to write, or `None` to leave it.
/// Returns what was read and what was written.
fn update<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    f: impl FnMut(Option<State>) -> Option<State>,
) -> Result<(Option<State>, Option<State>), StoreFailed> {
    cas_update(store, key, CAS_RETRIES, decode, |s| encode(*s), f).map_err(|_| StoreFailed)
}

/// True when a bucket going from `before` to `after` in a window crosses `warn` (`fresh`: the
/// window starts with this charge, so a window that begins above the threshold counts once).
fn crosses(warn: Option<u64>, before: u64, after: u64, fresh: bool) -> bool {
    warn.is_some_and(|t| after >= t && (before < t || fresh))
}

/// `state` as seen in window `window`: an older window is over; the window right after a
/// metered window starts with that window's excess over `max` (debt).
fn roll(state: Option<State>, window: u64, kind: BucketKind, max: u64) -> u64 {
    let Some(s) = state else { return 0 };
    if kind == BucketKind::Concurrent || s.window == window {
        return s.used;
    }
    match kind {
        BucketKind::Metered { .. } if s.window.checked_add(1) == Some(window) => s.used.saturating_sub(max),
        _ => 0,
    }
}

/// Rate-limit operations over a [`SharedStore`].
pub struct Limiter;

impl Limiter {
    /// Creates `key` as an empty bucket (or key count) unless it exists. See
    /// [`crate::limit::enforce::create_buckets`] for why this runs before traffic.
    pub fn create<S: SharedStore + ?Sized>(store: &S, key: &str) -> Result<(), StoreFailed> {
        update(store, key, |s| s.is_none().then_some(State::default())).map(|_| ())
    }

    /// Makes sure `bucket` may exist: true if it exists or was admitted as a new key under the
    /// rule's bound (`count_key` counts admitted keys), false when the rule is full and the
    /// caller must use the overflow bucket. `known`: the buckets this worker saw admitted, which
    /// need no shared-data read.
    pub fn admit<S: SharedStore + ?Sized>(
        store: &S,
        known: &mut AdmittedKeys,
        count_key: impl FnOnce() -> String,
        bucket: &str,
        max_keys: u64,
    ) -> Result<bool, StoreFailed> {
        if known.contains(bucket) {
            return Ok(true);
        }
        if store.get(bucket).is_some() {
            known.insert(bucket);
            return Ok(true);
        }
        let (_, written) = update(store, &count_key(), |c| {
            let n = c.map_or(0, |s| s.used);
            (n < max_keys).then_some(State { window: 0, used: n + 1 })
        })?;
        if written.is_none() {
            return Ok(false);
        }
        // Create the bucket now so the key stays admitted even if its first request is rejected.
        Self::create(store, bucket)?;
        known.insert(bucket);
        Ok(true)
    }

    /// What `key` has used in the window at `now_ms` (a window that starts with debt shows it);
    /// `None` when the bucket cannot be read.
    pub fn used<S: SharedStore + ?Sized>(store: &S, key: &str, now_ms: u64, kind: BucketKind, max: u64) -> Option<u64> {
        let state = match store.get(key) {
            Some((bytes, _)) => Some(decode(&bytes)?),
            None => None,
        };
        Some(roll(state, kind.window_at(now_ms).0, kind, max))
    }

    /// Charges every bucket in order; all or nothing.
    pub fn acquire<S: SharedStore + ?Sized>(store: &S, now_ms: u64, charges: Vec<Charge>) -> Acquire {
        let mut held: Vec<Held> = Vec::with_capacity(charges.len());
        for charge in charges {
            let (window, reset_ms) = charge.kind.window_at(now_ms);
            let mut seen = 0;
            let mut fresh = false;
            let result = update(store, &charge.key, |s| {
                let used = roll(s, window, charge.kind, charge.max);
                seen = used;
                fresh = charge.kind != BucketKind::Concurrent && s.is_none_or(|s| s.window != window);
                let fits = match charge.amount {
                    0 => used < charge.max,
                    n => used.saturating_add(n) <= charge.max,
                };
                fits.then_some(State { window, used: used.saturating_add(charge.amount) })
            });
            match result {
                Ok((_, Some(next))) => {
                    let remaining = charge.max.saturating_sub(next.used);
                    let crossed = crosses(charge.warn, seen, next.used, fresh);
                    held.push(Held { charge, window, remaining, reset_ms, used: next.used, crossed });
                }
                Ok((_, None)) => {
                    Self::rollback(store, now_ms, held);
                    return Acquire::Rejected { remaining: charge.max.saturating_sub(seen), reset_ms, charge };
                }
                Err(StoreFailed) => {
                    Self::rollback(store, now_ms, held);
                    return Acquire::Failed { rule: charge.rule };
                }
            }
        }
        Acquire::Admitted(held)
    }

    /// Undoes charges of a request that was not admitted after all. Best effort: a failure
    /// leaves the bucket over-charged until its window ends, which only errs on the safe side.
    fn rollback<S: SharedStore + ?Sized>(store: &S, now_ms: u64, held: Vec<Held>) {
        for h in held {
            let _ = Self::undo(store, now_ms, &h);
        }
    }

    /// Gives a held charge back entirely, as if the request had never been admitted: a request
    /// count is taken back (in the same window), a reservation of tokens or USD is returned,
    /// a concurrency slot freed. For requests that a later check (a rate limit service)
    /// rejected after the local rules admitted them.
    pub fn undo<S: SharedStore + ?Sized>(store: &S, now_ms: u64, held: &Held) -> Result<(), StoreFailed> {
        Self::settle(store, now_ms, held, 0, true).map(|_| ())
    }

    /// Ends a held charge. `actual`: the real amount for metered buckets (`None` keeps the
    /// reservation as charged). Concurrency is given back; requests stay counted.
    pub fn release<S: SharedStore + ?Sized>(
        store: &S,
        now_ms: u64,
        held: &Held,
        actual: Option<u64>,
    ) -> Result<Settled, StoreFailed> {
        Self::settle(store, now_ms, held, actual.unwrap_or(held.charge.amount), false)
    }

    fn settle<S: SharedStore + ?Sized>(
        store: &S,
        now_ms: u64,
        held: &Held,
        actual: u64,
        undo: bool,
    ) -> Result<Settled, StoreFailed> {
        let c = &held.charge;
        let window = c.kind.window_at(now_ms).0;
        let same_window = window == held.window;
        match c.kind {
            BucketKind::Concurrent => {
                update(store, &c.key, |s| Some(State { window: 0, used: s.map_or(0, |s| s.used).saturating_sub(1) }))?;
            }
            BucketKind::Requests { .. } if undo && same_window => {
                update(store, &c.key, |s| {
                    let s = s?;
                    (s.window == window).then_some(State { window, used: s.used.saturating_sub(1) })
                })?;
            }
            BucketKind::Requests { .. } => {}
            BucketKind::Metered { .. } => {
                if actual == c.amount {
                    return Ok(Settled::default());
                }
                if !same_window && actual < c.amount {
                    // The reservation's window is over; nothing left to give back.
                    return Ok(Settled::default());
                }
                let (mut before, mut fresh) = (0, false);
                let (_, written) = update(store, &c.key, |s| {
                    let used = roll(s, window, c.kind, c.max);
                    before = used;
                    fresh = s.is_none_or(|s| s.window != window);
                    let used = if same_window {
                        used.saturating_sub(c.amount).saturating_add(actual)
                    } else {
                        used.saturating_add(actual - c.amount)
                    };
                    Some(State { window, used })
                })?;
                let used = written.map(|s| s.used);
                let crossed = !undo && used.is_some_and(|u| u > before && crosses(c.warn, before, u, fresh));
                return Ok(Settled { used, crossed });
            }
        }
        Ok(Settled::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::labels::tests::FakeStore;

    const MIN: u64 = 60_000;

    fn charge(rule: usize, key: &str, kind: BucketKind, max: u64, amount: u64) -> Charge {
        Charge { rule, key: key.to_string(), kind, max, amount, warn: None }
    }

    const PER_MINUTE: Period = Period { window: crate::config::Window::Minute, offset_hours: 0 };

    fn rpm(max: u64) -> Charge {
        charge(0, "r", BucketKind::Requests { period: PER_MINUTE }, max, 1)
    }

    fn tpm(max: u64, amount: u64) -> Charge {
        charge(1, "t", BucketKind::Metered { period: PER_MINUTE }, max, amount)
    }

    fn used(store: &FakeStore, key: &str) -> State {
        decode(&store.get(key).unwrap().0).unwrap()
    }

    fn admitted(a: Acquire) -> Vec<Held> {
        match a {
            Acquire::Admitted(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_per_window_are_exact_and_reset_on_the_window() {
        let s = FakeStore::default();
        let t0 = 10 * MIN + 15_000;
        for i in 0..3 {
            let h = admitted(Limiter::acquire(&s, t0, vec![rpm(3)]));
            assert_eq!(h[0].remaining, 2 - i);
            assert_eq!(h[0].reset_ms, 45_000);
        }
        match Limiter::acquire(&s, t0 + 1000, vec![rpm(3)]) {
            Acquire::Rejected { remaining: 0, reset_ms: 44_000, charge } => assert_eq!(charge.rule, 0),
            other => panic!("{other:?}"),
        }
        assert_eq!(used(&s, "r").used, 3, "rejections do not count");
        // Next window: a fresh count.
        let h = admitted(Limiter::acquire(&s, 11 * MIN, vec![rpm(3)]));
        assert_eq!((h[0].remaining, h[0].reset_ms), (2, MIN));
    }

    #[test]
    fn all_or_nothing_across_rules() {
        let s = FakeStore::default();
        admitted(Limiter::acquire(&s, 0, vec![tpm(100, 90)]));
        // The request rule fits, the token rule does not: the request charge is rolled back.
        match Limiter::acquire(&s, 1, vec![rpm(5), tpm(100, 20)]) {
            Acquire::Rejected { charge, remaining: 10, .. } => assert_eq!(charge.rule, 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(used(&s, "r").used, 0);
        assert_eq!(used(&s, "t").used, 90);
    }

    #[test]
    fn token_reservations_reconcile_and_debt_carries_over() {
        let s = FakeStore::default();
        let h = admitted(Limiter::acquire(&s, 0, vec![tpm(100, 40)]));
        // Used less than reserved: the difference is given back.
        Limiter::release(&s, 1, &h[0], Some(25)).unwrap();
        assert_eq!(used(&s, "t").used, 25);
        // Used more: charged, even above the limit.
        let h = admitted(Limiter::acquire(&s, 2, vec![tpm(100, 50)]));
        Limiter::release(&s, 3, &h[0], Some(130)).unwrap();
        assert_eq!(used(&s, "t").used, 155);
        // Over the limit: no new reservation, not even one of 0 tokens.
        assert!(matches!(Limiter::acquire(&s, 4, vec![tpm(100, 0)]), Acquire::Rejected { remaining: 0, .. }));
        // The next window starts with the 55 tokens of debt.
        let h = admitted(Limiter::acquire(&s, MIN, vec![tpm(100, 10)]));
        assert_eq!(h[0].remaining, 35);
        // A window after that starts clean.
        let h = admitted(Limiter::acquire(&s, 3 * MIN, vec![tpm(100, 10)]));
        assert_eq!(h[0].remaining, 90);
    }

    #[test]
    fn late_reconciliation_charges_the_current_window() {
        let s = FakeStore::default();
        let h = admitted(Limiter::acquire(&s, MIN - 10, vec![tpm(100, 30)]));
        // The stream ended in the next window having used 80: the 50 not reserved go there.
        Limiter::release(&s, MIN + 5, &h[0], Some(80)).unwrap();
        assert_eq!(used(&s, "t"), State { window: 1, used: 50 });
        // Using less than reserved after the window ended gives nothing back.
        let h = admitted(Limiter::acquire(&s, 2 * MIN - 1, vec![tpm(100, 30)]));
        Limiter::release(&s, 2 * MIN + 1, &h[0], Some(0)).unwrap();
        assert_eq!(used(&s, "t"), State { window: 1, used: 80 });
        // A failed request (actual 0) releases its reservation; None keeps it.
        let h = admitted(Limiter::acquire(&s, 2 * MIN + 2, vec![tpm(100, 30)]));
        Limiter::release(&s, 2 * MIN + 3, &h[0], Some(0)).unwrap();
        assert_eq!(used(&s, "t").used, 0);
        let h = admitted(Limiter::acquire(&s, 2 * MIN + 4, vec![tpm(100, 30)]));
        Limiter::release(&s, 2 * MIN + 5, &h[0], None).unwrap();
        assert_eq!(used(&s, "t").used, 30);
    }

    #[test]
    fn concurrency_is_held_until_released() {
        let s = FakeStore::default();
        let c = || charge(2, "c", BucketKind::Concurrent, 2, 1);
        let a = admitted(Limiter::acquire(&s, 0, vec![c()]));
        let b = admitted(Limiter::acquire(&s, 0, vec![c()]));
        assert_eq!(b[0].remaining, 0);
        assert!(matches!(Limiter::acquire(&s, 0, vec![c()]), Acquire::Rejected { remaining: 0, reset_ms: 0, .. }));
        Limiter::release(&s, 5 * MIN, &a[0], None).unwrap();
        admitted(Limiter::acquire(&s, 5 * MIN, vec![c()]));
        Limiter::release(&s, 5 * MIN, &b[0], None).unwrap();
        assert_eq!(used(&s, "c").used, 1);
    }

    #[test]
    fn conflicts_are_retried_and_failures_reported() {
        let s = FakeStore::default();
        s.conflicts.set(CAS_RETRIES - 1);
        admitted(Limiter::acquire(&s, 0, vec![rpm(3)]));
        s.conflicts.set(CAS_RETRIES);
        assert_eq!(Limiter::acquire(&s, 0, vec![rpm(3)]), Acquire::Failed { rule: 0 });
        s.broken.set(true);
        assert_eq!(Limiter::acquire(&s, 0, vec![tpm(5, 1)]), Acquire::Failed { rule: 1 });
        s.broken.set(false);
        // A value that is not a bucket is a failure, not a panic or a silent reset.
        s.set("t", b"garbage", None).unwrap();
        assert_eq!(Limiter::acquire(&s, 0, vec![tpm(5, 1)]), Acquire::Failed { rule: 1 });
    }

    #[test]
    fn keys_are_bounded_per_rule() {
        let s = FakeStore::default();
        // A fresh worker memory each time: the bound holds through shared data alone.
        let admit = |key: &str, max: u64| Limiter::admit(&s, &mut AdmittedKeys::default(), || "n".into(), key, max);
        assert_eq!(admit("k1", 2), Ok(true));
        assert_eq!(admit("k1", 2), Ok(true), "known keys do not count again");
        assert_eq!(admit("k2", 2), Ok(true));
        assert_eq!(admit("k3", 2), Ok(false));
        assert!(s.get("k3").is_none(), "an overflowing key leaves nothing in shared data");
        assert_eq!(used(&s, "n").used, 2);
        s.broken.set(true);
        assert_eq!(admit("k4", 3), Err(StoreFailed));
    }
}
