//! `isolation = sandbox`: a process sandbox as a container without an image. bubblewrap (run
//! as root, without a user namespace) builds new PID, IPC, UTS, cgroup, network and mount
//! namespaces whose root is an empty tmpfs holding the host's system directories read-only
//! (`/usr`, `/etc`, `/opt` and the configured `sandbox_ro_paths`), a fresh `/proc`, `/dev`,
//! `/tmp` and `/run`, and the sandbox's working tree, writable, at `/sandbox`. Then `setpriv`
//! becomes the sandbox's own uid (and gid) with no capabilities, no supplementary groups and
//! `no_new_privs`, and runs the init script as the namespace's PID 1.
//!
//! Nothing else of the host is there: not `/root`, `/home`, the gateway's data directory (its
//! store, keys and other sandboxes), nor the configuration file or TLS key even when they lie
//! under a bound directory (each is covered). Every sandbox has a uid of its own, recorded in
//! its directory (`uid`) and handed out lowest-free from [`UID_BASE`]: the kernel refuses a
//! signal or ptrace from one sandbox to another, or to anything outside.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// First uid (and gid) handed to a sandbox.
pub const UID_BASE: u32 = 2_000_000_000;
/// How many sandboxes can hold a uid at once.
pub const UID_COUNT: u32 = 1_000_000;
/// The working tree's path inside the sandbox (also its `HOME`).
pub const HOME: &str = "/sandbox";
/// `PATH` inside the sandbox: the system's directories, never the gateway's own `PATH`
/// (which may point into directories the sandbox does not see).
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Host directories every sandbox sees read-only.
const SYSTEM_DIRS: [&str; 3] = ["/usr", "/etc", "/opt"];
/// Top-level names that are links into `/usr` on merged-`/usr` systems (else directories).
const USR_LINKS: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// The file recording a sandbox's uid in its directory.
const UID_FILE: &str = "uid";

/// Whether sandboxes can be jailed here: namespace privilege and the two programs.
pub fn available() -> bool {
    super::super::netns::available()
        && crate::runtimes::program_installed("bwrap")
        && crate::runtimes::program_installed("setpriv")
}

/// What every sandbox of this gateway sees and does not see.
pub struct Jail {
    /// The directory holding one directory per sandbox.
    root: PathBuf,
    /// Extra read-only paths (`sandbox_ro_paths`).
    ro_paths: Vec<PathBuf>,
    /// Host paths covered when they lie under a bound path (data directory, secrets).
    hidden: Vec<PathBuf>,
    /// Uids held by sandbox directories, read from them the first time one is needed.
    taken: Mutex<Option<BTreeSet<u32>>>,
    /// Host files bound read-only at a path of the sandbox's own (its resolver list).
    files: Vec<(PathBuf, PathBuf)>,
}

/// One sandbox's start: what [`bwrap_args`] needs.
pub struct Layout<'a> {
    pub work: &'a Path,
    /// Directory holding the generated `passwd`, `group` and `hosts`.
    pub etc: &'a Path,
    pub hostname: &'a str,
    pub uid: u32,
    /// The init script and its arguments, run as the sandbox's user.
    pub init: &'a [&'a str],
}

impl Jail {
    pub fn new(root: PathBuf, ro_paths: Vec<PathBuf>, hidden: Vec<PathBuf>) -> Jail {
        Jail {
            root,
            ro_paths,
            hidden,
            taken: Mutex::new(None),
            files: Vec::new(),
        }
    }

    /// Also binds host file `source` read-only at `target` in every sandbox (a path under
    /// the sandbox's own `/run` or `/tmp`).
    pub fn with_file(mut self, source: PathBuf, target: PathBuf) -> Jail {
        self.files.push((source, target));
        self
    }

    /// Paths visible in the sandbox, read-only.
    fn bound(&self) -> impl Iterator<Item = &Path> {
        SYSTEM_DIRS
            .iter()
            .map(Path::new)
            .chain(self.ro_paths.iter().map(PathBuf::as_path))
    }

