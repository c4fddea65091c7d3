//! A sized local volume's filesystem: a sparse ext4 image (`mkfs.ext4` from e2fsprogs)
//! loop-mounted with util-linux `mount -o loop` (which frees the loop device when the
//! filesystem is unmounted). Blocks are taken from the host's disk only as files are
//! written; the image's size is the most the volume can hold.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use gantry_shared::volumes::{FailureKind, VolumeFailure};

/// Whether a filesystem is mounted on `dir` (its device differs from its parent's).
pub fn is_mounted(dir: &Path) -> bool {
    let (Ok(me), Some(Ok(parent))) = (std::fs::metadata(dir), dir.parent().map(std::fs::metadata))
    else {
        return false;
    };
    me.dev() != parent.dev()
}

/// Writes a sparse image of `size` bytes at `image` and makes an ext4 filesystem in it,
/// with no blocks reserved for root (a container's root user may fill all of it).
pub fn make_filesystem(image: &Path, size: u64) -> Result<(), VolumeFailure> {
    let file = std::fs::File::create(image).map_err(super::io_failure)?;
    file.set_len(size).map_err(super::io_failure)?;
    drop(file);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E", "root_owner=0:0"])
        .arg(image)
        .output()
        .map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                FailureKind::Unsupported
            } else {
                FailureKind::Io
            };
            VolumeFailure::new(
                kind,
                format!(
                    "cannot run mkfs.ext4 ({e}): a volume with a size needs e2fsprogs on the \
                     node; install it, or create the volume without --size"
                ),
            )
        })?;
    if !out.status.success() {
        return Err(VolumeFailure::new(
            FailureKind::Io,
            format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Mounts `image` on `dir` unless something is mounted there already.
pub fn ensure_mounted(image: &Path, dir: &Path) -> std::io::Result<()> {
    if is_mounted(dir) {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
        .arg(image)
        .arg(dir)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "mount {} on {}: {}",
            image.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Unmounts `dir` (its loop device goes with it).
pub fn unmount(dir: &Path) -> std::io::Result<()> {
    nix::mount::umount2(dir, nix::mount::MntFlags::empty()).map_err(std::io::Error::from)
}
