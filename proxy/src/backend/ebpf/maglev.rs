//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) for external frontends.
//!
//! Every endpoint gets a pseudo-random permutation of the table's `m` slots (an offset and a
//! skip derived from its address); endpoints take turns claiming their next free preferred
//! slot until the table is full. Each endpoint ends up with ⌊m/n⌋ or ⌈m/n⌉ slots, and removing
//! one endpoint moves little more than the slots it owned: close to 1/n of the flows. `m` must
//! be a prime so that every skip generates a full permutation; ferry's default is 65,537.

use std::net::SocketAddr;

/// Default table size, a prime (the largest the map value holds: `MAGLEV_MAX_SIZE`).
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// Whether `n` is prime (trial division; table sizes are small).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The lookup table for `endpoints` with `m` slots: entry `i` is the index (into `endpoints`)
/// of the endpoint serving hash `i`. Empty when there are no endpoints.
pub fn table(endpoints: &[SocketAddr], m: u32) -> Vec<u32> {
    let n = endpoints.len();
    if n == 0 || m == 0 {
        return Vec::new();
    }
    let m64 = u64::from(m);
    let perms: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|ep| {
            let name = ep.to_string();
            let offset = fnv1a(name.as_bytes(), 0xcbf2_9ce4_8422_2325) % m64;
            let skip = if m > 1 { fnv1a(name.as_bytes(), 0x8422_2325_cbf2_9ce4) % (m64 - 1) + 1 } else { 1 };
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entries = vec![u32::MAX; m as usize];
    let mut filled = 0usize;
    loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % m64) as usize;
            while entries[slot] != u32::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m64) as usize;
            }
            entries[slot] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m as usize {
                return entries;
            }
        }
    }
}

/// FNV-1a with a chosen offset basis, then a 64-bit finaliser (splitmix64) for well-spread
/// low bits. Stable across runs and versions, so every node computes the same table.
fn fnv1a(bytes: &[u8], basis: u64) -> u64 {
    let mut h = basis;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{FlowKey, flow_hash, ipv4_mapped, protocol};

    fn endpoints(n: usize) -> Vec<SocketAddr> {
        (0..n).map(|i| SocketAddr::from(([10, 0, (i / 200) as u8, (i % 200) as u8 + 10], 8080))).collect()
    }

    /// Flows as the TC program hashes them: external clients to one NodePort.
    fn flows(count: u32) -> impl Iterator<Item = u32> {
        (0..count).map(|i| {
            flow_hash(&FlowKey {
                saddr: ipv4_mapped([198, 18, (i >> 8) as u8, i as u8]),
                daddr: ipv4_mapped([192, 168, 0, 10]),
                sport: (1024 + (i % 50_000) as u16).to_be(),
                dport: 30080u16.to_be(),
                protocol: protocol::TCP,
                _pad: [0; 3],
            })
        })
    }

    #[test]
    fn default_table_size_is_prime() {
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(251) && !is_prime(255) && !is_prime(1));
    }

    #[test]
    fn every_endpoint_gets_an_almost_equal_share_of_the_table() {
        for n in [1, 3, 10, 100] {
            let t = table(&endpoints(n), DEFAULT_TABLE_SIZE);
            let mut shares = vec![0usize; n];
            for &e in &t {
                shares[e as usize] += 1;
            }
            let ideal = DEFAULT_TABLE_SIZE as usize / n;
            for (i, &s) in shares.iter().enumerate() {
                assert!(s.abs_diff(ideal) <= 1, "n={n}: endpoint {i} has {s} slots, ideal {ideal}");
            }
        }
    }

    /// The requirement: removing one of N endpoints remaps close to 1/N of the flows.
    /// Measured over 200,000 flows hashed as the TC program does; printed with `--nocapture`.
    #[test]
    fn removing_one_of_n_endpoints_remaps_close_to_one_nth_of_the_flows() {
        for n in [5usize, 10, 50] {
            let before_eps = endpoints(n);
            let removed = before_eps[n / 2];
            let after_eps: Vec<SocketAddr> = before_eps.iter().copied().filter(|e| *e != removed).collect();
            let before = table(&before_eps, DEFAULT_TABLE_SIZE);
            let after = table(&after_eps, DEFAULT_TABLE_SIZE);
            let total = 200_000u32;
            let mut moved = 0u32;
            for h in flows(total) {
                let slot = (h % DEFAULT_TABLE_SIZE) as usize;
                if before_eps[before[slot] as usize] != after_eps[after[slot] as usize] {
                    moved += 1;
                }
            }
            let fraction = f64::from(moved) / f64::from(total);
            let ideal = 1.0 / n as f64;
            println!(
                "maglev: n={n} removing one endpoint remapped {:.2}% of flows (1/n = {:.2}%)",
                fraction * 100.0,
                ideal * 100.0
            );
            assert!(fraction >= ideal * 0.9, "n={n}: {fraction} below 1/n");
            assert!(fraction <= ideal * 1.3, "n={n}: {fraction} far above 1/n = {ideal}");
        }
    }
}
