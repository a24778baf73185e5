//! Counter and gauge updates held per worker and sent to Envoy together.
//!
//! Every update of an Envoy stat from Wasm is a hostcall, a VM exit that costs more than the
//! filter's own work for that update; a metered request moves five or six counters and gauges
//! (requests, the token types, cost, active requests up and down). [`Deltas`] adds them up in
//! the VM instead, and the glue sends each changed stat's sum in one hostcall per flush. A flush
//! happens when a request ends and the last flush is at least `metrics.flush_interval_ms` old
//! (250 ms by default), on the root context's timer at that interval, and when the VM stops.
//! So a worker that sees fewer requests than one per interval sends every request's updates as
//! the request ends, as without batching; a busy worker sends one update per changed series per
//! interval, whatever its request rate, and its requests cost no counter hostcall.
//!
//! What it costs: on a busy worker a scrape sees a request's counters up to one interval after
//! it ended (Prometheus scrapes every 15–60 s: no query sees the difference), and a VM that
//! fails (a trap: the worker's filter is gone) loses the updates held since its last flush: at
//! most one interval of that worker's requests, none on a quiet worker. `flush_interval_ms: 0`
//! sends every update at once. Histograms are not held (Envoy has no call that adds a value n
//! times), and a gauge that is set (not added to) is set at once, dropping the deltas held for
//! it, which the set overrides.
//!
//! Stats are addressed by a dense local index (the glue's own numbering of the stats it
//! defined), so holding a delta is an indexed add, not a hash lookup.

/// Per-stat deltas not sent yet, and which stats have one.
#[derive(Debug, Default)]
pub struct Deltas {
    /// Sum of the deltas not sent, and whether the index is in `dirty`, by local stat index.
    pending: Vec<(i64, bool)>,
    /// Indices whose pending sum may be non-zero, each listed once (in first-update order).
    dirty: Vec<u32>,
}

impl Deltas {
    /// Adds `delta` to stat `index`'s pending sum.
    pub fn add(&mut self, index: u32, delta: i64) {
        let i = index as usize;
        if self.pending.len() <= i {
            self.pending.resize(i + 1, (0, false));
        }
        let Some((sum, listed)) = self.pending.get_mut(i) else { return };
        // Deltas that cancel out leave a listed slot at 0: listing it again would send it twice.
        if !*listed {
            *listed = true;
            self.dirty.push(index);
        }
        *sum = sum.saturating_add(delta);
    }

    /// Drops what is pending for stat `index` (it is about to be set to an absolute value).
    pub fn forget(&mut self, index: u32) {
        if let Some((sum, _)) = self.pending.get_mut(index as usize) {
            *sum = 0;
        }
    }

    /// True when nothing is waiting to be sent.
    pub fn is_empty(&self) -> bool {
        self.dirty.is_empty()
    }

    /// Stats with pending updates.
    pub fn len(&self) -> usize {
        self.dirty.len()
    }

    /// Hands every non-zero pending sum to `send` (index, delta) and clears them.
    pub fn drain(&mut self, mut send: impl FnMut(u32, i64)) {
        for index in self.dirty.drain(..) {
            if let Some((sum, listed)) = self.pending.get_mut(index as usize) {
                *listed = false;
                let delta = std::mem::take(sum);
                if delta != 0 {
                    send(index, delta);
                }
            }
        }
    }
}

/// When held updates are sent: [`Deltas`] plus the flush policy, driven by the glue's events
/// (an update, a request's end, a timer tick) and the latest clock reading it has.
#[derive(Debug, Default)]
pub struct Batch {
    deltas: Deltas,
    /// Holding (`metrics.flush_interval_ms` > 0): flush every this many timer ticks.
    ticks_per_flush: Option<u32>,
    ticks: u32,
    interval_nanos: u64,
    last_flush_nanos: u64,
}

impl Batch {
    /// Holds updates for `interval_ms` (0: never held) on a timer of `tick_ms`.
    pub fn new(interval_ms: u64, tick_ms: u64) -> Self {
        let ticks_per_flush =
            (interval_ms > 0).then(|| u32::try_from((interval_ms / tick_ms.max(1)).max(1)).unwrap_or(u32::MAX));
        Self { ticks_per_flush, interval_nanos: interval_ms.saturating_mul(1_000_000), ..Self::default() }
    }

    /// Holds `delta` for stat `index`; false when updates are not held (send it now).
    pub fn hold(&mut self, index: u32, delta: i64) -> bool {
        if self.ticks_per_flush.is_none() {
            return false;
        }
        self.deltas.add(index, delta);
        true
    }

    /// Stat `index` is being set to an absolute value: what was held for it is void.
    pub fn forget(&mut self, index: u32) {
        self.deltas.forget(index);
    }

