//! Network-namespace sandbox for ferry's kernel tests and the demo.
//!
//! A [`Sandbox`] creates network namespaces, veth pairs between them, addresses and routes; it
//! runs commands ([`Netns::exec`], [`Netns::spawn`]) and closures ([`Netns::run`]) inside a
//! namespace, and starts per-pod TCP/UDP [responders](Netns::responder) that answer with their
//! own address and the peer address they saw, so a test can assert which endpoint served and
//! whether the source was masqueraded. [`Cluster::build`] wires the topology from DESIGN.md:
//! a node, a second node with remote pods, local pods, a client pod and an external client.
//!
//! # Safety model
//!
//! These tests run as root on a developer's machine or a CI runner, so a mistake could cut the
//! machine off the network. The sandbox therefore:
//!
//! - **never touches the root network namespace.** Every `ip` command runs as `ip -n <ns>` and
//!   every other command as `ip netns exec <ns>`, where `<ns>` is a namespace this sandbox
//!   created; both fail instead of falling back to the root namespace when `<ns>` is gone. veth
//!   pairs are created *inside* a namespace with their peer placed directly in another one
//!   (`ip -n A link add X type veth peer name Y netns B`), so no interface ever exists in the
//!   root namespace, not even briefly. Interface names therefore need no prefix.
//! - **keeps traffic inside the test.** No namespace gets a route toward the root namespace
//!   (there is no link to it); pods' default routes lead to their node namespace.
//! - **never changes the caller's namespace.** Code that must run inside a namespace runs on a
//!   dedicated thread that `setns`es and is joined ([`Netns::run`]); the explicit
//!   [`NetnsGuard`] restores the thread's namespace on drop and is not `Send`.
//! - **removes everything on drop**, also when a test panics (`Drop` runs while unwinding):
//!   it stops the responder threads, kills the processes it spawned through their own `Child`
//!   handles (never by name) and deletes every namespace it created, which destroys their
//!   interfaces, routes, nftables tables and BPF attachments with them.
//! - **names everything with a per-test prefix** `fy<pid>-<counter>-<test hint>-`, unique per
//!   process (the pid) and per sandbox in that process (an atomic counter), so tests running in
//!   parallel threads or in parallel test binaries never collide.
//!
//! A process killed with SIGKILL (or Ctrl-C) cannot run `Drop`; its namespaces stay behind.
//! [`remove_stale_namespaces`] deletes those whose owning process no longer exists.
//!
//! Inside a thread that entered a namespace, `/proc/self/net` still shows the *process's* (main
//! thread's) namespace; read `/proc/thread-self/net` instead.

mod cluster;
mod error;
mod netns;
mod offload;
mod process;
mod responder;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

pub use cluster::{Cluster, ClusterSpec, Host, Node, Pod};
pub use error::{Error, Result};
pub use netns::{Netns, NetnsGuard, NsCommand};
/// For [`Process::signal`].
pub use nix::sys::signal::Signal;
pub use process::Process;
pub use responder::{Proto, Reply, Responder};

/// Where `ip netns add` puts its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

/// Every sandbox namespace starts with this.
const NAME_TAG: &str = "fy";

/// Longest test-name hint kept in the prefix.
const HINT_MAX: usize = 24;

/// Longest namespace-local part (`sb.netns(name)`).
const LOCAL_NAME_MAX: usize = 32;

/// Linux's IFNAMSIZ minus the terminating NUL.
pub const IFNAME_MAX: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Sysctls set in every namespace the sandbox creates: forward packets like a node does, keep
/// `route_localnet` off (kube-proxy's nftables mode does not need it), don't drop asymmetric
/// paths (DNAT and masquerade make them), and make IPv6 addresses usable at once (no DAD).
const SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
    ("net/ipv6/conf/default/forwarding", "1"),
    ("net/ipv4/conf/all/route_localnet", "0"),
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];

