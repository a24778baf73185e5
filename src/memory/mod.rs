//! A memory budget for what the filter holds per stream, per wasm VM.
//!
//! Why: a wasm VM has one linear memory (at most 4 GiB on wasm32) shared by every stream its
//! Envoy worker carries, and an allocation that does not fit aborts the VM: Envoy then cuts the
//! streams in flight and, depending on `failure_policy`, stops metering. What a stream holds is
//! mostly bounded by the filter itself (scanners keep a few KiB), except where the input
//! decides: a brotli body declares a window of up to 16 MiB, and 300 of them at once are more
//! than the VM has. So every stream's large, long-lived allocations (decoder windows and
//! state, the usage-chunk stripper's lookahead, the request body copy `include_usage` injection
//! parses) are charged to a [`Lease`] before they are made, and every lease draws on one
//! [`Pool`] per VM (`memory.max_stream_bytes_total`) with a cap of its own
//! (`memory.max_stream_bytes`). A charge that does not fit is refused: the stream stops being
//! decoded or scanned (`meter_skips_total{reason="memory_budget"}`) and its bytes pass
//! untouched. A lease gives everything back when the stream ends, however it ends (it is
//! released in `on_log` and, failing that, when the exchange is dropped).
//!
//! The VM's pool is thread-local: a VM runs on one Envoy worker thread, and several root
//! contexts (a configuration and its replacement during a reload) share one VM and so one pool.
//! Tests that need a pool of their own make one ([`Pool::new`], [`Lease::in_pool`]): on wasm32
//! every test runs on the one thread.
//!
//! Allocations charged here are also made fallibly (`try_reserve`, [`try_box`]), so that even
//! a VM whose memory is short for other reasons gets an error the filter handles rather than an
//! abort.
//!
//! [`small_blocks`] is the VM's global allocator: the C allocator with a bounded cache of small
//! freed blocks in front, because the filter's many short-lived small allocations cost more in
//! that allocator's bookkeeping than in their use.

pub mod small_blocks;

use std::cell::Cell;
use std::rc::Rc;

/// Default for `memory.max_stream_bytes_total`: well inside a wasm32 VM's 4 GiB, with room for
/// everything else the VM holds.
pub const DEFAULT_MAX_TOTAL: usize = 256 * 1024 * 1024;
/// Default for `memory.max_stream_bytes`: one brotli body at the largest standard window
/// (16 MiB, RFC 7932) with its Huffman tables and buffers fits, with room to spare.
pub const DEFAULT_MAX_STREAM: usize = 32 * 1024 * 1024;

/// This VM's pool: bytes held by all leases, and its limit.
#[derive(Debug)]
pub struct Pool {
    held: Cell<usize>,
    max_total: Cell<usize>,
    /// `held` as last reported to the gauge (see [`Pool::gauge_delta`]).
    reported: Cell<usize>,
    /// High-water mark of `held` since the VM started.
    peak: Cell<usize>,
}

thread_local! {
    static VM_POOL: Rc<Pool> = Pool::new(DEFAULT_MAX_TOTAL);
}

/// Changes of at least this many bytes are reported to the gauge at once; smaller ones wait
/// until they add up (or the pool empties), so the gauge costs no hostcall per request.
pub const GAUGE_STEP: usize = 1024 * 1024;

impl Pool {
    /// A pool of `max_total` bytes, empty.
    pub fn new(max_total: usize) -> Rc<Pool> {
        Rc::new(Pool {
            held: Cell::new(0),
            max_total: Cell::new(max_total),
            reported: Cell::new(0),
            peak: Cell::new(0),
        })
    }

    /// This VM's pool.
    pub fn vm() -> Rc<Pool> {
        VM_POOL.with(Rc::clone)
    }

    /// Runs `f` on this VM's pool.
    pub fn with<R>(f: impl FnOnce(&Pool) -> R) -> R {
        VM_POOL.with(|p| f(p))
    }

    /// Sets the limit (the configuration in force; a lower limit applies to new charges only).
    pub fn set_max_total(&self, bytes: usize) {
        self.max_total.set(bytes);
    }

    /// The limit.
    pub fn max_total(&self) -> usize {
        self.max_total.get()
    }

    /// Bytes held by all leases now.
    pub fn held(&self) -> usize {
        self.held.get()
    }

    /// The most bytes held at once since the VM started.
    pub fn peak(&self) -> usize {
        self.peak.get()
    }

    /// The change to report to the gauge, if it is due: when `held` moved by [`GAUGE_STEP`]
    /// or more since the last report, or went back to 0. Marks it reported.
    pub fn gauge_delta(&self) -> Option<i64> {
        let (held, reported) = (self.held.get(), self.reported.get());
        if held == reported || (held != 0 && held.abs_diff(reported) < GAUGE_STEP) {
            return None;
        }
        self.reported.set(held);
        let delta = i64::try_from(held).ok()?.checked_sub(i64::try_from(reported).ok()?)?;
        Some(delta)
    }

    fn try_take(&self, bytes: usize) -> bool {
        match self.held.get().checked_add(bytes) {
            Some(total) if total <= self.max_total.get() => {
                self.held.set(total);
                self.peak.set(self.peak.get().max(total));
                true
            }
            _ => false,
        }
    }

    fn give(&self, bytes: usize) {
        self.held.set(self.held.get().saturating_sub(bytes));
    }
}

/// One stream's share of the pool. Cloned (as an `Rc`) into whatever allocates for the stream,
/// e.g. the brotli decoder's allocator.
#[derive(Debug)]
pub struct Lease {
    pool: Rc<Pool>,
    held: Cell<usize>,
    max: usize,
    refused: Cell<bool>,
}

