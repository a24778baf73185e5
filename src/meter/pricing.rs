//! Model prices and request cost.
//!
//! Prices are configured in USD per 1M tokens, the unit providers publish. Internally each price
//! is an integer number of pico-USD per token (USD per 1M tokens × 10⁶), so costs are exact
//! integer sums, and the `cost_microusd_total` counter (integer) is fed through [`CostCarry`],
//! which keeps the sub-micro-USD remainder per series instead of rounding it away on every
//! request (a 7-token prompt to a $0.15/1M model costs 1.05 µUSD).

use crate::scan::usage::Usage;
use std::collections::HashMap;

const PICO_PER_MICRO: u128 = 1_000_000;

/// Highest price the configuration accepts, in USD per 1M tokens (o1-pro, the dearest model
/// listed today, costs 600 for output; the bound also catches unit mistakes such as per-token
/// prices). Bounded so that a cost, at most 2·10⁹ tokens ([`crate::scan::usage::MAX_TOKENS`]
/// input plus as many output) at this price, fits `u64` pico-USD (2·10¹⁸ < 1.8·10¹⁹).
pub const MAX_PRICE: f64 = 1_000.0;

/// Price of one model, in pico-USD per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    input: u64,
    output: u64,
    cached_input: u64,
    cache_creation_input: u64,
}

impl Price {
    /// From USD per 1M tokens (validated by the config: finite, 0 to
    /// [`MAX_PRICE`]); cache writes at the input price.
    pub fn per_million(input: f64, output: f64, cached_input: f64) -> Self {
        Self::per_million_with_cache_writes(input, output, cached_input, input)
    }

    /// From USD per 1M tokens, with a separate price for tokens written to the prompt cache
    /// (Anthropic charges 1.25× input for them).
    pub fn per_million_with_cache_writes(input: f64, output: f64, cached_input: f64, cache_creation: f64) -> Self {
        let pico = |usd_per_million: f64| (usd_per_million * 1e6).round() as u64;
        Self {
            input: pico(input),
            output: pico(output),
            cached_input: pico(cached_input),
            cache_creation_input: pico(cache_creation),
        }
    }

    /// Cost of `usage` in pico-USD: uncached input at the input price, cached input and cache
    /// writes at their own prices, output (reasoning included) at the output price.
    ///
    /// Exact for every usage the filter accepts: input and output are at most
    /// [`crate::scan::usage::MAX_TOKENS`] each and prices at most [`MAX_PRICE`], so the
    /// cost is at most 2·10¹⁸ pico-USD. Counts beyond those bounds never reach here (they are
    /// `usage_invalid`); `None` says so rather than clamping if one ever did.
    pub fn cost_pico(&self, usage: &Usage) -> Option<u64> {
        let cached = usage.cached_input.min(usage.input);
        let creation = usage.cache_creation_input.min(usage.input - cached);
        let uncached = usage.input - cached - creation;
        let cost = uncached as u128 * self.input as u128
            + cached as u128 * self.cached_input as u128
            + creation as u128 * self.cache_creation_input as u128
            + usage.output as u128 * self.output as u128;
        u64::try_from(cost).ok()
    }
}

/// Prices by model name, as written in the request (or, failing that, the response).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pricing {
    models: HashMap<String, Price>,
}

impl Pricing {
    /// Adds or replaces a model's price.
    pub fn insert(&mut self, model: &str, price: Price) {
        self.models.insert(model.to_string(), price);
    }

    /// The price of `model`, if configured.
    pub fn get(&self, model: &str) -> Option<&Price> {
        self.models.get(model)
    }

    /// The price an exchange is charged at: its request model's, else the model its response
    /// names (a request for an alias the gateway resolves). The one resolution behind both the
    /// cost metric and USD budgets, so a request never costs money in one and nothing in the
    /// other.
    pub fn resolve(&self, request_model: Option<&str>, response_model: Option<&str>) -> Option<&Price> {
        request_model.and_then(|m| self.get(m)).or_else(|| response_model.and_then(|m| self.get(m)))
    }

    /// True when no price is configured.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// Turns pico-USD costs into whole micro-USD counter increments for one cost series, carrying
/// the remainder instead of rounding it away. The filter keeps one per `(model, app)` series,
/// which the label bounds already bound.
#[derive(Debug, Default)]
pub struct CostCarry {
    remainder: u128,
}

impl CostCarry {
    /// Adds `pico` and returns the whole micro-USD now due to the series' counter (at most
    /// `u64::MAX / 10⁶ + 1`, well inside a counter increment's `i64`).
    pub fn add(&mut self, pico: u64) -> u64 {
        let total = self.remainder + u128::from(pico);
        self.remainder = total % PICO_PER_MICRO;
        // total / 10⁶ < (u64::MAX + 10⁶) / 10⁶: always fits.
        u64::try_from(total / PICO_PER_MICRO).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_uses_cached_price_for_cached_input() {
        let p = Price::per_million(2.5, 10.0, 1.25);
        let u = Usage { input: 1000, output: 200, cached_input: 400, reasoning: 50, cache_creation_input: 0 };
        // 600 × 2.5 + 400 × 1.25 + 200 × 10 = 1500 + 500 + 2000 = 4000 µUSD.
        assert_eq!(p.cost_pico(&u), Some(4000 * 1_000_000));
    }

    #[test]
    fn fractional_prices_are_exact() {
        // Anthropic-style cache writes at their own price: 100 uncached, 50 read, 50 written.
        let a = Price::per_million_with_cache_writes(3.0, 15.0, 0.3, 3.75);
        let u = Usage { input: 200, output: 10, cached_input: 50, reasoning: 0, cache_creation_input: 50 };
        assert_eq!(a.cost_pico(&u), Some(100 * 3_000_000 + 50 * 300_000 + 50 * 3_750_000 + 10 * 15_000_000));
        let p = Price::per_million(0.075, 0.3, 0.0375);
        let u = Usage { input: 7, output: 3, cached_input: 0, reasoning: 0, cache_creation_input: 0 };
        assert_eq!(p.cost_pico(&u), Some(7 * 75_000 + 3 * 300_000));
    }

    #[test]
    fn carry_keeps_fractions() {
        let mut a = CostCarry::default();
        // 1.5 µUSD three times = 4.5 µUSD: increments 1, 2, 1 (remainder 0.5 kept).
        assert_eq!(a.add(1_500_000), 1);
        assert_eq!(a.add(1_500_000), 2);
        assert_eq!(a.add(1_500_000), 1);
        let mut b = CostCarry::default();
        assert_eq!(b.add(999_999), 0);
        assert_eq!(b.add(1), 1);
    }

    #[test]
    fn the_dearest_accepted_usage_is_priced_exactly() {
        use crate::scan::usage::MAX_TOKENS;
        let p = Price::per_million(MAX_PRICE, MAX_PRICE, MAX_PRICE);
        let u = Usage { input: MAX_TOKENS, output: MAX_TOKENS, ..Usage::default() };
        // 2·10⁹ tokens at 10⁹ pico-USD each: exact, no clamping.
        assert_eq!(p.cost_pico(&u), Some(2_000_000_000_000_000_000));
        let mut c = CostCarry::default();
        assert_eq!(c.add(2_000_000_000_000_000_000), 2_000_000_000_000);
        // Beyond the bounds it says so instead of clamping into a counter or budget.
        let u = Usage { input: u64::MAX, output: u64::MAX, ..Usage::default() };
        assert_eq!(p.cost_pico(&u), None);
        assert_eq!(c.add(u64::MAX), u64::MAX / 1_000_000);
    }
}
