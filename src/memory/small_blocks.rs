//! A cache of small freed blocks in front of the VM's allocator.
//!
//! Why: an exchange makes a few dozen small, short-lived allocations (header names and values,
//! shared-data keys and values, the record's strings), and inside V8 the C allocator wasi-libc
//! links (dlmalloc) took 12 % (metrics) to 20 % (two limit rules) of an exchange's time in
//! `just bench-v8` with them: its `free` coalesces every block with its neighbours, and its
//! `malloc` searches bins for each. Freed blocks of up
//! to [`MAX_SIZE`] bytes go instead onto a last-in-first-out list per size class, from which the
//! next allocation of that class takes its block: two pointer moves each way. Each list keeps
//! at most [`PER_CLASS`] blocks, so the cache holds at most [`MAX_CACHED_BYTES`] (about 140 KB)
//! and never grows with load: a block beyond that goes back to the allocator.
//!
//! The filter's VM runs on one Envoy worker thread, and wasm32-wasip1 has no threads, so the
//! lists need no lock ([`SmallBlocks`] is only installed as the global allocator there).
//! Natively it is tested over the system allocator.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::ptr;

/// Size classes are this many bytes apart (a class holds blocks of `(class + 1) × STEP` bytes).
const STEP: usize = 16;
/// The largest size served from the lists; larger allocations go straight to the allocator.
pub const MAX_SIZE: usize = 256;
const CLASSES: usize = MAX_SIZE / STEP;
/// Blocks kept per class at most.
pub const PER_CLASS: usize = 64;
/// Bytes the lists can hold at most: every class full.
pub const MAX_CACHED_BYTES: usize = PER_CLASS * STEP * CLASSES * (CLASSES + 1) / 2;
// The bound the module's doc promises.
const _: () = assert!(MAX_CACHED_BYTES < 150 * 1024);
/// Blocks from the lists are aligned to this (what the allocator gives a plain `malloc` on
/// wasm32); a layout asking more goes straight to the allocator.
const ALIGN: usize = 8;

/// One class's free blocks: each free block's first word points to the next.
#[derive(Clone, Copy)]
struct List {
    head: *mut u8,
    len: usize,
}

/// The cache over the allocator `A`.
pub struct SmallBlocks<A> {
    inner: A,
    lists: UnsafeCell<[List; CLASSES]>,
}

// SAFETY: only installed as the global allocator on wasm32 without the atomics feature, where
// there is one thread; natively it is only used from the thread that made it (tests).
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
unsafe impl<A: Sync> Sync for SmallBlocks<A> {}

impl<A> SmallBlocks<A> {
    /// An empty cache over `inner`.
    pub const fn new(inner: A) -> Self {
        SmallBlocks { inner, lists: UnsafeCell::new([List { head: ptr::null_mut(), len: 0 }; CLASSES]) }
    }

    /// The class of a layout the lists serve, `None` for the others.
    fn class(layout: Layout) -> Option<usize> {
        let size = layout.size();
        (size != 0 && size <= MAX_SIZE && layout.align() <= ALIGN).then(|| (size - 1) / STEP)
    }

    /// The class of `layout` and its list, if the lists serve it.
    ///
    /// # Safety
    /// No other reference to the lists may be live (single-threaded, not re-entered).
    #[allow(clippy::mut_from_ref)]
    unsafe fn list(&self, layout: Layout) -> Option<(usize, &mut List)> {
        let class = Self::class(layout)?;
        Some((class, (*self.lists.get()).get_mut(class)?))
    }

    /// The layout a class's blocks are allocated with from the allocator.
    fn class_layout(class: usize) -> Layout {
        // SAFETY: the size is at most MAX_SIZE and ALIGN is a power of two.
        unsafe { Layout::from_size_align_unchecked((class + 1) * STEP, ALIGN) }
    }

    /// Blocks cached now, per class (for tests).
    #[cfg(test)]
    fn cached(&self) -> Vec<usize> {
        // SAFETY: single-threaded use (see the Sync impl).
        unsafe { (*self.lists.get()).iter().map(|l| l.len).collect() }
    }
}

