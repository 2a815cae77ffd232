//! Files in a sandbox's working tree reached only through commands run in it
//! ([`Backend::exec`]), for backends with no host path to the tree (a Kubernetes pod): one small
//! POSIX `sh` script per operation, with the lexical path checks (`files::components`), answers
//! and errors of `crate::files`. Paths reach a script only as arguments, never in its text. The
//! tree is the directory commands start in; a path's directories are entered one at a time
//! with `cd -P` and must stay beneath it, and a read follows links only while they do. An
//! upload streams into a temporary file beside the target (`cat` on the exec's stdin) and a
//! second exec renames it over the target once the body is complete; an abandoned one is
//! removed by a third. A download streams `cat`'s stdout. Tools: `sh`, `cat`, `stat -c`,
//! `mkdir`, `chmod`, `mv`, `rm`, `rmdir`, and `readlink` for links.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::backend::exec::{Chunk, ExecError, ExecExit, ExecSpec, StartKind};
use crate::backend::Backend;
use crate::files::{components, Entry, FilesError, Listing, Written, MAX_ENTRIES};
use crate::model::Sandbox;

/// The scripts' exit codes for the answers `crate::files` gives as errors.
const NOT_FOUND: i32 = 90;
const EXISTS: i32 = 91;
const NOT_EMPTY: i32 = 92;
const OUTSIDE: i32 = 93;
const UNSUPPORTED: i32 = 94;

/// What every script starts with: the root (`r`, physical), `need TOOL…` (exits 127 naming
/// a missing one), `under DIR` (exits 93 unless DIR is beneath the root), `gone NAME`,
/// `realdir NAME` (a directory, not a link to one), `absolute NAME` (a link to an absolute
/// path: outside wherever it points, as `openat2`'s `RESOLVE_BENEATH` has it), and
/// `into CREATE COMPONENT…` (enters each component, creating missing ones when CREATE is 1;
/// exits 90 when one is not a directory, 93 when one leads outside). Their own variables
/// start with `_`: a script's are plain letters.
macro_rules! prelude {
    () => {
        r#"unset CDPATH
r=$(pwd -P) || exit 95
need() {
  for _x in "$@"; do
    command -v "$_x" >/dev/null 2>&1 && continue
    printf 'the files API needs %s in the sandbox\n' "$_x" >&2; exit 127
  done
}
under() { case "$1/" in "${r%/}/"*) ;; *) exit 93 ;; esac; }
gone() { [ ! -e "./$1" ] && [ ! -L "./$1" ]; }
realdir() { [ -d "./$1" ] && [ ! -L "./$1" ]; }
absolute() {
  [ -L "./$1" ] || return 1
  need readlink
  _t=$(readlink -- "./$1") || exit 95
  case $_t in /*) return 0 ;; esac
  return 1
}
into() {
  _mk=$1; shift
  for _c in "$@"; do
    if [ "$_mk" = 1 ] && gone "$_c"; then
      mkdir -m 755 -- "./$_c" 2>/dev/null || [ -e "./$_c" ] || exit 95
    fi
    absolute "$_c" && exit 93
    cd -P -- "./$_c" 2>/dev/null || exit 90
    under "$(pwd -P)"
  done
}
"#
    };
}

/// `NAME MAX DIR…`: `F size` and the bytes of a file, or `D` and a directory's entries (each
/// `rawmode(hex) size mtime`, the name and NUL, a link's target and NUL; `T` when more than
/// MAX), following relative links at NAME only while they stay beneath the root.
const READ: &str = concat!(
    prelude!(),
    r#"n=$1 max=$2; shift 2
need stat cat
into 0 "$@"
i=0
while [ -L "./$n" ]; do
  i=$((i + 1)); [ "$i" -le 40 ] || exit 93
  need readlink
  t=$(readlink -- "./$n") || exit 95
  case $t in
    /*) exit 93 ;;
    */*) cd -P -- "./${t%/*}" 2>/dev/null || exit 90
      under "$(pwd -P)"
      n=${t##*/} ;;
    *) n=$t ;;
  esac
