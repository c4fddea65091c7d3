//! Container log files: the shim's capped writer and the agent's reader/follower.
//!
//! Each stream (`stdout.log`, `stderr.log`) is one file; when it reaches the cap it is
//! renamed to `<name>.1` (replacing the previous one) and a new file is started, so a
//! container never uses more than twice the cap per stream and the newest output is kept.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn file_name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout.log",
            Stream::Stderr => "stderr.log",
        }
    }
}

/// Appends to a log file, rotating once at `cap` bytes. Used only by the shim.
pub struct CappedLog {
    path: PathBuf,
    file: File,
    written: u64,
    cap: u64,
}

impl CappedLog {
    pub fn create(path: PathBuf, cap: u64) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path,
            file,
            written,
            cap: cap.max(1),
        })
    }

    pub fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.written >= self.cap {
                self.rotate()?;
            }
            let room = (self.cap - self.written) as usize;
            let n = room.min(buf.len());
            self.file.write_all(&buf[..n])?;
            self.written += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

/// Reads all of a stream's retained log: the rotated file, then the current one.
pub fn read_all(dir: &Path, stream: Stream) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let cur = dir.join(stream.file_name());
    let mut rotated = cur.clone().into_os_string();
    rotated.push(".1");
    for p in [PathBuf::from(rotated), cur] {
        match std::fs::read(&p) {
            Ok(mut b) => out.append(&mut b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Follows one log file across rotations: yields new bytes as they are appended.
pub struct Follower {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    inode: u64,
}

impl Follower {
    pub fn new(dir: &Path, stream: Stream) -> Self {
        Self {
            path: dir.join(stream.file_name()),
            file: None,
            inode: 0,
        }
    }

    /// Reads whatever is new now (possibly nothing). Never blocks waiting for output.
    pub async fn poll(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        use tokio::io::AsyncReadExt;
        if self.file.is_none() {
            match tokio::fs::File::open(&self.path).await {
                Ok(f) => {
                    self.inode = f.metadata().await?.ino();
                    self.file = Some(f);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if let Some(f) = self.file.as_mut() {
            f.read_to_end(out).await?;
        }
        // Rotated? Finish the old file (done above) and switch to the new one.
        if let Ok(m) = tokio::fs::metadata(&self.path).await
            && m.ino() != self.inode
        {
            self.file = None;
            Box::pin(self.poll(out)).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_cap_and_keeps_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = CappedLog::create(dir.path().join("stdout.log"), 10).expect("create");
        log.write(b"0123456789abcdef").expect("write");
        log.write(b"ghijklmnopqrst").expect("write");
        let all = read_all(dir.path(), Stream::Stdout).expect("read");
        // 30 bytes through a 10-byte cap: the oldest 10 are gone, at most 2 x cap kept.
        assert_eq!(all, b"abcdefghijklmnopqrst");
    }

    #[tokio::test]
    async fn follower_sees_appends_across_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut f = Follower::new(dir.path(), Stream::Stdout);
        let mut got = Vec::new();
        f.poll(&mut got).await.expect("poll before file exists");
        let mut log = CappedLog::create(dir.path().join("stdout.log"), 16).expect("create");
        log.write(b"hello ").expect("write");
        f.poll(&mut got).await.expect("poll");
        log.write(b"world, again").expect("write");
        f.poll(&mut got).await.expect("poll");
        assert_eq!(got, b"hello world, again");
    }
}
