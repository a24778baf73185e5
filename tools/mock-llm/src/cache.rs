//! Large bodies (`x-mock-pad-bytes`) are built, and compressed, once per key and then served
//! from memory: three hundred concurrent requests for a 20 MB body compressed with a 16 MiB
//! brotli window cost one compression, not three hundred (and not 6 GB of bodies in flight).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Distinct bodies kept; a new key beyond this many empties the cache first.
const MAX_ENTRIES: usize = 8;

type Cell = Arc<OnceLock<Arc<Vec<u8>>>>;

/// The body for `key`: built by `build` on the first request for it, then the same bytes every
/// time. Concurrent first requests for one key wait for a single build.
pub fn body(key: &str, build: impl FnOnce() -> Vec<u8>) -> Arc<Vec<u8>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Cell>>> = OnceLock::new();
    let cell = {
        // A build that panicked poisons nothing but its own cell: the map stays usable.
        let mut map = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(key) && map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.entry(key.to_string()).or_default().clone()
    };
    cell.get_or_init(|| Arc::new(build())).clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn built_once_per_key_even_when_asked_for_concurrently() {
        static BUILDS: AtomicUsize = AtomicUsize::new(0);
        let key = "cache-test-concurrent";
        let threads: Vec<_> = (0..16)
            .map(|_| {
                std::thread::spawn(move || {
                    body(key, || {
                        BUILDS.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        vec![7; 1000]
                    })
                })
            })
            .collect();
        let bodies: Vec<Arc<Vec<u8>>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(BUILDS.load(Ordering::SeqCst), 1);
        assert!(bodies.iter().all(|b| Arc::ptr_eq(b, &bodies[0])));
        assert_eq!(*body(key, || unreachable!("cached")), vec![7; 1000]);
        assert_eq!(*body("cache-test-other", || vec![1]), vec![1], "another key, another body");
    }
}