    /// Whether `program` (a name looked up on the sandbox's `PATH`, or an absolute path) can
    /// run inside a sandbox.
    pub fn program_visible(&self, program: &str) -> bool {
        let candidates: Vec<PathBuf> = if program.contains('/') {
            vec![PathBuf::from(program)]
        } else {
            PATH.split(':')
                .map(|d| Path::new(d).join(program))
                .collect()
        };
        candidates.iter().any(|c| {
            c.is_file()
                && std::fs::canonicalize(c)
                    .map(|real| self.bound().any(|b| real.starts_with(b)) || self.covers(c))
                    .unwrap_or(false)
        })
    }

    /// Whether `p` (as written) lies under a bound path, e.g. `/bin/sh` through `/usr`.
    fn covers(&self, p: &Path) -> bool {
        let p = match p.strip_prefix("/") {
            Ok(rest) => match rest.components().next() {
                Some(first) if USR_LINKS.iter().any(|l| first.as_os_str() == *l) => {
                    Path::new("/usr").join(rest)
                }
                _ => p.to_path_buf(),
            },
            Err(_) => return false,
        };
        self.bound().any(|b| p.starts_with(b))
    }

    /// The uid of the sandbox whose directory is `dir`: the one recorded there, else the
    /// lowest free one, recorded before it is returned.
    pub fn uid(&self, dir: &Path) -> io::Result<u32> {
        if let Some(uid) = read_uid(dir) {
            return Ok(uid);
        }
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let set = taken.get_or_insert_with(|| scan(&self.root));
        let uid = (UID_BASE..UID_BASE + UID_COUNT)
            .find(|u| !set.contains(u))
            .ok_or_else(|| io::Error::other("every sandbox uid is in use"))?;
        let temp = dir.join(".uid.tmp");
        std::fs::write(&temp, uid.to_string())?;
        std::fs::rename(&temp, dir.join(UID_FILE))?;
        set.insert(uid);
        Ok(uid)
    }

    /// Forgets the uid of the sandbox whose directory is `dir` (before it is removed).
    pub fn release(&self, dir: &Path) {
        if let Some(uid) = read_uid(dir) {
            let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(set) = taken.as_mut() {
                set.remove(&uid);
            }
        }
    }

    /// Writes the sandbox's `passwd`, `group` and `hosts` into `etc`, and gives the working
    /// tree to its user (once: a tree already owned by `uid` is left alone).
    pub fn prepare(&self, etc: &Path, work: &Path, hostname: &str, uid: u32) -> io::Result<()> {
        std::fs::create_dir_all(etc)?;
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        let line = |s: &str| {
            if s.is_empty() || s.ends_with('\n') {
                String::new()
            } else {
                "\n".into()
            }
        };
        std::fs::write(
            etc.join("passwd"),
            format!(
                "{passwd}{}sandbox:x:{uid}:{uid}:sandbox:{HOME}:/bin/sh\n",
                line(&passwd)
            ),
        )?;
        std::fs::write(
            etc.join("group"),
            format!("{group}{}sandbox:x:{uid}:\n", line(&group)),
        )?;
        std::fs::write(
            etc.join("hosts"),
            format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
        )?;
        if std::fs::metadata(work)?.uid() != uid {
            chown_tree(work, uid)?;
        }
        Ok(())
    }

