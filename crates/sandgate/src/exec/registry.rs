//! Background commands (`"background": true`): started, then kept here while they run and for
//! `RETENTION` after they end, so their status, output and exit can be read, followed, fed
//! stdin, signalled or killed through later requests. Output is kept within the run's cap
//! (head and tail, with offsets, so a follower resuming after a gap is told how much it
//! missed). Everything is in memory: exec ids are local to the gateway that ran them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use super::{Capture, Outcome, RunLimits, StartError, Status};
use crate::backend::exec::{Chunk, ExecControl, ExecHandle};

/// Finished background commands are kept at least this long.
pub const RETENTION: Duration = Duration::from_secs(15 * 60);
/// Background commands one sandbox may have running, and kept in all.
pub const MAX_RUNNING: usize = 32;
pub const MAX_KEPT: usize = 64;

/// Kept output of one stream (0: stdout, 1: stderr) from an offset: `(stream, offset, bytes)`.
pub type Piece = (usize, u64, Vec<u8>);

/// How a background command ended.
#[derive(Debug, Clone)]
pub struct Finished {
    pub status: Status,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration: Duration,
    pub start_error: Option<StartError>,
    /// Ended by `DELETE`.
    pub killed: bool,
}

/// A background command's state at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub exec_id: String,
    pub sandbox_id: String,
    pub command: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub running_for: Duration,
    pub finished: Option<Finished>,
    pub stdout: Capture,
    pub stderr: Capture,
}

struct State {
    stdout: Capture,
    stderr: Capture,
    finished: Option<Finished>,
    ended_at: Option<Instant>,
    killed: bool,
}

/// What the stdin writer is asked to do.
enum Stdin {
    Data(Bytes),
    Eof,
}

/// One background command.
pub struct Job {
    pub id: String,
    pub sandbox: String,
    pub command: String,
    started: Instant,
    started_at: chrono::DateTime<chrono::Utc>,
    control: Arc<dyn ExecControl>,
    kill_grace: Duration,
    state: Mutex<State>,
    /// Bumped on every change (output, end), for followers.
    changed: watch::Sender<u64>,
    stdin: Option<mpsc::Sender<Stdin>>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the command was not started with stdin_open: true, or its stdin is closed")]
    NoStdin,
    #[error("the command has ended")]
    Ended,
    #[error("too many background commands in this sandbox: at most {0}")]
    TooMany(usize),
}

impl Job {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot {
            exec_id: self.id.clone(),
            sandbox_id: self.sandbox.clone(),
            command: self.command.clone(),
            started_at: self.started_at,
            running_for: self.started.elapsed(),
            finished: s.finished.clone(),
            stdout: s.stdout.clone(),
            stderr: s.stderr.clone(),
        }
    }

    /// Output from the offsets on, and how it ended if it has: what a follower sends next.
    pub fn since(&self, offsets: [u64; 2]) -> (Vec<Piece>, Option<Finished>) {
        let s = self.lock();
        let mut pieces = Vec::new();
        for (i, capture) in [&s.stdout, &s.stderr].into_iter().enumerate() {
            for (at, bytes) in capture.since(offsets[i]) {
                pieces.push((i, at, bytes));
            }
        }
        (pieces, s.finished.clone())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn running(&self) -> bool {
        self.lock().finished.is_none()
    }

    /// Writes `data` to the command's stdin (`None`: closes it).
    pub async fn write_stdin(&self, data: Option<Bytes>) -> Result<(), JobError> {
        let tx = self.stdin.as_ref().ok_or(JobError::NoStdin)?;
        if !self.running() {
            return Err(JobError::Ended);
        }
        let msg = data.map_or(Stdin::Eof, Stdin::Data);
        tx.send(msg).await.map_err(|_| JobError::NoStdin)
    }

    pub async fn signal(&self, signal: i32) -> Result<(), JobError> {
        if !self.running() {
            return Err(JobError::Ended);
        }
        let _ = self.control.signal(signal).await;
        Ok(())
    }

    /// Kills the command (SIGTERM, the grace, SIGKILL) and waits until its end is recorded.
    pub async fn kill(&self) {
        let mut changed = self.subscribe();
        self.lock().killed = true;
        self.control.kill(self.kill_grace).await;
        while self.running() {
            if changed.changed().await.is_err() {
                break;
            }
        }
    }

    fn push(&self, chunk: &Chunk) {
        let mut s = self.lock();
        match chunk {
            Chunk::Stdout(b) => s.stdout.push(b),
            Chunk::Stderr(b) => s.stderr.push(b),
        }
        drop(s);
        self.changed.send_modify(|n| *n += 1);
    }

    fn finish(&self, o: Outcome) {
        let mut s = self.lock();
        s.finished = Some(Finished {
            status: o.status,
            exit_code: o.exit_code,
            signal: o.signal,
            timed_out: o.timed_out,
            duration: o.duration,
            start_error: o.start_error,
            killed: s.killed,
        });
        s.ended_at = Some(Instant::now());
        drop(s);
        self.changed.send_modify(|n| *n += 1);
    }
}

