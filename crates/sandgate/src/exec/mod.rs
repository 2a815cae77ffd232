//! Runs one command in a sandbox to its end, the same way for every entry point (HTTP exec,
//! seed 002's `run_code`, seed 003's `execute`, seed 004's socket): stdin fed, both output
//! streams captured within a cap, a timeout that kills the whole command, a true exit status,
//! and a kill when the caller goes away first. The entry points only render the [`Outcome`].

pub mod capture;
pub mod events;
pub mod registry;
pub mod terminals;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::backend::exec::{Chunk, ExecControl, ExecExit, ExecHandle, StartKind};
pub use capture::Capture;

/// How long the result waits for output after the command's leader ended: a process it left
/// in the background may hold the pipes open for ever.
const DRAIN: Duration = Duration::from_millis(250);
/// How long past its kill a command that will not die is waited for.
const KILL_LIMIT: Duration = Duration::from_secs(5);
/// States of the race between a run's timeout and its command's exit.
const RUNNING: u8 = 0;
const EXITED: u8 = 1;
const TIMED_OUT: u8 = 2;

/// Bounds of one run.
#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    pub timeout: Duration,
    /// Per stream.
    pub max_output: usize,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The command ran and exited with a code.
    Exited,
    /// It was ended by a signal it did not get from the gateway.
    Signaled,
    /// It ran past its timeout and was killed.
    TimedOut,
    /// It never ran: the program or working directory is missing.
    NotStarted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Exited => "exited",
            Status::Signaled => "signaled",
            Status::TimedOut => "timed_out",
            Status::NotStarted => "not_started",
        }
    }
}

/// Why a command never ran.
#[derive(Debug, Clone, Serialize)]
pub struct StartError {
    pub kind: &'static str,
    pub message: String,
}

/// A finished run.
#[derive(Debug)]
pub struct Outcome {
    pub status: Status,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: Capture,
    pub stderr: Capture,
    pub duration: Duration,
    pub start_error: Option<StartError>,
}

impl Outcome {
    /// The run of a command whose caller went away (it is being killed).
    fn gone(stdout: Capture, stderr: Capture, duration: Duration) -> Outcome {
        Outcome {
            status: Status::Signaled,
            exit_code: None,
            signal: None,
            timed_out: false,
            stdout,
            stderr,
            duration,
            start_error: None,
        }
    }

    /// The run of a command that could not start.
    pub fn not_started(kind: StartKind, message: String, max_output: usize) -> Outcome {
        Outcome {
            status: Status::NotStarted,
            exit_code: None,
            signal: None,
            timed_out: false,
            stdout: Capture::new(max_output),
            stderr: Capture::new(max_output),
            duration: Duration::ZERO,
            start_error: Some(StartError {
                kind: kind.as_str(),
                message,
            }),
        }
    }
}

/// Kills the command if the run is dropped before it finished (the client went away).
struct KillOnDrop {
    control: Option<Arc<dyn ExecControl>>,
    grace: Duration,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(control) = self.control.take() {
            let grace = self.grace;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { control.kill(grace).await });
            }
        }
    }
}