// SAFETY: every block handed out comes from `inner` with a layout at least as large and as
// aligned as asked (the class's), and goes back to `inner` with that same class layout.
unsafe impl<A: GlobalAlloc> GlobalAlloc for SmallBlocks<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((class, list)) = self.list(layout) else {
            return self.inner.alloc(layout);
        };
        if list.head.is_null() {
            return self.inner.alloc(Self::class_layout(class));
        }
        let block = list.head;
        list.head = block.cast::<*mut u8>().read();
        list.len -= 1;
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let Some((class, list)) = self.list(layout) else {
            return self.inner.dealloc(block, layout);
        };
        if list.len >= PER_CLASS {
            return self.inner.dealloc(block, Self::class_layout(class));
        }
        // Every class holds at least STEP bytes aligned to ALIGN: room for the pointer.
        block.cast::<*mut u8>().write(list.head);
        list.head = block;
        list.len += 1;
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::class(layout).is_none() {
            // The allocator may know the memory is zero already (calloc).
            return self.inner.alloc_zeroed(layout);
        }
        let block = self.alloc(layout);
        if !block.is_null() {
            block.write_bytes(0, layout.size());
        }
        block
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size, rounded up to the alignment, does not overflow.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (Self::class(layout), Self::class(new_layout)) {
            // Neither size is cached: the allocator can grow the block in place.
            (None, None) => self.inner.realloc(block, layout, new_size),
            // The block already has room for the new size.
            (Some(old), Some(new)) if old == new => block,
            _ => {
                let moved = self.alloc(new_layout);
                if !moved.is_null() {
                    ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                    self.dealloc(block, layout);
                }
                moved
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn a_freed_block_is_the_next_one_of_its_class() {
        let cache = SmallBlocks::new(System);
        unsafe {
            let a = cache.alloc(layout(20, 1));
            cache.dealloc(a, layout(20, 1));
            assert_eq!(cache.cached()[1], 1);
            // 17..=32 bytes share a class: the block comes back, the list is empty again.
            let b = cache.alloc(layout(32, 8));
            assert_eq!(a, b);
            assert_eq!(cache.cached()[1], 0);
            // Another class does not take it.
            cache.dealloc(b, layout(32, 8));
            let c = cache.alloc(layout(48, 8));
            assert_ne!(b, c);
            cache.dealloc(c, layout(48, 8));
            assert_eq!(cache.cached().iter().sum::<usize>(), 2);
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_even_when_reused() {
        let cache = SmallBlocks::new(System);
        unsafe {
            for l in [layout(40, 8), layout(MAX_SIZE + 100, 8)] {
                let a = cache.alloc(l);
                a.write_bytes(0xff, l.size());
                cache.dealloc(a, l);
                let b = cache.alloc_zeroed(l);
                assert!(std::slice::from_raw_parts(b, l.size()).iter().all(|&x| x == 0));
                cache.dealloc(b, l);
            }
        }
    }

    #[test]
    fn large_zero_sized_and_overaligned_layouts_bypass_the_lists() {
        let cache = SmallBlocks::new(System);
        unsafe {
            for l in [layout(MAX_SIZE + 1, 8), layout(64, 16), layout(4096, 4096)] {
                let p = cache.alloc(l);
                assert!(!p.is_null());
                assert_eq!(p as usize % l.align(), 0);
                cache.dealloc(p, l);
            }
        }
        assert_eq!(cache.cached().iter().sum::<usize>(), 0);
        assert_eq!(SmallBlocks::<System>::class(layout(0, 1)), None);
    }

    #[test]
    fn each_list_is_bounded_and_the_rest_goes_back() {
        let cache = SmallBlocks::new(System);
        let l = layout(MAX_SIZE, 8);
        unsafe {
            let blocks: Vec<*mut u8> = (0..PER_CLASS * 3).map(|_| cache.alloc(l)).collect();
            for &b in &blocks {
                cache.dealloc(b, l);
            }
        }
        let cached = cache.cached();
        assert_eq!(cached[CLASSES - 1], PER_CLASS);
        assert_eq!(cached.iter().sum::<usize>(), PER_CLASS);
    }

    #[test]
    fn blocks_hold_their_bytes_and_realloc_keeps_them_across_classes() {
        let cache = SmallBlocks::new(System);
        unsafe {
            let mut size = 3;
            let mut p = cache.alloc(layout(size, 1));
            p.write_bytes(0xab, size);
            // Grow within a class, across classes, out of the cached range, and back down.
            for next in [10, 16, 17, 200, 256, 257, 5000, 300, 40, 1] {
                p = cache.realloc(p, layout(size, 1), next);
                assert!(!p.is_null());
                let kept = size.min(next);
                assert!(std::slice::from_raw_parts(p, kept).iter().all(|&b| b == 0xab), "{size} -> {next}");
                p.write_bytes(0xab, next);
                size = next;
            }
            cache.dealloc(p, layout(size, 1));
        }
    }

    #[test]
    fn interleaved_lifetimes_keep_their_contents() {
        // Many interleaved lifetimes through the cache, checked by content.
        let cache = SmallBlocks::new(System);
        unsafe {
            let mut live: Vec<(*mut u8, usize, u8)> = Vec::new();
            let mut seed = 7u32;
            for i in 0..5000u32 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let size = 1 + (seed as usize >> 8) % 400;
                if seed % 3 == 0 && !live.is_empty() {
                    let (p, n, v) = live.swap_remove((seed as usize >> 4) % live.len());
                    assert!(std::slice::from_raw_parts(p, n).iter().all(|&b| b == v));
                    cache.dealloc(p, layout(n, 1));
                } else {
                    let p = cache.alloc(layout(size, 1));
                    let v = i as u8;
                    p.write_bytes(v, size);
                    live.push((p, size, v));
                }
            }
            for (p, n, v) in live {
                assert!(std::slice::from_raw_parts(p, n).iter().all(|&b| b == v));
                cache.dealloc(p, layout(n, 1));
            }
        }
    }
}
