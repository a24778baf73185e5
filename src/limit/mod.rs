//! Admission: rate limits, token and USD budgets, concurrency.
//!
//! Open this folder for "why was this request rejected (or admitted)?": [`enforce`] turns a
//! request into bucket charges and answers (429, 413, 503) against the configured rules,
//! [`calendar`] says when windows start and end, [`estimate`] learns each model's output size for reservations, [`limiter`] keeps the buckets in Envoy's shared data with compare-and-swap (exact across
//! workers), [`global`] asks a rate limit service for rules shared by every replica, and
//! [`rls`] encodes that service's protocol.
//!
//! Depends on [`crate::config`], [`crate::meter`] (labels' shared store, prices) and
//! [`crate::scan`] (usage); only the exchange ([`crate::filter`]) uses it.

pub mod calendar;
pub mod enforce;
pub mod estimate;
pub mod global;
pub mod limiter;
pub mod rls;
