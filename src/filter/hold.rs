//! Watchdog for held requests.
//!
//! The filter holds request headers while it reads the start of the body for the `model`
//! ([`crate::filter::Flow::Hold`]). That only works when Envoy's Wasm `PluginConfig` sets
//! `allow_on_headers_stop_iteration: true` (Envoy ≥ 1.35). Without it Envoy turns the hold into
//! "stop all iteration", never calls the body callback, and the request would wait forever: the
//! filter cannot read that setting, so it watches instead.
//!
//! A hold that sees no body callback within [`STALL_AFTER_NANOS`] is released by the glue's
//! timer. If no hold on this worker has ever seen a body (holding is not proven to work), the
//! stall is taken as the missing setting and holding is switched off on this worker: only the
//! requests held before the timer notices (1 to 1.25 s after the first arrived; the timer ticks
//! every 250 ms, or 100 ms with global limits) pay the delay. Once a hold has seen a body,
//! holding works on this worker, and a
//! stall is a slow client: it is still released (forwarding the headers early is what the filter
//! without a hold would do), but holding stays on.

use std::collections::BTreeMap;

/// How long a hold may wait for its first body callback.
pub const STALL_AFTER_NANOS: u64 = 1_000_000_000;

/// How often the glue should call [`HoldWatch::stalled`] while holds are possible.
pub const CHECK_EVERY_MS: u64 = 250;

/// Held requests of one worker, by proxy-wasm context id.
#[derive(Debug, Default)]
pub struct HoldWatch {
    /// Holds that have not seen a body callback yet, with the time they started.
    waiting: BTreeMap<u32, u64>,
    proven: bool,
    disabled: bool,
}

/// What [`HoldWatch::stalled`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stalled {
    /// Contexts to release now.
    pub contexts: Vec<u32>,
    /// True when this check switched holding off on the worker.
    pub disabled_now: bool,
}

impl HoldWatch {
    /// True unless holding was found not to work on this worker.
    pub fn allows_hold(&self) -> bool {
        !self.disabled
    }

    /// True once a hold on this worker has seen a body callback.
    pub fn is_proven(&self) -> bool {
        self.proven
    }

    /// A request was held at `now`.
    pub fn started(&mut self, context: u32, now: u64) {
        self.waiting.insert(context, now);
    }

    /// A body callback arrived for `context`: holding works here.
    pub fn body_seen(&mut self, context: u32) {
        if self.waiting.remove(&context).is_some() {
            self.proven = true;
        }
    }

    /// The exchange ended or stopped holding.
    pub fn ended(&mut self, context: u32) {
        self.waiting.remove(&context);
    }

    /// Number of holds waiting for their first body callback.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Removes and returns the holds that have waited too long at `now`.
    pub fn stalled(&mut self, now: u64) -> Stalled {
        let contexts: Vec<u32> = self
            .waiting
            .iter()
            .filter(|&(_, &since)| now.saturating_sub(since) >= STALL_AFTER_NANOS)
            .map(|(&context, _)| context)
            .collect();
        for context in &contexts {
            self.waiting.remove(context);
        }
        let disabled_now = !contexts.is_empty() && !self.proven && !self.disabled;
        if disabled_now {
            self.disabled = true;
        }
        Stalled { contexts, disabled_now }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_before_any_body_disables_holding() {
        let mut w = HoldWatch::default();
        w.started(2, 0);
        w.started(3, 500_000_000);
        assert_eq!(w.stalled(STALL_AFTER_NANOS - 1), Stalled::default());
        assert_eq!(w.stalled(STALL_AFTER_NANOS), Stalled { contexts: vec![2], disabled_now: true });
        assert!(!w.allows_hold());
        // Already disabled: later stalls are released without "disabling" again.
        assert_eq!(w.stalled(2 * STALL_AFTER_NANOS), Stalled { contexts: vec![3], disabled_now: false });
        assert_eq!(w.waiting(), 0);
    }

    #[test]
    fn once_a_body_was_seen_stalls_are_slow_clients() {
        let mut w = HoldWatch::default();
        w.started(2, 0);
        w.body_seen(2);
        assert!(w.is_proven());
        w.started(3, 0);
        w.started(4, 0);
        w.ended(4);
        assert_eq!(w.stalled(5 * STALL_AFTER_NANOS), Stalled { contexts: vec![3], disabled_now: false });
        assert!(w.allows_hold());
    }

    #[test]
    fn ended_or_unknown_contexts_prove_nothing() {
        let mut w = HoldWatch::default();
        w.body_seen(9);
        w.started(2, 0);
        w.ended(2);
        w.body_seen(2);
        assert!(!w.is_proven());
        assert_eq!(w.stalled(u64::MAX), Stalled::default());
        assert!(w.allows_hold());
    }
}
