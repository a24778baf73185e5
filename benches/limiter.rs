//! Cost of the rate limiter per request, over an in-memory shared store (a `HashMap` with CAS
//! tokens, like proxy-wasm shared data without the hostcall).
//!
//! `cargo bench -p llm-meter --bench limiter` (native only: on wasm32 this is an empty binary).

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use criterion::Criterion;
    use llm_meter::config::Config;
    use llm_meter::limit::enforce::{self, LimitHost, RequestFacts, Verdict};
    use llm_meter::limit::limiter::{Acquire, BucketKind, Charge, Limiter};
    use llm_meter::meter::labels::{SharedStore, StoreError};
    use llm_meter::scan::usage::Usage;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::hint::black_box;

    const MINUTE: llm_meter::limit::calendar::Period =
        llm_meter::limit::calendar::Period { window: llm_meter::config::Window::Minute, offset_hours: 0 };

    /// Shared data in memory: value and CAS token per key.
    #[derive(Default)]
    struct MemStore {
        data: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    }

    impl SharedStore for MemStore {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.data.borrow().get(key).cloned()
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            let mut data = self.data.borrow_mut();
            match data.get_mut(key) {
                Some((v, token)) => {
                    if cas.is_some_and(|c| c != *token) {
                        return Err(StoreError::CasMismatch);
                    }
                    v.clear();
                    v.extend_from_slice(value);
                    *token = token.wrapping_add(1);
                }
                None => {
                    data.insert(key.to_string(), (value.to_vec(), 1));
                }
            }
            Ok(())
        }
    }

    /// A request's view of the host: the store, its headers and the clock.
    struct Host {
        store: MemStore,
        api_key: Vec<u8>,
        now: u64,
    }

    impl SharedStore for Host {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.store.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.store.set(key, value, cas)
        }
    }

    impl LimitHost for Host {
        fn request_header(&self, name: &str) -> Option<Vec<u8>> {
            (name == "x-api-key").then(|| self.api_key.clone())
        }
        fn client_address(&self) -> Option<Vec<u8>> {
            Some(b"10.1.2.3:43210".to_vec())
        }
        fn now_ms(&self) -> u64 {
            self.now
        }
    }

    const NOW: u64 = 1_727_000_012_345;
    /// Limits no benchmark run gets near.
    const HUGE: u64 = 1 << 60;

    fn charges(n: usize) -> Vec<Charge> {
        let requests = Charge {
            rule: 0,
            key: "llm_meter.llm.rl.rpm.60.0123456789abcdef0123456789abcdef".into(),
            kind: BucketKind::Requests { period: MINUTE },
            warn: None,
            max: HUGE,
            amount: 1,
        };
        let tokens = Charge {
            rule: 1,
            key: "llm_meter.llm.rl.tpm.60.0123456789abcdef0123456789abcdef".into(),
            kind: BucketKind::Metered { period: MINUTE },
            warn: None,
            max: HUGE,
            amount: 4096,
        };
        match n {
            1 => vec![tokens],
            _ => vec![requests, tokens],
        }
    }

    /// Acquires the charges, then releases each with a real usage below the reservation (so a
    /// metered bucket is reconciled: one more CAS update).
    fn acquire_release(store: &MemStore, charges: &[Charge]) -> usize {
        match Limiter::acquire(store, NOW, charges.to_vec()) {
            Acquire::Admitted(held) => {
                for h in &held {
                    let actual = Some(h.charge.amount / 2);
                    let _ = Limiter::release(store, NOW, h, actual);
                }
                held.len()
            }
            other => panic!("not admitted: {other:?}"),
        }
    }

    pub fn limiter(c: &mut Criterion) {
        let mut group = c.benchmark_group("limiter");
        for n in [1, 2] {
            let store = MemStore::default();
            let charges = charges(n);
            group.bench_function(format!("acquire_release/{n}_charges"), |b| {
                b.iter(|| acquire_release(&store, black_box(&charges)))
            });
        }
        group.finish();
    }

    const CONFIG: &[u8] = br#"{
        "limits": [
            {"name": "rpm", "key": "header:x-api-key", "requests_per_minute": 1000000000000000},
            {"name": "tpm", "key": "header:x-api-key", "tokens_per_minute": 1000000000000000}
        ]
    }"#;

    pub fn enforce_check(c: &mut Criterion) {
        let config = match Config::parse(CONFIG) {
            Ok(config) => config,
            Err(e) => panic!("bad benchmark config: {e}"),
        };
        let host = Host { store: MemStore::default(), api_key: b"sk-proj-0123456789abcdefABCDEF".to_vec(), now: NOW };
        let facts =
            RequestFacts { model: Some("gpt-4o-mini"), body_bytes: 2048, max_output: Some(1024), output_average: None };
        let usage = Usage { input: 400, output: 300, ..Usage::default() };
        // A worker's memory of admitted buckets, as the filter keeps it.
        let mut admitted = llm_meter::limit::limiter::AdmittedKeys::default();
        let mut group = c.benchmark_group("enforce");
        group.bench_function("check/2_rules", |b| {
            b.iter(|| match enforce::check(&host, &config, black_box(facts), &mut admitted).0 {
                Verdict::Admit(r) => r,
                Verdict::Reject(r) => panic!("rejected: {r:?}"),
            })
        });
        group.bench_function("check_release/2_rules", |b| {
            b.iter(|| match enforce::check(&host, &config, black_box(facts), &mut admitted).0 {
                Verdict::Admit(r) => {
                    let price = config.pricing.resolve(Some("gpt-4o-mini"), None);
                    enforce::release(&host, &config, price, &r, Some(&usage), false)
                }
                Verdict::Reject(r) => panic!("rejected: {r:?}"),
            })
        });
        group.finish();
    }
}

#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_group!(benches, native::limiter, native::enforce_check);
#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_main!(benches);

#[cfg(target_arch = "wasm32")]
fn main() {}
