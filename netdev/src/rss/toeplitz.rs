//! The Toeplitz hash used by RSS.
//!
//! For every set bit of the input, taken from the most significant bit of
//! the first byte onwards, the result is XORed with the 32 key bits that
//! start at the same bit position. A key shorter than the input needs
//! (input length + 4 bytes) is padded with zero bits, as QEMU's virtio-net
//! RSS does with a short `hash_key_length`.

/// The largest RSS key the virtio-net spec lets a driver set (the Toeplitz
/// input for TCP over IPv6 is 36 bytes, which needs 40 key bytes).
pub const MAX_KEY_LEN: usize = 40;

/// The Microsoft RSS verification key, the usual default key (also QEMU's
/// and DPDK's test key). The published verification vectors use it.
pub const DEFAULT_KEY: [u8; MAX_KEY_LEN] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

/// Toeplitz hash of `input` under `key`. Key bits past the end of `key`
/// count as zero, so any key and input lengths are accepted.
pub fn toeplitz_hash(key: &[u8], input: &[u8]) -> u32 {
    let key_byte = |i: usize| u64::from(key.get(i).copied().unwrap_or(0));
    // A 64-bit window on the key: its top 32 bits are the key bits aligned
    // with the input bit being processed.
    let mut window = (0..8).fold(0u64, |w, i| (w << 8) | key_byte(i));
    let mut result = 0u32;
    for (i, &byte) in input.iter().enumerate() {
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                // Truncation intended: the top 32 bits of the window.
                result ^= (window >> 32) as u32;
            }
            window <<= 1;
        }
        // Eight shifts emptied the low byte; the next key byte enters there.
        window |= key_byte(i + 8);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, bit by bit over a zero-padded key.
    fn reference(key: &[u8], input: &[u8]) -> u32 {
        let bit = |i: usize| key.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0);
        let mut result = 0u32;
        for i in 0..input.len() * 8 {
            if input[i / 8] & (0x80 >> (i % 8)) != 0 {
                let mut k = 0u32;
                for j in 0..32 {
                    k = (k << 1) | u32::from(bit(i + j));
                }
                result ^= k;
            }
        }
        result
    }

    #[test]
    fn matches_the_bitwise_definition() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7065);
        for _ in 0..500 {
            let key: Vec<u8> = (0..rng.gen_range(0..=MAX_KEY_LEN))
                .map(|_| rng.gen())
                .collect();
            let input: Vec<u8> = (0..rng.gen_range(0..=48)).map(|_| rng.gen()).collect();
            assert_eq!(toeplitz_hash(&key, &input), reference(&key, &input));
        }
    }

    #[test]
    fn edge_cases() {
        assert_eq!(toeplitz_hash(&DEFAULT_KEY, &[]), 0);
        assert_eq!(toeplitz_hash(&[], &[0xff; 36]), 0);
        // A single leading one bit selects the first 32 key bits.
        assert_eq!(toeplitz_hash(&DEFAULT_KEY, &[0x80]), 0x6d5a_56da);
        // The last input bit of a 36-byte input uses the last key bits.
        let mut input = [0u8; 36];
        input[35] = 1;
        // Key bits 287..=318: the low bit of 0x3b, be ac 01, the top 7 bits of fa.
        assert_eq!(toeplitz_hash(&DEFAULT_KEY, &input), 0xdf56_00fd);
    }
}