done
if [ -d "./$n" ]; then
  cd -P -- "./$n" || exit 90
  under "$(pwd -P)"
  printf 'D\n'
  k=0
  for f in * .[!.]* ..?*; do
    gone "$f" && continue
    k=$((k + 1))
    if [ "$k" -gt "$max" ]; then printf 'T\n'; break; fi
    stat -c '%f %s %Y' -- "./$f" 2>/dev/null || continue
    printf '%s\0' "$f"
    if [ -L "./$f" ]; then readlink -- "./$f" 2>/dev/null; printf '\0'; fi
  done
elif [ -f "./$n" ]; then
  s=$(stat -c %s -- "./$n") || exit 95
  printf 'F %s\n' "$s"
  exec cat -- "./$n"
elif gone "$n"; then exit 90
else exit 94
fi
"#
);

/// `NAME TEMP OVERWRITE DIR…`: creates the directories and TEMP, prints whether NAME exists
/// (`0`/`1`), then writes stdin to TEMP.
const BEGIN: &str = concat!(
    prelude!(),
    r#"n=$1 t=$2 o=$3; shift 3
need mkdir cat chmod mv rm stat
into 1 "$@"
realdir "$n" && exit 91
e=0
gone "$n" || { e=1; [ "$o" = 1 ] || exit 91; }
( set -C; : > "./$t" ) 2>/dev/null || exit 95
printf '%s\n' "$e"
exec cat > "./$t"
"#
);

/// `NAME TEMP OVERWRITE MODE DIR…`: TEMP, complete, renamed over NAME (a link there is
/// replaced, never followed); prints the size.
const COMMIT: &str = concat!(
    prelude!(),
    r#"n=$1 t=$2 o=$3 m=$4; shift 4
into 0 "$@"
[ -f "./$t" ] || exit 95
if realdir "$n" || { [ "$o" != 1 ] && ! gone "$n"; }; then rm -f -- "./$t"; exit 91; fi
chmod "$m" "./$t" && { [ ! -L "./$n" ] || rm -f -- "./$n"; } && mv -f -- "./$t" "./$n" \
  || { rm -f -- "./$t"; exit 95; }
exec stat -c %s -- "./$n"
"#
);

/// `TEMP DIR…`: removes an abandoned upload's temporary file.
const ABANDON: &str = concat!(
    prelude!(),
    r#"t=$1; shift
into 0 "$@"
rm -f -- "./$t"
"#
);

/// `NAME MODE DIR…`: creates the directory (and its parents); prints whether it was new and
/// its raw mode.
const MKDIR: &str = concat!(
    prelude!(),
    r#"n=$1 m=$2; shift 2
need mkdir stat
into 1 "$@"
c=0
if gone "$n"; then mkdir -m "$m" -- "./$n" 2>/dev/null || realdir "$n" || exit 95; c=1; fi
realdir "$n" || exit 91
printf '%s ' "$c"
exec stat -c %f -- "./$n"
"#
);