/// Every background command of this gateway.
#[derive(Default)]
pub struct Registry {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

impl Registry {
    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops finished commands older than [`RETENTION`].
    fn expire(jobs: &mut HashMap<String, Arc<Job>>) {
        jobs.retain(|_, j| j.lock().ended_at.is_none_or(|t| t.elapsed() < RETENTION));
    }

    /// Makes room for one more command in `sandbox`, or says why there is none.
    pub fn admit(&self, sandbox: &str) -> Result<(), JobError> {
        let mut jobs = self.jobs();
        Self::expire(&mut jobs);
        let mine: Vec<_> = jobs.values().filter(|j| j.sandbox == sandbox).collect();
        if mine.iter().filter(|j| j.running()).count() >= MAX_RUNNING {
            return Err(JobError::TooMany(MAX_RUNNING));
        }
        if mine.len() >= MAX_KEPT {
            // The oldest finished one makes room.
            let oldest = mine
                .iter()
                .filter(|j| !j.running())
                .min_by_key(|j| j.started)
                .map(|j| j.id.clone());
            match oldest {
                Some(id) => {
                    jobs.remove(&id);
                }
                None => return Err(JobError::TooMany(MAX_KEPT)),
            }
        }
        Ok(())
    }

    /// Runs a started command in the background; `hold` (the sandbox's in-use mark) is kept
    /// until it ends. `stdin_open` keeps its stdin for later writes; else `stdin` (or
    /// nothing) is written and closed.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn<H: Send + 'static>(
        &self,
        id: String,
        sandbox: String,
        command: String,
        mut handle: ExecHandle,
        stdin: Option<Bytes>,
        stdin_open: bool,
        limits: RunLimits,
        hold: H,
    ) -> Arc<Job> {
        let pipe = if stdin_open {
            handle.stdin.take()
        } else {
            None
        };
        let stdin_tx = pipe.map(|mut pipe| {
            let (tx, mut rx) = mpsc::channel::<Stdin>(16);
            tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    let done = match msg {
                        Stdin::Data(b) => pipe.write_all(&b).await.is_err(),
                        Stdin::Eof => true,
                    };
                    if done {
                        break;
                    }
                }
                let _ = pipe.shutdown().await;
            });
            tx
        });
        let job = Arc::new(Job {
            id: id.clone(),
            sandbox,
            command,
            started: Instant::now(),
            started_at: chrono::Utc::now(),
            control: handle.control.clone(),
            kill_grace: limits.kill_grace,
            state: Mutex::new(State {
                stdout: Capture::new(limits.max_output),
                stderr: Capture::new(limits.max_output),
                finished: None,
                ended_at: None,
                killed: false,
            }),
            changed: watch::channel(0).0,
            stdin: stdin_tx,
        });
        self.jobs().insert(id, job.clone());
        let runner = job.clone();
        tokio::spawn(async move {
            let _hold = hold;
            let (tx, mut rx) = mpsc::channel::<Chunk>(8);
            let run = super::run(handle, stdin, limits, Some(tx));
            tokio::pin!(run);
            let outcome = loop {
                tokio::select! {
                    Some(chunk) = rx.recv() => runner.push(&chunk),
                    outcome = &mut run => break outcome,
                }
            };
            while let Ok(chunk) = rx.try_recv() {
                runner.push(&chunk);
            }
            runner.finish(outcome);
        });
        job
    }

    /// The command `id` of `sandbox` (another sandbox's is not found).
    pub fn get(&self, sandbox: &str, id: &str) -> Option<Arc<Job>> {
        let mut jobs = self.jobs();
        Self::expire(&mut jobs);
        jobs.get(id).filter(|j| j.sandbox == sandbox).cloned()
    }

    /// Every kept command of `sandbox`, oldest first.
    pub fn list(&self, sandbox: &str) -> Vec<Arc<Job>> {
        let mut jobs = self.jobs();
        Self::expire(&mut jobs);
        let mut mine: Vec<_> = jobs
            .values()
            .filter(|j| j.sandbox == sandbox)
            .cloned()
            .collect();
        mine.sort_by_key(|j| j.started);
        mine
    }

    /// Kills every running command (the gateway is stopping).
    pub async fn kill_all(&self) {
        let running: Vec<_> = self
            .jobs()
            .values()
            .filter(|j| j.running())
            .cloned()
            .collect();
        futures_util::future::join_all(running.iter().map(|j| j.kill())).await;
    }

    /// Forgets a finished command; whether it was there.
    pub fn forget(&self, sandbox: &str, id: &str) -> bool {
        let mut jobs = self.jobs();
        match jobs.get(id) {
            Some(j) if j.sandbox == sandbox && !j.running() => jobs.remove(id).is_some(),
            _ => false,
        }
    }
}
