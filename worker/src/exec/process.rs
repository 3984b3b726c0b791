//! The trainer process: started in its own process group with its
//! environment and a Unix socket to connect to, watched by helper threads
//! (the connection accepted, its output forwarded, its exit waited for),
//! and stopped (SIGTERM, the grace period, SIGKILL).

use crate::error::StartError;
use crate::shm::{unique_name, ShmFile};
use flotilla_shared::ids::Rank;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

type ExitSlot = Arc<(Mutex<Option<ExitStatus>>, Condvar)>;

/// What a process is started with.
pub(super) struct Launch<'a> {
    /// Numbers this start apart from the process's earlier ones.
    pub start: u64,
    /// Its rank (the prefix of its forwarded output).
    pub rank: Rank,
    /// The command and its arguments.
    pub argv: &'a [String],
    /// Its environment, besides `FLOTILLA_SOCKET`.
    pub env: Vec<(&'static str, String)>,
}

/// The running process.
pub(super) struct Proc {
    /// Which start it is.
    pub start: u64,
    /// Its pid, also its process group.
    pub pid: u32,
    socket: PathBuf,
    accepted: Arc<AtomicBool>,
    exit: ExitSlot,
    last_line: Arc<Mutex<String>>,
    /// Disconnects once all of its stderr is forwarded.
    stderr_done: Option<Receiver<()>>,
    /// When it started.
    pub started: Instant,
    /// Its connection, once accepted.
    pub conn: Option<UnixStream>,
    /// The shard it restored from, mapped by it.
    pub restored: Option<ShmFile>,
    /// It said hello.
    pub hello: bool,
}

impl Proc {
    /// Starts `launch`; `connected` is called with its connection (the
    /// first one to the socket), `exited` with its exit status.
    pub fn start(
        launch: Launch<'_>,
        connected: impl FnOnce(UnixStream) + Send + 'static,
        exited: impl FnOnce(ExitStatus) + Send + 'static,
    ) -> crate::Result<Self, StartError> {
        let socket = std::env::temp_dir().join(unique_name("trainer.sock"));
        let listener = UnixListener::bind(&socket)
            .map_err(|source| StartError::Listen { socket: socket.clone(), source })?;
        let accepted = Arc::new(AtomicBool::new(false));
        {
            let (accepted, socket) = (accepted.clone(), socket.clone());
            // one connection per process; the first is the trainer's
            std::thread::spawn(move || {
                if let Ok((stream, _)) = listener.accept() {
                    if !accepted.swap(true, Ordering::SeqCst) {
                        connected(stream);
                    }
                }
                let _ = std::fs::remove_file(socket);
            });
        }
        let argv = launch.argv;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(launch.env)
            .env("FLOTILLA_SOCKET", &socket)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // its own group: a restore stops everything it started
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between
        // fork and exec. The process dies with the thread that started it
        // (the runner's), so a SIGKILLed worker leaves no trainer behind.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                wake(&socket, &accepted);
                return Err(StartError::Spawn { command: argv.join(" "), source });
            }
        };
        let pid = child.id();
        let last_line = Arc::new(Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            forward_output(out, launch.rank, None);
        }
        let stderr_done =
            child.stderr.take().map(|err| forward_output(err, launch.rank, Some(last_line.clone())));
        let exit: ExitSlot = Arc::new((Mutex::new(None), Condvar::new()));
        {
            let exit = exit.clone();
            std::thread::spawn(move || {
                let Ok(status) = child.wait() else { return };
                *exit.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                exit.1.notify_all();
                exited(status);
            });
        }
        Ok(Self {
            start: launch.start,
            pid,
            socket,
            accepted,
            exit,
            last_line,
            stderr_done,
            started: Instant::now(),
            conn: None,
            restored: None,
            hello: false,
        })
    }

    /// Stops the process group: SIGTERM, up to `grace`, then [`Proc::reap`].
    pub fn stop(&self, grace: Duration) {
        if wait_exit(&self.exit, Duration::ZERO).is_none() {
            signal_group(self.pid, libc::SIGTERM);
            if wait_exit(&self.exit, grace).is_none() {
                tracing::warn!(pid = self.pid, "trainer did not stop within {grace:?} of SIGTERM: SIGKILL");
            }
        }
        self.reap();
    }

    /// Kills what is left of the process group and ends the acceptor.
    pub fn reap(&self) {
        signal_group(self.pid, libc::SIGKILL);
        if wait_exit(&self.exit, Duration::from_secs(10)).is_none() {
            tracing::error!(
                pid = self.pid,
                "trainer survives SIGKILL (uninterruptible I/O?); going on without it"
            );
        }
        wake(&self.socket, &self.accepted);
    }

    /// What a reaped process said last on stderr (its group is gone, so
    /// its stderr ends).
    pub fn last_words(mut self) -> String {
        if let Some(done) = self.stderr_done.take() {
            let _ = done.recv_timeout(Duration::from_secs(1));
        }
        let last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
        last.clone()
    }
}

/// How a process that should not have ended did, with its last words.
pub(super) fn exit_reason(pid: u32, status: ExitStatus, last: &str) -> String {
    let how = match (status.code(), status.signal()) {
        (Some(0), _) => "exited with status 0 without calling finish()".to_string(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".to_string(),
    };
    let last = if last.is_empty() { String::new() } else { format!("; its last output: {last}") };
    format!("trainer process {pid} {how}{last}")
}

/// Forwards the process's output to the log, line by line, prefixed by
/// rank; keeps the last line of stderr for the failure reason.
/// The returned receiver disconnects once the stream has ended and every
/// line is forwarded.
fn forward_output(
    stream: impl Read + Send + 'static,
    rank: Rank,
    last: Option<Arc<Mutex<String>>>,
) -> Receiver<()> {
    let (done, ended) = channel::<()>();
    std::thread::spawn(move || {
        let _done = done;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            tracing::info!(target: "flotilla::trainer", "[rank {rank}] {line}");
            if let Some(last) = &last {
                if !line.trim().is_empty() {
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = line;
                }
            }
        }
    });
    ended
}

#[allow(unsafe_code)]
fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: killpg has no memory-safety preconditions; a group already
    // gone answers ESRCH, which is fine
    unsafe {
        libc::killpg(pid as libc::pid_t, signal);
    }
}

/// Waits up to `timeout` for the process's exit status.
fn wait_exit(exit: &ExitSlot, timeout: Duration) -> Option<ExitStatus> {
    let (lock, cvar) = &**exit;
    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let (guard, _) =
        cvar.wait_timeout_while(guard, timeout, |s| s.is_none()).unwrap_or_else(|e| e.into_inner());
    *guard
}

/// Ends an acceptor still waiting for a process that never connected.
fn wake(socket: &Path, accepted: &AtomicBool) {
    if !accepted.swap(true, Ordering::SeqCst) {
        let _ = UnixStream::connect(socket);
    }
}
