//! Shared by the fuzz targets: the input is `[seed, body...]`; the seed picks variants and the
//! split points, so libFuzzer explores both the bytes and how Envoy could cut them into chunks.

/// Splits `body` into chunks at positions derived from `seed` (1 to 4 cuts, any position).
pub fn chunks(seed: u8, body: &[u8]) -> Vec<&[u8]> {
    if body.is_empty() {
        return vec![body];
    }
    let mut cuts: Vec<usize> = (0..=(seed % 4))
        .map(|i| (usize::from(seed).wrapping_mul(31).wrapping_add(usize::from(i) * 97)) % body.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let mut at = 0;
    for cut in cuts {
        out.push(&body[at..cut]);
        at = cut;
    }
    out.push(&body[at..]);
    out
}
