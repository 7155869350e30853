//! The kernel's IPVS table behind a trait: the real one over generic netlink, and an
//! in-memory fake for unit tests that keeps the same rules (a destination needs its service,
//! adding an existing object fails) and logs every call.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use netlink_packet_core::ParseableParametrized;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlHeader, GenlMessage};

use super::netlink::{self, Dest, DestStatus, IpvsMessage, Service, ServiceKey, ServiceSpec, Timeouts};
use super::socket::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NlSocket, SocketError, encode,
};

const NETLINK_GENERIC: isize = 16;
const GENL_ID_CTRL: u16 = 16;
const ENOENT: i32 = 2;
const GENL_HDRLEN: usize = 4;

/// IPVS as ferry uses it.
pub trait Ipvs: Send {
    fn services(&mut self) -> Result<Vec<Service>, SocketError>;
    fn dests(&mut self, key: &ServiceKey) -> Result<Vec<DestStatus>, SocketError>;
    fn add_service(&mut self, key: &ServiceKey, spec: &ServiceSpec) -> Result<(), SocketError>;
    fn edit_service(&mut self, key: &ServiceKey, spec: &ServiceSpec) -> Result<(), SocketError>;
    /// Removes the service with its real servers; one already gone is not an error.
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), SocketError>;
    fn add_dest(&mut self, key: &ServiceKey, dest: &Dest) -> Result<(), SocketError>;
    fn edit_dest(&mut self, key: &ServiceKey, dest: &Dest) -> Result<(), SocketError>;
    /// One already gone is not an error.
    fn del_dest(&mut self, key: &ServiceKey, addr: &SocketAddr) -> Result<(), SocketError>;
    /// The namespace's connection timeouts (`IPVS_CMD_GET_CONFIG`).
    fn timeouts(&mut self) -> Result<Timeouts, SocketError>;
    /// Sets the non-zero ones of `timeouts` (`IPVS_CMD_SET_CONFIG`).
    fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<(), SocketError>;
}

/// IPVS over a generic netlink socket.
#[derive(Debug)]
pub struct NetlinkIpvs {
    socket: NlSocket,
    family: u16,
}

impl NetlinkIpvs {
    /// Opens a socket in this namespace or the named one and resolves the "IPVS" family (which
    /// loads the `ip_vs` module where it is one). Fails when the kernel has no IPVS.
    pub fn open(netns: Option<&str>) -> Result<Self, SocketError> {
        let mut socket = NlSocket::open(NETLINK_GENERIC, netns)?;
        let family = resolve_family(&mut socket, netlink::FAMILY_NAME)?;
        Ok(Self { socket, family })
    }

    fn message(&self, msg: IpvsMessage, flags: u16, seq: u32) -> Vec<u8> {
        let mut genl = GenlMessage::from_payload(msg);
        genl.set_resolved_family_id(self.family);
        encode(genl, flags, seq)
    }

    fn request(
        &mut self,
        msg: IpvsMessage,
        create: bool,
        what: &dyn Fn() -> String,
    ) -> Result<(), SocketError> {
        let seq = self.socket.next_seq();
        let mut flags = NLM_F_REQUEST | NLM_F_ACK;
        if create {
            flags |= NLM_F_CREATE | NLM_F_EXCL;
        }
        let bytes = self.message(msg, flags, seq);
        self.socket.request(what, &bytes, seq)
    }

    fn dump(
        &mut self,
        msg: IpvsMessage,
        what: &dyn Fn() -> String,
        each: &mut dyn FnMut(IpvsMessage) -> Result<(), SocketError>,
    ) -> Result<(), SocketError> {
        self.answers(msg, NLM_F_REQUEST | NLM_F_DUMP, what, each)
    }

    /// Sends `msg` with `flags` and hands every IPVS message of the answer to `each`, until
    /// the dump's end or the acknowledgement.
    fn answers(
        &mut self,
        msg: IpvsMessage,
        flags: u16,
        what: &dyn Fn() -> String,
        each: &mut dyn FnMut(IpvsMessage) -> Result<(), SocketError>,
    ) -> Result<(), SocketError> {
        let seq = self.socket.next_seq();
        let bytes = self.message(msg, flags, seq);
        let family = self.family;
        self.socket.dump(what, &bytes, seq, &mut |ty, payload| {
            if ty != family {
                return Ok(());
            }
            let decode = |reason: String| SocketError::Decode { op: what(), reason };
            let header = GenlHeader::parse(payload).map_err(|e| decode(e.to_string()))?;
            let body = payload.get(GENL_HDRLEN..).ok_or_else(|| decode("short message".into()))?;
            each(IpvsMessage::parse_with_param(body, header).map_err(|e| decode(e.to_string()))?)
        })
    }
}

