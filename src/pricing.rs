//! Model prices and request cost.
//!
//! Prices are configured in USD per 1M tokens, the unit providers publish. Internally each price
//! is an integer number of pico-USD per token (USD per 1M tokens × 10⁶), so costs are exact
//! integer sums, and the `cost_microusd_total` counter (integer) is fed through [`CostCarry`],
//! which keeps the sub-micro-USD remainder per series instead of rounding it away on every
//! request (a 7-token prompt to a $0.15/1M model costs 1.05 µUSD).

use crate::usage::Usage;
use std::collections::HashMap;

const PICO_PER_MICRO: u128 = 1_000_000;

/// Price of one model, in pico-USD per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    input: u64,
    output: u64,
    cached_input: u64,
    cache_creation_input: u64,
}

impl Price {
    /// From USD per 1M tokens (validated by the config: finite, 0 to 10⁶); cache writes at the
    /// input price.
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
    pub fn cost_pico(&self, usage: &Usage) -> u128 {
        let cached = usage.cached_input.min(usage.input);
        let creation = usage.cache_creation_input.min(usage.input - cached);
        let uncached = usage.input - cached - creation;
        uncached as u128 * self.input as u128
            + cached as u128 * self.cached_input as u128
            + creation as u128 * self.cache_creation_input as u128
            + usage.output as u128 * self.output as u128
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
    /// Adds `pico` and returns the whole micro-USD now due to the series' counter.
    pub fn add(&mut self, pico: u128) -> u64 {
        let total = self.remainder.saturating_add(pico);
        self.remainder = total % PICO_PER_MICRO;
        u64::try_from(total / PICO_PER_MICRO).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn cost_uses_cached_price_for_cached_input() {
        let p = Price::per_million(2.5, 10.0, 1.25);
        let u = Usage { input: 1000, output: 200, cached_input: 400, reasoning: 50, cache_creation_input: 0 };
        // 600 × 2.5 + 400 × 1.25 + 200 × 10 = 1500 + 500 + 2000 = 4000 µUSD.
        assert_eq!(p.cost_pico(&u), 4000 * 1_000_000);
    }

    #[test]
    fn fractional_prices_are_exact() {
        // Anthropic-style cache writes at their own price: 100 uncached, 50 read, 50 written.
        let a = Price::per_million_with_cache_writes(3.0, 15.0, 0.3, 3.75);
        let u = Usage { input: 200, output: 10, cached_input: 50, reasoning: 0, cache_creation_input: 50 };
        assert_eq!(a.cost_pico(&u), 100 * 3_000_000 + 50 * 300_000 + 50 * 3_750_000 + 10 * 15_000_000);
        let p = Price::per_million(0.075, 0.3, 0.0375);
        let u = Usage { input: 7, output: 3, cached_input: 0, reasoning: 0, cache_creation_input: 0 };
        assert_eq!(p.cost_pico(&u), 7 * 75_000 + 3 * 300_000);
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
    fn huge_usage_does_not_overflow() {
        let p = Price::per_million(1e6, 1e6, 1e6);
        let u = Usage { input: u64::MAX, output: u64::MAX, cached_input: 0, reasoning: 0, cache_creation_input: 0 };
        let mut c = CostCarry::default();
        assert_eq!(c.add(p.cost_pico(&u)), u64::MAX);
    }
}
