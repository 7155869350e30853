//! UDP conntrack cleanup: after a sync, delete the conntrack entries that would keep UDP
//! clients talking to an endpoint the plan no longer uses.
//!
//! A UDP flow's DNAT is decided by its first datagram and then lives in its conntrack entry;
//! while a client keeps sending from the same socket, the entry stays alive and the new rules
//! are never consulted. So once the data plane is synced, ferry deletes, over ctnetlink, the
//! entries that [`stale_flows`] derives from the plan diff (the rules are kube-proxy's; see
//! [`stale`]). Their next datagram then starts a new entry that the current rules DNAT to a live
//! endpoint.
//!
//! Deleting happens in the calling thread's network namespace: the daemon's own, or a test's
//! namespace entered on a dedicated thread. The kernel table sits behind [`Table`];
//! [`Netlink`] is the real one and [`FakeTable`] an in-memory one for tests.
//!
//! After a successful sync, with the diff that sync applied:
//! ```no_run
//! # let diff = proxy::plan::PlanDiff::default();
//! let report = proxy::conntrack::cleanup(&proxy::conntrack::stale_flows(&diff))?;
//! # Ok::<(), proxy::conntrack::ConntrackError>(())
//! ```

mod netlink;
pub mod stale;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::model::IpFamily;
pub use netlink::Netlink;
pub use stale::{Filter, StaleFlows, stale_flows};

/// One UDP conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// Original direction: the client, and the address it sent to (a frontend).
    pub orig_src: SocketAddr,
    pub orig_dst: SocketAddr,
    /// Reply direction: who answers (after DNAT, the endpoint) and to whom (after masquerade,
    /// the node rather than the client).
    pub reply_src: SocketAddr,
    pub reply_dst: SocketAddr,
    /// The kernel's id of the entry: a delete names it, so that an entry that expired and was
    /// recreated meanwhile (same addresses, new id) is left alone.
    pub id: Option<u32>,
    /// The conntrack zone, when not the default one.
    pub zone: Option<u16>,
}

impl Flow {
    /// A flow with no kernel identity, for tests and fakes.
    pub fn udp(
        orig_src: SocketAddr,
        orig_dst: SocketAddr,
        reply_src: SocketAddr,
        reply_dst: SocketAddr,
    ) -> Self {
        Self { orig_src, orig_dst, reply_src, reply_dst, id: None, zone: None }
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.orig_dst.ip())
    }
}

impl fmt::Display for Flow {
    /// `udp <client> > <frontend> reply <endpoint> > <client or node>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "udp {} > {} reply {} > {}", self.orig_src, self.orig_dst, self.reply_src, self.reply_dst)
    }
}

/// The conntrack table of one network namespace.
pub trait Table {
    /// Calls `visit` with every UDP flow of `family` — only those whose original destination
    /// port is `dst_port`, when given. That is a hint for the table to read less: a table may
    /// also pass other flows, which the caller filters anyway.
    fn for_each_udp(
        &mut self,
        family: IpFamily,
        dst_port: Option<u16>,
        visit: &mut dyn FnMut(Flow),
    ) -> Result<(), ConntrackError>;

    /// Deletes these flows; returns how many were still there to delete.
    fn delete(&mut self, flows: &[Flow]) -> Result<usize, ConntrackError>;
}

