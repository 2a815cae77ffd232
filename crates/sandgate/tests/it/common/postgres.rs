//! A throwaway PostgreSQL server for tests (the store's unit tests include this file too):
//! `initdb` into a temporary directory (as the `postgres` user when running as root), a
//! server on 127.0.0.1 at a free port with its socket in that directory, stopped by its pid
//! when the guard drops. Without PostgreSQL installed, [`PgServer::start`] says `SKIPPED`
//! and returns `None`, except under `CI=true`, where it panics (CI must run these tests).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running throwaway server; stopped (and its files removed) on drop.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    /// Run the server's programs as this user (`Some("postgres")` when we are root).
    user: Option<&'static str>,
    pid: Option<i32>,
}

/// The directory of PostgreSQL's server programs, the newest installed major version first.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    // The effective uid, from /proc (the crate denies the `unsafe` a libc call needs).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

impl PgServer {
    /// Starts a server, or `None` (with `SKIPPED:` on stderr) where PostgreSQL is not
    /// installed and `CI` is not `true`.
    pub fn start() -> Option<PgServer> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "CI=true and PostgreSQL is not installed (apt-get install postgresql)"
            );
            eprintln!("SKIPPED: PostgreSQL is not installed (apt-get install postgresql)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("sandgate-pg-")
            .tempdir()
            .expect("a temporary directory for PostgreSQL");
        let user = is_root().then_some("postgres");
        if let Some(user) = user {
            let ok = Command::new("chown")
                .arg("-R")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .status()
                .expect("chown")
                .success();
            assert!(ok, "could not hand {} to {user}", dir.path().display());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = PgServer {
            bin,
            dir,
            port,
            user,
            pid: None,
        };
        let data = server.data_dir();
        server.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-A",
                "trust",
                "-U",
                "sandgate",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        let options = format!(
            "-h 127.0.0.1 -p {port} -k {} -F -c max_connections=200",
            path_str(server.dir.path())
        );
        let log = server.dir.path().join("server.log");
        server.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        let pid = std::fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()));
        server.pid = pid;
        assert!(server.pid.is_some(), "the server wrote no postmaster.pid");
        Some(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs one of the server's programs (as its user), panicking with its output on failure.
    fn run(&self, program: &str, args: &[&str]) {
        let exe = self.bin.join(program);
        let mut cmd = match self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates a fresh database and returns its URL.
    pub fn database(&self, name: &str) -> String {
        self.sql("postgres", &format!("CREATE DATABASE \"{name}\""));
        format!("postgres://sandgate@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `sql` (as the superuser) in database `db`.
    pub fn sql(&self, db: &str, sql: &str) {
        self.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "sandgate",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-c",
                sql,
            ],
        );
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let Some(pid) = self.pid.take() else {
            return;
        };
        // SIGQUIT: PostgreSQL's immediate shutdown (nothing here needs to survive).
        let signal = |s| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s);
        let _ = signal(nix::sys::signal::Signal::SIGQUIT);
        // Wait (bounded) for it to go, so the directory can be removed.
        let proc = PathBuf::from(format!("/proc/{pid}"));
        for _ in 0..200 {
            if !proc.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        if proc.exists() {
            let _ = signal(nix::sys::signal::Signal::SIGKILL);
        }
    }
}
