//! The sysctls IPVS mode needs, as kube-proxy sets them. They are per network namespace, so
//! they are written in the namespace ferry programs (a helper thread enters a named one:
//! `/proc/sys/net` follows the writing thread's namespace).

use std::io;

use super::socket::in_netns;

/// (path under /proc/sys, value, why).
pub const SETTINGS: &[(&str, &str, &str)] = &[
    ("net/ipv4/vs/conntrack", "1", "keep IPVS connections in conntrack, so they can be masqueraded"),
    (
        "net/ipv4/vs/expire_nodest_conn",
        "1",
        "drop connections whose real server was deleted at their next packet",
    ),
    (
        "net/ipv4/vs/expire_quiescent_template",
        "1",
        "expire session-affinity templates of weight-0 (terminating) real servers",
    ),
    ("net/ipv4/ip_forward", "1", "forward to endpoints on other nodes"),
    ("net/ipv4/conf/all/arp_ignore", "1", "answer ARP only for addresses of the receiving interface"),
    ("net/ipv4/conf/all/arp_announce", "2", "never announce service addresses of kube-ipvs0"),
];

/// conn_reuse_mode=0 works around a stall when a client port is reused (kube-proxy issue
/// 81775); kernels from 5.9 fixed it, and there the default stays.
const CONN_REUSE: &str = "net/ipv4/vs/conn_reuse_mode";

#[derive(Debug, thiserror::Error)]
#[error("sysctl {key}={value}: {source}")]
pub struct SysctlError {
    pub key: String,
    pub value: String,
    pub source: io::Error,
}

/// Whether a kernel release (`6.1.0-31-amd64`) is older than major.minor.
pub fn older_than(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    let ma = parts.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    let mi = parts.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    (ma, mi) < (major, minor)
}

/// Writes every setting inside `netns` (None: this namespace); returns what it set.
pub fn apply(netns: Option<&str>) -> Result<Vec<(String, String)>, SysctlError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut wanted: Vec<(String, String)> =
        SETTINGS.iter().map(|(k, v, _)| ((*k).to_owned(), (*v).to_owned())).collect();
    if older_than(release.trim(), 5, 9) {
        wanted.push((CONN_REUSE.to_owned(), "0".to_owned()));
    }
    let result: io::Result<Result<(), SysctlError>> = in_netns(netns, || {
        for (key, value) in &wanted {
            let path = format!("/proc/sys/{key}");
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current.trim() == value {
                continue;
            }
            if let Err(source) = std::fs::write(&path, value) {
                return Ok(Err(SysctlError { key: key.clone(), value: value.clone(), source }));
            }
        }
        Ok(Ok(()))
    });
    match result {
        Ok(Ok(())) => Ok(wanted),
        Ok(Err(e)) => Err(e),
        Err(source) => {
            Err(SysctlError { key: "(entering the namespace)".into(), value: String::new(), source })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(older_than("4.19.0-21-amd64", 5, 9));
        assert!(older_than("5.8.18", 5, 9));
        assert!(!older_than("5.9.0", 5, 9));
        assert!(!older_than("6.1.0-31-amd64", 5, 9));
        assert!(!older_than("6.18.2", 5, 9));
    }
}
