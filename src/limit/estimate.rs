//! How many output tokens a request that does not say (`max_tokens` absent) is expected to
//! produce: a moving average per model, kept in shared data so every worker reserves the same,
//! updated by every completed response.
//!
//! Without it, such a request reserved no output tokens and a burst was admitted far beyond a
//! token limit (64 clients against 5,000 tokens per minute were admitted +70 %: every request
//! looked like its input alone). The average follows the last few dozen responses (each new
//! one weighs 1/8, the first eight are a plain mean), so a model whose answers grow is followed
//! within a few requests. Before a model has an average, [`crate::limit::enforce::usage_estimate`]
//! reserves the cap (`token_estimate.max_output_tokens`), so a cold start cannot admit a burst of
//! unknown size either.
//!
//! One value per model label (`max_models` bounds them, like the `model` label): `average × 256
//! (u64 LE) ‖ responses seen (u64 LE)`, updated by compare-and-swap.

use crate::meter::labels::{cas_update, decode_pair, encode_pair, SharedStore};

/// Fixed-point scale of the stored average.
const SCALE: u64 = 256;
/// The weight of a new response once eight were seen: 1/8.
const WEIGHT: u64 = 8;
/// Compare-and-swap attempts before an update is dropped (an estimate, not a count: losing one
/// response under heavy contention only delays the average by one sample).
const CAS_RETRIES: usize = 16;

/// The shared-data key of a model's average.
pub fn key(prefix: &str, model_label: &str) -> String {
    format!("llm_meter.{prefix}.oest.{model_label}")
}

#[derive(Debug, Clone, Copy)]
struct State {
    scaled: u64,
    seen: u64,
}

fn decode(bytes: &[u8]) -> Option<State> {
    decode_pair(bytes).map(|(scaled, seen)| State { scaled, seen })
}

fn encode(s: &State) -> [u8; 16] {
    encode_pair(s.scaled, s.seen)
}

fn rounded(s: &State) -> u64 {
    (s.scaled + SCALE / 2) / SCALE
}

/// The model's average output tokens, if a response was seen.
pub fn read<S: SharedStore + ?Sized>(store: &S, key: &str) -> Option<u64> {
    let (bytes, _) = store.get(key)?;
    decode(&bytes).filter(|s| s.seen > 0).map(|s| rounded(&s))
}

/// Adds a response of `output` tokens to the average. Returns the average before and after
/// (rounded; before is `None` for a model's first response), or `None` when the store failed.
pub fn update<S: SharedStore + ?Sized>(store: &S, key: &str, output: u64) -> Option<(Option<u64>, u64)> {
    let sample = output.min(crate::scan::usage::MAX_TOKENS).saturating_mul(SCALE);
    let (before, after) = cas_update(store, key, CAS_RETRIES, decode, encode, |s| {
        let next = match s.filter(|s| s.seen > 0) {
            None => State { scaled: sample, seen: 1 },
            Some(s) => {
                let n = s.seen.saturating_add(1);
                let w = n.min(WEIGHT);
                // scaled + (sample − scaled) / w, without going below 0.
                let scaled = if sample >= s.scaled {
                    s.scaled + (sample - s.scaled) / w
                } else {
                    s.scaled - (s.scaled - sample) / w
                };
                State { scaled, seen: n }
            }
        };
        Some(next)
    })
    .ok()?;
    Some((before.filter(|s| s.seen > 0).map(|s| rounded(&s)), after.map_or(0, |s| rounded(&s))))
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::meter::labels::tests::FakeStore;

    #[test]
    fn the_first_responses_average_then_each_weighs_an_eighth() {
        let s = FakeStore::default();
        assert_eq!(read(&s, "k"), None, "no response yet");
        assert_eq!(update(&s, "k", 100), Some((None, 100)));
        assert_eq!(update(&s, "k", 200), Some((Some(100), 150)));
        assert_eq!(read(&s, "k"), Some(150));
        // A fixed size is learnt exactly.
        let s = FakeStore::default();
        for _ in 0..50 {
            update(&s, "k", 177).unwrap();
        }
        assert_eq!(read(&s, "k"), Some(177));
        // After many, a change moves it an eighth of the way per response.
        let (_, after) = update(&s, "k", 177 + 800).unwrap();
        assert_eq!(after, 277);
        for _ in 0..60 {
            update(&s, "k", 977).unwrap();
        }
        assert_eq!(read(&s, "k"), Some(977), "follows a lasting change");
        // Down too, and never below zero.
        for _ in 0..200 {
            update(&s, "k", 0).unwrap();
        }
        assert_eq!(read(&s, "k"), Some(0));
    }

    #[test]
    fn absurd_samples_and_store_failures() {
        let s = FakeStore::default();
        update(&s, "k", u64::MAX).unwrap();
        assert_eq!(read(&s, "k"), Some(crate::scan::usage::MAX_TOKENS));
        s.broken.set(true);
        assert_eq!(update(&s, "k", 1), None);
        s.broken.set(false);
        s.set("bad", b"garbage", None).unwrap();
        assert_eq!(read(&s, "bad"), None);
        assert_eq!(update(&s, "bad", 1), None, "a value that is not an average is not overwritten");
    }
}
