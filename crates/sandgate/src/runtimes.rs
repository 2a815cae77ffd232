//! Runtimes: the named environments a create may ask for, each with the program it needs and
//! its default dev-server command. Built-ins can be overridden or extended in the config file.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::RuntimeConfig;

/// A runtime as the API sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub name: String,
    /// Program that must be on `PATH`.
    pub program: String,
    /// Default dev-server command (`sh -c`, `$PORT` set); `None` for runtimes without one.
    pub dev_server: Option<String>,
    /// Image for the Docker backend.
    pub image: String,
    /// Kubernetes backend: the `SandboxWarmPool` a create claims its Sandbox from.
    pub warm_pool: Option<String>,
    /// Kubernetes backend: the size (a Kubernetes quantity, `1Gi`) of a persistent volume
    /// claimed for each Sandbox's `/sandbox`, which then outlives a stop; `None`: an
    /// `emptyDir`, emptied by a stop.
    pub volume_size: Option<String>,
}

const NODE_SERVER: &str = r#"exec node -e 'const h=require("http"),f=require("fs"),p=require("path");h.createServer((q,s)=>{const u=decodeURIComponent(q.url.split("?")[0]);let t=p.join(process.cwd(),p.normalize(u));try{if(f.statSync(t).isDirectory())t=p.join(t,"index.html");f.createReadStream(t).on("error",()=>{s.writeHead(404);s.end("not found")}).pipe(s)}catch(e){s.writeHead(404);s.end("not found")}}).listen(process.env.PORT,process.env.HOST||"127.0.0.1")'"#;
const BUN_SERVER: &str = r#"exec bun -e 'Bun.serve({hostname:process.env.HOST||"127.0.0.1",port:Number(process.env.PORT),fetch(r){const u=new URL(r.url);const f=Bun.file("."+decodeURIComponent(u.pathname));return f.exists().then(e=>e?new Response(f):new Response("not found",{status:404}))}})'"#;

/// The built-in runtimes. Their servers bind `$HOST` (the gateway sets it: `127.0.0.1`, or
/// `0.0.0.0` in a container whose port is published) and listen on `$PORT`.
fn builtins() -> Vec<Runtime> {
    let rt = |name: &str, program: &str, dev: Option<&str>| Runtime {
        name: name.into(),
        program: program.into(),
        dev_server: dev.map(str::to_string),
        image: match name {
            "python" => "python:3-slim",
            "node" => "node:lts-slim",
            "bun" => "oven/bun:slim",
            _ => "busybox:latest",
        }
        .into(),
        warm_pool: None,
        volume_size: None,
    };
    vec![
        rt(
            "python",
            "python3",
            Some(r#"exec python3 -m http.server "$PORT" --bind "${HOST:-127.0.0.1}""#),
        ),
        rt("node", "node", Some(NODE_SERVER)),
        rt("bun", "bun", Some(BUN_SERVER)),
        rt(
            "busybox",
            "busybox",
            Some(r#"exec busybox httpd -f -p "${HOST:-127.0.0.1}:$PORT""#),
        ),
        // A plain shell: no dev server of its own; pass `command` to run one.
        rt("shell", "sh", None),
    ]
}

/// The runtime table in force.
#[derive(Debug, Clone)]
pub struct Runtimes {
    by_name: BTreeMap<String, Runtime>,
}

impl Runtimes {
    /// Built-ins, overridden or extended by the config file's `[runtimes.NAME]` tables.
    pub fn new(configured: &BTreeMap<String, RuntimeConfig>) -> Runtimes {
        let mut by_name: BTreeMap<_, _> = builtins()
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        for (name, rc) in configured {
            let base = by_name.remove(name).unwrap_or_else(|| Runtime {
                name: name.clone(),
                program: "sh".into(),
                dev_server: None,
                image: "busybox:latest".into(),
                warm_pool: None,
                volume_size: None,
            });
            by_name.insert(
                name.clone(),
                Runtime {
                    name: name.clone(),
                    program: rc.program.clone().unwrap_or(base.program),
                    dev_server: rc.command.clone().or(base.dev_server),
                    image: rc.image.clone().unwrap_or(base.image),
                    warm_pool: rc.warm_pool.clone().or(base.warm_pool),
                    volume_size: rc.volume_size.clone().or(base.volume_size),
                },
            );
        }
        Runtimes { by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Runtime> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// Whether `program` can be run: an absolute path that exists, or a name found on `PATH`.
pub fn program_installed(program: &str) -> bool {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return executable(Path::new(program));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_overrides_and_extends_builtins() {
        let mut conf = BTreeMap::new();
        conf.insert(
            "python".to_string(),
            RuntimeConfig {
                command: Some("exec python3 app.py".into()),
                ..Default::default()
            },
        );
        conf.insert(
            "ruby".to_string(),
            RuntimeConfig {
                program: Some("ruby".into()),
                command: Some("exec ruby -run -e httpd".into()),
                image: Some("ruby:3".into()),
                warm: None,
                warm_pool: Some("ruby-pool".into()),
                volume_size: None,
            },
        );
        let r = Runtimes::new(&conf);
        assert_eq!(
            r.get("python").unwrap().dev_server.as_deref(),
            Some("exec python3 app.py")
        );
        assert_eq!(r.get("python").unwrap().program, "python3");
        assert_eq!(r.get("ruby").unwrap().image, "ruby:3");
        assert_eq!(
            r.get("ruby").unwrap().warm_pool.as_deref(),
            Some("ruby-pool")
        );
        assert_eq!(r.get("python").unwrap().warm_pool, None);
        assert!(r.get("shell").unwrap().dev_server.is_none());
        assert!(r.get("cobol").is_none());
    }

    #[test]
    fn finds_programs_on_path() {
        assert!(program_installed("sh"));
        assert!(program_installed("/bin/sh"));
        assert!(!program_installed("definitely-not-a-program-xyz"));
        assert!(!program_installed("/nonexistent/sh"));
    }
}