    /// bubblewrap's arguments for one sandbox, ending with the command it runs.
    pub fn bwrap_args(&self, l: &Layout) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
            a.extend(items.iter().map(|i| i.as_ref().to_os_string()));
        };
        push(&[
            &"--unshare-pid",
            &"--unshare-ipc",
            &"--unshare-uts",
            &"--unshare-cgroup-try",
            &"--unshare-net",
            // A session of its own: no controlling terminal to read or push keys into.
            &"--new-session",
            &"--hostname",
            &l.hostname,
        ]);
        push(&[&"--ro-bind", &"/usr", &"/usr"]);
        for name in USR_LINKS {
            let host = Path::new("/").join(name);
            match std::fs::read_link(&host) {
                Ok(target) => push(&[&"--symlink", &target, &host]),
                Err(_) if host.is_dir() => push(&[&"--ro-bind", &host, &host]),
                Err(_) => {}
            }
        }
        push(&[
            &"--ro-bind",
            &"/etc",
            &"/etc",
            &"--ro-bind-try",
            &"/opt",
            &"/opt",
        ]);
        for f in ["passwd", "group", "hosts"] {
            push(&[&"--ro-bind", &l.etc.join(f), &Path::new("/etc").join(f)]);
        }
        push(&[
            &"--proc",
            &"/proc",
            &"--dev",
            &"/dev",
            &"--perms",
            &"1777",
            &"--tmpfs",
            &"/dev/shm",
            &"--perms",
            &"1777",
            &"--tmpfs",
            &"/tmp",
            &"--tmpfs",
            &"/run",
            &"--dir",
            &"/var",
            &"--perms",
            &"1777",
            &"--tmpfs",
            &"/var/tmp",
        ]);
        let binds = self
            .files
            .iter()
            .map(|(s, t)| (s.as_path(), t.as_path()))
            .chain(self.ro_paths.iter().map(|p| (p.as_path(), p.as_path())));
        for (source, target) in binds {
            // bubblewrap would create the missing parents for the sandbox's root only.
            let mut parents: Vec<&Path> = target.ancestors().skip(1).collect();
            parents.pop(); // "/"
            for dir in parents.into_iter().rev() {
                push(&[&"--perms", &"0755", &"--dir", &dir]);
            }
            push(&[&"--ro-bind-try", &source, &target]);
        }
        // Secrets and the data directory, wherever a bound path would show them.
        for h in &self.hidden {
            let Ok(meta) = std::fs::metadata(h) else {
                continue;
            };
            if !self.covers(h) {
                continue;
            }
            if meta.is_dir() {
                push(&[&"--tmpfs", h]);
            } else {
                push(&[&"--ro-bind", &"/dev/null", h]);
            }
        }
        push(&[
            &"--bind",
            &l.work,
            &HOME,
            &"--chdir",
            &HOME,
            // bubblewrap writes `{"child-pid": N, ...}` to its standard input (a pipe the
            // gateway reads) and closes it in the sandbox.
            &"--info-fd",
            &"0",
            &"--as-pid-1",
            &"--",
            &"setpriv",
            &"--reuid",
            &l.uid.to_string(),
            &"--regid",
            &l.uid.to_string(),
            &"--clear-groups",
            &"--inh-caps=-all",
            &"--bounding-set=-all",
            &"--",
        ]);
        a.extend(l.init.iter().map(OsString::from));
        a
    }
}

fn read_uid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(UID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|u| (UID_BASE..UID_BASE + UID_COUNT).contains(u))
}

/// Every uid recorded under `root`.
fn scan(root: &Path) -> BTreeSet<u32> {
    let Ok(dirs) = std::fs::read_dir(root) else {
        return BTreeSet::new();
    };
    dirs.flatten().filter_map(|d| read_uid(&d.path())).collect()
}

/// `lchown -R uid:uid`, never following a link.
fn chown_tree(path: &Path, uid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid)?;
        }
    }
    Ok(())
}

