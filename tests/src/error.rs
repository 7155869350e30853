use std::io;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;

use crate::Proto;

/// What went wrong, with the command, namespace or address involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the network sandbox needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): run the kernel tests \
         as root"
    )]
    NotRoot,
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid { what: &'static str, value: String, reason: &'static str },
    #[error("could not run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command { cmd: String, status: ExitStatus, stderr: String },
    #[error("could not enter network namespace {ns}: {source}")]
    Enter {
        ns: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{proto} request from network namespace {ns} to {target} failed: {source}")]
    Request {
        ns: String,
        proto: Proto,
        target: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("unexpected reply from {target}: {reply:?}")]
    BadReply { target: SocketAddr, reply: String },
    #[error("network namespace {ns} outlived its sandbox")]
    SandboxGone { ns: String },
    #[error("`{cmd}` exited ({status}) before printing {needle:?}; its output:\n{output}")]
    Exited { cmd: String, status: ExitStatus, needle: String, output: String },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The kind of the underlying I/O error of a failed request (refused, timed out, host
    /// unreachable…), to tell a REJECT from a DROP.
    pub fn request_error_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Self::Request { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// A request that got no answer in time (e.g. dropped packets).
    pub fn is_timeout(&self) -> bool {
        self.request_error_kind() == Some(io::ErrorKind::TimedOut)
    }

    /// A request that was actively refused (TCP reset, ICMP port unreachable: e.g. a REJECT).
    pub fn is_refused(&self) -> bool {
        self.request_error_kind() == Some(io::ErrorKind::ConnectionRefused)
    }
}
