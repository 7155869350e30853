//! Links the TC programs' read of the packet's checksum state (see
//! `proxy_common::kernel_skb`): finds `bpf_cast_to_kern_ctx` and `sk_buff.ip_summed` in the
//! kernel's BTF and rewrites the object's placeholder instructions before aya parses it.
//!
//! Knowing the state, the programs update the transport checksum in the same store as the
//! headers (one helper call per translated packet instead of three). Where the kernel has no
//! such kfunc (before Linux 6.2) or no BTF, the placeholders become `r0 = 0` and the programs
//! keep the `bpf_l4_csum_replace` path, which works everywhere.

use std::path::Path;

use proxy_common::kernel_skb as ks;

use super::btf::Btf;

/// Where the running kernel lets the programs read `ip_summed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkbAccess {
    /// BTF id of `bpf_cast_to_kern_ctx` in the kernel's BTF.
    pub kfunc_id: u32,
    /// Byte of `struct sk_buff` holding `ip_summed`, and the shift of its two bits in it.
    pub ip_summed_offset: u32,
    pub ip_summed_shift: u32,
}

/// Why the programs use the helper path: shown once at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoAccess {
    /// No readable BTF (the error says why).
    NoBtf(String),
    /// The kernel's BTF has no `bpf_cast_to_kern_ctx` (Linux < 6.2).
    NoKfunc,
    /// `sk_buff.ip_summed` is missing or not a 2-bit field within one byte.
    NoField,
    /// Turned off (`ProgramSettings::checksum_helpers_only`).
    Disabled,
}

impl std::fmt::Display for NoAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoBtf(e) => write!(f, "no kernel BTF ({e})"),
            Self::NoKfunc => write!(f, "the kernel has no {} (Linux < 6.2)", ks::KFUNC),
            Self::NoField => write!(f, "sk_buff.ip_summed is not a 2-bit field within one byte"),
            Self::Disabled => write!(f, "turned off"),
        }
    }
}

/// The kernel BTF ferry reads.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Looks the kfunc and the field up in the kernel BTF at `path`.
pub fn probe(path: &Path) -> Result<SkbAccess, NoAccess> {
    let data = std::fs::read(path).map_err(|e| NoAccess::NoBtf(format!("{}: {e}", path.display())))?;
    probe_btf(&data)
}

/// [`probe`] on a BTF blob.
pub fn probe_btf(data: &[u8]) -> Result<SkbAccess, NoAccess> {
    let btf = Btf::parse(data).map_err(|e| NoAccess::NoBtf(e.to_string()))?;
    let kfunc_id = btf.func_id(ks::KFUNC).ok_or(NoAccess::NoKfunc)?;
    let place = btf.member("sk_buff", "ip_summed").ok_or(NoAccess::NoField)?;
    // Little-endian bitfields count from the low bit of their first byte.
    let shift = place.bit_offset % 8;
    if place.bits != 2 || shift + place.bits > 8 {
        return Err(NoAccess::NoField);
    }
    Ok(SkbAccess { kfunc_id, ip_summed_offset: place.bit_offset / 8, ip_summed_shift: shift })
}

/// An object with its placeholders rewritten, 8-byte aligned as aya's parser wants.
pub struct LinkedObject {
    buf: Vec<u8>,
    start: usize,
    len: usize,
    /// How many placeholder instructions were rewritten.
    pub placeholders: usize,
}

impl LinkedObject {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// Rewrites every placeholder instruction of `object` into the kfunc call (`access`) or into
/// `r0 = 0`. Instructions sit at 8-byte offsets of the file (sections of BPF code are 8-byte
/// aligned), so only those are compared; the placeholder's immediate is no BTF id or offset a
/// compiler emits, and a stray match elsewhere would only be code the verifier checks.
pub fn link(object: &[u8], access: Option<&SkbAccess>) -> LinkedObject {
    let replacement = match access {
        Some(a) => (ks::PLACEHOLDER & 0xffff_ffff) | u64::from(a.kfunc_id) << 32,
        None => ks::NULL,
    };
    // The copy starts at the buffer's first 8-aligned byte (the buffer never reallocates).
    let mut buf = vec![0u8; object.len() + 7];
    let start = buf.as_ptr().align_offset(8).min(7);
    let copy = &mut buf[start..start + object.len()];
    copy.copy_from_slice(object);
    let mut placeholders = 0;
    for insn in copy.chunks_exact_mut(8) {
        if insn == ks::PLACEHOLDER.to_le_bytes() {
            insn.copy_from_slice(&replacement.to_le_bytes());
            placeholders += 1;
        }
    }
    LinkedObject { buf, start, len: object.len(), placeholders }
}

#[cfg(test)]
mod tests {
    use super::super::btf::tests::{Builder, sk_buff_like};
    use super::*;

    #[test]
    fn probes_the_kfunc_and_the_field() {
        let access = probe_btf(&sk_buff_like()).expect("found");
        assert_eq!(access, SkbAccess { kfunc_id: 6, ip_summed_offset: 128, ip_summed_shift: 5 });
        let mut without = Builder::new();
        without.add("unsigned char", 1, false, 0, 1, &[8]);
        assert_eq!(probe_btf(&without.build()), Err(NoAccess::NoKfunc));
        assert!(matches!(probe_btf(b"nope"), Err(NoAccess::NoBtf(_))));
    }

    #[test]
    fn rewrites_only_aligned_placeholders() {
        let mut object = vec![0xaau8; 3];
        object.extend_from_slice(&ks::PLACEHOLDER.to_le_bytes()); // at offset 3: not an instruction
        object.resize(16, 0);
        object.extend_from_slice(&ks::PLACEHOLDER.to_le_bytes()); // at offset 16
        object.extend_from_slice(&[1, 2, 3]);
        let access = SkbAccess { kfunc_id: 0x1234, ip_summed_offset: 0, ip_summed_shift: 0 };
        let linked = link(&object, Some(&access));
        assert_eq!(linked.placeholders, 1);
        assert_eq!(linked.bytes().len(), object.len());
        assert_eq!(&linked.bytes()[..16], &object[..16]);
        assert_eq!(&linked.bytes()[16..24], &[0x85, 0x20, 0, 0, 0x34, 0x12, 0, 0]);
        assert_eq!(&linked.bytes()[24..], &[1, 2, 3]);
        assert_eq!(linked.bytes().as_ptr().align_offset(8), 0);
        let null = link(&object, None);
        assert_eq!(&null.bytes()[16..24], &[0xb7, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn ferrys_object_carries_the_placeholder() {
        let linked = link(crate::ebpf_object::BYTES, None);
        assert!(
            linked.placeholders >= 2,
            "ingress and egress read the checksum state: {}",
            linked.placeholders
        );
    }
}