    /// A timer tick: true when the held updates are due.
    pub fn tick(&mut self) -> bool {
        let Some(every) = self.ticks_per_flush else { return false };
        self.ticks = self.ticks.saturating_add(1);
        if self.ticks < every {
            return false;
        }
        self.ticks = 0;
        !self.deltas.is_empty()
    }

    /// A request ended, `now` being the latest clock reading: true when the last flush is an
    /// interval old, so a quiet worker sends every request's updates as it ends.
    pub fn request_ended(&self, now_nanos: u64) -> bool {
        self.ticks_per_flush.is_some()
            && !self.deltas.is_empty()
            && now_nanos >= self.last_flush_nanos.saturating_add(self.interval_nanos)
    }

    /// Sends every held update (`send(index, delta)`), as of `now`.
    pub fn flush(&mut self, now_nanos: u64, send: impl FnMut(u32, i64)) {
        self.last_flush_nanos = now_nanos;
        self.deltas.drain(send);
    }

    /// Stats with held updates.
    pub fn len(&self) -> usize {
        self.deltas.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(d: &mut Deltas) -> Vec<(u32, i64)> {
        let mut out = Vec::new();
        d.drain(|i, v| out.push((i, v)));
        out
    }

    #[test]
    fn sums_per_stat_and_sends_each_once() {
        let mut d = Deltas::default();
        assert!(d.is_empty());
        d.add(3, 1);
        d.add(0, 21);
        d.add(3, 1);
        d.add(0, 78);
        assert_eq!(d.len(), 2);
        assert_eq!(drained(&mut d), vec![(3, 2), (0, 99)]);
        assert!(d.is_empty());
        assert_eq!(drained(&mut d), vec![]);
    }

    #[test]
    fn a_gauge_that_goes_up_and_down_sends_nothing() {
        let mut d = Deltas::default();
        d.add(1, 1);
        d.add(1, -1);
        assert_eq!(drained(&mut d), vec![]);
        // Cancelled out, then moved again: listed once, sent once.
        d.add(1, 1);
        d.add(1, -1);
        d.add(1, -1);
        assert_eq!(d.len(), 1);
        assert_eq!(drained(&mut d), vec![(1, -1)]);
    }

    #[test]
    fn a_set_drops_the_deltas_before_it_not_after() {
        let mut d = Deltas::default();
        d.add(2, 5);
        d.forget(2);
        d.add(2, 1);
        assert_eq!(drained(&mut d), vec![(2, 1)]);
        d.forget(7); // never seen: nothing to do
        assert!(d.is_empty());
    }

    fn sent(b: &mut Batch, now: u64) -> Vec<(u32, i64)> {
        let mut out = Vec::new();
        b.flush(now, |i, v| out.push((i, v)));
        out
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_quiet_worker_sends_each_request_as_it_ends_a_busy_one_once_per_interval() {
        let mut b = Batch::new(250, 250);
        // The first request of a VM goes out as it ends.
        assert!(b.hold(0, 1));
        assert!(b.request_ended(1_000 * MS));
        assert_eq!(sent(&mut b, 1_000 * MS), vec![(0, 1)]);
        // Busy: requests ending within the interval are held...
        for t in [1_010, 1_100, 1_249] {
            assert!(b.hold(0, 1));
            assert!(!b.request_ended(t * MS), "at {t} ms");
        }
        // ...until one ends an interval after the last flush: all of them at once.
        assert!(b.hold(0, 1));
        assert!(b.request_ended(1_250 * MS));
        assert_eq!(sent(&mut b, 1_250 * MS), vec![(0, 4)]);
        // Quiet again: a request long after goes out as it ends.
        assert!(b.hold(1, 7));
        assert!(b.request_ended(9_000 * MS));
    }

    #[test]
    fn the_timer_sends_what_is_left_every_interval() {
        // Interval 250 ms on a 100 ms timer (global rules): every second tick (200 ms).
        let mut b = Batch::new(250, 100);
        assert!(b.hold(3, 2));
        assert!(!b.tick());
        assert!(b.tick());
        assert_eq!(sent(&mut b, 0), vec![(3, 2)]);
        assert!(!b.tick());
        assert!(!b.tick(), "due, but nothing held");
        assert!(b.hold(3, 1));
        assert!(!b.tick());
        assert!(b.tick());
        // Interval shorter than the timer: every tick.
        let mut b = Batch::new(50, 100);
        assert!(b.hold(0, 1));
        assert!(b.tick());
    }

    #[test]
    fn interval_zero_holds_nothing() {
        let mut b = Batch::new(0, 250);
        assert!(!b.hold(0, 1));
        assert!(b.is_empty());
        assert!(!b.tick());
        assert!(!b.request_ended(u64::MAX));
    }

    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let mut d = Deltas::default();
        d.add(0, i64::MAX);
        d.add(0, i64::MAX);
        assert_eq!(drained(&mut d), vec![(0, i64::MAX)]);
    }
}
