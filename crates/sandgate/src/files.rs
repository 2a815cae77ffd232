//! Files in a sandbox's working tree, reached through one directory descriptor and never
//! outside it: paths are checked lexically first (no absolute paths, no `..`, no empty
//! components, no NUL), then every open resolves beneath the root with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`), so a symlink the sandbox
//! planted that points outside (absolute, or climbing out) fails instead of being followed.
//! Writes go to a fresh temporary file (`O_CREAT | O_EXCL`) in the target directory and are
//! renamed over the final name: atomic, and a symlink at the final name is replaced, never
//! written through. Deletes remove a link itself, never its target.

use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use serde::Serialize;

use crate::error::Error;

/// Longest path, and longest component.
const MAX_PATH: usize = 4096;
const MAX_NAME: usize = 255;
/// Most entries a listing returns.
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error(
        "invalid path {0:?}: relative to the working tree, without `..`, empty components or NUL"
    )]
    InvalidPath(String),
    #[error("path {0:?} leads outside the sandbox's working tree")]
    Outside(String),
    #[error("no file or directory {0:?}")]
    NotFound(String),
    #[error("{0:?} is a directory that is not empty: delete it with recursive=true")]
    NotEmpty(String),
    #[error("{0:?} already exists")]
    Exists(String),
    #[error("{0:?} is not a regular file or directory")]
    Unsupported(String),
    #[error("{0}")]
    Io(String),
}

impl From<FilesError> for Error {
    fn from(e: FilesError) -> Error {
        match e {
            FilesError::InvalidPath(_) | FilesError::Unsupported(_) => {
                Error::InvalidPath(e.to_string())
            }
            FilesError::Outside(_) => Error::PathOutside(e.to_string()),
            FilesError::NotFound(_) => Error::FileNotFound(e.to_string()),
            FilesError::NotEmpty(_) => Error::Conflict(e.to_string()),
            FilesError::Exists(_) => Error::PreconditionFailed(e.to_string()),
            FilesError::Io(m) => Error::Internal(m),
        }
    }
}

fn errno(path: &str, e: Errno) -> FilesError {
    match e {
        Errno::XDEV | Errno::LOOP => FilesError::Outside(path.into()),
        Errno::NOENT | Errno::NOTDIR => FilesError::NotFound(path.into()),
        Errno::NOTEMPTY => FilesError::NotEmpty(path.into()),
        Errno::EXIST => FilesError::Exists(path.into()),
        other => FilesError::Io(format!("{path}: {other}")),
    }
}

/// The checked components of `path` (empty: the root itself). A `/`-separated path relative
/// to the working tree; no other decoding than the query's percent-decoding.
pub fn components(path: &str) -> Result<Vec<&str>, FilesError> {
    let bad = || FilesError::InvalidPath(path.to_string());
    if path.len() > MAX_PATH || path.contains('\0') || path.starts_with('/') {
        return Err(bad());
    }
    if path.is_empty() || path == "." {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = path.strip_suffix('/').unwrap_or(path).split('/').collect();
    if parts
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == ".." || c.len() > MAX_NAME)
    {
        return Err(bad());
    }
    Ok(parts)
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// A sandbox's working tree, open.
#[derive(Debug)]
pub struct Tree {
    root: OwnedFd,
    /// The tree's owner when it is not the gateway's own user.
    owner: Option<(rustix::fs::Uid, rustix::fs::Gid)>,
}

/// What a path names.
#[derive(Debug)]
pub enum Found {
    File { file: std::fs::File, size: u64 },
    Dir(Listing),
}

#[derive(Debug, Serialize)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<Entry>,
    /// More entries exist than were listed.
    pub truncated: bool,
}

#[derive(Debug, Serialize)]
pub struct Entry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
    /// Octal permission bits, e.g. `"0644"`.
    pub mode: String,
    /// Seconds since the epoch.
    pub mtime: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// The answer to a write.
#[derive(Debug, Serialize)]
pub struct Written {
    pub path: String,
    pub size: u64,
    pub mode: String,
    /// Whether the name was new.
    #[serde(skip)]
    pub created: bool,
}