/// Whether any account or group of this host has a uid or gid in the sandboxes' range (their
/// files would be the sandboxes', and the reverse).
pub fn range_clash() -> Option<String> {
    let range = UID_BASE..UID_BASE + UID_COUNT;
    for file in ["/etc/passwd", "/etc/group"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines() {
            let mut fields = line.split(':');
            let name = fields.next().unwrap_or_default();
            if let Some(id) = fields.nth(1).and_then(|f| f.parse::<u32>().ok()) {
                if range.contains(&id) {
                    return Some(format!("{name} ({id}) in {file}"));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail(ro: &[&str], hidden: &[&str]) -> Jail {
        Jail::new(
            PathBuf::from("/nonexistent"),
            ro.iter().map(PathBuf::from).collect(),
            hidden.iter().map(PathBuf::from).collect(),
        )
    }

    fn args(j: &Jail) -> Vec<String> {
        j.bwrap_args(&Layout {
            work: Path::new("/data/sandboxes/sb-1/work"),
            etc: Path::new("/data/sandboxes/sb-1/etc"),
            hostname: "sb-1",
            uid: UID_BASE + 7,
            init: &["/bin/sh", "-c", "init", "sandgate-init", "npm run dev"],
        })
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect()
    }

    #[test]
    fn the_command_runs_as_the_sandbox_user_with_nothing_else() {
        let a = args(&jail(&[], &[]));
        let at = a.iter().position(|x| x == "setpriv").expect("setpriv");
        assert_eq!(a[at - 1], "--");
        assert_eq!(
            &a[at..],
            [
                "setpriv",
                "--reuid",
                "2000000007",
                "--regid",
                "2000000007",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--",
                "/bin/sh",
                "-c",
                "init",
                "sandgate-init",
                "npm run dev"
            ]
        );
        let joined = a.join(" ");
        for needed in [
            "--unshare-pid",
            "--unshare-net",
            "--ro-bind /usr /usr",
            "--ro-bind /etc /etc",
            "--bind /data/sandboxes/sb-1/work /sandbox",
            "--ro-bind /data/sandboxes/sb-1/etc/passwd /etc/passwd",
            "--info-fd 0 --as-pid-1",
        ] {
            assert!(joined.contains(needed), "{needed} missing from {joined}");
        }
        // Nothing writable from the host but the working tree.
        assert_eq!(a.iter().filter(|x| *x == "--bind").count(), 1, "{joined}");
    }

    #[test]
    fn secrets_under_a_bound_path_are_covered() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("tls.key");
        std::fs::write(&key, "secret").unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let ro = dir.path().to_str().unwrap();
        let a = args(&jail(
            &[ro],
            &[key.to_str().unwrap(), data.to_str().unwrap()],
        ))
        .join(" ");
        assert!(
            a.contains(&format!("--ro-bind /dev/null {}", key.display())),
            "{a}"
        );
        assert!(a.contains(&format!("--tmpfs {}", data.display())), "{a}");
        // Covers come after the bind that would show them.
        assert!(
            a.find(&format!("--ro-bind-try {ro}")) < a.find("/dev/null"),
            "{a}"
        );
        // Not under any bound path: nothing to cover.
        let a = args(&jail(&[], &[key.to_str().unwrap()])).join(" ");
        assert!(!a.contains("/dev/null"), "{a}");
    }

    #[test]
    fn programs_are_looked_up_where_the_sandbox_sees_them() {
        let j = jail(&[], &[]);
        assert!(j.program_visible("sh"));
        assert!(j.program_visible("/bin/sh"));
        assert!(!j.program_visible("no-such-program-anywhere"));
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("tool");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        assert!(!j.program_visible(prog.to_str().unwrap()));
        let j = jail(&[dir.path().to_str().unwrap()], &[]);
        assert!(j.program_visible(prog.to_str().unwrap()));
    }

    #[test]
    fn uids_are_recorded_unique_and_reused_after_release() {
        let root = tempfile::tempdir().unwrap();
        let j = Jail::new(root.path().to_path_buf(), vec![], vec![]);
        let dir = |n: &str| {
            let d = root.path().join(n);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let (a, b) = (dir("a"), dir("b"));
        let ua = j.uid(&a).unwrap();
        let ub = j.uid(&b).unwrap();
        assert_eq!(ua, UID_BASE);
        assert_eq!(ub, UID_BASE + 1);
        assert_eq!(j.uid(&a).unwrap(), ua, "recorded");
        // A gateway started later reads what is recorded.
        let again = Jail::new(root.path().to_path_buf(), vec![], vec![]);
        assert_eq!(again.uid(&dir("c")).unwrap(), UID_BASE + 2);
        j.release(&a);
        std::fs::remove_dir_all(&a).unwrap();
        assert_eq!(j.uid(&dir("d")).unwrap(), UID_BASE);
    }
}