/// The id the kernel gave generic netlink family `name` (`CTRL_CMD_GETFAMILY`).
fn resolve_family(socket: &mut NlSocket, name: &str) -> Result<u16, SocketError> {
    let op = || format!("resolving generic netlink family {name:?} (is IPVS in this kernel?)");
    let seq = socket.next_seq();
    let mut msg = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_owned())],
    });
    msg.finalize();
    msg.set_resolved_family_id(GENL_ID_CTRL);
    let bytes = encode(msg, NLM_F_REQUEST | NLM_F_ACK, seq);
    let mut id = None;
    let result = socket.dump(&op, &bytes, seq, &mut |ty, payload| {
        if ty != GENL_ID_CTRL {
            return Ok(());
        }
        let reply = GenlMessage::<GenlCtrl>::parse_with_param(payload, ty)
            .map_err(|e| SocketError::Decode { op: op(), reason: e.to_string() })?;
        for nla in reply.payload.nlas {
            if let GenlCtrlAttrs::FamilyId(v) = nla {
                id = Some(v);
            }
        }
        Ok(())
    });
    match (result, id) {
        // The reply came; the acknowledgement after it ends the exchange.
        (Ok(()), Some(id)) => Ok(id),
        (Err(e), _) => Err(e),
        (Ok(()), None) => Err(SocketError::Decode { op: op(), reason: "no family id in the reply".into() }),
    }
}

fn tolerate_missing(result: Result<(), SocketError>) -> Result<(), SocketError> {
    match result {
        Err(e) if e.errno() == Some(ENOENT) || e.errno() == Some(3 /* ESRCH */) => Ok(()),
        other => other,
    }
}

