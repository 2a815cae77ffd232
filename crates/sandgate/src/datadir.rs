//! One gateway per data directory. A gateway holds an exclusive `flock` on
//! `<data-dir>/gateway.lock` for its whole life and writes its pid and address into it; a
//! second gateway on the same directory finds the lock taken and refuses to start, naming
//! the first, before it has touched the store or any sandbox. The kernel releases the lock
//! when the process ends however it ends, so a crashed gateway never blocks its successor.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};

use rand::Rng;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

const LOCK_FILE: &str = "gateway.lock";

/// The held lock; dropping it (the gateway's end) releases it.
#[derive(Debug)]
pub struct DataDirLock {
    file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the data directory {dir} is in use by another sandgate ({holder}); stop that one, \
         or give this one another --data-dir"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error("cannot lock the data directory ({path}): {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Takes the data directory `dir` (which must exist) for this process.
pub fn lock(dir: &Path) -> Result<DataDirLock, LockError> {
    let path = dir.join(LOCK_FILE);
    let io = |source: std::io::Error| LockError::Io {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(DataDirLock { file }),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = match text.trim() {
                "" => "its pid and address are not written yet".to_string(),
                t => t.lines().collect::<Vec<_>>().join(", "),
            };
            Err(LockError::InUse {
                dir: dir.to_path_buf(),
                holder,
            })
        }
        Err(e) => Err(io(e.into())),
    }
}

impl DataDirLock {
    /// Writes who holds the lock, for a second gateway's message.
    pub fn record(&mut self, addr: SocketAddr) -> std::io::Result<()> {
        self.file.set_len(0)?;
        let text = format!("pid {}\nlistening on {addr}\n", std::process::id());
        use std::io::Seek;
        self.file.seek(std::io::SeekFrom::Start(0))?;
        self.file.write_all(text.as_bytes())?;
        self.file.flush()
    }
}

/// The file holding this gateway's id in the data directory.
pub const GATEWAY_ID_FILE: &str = "gateway-id";

/// This gateway's stable instance id, kept in `<data_dir>/gateway-id` (created with a random id
/// on first use). Containers are labelled with it, so orphans can be told from other gateways'.
pub fn gateway_id(data_dir: &Path) -> io::Result<String> {
    let path = data_dir.join(GATEWAY_ID_FILE);
    let read = |p: &Path| -> io::Result<Option<String>> {
        match std::fs::read_to_string(p) {
            Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    };
    if let Some(id) = read(&path)? {
        return Ok(id);
    }
    std::fs::create_dir_all(data_dir)?;
    let mut rng = rand::thread_rng();
    let id: String = (0..16)
        .map(|_| b"abcdefghijklmnopqrstuvwxyz234567"[rng.gen_range(0..32)] as char)
        .collect();
    let id = format!("gw-{id}");
    // Written to a temporary file and linked into place, so a concurrent first start never
    // sees a half-written id and the first writer wins.
    let tmp = data_dir.join(format!(".{GATEWAY_ID_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, format!("{id}\n"))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(id),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            read(&path)?.ok_or_else(|| io::Error::other(format!("{} is empty", path.display())))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = lock(dir.path()).unwrap();
        first.record("127.0.0.1:8070".parse().unwrap()).unwrap();
        let err = lock(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains("listening on 127.0.0.1:8070"), "{err}");
        drop(first);
        lock(dir.path()).expect("free again once the holder is gone");
    }
}
