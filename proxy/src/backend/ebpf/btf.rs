//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to link the TC programs' access
//! to `struct sk_buff` (see [`super::kernel_skb`]): a function's type id, and the bit offset of
//! a struct member, anonymous unions and structs included.
//!
//! aya-obj parses BTF too, but keeps struct members private; the format is small and stable
//! (include/uapi/linux/btf.h), so reading it here costs less than another dependency.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF: magic {0:#06x}")]
    Magic(u16),
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("type {0} has unknown kind {1}")]
    UnknownKind(u32, u32),
}

const MAGIC: u16 = 0xeb9f;

/// BTF kinds this reader looks into (the others are only skipped).
mod kind {
    pub const INT: u32 = 1;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const TYPE_TAG: u32 = 18;
}

/// Bytes that follow a type's 12-byte header, by kind (`vlen`: the kind's item count).
fn trailing_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        2 | 7..=12 | 16 | 18 => 0,
        1 | 14 | 17 => 4,
        3 => 12,
        4 | 5 | 15 | 19 => 12 * vlen,
        6 | 13 => 8 * vlen,
        _ => return None,
    })
}

/// A parsed BTF blob: the start of every type in the type section, by id (id 0 is `void`).
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    starts: Vec<usize>,
}

/// One type's header.
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    vlen: usize,
    /// `size` or `type`, by kind.
    size_or_type: u32,
    /// Offset of the trailing data in the type section.
    rest: usize,
}

/// A struct member's place: bit offset from the start of the outermost struct and, for a
/// bitfield, its width (0 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberPlace {
    pub bit_offset: u32,
    pub bits: u32,
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, BtfError> {
    bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or(BtfError::Truncated(at))
}