/// A set of network namespaces owned by one test. Dropping it removes them all.
///
/// ```no_run
/// # fn main() -> ferry_sandbox::Result<()> {
/// use ferry_sandbox::{Proto, Sandbox};
/// use std::net::{Ipv4Addr, SocketAddr};
/// use std::time::Duration;
///
/// let sb = Sandbox::new("doc_example")?;
/// let a = sb.netns("a")?;
/// let b = sb.netns("b")?;
/// sb.link(&a, "eth0", &b, "eth0")?;
/// a.addr("eth0", "10.0.0.1/24")?;
/// b.addr("eth0", "10.0.0.2/24")?;
/// b.responder(Ipv4Addr::new(10, 0, 0, 2).into(), 8080, Proto::Tcp)?;
/// let reply = a.tcp_request(SocketAddr::from(([10, 0, 0, 2], 8080)), Duration::from_secs(2))?;
/// assert_eq!(reply.server, SocketAddr::from(([10, 0, 0, 2], 8080)));
/// assert_eq!(reply.peer.ip(), Ipv4Addr::new(10, 0, 0, 1));
/// # Ok(()) }
/// ```
pub struct Sandbox {
    prefix: String,
    shared: Arc<Shared>,
}

/// State shared with the [`Netns`] handles, which hold it weakly: once the sandbox is dropped
/// they can no longer start anything that would outlive it.
pub(crate) struct Shared {
    namespaces: Mutex<Vec<String>>,
    processes: Mutex<Vec<Process>>,
    responders: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
}

impl Shared {
    pub(crate) fn add_process(&self, process: Process) {
        lock(&self.processes).push(process);
    }

    pub(crate) fn add_responder(&self, thread: JoinHandle<()>) {
        lock(&self.responders).push(thread);
    }

    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }
}

impl Sandbox {
    /// A new, empty sandbox for the test `test_name` (a hint kept in the namespace names; only
    /// the last `::` segment is used). Fails unless running as root.
    pub fn new(test_name: &str) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::NotRoot);
        }
        let hint = name_hint(test_name);
        let pid = std::process::id();
        let existing = existing_namespaces()?;
        // The pid makes the prefix unique among running processes; a namespace left behind by
        // a killed process with the same (reused) pid is skipped over.
        let prefix = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let prefix = format!("{NAME_TAG}{pid}-{n}-{hint}-");
            if !existing.iter().any(|name| name.starts_with(&prefix)) {
                break prefix;
            }
        };
        Ok(Self {
            prefix,
            shared: Arc::new(Shared {
                namespaces: Mutex::new(Vec::new()),
                processes: Mutex::new(Vec::new()),
                responders: Mutex::new(Vec::new()),
                stop: Arc::new(AtomicBool::new(false)),
            }),
        })
    }

    /// The prefix of every namespace of this sandbox, e.g. `fy4242-0-pod_to_pod-`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full names of the namespaces created so far.
    pub fn namespaces(&self) -> Vec<String> {
        lock(&self.shared.namespaces).clone()
    }

    /// Creates the namespace `<prefix><name>`, brings `lo` up and sets the forwarding sysctls
    /// (IPv4/IPv6 forwarding on, `rp_filter` off, `route_localnet` off, IPv6 DAD off).
    pub fn netns(&self, name: &str) -> Result<Netns> {
        check_local_name(name)?;
        let full = format!("{}{name}", self.prefix);
        if lock(&self.shared.namespaces).contains(&full) {
            return Err(Error::Invalid {
                what: "namespace",
                value: name.to_owned(),
                reason: "already created in this sandbox",
            });
        }
        netns::run_ip(&["netns", "add", &full])?;
        // Registered before anything else can fail, so that Drop removes it.
        lock(&self.shared.namespaces).push(full.clone());
        let ns = Netns::new(full, Arc::downgrade(&self.shared));
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.sysctls(SYSCTLS)?;
        Ok(ns)
    }

    /// A veth pair: `a_if` in `a` and `b_if` in `b`, both up. The pair is created inside `a`
    /// with its peer placed directly into `b`; it never exists in the root namespace.
    pub fn link(&self, a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
        check_ifname(a_if)?;
        check_ifname(b_if)?;
        for ns in [a, b] {
            if !ns.name().starts_with(&self.prefix) {
                return Err(Error::Invalid {
                    what: "namespace",
                    value: ns.name().to_owned(),
                    reason: "belongs to another sandbox",
                });
            }
        }
        a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
        a.ip(&["link", "set", a_if, "up"])?;
        b.ip(&["link", "set", b_if, "up"])?;
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Responders first: they notice the flag within their socket timeout.
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in std::mem::take(&mut *lock(&self.shared.responders)) {
            // A responder that panicked has nothing left to clean up.
            let _ = thread.join();
        }
        for process in std::mem::take(&mut *lock(&self.shared.processes)) {
            if let Err(e) = process.kill() {
                eprintln!("ferry-sandbox: {e}");
            }
        }
        let namespaces = std::mem::take(&mut *lock(&self.shared.namespaces));
        for name in namespaces.iter().rev() {
            if let Err(e) = netns::run_ip(&["netns", "del", name]) {
                // Never panic in Drop: it may run while unwinding, and a second panic aborts.
                eprintln!("ferry-sandbox: could not remove network namespace {name}: {e}");
            }
        }
    }
}

