//! A copy of the image records as plain files, `records/<sha256 of the name>.json`, for a
//! lookup before the local store is open: the one-shot `gantry-agent run` starts its
//! container while sled recovers. Each file is written (atomically) after its record
//! reached the store, and the store stays the truth: a missing or unreadable file only
//! sends the lookup to the store.

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::ImageRecord;
use crate::fsutil::{self, Durability};

pub(super) struct RecordFiles {
    dir: PathBuf,
}

impl RecordFiles {
    /// The files under `root/records`, created if missing.
    pub(super) fn open(root: &Path) -> io::Result<Self> {
        let dir = root.join("records");
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The record filed under exactly `name`, if a readable one is there.
    pub(super) fn get(&self, name: &str) -> Option<ImageRecord> {
        let rec: ImageRecord = fsutil::read_json(&self.path(name)).ok()??;
        (rec.name == name).then_some(rec)
    }

    /// Files `rec` under its name, unless the same record is there already.
    pub(super) fn put(&self, rec: &ImageRecord) -> io::Result<()> {
        if self.get(&rec.name).as_ref() == Some(rec) {
            return Ok(());
        }
        // A host crash may lose it: the lookup then goes to the store.
        fsutil::write_json_atomic(&self.path(&rec.name), rec, Durability::Process)
    }

    fn path(&self, name: &str) -> PathBuf {
        let hash = hex::encode(Sha256::digest(name.as_bytes()));
        self.dir.join(format!("{hash}.json"))
    }
}
