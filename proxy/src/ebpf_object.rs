//! ferry's eBPF object, embedded at build time.
//!
//! `build.rs` builds the `proxy-ebpf` crate for `bpfel-unknown-none` (see `cargo xtask setup`
//! for the toolchain) and this module includes the result, so the `ferry` binary carries the
//! exact programs it was built with. Load it through `backend::ebpf::kernel` (`Kernel::load`,
//! or `load_object` for the programs alone): its kfunc placeholder must be linked for the
//! running kernel first (`backend::ebpf::kernel_skb`). The program and map names, and the map
//! key and value types, are in `proxy_common`.

/// The ELF object holding ferry's eBPF programs and maps, 8-byte aligned as aya's parser wants.
pub static BYTES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-ebpf"));

#[cfg(test)]
mod tests {
    use super::BYTES;

    #[test]
    fn embedded_object_is_a_little_endian_elf64_for_bpf() {
        assert_eq!(&BYTES[..4], b"\x7fELF", "ELF magic");
        assert_eq!(BYTES[4], 2, "ELFCLASS64");
        assert_eq!(BYTES[5], 1, "ELFDATA2LSB");
        // e_machine at offset 18: EM_BPF = 247.
        assert_eq!(u16::from_le_bytes([BYTES[18], BYTES[19]]), 247, "EM_BPF");
        assert_eq!(BYTES.as_ptr().align_offset(8), 0, "8-byte aligned");
    }
}