/// Deletes sandbox namespaces (`fy<pid>-…`) whose process no longer exists: leftovers of test
/// runs killed before `Drop` could run (SIGKILL, Ctrl-C). Returns the names removed.
///
/// Only sound when every process using sandboxes shares this process's pid namespace (the
/// liveness check reads `/proc/<pid>`); don't call it from a container that shares `/run/netns`
/// with the host while tests run there.
pub fn remove_stale_namespaces() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in existing_namespaces()? {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        netns::run_ip(&["netns", "del", &name])?;
        removed.push(name);
    }
    Ok(removed)
}

/// The names of every namespace in [`NETNS_DIR`] (empty when the directory doesn't exist yet).
pub fn existing_namespaces() -> Result<HashSet<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(source) => {
            return Err(Error::Io { what: format!("listing {NETNS_DIR}"), source });
        }
    };
    let mut names = HashSet::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io { what: format!("listing {NETNS_DIR}"), source })?;
        if let Some(name) = entry.file_name().to_str() {
            names.insert(name.to_owned());
        }
    }
    Ok(names)
}

/// The pid encoded in a sandbox namespace name `fy<pid>-<n>-…`.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_TAG)?;
    let (pid, rest) = rest.split_once('-')?;
    let (counter, _) = rest.split_once('-')?;
    if counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// The human hint in the prefix: the test function's name, in characters safe for file names.
fn name_hint(test_name: &str) -> String {
    let last = test_name.rsplit("::").next().unwrap_or(test_name);
    let hint: String = last
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
        .take(HINT_MAX)
        .collect();
    if hint.is_empty() { "test".to_owned() } else { hint }
}

fn check_local_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > LOCAL_NAME_MAX {
        Some("longer than 32 characters")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        Some("only ASCII letters, digits, '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::Invalid { what: "namespace", value: name.to_owned(), reason }),
        None => Ok(()),
    }
}

pub(crate) fn check_ifname(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > IFNAME_MAX {
        Some("longer than 15 characters")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.') {
        Some("only ASCII letters, digits, '_', '-' and '.' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::Invalid { what: "interface", value: name.to_owned(), reason }),
        None => Ok(()),
    }
}

/// Locks a mutex, ignoring poisoning: a panicking test must still be cleaned up.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_hint_should_keep_the_test_function_name() {
        assert_eq!(name_hint("suite::pod_to_pod"), "pod_to_pod");
        assert_eq!(name_hint("a b/c"), "a_b_c");
        assert_eq!(name_hint(""), "test");
        assert_eq!(name_hint(&"x".repeat(100)).len(), HINT_MAX);
    }

    #[test]
    fn owner_pid_should_parse_only_sandbox_names() {
        assert_eq!(owner_pid("fy4242-7-pod_to_pod-node"), Some(4242));
        assert_eq!(owner_pid("fy4242-x-node"), None);
        assert_eq!(owner_pid("fyx-7-node"), None);
        assert_eq!(owner_pid("cni-1234"), None);
    }

    #[test]
    fn names_should_be_checked() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("a-very-long-name").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_local_name("node2").is_ok());
        assert!(check_local_name("../x").is_err());
    }
}
