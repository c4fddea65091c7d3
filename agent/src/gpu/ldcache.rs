//! Reading the dynamic linker's cache (`/etc/ld.so.cache`) to learn where the host keeps
//! a library, as nvidia-container-toolkit does: real hosts put the NVIDIA driver in many
//! places (`/usr/lib/x86_64-linux-gnu`, `/usr/lib64`, `/usr/local/nvidia/lib64`, ...), and
//! the cache is where `ldconfig` recorded them.
//!
//! The file is parsed directly rather than through `ldconfig -p`: no process to spawn, and
//! it works on minimal hosts. The format is glibc's ("glibc-ld.so.cache" version "1.1"),
//! possibly preceded by the pre-2.32 "ld.so-1.7.0" section that newer glibc no longer
//! writes: a 48-byte header (entry count, string table length, an endianness flag), fixed
//! 24-byte entries (flags, the offsets of the library's name and path, hwcaps), then the
//! NUL-terminated strings, with offsets counted from the header's start. Every read is
//! bounds-checked; a damaged file is an error naming it, never a panic.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest cache read (real ones are well under a megabyte).
pub const MAX_CACHE_BYTES: u64 = 16 << 20;

const OLD_MAGIC: &[u8] = b"ld.so-1.7.0";
/// The old section: magic (11 bytes, padded to 12), entry count, 12-byte entries.
const OLD_HEADER: usize = 16;
const OLD_ENTRY: usize = 12;
const NEW_MAGIC: &[u8] = b"glibc-ld.so.cache";
const NEW_VERSION: &[u8] = b"1.1";
const NEW_HEADER: usize = 48;
const NEW_ENTRY: usize = 24;
/// The new section starts at this alignment after an old one.
const NEW_ALIGN: usize = 8;

/// `flags & 0xff`: an ELF library for glibc.
const FLAG_ELF_LIBC6: u32 = 0x0003;
const FLAG_TYPE_MASK: u32 = 0x00ff;
const FLAG_REQUIRED_MASK: u32 = 0xff00;
/// Header byte 28, bits 0-1: how the writer stored its integers.
const ENDIAN_LITTLE: u8 = 2;
const ENDIAN_BIG: u8 = 3;

/// One library the cache knows: `libcuda.so.1` at `/usr/lib/x86_64-linux-gnu/libcuda.so.1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdEntry {
    /// The name the loader looks up (a soname, or a development link's name).
    pub name: String,
    pub path: PathBuf,
    /// glibc's flags: the library type in the low byte, the ABI (x86-64, AArch64, ...) in
    /// the next.
    pub flags: u32,
    /// Non-zero for an entry in a `glibc-hwcaps` subdirectory (an optimized variant).
    pub hwcap: u64,
}

/// The parsed cache, entries in the file's order (for equal names, the loader's preference).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LdCache {
    pub entries: Vec<LdEntry>,
}

/// What is wrong inside a cache file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheProblem {
    #[error("it does not start with a known ld.so.cache magic")]
    BadMagic,
    #[error("its format version is {found:?}, not 1.1")]
    Version { found: String },
    #[error("it was written on a machine of the other byte order")]
    ForeignEndian,
    #[error("it is truncated: {what} needs {needed} bytes, the file has {len}")]
    Truncated {
        what: &'static str,
        needed: usize,
        len: usize,
    },
    #[error("entry {entry}'s {field} offset {offset} is outside its string table")]
    BadOffset {
        entry: usize,
        field: &'static str,
        offset: u32,
    },
    #[error("entry {entry}'s {field} is not NUL-terminated")]
    Unterminated { entry: usize, field: &'static str },
}

#[derive(Debug, thiserror::Error)]
pub enum LdCacheError {
    #[error("cannot read the dynamic linker cache {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the dynamic linker cache {} is over {max} bytes; it is not a real ld.so.cache",
        path.display(),
        max = MAX_CACHE_BYTES
    )]
    TooLarge { path: PathBuf },
    #[error(
        "{} is not a usable dynamic linker cache: {problem}; regenerate it with `ldconfig`",
        path.display()
    )]
    Format {
        path: PathBuf,
        problem: CacheProblem,
    },
}

