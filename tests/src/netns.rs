//! Handles to the sandbox's namespaces: configuration through `ip -n`, commands through
//! `ip netns exec`, and closures on a thread that entered the namespace.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock, Weak};

use nix::sched::{CloneFlags, setns};

use crate::process::Process;
use crate::{Error, NETNS_DIR, Result, Shared, check_ifname};

/// A network namespace of a [`Sandbox`](crate::Sandbox); cheap to clone. Everything it runs
/// happens inside that namespace. It holds its sandbox weakly: once the sandbox is dropped
/// (and the namespace deleted) every operation fails.
#[derive(Clone)]
pub struct Netns {
    name: Arc<str>,
    shared: Weak<Shared>,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Netns").field(&self.name).finish()
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Netns {
    pub(crate) fn new(name: String, shared: Weak<Shared>) -> Self {
        Self { name: name.into(), shared }
    }

    /// The full namespace name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's handle, `/run/netns/<name>` (for `setns`, or `ip netns exec`).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&*self.name)
    }

    pub(crate) fn shared(&self) -> Result<Arc<Shared>> {
        self.shared.upgrade().ok_or_else(|| Error::SandboxGone { ns: self.name.to_string() })
    }

    /// Runs `ip -n <ns> <args>` and returns its stdout.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        self.shared()?;
        let mut all: Vec<OsString> = vec!["-n".into(), OsString::from(&*self.name)];
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        run_ip(&all)
    }

    /// Adds an address (`10.0.0.1/24`, `fd00::1/64`) to `dev`. IPv6 addresses are added with
    /// `nodad`, so they are usable at once.
    pub fn addr(&self, dev: &str, cidr: &str) -> Result<()> {
        check_ifname(dev)?;
        let mut args = vec!["addr", "add", cidr, "dev", dev];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    /// A route to `dst` (`10.1.0.2/32`, `fd00:1::/64`, `default`, `::/0`) out of `dev`,
    /// without a gateway. `default` means the IPv4 default; write `::/0` for IPv6.
    pub fn route_dev(&self, dst: &str, dev: &str) -> Result<()> {
        check_ifname(dev)?;
        let family = if dst.contains(':') { "-6" } else { "-4" };
        self.ip(&[family, "route", "add", dst, "dev", dev]).map(drop)
    }

    /// A route to `dst` through `gateway`; the family follows the gateway, so `default` works
    /// for both.
    pub fn route_via(&self, dst: &str, gateway: IpAddr) -> Result<()> {
        let family = if gateway.is_ipv6() { "-6" } else { "-4" };
        let gateway = gateway.to_string();
        self.ip(&[family, "route", "add", dst, "via", &gateway]).map(drop)
    }

    /// Writes sysctls, given as paths under `/proc/sys` (`net/ipv4/ip_forward`) with values.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<()> {
        self.run(|| {
            for (key, value) in settings {
                // /proc/sys/net follows the writing thread's namespace.
                std::fs::write(format!("/proc/sys/{key}"), value).map_err(|source| Error::Io {
                    what: format!("setting sysctl {key}={value} in {}", self.name),
                    source,
                })?;
            }
            Ok(())
        })?
    }

    /// Runs `args` (program first) inside the namespace and returns its stdout; fails with the
    /// command line and its stderr when it exits unsuccessfully.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        self.command(args)?.output()
    }

    /// Like [`exec`](Self::exec), with `input` on the command's stdin (e.g. `nft -f -`).
    pub fn exec_with_input<S: AsRef<OsStr>>(&self, args: &[S], input: &str) -> Result<String> {
        self.command(args)?.input(input).output()
    }

    /// Starts `args` (program first) in the background; the sandbox kills it on drop. Its
    /// stdout and stderr are collected in [`Process::output`].
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Process> {
        self.command(args)?.spawn()
    }

    /// A command to run inside the namespace, for when arguments, environment or input need
    /// building up: `ns.command(&["ferry", "run"])?.arg("--backend").arg("ebpf").spawn()`.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<NsCommand> {
        let Some((program, rest)) = args.split_first() else {
            return Err(Error::Invalid {
                what: "command",
                value: String::new(),
                reason: "empty command line",
            });
        };
        let mut command = NsCommand {
            ns: self.clone(),
            command: Command::new(ip_path()),
            display: vec![program.as_ref().to_string_lossy().into_owned()],
            input: None,
        };
        command.command.args([OsStr::new("netns"), OsStr::new("exec"), OsStr::new(&*self.name)]).arg(program);
        Ok(command.args(rest))
    }

    /// Runs `f` on a new thread that entered this namespace, and returns its result; the
    /// calling thread never changes namespace. A panic in `f` is resumed in the caller.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let file = self.open()?;
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(format!("netns {}", self.name))
                .spawn_scoped(scope, move || -> Result<T> {
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| Error::Enter { ns: self.name.to_string(), source: e.into() })?;
                    Ok(f())
                })
                .map_err(|source| Error::Io {
                    what: format!("starting a thread for {}", self.name),
                    source,
                })?;
            match thread.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Moves the *current thread* into this namespace until the guard is dropped. Prefer
    /// [`run`](Self::run); the guard is for code that must stay on one thread (e.g.
    /// `BPF_PROG_TEST_RUN` with thread-local state). Not `Send`: it must be dropped on the
    /// thread that entered. Commands spawned meanwhile from this thread start in the namespace.
    pub fn enter(&self) -> Result<NetnsGuard> {
        let original = File::open("/proc/thread-self/ns/net")
            .map_err(|source| Error::Enter { ns: self.name.to_string(), source })?;
        let target = self.open()?;
        setns(&target, CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::Enter { ns: self.name.to_string(), source: e.into() })?;
        Ok(NetnsGuard { original, ns: self.name.to_string(), _not_send: PhantomData })
    }

    pub(crate) fn open(&self) -> Result<File> {
        self.shared()?;
        File::open(self.path()).map_err(|source| Error::Enter { ns: self.name.to_string(), source })
    }
}

