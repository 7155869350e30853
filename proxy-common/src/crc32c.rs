//! SCTP's checksum (CRC32c, RFC 9260 appendix A) updated for a changed port without reading the
//! packet: what the TC programs do when they translate an SCTP port.
//!
//! A CRC is linear over GF(2): for two messages of the same length,
//! `crc(a) ^ crc(b) = raw(a ^ b)`, where `raw` is the CRC without its initial value and final
//! xor. A port change makes `a ^ b` zero except for the two port bytes, so the new checksum is
//! the old one xor `raw` of those two bytes followed by the `n` bytes after them, and running a
//! CRC register over `n` zero bytes is a multiplication by `x^(8n)` modulo the polynomial, done
//! with tables ([`SHIFT`]): 32 reads whatever the packet's length, instead of a pass over every
//! byte (which the verifier would also have to walk). The addresses are not covered by SCTP's
//! checksum (no pseudo-header).
//!
//! Representation: CRC32c is reflected, so bit 31 of a register is the coefficient of `x^0` and
//! bit 0 that of `x^31`; the checksum is stored little-endian in the SCTP common header.

/// The CRC32c polynomial (Castagnoli), reflected.
const POLY: u32 = 0x82f6_3b78;

/// `r · x` modulo the polynomial: one zero bit through the CRC register.
const fn times_x(r: u32) -> u32 {
    (r >> 1) ^ (POLY & (r & 1).wrapping_neg())
}

/// `a · b` modulo the polynomial (compile time, and tests).
pub const fn multiply(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut i = 0;
    while i < 32 {
        // Bit 31 - i of `a` is the coefficient of x^i; `b` holds b · x^i here.
        product ^= b & ((a >> (31 - i)) & 1).wrapping_neg();
        b = times_x(b);
        i += 1;
    }
    product
}

/// `x^k` modulo the polynomial (compile time only).
const fn x_pow(mut k: u32) -> u32 {
    // x^0 is bit 31; square and multiply over the bits of k.
    let mut result = 1u32 << 31;
    let mut base = 1u32 << 30;
    while k > 0 {
        if k & 1 != 0 {
            result = multiply(result, base);
        }
        base = multiply(base, base);
        k >>= 1;
    }
    result
}

/// `SHIFT[p][v][k][nibble]`: nibble `k` of a register holding `nibble`, times `x^(8·v·16^p)`.
/// The product of a register `r` with `x^(8·v·16^p)` is the xor of the eight entries of its
/// nibbles (multiplication is linear), so a shift by `n` zero bytes is 32 table reads, one per
/// nibble of `r` for each hex digit of `n`: no multiplication, no branch and no mask at run
/// time. The BPF verifier forks its state on every `x s>> 63 & constant` that a bit-by-bit
/// multiplication compiles to, which it cannot walk. 32 KiB in the object's read-only data.
static SHIFT: [[[[u32; 16]; 8]; 16]; 4] = {
    let mut table = [[[[0u32; 16]; 8]; 16]; 4];
    let mut p = 0;
    while p < 4 {
        let mut v = 0;
        while v < 16 {
            let factor = x_pow(8 * v as u32 * (1 << (4 * p)));
            let mut k = 0;
            while k < 8 {
                let mut nibble = 0;
                while nibble < 16 {
                    table[p][v][k][nibble] = multiply((nibble as u32) << (4 * k), factor);
                    nibble += 1;
                }
                k += 1;
            }
            v += 1;
        }
        p += 1;
    }
    table
};

/// The register `r` run over `n` zero bytes: `r · x^(8n)`.
#[inline(always)]
pub fn skip_zero_bytes(mut r: u32, n: u16) -> u32 {
    let mut p = 0;
    while p < 4 {
        let digit = usize::from((n >> (4 * p)) & 0xf);
        let table = &SHIFT[p][digit];
        let mut shifted = 0;
        let mut k = 0;
        while k < 8 {
            shifted ^= table[k][((r >> (4 * k)) & 0xf) as usize];
            k += 1;
        }
        r = shifted;
        p += 1;
    }
    r
}

/// What to xor into an SCTP checksum (read as a little-endian `u32`) when the two bytes of a
/// port change from `old` to `new` (both as they are on the wire, read as native `u16`) and
/// `bytes_after` bytes of the SCTP packet follow them (at most 65,533).
#[inline(always)]
pub fn port_change(old: u16, new: u16, bytes_after: u16) -> u32 {
    // The raw CRC of two bytes [d0, d1] from zero is the register d0 | d1 << 8 run over two
    // zero bytes (in the reflected form the second byte sits 8 bits further from x^0).
    let [d0, d1] = (old ^ new).to_ne_bytes();
    skip_zero_bytes(u32::from(d0) | u32::from(d1) << 8, bytes_after.saturating_add(2))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// CRC32c byte by byte, as RFC 9260 defines it.
    fn crc32c(data: &[u8]) -> u32 {
        let mut r = !0u32;
        for b in data {
            r ^= u32::from(*b);
            for _ in 0..8 {
                r = times_x(r);
            }
        }
        !r
    }

    #[test]
    fn the_reference_crc_matches_rfc_9260_test_vectors() {
        // RFC 3720 B.4 (the same CRC32c): 32 bytes of zeros, of 0xff, and 0..31.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46dd_794e);
    }

    #[test]
    fn multiplying_by_x_to_the_eight_is_a_zero_byte() {
        for r in [1u32, 0x8000_0000, 0xdead_beef, 0x1234_5678] {
            let mut byte = r;
            for _ in 0..8 {
                byte = times_x(byte);
            }
            assert_eq!(skip_zero_bytes(r, 1), byte);
            assert_eq!(skip_zero_bytes(r, 0), r);
            let mut many = r;
            for _ in 0..1000 {
                many = skip_zero_bytes(many, 1);
            }
            assert_eq!(skip_zero_bytes(r, 1000), many);
        }
    }

    #[test]
    fn a_port_change_updates_the_checksum_as_a_full_recomputation_does() {
        // An SCTP packet: ports, verification tag, checksum (zero while computing), a chunk.
        for len in [12usize, 16, 28, 100, 1480, 9000, 65_000] {
            let mut packet: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            packet[8..12].fill(0);
            for (offset, old, new) in [(2usize, 80u16, 8080u16), (0, 8080, 80), (2, 1, 65535)] {
                packet[offset..offset + 2].copy_from_slice(&old.to_be_bytes());
                let before = crc32c(&packet);
                packet[offset..offset + 2].copy_from_slice(&new.to_be_bytes());
                let after = crc32c(&packet);
                let wire = |p: u16| u16::from_ne_bytes(p.to_be_bytes());
                let delta = port_change(wire(old), wire(new), (len - offset - 2) as u16);
                assert_eq!(before ^ delta, after, "length {len}, port at {offset}: {old} → {new}");
            }
        }
    }
}
