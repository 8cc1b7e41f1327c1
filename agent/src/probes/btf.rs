//! Just enough of a BTF reader (`Documentation/bpf/btf.rst`) to find struct member offsets and
//! tracepoint prototypes in `/sys/kernel/btf/vmlinux`. Rust eBPF objects carry no CO-RE
//! relocations, so offsets the programs need inside kernel structs are computed here and passed
//! to the programs as globals. aya-obj's parser keeps type lookups private, and the format is
//! small and stable (a header, a type section, a string section).

use std::collections::HashMap;

pub(crate) const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One BTF type: its kind, name, `size`-or-`type` word and the offset of its trailing data.
#[derive(Clone, Copy, Debug)]
struct TypeEntry {
    kind: u32,
    kind_flag: bool,
    vlen: usize,
    name_off: u32,
    size_or_type: u32,
    extra: usize,
}

/// Parsed kernel BTF: the type table (indexed by type id) over the raw bytes.
#[derive(Debug)]
pub(crate) struct KernelBtf {
    data: Vec<u8>,
    strings: usize,
    strings_len: usize,
    types: Vec<TypeEntry>,
    by_name: HashMap<(u32, String), Vec<u32>>,
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn usize_of(v: u32) -> usize {
    usize::try_from(v).expect("usize holds u32 on supported targets")
}

impl KernelBtf {
    pub(crate) fn read_vmlinux() -> Result<Self, String> {
        let data = std::fs::read(VMLINUX).map_err(|e| {
            format!("cannot read {VMLINUX}: {e}; the kernel needs CONFIG_DEBUG_INFO_BTF")
        })?;
        Self::parse(data)
    }

