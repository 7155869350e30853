//! Background processes started in a namespace, owned by the sandbox.

use std::io::Read;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{Error, Result, lock};

/// A process started by [`Netns::spawn`](crate::Netns::spawn). Clones share it. The sandbox
/// kills it (through this `Child` handle, never by name) when dropped; [`kill`](Self::kill) and
/// [`signal`](Self::signal) stop it earlier.
#[derive(Clone)]
pub struct Process {
    inner: Arc<Inner>,
}

struct Inner {
    cmd: String,
    pid: u32,
    child: Mutex<Child>,
    /// stdout and stderr, interleaved in arrival order.
    output: Arc<Mutex<Vec<u8>>>,
}

impl Process {
    pub(crate) fn new(cmd: String, mut child: Child) -> Self {
        let output = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let output = Arc::clone(&output);
            // Ends at EOF, when the process (and anything it passed the pipe to) has exited.
            std::thread::spawn(move || collect(stream, &output));
        }
        Self { inner: Arc::new(Inner { cmd, pid: child.id(), child: Mutex::new(child), output }) }
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.inner.cmd
    }

    /// Everything it wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&lock(&self.inner.output)).into_owned()
    }

    /// Waits until its output contains `needle`; fails on timeout or when it exits first.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                // The pipes may still hold the line we are waiting for.
                std::thread::sleep(Duration::from_millis(50));
                if self.output().contains(needle) {
                    return Ok(());
                }
                return Err(Error::Exited {
                    cmd: self.inner.cmd.clone(),
                    status,
                    needle: needle.to_owned(),
                    output: self.output(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{needle:?} from `{}`", self.inner.cmd),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        lock(&self.inner.child).try_wait().map_err(|source| self.io_error("checking", source))
    }

    /// Waits for it to exit, up to `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout { what: format!("`{}` to exit", self.inner.cmd), timeout });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (e.g. SIGTERM for a graceful shutdown); a no-op once it has exited.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let mut child = lock(&self.inner.child);
        // While we hold the (unreaped) child, its pid cannot be reused by another process.
        if child.try_wait().map_err(|source| self.io_error("checking", source))?.is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.inner.pid)
            .map_err(|_| self.io_error("signalling", std::io::ErrorKind::InvalidInput.into()))?;
        kill(Pid::from_raw(pid), signal).map_err(|e| self.io_error("signalling", e.into()))
    }

    /// Kills it (SIGKILL) and reaps it; a no-op once it has exited.
    pub fn kill(&self) -> Result<()> {
        let mut child = lock(&self.inner.child);
        if child.try_wait().map_err(|source| self.io_error("checking", source))?.is_some() {
            return Ok(());
        }
        child.kill().map_err(|source| self.io_error("killing", source))?;
        child.wait().map(drop).map_err(|source| self.io_error("reaping", source))
    }

    fn io_error(&self, what: &str, source: std::io::Error) -> Error {
        Error::Io { what: format!("{what} `{}` (pid {})", self.inner.cmd, self.inner.pid), source }
    }
}

fn collect(mut stream: Box<dyn Read + Send>, output: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => lock(output).extend_from_slice(&buf[..n]),
        }
    }
}
