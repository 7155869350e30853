//! What the kernel's interval sets hold, read back in the text ferry writes them in, for a
//! full sync that does not know it from its own last sync (a restarted ferry adopting the
//! table, or the sync after a failure). It can then write only their changes instead of
//! flushing and refilling them, which Linux 6.1 lookups miss during (`FamilyState::full_split`).
//!
//! ferry's text: single-field sets hold prefixes (`10.0.0.0/16`, a host as `/32`), and
//! `firewall_allow` holds `address . proto . port . prefix`. nft lists a host prefix as a bare
//! address and adjacent prefixes of an `auto-merge` set as one range (`a-b`): the former is
//! normalized, the latter compared as address intervals.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use super::family::Fam;
use super::layout::{AUTO_MERGED, INTERVAL_SETS};
use super::state::{RangeElements, TABLE};
use super::{NftError, NftRunner};

/// The interval sets of `fam`'s table that exist (`have_sets`), read from the kernel. The
/// `auto-merge` ones that cover the same addresses as `wanted` are given as `wanted`, whatever
/// ranges the kernel merged them into.
pub fn read(
    runner: &mut dyn NftRunner,
    fam: Fam,
    have_sets: &BTreeSet<String>,
    wanted: &RangeElements,
) -> Result<RangeElements, NftError> {
    let mut out = BTreeMap::new();
    for set in INTERVAL_SETS.into_iter().filter(|s| have_sets.contains(*s)) {
        let json = runner.list_json(&["list", "set", fam.ip, TABLE, set])?;
        let held =
            parse_set(&json).map_err(|e| NftError::Listing(format!("{} {TABLE} {set}: {e}", fam.ip)))?;
        let same_addresses = AUTO_MERGED.contains(&set)
            && wanted.get(set).is_some_and(
                |w| matches!((intervals(w.iter()), intervals(held.iter())), (Some(a), Some(b)) if a == b),
            );
        out.insert(set, if same_addresses { wanted.get(set).cloned().unwrap_or_default() } else { held });
    }
    Ok(out)
}

/// The elements of the one set in `nft -j list set` output.
fn parse_set(json: &str) -> Result<BTreeSet<String>, String> {
    let doc: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let items = doc.get("nftables").and_then(Value::as_array).ok_or("no \"nftables\" array")?;
    let set = items.iter().find_map(|i| i.get("set")).ok_or("no set in the listing")?;
    let Some(elems) = set.get("elem") else { return Ok(BTreeSet::new()) };
    let elems = elems.as_array().ok_or("\"elem\" is not an array")?;
    elems.iter().map(element).collect()
}

fn element(v: &Value) -> Result<String, String> {
    // An element with attributes (timeout, comment) is wrapped: {"elem": {"val": …}}.
    let v = v.get("elem").and_then(|e| e.get("val")).unwrap_or(v);
    match v.get("concat").and_then(Value::as_array) {
        Some(parts) => {
            let last = parts.len().saturating_sub(1);
            let texts: Result<Vec<String>, String> =
                parts.iter().enumerate().map(|(i, p)| component(p, i == last)).collect();
            Ok(texts?.join(" . "))
        }
        None => component(v, true),
    }
}

/// One value; `ranged`: the field of the set's interval (written as a prefix by ferry).
fn component(v: &Value, ranged: bool) -> Result<String, String> {
    if let Some(n) = v.as_u64() {
        return Ok(n.to_string());
    }
    if let Some(s) = v.as_str() {
        return Ok(match s.parse::<IpAddr>() {
            Ok(ip) if ranged => IpNet::from(ip).to_string(),
            Ok(ip) => ip.to_string(),
            Err(_) => s.to_owned(),
        });
    }
    if let Some(p) = v.get("prefix") {
        let addr = p.get("addr").and_then(Value::as_str).and_then(|a| a.parse::<IpAddr>().ok());
        let len = p.get("len").and_then(Value::as_u64).and_then(|l| u8::try_from(l).ok());
        return match (addr, len) {
            (Some(a), Some(l)) => IpNet::new(a, l).map(|n| n.trunc().to_string()).map_err(|e| e.to_string()),
            _ => Err(format!("unreadable prefix {p}")),
        };
    }
    if let Some([a, b]) = v.get("range").and_then(Value::as_array).map(Vec::as_slice) {
        let (Some(a), Some(b)) = (a.as_str(), b.as_str()) else {
            return Err(format!("unreadable range {v}"));
        };
        return Ok(format!("{a}-{b}"));
    }
    Err(format!("unreadable value {v}"))
}

/// The addresses that elements of a single-field set cover, as merged intervals (None: an
/// element that is not an address, prefix or range).
fn intervals<'a>(elements: impl Iterator<Item = &'a String>) -> Option<Vec<(u128, u128)>> {
    let mut spans = Vec::new();
    for e in elements {
        let span = match e.split_once('-') {
            Some((a, b)) => (bits(a.parse().ok()?), bits(b.parse().ok()?)),
            None => {
                let net: IpNet = e.parse().ok()?;
                (bits(net.network()), bits(net.broadcast()))
            }
        };
        spans.push(span);
    }
    spans.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    Some(merged)
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "ip", "name": "firewall_allow", "table": "ferry", "type": ["ipv4_addr", "inet_proto", "inet_service", "ipv4_addr"], "flags": ["interval"], "elem": [{"concat": ["198.18.0.77", "udp", 54, {"prefix": {"addr": "10.0.1.0", "len": 24}}]}, {"concat": ["198.18.0.77", "tcp", 80, "10.0.1.7"]}, {"concat": ["198.18.0.78", "tcp", 80, {"range": ["10.0.0.0", "10.0.0.5"]}]}]}}]}"#;

    #[test]
    fn listed_elements_read_as_ferry_writes_them() {
        let read = parse_set(LISTING).expect("parse");
        let expected: BTreeSet<String> = [
            "198.18.0.77 . udp . 54 . 10.0.1.0/24",
            "198.18.0.77 . tcp . 80 . 10.0.1.7/32",
            "198.18.0.78 . tcp . 80 . 10.0.0.0-10.0.0.5",
        ]
        .map(String::from)
        .into();
        assert_eq!(read, expected);
        let v6 = r#"{"nftables": [{"set": {"name": "pod_cidrs", "elem": [{"prefix": {"addr": "fd00:10::", "len": 64}}, "fd00::1"]}}]}"#;
        assert_eq!(parse_set(v6).expect("parse"), ["fd00:10::/64", "fd00::1/128"].map(String::from).into());
        let empty = r#"{"nftables": [{"set": {"name": "pod_cidrs"}}]}"#;
        assert!(parse_set(empty).expect("parse").is_empty());
        assert!(parse_set(r#"{"nftables": [{"set": {"elem": [{"what": 1}]}}]}"#).is_err());
    }

    #[test]
    fn merged_ranges_cover_the_same_addresses_as_the_prefixes_they_came_from() {
        let texts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let prefixes = texts(&["10.1.0.0/16", "10.2.0.0/16", "10.4.0.0/16"]);
        let merged = texts(&["10.1.0.0-10.2.255.255", "10.4.0.0/16"]);
        assert_eq!(intervals(prefixes.iter()), intervals(merged.iter()));
        assert_ne!(intervals(texts(&["10.1.0.0/16"]).iter()), intervals(merged.iter()));
        assert_eq!(intervals(texts(&["udp"]).iter()), None);
    }
}