    /// Parses little-endian BTF (the only byte order the agent supports).
    pub(crate) fn parse(data: Vec<u8>) -> Result<Self, String> {
        let bad = |what: &str| format!("malformed BTF: {what}");
        if u16_at(&data, 0) != Some(MAGIC) {
            return Err(bad("wrong magic (not little-endian BTF)"));
        }
        let hdr_len = usize_of(u32_at(&data, 4).ok_or_else(|| bad("header"))?);
        let field = |at: usize| {
            u32_at(&data, 8 + at)
                .map(usize_of)
                .ok_or_else(|| bad("header"))
        };
        let (type_off, type_len, str_off, str_len) = (field(0)?, field(4)?, field(8)?, field(12)?);
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = hdr_len + str_off;
        if types_end > data.len() || strings + str_len > data.len() {
            return Err(bad("sections past the end"));
        }
        // Type id 0 is `void`; ids start at 1.
        let mut types = vec![TypeEntry {
            kind: 0,
            kind_flag: false,
            vlen: 0,
            name_off: 0,
            size_or_type: 0,
            extra: 0,
        }];
        let mut at = types_start;
        while at < types_end {
            let name_off = u32_at(&data, at).ok_or_else(|| bad("type"))?;
            let info = u32_at(&data, at + 4).ok_or_else(|| bad("type"))?;
            let size_or_type = u32_at(&data, at + 8).ok_or_else(|| bad("type"))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = usize_of(info & 0xffff);
            let extra = at + 12;
            let trailing = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                _ => 0,
            };
            types.push(TypeEntry {
                kind,
                kind_flag: info >> 31 == 1,
                vlen,
                name_off,
                size_or_type,
                extra,
            });
            at = extra + trailing;
        }
        let mut btf = Self {
            data,
            strings,
            strings_len: str_len,
            types,
            by_name: HashMap::new(),
        };
        for id in 1..btf.types.len() {
            let entry = btf.types[id];
            if entry.name_off != 0 && matches!(entry.kind, KIND_STRUCT | KIND_UNION | KIND_TYPEDEF)
            {
                let name = btf.string(entry.name_off).to_owned();
                let id = u32::try_from(id).map_err(|_| bad("too many types"))?;
                btf.by_name.entry((entry.kind, name)).or_default().push(id);
            }
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let start = self.strings + usize_of(off);
        let end = self.strings + self.strings_len;
        let bytes = self.data.get(start..end).unwrap_or_default();
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..len]).unwrap_or("")
    }

    fn entry(&self, id: u32) -> Option<&TypeEntry> {
        self.types.get(usize_of(id))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        for _ in 0..32 {
            let entry = self.entry(id)?;
            match entry.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = entry.size_or_type;
                }
                _ => return Some(id),
            }
        }
        None
    }

    /// Byte offset and byte size of `member` in `struct name`, looking through anonymous
    /// structs and unions. `None` if the struct or member is missing, or is a bitfield.
    pub(crate) fn member(&self, name: &str, member: &str) -> Option<(usize, usize)> {
        let ids = self.by_name.get(&(KIND_STRUCT, name.to_owned()))?;
        ids.iter().find_map(|&id| {
            let entry = self.entry(id)?;
            (entry.vlen > 0)
                .then(|| self.find_member(id, member, 0))
                .flatten()
        })
    }

    fn find_member(&self, id: u32, member: &str, base_bits: u64) -> Option<(usize, usize)> {
        let entry = *self.entry(id)?;
        if !matches!(entry.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for i in 0..entry.vlen {
            let at = entry.extra + 12 * i;
            let name_off = u32_at(&self.data, at)?;
            let ty = u32_at(&self.data, at + 4)?;
            let raw_offset = u32_at(&self.data, at + 8)?;
            let (bits, bitfield) = if entry.kind_flag {
                (raw_offset & 0x00ff_ffff, raw_offset >> 24 != 0)
            } else {
                (raw_offset, false)
            };
            let bits = base_bits + u64::from(bits);
            if name_off == 0 {
                if let Some(found) = self
                    .resolve(ty)
                    .and_then(|t| self.find_member(t, member, bits))
                {
                    return Some(found);
                }
                continue;
            }
            if self.string(name_off) == member {
                if bitfield || !bits.is_multiple_of(8) {
                    return None;
                }
                let size = self.size_of(ty)?;
                return Some((usize::try_from(bits / 8).ok()?, size));
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> Option<usize> {
        let entry = self.entry(self.resolve(id)?)?;
        match entry.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => {
                Some(usize_of(entry.size_or_type))
            }
            KIND_PTR => Some(8),
            KIND_ARRAY => {
                let elem = u32_at(&self.data, entry.extra)?;
                let count = u32_at(&self.data, entry.extra + 8)?;
                Some(self.size_of(elem)? * usize_of(count))
            }
            _ => None,
        }
    }

    /// Number of parameters of the BTF-enabled tracepoint `name`, counting the leading
    /// `void *__data` (from `typedef void (*btf_trace_<name>)(void *, ...)`).
    pub(crate) fn tracepoint_params(&self, name: &str) -> Option<usize> {
        let ids = self
            .by_name
            .get(&(KIND_TYPEDEF, format!("btf_trace_{name}")))?;
        let ptr = self.entry(self.resolve(*ids.first()?)?)?;
        if ptr.kind != KIND_PTR {
            return None;
        }
        let proto = self.entry(self.resolve(ptr.size_or_type)?)?;
        (proto.kind == KIND_FUNC_PROTO).then_some(proto.vlen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF bytes from (name, info, size_or_type, trailing words) records.
    fn build(strings: &[&str], types: &[(u32, u32, u32, Vec<u32>)]) -> Vec<u8> {
        let mut str_sec = vec![0u8];
        for s in strings {
            str_sec.extend_from_slice(s.as_bytes());
            str_sec.push(0);
        }
        let mut type_sec = Vec::new();
        for (name, info, size, extra) in types {
            for word in [*name, *info, *size].iter().chain(extra) {
                type_sec.extend_from_slice(&word.to_le_bytes());
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        let len = |v: &Vec<u8>| u32::try_from(v.len()).unwrap();
        for word in [24, 0, len(&type_sec), len(&type_sec), len(&str_sec)] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&type_sec);
        out.extend_from_slice(&str_sec);
        out
    }

    #[test]
    fn finds_members_directly_and_through_anonymous_unions() {
        // Strings: 1 "int", 5 "task_struct", 17 "exit_code", 27 "pid".
        let strings = ["int", "task_struct", "exit_code", "pid"];
        let types = vec![
            // 1: int, 4 bytes.
            (1, KIND_INT << 24, 4, vec![32]),
            // 2: anonymous union { int pid; } (pid at bit 0).
            (0, (KIND_UNION << 24) | 1, 4, vec![27, 1, 0]),
            // 3: struct task_struct { int exit_code @ 64 bytes; union { pid } @ 128 bytes }.
            (
                5,
                (KIND_STRUCT << 24) | 2,
                256,
                vec![17, 1, 64 * 8, 0, 2, 128 * 8],
            ),
        ];
        let btf = KernelBtf::parse(build(&strings, &types)).unwrap();
        assert_eq!(btf.member("task_struct", "exit_code"), Some((64, 4)));
        assert_eq!(btf.member("task_struct", "pid"), Some((128, 4)));
        assert_eq!(btf.member("task_struct", "comm"), None);
        assert_eq!(btf.member("mm_struct", "pid"), None);
    }

    #[test]
    fn the_running_kernel_describes_task_struct_exit_code() {
        // Only meaningful where BTF exists; every machine this project runs on has it.
        let Ok(btf) = KernelBtf::read_vmlinux() else {
            panic!("{VMLINUX} is missing: the agent's exit probe needs kernel BTF");
        };
        let (offset, size) = btf.member("task_struct", "exit_code").expect("exit_code");
        assert!(offset > 0);
        assert_eq!(size, 4);
        assert_eq!(btf.tracepoint_params("sched_process_exit"), Some(3));
    }
}