impl Lease {
    /// A lease of at most `max_stream` bytes of this VM's pool.
    pub fn new(max_stream: usize) -> Rc<Lease> {
        Self::in_pool(&Pool::vm(), max_stream)
    }

    /// A lease of at most `max_stream` bytes of `pool`.
    pub fn in_pool(pool: &Rc<Pool>, max_stream: usize) -> Rc<Lease> {
        Rc::new(Lease { pool: pool.clone(), held: Cell::new(0), max: max_stream, refused: Cell::new(false) })
    }

    /// Charges `bytes` if both this stream's cap and the VM's pool allow it; otherwise charges
    /// nothing, remembers the refusal ([`Lease::was_refused`]) and returns false.
    pub fn try_take(&self, bytes: usize) -> bool {
        let fits = self.held.get().checked_add(bytes).is_some_and(|n| n <= self.max);
        if fits && self.pool.try_take(bytes) {
            self.held.set(self.held.get() + bytes);
            return true;
        }
        self.refused.set(true);
        false
    }

    /// Gives back `bytes` of what was charged (at most what is held).
    pub fn give(&self, bytes: usize) {
        let bytes = bytes.min(self.held.get());
        self.held.set(self.held.get() - bytes);
        self.pool.give(bytes);
    }

    /// Gives back everything this lease holds.
    pub fn release(&self) {
        self.give(self.held.get());
    }

    /// Bytes this stream holds now.
    pub fn held(&self) -> usize {
        self.held.get()
    }

    /// Records a refusal made elsewhere (an allocation the heap could not grant).
    pub fn refuse(&self) {
        self.refused.set(true);
    }

    /// True once a charge was refused.
    pub fn was_refused(&self) -> bool {
        self.refused.get()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
    }
}

/// A value boxed without aborting when the allocation fails: `Box::new` has no fallible form
/// on stable Rust, a one-element `Vec` has (`try_reserve_exact`).
pub struct TryBox<T>(Box<[T; 1]>);

impl<T> TryBox<T> {
    /// Boxes `value`; `None` when the heap has no room.
    pub fn new(value: T) -> Option<Self> {
        let mut v = Vec::new();
        v.try_reserve_exact(1).ok()?;
        v.push(value);
        // A one-element slice always converts to a one-element array.
        Box::<[T; 1]>::try_from(v.into_boxed_slice()).ok().map(TryBox)
    }
}

impl<T> std::ops::Deref for TryBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        let [value] = &*self.0;
        value
    }
}

impl<T> std::ops::DerefMut for TryBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        let [value] = &mut *self.0;
        value
    }
}

/// `len` default values in a boxed slice, or `None` when the heap has no room.
pub fn try_boxed_slice<T: Clone + Default>(len: usize) -> Option<Box<[T]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.resize(len, T::default());
    Some(v.into_boxed_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_draw_on_one_pool_within_their_own_cap() {
        let pool = Pool::new(100);
        let a = Lease::in_pool(&pool, 60);
        let b = Lease::in_pool(&pool, 60);
        assert!(a.try_take(50));
        assert!(!a.try_take(20), "over the stream's cap");
        assert!(a.was_refused());
        assert!(b.try_take(50));
        assert!(!b.try_take(1), "over the pool: 100 held");
        assert_eq!(pool.held(), 100);
        a.give(30);
        assert!(b.try_take(10));
        assert_eq!((a.held(), b.held(), pool.held()), (20, 60, 80));
        drop(a);
        assert_eq!(pool.held(), 60, "a dropped lease gives everything back");
        b.release();
        b.give(5);
        assert_eq!(pool.held(), 0, "giving back more than held gives back what is held");
        assert_eq!(pool.peak(), 100);
    }

    #[test]
    fn the_gauge_is_told_in_steps_and_always_when_back_to_zero() {
        let pool = Pool::new(DEFAULT_MAX_TOTAL);
        let l = Lease::in_pool(&pool, DEFAULT_MAX_STREAM);
        assert_eq!(pool.gauge_delta(), None);
        assert!(l.try_take(1000));
        assert_eq!(pool.gauge_delta(), None, "below the step");
        assert!(l.try_take(GAUGE_STEP));
        assert_eq!(pool.gauge_delta(), Some((GAUGE_STEP + 1000) as i64));
        l.give(10);
        assert_eq!(pool.gauge_delta(), None);
        l.release();
        assert_eq!(pool.gauge_delta(), Some(-((GAUGE_STEP + 1000) as i64)));
        assert_eq!(pool.gauge_delta(), None);
    }

    #[test]
    fn leases_of_the_vm_pool_share_it() {
        let before = Pool::with(Pool::held);
        let l = Lease::new(1024);
        assert!(l.try_take(1000));
        assert_eq!(Pool::with(Pool::held), before + 1000);
        assert!(Rc::ptr_eq(&Pool::vm(), &Pool::vm()));
        drop(l);
        assert_eq!(Pool::with(Pool::held), before);
    }

    #[test]
    fn try_box_and_try_boxed_slice() {
        let mut b = TryBox::new([7u8; 64]).unwrap();
        b[3] = 1;
        assert_eq!((b[0], b[3]), (7, 1));
        assert_eq!(try_boxed_slice::<u32>(5).unwrap().len(), 5);
        // A request no heap can grant is an error, not an abort.
        assert!(try_boxed_slice::<u64>(usize::MAX / 4).is_none());
    }
}