/// `NAME RECURSIVE DIR…`: removes a file or link itself, or a directory (empty, or with
/// everything in it when RECURSIVE is 1).
const DELETE: &str = concat!(
    prelude!(),
    r#"n=$1 rec=$2; shift 2
need rm rmdir
into 0 "$@"
gone "$n" && exit 90
if realdir "$n"; then
  if [ "$rec" = 1 ]; then rm -rf -- "./$n" || exit 95; exit 0; fi
  rmdir -- "./$n" 2>/dev/null && exit 0
  for f in "./$n"/* "./$n"/.[!.]* "./$n"/..?*; do gone "$f" || exit 92; done
  exit 95
fi
rm -f -- "./$n" || exit 95
"#
);

/// Most stdout a listing or an answer may take (a full listing of long names fits).
const MAX_ANSWER: usize = 16 << 20;
/// The first bytes of stderr, kept for an error's message.
const STDERR_KEPT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ExecFilesError {
    #[error(transparent)]
    Files(#[from] FilesError),
    /// The script could not run (sandbox not running, no `/bin/sh`, the backend's API).
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// What a path names.
pub enum Found {
    /// A file: its size and its bytes as the exec sends them.
    File {
        size: u64,
        body: BoxStream<'static, std::io::Result<Bytes>>,
    },
    Dir(Listing),
}

/// A sandbox's working tree, reached through its backend's exec.
#[derive(Clone)]
pub struct ExecFiles {
    backend: Arc<dyn Backend>,
    sandbox: Arc<Sandbox>,
}

/// One script running.
struct Run {
    stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    output: BoxStream<'static, std::io::Result<Chunk>>,
    exit: BoxFuture<'static, ExecExit>,
    /// Stdout read but not taken yet.
    pending: BytesMut,
    stderr: Vec<u8>,
}

/// How a script ended: its exit and the start of its stderr.
struct Ended {
    stdout: BytesMut,
    exit: ExecExit,
    stderr: Vec<u8>,
}

impl Run {
    /// The next piece of stdout (stderr is kept aside); `None` once the output ended.
    async fn next_stdout(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            match self.output.next().await? {
                Ok(Chunk::Stdout(b)) => return Some(Ok(b)),
                Ok(Chunk::Stderr(b)) => {
                    let room = STDERR_KEPT.saturating_sub(self.stderr.len());
                    self.stderr.extend_from_slice(&b[..b.len().min(room)]);
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next line of stdout without its `\n`; `None` if the output ended first.
    async fn line(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                let line = self.pending.split_to(i + 1).freeze();
                return Ok(Some(line.slice(..i)));
            }
            if self.pending.len() > 4096 {
                return Err(std::io::Error::other("an answer line without its end"));
            }
            match self.next_stdout().await {
                Some(Ok(b)) => self.pending.extend_from_slice(&b),
                Some(Err(e)) => return Err(e),
                None => return Ok(None),
            }
        }
    }

    /// Ends stdin (a script still reading it finishes), reads the output to its end (keeping
    /// at most [`MAX_ANSWER`] of stdout), then the exit.
    async fn end(mut self) -> Ended {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.shutdown().await;
        }
        let mut stdout = std::mem::take(&mut self.pending);
        while let Some(chunk) = self.next_stdout().await {
            match chunk {
                Ok(b) if stdout.len() + b.len() <= MAX_ANSWER => stdout.extend_from_slice(&b),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let exit = self.exit.await;
        Ended {
            stdout,
            exit,
            stderr: self.stderr,
        }
    }

    /// The rest of stdout, at most `size` bytes: an error if it ends short.
    fn into_body(mut self, size: u64, path: String) -> BoxStream<'static, std::io::Result<Bytes>> {
        let first = self.pending.split().freeze();
        futures_util::stream::unfold((self, size, Some(first)), move |(mut run, left, first)| {
            let path = path.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let chunk = match first.filter(|b| !b.is_empty()) {
                    Some(b) => Ok(b),
                    None => match run.next_stdout().await {
                        Some(chunk) => chunk,
                        None => Err(std::io::Error::other(format!(
                            "{path}: the file ended {left} bytes short: {}",
                            String::from_utf8_lossy(&run.stderr).trim()
                        ))),
                    },
                };
                match chunk {
                    Ok(mut b) => {
                        b.truncate(usize::try_from(left).unwrap_or(usize::MAX));
                        let left = left - b.len() as u64;
                        Some((Ok(b), (run, left, None)))
                    }
                    Err(e) => Some((Err(e), (run, 0, None))),
                }
            }
        })
        .boxed()
    }
}

/// The error a script's exit stands for.
fn failure(path: &str, ended: Ended) -> ExecFilesError {
    let p = || path.to_string();
    match ended.exit {
        ExecExit::Exited(NOT_FOUND) => FilesError::NotFound(p()).into(),
        ExecExit::Exited(EXISTS) => FilesError::Exists(p()).into(),
        ExecExit::Exited(NOT_EMPTY) => FilesError::NotEmpty(p()).into(),
        ExecExit::Exited(OUTSIDE) => FilesError::Outside(p()).into(),
        ExecExit::Exited(UNSUPPORTED) => FilesError::Unsupported(p()).into(),
        ExecExit::NotStarted { kind, message } => ExecError::NotStarted { kind, message }.into(),
        // `sh` or a tool is missing (an `env` wrapper reports a missing `sh` so, too).
        ExecExit::Exited(127) => ExecError::NotStarted {
            kind: StartKind::NotFound,
            message: String::from_utf8_lossy(&ended.stderr).trim().to_string(),
        }
        .into(),
        exit => FilesError::Io(format!(
            "{path}: {} ({exit:?})",
            String::from_utf8_lossy(&ended.stderr).trim()
        ))
        .into(),
    }
}

fn flag(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}

fn answer(path: &str, stdout: &[u8]) -> FilesError {
    FilesError::Io(format!(
        "{path}: unexpected answer {:?}",
        String::from_utf8_lossy(&stdout[..stdout.len().min(200)])
    ))
}

/// The entry kind of a raw `st_mode`, as `crate::files` names it.
fn kind(raw: u32) -> &'static str {
    match raw & 0o170000 {
        0o100000 => "file",
        0o040000 => "dir",
        0o120000 => "symlink",
        _ => "other",
    }
}

/// The READ script's entries (after its `D` line).
fn parse_listing(path: &str, out: &[u8]) -> Result<Listing, FilesError> {
    fn until(rest: &[u8], end: u8) -> Option<(&[u8], &[u8])> {
        let i = rest.iter().position(|b| *b == end)?;
        Some((&rest[..i], &rest[i + 1..]))
    }
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let bad = || answer(path, out);
    let mut entries = Vec::new();
    let mut truncated = false;
    let mut rest = out;
    while !rest.is_empty() {
        let (line, r) = until(rest, b'\n').ok_or_else(bad)?;
        if line == b"T" {
            truncated = true;
            break;
        }
        let line = std::str::from_utf8(line).map_err(|_| bad())?;
        let mut fields = line.split(' ');
        let mut field = || fields.next().ok_or_else(bad);
        let raw = u32::from_str_radix(field()?, 16).map_err(|_| bad())?;
        let size: u64 = field()?.parse().map_err(|_| bad())?;
        let mtime: i64 = field()?.parse().map_err(|_| bad())?;
        let (name, r) = until(r, 0).ok_or_else(bad)?;
        rest = r;
        let mut link_target = None;
        if kind(raw) == "symlink" {
            let (target, r) = until(rest, 0).ok_or_else(bad)?;
            rest = r;
            let target = target.strip_suffix(b"\n").unwrap_or(target);
            link_target = (!target.is_empty()).then(|| lossy(target));
        }
        entries.push(Entry {
            name: lossy(name),
            kind: kind(raw),
            size,
            mode: format!("{:04o}", raw & 0o7777),
            mtime,
            link_target,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Listing {
        path: path.to_string(),
        entries,
        truncated,
    })
}

impl ExecFiles {
    pub fn new(backend: Arc<dyn Backend>, sandbox: Sandbox) -> ExecFiles {
        ExecFiles {
            backend,
            sandbox: Arc::new(sandbox),
        }
    }

    /// Starts `script` with `args`, then the directory components `dirs`.
    async fn start(
        &self,
        script: &'static str,
        args: &[&str],
        dirs: &[&str],
        stdin: bool,
    ) -> Result<Run, ExecFilesError> {
        let argv: Vec<String> = ["/bin/sh", "-c", script, "sandgate-files"]
            .into_iter()
            .chain(args.iter().copied())
            .chain(dirs.iter().copied())
            .map(String::from)
            .collect();
        let spec = ExecSpec {
            argv,
            env: Default::default(),
            cwd: None,
            stdin,
            tag: format!("files-{:016x}", rand::random::<u64>()),
        };
        let handle = self.backend.exec(&self.sandbox, spec).await?;
        Ok(Run {
            stdin: handle.stdin,
            output: handle.output,
            exit: handle.exit,
            pending: BytesMut::new(),
            stderr: Vec::new(),
        })
    }

    /// Runs `script` to its end: its stdout, or the error its exit stands for.
    async fn run(
        &self,
        path: &str,
        script: &'static str,
        args: &[&str],
        dirs: &[&str],
    ) -> Result<BytesMut, ExecFilesError> {
        let ended = self.start(script, args, dirs, false).await?.end().await;
        match ended.exit {
            ExecExit::Exited(0) => Ok(ended.stdout),
            _ => Err(failure(path, ended)),
        }
    }

    /// What `path` names: a file to stream, or a directory's listing.
    pub async fn read(&self, path: &str) -> Result<Found, ExecFilesError> {
        let parts = components(path)?;
        let (name, dirs) = parts.split_last().map_or(("", &[][..]), |(n, d)| (*n, d));
        let max = MAX_ENTRIES.to_string();
        let mut run = self.start(READ, &[name, &max], dirs, false).await?;
        let io = |e: std::io::Error| FilesError::Io(format!("{path}: {e}"));
        let header = run.line().await.map_err(io)?;
        match header.as_deref() {
            Some(b"D") => {
                let ended = run.end().await;
                if ended.exit != ExecExit::Exited(0) {
                    return Err(failure(path, ended));
                }
                Ok(Found::Dir(parse_listing(path, &ended.stdout)?))
            }
            Some(h) if h.starts_with(b"F ") => {
                let size = std::str::from_utf8(&h[2..])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| answer(path, h))?;
                Ok(Found::File {
                    size,
                    body: run.into_body(size, path.to_string()),
                })
            }
            _ => Err(failure(path, run.end().await)),
        }
    }

    /// Creates the directory `path` (and its parents).
    pub async fn mkdir(&self, path: &str, mode: u32) -> Result<Written, ExecFilesError> {
        let parts = components(path)?;
        let Some((name, dirs)) = parts.split_last() else {
            return Err(FilesError::InvalidPath(path.into()).into());
        };
        let out = self
            .run(path, MKDIR, &[name, &format!("{mode:o}")], dirs)
            .await?;
        let text = std::str::from_utf8(&out).unwrap_or("");
        let (created, raw) = text
            .trim()
            .split_once(' ')
            .ok_or_else(|| answer(path, &out))?;
        let raw = u32::from_str_radix(raw, 16).map_err(|_| answer(path, &out))?;
        Ok(Written {
            path: path.into(),
            size: 0,
            mode: format!("{:04o}", raw & 0o7777),
            created: created == "1",
        })
    }

    /// Starts a write of `path`: the body goes to [`ExecUpload::sink`], and
    /// [`ExecUpload::commit`] renames it over the name. `overwrite: false` refuses an existing
    /// name.
    pub async fn upload(
        &self,
        path: &str,
        mode: u32,
        overwrite: bool,
    ) -> Result<ExecUpload, ExecFilesError> {
        let parts = components(path)?;
        let Some((name, dirs)) = parts.split_last() else {
            return Err(FilesError::InvalidPath(path.into()).into());
        };
        let temp = format!(".sandgate-upload-{:016x}", rand::random::<u64>());
        let mut run = self
            .start(BEGIN, &[name, &temp, flag(overwrite)], dirs, true)
            .await?;
        let line = run
            .line()
            .await
            .map_err(|e| FilesError::Io(format!("{path}: {e}")))?;
        let existed = match line.as_deref() {
            Some(b"0") => false,
            Some(b"1") => true,
            _ => return Err(failure(path, run.end().await)),
        };
        let stdin = run.stdin.take();
        Ok(ExecUpload {
            files: self.clone(),
            dirs: dirs.iter().map(|d| d.to_string()).collect(),
            name: name.to_string(),
            temp,
            path: path.to_string(),
            mode,
            overwrite,
            existed,
            stdin,
            writer: Some(tokio::spawn(run.end())),
            abandoned: true,
        })
    }

    /// Deletes `path`: a file or link itself, or a directory (with everything in it when
    /// `recursive`). The root cannot be deleted.
    pub async fn delete(&self, path: &str, recursive: bool) -> Result<(), ExecFilesError> {
        let parts = components(path)?;
        let Some((name, dirs)) = parts.split_last() else {
            return Err(FilesError::InvalidPath(path.into()).into());
        };
        self.run(path, DELETE, &[name, flag(recursive)], dirs)
            .await
            .map(drop)
    }
}

/// A write in progress; dropped without [`commit`](ExecUpload::commit), its temporary file is
/// removed (by another exec, in the background).
pub struct ExecUpload {
    files: ExecFiles,
    dirs: Vec<String>,
    name: String,
    temp: String,
    path: String,
    mode: u32,
    overwrite: bool,
    existed: bool,
    /// The writing exec's stdin, until the body is complete.
    stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// The writing exec, read to its end (so its output never blocks its input).
    writer: Option<tokio::task::JoinHandle<Ended>>,
    /// Whether the temporary file is still this upload's to remove (not the commit's).
    abandoned: bool,
}

impl ExecUpload {
    /// Where the bytes go.
    pub fn sink(&mut self) -> &mut (dyn AsyncWrite + Send + Unpin) {
        self.stdin
            .as_deref_mut()
            .expect("the sink is there until the commit")
    }

    /// Ends the body, then renames the temporary file over the final name.
    pub async fn commit(mut self) -> Result<Written, ExecFilesError> {
        let path = self.path.clone();
        let io = |e: std::io::Error| FilesError::Io(format!("{path}: {e}"));
        if let Some(mut stdin) = self.stdin.take() {
            stdin.shutdown().await.map_err(io)?;
        }
        if let Some(writer) = self.writer.take() {
            let ended = writer.await.map_err(|e| io(std::io::Error::other(e)))?;
            if ended.exit != ExecExit::Exited(0) {
                return Err(failure(&self.path, ended));
            }
        }
        let dirs: Vec<&str> = self.dirs.iter().map(String::as_str).collect();
        let mode = format!("{:o}", self.mode);
        // The script removes the temporary file itself when it fails.
        self.abandoned = false;
        let args = [
            self.name.as_str(),
            self.temp.as_str(),
            flag(self.overwrite),
            mode.as_str(),
        ];
        let out = self.files.run(&self.path, COMMIT, &args, &dirs).await?;
        let size = std::str::from_utf8(&out)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| answer(&self.path, &out))?;
        Ok(Written {
            path: self.path.clone(),
            size,
            mode: format!("{:04o}", self.mode),
            created: !self.existed,
        })
    }
}

impl Drop for ExecUpload {
    fn drop(&mut self) {
        if !self.abandoned {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let stdin = self.stdin.take();
        let writer = self.writer.take();
        let files = self.files.clone();
        let dirs = std::mem::take(&mut self.dirs);
        let temp = std::mem::take(&mut self.temp);
        let path = self.path.clone();
        rt.spawn(async move {
            // EOF ends the `cat`; then its file goes.
            if let Some(mut stdin) = stdin {
                let _ = stdin.shutdown().await;
            }
            if let Some(writer) = writer {
                let _ = writer.await;
            }
            let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
            if let Err(e) = files.run(&path, ABANDON, &[&temp], &dirs).await {
                tracing::warn!(path, error = %e, "could not remove an abandoned upload");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A script that printed `chunks` and ended with `exit`.
    fn ran(chunks: Vec<Chunk>, exit: ExecExit) -> Run {
        Run {
            stdin: None,
            output: futures_util::stream::iter(chunks.into_iter().map(Ok)).boxed(),
            exit: Box::pin(std::future::ready(exit)),
            pending: BytesMut::new(),
            stderr: Vec::new(),
        }
    }

    async fn body(run: Run, size: u64) -> (Vec<u8>, Option<String>) {
        let mut got = Vec::new();
        let mut stream = run.into_body(size, "f".into());
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => got.extend_from_slice(&b),
                Err(e) => return (got, Some(e.to_string())),
            }
        }
        (got, None)
    }

    #[tokio::test]
    async fn a_download_is_the_header_then_exactly_size_bytes_of_stdout() {
        let out = |s: &'static str| Chunk::Stdout(Bytes::from_static(s.as_bytes()));
        let err = |s: &'static str| Chunk::Stderr(Bytes::from_static(s.as_bytes()));
        let mut run = ran(
            vec![out("F 8\nab"), err("noise"), out("cdefgh"), out("grown")],
            ExecExit::Exited(0),
        );
        assert_eq!(run.line().await.unwrap().as_deref(), Some(&b"F 8"[..]));
        assert_eq!(body(run, 8).await, (b"abcdefgh".to_vec(), None));
        // Shorter than announced (the file shrank, `cat` failed): an error, never a short
        // body that looks complete.
        let mut run = ran(
            vec![out("F 9\nabc"), err("cat: read error")],
            ExecExit::Exited(1),
        );
        run.line().await.unwrap();
        let (got, e) = body(run, 9).await;
        assert_eq!(got, b"abc");
        assert!(e.is_some_and(|e| e.contains("6 bytes short") && e.contains("read error")));
    }

    #[tokio::test]
    async fn exits_map_to_the_host_paths_errors() {
        let code = |c: i32| async move {
            failure(
                "p",
                ran(
                    vec![Chunk::Stderr(Bytes::from_static(b"why"))],
                    ExecExit::Exited(c),
                )
                .end()
                .await,
            )
        };
        assert!(matches!(
            code(90).await,
            ExecFilesError::Files(FilesError::NotFound(_))
        ));
        assert!(matches!(
            code(91).await,
            ExecFilesError::Files(FilesError::Exists(_))
        ));
        assert!(matches!(
            code(92).await,
            ExecFilesError::Files(FilesError::NotEmpty(_))
        ));
        assert!(matches!(
            code(93).await,
            ExecFilesError::Files(FilesError::Outside(_))
        ));
        assert!(matches!(
            code(94).await,
            ExecFilesError::Files(FilesError::Unsupported(_))
        ));
        assert!(matches!(
            code(127).await,
            ExecFilesError::Exec(ExecError::NotStarted { message, .. }) if message == "why"
        ));
        assert!(
            matches!(code(1).await, ExecFilesError::Files(FilesError::Io(m)) if m.contains("why"))
        );
    }

    #[test]
    fn listings_parse_as_the_script_prints_them() {
        let out = b"81a4 3 1700000000\nb.txt\0a1ff 1 1700000001\nlink\0b.txt\n\0\
                    41ed 4096 1700000002\n-x $(y)\0T\n";
        let l = parse_listing("d", out).unwrap();
        assert!(l.truncated);
        let v = serde_json::to_value(&l).unwrap();
        assert_eq!(v["path"], "d");
        assert_eq!(v["entries"][0]["name"], "-x $(y)");
        assert_eq!(v["entries"][0]["type"], "dir");
        assert_eq!(v["entries"][0]["mode"], "0755");
        assert_eq!(v["entries"][1]["name"], "b.txt");
        assert_eq!(v["entries"][1]["size"], 3);
        assert_eq!(v["entries"][1]["mode"], "0644");
        assert!(v["entries"][1].get("link_target").is_none());
        assert_eq!(v["entries"][2]["type"], "symlink");
        assert_eq!(v["entries"][2]["link_target"], "b.txt");
        assert_eq!(v["entries"][2]["mtime"], 1700000001);
        assert!(parse_listing("d", b"81a4 3\nx\0").is_err());
        assert!(parse_listing("d", b"81a4 3 1\nno-nul").is_err());
    }
}