impl LdCacheError {
    /// The file is simply not there (a host without glibc's cache).
    pub fn is_missing(&self) -> bool {
        matches!(self, Self::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

impl LdCache {
    /// Reads and parses `path`, reading at most [`MAX_CACHE_BYTES`].
    pub fn read(path: &Path) -> Result<Self, LdCacheError> {
        let read_err = |source| LdCacheError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_CACHE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CACHE_BYTES {
            return Err(LdCacheError::TooLarge {
                path: path.to_owned(),
            });
        }
        Self::parse(&bytes).map_err(|problem| LdCacheError::Format {
            path: path.to_owned(),
            problem,
        })
    }

    /// Parses a cache held in memory.
    pub fn parse(bytes: &[u8]) -> Result<Self, CacheProblem> {
        let base = if bytes.starts_with(NEW_MAGIC) {
            0
        } else if bytes.starts_with(OLD_MAGIC) {
            let old = Reader::new(bytes, 0);
            let count = old.u32(12, "the old header")? as usize;
            let end = count
                .checked_mul(OLD_ENTRY)
                .and_then(|n| n.checked_add(OLD_HEADER))
                .ok_or(CacheProblem::Truncated {
                    what: "the old entries",
                    needed: usize::MAX,
                    len: bytes.len(),
                })?;
            let base = end.div_ceil(NEW_ALIGN) * NEW_ALIGN;
            // A cache of the old format only: nothing a current glibc reads.
            if !bytes.get(base..).is_some_and(|b| b.starts_with(NEW_MAGIC)) {
                return Err(CacheProblem::BadMagic);
            }
            base
        } else {
            return Err(CacheProblem::BadMagic);
        };
        let r = Reader::new(bytes, base);
        r.need(NEW_HEADER, "the header")?;
        let version = r.slice(NEW_MAGIC.len(), NEW_VERSION.len(), "the header")?;
        if version != NEW_VERSION {
            return Err(CacheProblem::Version {
                found: String::from_utf8_lossy(version).into_owned(),
            });
        }
        let endian = r.slice(28, 1, "the header")?[0] & 3;
        let native = if cfg!(target_endian = "little") {
            ENDIAN_LITTLE
        } else {
            ENDIAN_BIG
        };
        if (endian == ENDIAN_LITTLE || endian == ENDIAN_BIG) && endian != native {
            return Err(CacheProblem::ForeignEndian);
        }
        let count = r.u32(20, "the header")? as usize;
        let table_end = count
            .checked_mul(NEW_ENTRY)
            .and_then(|n| n.checked_add(NEW_HEADER))
            .unwrap_or(usize::MAX);
        r.need(table_end, "the entry table")?;
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let at = NEW_HEADER + i * NEW_ENTRY;
            let flags = r.u32(at, "the entry table")?;
            let name = r.string(r.u32(at + 4, "the entry table")?, i, "name")?;
            let path = r.string(r.u32(at + 8, "the entry table")?, i, "path")?;
            let hwcap = r.u64(at + 16, "the entry table")?;
            entries.push(LdEntry {
                name,
                path: PathBuf::from(path),
                flags,
                hwcap,
            });
        }
        Ok(Self { entries })
    }

    /// Entries for this host's ABI (64-bit x86-64 on x86-64, AArch64 on arm64, ...) whose
    /// name starts with one of `prefixes`, in the cache's order. Baseline entries come
    /// before `glibc-hwcaps` variants of the same name.
    pub fn find<'a>(&'a self, prefixes: &[&str]) -> Vec<&'a LdEntry> {
        let arch = host_abi_flags();
        let mut found: Vec<&LdEntry> = self
            .entries
            .iter()
            .filter(|e| e.flags & FLAG_TYPE_MASK == FLAG_ELF_LIBC6)
            .filter(|e| arch.is_none_or(|a| e.flags & FLAG_REQUIRED_MASK == a))
            .filter(|e| prefixes.iter().any(|p| e.name.starts_with(p)))
            .filter(|e| e.path.is_absolute())
            .collect();
        // Stable: the cache's order is kept within each group.
        found.sort_by_key(|e| e.hwcap != 0);
        found
    }
}

/// The ABI bits glibc's `ldconfig` sets on this host's native libraries; `None` where
/// native libraries carry none (32-bit hosts), so any libc6 entry matches.
pub fn host_abi_flags() -> Option<u32> {
    if cfg!(target_arch = "x86_64") {
        Some(0x0300)
    } else if cfg!(target_arch = "aarch64") {
        Some(0x0a00)
    } else if cfg!(target_arch = "powerpc64") {
        Some(0x0500)
    } else if cfg!(target_arch = "riscv64") {
        Some(0x1000)
    } else {
        None
    }
}