fn kind(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        _ => "other",
    }
}

impl Tree {
    /// Opens the working tree at `dir` (a host path the backend gave; its last component may
    /// be reached through `/proc/<pid>/root`).
    pub fn open(dir: &Path) -> Result<Tree, FilesError> {
        let root = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FilesError::Io(format!("the working tree: {e}")))?;
        let st = rustix::fs::fstat(&root)
            .map_err(|e| FilesError::Io(format!("the working tree: {e}")))?;
        // What the gateway creates belongs to whoever owns the tree (a jailed sandbox's own
        // user), not to the gateway.
        let owner = (st.st_uid != rustix::process::geteuid().as_raw()
            || st.st_gid != rustix::process::getegid().as_raw())
        .then(|| {
            (
                rustix::fs::Uid::from_raw(st.st_uid),
                rustix::fs::Gid::from_raw(st.st_gid),
            )
        });
        Ok(Tree { root, owner })
    }

    /// Gives `name` in `dir` to the tree's owner.
    fn own(&self, dir: &OwnedFd, name: &str, path: &str) -> Result<(), FilesError> {
        if let Some((uid, gid)) = self.owner {
            rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| errno(path, e))?;
        }
        Ok(())
    }

    fn open_beneath(
        &self,
        path: &str,
        parts: &[&str],
        flags: OFlags,
    ) -> Result<OwnedFd, FilesError> {
        let rel = if parts.is_empty() {
            ".".to_string()
        } else {
            parts.join("/")
        };
        rustix::fs::openat2(
            &self.root,
            rel.as_str(),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            BENEATH,
        )
        .map_err(|e| errno(path, e))
    }

    /// The directory `parts` (created with its parents when `create`).
    fn dir(&self, path: &str, parts: &[&str], create: bool) -> Result<OwnedFd, FilesError> {
        let mut fd = self.open_beneath(path, &[], OFlags::RDONLY | OFlags::DIRECTORY)?;
        for part in parts {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
            fd = match rustix::fs::openat2(&fd, *part, flags, Mode::empty(), BENEATH) {
                Ok(next) => next,
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&fd, *part, Mode::from_raw_mode(0o755)) {
                        Ok(()) => self.own(&fd, part, path)?,
                        Err(Errno::EXIST) => {}
                        Err(e) => return Err(errno(path, e)),
                    }
                    rustix::fs::openat2(&fd, *part, flags, Mode::empty(), BENEATH)
                        .map_err(|e| errno(path, e))?
                }
                Err(e) => return Err(errno(path, e)),
            };
        }
        Ok(fd)
    }

    /// What `path` names: a file to read, or a directory's listing.
    pub fn read(&self, path: &str) -> Result<Found, FilesError> {
        let parts = components(path)?;
        // Non-blocking: opening a FIFO the sandbox planted must not wait for a writer (it is
        // refused below); regular files and directories read the same either way.
        let fd = self.open_beneath(path, &parts, OFlags::RDONLY | OFlags::NONBLOCK)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| errno(path, e))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Ok(Found::File {
                file: std::fs::File::from(fd),
                size: st.st_size as u64,
            }),
            FileType::Directory => self.list(path, fd).map(Found::Dir),
            _ => Err(FilesError::Unsupported(path.into())),
        }
    }

    fn list(&self, path: &str, dir: OwnedFd) -> Result<Listing, FilesError> {
        let entries = rustix::fs::Dir::read_from(&dir).map_err(|e| errno(path, e))?;
        let mut out = Vec::new();
        let mut truncated = false;
        for entry in entries {
            let entry = entry.map_err(|e| errno(path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            if out.len() == MAX_ENTRIES {
                truncated = true;
                break;
            }
            let Ok(st) = rustix::fs::statat(&dir, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW)
            else {
                continue; // gone meanwhile
            };
            let t = FileType::from_raw_mode(st.st_mode);
            let link_target = (t == FileType::Symlink)
                .then(|| rustix::fs::readlinkat(&dir, entry.file_name(), Vec::new()).ok())
                .flatten()
                .map(|t| t.to_string_lossy().into_owned());
            out.push(Entry {
                name,
                kind: kind(t),
                size: st.st_size as u64,
                mode: format!("{:04o}", st.st_mode & 0o7777),
                mtime: st.st_mtime,
                link_target,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Listing {
            path: path.to_string(),
            entries: out,
            truncated,
        })
    }

    /// Creates the directory `path` (and its parents).
    pub fn mkdir(&self, path: &str, mode: u32) -> Result<Written, FilesError> {
        let parts = components(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(FilesError::InvalidPath(path.into()));
        };
        let parent = self.dir(path, parents, true)?;
        let created = match rustix::fs::mkdirat(&parent, *name, Mode::from_raw_mode(mode)) {
            Ok(()) => {
                self.own(&parent, name, path)?;
                true
            }
            Err(Errno::EXIST) => false,
            Err(e) => return Err(errno(path, e)),
        };
        let st = rustix::fs::statat(&parent, *name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| errno(path, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(FilesError::Exists(path.into()));
        }
        Ok(Written {
            path: path.into(),
            size: 0,
            mode: format!("{:04o}", st.st_mode & 0o7777),
            created,
        })
    }

    /// Starts a write of `path`: a temporary file beside it, renamed over it by
    /// [`Upload::commit`]. `overwrite: false` refuses an existing name.
    pub fn upload(&self, path: &str, mode: u32, overwrite: bool) -> Result<Upload, FilesError> {
        let parts = components(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(FilesError::InvalidPath(path.into()));
        };
        let parent = self.dir(path, parents, true)?;
        let existed = match rustix::fs::statat(&parent, *name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                return Err(FilesError::Exists(path.into()))
            }
            Ok(_) => true,
            Err(Errno::NOENT) => false,
            Err(e) => return Err(errno(path, e)),
        };
        if existed && !overwrite {
            return Err(FilesError::Exists(path.into()));
        }
        let temp = format!(".sandgate-upload-{:016x}", rand::random::<u64>());
        let fd = rustix::fs::openat(
            &parent,
            temp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| errno(path, e))?;
        let upload = Upload {
            parent,
            temp,
            name: name.to_string(),
            path: path.into(),
            file: Some(std::fs::File::from(fd)),
            mode,
            existed,
        };
        if let (Some((uid, gid)), Some(file)) = (self.owner, &upload.file) {
            // On failure the dropped upload removes its temporary file.
            rustix::fs::fchown(file, Some(uid), Some(gid)).map_err(|e| errno(path, e))?;
        }
        Ok(upload)
    }

    /// Deletes `path`: a file or link itself, or a directory (with everything in it when
    /// `recursive`). The root cannot be deleted.
    pub fn delete(&self, path: &str, recursive: bool) -> Result<(), FilesError> {
        let parts = components(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(FilesError::InvalidPath(path.into()));
        };
        let parent = self.dir(path, parents, false)?;
        let st = rustix::fs::statat(&parent, *name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| errno(path, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return rustix::fs::unlinkat(&parent, *name, AtFlags::empty())
                .map_err(|e| errno(path, e));
        }
        if recursive {
            let dir = rustix::fs::openat2(
                &parent,
                *name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                BENEATH,
            )
            .map_err(|e| errno(path, e))?;
            empty_dir(path, &dir)?;
        }
        rustix::fs::unlinkat(&parent, *name, AtFlags::REMOVEDIR).map_err(|e| errno(path, e))
    }
}

/// Removes everything in the open directory `dir`, walking with descriptors opened
/// `O_NOFOLLOW`, so a directory swapped for a symlink mid-walk is never followed.
fn empty_dir(path: &str, dir: &OwnedFd) -> Result<(), FilesError> {
    let names: Vec<std::ffi::CString> = rustix::fs::Dir::read_from(dir)
        .map_err(|e| errno(path, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    for name in names {
        match rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => continue,
            Err(Errno::ISDIR) | Err(Errno::PERM) => {}
            Err(e) => return Err(errno(path, e)),
        }
        let sub = match rustix::fs::openat(
            dir,
            name.as_c_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(errno(path, e)),
        };
        empty_dir(path, &sub)?;
        match rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(errno(path, e)),
        }
    }
    Ok(())
}

/// A write in progress; dropped without [`commit`](Upload::commit), it leaves nothing.
#[derive(Debug)]
pub struct Upload {
    parent: OwnedFd,
    temp: String,
    name: String,
    path: String,
    file: Option<std::fs::File>,
    mode: u32,
    existed: bool,
}

impl Upload {
    /// The temporary file to write the bytes to.
    pub fn file(&mut self) -> std::fs::File {
        self.file.take().expect("the upload's file is taken once")
    }

    /// Syncs `file` and renames it over the final name.
    pub fn commit(mut self, file: std::fs::File) -> Result<Written, FilesError> {
        let io = |e: std::io::Error| FilesError::Io(format!("{}: {e}", self.path));
        file.sync_all().map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        drop(file);
        rustix::fs::renameat(
            &self.parent,
            self.temp.as_str(),
            &self.parent,
            self.name.as_str(),
        )
        .map_err(|e| errno(&self.path, e))?;
        self.temp.clear();
        Ok(Written {
            path: self.path.clone(),
            size,
            mode: format!("{:04o}", self.mode),
            created: !self.existed,
        })
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.temp.is_empty() {
            let _ = rustix::fs::unlinkat(&self.parent, self.temp.as_str(), AtFlags::empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_before_any_io() {
        assert_eq!(components("").unwrap(), Vec::<&str>::new());
        assert_eq!(components(".").unwrap(), Vec::<&str>::new());
        assert_eq!(components("a/b.txt").unwrap(), vec!["a", "b.txt"]);
        assert_eq!(components("a/b/").unwrap(), vec!["a", "b"]);
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/./b",
            "a\0b",
            "..",
        ] {
            assert!(components(bad).is_err(), "{bad:?}");
        }
        assert!(components(&"a/".repeat(2100)).is_err());
        assert!(components(&"x".repeat(256)).is_err());
    }

    #[test]
    fn symlinks_never_lead_outside() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir(r.join("d")).unwrap();
        std::fs::write(r.join("d/in.txt"), "in").unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("out")).unwrap();
        std::os::unix::fs::symlink("../..", r.join("d/up")).unwrap();
        std::os::unix::fs::symlink("d/in.txt", r.join("rel")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), r.join("target")).unwrap();
        let tree = Tree::open(r).unwrap();
        assert!(matches!(
            tree.read("out/secret"),
            Err(FilesError::Outside(_))
        ));
        assert!(matches!(tree.read("d/up/etc"), Err(FilesError::Outside(_))));
        assert!(matches!(tree.read("target"), Err(FilesError::Outside(_))));
        // A relative link that stays inside works.
        assert!(matches!(tree.read("rel"), Ok(Found::File { size: 2, .. })));
        // Writing through a planted link replaces the link, never the file it points to.
        let mut up = tree.upload("target", 0o644, true).unwrap();
        let mut f = up.file();
        std::io::Write::write_all(&mut f, b"new").unwrap();
        up.commit(f).unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.path().join("secret")).unwrap(),
            "s"
        );
        assert_eq!(std::fs::read_to_string(r.join("target")).unwrap(), "new");
        // Deleting a link to a directory removes the link only.
        tree.delete("out", true).unwrap();
        assert!(outside.path().join("secret").exists());
        // An abandoned upload leaves nothing.
        drop(tree.upload("d/x", 0o644, true).unwrap());
        let names: Vec<_> = std::fs::read_dir(r.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(matches!(
            tree.delete("d", false),
            Err(FilesError::NotEmpty(_))
        ));
        tree.delete("d", true).unwrap();
        assert!(!r.join("d").exists());
    }

    /// A FIFO the sandbox planted is refused at once: reading it never waits for a writer
    /// (that would hold one of the gateway's blocking threads for good).
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let root = tempfile::tempdir().unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.path().join("pipe"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let tree = Tree::open(root.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(matches!(tree.read("pipe"), Err(FilesError::Unsupported(_))));
        });
        let refused = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(
            refused,
            Ok(true),
            "reading a FIFO waited or was not refused"
        );
    }
}
