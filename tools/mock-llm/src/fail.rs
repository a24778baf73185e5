//! Scripted failures, for retry and failover tests: `x-mock-fail-model` fails the requests for
//! a model, `x-mock-fail-times` the first n requests that carry a key. The count behind
//! `x-mock-fail-times` lives in this process: two mocks count apart.

use crate::knobs::Knobs;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Keys whose count is kept; a new key beyond this many forgets all the others first.
const MAX_KEYS: usize = 10_000;

/// Why a request fails.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cause {
    /// `x-mock-fail-model` names the model the request asked for.
    Model,
    /// One of the first `x-mock-fail-times` requests with its `x-mock-fail-key`.
    Times,
}

impl Cause {
    pub fn header(self) -> &'static str {
        match self {
            Cause::Model => "x-mock-fail-model",
            Cause::Times => "x-mock-fail-times",
        }
    }
}

/// `--name`: the `x-mock-server` header of every answer, and what `x-mock-fail-on` matches.
pub static NAME: OnceLock<String> = OnceLock::new();

/// The status `knobs` script for this request, if it must fail. `model` is the model the
/// request names (body `model`, or a Gemini path's). Nothing fails (or is counted) on a mock
/// that `x-mock-fail-on` does not name. `x-mock-fail-model` is checked first, and a request it
/// fails is not counted against `x-mock-fail-times`.
pub fn status(knobs: &Knobs, model: Option<&str>) -> Option<(u16, Cause)> {
    status_on(knobs, model, NAME.get().map(String::as_str))
}

/// [`status`] on a mock named `name`.
fn status_on(knobs: &Knobs, model: Option<&str>, name: Option<&str>) -> Option<(u16, Cause)> {
    if let Some(on) = &knobs.fail_on {
        if !name.is_some_and(|n| on.iter().any(|o| o == n)) {
            return None;
        }
    }
    if let Some(model) = model {
        if let Some((_, s)) = knobs.fail_models.iter().find(|(m, _)| m == model) {
            return Some((*s, Cause::Model));
        }
    }
    let (n, key) = knobs.fail_times.as_ref()?;
    (count(key) < *n).then_some((knobs.fail_status, Cause::Times))
}

/// Counts one more request with `key`: how many came before it.
fn count(key: &str) -> u64 {
    static SEEN: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
    let mut seen = SEEN.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if !seen.contains_key(key) && seen.len() >= MAX_KEYS {
        seen.clear();
    }
    let n = seen.entry(key.to_string()).or_insert(0);
    let before = *n;
    *n = n.saturating_add(1);
    before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs(headers: &[(&str, &str)]) -> Knobs {
        Knobs::from(&crate::http::Request {
            method: "POST".into(),
            path: "/".into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: vec![],
            keep_alive: true,
        })
        .unwrap()
    }

    #[test]
    fn fail_on_limits_failures_to_the_named_mocks() {
        let k = knobs(&[("x-mock-fail-model", "m=503"), ("x-mock-fail-on", "primary")]);
        assert_eq!(status_on(&k, Some("m"), Some("primary")), Some((503, Cause::Model)));
        assert_eq!(status_on(&k, Some("m"), Some("secondary")), None);
        assert_eq!(status_on(&k, Some("m"), None), None, "a mock without --name matches no name");
        let k = knobs(&[("x-mock-fail-model", "m=503")]);
        assert_eq!(status_on(&k, Some("m"), None), Some((503, Cause::Model)), "no x-mock-fail-on: every mock");
        // Not counted where it does not apply: the primary's first request still fails.
        let k =
            knobs(&[("x-mock-fail-times", "1"), ("x-mock-fail-key", "fail-test-on"), ("x-mock-fail-on", "primary")]);
        assert_eq!(status_on(&k, None, Some("secondary")), None);
        assert_eq!(status_on(&k, None, Some("primary")), Some((503, Cause::Times)));
        assert_eq!(status_on(&k, None, Some("primary")), None);
    }

    #[test]
    fn counts_per_key_and_forgets_when_full() {
        assert_eq!((count("fail-test-a"), count("fail-test-a"), count("fail-test-b")), (0, 1, 0));
        assert_eq!(count("fail-test-a"), 2);
        for i in 0..MAX_KEYS {
            count(&format!("fail-test-fill-{i}"));
        }
        assert_eq!(count("fail-test-a"), 0, "forgotten once the map was full");
    }
}