/// Bounds-checked reads relative to the new-format header at `base`.
struct Reader<'a> {
    bytes: &'a [u8],
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], base: usize) -> Self {
        Self { bytes, base }
    }

    fn need(&self, len: usize, what: &'static str) -> Result<(), CacheProblem> {
        self.slice(0, len, what).map(|_| ())
    }

    fn slice(&self, at: usize, len: usize, what: &'static str) -> Result<&'a [u8], CacheProblem> {
        let start = self.base.checked_add(at);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.bytes.len() => Ok(&self.bytes[s..e]),
            _ => Err(CacheProblem::Truncated {
                what,
                needed: end.unwrap_or(usize::MAX),
                len: self.bytes.len(),
            }),
        }
    }

    fn u32(&self, at: usize, what: &'static str) -> Result<u32, CacheProblem> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.slice(at, 4, what)?);
        Ok(u32::from_ne_bytes(b))
    }

    fn u64(&self, at: usize, what: &'static str) -> Result<u64, CacheProblem> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.slice(at, 8, what)?);
        Ok(u64::from_ne_bytes(b))
    }

    /// The NUL-terminated string at `offset` from the header's start.
    fn string(
        &self,
        offset: u32,
        entry: usize,
        field: &'static str,
    ) -> Result<String, CacheProblem> {
        let rest = self
            .bytes
            .get(self.base..)
            .and_then(|b| b.get(offset as usize..))
            .filter(|b| !b.is_empty() && offset as usize >= NEW_HEADER)
            .ok_or(CacheProblem::BadOffset {
                entry,
                field,
                offset,
            })?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(CacheProblem::Unterminated { entry, field })?;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The flags of a native library on this host.
    pub(crate) fn native_flags() -> u32 {
        FLAG_ELF_LIBC6 | host_abi_flags().unwrap_or(0)
    }

    /// Builds a cache file: `(flags, name, path, hwcap)` per entry, optionally after an
    /// old-format section of `old` entries.
    pub(crate) fn cache_bytes(entries: &[(u32, &str, &str, u64)], old: Option<u32>) -> Vec<u8> {
        let mut strings = Vec::new();
        let table = NEW_HEADER + entries.len() * NEW_ENTRY;
        let mut offsets = Vec::new();
        for (_, name, path, _) in entries {
            let mut at = |s: &str| {
                let o = (table + strings.len()) as u32;
                strings.extend_from_slice(s.as_bytes());
                strings.push(0);
                o
            };
            offsets.push((at(name), at(path)));
        }
        let mut new = Vec::new();
        new.extend_from_slice(NEW_MAGIC);
        new.extend_from_slice(NEW_VERSION);
        new.extend_from_slice(&(entries.len() as u32).to_ne_bytes());
        new.extend_from_slice(&(strings.len() as u32).to_ne_bytes());
        new.push(if cfg!(target_endian = "little") {
            ENDIAN_LITTLE
        } else {
            ENDIAN_BIG
        });
        new.extend_from_slice(&[0; 3]);
        new.extend_from_slice(&0u32.to_ne_bytes()); // extension offset
        new.extend_from_slice(&[0; 12]);
        assert_eq!(new.len(), NEW_HEADER);
        for ((flags, _, _, hwcap), (k, v)) in entries.iter().zip(offsets) {
            new.extend_from_slice(&flags.to_ne_bytes());
            new.extend_from_slice(&k.to_ne_bytes());
            new.extend_from_slice(&v.to_ne_bytes());
            new.extend_from_slice(&0u32.to_ne_bytes());
            new.extend_from_slice(&hwcap.to_ne_bytes());
        }
        new.extend_from_slice(&strings);
        let Some(old) = old else { return new };
        let mut file = Vec::new();
        file.extend_from_slice(OLD_MAGIC);
        file.push(0);
        file.extend_from_slice(&old.to_ne_bytes());
        file.resize(OLD_HEADER + old as usize * OLD_ENTRY, 0);
        file.resize(file.len().div_ceil(NEW_ALIGN) * NEW_ALIGN, 0);
        file.extend_from_slice(&new);
        file
    }

    fn sample() -> Vec<(u32, &'static str, &'static str, u64)> {
        let native = native_flags();
        vec![
            (
                native,
                "libcuda.so.1",
                "/usr/local/nvidia/lib64/libcuda.so.1",
                0,
            ),
            (0x0003, "libcuda.so.1", "/usr/lib32/libcuda.so.1", 0),
            (native, "libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6", 0),
            (
                native,
                "libnvidia-ml.so.1",
                "/usr/lib64/glibc-hwcaps/x86-64-v3/libnvidia-ml.so.1",
                1 << 62,
            ),
            (
                native,
                "libnvidia-ml.so.1",
                "/usr/lib64/libnvidia-ml.so.1",
                0,
            ),
        ]
    }

    #[test]
    fn parses_new_format_and_picks_host_abi() {
        let cache = LdCache::parse(&cache_bytes(&sample(), None)).expect("parse");
        assert_eq!(cache.entries.len(), 5);
        assert_eq!(cache.entries[2].name, "libc.so.6");
        let found: Vec<_> = cache
            .find(&["libcuda.so", "libnvidia-ml.so"])
            .iter()
            .map(|e| e.path.display().to_string())
            .collect();
        if host_abi_flags().is_some() {
            assert_eq!(
                found,
                vec![
                    "/usr/local/nvidia/lib64/libcuda.so.1",
                    "/usr/lib64/libnvidia-ml.so.1",
                    "/usr/lib64/glibc-hwcaps/x86-64-v3/libnvidia-ml.so.1",
                ],
                "32-bit entries skipped, baseline before hwcaps variants"
            );
        }
    }

    #[test]
    fn parses_after_an_old_format_section() {
        for old in [0, 1, 3] {
            let cache = LdCache::parse(&cache_bytes(&sample(), Some(old))).expect("parse");
            assert_eq!(cache.entries.len(), 5, "old section of {old}");
            assert_eq!(cache.entries[0].name, "libcuda.so.1");
        }
    }

    #[test]
    fn damaged_caches_are_errors_not_panics() {
        let good = cache_bytes(&sample(), None);
        assert_eq!(LdCache::parse(b"hello"), Err(CacheProblem::BadMagic));
        assert_eq!(LdCache::parse(b""), Err(CacheProblem::BadMagic));
        // Every truncation of a valid file fails cleanly.
        for len in 0..good.len() - 1 {
            assert!(LdCache::parse(&good[..len]).is_err(), "length {len}");
        }
        // A string offset past the end of the file.
        let mut bad = good.clone();
        bad[NEW_HEADER + 4..NEW_HEADER + 8].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(
            LdCache::parse(&bad),
            Err(CacheProblem::BadOffset {
                entry: 0,
                field: "name",
                ..
            })
        ));
        // An offset into the header itself.
        let mut bad = good.clone();
        bad[NEW_HEADER + 8..NEW_HEADER + 12].copy_from_slice(&4u32.to_ne_bytes());
        assert!(matches!(
            LdCache::parse(&bad),
            Err(CacheProblem::BadOffset { field: "path", .. })
        ));
        // A huge entry count.
        let mut bad = good.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(
            LdCache::parse(&bad),
            Err(CacheProblem::Truncated { .. })
        ));
        // A last string without its NUL.
        let bad = &good[..good.len() - 1];
        assert!(matches!(
            LdCache::parse(bad),
            Err(CacheProblem::Unterminated { entry: 4, .. })
        ));
        // Another version.
        let mut bad = good.clone();
        bad[17..20].copy_from_slice(b"2.0");
        assert!(matches!(
            LdCache::parse(&bad),
            Err(CacheProblem::Version { .. })
        ));
        // An old-format-only file.
        let mut old = OLD_MAGIC.to_vec();
        old.extend_from_slice(&[0; 5]);
        assert_eq!(LdCache::parse(&old), Err(CacheProblem::BadMagic));
        // Garbage of every small length never panics.
        let mut junk = NEW_MAGIC.to_vec();
        junk.extend_from_slice(NEW_VERSION);
        for b in 0..=255u8 {
            junk.push(b);
            let _ = LdCache::parse(&junk);
        }
    }

    #[test]
    fn read_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ld.so.cache");
        let missing = LdCache::read(&path).expect_err("missing");
        assert!(missing.is_missing(), "{missing}");
        std::fs::write(&path, b"glibc-ld.so.cache1.1").expect("write");
        let err = LdCache::read(&path).expect_err("truncated");
        assert!(!err.is_missing());
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("truncated"),
            "{msg}"
        );
        std::fs::write(&path, cache_bytes(&sample(), None)).expect("write");
        assert_eq!(LdCache::read(&path).expect("read").entries.len(), 5);
    }

    /// The host's own cache, where it has one: the parser agrees with glibc's format.
    #[test]
    fn reads_this_hosts_cache() {
        let path = Path::new("/etc/ld.so.cache");
        if !path.exists() {
            return;
        }
        let cache = LdCache::read(path).expect("this host's ld.so.cache parses");
        assert!(
            !cache.find(&["libc.so.6"]).is_empty(),
            "libc.so.6 for this ABI is in {path:?}"
        );
    }
}
