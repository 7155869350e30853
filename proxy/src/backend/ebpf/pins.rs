//! Pinned maps left by an earlier ferry, checked against this ferry's object before it loads.
//!
//! aya reuses a map pinned under the map's name whatever its definition. That is what keeps
//! the data path across a restart, but a map pinned by a ferry whose programs laid it out
//! differently (an upgrade that changed a key or value struct, a counter added to `STATS`)
//! would be handed to programs that read it wrongly, or fail their verification. So each pin
//! is compared first: a map of another layout is unpinned, and the load creates it afresh (the
//! programs attached now keep the old one until the new programs replace them, which happens
//! after the first full sync has filled the new maps); a map that only has another capacity
//! than configured keeps its entries and its size, with a warning, since resizing would drop
//! the connections it holds.

use std::path::Path;

use aya::maps::MapData;
use tracing::warn;

use super::MapSizes;
use super::kernel::KernelError;

/// What a program relies on in a map, and its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    /// `bpf_map_type`.
    pub kind: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
    pub max_entries: u32,
}

/// What a load does with a pinned map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinVerdict {
    /// The programs can use it as it is.
    Reuse,
    /// Same layout, another capacity than configured: reused, keeping its entries and its size.
    ReuseOtherCapacity,
    /// Another layout: unpinned and created afresh; its entries are lost.
    Replace,
}

/// The verdict for a map pinned as `pinned` when the object wants `wanted`. `sized` says
/// whether `max_entries` is a configurable capacity ([`MapSizes`]); otherwise it is part of the
/// layout (the number of counters in `STATS`, the words of the frontend filter).
pub fn verdict(pinned: MapShape, wanted: MapShape, sized: bool) -> PinVerdict {
    let layout = |s: MapShape| (s.kind, s.key_size, s.value_size, s.flags);
    if layout(pinned) != layout(wanted) || (!sized && pinned.max_entries != wanted.max_entries) {
        PinVerdict::Replace
    } else if pinned.max_entries != wanted.max_entries {
        PinVerdict::ReuseOtherCapacity
    } else {
        PinVerdict::Reuse
    }
}

/// Checks every map pinned in `dir` (`<bpffs>/ferry/maps`) against `object` with `sizes`
/// applied, unpins those of another layout and warns about them and about capacities that
/// differ. Returns the names of the maps it unpinned.
pub fn check_pinned_maps(dir: &Path, object: &[u8], sizes: &MapSizes) -> Result<Vec<String>, KernelError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| setup("parsing the eBPF object", e))?;
    let configured = sizes.entries();
    let mut replaced = Vec::new();
    for name in proxy_common::maps::PINNED {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let def = obj.maps.get(name).ok_or_else(|| KernelError::Setup {
            what: name.to_owned(),
            message: "missing from the object".to_owned(),
        })?;
        let size = configured.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
        let wanted = MapShape {
            kind: def.map_type(),
            key_size: def.key_size(),
            value_size: def.value_size(),
            flags: def.map_flags(),
            max_entries: size.unwrap_or_else(|| def.max_entries()),
        };
        let pinned = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|e| setup(format!("reading {}", path.display()), e))?;
        let pinned = MapShape {
            kind: pinned.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: pinned.key_size(),
            value_size: pinned.value_size(),
            flags: pinned.map_flags(),
            max_entries: pinned.max_entries(),
        };
        match verdict(pinned, wanted, size.is_some()) {
            PinVerdict::Reuse => {}
            PinVerdict::ReuseOtherCapacity => warn!(
                map = name,
                pinned = pinned.max_entries,
                configured = wanted.max_entries,
                "a pinned eBPF map keeps the capacity it was created with (resizing would drop its \
                 entries); `ferry cleanup` and a restart apply the configured one"
            ),
            PinVerdict::Replace => {
                warn!(
                    map = name,
                    ?pinned,
                    ?wanted,
                    "a pinned eBPF map has another layout than this ferry's programs (left by \
                     another version): it is created afresh, and what it held is dropped"
                );
                std::fs::remove_file(&path).map_err(|e| setup(format!("unpinning {}", path.display()), e))?;
                replaced.push(name.to_owned());
            }
        }
    }
    Ok(replaced)
}

fn setup(what: impl Into<String>, e: impl std::fmt::Display) -> KernelError {
    KernelError::Setup { what: what.into(), message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: MapShape = MapShape { kind: 1, key_size: 16, value_size: 8, flags: 0, max_entries: 1024 };

    #[test]
    fn a_pinned_map_is_reused_unless_its_layout_differs() {
        assert_eq!(verdict(HASH, HASH, true), PinVerdict::Reuse);
        let bigger = MapShape { max_entries: 4096, ..HASH };
        assert_eq!(verdict(HASH, bigger, true), PinVerdict::ReuseOtherCapacity);
        // Where the entry count is the layout (STATS's counters), it is replaced.
        assert_eq!(verdict(HASH, bigger, false), PinVerdict::Replace);
        for other in [
            MapShape { kind: 9, ..HASH },
            MapShape { key_size: 40, ..HASH },
            MapShape { value_size: 16, ..HASH },
            MapShape { flags: 1, ..HASH },
        ] {
            assert_eq!(verdict(HASH, other, true), PinVerdict::Replace, "{other:?}");
            assert_eq!(verdict(other, HASH, true), PinVerdict::Replace, "{other:?}");
        }
    }
}
