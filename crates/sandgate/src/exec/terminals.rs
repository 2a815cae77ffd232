//! Terminal sessions: a shell on a terminal that outlives the WebSocket showing it. Its output
//! is always read, into a replay ring (the last `REPLAY_BYTES`, with absolute offsets), so a
//! program never blocks on an absent viewer and a client that reconnects gets what it missed.
//! One socket shows a session at a time: a new one takes it over. A session nobody shows for
//! `DETACH_TIMEOUT` is killed; an ended one is kept as long, for its output and exit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::Capture;
use crate::backend::exec::{ExecControl, ExecExit, PtyHandle, TtySize};

/// Output a session keeps for replay.
pub const REPLAY_BYTES: usize = 64 * 1024;
/// How long a session waits to be shown again, and an ended one is kept.
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Sessions one sandbox may have.
pub const MAX_PER_SANDBOX: usize = 4;

/// Output from an offset (pieces with their offsets), the shell's end if it came, and the
/// offset after the last byte.
pub type Replay = (Vec<(u64, Vec<u8>)>, Option<ExecExit>, u64);

struct State {
    ring: Capture,
    exit: Option<ExecExit>,
    /// Which attachment shows the session (each attach counts up).
    owner: u64,
    attached: bool,
}

/// One terminal session.
pub struct Terminal {
    pub id: String,
    pub sandbox: String,
    input: mpsc::Sender<Bytes>,
    control: Arc<dyn ExecControl>,
    kill_grace: Duration,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Terminal {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Output kept from `offset` on (pieces with their offsets: a later start is a gap), how
    /// the shell ended if it has, and the offset after the last byte.
    pub fn since(&self, offset: u64) -> Replay {
        let s = self.lock();
        (s.ring.since(offset), s.exit.clone(), s.ring.total())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Keystrokes, in order.
    pub async fn write(&self, bytes: Bytes) -> bool {
        self.input.send(bytes).await.is_ok()
    }

    pub async fn resize(&self, size: TtySize) {
        let _ = self.control.resize(size).await;
    }

    /// A signal as the terminal would send it: SIGINT, SIGQUIT and SIGTSTP as their control
    /// characters (to the foreground program, like a key press); others to the shell's group.
    pub async fn signal(&self, signal: i32) {
        let key: &'static [u8] = match signal {
            2 => b"\x03",
            3 => b"\x1c",
            20 => b"\x1a",
            _ => {
                let _ = self.control.signal(signal).await;
                return;
            }
        };
        let _ = self.input.send(Bytes::from_static(key)).await;
    }

    /// Shows the session on a new socket: the attachment's number. A socket showing it
    /// before sees [`Terminal::owner`] change and leaves.
    pub fn attach(&self) -> u64 {
        let mut s = self.lock();
        s.owner += 1;
        s.attached = true;
        let owner = s.owner;
        drop(s);
        self.changed.send_modify(|n| *n += 1);
        owner
    }

    pub fn owner(&self) -> u64 {
        self.lock().owner
    }

    /// The socket of attachment `owner` is gone; the session waits to be shown again.
    fn detach(&self, owner: u64) -> bool {
        let mut s = self.lock();
        if s.owner != owner {
            return false;
        }
        s.attached = false;
        true
    }

    fn idle_since_attach(&self, owner: u64) -> bool {
        let s = self.lock();
        s.owner == owner && !s.attached
    }

    pub async fn kill(&self) {
        self.control.kill(self.kill_grace).await;
    }
}

/// Every terminal session of this gateway.
#[derive(Default)]
pub struct Terminals {
    sessions: Mutex<HashMap<String, Arc<Terminal>>>,
}

impl Terminals {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Terminal>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `sandbox` may have one more session.
    pub fn room(&self, sandbox: &str) -> bool {
        self.sessions()
            .values()
            .filter(|t| t.sandbox == sandbox)
            .count()
            < MAX_PER_SANDBOX
    }

    pub fn get(&self, sandbox: &str, id: &str) -> Option<Arc<Terminal>> {
        self.sessions()
            .get(id)
            .filter(|t| t.sandbox == sandbox)
            .cloned()
    }

    /// Runs a started shell as session `id`; `hold` (the sandbox's in-use mark and its
    /// counter) is kept until the session is gone.
    pub fn start<H: Send + Sync + 'static>(
        self: &Arc<Self>,
        id: String,
        sandbox: String,
        handle: PtyHandle,
        kill_grace: Duration,
        hold: H,
    ) -> Arc<Terminal> {
        let PtyHandle {
            mut input,
            mut output,
            exit,
            control,
        } = handle;
        let (tx, mut rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if input.write_all(&bytes).await.is_err() || input.flush().await.is_err() {
                    break;
                }
            }
        });
        let term = Arc::new(Terminal {
            id: id.clone(),
            sandbox,
            input: tx,
            control,
            kill_grace,
            state: Mutex::new(State {
                ring: Capture::ring(REPLAY_BYTES),
                exit: None,
                owner: 0,
                attached: false,
            }),
            changed: watch::channel(0).0,
        });
        self.sessions().insert(id.clone(), term.clone());
        let (reader, sessions) = (term.clone(), self.clone());
        tokio::spawn(async move {
            let hold = hold;
            let mut buf = vec![0u8; 16 * 1024];
            // A closed terminal reads as an error (EIO) once the shell and its children are
            // gone: both end the output.
            while let Ok(n) = output.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                reader.lock().ring.push(&buf[..n]);
                reader.changed.send_modify(|v| *v += 1);
            }
            let status = exit.await;
            reader.lock().exit = Some(status);
            reader.changed.send_modify(|v| *v += 1);
            drop(hold);
            // Kept a while for a client that comes back for the end.
            tokio::time::sleep(DETACH_TIMEOUT).await;
            sessions.sessions().remove(&reader.id);
        });
        term
    }

    /// Kills every session (the gateway is stopping).
    pub async fn kill_all(&self) {
        let all: Vec<_> = self.sessions().values().cloned().collect();
        futures_util::future::join_all(all.iter().map(|t| t.kill())).await;
    }

    /// Attachment `owner` of `term` ended; unless another takes it over within
    /// [`DETACH_TIMEOUT`], the session is killed.
    pub fn detach(self: &Arc<Self>, term: &Arc<Terminal>, owner: u64) {
        if !term.detach(owner) {
            return;
        }
        let (term, sessions) = (term.clone(), self.clone());
        tokio::spawn(async move {
            tokio::time::sleep(DETACH_TIMEOUT).await;
            if term.idle_since_attach(owner) {
                term.kill().await;
                sessions.sessions().remove(&term.id);
            }
        });
    }
}