/// What a cleanup did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    pub filters: usize,
    /// UDP flows examined: those to the filters' destination ports (all UDP flows of a family
    /// with many ports to clean).
    pub scanned: usize,
    /// Flows that matched a filter.
    pub matched: usize,
    /// Matched flows deleted; the others expired (or were replaced) before their turn.
    pub deleted: usize,
    #[serde(skip)]
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot open a ctnetlink socket: {0}")]
    Open(#[source] io::Error),
    #[error("ctnetlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("ctnetlink {op}: the kernel answered: {source}")]
    Kernel {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("ctnetlink {op}: cannot decode the kernel's message: {reason}")]
    Decode { op: &'static str, reason: String },
}

/// Up to this many distinct destination ports in a family, the table is read once per port
/// (the kernel skips the other flows itself); beyond, once for all UDP flows.
const READS_PER_PORT: usize = 8;

/// Deletes the stale flows from `table`: per family that has filters, a pass over its UDP
/// flows (one per destination port when there are few), then the deletes. Families without
/// filters are not read.
pub fn clean(table: &mut dyn Table, stale: &StaleFlows) -> Result<CleanupReport, ConntrackError> {
    let started = Instant::now();
    let mut report = CleanupReport { filters: stale.len(), ..CleanupReport::default() };
    for family in IpFamily::ALL {
        // Every filter names the destination port: index them by it.
        let mut by_port: BTreeMap<u16, Vec<&Filter>> = BTreeMap::new();
        for f in stale.family(family) {
            by_port.entry(f.dst_port).or_default().push(f);
        }
        if by_port.is_empty() {
            continue;
        }
        let reads: Vec<Option<u16>> = if by_port.len() <= READS_PER_PORT {
            by_port.keys().copied().map(Some).collect()
        } else {
            vec![None]
        };
        let mut doomed = Vec::new();
        for dst_port in reads {
            table.for_each_udp(family, dst_port, &mut |flow| {
                if dst_port.is_some_and(|p| p != flow.orig_dst.port()) {
                    return;
                }
                report.scanned += 1;
                let hit = by_port
                    .get(&flow.orig_dst.port())
                    .is_some_and(|fs| fs.iter().any(|f| f.matches(flow.orig_dst, flow.reply_src)));
                if hit {
                    doomed.push(flow);
                }
            })?;
        }
        report.matched += doomed.len();
        if !doomed.is_empty() {
            report.deleted += table.delete(&doomed)?;
        }
    }
    report.duration = started.elapsed();
    Ok(report)
}

/// Deletes the stale flows from the conntrack table of the calling thread's network namespace
/// (nothing is opened when there is nothing to delete).
pub fn cleanup(stale: &StaleFlows) -> Result<CleanupReport, ConntrackError> {
    if stale.is_empty() {
        return Ok(CleanupReport::default());
    }
    clean(&mut Netlink::open()?, stale)
}

/// An in-memory conntrack table: flows in, the surviving flows out as a deterministic dump.
#[derive(Debug, Default, Clone)]
pub struct FakeTable {
    pub flows: Vec<Flow>,
    /// The reads: family and port hint, in order.
    pub reads: Vec<(IpFamily, Option<u16>)>,
}

impl FakeTable {
    pub fn new(flows: Vec<Flow>) -> Self {
        Self { flows, reads: Vec::new() }
    }

    /// One line per flow, sorted.
    pub fn dump(&self) -> String {
        let mut lines: Vec<String> = self.flows.iter().map(|f| format!("{f}\n")).collect();
        lines.sort();
        lines.concat()
    }
}

impl Table for FakeTable {
    /// Passes every flow of the family, ignoring the port hint (which [`clean`] must cope with).
    fn for_each_udp(
        &mut self,
        family: IpFamily,
        dst_port: Option<u16>,
        visit: &mut dyn FnMut(Flow),
    ) -> Result<(), ConntrackError> {
        self.reads.push((family, dst_port));
        for f in self.flows.iter().filter(|f| f.family() == family) {
            visit(f.clone());
        }
        Ok(())
    }

    fn delete(&mut self, flows: &[Flow]) -> Result<usize, ConntrackError> {
        let before = self.flows.len();
        self.flows.retain(|f| !flows.contains(f));
        Ok(before - self.flows.len())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::plan::PlanDiff;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("a socket address")
    }

    /// A client's flow to `frontend`, DNATed to `endpoint`.
    fn flow(client: &str, frontend: &str, endpoint: &str) -> Flow {
        Flow::udp(sa(client), sa(frontend), sa(endpoint), sa(client))
    }

    /// `dns` 53/UDP on 10.96.0.10.
    fn udp_port(endpoints: Vec<SocketAddr>) -> crate::plan::ServicePortPlan {
        let name = crate::model::ServicePortName {
            service: crate::model::ServiceKey::new("e2e", "dns"),
            port: "dns".into(),
            protocol: crate::model::Protocol::Udp,
        };
        crate::plan::ServicePortPlan::cluster_ip_only(
            name,
            "10.96.0.10".parse().expect("an IP"),
            53,
            endpoints,
        )
    }

    /// 10.0.1.10:8053 left `dns`; 10.0.1.11:8053 stays.
    fn removed_endpoint_filter() -> StaleFlows {
        let old = udp_port(vec![sa("10.0.1.10:8053"), sa("10.0.1.11:8053")]);
        let new = udp_port(vec![sa("10.0.1.11:8053")]);
        stale_flows(&PlanDiff { changed: vec![(Arc::new(old), Arc::new(new))], ..PlanDiff::default() })
    }

    #[test]
    fn clean_deletes_only_the_matching_flows() {
        let mut table = FakeTable::new(vec![
            flow("10.0.1.2:40000", "10.96.0.10:53", "10.0.1.10:8053"),
            flow("10.0.1.2:40001", "10.96.0.10:53", "10.0.1.11:8053"),
            flow("10.0.1.3:40000", "10.96.0.10:53", "10.0.1.10:8053"),
            flow("10.0.1.2:40002", "10.96.0.11:53", "10.0.1.10:8053"),
            flow("10.0.1.2:40003", "10.96.0.10:54", "10.0.1.10:8053"),
            flow("[fd00:10::1:2]:40000", "[fd00:96::10]:53", "[fd00:10::1:10]:8053"),
        ]);
        let report = clean(&mut table, &removed_endpoint_filter()).expect("the fake never fails");
        assert_eq!(
            table.dump(),
            "udp 10.0.1.2:40001 > 10.96.0.10:53 reply 10.0.1.11:8053 > 10.0.1.2:40001\n\
             udp 10.0.1.2:40002 > 10.96.0.11:53 reply 10.0.1.10:8053 > 10.0.1.2:40002\n\
             udp 10.0.1.2:40003 > 10.96.0.10:54 reply 10.0.1.10:8053 > 10.0.1.2:40003\n\
             udp [fd00:10::1:2]:40000 > [fd00:96::10]:53 reply [fd00:10::1:10]:8053 > [fd00:10::1:2]:40000\n"
        );
        assert_eq!((report.filters, report.scanned, report.matched, report.deleted), (1, 4, 2, 2));
        assert_eq!(table.reads, [(IpFamily::V4, Some(53))], "the IPv6 table had no filter and was not read");
    }

    #[test]
    fn nothing_to_clean_reads_nothing() {
        let mut table = FakeTable::new(vec![flow("10.0.1.2:40000", "10.96.0.10:53", "10.0.1.10:8053")]);
        let report = clean(&mut table, &StaleFlows::default()).expect("the fake never fails");
        assert_eq!((report.scanned, report.deleted), (0, 0));
        assert!(table.reads.is_empty());
        assert_eq!(cleanup(&StaleFlows::default()).expect("opens nothing").deleted, 0);
    }

    #[test]
    fn many_ports_are_read_in_one_pass() {
        let ports: Vec<crate::plan::ServicePortPlan> = (0..=READS_PER_PORT as u16)
            .map(|i| {
                let mut p = udp_port(vec![sa("10.0.1.10:8053")]);
                p.port = 5300 + i;
                p
            })
            .collect();
        let few = stale_flows(&PlanDiff {
            added: ports.iter().take(READS_PER_PORT).cloned().map(Arc::new).collect(),
            ..PlanDiff::default()
        });
        let many = stale_flows(&PlanDiff {
            added: ports.into_iter().map(Arc::new).collect(),
            ..PlanDiff::default()
        });
        // Entries without DNAT, as left before the ports had endpoints.
        let mut table = FakeTable::new(vec![flow("10.0.1.2:40000", "10.96.0.10:5301", "10.96.0.10:5301")]);
        assert_eq!(clean(&mut table, &few).expect("the fake never fails").deleted, 1);
        assert_eq!(table.reads.len(), READS_PER_PORT);
        let mut table = FakeTable::new(vec![flow("10.0.1.2:40000", "10.96.0.10:5308", "10.96.0.10:5308")]);
        assert_eq!(clean(&mut table, &many).expect("the fake never fails").deleted, 1);
        assert_eq!(table.reads, [(IpFamily::V4, None)]);
    }

    /// A table whose flows expire between the read and the delete.
    struct Expiring(FakeTable);

    impl Table for Expiring {
        fn for_each_udp(
            &mut self,
            family: IpFamily,
            dst_port: Option<u16>,
            visit: &mut dyn FnMut(Flow),
        ) -> Result<(), ConntrackError> {
            self.0.for_each_udp(family, dst_port, visit)?;
            self.0.flows.clear();
            Ok(())
        }

        fn delete(&mut self, flows: &[Flow]) -> Result<usize, ConntrackError> {
            self.0.delete(flows)
        }
    }

    #[test]
    fn flows_that_expired_meanwhile_count_as_matched_not_deleted() {
        let mut table =
            Expiring(FakeTable::new(vec![flow("10.0.1.2:40000", "10.96.0.10:53", "10.0.1.10:8053")]));
        let report = clean(&mut table, &removed_endpoint_filter()).expect("the fake never fails");
        assert_eq!((report.matched, report.deleted), (1, 0));
    }
}
