//! Packing a container's overlay upper directory into an OCI layer tarball: the inverse of
//! `unpack`. What the container changed is the upper directory; a 0:0 character device
//! there is a deleted file (an OCI whiteout `.wh.NAME`), and a directory with the
//! `trusted.overlay.opaque` xattr replaced the lower one wholly (its entries plus
//! `.wh..wh..opq`). Entries are written in name order, with their modes, owners and
//! times. Blocking code: call it from a blocking thread.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Writes the layer of `upper` to `out` (an uncompressed tar).
pub fn pack_upper(upper: &Path, out: impl Write) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    walk(&mut b, upper, Path::new(""))?;
    b.into_inner()?.flush()
}

fn walk<W: Write>(b: &mut tar::Builder<W>, upper: &Path, rel: &Path) -> io::Result<()> {
    let dir = upper.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let inner = rel.join(&name);
        let meta = fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            empty_file(b, &rel.join(format!(".wh.{}", name.to_string_lossy())))?;
            continue;
        }
        b.append_path_with_name(&path, &inner)?;
        if ft.is_dir() {
            if is_opaque(&path) {
                empty_file(b, &inner.join(".wh..wh..opq"))?;
            }
            walk(b, upper, &inner)?;
        }
    }
    Ok(())
}

fn empty_file<W: Write>(b: &mut tar::Builder<W>, path: &Path) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, path, io::empty())
}

fn is_opaque(dir: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let Ok(p) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut value = [0u8; 4];
    // SAFETY: valid NUL-terminated strings and a buffer of the length given.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

#[cfg(test)]
mod tests {
    use super::super::unpack::{Compression, unpack_layer};
    use super::*;

    // Needs root (mknod, trusted xattrs), as the agent does.
    #[test]
    fn an_upper_directory_round_trips_through_a_layer() {
        let tmp = tempfile::tempdir().expect("tmp");
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("etc/opaque")).expect("mkdir");
        fs::write(upper.join("etc/new.conf"), "x=1").expect("write");
        std::os::unix::fs::symlink("new.conf", upper.join("etc/link")).expect("link");
        // A deleted file and a directory that replaced the lower one, as overlayfs
        // records them.
        nix::sys::stat::mknod(
            &upper.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .expect("mknod");
        let c = std::ffi::CString::new(upper.join("etc/opaque").to_string_lossy().as_bytes())
            .expect("path");
        // SAFETY: valid strings, a 1-byte value.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(r, 0, "set the opaque xattr");
        let tar = tmp.path().join("layer.tar");
        pack_upper(&upper, fs::File::create(&tar).expect("create")).expect("pack");

        let mut names: Vec<String> = tar::Archive::new(fs::File::open(&tar).expect("open"))
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "etc",
                "etc/.wh.gone",
                "etc/link",
                "etc/new.conf",
                "etc/opaque",
                "etc/opaque/.wh..wh..opq"
            ]
        );
        // Unpacked as a lower layer, it is the upper directory again.
        let back = tmp.path().join("back");
        fs::create_dir(&back).expect("mkdir");
        unpack_layer(&tar, Compression::None, &back).expect("unpack");
        assert_eq!(
            fs::read_to_string(back.join("etc/new.conf")).expect("read"),
            "x=1"
        );
        assert_eq!(
            fs::read_link(back.join("etc/link")).expect("link"),
            Path::new("new.conf")
        );
        let gone = fs::symlink_metadata(back.join("etc/gone")).expect("whiteout");
        assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
        assert!(is_opaque(&back.join("etc/opaque")));
    }
}