impl<'a> Btf<'a> {
    /// Parses a little-endian BTF blob (the kernel's own, on the little-endian hosts ferry runs
    /// on).
    pub fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        let magic = data.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]])).ok_or(BtfError::Truncated(0))?;
        if magic != MAGIC {
            return Err(BtfError::Magic(magic));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let [type_off, type_len, str_off, str_len] =
            [8, 12, 16, 20].map(|at| u32_at(data, at).map(|v| v as usize));
        let (type_off, type_len, str_off, str_len) = (type_off?, type_len?, str_off?, str_len?);
        let section = |off: usize, len: usize| {
            let start = hdr_len + off;
            data.get(start..start + len).ok_or(BtfError::Truncated(start + len))
        };
        let (types, strings) = (section(type_off, type_len)?, section(str_off, str_len)?);
        let mut starts = vec![0];
        let mut at = 0;
        while at < types.len() {
            let info = u32_at(types, at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let rest = trailing_len(kind, (info & 0xffff) as usize)
                .ok_or(BtfError::UnknownKind(starts.len() as u32, kind))?;
            starts.push(at);
            at += 12 + rest;
        }
        if at != types.len() {
            return Err(BtfError::Truncated(at));
        }
        Ok(Self { types, strings, starts })
    }

    fn ty(&self, id: u32) -> Option<Type> {
        let at = *self.starts.get(id as usize).filter(|_| id != 0)?;
        let info = u32_at(self.types, at + 4).ok()?;
        Some(Type {
            name_off: u32_at(self.types, at).ok()?,
            kind: (info >> 24) & 0x1f,
            kind_flag: info >> 31 == 1,
            vlen: (info & 0xffff) as usize,
            size_or_type: u32_at(self.types, at + 8).ok()?,
            rest: at + 12,
        })
    }

    fn name(&self, off: u32) -> &str {
        let tail = self.strings.get(off as usize..).unwrap_or_default();
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).unwrap_or_default()
    }

    /// The id of the first type named `name` of kind `kind`.
    fn find(&self, name: &str, kind: u32) -> Option<u32> {
        (1..self.starts.len() as u32)
            .find(|&id| self.ty(id).is_some_and(|t| t.kind == kind && self.name(t.name_off) == name))
    }

    /// The type id of the function `name` (a kfunc's id for a `call` instruction).
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.find(name, kind::FUNC)
    }

    /// Where `member` is in `struct strukt`, looking into anonymous unions and structs.
    pub fn member(&self, strukt: &str, member: &str) -> Option<MemberPlace> {
        self.member_in(self.find(strukt, kind::STRUCT)?, member, 0)
    }

    /// `id` with typedefs and qualifiers stripped: the type and its id.
    fn resolve(&self, mut id: u32) -> Option<(u32, Type)> {
        for _ in 0..16 {
            let t = self.ty(id)?;
            match t.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some((id, t)),
            }
        }
        None
    }

    fn member_in(&self, id: u32, member: &str, depth: u32) -> Option<MemberPlace> {
        let t = self.ty(id)?;
        if depth > 8 || !matches!(t.kind, kind::STRUCT | kind::UNION) {
            return None;
        }
        for i in 0..t.vlen {
            let at = t.rest + 12 * i;
            let (name_off, mtype, offset) = (
                u32_at(self.types, at).ok()?,
                u32_at(self.types, at + 4).ok()?,
                u32_at(self.types, at + 8).ok()?,
            );
            // With kind_flag, the offset word holds the bitfield width in its top byte.
            let (bit_offset, bits) =
                if t.kind_flag { (offset & 0xff_ffff, offset >> 24) } else { (offset, 0) };
            if name_off != 0 && self.name(name_off) == member {
                let (_, resolved) = self.resolve(mtype)?;
                if bits == 0 && resolved.kind == kind::INT {
                    // Without kind_flag, a bitfield is an INT whose encoding gives offset and width.
                    let enc = u32_at(self.types, resolved.rest).ok()?;
                    let (int_offset, int_bits) = ((enc >> 16) & 0xff, enc & 0xff);
                    if int_bits != resolved.size_or_type * 8 {
                        return Some(MemberPlace { bit_offset: bit_offset + int_offset, bits: int_bits });
                    }
                }
                return Some(MemberPlace { bit_offset, bits });
            }
            if name_off == 0 {
                let (inner_id, inner) = self.resolve(mtype)?;
                if matches!(inner.kind, kind::STRUCT | kind::UNION)
                    && let Some(found) = self.member_in(inner_id, member, depth + 1)
                {
                    return Some(MemberPlace { bit_offset: bit_offset + found.bit_offset, ..found });
                }
            }
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a BTF blob from (name, info, size_or_type, trailing words) types.
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        pub(crate) fn new() -> Self {
            Self { types: Vec::new(), strings: vec![0] }
        }

        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        pub(crate) fn add(
            &mut self,
            name: &str,
            kind: u32,
            kind_flag: bool,
            vlen: u32,
            size_or_type: u32,
            rest: &[u32],
        ) {
            let name = self.string(name);
            let info = kind << 24 | u32::from(kind_flag) << 31 | vlen;
            for w in [name, info, size_or_type].iter().chain(rest) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }

        /// A struct member triple with its name interned.
        pub(crate) fn member(&mut self, name: &str, ty: u32, offset: u32) -> [u32; 3] {
            [self.string(name), ty, offset]
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [24, 0, self.types.len() as u32, self.types.len() as u32, self.strings.len() as u32] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A `struct sk_buff` shaped like the kernel's: `ip_summed` is a bitfield in an anonymous
    /// struct inside an anonymous union, behind a typedef'd `__u8`.
    pub(crate) fn sk_buff_like() -> Vec<u8> {
        let mut b = Builder::new();
        b.add("unsigned char", kind::INT, false, 0, 1, &[8]); // 1
        b.add("__u8", kind::TYPEDEF, false, 0, 1, &[]); // 2
        let pkt_type = b.member("pkt_type", 2, 3 << 24);
        let ip_summed = b.member("ip_summed", 2, 2 << 24 | 5);
        b.add("", kind::STRUCT, true, 2, 1, &[pkt_type, ip_summed].concat()); // 3
        let anon = b.member("", 3, 0);
        b.add("", kind::UNION, false, 1, 1, &anon); // 4
        let len = b.member("len", 1, 0);
        let group = b.member("", 4, 128 * 8);
        b.add("sk_buff", kind::STRUCT, false, 2, 232, &[len, group].concat()); // 5
        b.add("bpf_cast_to_kern_ctx", kind::FUNC, false, 0, 0, &[]); // 6
        b.build()
    }

    #[test]
    fn finds_a_bitfield_member_through_anonymous_unions_and_structs() {
        let data = sk_buff_like();
        let btf = Btf::parse(&data).expect("parses");
        assert_eq!(
            btf.member("sk_buff", "ip_summed"),
            Some(MemberPlace { bit_offset: 128 * 8 + 5, bits: 2 })
        );
        assert_eq!(btf.member("sk_buff", "len"), Some(MemberPlace { bit_offset: 0, bits: 0 }));
        assert_eq!(btf.member("sk_buff", "nope"), None);
        assert_eq!(btf.member("sock", "ip_summed"), None);
        assert_eq!(btf.func_id("bpf_cast_to_kern_ctx"), Some(6));
        assert_eq!(btf.func_id("sk_buff"), None, "a struct is not a function");
    }

    #[test]
    fn rejects_other_data_and_truncated_blobs() {
        let data = sk_buff_like();
        assert!(matches!(Btf::parse(b"\x7fELF\x02\x01\x01\x00"), Err(BtfError::Magic(_))));
        assert!(matches!(Btf::parse(&data[..data.len() - 40]), Err(BtfError::Truncated(_))));
    }

    /// The running kernel's own BTF, where it has one: the member the programs read exists
    /// and is a 2-bit field within one byte.
    #[test]
    fn reads_the_running_kernels_sk_buff() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else { return };
        let btf = Btf::parse(&data).expect("the kernel's BTF parses");
        let place = btf.member("sk_buff", "ip_summed").expect("sk_buff has ip_summed");
        assert_eq!(place.bits, 2);
        assert!(place.bit_offset % 8 + 2 <= 8, "{place:?}");
    }
}