impl Ipvs for NetlinkIpvs {
    fn services(&mut self) -> Result<Vec<Service>, SocketError> {
        let op = || "listing IPVS services".to_owned();
        let mut out = Vec::new();
        self.dump(netlink::list_services(), &op, &mut |msg| {
            if let Some(s) = netlink::parse_service(&msg)
                .map_err(|e| SocketError::Decode { op: op(), reason: e.to_string() })?
            {
                out.push(s);
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn dests(&mut self, key: &ServiceKey) -> Result<Vec<DestStatus>, SocketError> {
        let op = || format!("listing the real servers of {key}");
        let mut out = Vec::new();
        let family = key.family();
        self.dump(netlink::name_service(netlink::CMD_GET_DEST, key), &op, &mut |msg| {
            out.push(
                netlink::parse_dest(&msg, family)
                    .map_err(|e| SocketError::Decode { op: op(), reason: e.to_string() })?,
            );
            Ok(())
        })?;
        Ok(out)
    }

    fn add_service(&mut self, key: &ServiceKey, spec: &ServiceSpec) -> Result<(), SocketError> {
        let msg = netlink::put_service(netlink::CMD_NEW_SERVICE, key, spec);
        self.request(msg, true, &|| format!("adding IPVS service {key} -s {}", spec.scheduler))
    }

    fn edit_service(&mut self, key: &ServiceKey, spec: &ServiceSpec) -> Result<(), SocketError> {
        let msg = netlink::put_service(netlink::CMD_SET_SERVICE, key, spec);
        self.request(msg, false, &|| format!("editing IPVS service {key} -s {}", spec.scheduler))
    }

    fn del_service(&mut self, key: &ServiceKey) -> Result<(), SocketError> {
        let msg = netlink::name_service(netlink::CMD_DEL_SERVICE, key);
        tolerate_missing(self.request(msg, false, &|| format!("deleting IPVS service {key}")))
    }

    fn add_dest(&mut self, key: &ServiceKey, dest: &Dest) -> Result<(), SocketError> {
        let msg = netlink::put_dest(netlink::CMD_NEW_DEST, key, dest);
        self.request(msg, true, &|| format!("adding real server {} to {key}", dest.addr))
    }

    fn edit_dest(&mut self, key: &ServiceKey, dest: &Dest) -> Result<(), SocketError> {
        let msg = netlink::put_dest(netlink::CMD_SET_DEST, key, dest);
        self.request(msg, false, &|| format!("setting weight {} of {} in {key}", dest.weight, dest.addr))
    }

    fn del_dest(&mut self, key: &ServiceKey, addr: &SocketAddr) -> Result<(), SocketError> {
        let msg = netlink::del_dest(key, addr);
        tolerate_missing(self.request(msg, false, &|| format!("deleting real server {addr} of {key}")))
    }

    fn timeouts(&mut self) -> Result<Timeouts, SocketError> {
        let op = || "reading the IPVS connection timeouts".to_owned();
        let mut out = None;
        // GET_CONFIG has no dump: one answer, then the acknowledgement asked for.
        self.answers(netlink::get_config(), NLM_F_REQUEST | NLM_F_ACK, &op, &mut |msg| {
            out = Some(
                netlink::parse_config(&msg)
                    .map_err(|e| SocketError::Decode { op: op(), reason: e.to_string() })?,
            );
            Ok(())
        })?;
        out.ok_or_else(|| SocketError::Decode {
            op: op(),
            reason: "no answer before the acknowledgement".into(),
        })
    }

    fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<(), SocketError> {
        let msg = netlink::set_config(timeouts);
        self.request(msg, false, &|| format!("setting the IPVS timeouts (tcp tcpfin udp) to {timeouts}"))
    }
}

/// An in-memory IPVS table with the kernel's rules, for tests.
#[derive(Debug, Clone)]
pub struct FakeIpvs {
    pub table: BTreeMap<ServiceKey, (ServiceSpec, BTreeMap<SocketAddr, DestStatus>)>,
    /// The connection timeouts; a fresh namespace has the kernel's defaults.
    pub timeouts: Timeouts,
    /// Every call that changed something, in `ipvsadm`-like words.
    pub log: Vec<String>,
}

impl Default for FakeIpvs {
    fn default() -> Self {
        Self { table: BTreeMap::new(), timeouts: Timeouts::KERNEL_DEFAULTS, log: Vec::new() }
    }
}

impl FakeIpvs {
    fn missing(what: String) -> SocketError {
        SocketError::Kernel { op: what, errno: ENOENT, source: std::io::Error::from_raw_os_error(ENOENT) }
    }

    fn exists(what: String) -> SocketError {
        SocketError::Kernel { op: what, errno: 17, source: std::io::Error::from_raw_os_error(17) }
    }

    /// The table as `ipvsadm -Sn` would print it (sorted).
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for (key, (spec, dests)) in &self.table {
            let _ = write!(out, "-A {key} -s {}", spec.scheduler);
            if let Some(t) = spec.persistent() {
                let _ = write!(out, " -p {t}");
            }
            out.push('\n');
            for d in dests.values() {
                let _ = writeln!(out, "-a {key} -r {} -m -w {}", d.addr, d.weight);
            }
        }
        out
    }

    /// Pretends `addr` of `key` has `active` established connections.
    pub fn set_active(&mut self, key: &ServiceKey, addr: &SocketAddr, active: u32) {
        if let Some(d) = self.table.get_mut(key).and_then(|(_, d)| d.get_mut(addr)) {
            d.active = active;
        }
    }
}

impl Ipvs for FakeIpvs {
    fn services(&mut self) -> Result<Vec<Service>, SocketError> {
        Ok(self.table.iter().map(|(key, (spec, _))| Service { key: *key, spec: spec.clone() }).collect())
    }

    fn dests(&mut self, key: &ServiceKey) -> Result<Vec<DestStatus>, SocketError> {
        let (_, dests) = self.table.get(key).ok_or_else(|| Self::missing(format!("list {key}")))?;
        Ok(dests.values().copied().collect())
    }

    fn add_service(&mut self, key: &ServiceKey, spec: &ServiceSpec) -> Result<(), SocketError> {
        if self.table.contains_key(key) {
            return Err(Self::exists(format!("add {key}")));
        }
        self.table.insert(*key, (spec.clone(), BTreeMap::new()));
        self.log.push(format!("-A {key} -s {}", spec.scheduler));
        Ok(())
    }

    fn edit_service(&mut self, key: &ServiceKey, spec: &ServiceSpec) -> Result<(), SocketError> {
        let (s, _) = self.table.get_mut(key).ok_or_else(|| Self::missing(format!("edit {key}")))?;
        *s = spec.clone();
        self.log.push(format!("-E {key} -s {}", spec.scheduler));
        Ok(())
    }

    fn del_service(&mut self, key: &ServiceKey) -> Result<(), SocketError> {
        if self.table.remove(key).is_some() {
            self.log.push(format!("-D {key}"));
        }
        Ok(())
    }

    fn add_dest(&mut self, key: &ServiceKey, dest: &Dest) -> Result<(), SocketError> {
        let what = || format!("add {} to {key}", dest.addr);
        let (_, dests) = self.table.get_mut(key).ok_or_else(|| Self::missing(what()))?;
        if dests.contains_key(&dest.addr) {
            return Err(Self::exists(what()));
        }
        let status = DestStatus {
            addr: dest.addr,
            weight: dest.weight,
            forward: netlink::FWD_MASQ,
            active: 0,
            inactive: 0,
            persistent: 0,
        };
        dests.insert(dest.addr, status);
        self.log.push(format!("-a {key} -r {} -w {}", dest.addr, dest.weight));
        Ok(())
    }

    fn edit_dest(&mut self, key: &ServiceKey, dest: &Dest) -> Result<(), SocketError> {
        let what = || format!("edit {} of {key}", dest.addr);
        let (_, dests) = self.table.get_mut(key).ok_or_else(|| Self::missing(what()))?;
        let d = dests.get_mut(&dest.addr).ok_or_else(|| Self::missing(what()))?;
        d.weight = dest.weight;
        self.log.push(format!("-e {key} -r {} -w {}", dest.addr, dest.weight));
        Ok(())
    }

    fn del_dest(&mut self, key: &ServiceKey, addr: &SocketAddr) -> Result<(), SocketError> {
        if let Some((_, dests)) = self.table.get_mut(key)
            && dests.remove(addr).is_some()
        {
            self.log.push(format!("-d {key} -r {addr}"));
        }
        Ok(())
    }

    fn timeouts(&mut self) -> Result<Timeouts, SocketError> {
        Ok(self.timeouts)
    }

    fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<(), SocketError> {
        self.timeouts = timeouts.applied_to(&self.timeouts);
        // As sent: 0 stands for "unchanged".
        self.log.push(format!("--set {timeouts}"));
        Ok(())
    }
}
