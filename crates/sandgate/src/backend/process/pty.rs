//! Terminals in a process sandbox: a pseudo-terminal pair opened by the gateway
//! (`pty-process`), the shell started on its secondary side as a session leader with it as its
//! controlling terminal, in the sandbox's namespaces when it is isolated (the same spawner
//! thread as commands). The gateway keeps the primary side: the shell's input and output, and
//! its size (`TIOCSWINSZ`, which the kernel announces with SIGWINCH).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;

use super::exec::{check_cwd, exit_of, spawn_inside, spawn_message, ProcessExec};
use super::{is_same_process, parse_ref, ProcessBackend};
use crate::backend::exec::{
    ExecControl, ExecError, ExecSpec, PtyHandle, StartKind, TtySize, EXEC_TAG_VAR,
};
use crate::model::Sandbox;

fn pty_error(e: pty_process::Error) -> ExecError {
    ExecError::Backend(format!("terminal: {e}"))
}

impl ProcessBackend {
    pub(super) async fn pty_in(
        &self,
        sb: &Sandbox,
        spec: ExecSpec,
        size: TtySize,
    ) -> Result<PtyHandle, ExecError> {
        let leader = parse_ref(sb)
            .filter(|r| is_same_process(*r))
            .ok_or(ExecError::NotRunning)?;
        let Some(program) = spec.argv.first().cloned() else {
            return Err(ExecError::not_started(StartKind::Other, "empty argv"));
        };
        let cwd = self.command_dir(sb, spec.cwd.as_deref());
        let mut env = self.base_env(sb);
        env.extend(spec.env.clone());
        env.insert(EXEC_TAG_VAR.into(), spec.tag.clone());
        env.entry("TERM".into())
            .or_insert_with(|| "xterm-256color".into());
        let (pty, pts) = pty_process::open().map_err(pty_error)?;
        pty.resize(pty_process::Size::new(size.rows, size.cols))
            .map_err(pty_error)?;
        let primary = pty
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| ExecError::Backend(format!("terminal: {e}")))?;
        let mut cmd = pty_process::Command::new(&program)
            .args(&spec.argv[1..])
            .env_clear()
            .envs(env)
            .current_dir(&cwd)
            .kill_on_drop(false);
        if let Some(uid) = leader.uid {
            // The shell owns its terminal, as after a login.
            std::os::unix::fs::fchown(&pts, Some(uid), Some(uid))
                .map_err(|e| ExecError::Backend(format!("terminal: {e}")))?;
            cmd = cmd.uid(uid).gid(uid);
        }
        let spawn = move || {
            let _gate = super::reaper::spawning();
            let child = cmd.spawn(pts).map_err(|e| match e {
                pty_process::Error::Io(e) => {
                    ExecError::not_started(StartKind::of(&e), spawn_message(&program, &e))
                }
                other => pty_error(other),
            })?;
            if let Some(pid) = child.id() {
                super::reaper::own(pid as i32);
            }
            Ok(child)
        };
        let mut child = if self.isolated {
            spawn_inside(leader, cwd, spawn).await?
        } else {
            check_cwd(&cwd)?;
            spawn()?
        };
        // The shell leads a session of its own, so its process group is its pid.
        let pgid = child
            .id()
            .map(|p| p as i32)
            .ok_or_else(|| ExecError::Backend("the shell vanished at once".into()))?;
        let exit = async move {
            let status = child.wait().await;
            super::reaper::disown(pgid);
            exit_of(status)
        }
        .boxed();
        let (read, write) = pty.into_split();
        Ok(PtyHandle {
            input: Box::new(write),
            output: Box::new(read),
            exit,
            control: Arc::new(Terminal {
                exec: ProcessExec {
                    pgid,
                    tag: format!("{EXEC_TAG_VAR}={}", spec.tag).into_bytes(),
                },
                primary,
            }),
        })
    }
}

struct Terminal {
    exec: ProcessExec,
    /// The primary side, for resizing.
    primary: OwnedFd,
}

#[async_trait]
impl ExecControl for Terminal {
    async fn resize(&self, size: TtySize) -> Result<(), ExecError> {
        let winsize = rustix::termios::Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&self.primary, winsize)
            .map_err(|e| ExecError::Backend(format!("resizing the terminal: {e}")))
    }

    async fn signal(&self, signal: i32) -> Result<(), ExecError> {
        self.exec.signal(signal).await
    }

    async fn kill(&self, grace: Duration) {
        self.exec.kill(grace).await
    }
}
