//! Unpacking one layer tarball into its own directory, in the on-disk form overlayfs reads
//! as a lower layer: OCI whiteouts (`.wh.NAME`) become 0:0 character devices and opaque
//! markers (`.wh..wh..opq`) become the `trusted.overlay.opaque` xattr on their directory,
//! as containerd's overlay snapshotter does. Blocking code: call it from a blocking thread.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use super::ImageError;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Maps OCI and Docker layer media types; anything else is refused by the caller.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Some(Self::Zstd),
            _ => None,
        }
    }

    /// Sniffs the magic bytes of a local tarball (for `image import`).
    pub fn sniff(path: &Path) -> io::Result<Self> {
        let mut magic = [0u8; 4];
        let n = File::open(path)?.read(&mut magic)?;
        Ok(match &magic[..n.min(4)] {
            [0x1f, 0x8b, ..] => Self::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd] => Self::Zstd,
            _ => Self::None,
        })
    }
}

/// Unpacks the tarball at `blob` into `dest` (which must exist and be empty).
pub fn unpack_layer(blob: &Path, compression: Compression, dest: &Path) -> Result<(), ImageError> {
    let bad = |source: io::Error| ImageError::Unpack {
        path: blob.to_owned(),
        source,
    };
    let file = BufReader::new(File::open(blob).map_err(bad)?);
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(bad)?),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let rel = clean_relative(&path).ok_or_else(|| ImageError::UnsafePath {
            blob: blob.to_owned(),
            entry: path.clone(),
        })?;
        if rel.as_os_str().is_empty() {
            continue; // the archive's own root entry (`./`)
        }
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = dest.join(rel.parent().unwrap_or(Path::new("")));
        if name == OPAQUE_MARKER {
            fs::create_dir_all(&parent).map_err(bad)?;
            set_opaque(&parent).map_err(bad)?;
        } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            fs::create_dir_all(&parent).map_err(bad)?;
            make_whiteout(&parent.join(target)).map_err(bad)?;
        } else {
            entry.unpack_in(dest).map_err(bad)?;
        }
    }
    Ok(())
}

/// Strips `./` and refuses absolute paths and `..`, so an entry can never land outside
/// the layer directory. The archive root (`./`) comes back empty.
fn clean_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn make_whiteout(path: &Path) -> io::Result<()> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path)?,
        Ok(_) => fs::remove_file(path)?,
        Err(_) => {}
    }
    mknod(path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(io::Error::from)
}

fn set_opaque(dir: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let name = c"trusted.overlay.opaque";
    // SAFETY: valid NUL-terminated strings and a 1-byte value buffer.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if r != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.wasm.content.layer.v1+wasm"),
            None
        );
    }

    #[test]
    fn clean_relative_refuses_escapes() {
        assert_eq!(
            clean_relative(Path::new("./a/b")),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(clean_relative(Path::new("../etc/passwd")), None);
        assert_eq!(clean_relative(Path::new("/etc/passwd")), None);
        assert_eq!(clean_relative(Path::new("./")), Some(PathBuf::new()));
    }
}