/// Restores the thread's original network namespace on drop; see [`Netns::enter`].
pub struct NetnsGuard {
    original: File,
    ns: String,
    /// Namespaces are per thread: the guard must be dropped where it was created.
    _not_send: PhantomData<*const ()>,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original, CloneFlags::CLONE_NEWNET) {
            // Continuing would run the rest of the process's work (including cleanup commands
            // meant for the root namespace) in the wrong namespace.
            eprintln!("ferry-sandbox: could not leave network namespace {}: {e}; aborting", self.ns);
            std::process::abort();
        }
    }
}

/// A command that runs inside a namespace (`ip netns exec <ns> …`); see [`Netns::command`].
pub struct NsCommand {
    ns: Netns,
    command: Command,
    display: Vec<String>,
    input: Option<Vec<u8>>,
}

impl NsCommand {
    pub fn arg<S: AsRef<OsStr>>(mut self, arg: S) -> Self {
        self.display.push(arg.as_ref().to_string_lossy().into_owned());
        self.command.arg(arg);
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: &[S]) -> Self {
        for arg in args {
            self = self.arg(arg);
        }
        self
    }

    pub fn env<K: AsRef<OsStr>, V: AsRef<OsStr>>(mut self, key: K, value: V) -> Self {
        self.command.env(key, value);
        self
    }

    /// Data written to the command's stdin (by [`output`](Self::output) only).
    pub fn input(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.input = Some(input.into());
        self
    }

    fn describe(&self) -> String {
        format!("{} (in {})", self.display.join(" "), self.ns.name())
    }

    /// Runs to completion and returns stdout; fails with the command line, exit status and
    /// stderr when the command fails.
    pub fn output(mut self) -> Result<String> {
        self.ns.shared()?;
        let cmd = self.describe();
        let input = self.input.take();
        self.command
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        output_of(&mut self.command, cmd, input)
    }

    /// Starts the command in the background, owned by the sandbox (killed on its drop).
    pub fn spawn(mut self) -> Result<Process> {
        let shared = self.ns.shared()?;
        let cmd = self.describe();
        self.command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = self.command.spawn().map_err(|source| Error::Spawn { cmd: cmd.clone(), source })?;
        let process = Process::new(cmd, child);
        shared.add_process(process.clone());
        Ok(process)
    }
}

/// `ip` from iproute2; `/usr/sbin` is not on every PATH.
fn ip_path() -> &'static OsStr {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("ip"))
    })
    .as_os_str()
}

/// Runs `ip <args>`. Only for `netns add|del` and for callers that pass `-n <ns>` first.
pub(crate) fn run_ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String> {
    let mut command = Command::new(ip_path());
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let cmd = std::iter::once("ip".to_owned())
        .chain(args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    output_of(&mut command, cmd, None)
}

fn output_of(command: &mut Command, cmd: String, input: Option<Vec<u8>>) -> Result<String> {
    let mut child = command.spawn().map_err(|source| Error::Spawn { cmd: cmd.clone(), source })?;
    // Written from another thread so a command that fills its stdout pipe before reading all
    // its input cannot deadlock us.
    let writer = match (input, child.stdin.take()) {
        (Some(input), Some(mut stdin)) => Some(std::thread::spawn(move || stdin.write_all(&input))),
        _ => None,
    };
    let output = child.wait_with_output().map_err(|source| Error::Spawn { cmd: cmd.clone(), source })?;
    if let Some(writer) = writer {
        // A command that exits without reading its input fails below with its own message;
        // a broken pipe here adds nothing.
        let _ = writer.join();
    }
    if !output.status.success() {
        return Err(Error::Command {
            cmd,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
