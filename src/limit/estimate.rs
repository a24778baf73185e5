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
//!
//! A busy worker does not update it per response (a read and a compare-and-swap, two hostcalls
//! each time): it holds the sizes in [`Pending`] and adds them in order, one update per model,
//! when its counters flush (`metrics.flush_interval_ms`). A quiet worker's response, the first
//! in an interval, is added at once.

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

/// `s` after one more response of `output` tokens.
fn learn(s: Option<State>, output: u64) -> State {
    let sample = output.min(crate::scan::usage::MAX_TOKENS).saturating_mul(SCALE);
    match s.filter(|s| s.seen > 0) {
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
    }
}

/// Adds responses of `outputs` tokens to the average, in order (one read and one write however
/// many). Returns the average before and after (rounded; before is `None` for a model's first
/// response), or `None` when the store failed.
pub fn update<S: SharedStore + ?Sized>(store: &S, key: &str, outputs: &[u64]) -> Option<(Option<u64>, u64)> {
    let (before, after) = cas_update(store, key, CAS_RETRIES, decode, encode, |s| {
        let (first, rest) = outputs.split_first()?;
        Some(rest.iter().fold(learn(s, *first), |s, &o| learn(Some(s), o)))
    })
    .ok()?;
    Some((before.filter(|s| s.seen > 0).map(|s| rounded(&s)), after.or(before).map_or(0, |s| rounded(&s))))
}

/// Most response sizes a worker holds for one model before it adds them (then at once).
pub const MAX_HELD: usize = 64;

/// Response sizes a worker has not added to their model's average yet, by model label (bounded
/// by `max_models` labels × [`MAX_HELD`]).
#[derive(Debug, Default)]
pub struct Pending {
    held: Vec<(String, Vec<u64>)>,
    /// A response ending at or after this (ns) is added at once: the worker is quiet.
    next_at_once_nanos: u64,
}

impl Pending {
    /// A response of `output` tokens for `model_label` ended at `end_nanos`. Returns the sizes
    /// to add now, in order (the worker was quiet for `interval_nanos`, or the model's batch is
    /// full); otherwise holds it until [`Pending::take`].
    pub fn add(&mut self, model_label: &str, output: u64, end_nanos: u64, interval_nanos: u64) -> Option<Vec<u64>> {
        let at_once = end_nanos >= self.next_at_once_nanos;
        if at_once {
            self.next_at_once_nanos = end_nanos.saturating_add(interval_nanos);
        }
        let Some(sizes) = self.held.iter_mut().find(|(l, _)| l == model_label).map(|(_, sizes)| sizes) else {
            if at_once {
                return Some(vec![output]);
            }
            self.held.push((model_label.to_string(), vec![output]));
            return None;
        };
        sizes.push(output);
        (at_once || sizes.len() >= MAX_HELD).then(|| std::mem::take(sizes))
    }

    /// Every held size, by model label (emptied).
    pub fn take(&mut self) -> Vec<(String, Vec<u64>)> {
        let mut held = std::mem::take(&mut self.held);
        held.retain(|(_, sizes)| !sizes.is_empty());
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::labels::tests::FakeStore;

    #[test]
    fn the_first_responses_average_then_each_weighs_an_eighth() {
        let s = FakeStore::default();
        assert_eq!(read(&s, "k"), None, "no response yet");
        assert_eq!(update(&s, "k", &[100]), Some((None, 100)));
        assert_eq!(update(&s, "k", &[200]), Some((Some(100), 150)));
        assert_eq!(read(&s, "k"), Some(150));
        // A fixed size is learnt exactly.
        let s = FakeStore::default();
        for _ in 0..50 {
            update(&s, "k", &[177]).unwrap();
        }
        assert_eq!(read(&s, "k"), Some(177));
        // After many, a change moves it an eighth of the way per response.
        let (_, after) = update(&s, "k", &[177 + 800]).unwrap();
        assert_eq!(after, 277);
        for _ in 0..60 {
            update(&s, "k", &[977]).unwrap();
        }
        assert_eq!(read(&s, "k"), Some(977), "follows a lasting change");
        // Down too, and never below zero.
        for _ in 0..200 {
            update(&s, "k", &[0]).unwrap();
        }
        assert_eq!(read(&s, "k"), Some(0));
    }

    #[test]
    fn absurd_samples_and_store_failures() {
        let s = FakeStore::default();
        update(&s, "k", &[u64::MAX]).unwrap();
        assert_eq!(read(&s, "k"), Some(crate::scan::usage::MAX_TOKENS));
        s.broken.set(true);
        assert_eq!(update(&s, "k", &[1]), None);
        s.broken.set(false);
        s.set("bad", b"garbage", None).unwrap();
        assert_eq!(read(&s, "bad"), None);
        assert_eq!(update(&s, "bad", &[1]), None, "a value that is not an average is not overwritten");
    }

    #[test]
    fn sizes_added_together_equal_sizes_added_one_by_one() {
        let mut rng = crate::scan::test_rng::Rng(7);
        for _ in 0..200 {
            let (one, all) = (FakeStore::default(), FakeStore::default());
            let sizes: Vec<u64> = (0..rng.below(40) + 1).map(|_| rng.below(5000) as u64).collect();
            let start = rng.below(3);
            for _ in 0..start {
                update(&one, "k", &[100]).unwrap();
                update(&all, "k", &[100]).unwrap();
            }
            let mut last = None;
            for &n in &sizes {
                last = update(&one, "k", &[n]);
            }
            let before = read(&all, "k");
            let together = update(&all, "k", &sizes).unwrap();
            assert_eq!(one.get("k").unwrap().0, all.get("k").unwrap().0, "{sizes:?}");
            assert_eq!(together, (before, last.unwrap().1));
        }
        assert_eq!(update(&FakeStore::default(), "k", &[]), Some((None, 0)), "nothing to add writes nothing");
    }

    #[test]
    fn a_quiet_worker_adds_at_once_a_busy_one_holds_until_taken() {
        const MS: u64 = 1_000_000;
        let mut p = Pending::default();
        assert_eq!(p.add("a", 10, 1000 * MS, 250 * MS), Some(vec![10]), "the first response");
        assert_eq!(p.add("a", 11, 1100 * MS, 250 * MS), None, "within the interval: held");
        assert_eq!(p.add("b", 12, 1200 * MS, 250 * MS), None);
        // The next response after the interval takes its model's held sizes with it, in order.
        assert_eq!(p.add("a", 13, 1250 * MS, 250 * MS), Some(vec![11, 13]));
        assert_eq!(p.take(), vec![("b".to_string(), vec![12])]);
        assert!(p.take().is_empty());
        // A full batch is added without waiting.
        for i in 0..MAX_HELD as u64 - 1 {
            assert_eq!(p.add("a", i, 1300 * MS, 250 * MS), None);
        }
        assert_eq!(p.add("a", 99, 1300 * MS, 250 * MS).map(|v| v.len()), Some(MAX_HELD));
        // Interval 0 (counters sent as they change): every response at once.
        let mut p = Pending::default();
        for i in 0..3 {
            assert_eq!(p.add("a", i, 5, 0), Some(vec![i]));
        }
    }
}
