//! Mutations: byte-level for binary formats, token-level (a dictionary per target) for text
//! ones, stacked 1–4 at a time. Deterministic for a seed.

/// SplitMix64: small, fast, and ours, so a run is reproducible from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Integers that break length and count fields: zero, one, signed and unsigned extremes,
/// powers of two around allocation limits.
const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 1,
];

/// One mutated copy of `input`; `other` is a second corpus entry to splice from, `dictionary`
/// the target's tokens.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], dictionary: &[&[u8]]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let at = |rng: &mut Rng, len: usize| rng.below(len + 1);
        match rng.below(11) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = [0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'"', b'{'][rng.below(8)];
            }
            2 if out.len() >= 8 => {
                // A little-endian integer field overwritten with an interesting value.
                let width = [1usize, 2, 4, 8][rng.below(4)];
                let i = rng.below(out.len() - width + 1);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                out[i..i + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            3 => {
                let i = at(rng, out.len());
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                out.splice(i..i, bytes);
            }
            4 if !out.is_empty() => {
                let i = rng.below(out.len());
                let n = (1 + rng.below(64)).min(out.len() - i);
                out.drain(i..i + n);
            }
            5 if !out.is_empty() => {
                // A range repeated: lists and nesting grow.
                let i = rng.below(out.len());
                let n = (1 + rng.below(64)).min(out.len() - i);
                let chunk = out[i..i + n].to_vec();
                let times = 1 + rng.below(8);
                let j = at(rng, out.len());
                for _ in 0..times {
                    out.splice(j..j, chunk.iter().copied());
                }
            }
            6 if !out.is_empty() => {
                out.truncate(rng.below(out.len()));
            }
            7 if !other.is_empty() => {
                // Splice: our head, the other's tail.
                let i = at(rng, out.len());
                let j = rng.below(other.len());
                out.truncate(i);
                out.extend_from_slice(&other[j..]);
            }
            8 | 9 if !dictionary.is_empty() => {
                let token = dictionary[rng.below(dictionary.len())];
                let i = at(rng, out.len());
                if rng.below(2) == 0 || out.len() < token.len() {
                    out.splice(i..i, token.iter().copied());
                } else {
                    let i = i.min(out.len() - token.len());
                    out[i..i + token.len()].copy_from_slice(token);
                }
            }
            _ if out.len() >= 2 => {
                // Two bytes swapped.
                let (i, j) = (rng.below(out.len()), rng.below(out.len()));
                out.swap(i, j);
            }
            _ => out.push(rng.next_u64() as u8),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_change_the_input() {
        let input = b"GGUF\x03\x00\x00\x00 some header bytes".to_vec();
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..64).map(|_| mutate(&mut rng, &input, b"other", &[b"{%"])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(
            run(7).iter().filter(|m| **m != input).count() > 48,
            "most mutants differ from the input"
        );
    }
}