/// Runs a started command to its end: feeds it `stdin` (then EOF), captures its output, kills
/// it at the timeout. Dropping the future kills the command.
///
/// With `live`, every piece of output is also sent there as it is read (the capture then only
/// counts bytes): a slow receiver slows the command down (the pipes fill), never the
/// gateway's memory; a receiver that is gone (the client left) kills the command.
pub async fn run(
    handle: ExecHandle,
    stdin: Option<Bytes>,
    limits: RunLimits,
    live: Option<tokio::sync::mpsc::Sender<Chunk>>,
) -> Outcome {
    let started = Instant::now();
    let ExecHandle {
        stdin: pipe,
        mut output,
        mut exit,
        control,
    } = handle;
    let mut guard = KillOnDrop {
        control: Some(control.clone()),
        grace: limits.kill_grace,
    };
    if let (Some(mut pipe), Some(bytes)) = (pipe, stdin) {
        // Written beside the reads, so a command that prints before it reads all its input
        // cannot deadlock against a full pipe.
        tokio::spawn(async move {
            let _ = pipe.write_all(&bytes).await;
            let _ = pipe.shutdown().await;
        });
    }
    let cap = if live.is_some() { 0 } else { limits.max_output };
    let mut stdout = Capture::new(cap);
    let mut stderr = Capture::new(cap);
    // The timeout runs beside the reads, so a reader waiting on a slow client cannot hold it.
    // Whichever comes first, the timeout or the leader's exit, decides (`race`).
    let race = Arc::new(AtomicU8::new(RUNNING));
    let timer = {
        let (race, control) = (race.clone(), control.clone());
        tokio::spawn(async move {
            tokio::time::sleep(limits.timeout).await;
            if race
                .compare_exchange(RUNNING, TIMED_OUT, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                control.kill(limits.kill_grace).await;
            }
        })
    };
    // A command that will not die even of SIGKILL is given up on.
    let give_up = tokio::time::sleep(limits.timeout + limits.kill_grace + KILL_LIMIT);
    tokio::pin!(give_up);
    let mut ended: Option<ExecExit> = None;
    let mut eof = false;
    // After the leader's exit: how long more output is waited for.
    let mut drain = None::<tokio::time::Instant>;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    while ended.is_none() || !eof {
        tokio::select! {
            chunk = output.next(), if !eof => match chunk {
                Some(Ok(chunk)) => {
                    match &chunk {
                        Chunk::Stdout(b) => stdout.push(b),
                        Chunk::Stderr(b) => stderr.push(b),
                    }
                    if let Some(live) = &live {
                        if live.send(chunk).await.is_err() {
                            // Nobody is listening any more: the guard kills the command.
                            timer.abort();
                            return Outcome::gone(stdout, stderr, started.elapsed());
                        }
                    }
                }
                Some(Err(_)) | None => eof = true,
            },
            status = &mut exit, if ended.is_none() => {
                if race
                    .compare_exchange(RUNNING, EXITED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    timer.abort();
                }
                ended = Some(status);
                drain = Some(tokio::time::Instant::now() + DRAIN);
            }
            () = tokio::time::sleep_until(drain.unwrap_or(far)), if drain.is_some() => break,
            () = &mut give_up => break,
        }
    }
    let timed_out = race.load(Ordering::SeqCst) == TIMED_OUT;
    if !timed_out {
        timer.abort();
    }
    guard.control = None;
    if !eof {
        // Something the command left running still holds its pipes: keep reading (and
        // dropping) so it never blocks on a full pipe or dies of SIGPIPE.
        tokio::spawn(async move { while output.next().await.is_some() {} });
    }
    if let Some(ExecExit::NotStarted { kind, message }) = ended {
        return Outcome::not_started(kind, message, limits.max_output);
    }
    let (status, exit_code, signal) = match (timed_out, ended) {
        (true, Some(ExecExit::Signaled(s))) => (Status::TimedOut, None, Some(s)),
        (true, Some(ExecExit::Exited(c))) => (Status::TimedOut, Some(c), None),
        (true, _) => (Status::TimedOut, None, None),
        (false, Some(ExecExit::Exited(c))) => (Status::Exited, Some(c), None),
        (false, Some(ExecExit::Signaled(s))) => (Status::Signaled, None, Some(s)),
        (false, _) => (Status::Exited, None, None),
    };
    Outcome {
        status,
        exit_code,
        signal,
        timed_out,
        stdout,
        stderr,
        duration: started.elapsed(),
        start_error: None,
    }
}

/// How output is carried in JSON: text when both streams are valid UTF-8, else base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Encoding {
    #[serde(rename = "utf-8")]
    Utf8,
    #[serde(rename = "base64")]
    Base64,
}

/// Both streams rendered for JSON, in one encoding.
pub fn render(outcome: &Outcome) -> (String, String, Encoding) {
    let (out, err) = (outcome.stdout.render(), outcome.stderr.render());
    match (String::from_utf8(out), String::from_utf8(err)) {
        (Ok(o), Ok(e)) => (o, e, Encoding::Utf8),
        (o, e) => {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD;
            let bytes = |r: Result<String, std::string::FromUtf8Error>| match r {
                Ok(s) => s.into_bytes(),
                Err(e) => e.into_bytes(),
            };
            (b64.encode(bytes(o)), b64.encode(bytes(e)), Encoding::Base64)
        }
    }
}

/// For answers with no room for a status (seeds 003 and 004): a last stderr line saying why
/// there is no exit code.
pub fn note(o: &Outcome) -> Option<String> {
    let why = match (o.status, &o.start_error, o.signal) {
        (Status::TimedOut, _, _) => {
            "sandgate: the command ran past its time limit and was killed".to_string()
        }
        (Status::NotStarted, Some(e), _) => format!("sandgate: {}", e.message),
        (Status::Signaled, _, Some(s)) => format!("sandgate: the command was killed by signal {s}"),
        _ => return None,
    };
    let lead = if o.stderr.total() > 0 { "\n" } else { "" };
    Some(format!("{lead}{why}\n"))
}

/// Text for clients that cannot take bytes (seed 004's frames): invalid UTF-8 replaced.
pub fn lossy(capture: &Capture) -> String {
    String::from_utf8_lossy(&capture.render()).into_owned()
}
