//! Turning an exchange into numbers: metric names and label encoding ([`metrics`]), bounded
//! label values shared by every worker ([`labels`]), prices and cost ([`pricing`]), error
//! classes ([`classify`]), counter updates held per worker until a flush ([`deltas`]), and what upstream response headers say (quotas, usage:
//! [`upstream`]).
//!
//! Open this folder for "why is this series labelled so / missing / priced so?". It depends on
//! [`crate::scan`] (usage) and [`crate::memory`] only; the configuration and everything above
//! use it.

pub mod classify;
pub mod deltas;
pub mod labels;
pub mod metrics;
pub mod pricing;
pub mod upstream;
