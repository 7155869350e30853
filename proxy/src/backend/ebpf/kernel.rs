//! The kernel side of the eBPF backend: loads ferry's object with its maps pinned under
//! `<bpffs>/ferry/maps`, attaches the TC programs with TCX links pinned under
//! `<bpffs>/ferry/links` (a restarted ferry replaces the program in the same link atomically,
//! so the data path never stops), attaches the socket programs to a cgroup v2 directory, and
//! writes the maps through aya.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::programs::links::{CgroupAttachMode, FdLink, LinkError, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle};
use aya::programs::{CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use proxy_common::{
    AffinityKey, AffinityValue, CtValue, Endpoint, EndpointKey, FlowKey, FrontendKey, FrontendValue,
    MaglevTable, RevNatValue, SockKey, SourceRangeKey, Stat, kernel_skb as kernel_skb_names, maps as m,
    programs,
};

use super::kernel_skb::{self, LinkedObject, NoAccess, SkbAccess};
use super::maps::{Cidr, DataPathMaps, MapError, MapTable, OneValue, SourceRange, WordArray};
use super::{MapSizes, TcHook};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{what}: {message}")]
    Setup { what: String, message: String },
    #[error(transparent)]
    Map(#[from] MapError),
}

fn setup_msg(what: impl Into<String>, message: &str) -> KernelError {
    KernelError::Setup { what: what.into(), message: message.to_owned() }
}

fn setup(what: impl Into<String>, e: impl std::fmt::Display + std::fmt::Debug) -> KernelError {
    // aya's Display often leaves out the errno, which Debug shows.
    KernelError::Setup { what: what.into(), message: format!("{e} ({e:?})") }
}

/// Where ferry keeps its pins inside a bpffs.
pub fn pin_root(bpffs: &Path) -> PathBuf {
    bpffs.join("ferry")
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts a bpffs at `dir` unless one is there already (under `ip netns exec`, /sys is fresh).
#[expect(unsafe_code, reason = "statfs(2) and mount(2) through libc")]
pub fn ensure_bpffs(dir: &Path) -> Result<(), KernelError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    std::fs::create_dir_all(dir).map_err(|e| setup(format!("creating {}", dir.display()), e))?;
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(|e| setup("bpffs path", e))?;
    // SAFETY: a valid C string and a zeroed statfs buffer the call fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Err(setup(format!("statfs {}", dir.display()), io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast, reason = "f_type's width differs between architectures")]
    if st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = c"bpf";
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(fstype.as_ptr(), path.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(setup(format!("mounting bpffs at {}", dir.display()), io::Error::last_os_error()));
    }
    Ok(())
}

/// The interfaces of the calling thread's network namespace (if_nameindex: netlink, so it is
/// right also in a thread that entered another namespace, unlike /sys/class/net).
#[expect(unsafe_code, reason = "if_nameindex(3) through libc")]
pub fn interfaces() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: the array is terminated by a zero entry and freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            names.push(std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

/// Runs `f` on a thread inside the named network namespace (`/run/netns/<name>`), or on the
/// calling thread when `netns` is None.
#[expect(unsafe_code, reason = "setns(2) through libc, on a thread of our own")]
pub fn in_netns<T: Send>(netns: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T, KernelError> {
    let Some(name) = netns else {
        return Ok(f());
    };
    let path = Path::new("/run/netns").join(name);
    let file = File::open(&path).map_err(|e| setup(format!("opening {}", path.display()), e))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: a valid namespace fd; only this thread changes namespace, and it ends
            // when `f` returns.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(setup(format!("entering {}", path.display()), io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| setup_msg("netns thread", "panicked"))?
    })
}

/// Settings fixed when the programs are loaded (read-only globals of the object: the verifier
/// removes the code they switch off).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgramSettings {
    /// `--bypass-netfilter`: translated packets of connections without masquerade go straight
    /// to their next hop, and replies are translated back on ingress (docs/ebpf.md).
    pub bypass_netfilter: bool,
    /// Keep the transport checksum with the `bpf_l4_csum_replace` helpers even where the
    /// kernel lets the programs read the checksum state (see [`super::kernel_skb`]): for
    /// tests and measurements of the path older kernels take.
    pub checksum_helpers_only: bool,
}

/// ferry's loaded object and its maps.
pub struct Kernel {
    ebpf: Ebpf,
    pins: PathBuf,
    maps: KernelMaps,
    sizes: MapSizes,
    /// Interfaces cleared of what an earlier run left on the other TC hook: once per
    /// interface and process, not at every full sync (a new device carries nothing).
    swept: std::collections::HashSet<String>,
    checksums_in_program: bool,
}

/// ferry's embedded object loaded as the running kernel allows (placeholders linked, see
/// [`super::kernel_skb`]), without pins or settings: for tests and tools that load the
/// programs by hand. The raw `ebpf_object::BYTES` do not verify.
pub fn load_object() -> Result<Ebpf, KernelError> {
    let access = kernel_skb::probe(Path::new(kernel_skb::VMLINUX_BTF));
    let mut loader = EbpfLoader::new();
    let linked = link_object(&mut loader, crate::ebpf_object::BYTES, &access);
    loader.load(linked.bytes()).map_err(|e| setup("loading the eBPF object", e))
}

/// Links `object`'s checksum-state placeholders for `access` (see [`super::kernel_skb`]) and
/// sets the globals that go with them; logs which checksum path the programs take.
pub fn link_object<'a>(
    loader: &mut EbpfLoader<'a>,
    object: &[u8],
    access: &'a Result<SkbAccess, NoAccess>,
) -> LinkedObject {
    let linked = kernel_skb::link(object, access.as_ref().ok());
    match access {
        // An object without the placeholder (an older build, compared in measurements) has
        // no globals to set either.
        Ok(_) if linked.placeholders == 0 => {}
        Ok(a) => {
            loader.override_global(kernel_skb_names::IP_SUMMED_OFFSET, &a.ip_summed_offset, true);
            loader.override_global(kernel_skb_names::IP_SUMMED_SHIFT, &a.ip_summed_shift, true);
            tracing::info!(
                kfunc_id = a.kfunc_id,
                ip_summed_offset = a.ip_summed_offset,
                "eBPF programs update transport checksums themselves (they read sk_buff.ip_summed)"
            );
        }
        Err(why) => {
            tracing::info!("eBPF programs update transport checksums with bpf_l4_csum_replace: {why}")
        }
    }
    linked
}

impl Kernel {
    /// Loads the object, reusing the maps pinned under `<bpffs>/ferry/maps` (a restart keeps
    /// connections and the service entries), and loads the TC programs with the default
    /// [`ProgramSettings`].
    pub fn load(bpffs: &Path, sizes: &MapSizes) -> Result<Self, KernelError> {
        Self::load_with(bpffs, sizes, &ProgramSettings::default())
    }

    /// [`Self::load`] with the programs' load-time settings.
    pub fn load_with(
        bpffs: &Path,
        sizes: &MapSizes,
        settings: &ProgramSettings,
    ) -> Result<Self, KernelError> {
        ensure_bpffs(bpffs)?;
        let pins = pin_root(bpffs);
        for dir in ["maps", "links"] {
            let d = pins.join(dir);
            std::fs::create_dir_all(&d).map_err(|e| setup(format!("creating {}", d.display()), e))?;
        }
        super::pins::check_pinned_maps(&pins.join("maps"), crate::ebpf_object::BYTES, sizes)?;
        let mut loader = EbpfLoader::new();
        for name in m::PINNED {
            loader.map_pin_path(name, pins.join("maps").join(name));
        }
        for (name, size) in sizes.entries() {
            loader.map_max_entries(name, size);
        }
        let bypass = u8::from(settings.bypass_netfilter);
        loader.override_global(programs::BYPASS_NETFILTER, &bypass, true);
        let skb_access = if settings.checksum_helpers_only {
            Err(NoAccess::Disabled)
        } else {
            kernel_skb::probe(Path::new(kernel_skb::VMLINUX_BTF))
        };
        let object = link_object(&mut loader, crate::ebpf_object::BYTES, &skb_access);
        let mut ebpf = loader.load(object.bytes()).map_err(|e| setup("loading the eBPF object", e))?;
        for name in [programs::TC_INGRESS, programs::TC_EGRESS] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| setup_msg(name, "missing from the object"))?
                .try_into()
                .map_err(|e| setup(name, e))?;
            prog.load().map_err(|e| setup(format!("verifying {name}"), e))?;
        }
        let maps = KernelMaps::take(&mut ebpf, sizes)?;
        let checksums_in_program = skb_access.is_ok();
        Ok(Self { ebpf, pins, maps, sizes: sizes.clone(), swept: Default::default(), checksums_in_program })
    }

    /// Whether the TC programs update transport checksums themselves (they read the checksum
    /// state, see [`super::kernel_skb`]) rather than through `bpf_l4_csum_replace`.
    pub fn checksums_in_program(&self) -> bool {
        self.checksums_in_program
    }

    pub fn maps(&mut self) -> &mut KernelMaps {
        &mut self.maps
    }

    /// A loaded TC program (`proxy_common::programs::TC_INGRESS`/`TC_EGRESS`), e.g. for
    /// BPF_PROG_TEST_RUN.
    pub fn tc_program(&self, name: &str) -> Option<&SchedClassifier> {
        self.ebpf.program(name).and_then(|p| p.try_into().ok())
    }

    pub fn sizes(&self) -> &MapSizes {
        &self.sizes
    }

    /// The pinned link of one interface and direction.
    fn link_pin(&self, iface: &str, dir: &str) -> PathBuf {
        // bpffs refuses names with dots (VLAN interfaces have them).
        self.pins.join("links").join(format!("tc-{}-{dir}", iface.replace('.', "%")))
    }

    /// Attaches the TC programs to `iface` (ingress and egress) in the calling thread's
    /// namespace through `hook`, replacing the program of ferry's existing attachment
    /// atomically, and removes an attachment ferry left there through the other hook.
    pub fn attach_tc(&mut self, iface: &str, hook: TcHook) -> Result<(), KernelError> {
        let sweep = !self.swept.contains(iface);
        for (name, attach, dir) in TC_PROGRAMS {
            match hook {
                TcHook::Tcx => {
                    self.attach_tcx(iface, name, attach, dir)?;
                    // A filter from a run with --tc-attach=netlink would translate twice.
                    if sweep {
                        detach_filter(iface, name, attach)?;
                    }
                }
                TcHook::Netlink => {
                    self.attach_filter(iface, name, attach)?;
                    // The TCX link of a run with --tc-attach=tcx would translate twice.
                    if sweep {
                        release_link(&self.link_pin(iface, dir))?;
                    }
                }
            }
        }
        self.swept.insert(iface.to_owned());
        Ok(())
    }

    fn classifier(&mut self, name: &str) -> Result<&mut SchedClassifier, KernelError> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| setup_msg(name, "missing from the object"))?
            .try_into()
            .map_err(|e| setup(name, e))
    }

    /// TCX: a link pinned per interface and direction; a restart updates the program inside
    /// the pinned link.
    fn attach_tcx(
        &mut self,
        iface: &str,
        name: &str,
        attach: TcAttachType,
        dir: &str,
    ) -> Result<(), KernelError> {
        let pin = self.link_pin(iface, dir);
        let prog = self.classifier(name)?;
        let replaced = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link = FdLink::from(old).try_into().map_err(|e: LinkError| setup("link", e))?;
                match prog.attach_to_link(link) {
                    Ok(id) => {
                        // The pin keeps the link; dropping our handle leaves it attached.
                        let _ = prog.take_link(id);
                        true
                    }
                    Err(_) => {
                        // A link of a deleted interface of the same name: start afresh.
                        release_link(&pin)?;
                        false
                    }
                }
            }
            Err(_) => false,
        };
        if !replaced {
            let id = prog
                .attach_with_options(iface, attach, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|e| setup(format!("attaching {name} to {iface} (TCX)"), e))?;
            let link = prog.take_link(id).map_err(|e| setup("link", e))?;
            let fd: FdLink = link.try_into().map_err(|e: LinkError| setup("link", e))?;
            fd.pin(&pin).map_err(|e| setup(format!("pinning {}", pin.display()), e))?;
        }
        Ok(())
    }

    /// Netlink: a cls_bpf filter at ferry's priority and handle on the clsact qdisc. The
    /// filter, not this process, holds the program, so the data path outlives ferry; a restart
    /// replaces the program of the same filter in one netlink request.
    fn attach_filter(&mut self, iface: &str, name: &str, attach: TcAttachType) -> Result<(), KernelError> {
        let prog = self.classifier(name)?;
        let ours = SchedClassifierLink::attached(iface, attach, FILTER_PRIORITY, FILTER_HANDLE, None)
            .map_err(|e| setup(format!("looking up {iface}"), e))?;
        // Without NLM_F_CREATE the kernel only replaces: ENOENT when there is no filter yet.
        let id = match prog.attach_to_link(ours) {
            Ok(id) => id,
            Err(replace) => {
                let qdisc = tc::qdisc_add_clsact(iface);
                let options = NlOptions { priority: FILTER_PRIORITY, handle: FILTER_HANDLE, classid: None };
                prog.attach_with_options(iface, attach, TcAttachOptions::Netlink(options)).map_err(|e| {
                    setup_msg(
                        format!("attaching {name} to {iface} (netlink cls_bpf)"),
                        &format!("{e:?}; replacing: {replace:?}; adding clsact: {qdisc:?}"),
                    )
                })?
            }
        };
        let link = prog.take_link(id).map_err(|e| setup("link", e))?;
        // Dropping the link would delete the filter; it must stay when ferry exits or
        // restarts. `ferry cleanup` deletes it by name (detach_filters).
        std::mem::forget(link);
        Ok(())
    }

    /// Loads and attaches the socket programs to the cgroup v2 directory `cgroup`. The links
    /// are pinned; the previous ones (from an earlier run) are replaced after the new ones are
    /// in place.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), KernelError> {
        let dir = File::open(cgroup).map_err(|e| setup(format!("opening cgroup {}", cgroup.display()), e))?;
        for name in [
            programs::CONNECT4,
            programs::CONNECT6,
            programs::SENDMSG4,
            programs::SENDMSG6,
            programs::RECVMSG4,
            programs::RECVMSG6,
            programs::GETPEERNAME4,
            programs::GETPEERNAME6,
        ] {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| setup_msg(name, "missing from the object"))?
                .try_into()
                .map_err(|e| setup(name, e))?;
            prog.load().map_err(|e| setup(format!("verifying {name}"), e))?;
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| setup(format!("attaching {name} to {}", cgroup.display()), e))?;
            let link = prog.take_link(id).map_err(|e| setup("link", e))?;
            let fd: FdLink = link.try_into().map_err(|e: LinkError| setup("link", e))?;
            let pin = self.pins.join("links").join(format!("cgroup-{name}"));
            // bpffs refuses names with dots.
            let fresh = self.pins.join("links").join(format!("cgroup-{name}-new"));
            let _ = std::fs::remove_file(&fresh);
            fd.pin(&fresh).map_err(|e| setup(format!("pinning {}", fresh.display()), e))?;
            // Replacing the old pin releases the old link (and detaches its program).
            std::fs::rename(&fresh, &pin).map_err(|e| setup(format!("renaming {}", fresh.display()), e))?;
        }
        Ok(())
    }

    /// Interfaces with a pinned TC link.
    pub fn attached_interfaces(&self) -> Vec<String> {
        pinned_interfaces(&self.pins)
    }
}

fn pinned_interfaces(pins: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(pins.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("tc-").and_then(|r| r.strip_suffix("-ingress")).map(|i| i.replace('%', "."))
        })
        .collect();
    out.sort();
    out
}

/// ferry's TC programs: (program, hook direction, pin suffix).
const TC_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    (programs::TC_INGRESS, TcAttachType::Ingress, "ingress"),
    (programs::TC_EGRESS, TcAttachType::Egress, "egress"),
];

/// Where ferry's cls_bpf filters sit on the clsact qdisc: first (priority 1), under a handle of
/// their own, so a restart finds them and filters of other tools are never touched.
const FILTER_PRIORITY: u16 = 1;
const FILTER_HANDLE: TcHandle = TcHandle::new(0, 0xfe);

/// Deletes ferry's cls_bpf filter (found by program name) of one direction of `iface`.
fn detach_filter(iface: &str, name: &str, attach: TcAttachType) -> Result<bool, KernelError> {
    match tc::qdisc_detach_program(iface, attach, name) {
        Ok(()) => Ok(true),
        Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(setup(format!("detaching {name} from {iface}"), e)),
    }
}

/// Deletes ferry's cls_bpf filters from every interface of the calling thread's namespace;
/// returns how many there were. The clsact qdiscs stay: other tools may use them.
pub fn detach_filters() -> Result<usize, KernelError> {
    let mut detached = 0;
    for iface in interfaces() {
        for (name, attach, _) in TC_PROGRAMS {
            detached += usize::from(detach_filter(&iface, name, attach)?);
        }
    }
    Ok(detached)
}

/// Removes a pinned link and, before returning, the attachment it holds. Unlinking the pin
/// alone is not enough: since Linux 6.3 the pin's reference goes from a kernel work queue, so
/// the program could stay attached for a moment after the call (a TCX link beside the filter
/// that replaces it would translate twice). Holding a descriptor of our own while unpinning
/// makes our close the last reference, and a close frees the link (and detaches it) in the
/// syscall itself.
fn release_link(pin: &Path) -> Result<(), KernelError> {
    let held = PinnedLink::from_pin(pin).ok();
    let removed = match held {
        Some(link) => link.unpin().map(drop),
        None => std::fs::remove_file(pin),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(setup(format!("removing {}", pin.display()), e)),
    }
}

/// Removes every pin under `<bpffs>/ferry`: links first, each detached before the call returns
/// (release_link), then the maps. What the kernel held goes away once nothing else refers to it.
pub fn remove_pins(bpffs: &Path) -> Result<(), KernelError> {
    let root = pin_root(bpffs);
    for entry in std::fs::read_dir(root.join("links")).into_iter().flatten().flatten() {
        release_link(&entry.path())?;
    }
    match std::fs::remove_dir_all(&root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(setup(format!("removing {}", root.display()), e)),
    }
}

/// A hash map of the object.
pub struct KernelHash<K, V> {
    name: &'static str,
    map: HashMap<MapData, K, V>,
}

impl<K: aya::Pod + Send, V: aya::Pod + Send> MapTable<K, V> for KernelHash<K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        self.map.insert(key, value, 0).map_err(|e| err(self.name, "update", e))
    }
    fn del(&mut self, key: &K) -> Result<(), MapError> {
        match self.map.remove(key) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) if is_enoent(&e) => Ok(()),
            Err(e) => Err(err(self.name, "delete", e)),
        }
    }
    fn keys(&self) -> Result<Vec<K>, MapError> {
        self.map.keys().collect::<Result<_, _>>().map_err(|e| err(self.name, "keys", e))
    }
    fn list(&self) -> Result<Vec<(K, V)>, MapError> {
        self.map.iter().collect::<Result<_, _>>().map_err(|e| err(self.name, "list", e))
    }
}

/// FRONTEND_FILTER: an array, every index exists.
pub struct KernelWords(Array<MapData, u64>);

impl WordArray for KernelWords {
    fn get(&self, index: u32) -> Result<u64, MapError> {
        self.0.get(&index, 0).map_err(|e| err(m::FRONTEND_FILTER, "lookup", e))
    }
    fn set(&mut self, index: u32, word: u64) -> Result<(), MapError> {
        self.0.set(index, word, 0).map_err(|e| err(m::FRONTEND_FILTER, "update", e))
    }
    fn nonzero(&self) -> Result<Vec<(u32, u64)>, MapError> {
        let mut out = Vec::new();
        for index in 0..self.0.len() {
            let word = self.get(index)?;
            if word != 0 {
                out.push((index, word));
            }
        }
        Ok(out)
    }
}

/// SERVICE_CIDRS: one entry.
pub struct KernelServiceCidrs(Array<MapData, proxy_common::ServiceCidrs>);

impl OneValue<proxy_common::ServiceCidrs> for KernelServiceCidrs {
    fn get(&self) -> Result<proxy_common::ServiceCidrs, MapError> {
        self.0.get(&0, 0).map_err(|e| err(m::SERVICE_CIDRS, "lookup", e))
    }
    fn set(&mut self, value: &proxy_common::ServiceCidrs) -> Result<(), MapError> {
        self.0.set(0, value, 0).map_err(|e| err(m::SERVICE_CIDRS, "update", e))
    }
}

/// MAGLEV: values are 256 KiB, passed boxed; `list` reads keys only.
pub struct KernelMaglev(HashMap<MapData, u32, MaglevTable>);

impl MapTable<u32, Box<MaglevTable>> for KernelMaglev {
    #[expect(clippy::needless_borrows_for_generic_args, reason = "a reference avoids a 256 KiB copy")]
    fn put(&mut self, key: &u32, value: &Box<MaglevTable>) -> Result<(), MapError> {
        self.0.insert(key, &**value, 0).map_err(|e| err(m::MAGLEV, "update", e))
    }
    fn del(&mut self, key: &u32) -> Result<(), MapError> {
        match self.0.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if is_enoent(&e) || matches!(e, aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(m::MAGLEV, "delete", e)),
        }
    }
    fn keys(&self) -> Result<Vec<u32>, MapError> {
        self.0.keys().collect::<Result<_, _>>().map_err(|e| err(m::MAGLEV, "keys", e))
    }
    fn list(&self) -> Result<Vec<(u32, Box<MaglevTable>)>, MapError> {
        Err(MapError { map: m::MAGLEV, op: "list", message: "tables are listed by key only".into() })
    }
}

/// An LPM trie keyed by a 16-byte address.
pub struct KernelLpm {
    name: &'static str,
    map: LpmTrie<MapData, [u8; 16], u32>,
}

impl MapTable<Cidr, u32> for KernelLpm {
    fn put(&mut self, key: &Cidr, value: &u32) -> Result<(), MapError> {
        self.map.insert(&Key::new(key.0, key.1), value, 0).map_err(|e| err(self.name, "update", e))
    }
    fn del(&mut self, key: &Cidr) -> Result<(), MapError> {
        match self.map.remove(&Key::new(key.0, key.1)) {
            Ok(()) => Ok(()),
            Err(e) if is_enoent(&e) || matches!(e, aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(self.name, "delete", e)),
        }
    }
    fn keys(&self) -> Result<Vec<Cidr>, MapError> {
        Ok(self.list()?.into_iter().map(|(k, _)| k).collect())
    }
    fn list(&self) -> Result<Vec<(Cidr, u32)>, MapError> {
        let mut out: Vec<(Cidr, u32)> = self
            .map
            .iter()
            .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
            .collect::<Result<_, _>>()
            .map_err(|e| err(self.name, "list", e))?;
        out.sort();
        Ok(out)
    }
}

/// SOURCE_RANGES: keyed by service id and prefix.
pub struct KernelRanges(LpmTrie<MapData, SourceRangeKey, u32>);

fn range_key(r: &SourceRange) -> Key<SourceRangeKey> {
    let (service_id, (prefix, addr)) = *r;
    Key::new(SourceRangeKey::prefix_len(prefix), SourceRangeKey { service_id: service_id.to_be(), addr })
}

impl MapTable<SourceRange, u32> for KernelRanges {
    fn put(&mut self, key: &SourceRange, value: &u32) -> Result<(), MapError> {
        self.0.insert(&range_key(key), value, 0).map_err(|e| err(m::SOURCE_RANGES, "update", e))
    }
    fn del(&mut self, key: &SourceRange) -> Result<(), MapError> {
        match self.0.remove(&range_key(key)) {
            Ok(()) => Ok(()),
            Err(e) if is_enoent(&e) || matches!(e, aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(m::SOURCE_RANGES, "delete", e)),
        }
    }
    fn keys(&self) -> Result<Vec<SourceRange>, MapError> {
        Ok(self.list()?.into_iter().map(|(k, _)| k).collect())
    }
    fn list(&self) -> Result<Vec<(SourceRange, u32)>, MapError> {
        let mut out: Vec<(SourceRange, u32)> = self
            .0
            .iter()
            .map(|r| {
                r.map(|(k, v)| {
                    let d = k.data();
                    ((u32::from_be(d.service_id), (k.prefix_len().saturating_sub(32), d.addr)), v)
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| err(m::SOURCE_RANGES, "list", e))?;
        out.sort();
        Ok(out)
    }
}

fn err(map: &'static str, op: &'static str, e: impl std::fmt::Display) -> MapError {
    MapError { map, op, message: e.to_string() }
}

fn is_enoent(e: &aya::maps::MapError) -> bool {
    if let aya::maps::MapError::SyscallError(s) = e {
        return s.io_error.raw_os_error() == Some(libc::ENOENT);
    }
    false
}

/// The maps userspace writes, plus handles on the programs' own maps for counting.
pub struct KernelMaps {
    services: KernelHash<FrontendKey, FrontendValue>,
    endpoints: KernelHash<EndpointKey, Endpoint>,
    maglev: KernelMaglev,
    node_addrs: KernelHash<[u8; 16], u32>,
    pod_cidrs: KernelLpm,
    dst_policy: KernelLpm,
    source_ranges: KernelRanges,
    frontend_filter: KernelWords,
    service_cidrs: KernelServiceCidrs,
    /// The programs' own maps, only counted (by walking their keys) and dumped.
    pub conntrack: HashMap<MapData, FlowKey, CtValue>,
    pub revnat: HashMap<MapData, FlowKey, RevNatValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub sock_revnat: HashMap<MapData, SockKey, RevNatValue>,
    stats: PerCpuArray<MapData, u64>,
    sizes: MapSizes,
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, KernelError> {
    ebpf.take_map(name).ok_or_else(|| setup_msg(name, "missing from the object"))
}

fn hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<KernelHash<K, V>, KernelError> {
    let map = HashMap::try_from(take(ebpf, name)?).map_err(|e| setup(name, e))?;
    Ok(KernelHash { name, map })
}

fn lpm<K: aya::Pod>(ebpf: &mut Ebpf, name: &'static str) -> Result<LpmTrie<MapData, K, u32>, KernelError> {
    LpmTrie::try_from(take(ebpf, name)?).map_err(|e| setup(name, e))
}

fn lru<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, KernelError> {
    HashMap::try_from(take(ebpf, name)?).map_err(|e| setup(name, e))
}

/// Opens one map pinned under `<bpffs>/ferry/maps`.
fn pinned(bpffs: &Path, name: &'static str, kind: fn(MapData) -> Map) -> Result<Map, KernelError> {
    let path = pin_root(bpffs).join("maps").join(name);
    MapData::from_pin(&path).map(kind).map_err(|e| setup(format!("opening {}", path.display()), e))
}

impl KernelMaps {
    /// The maps a running (or stopped) ferry pinned under `<bpffs>/ferry/maps`, without loading
    /// any program: for inspecting and repairing the data path from outside (tests, tools).
    pub fn open_pinned(bpffs: &Path, sizes: &MapSizes) -> Result<Self, KernelError> {
        fn hash_of<K: aya::Pod, V: aya::Pod>(
            bpffs: &Path,
            name: &'static str,
        ) -> Result<HashMap<MapData, K, V>, KernelError> {
            HashMap::try_from(pinned(bpffs, name, Map::HashMap)?).map_err(|e| setup(name, e))
        }
        fn lru_of<K: aya::Pod, V: aya::Pod>(
            bpffs: &Path,
            name: &'static str,
        ) -> Result<HashMap<MapData, K, V>, KernelError> {
            HashMap::try_from(pinned(bpffs, name, Map::LruHashMap)?).map_err(|e| setup(name, e))
        }
        fn lpm_of<K: aya::Pod>(
            bpffs: &Path,
            name: &'static str,
        ) -> Result<LpmTrie<MapData, K, u32>, KernelError> {
            LpmTrie::try_from(pinned(bpffs, name, Map::LpmTrie)?).map_err(|e| setup(name, e))
        }
        Ok(Self {
            services: KernelHash { name: m::SERVICES, map: hash_of(bpffs, m::SERVICES)? },
            endpoints: KernelHash { name: m::ENDPOINTS, map: hash_of(bpffs, m::ENDPOINTS)? },
            maglev: KernelMaglev(hash_of(bpffs, m::MAGLEV)?),
            node_addrs: KernelHash { name: m::NODE_ADDRS, map: hash_of(bpffs, m::NODE_ADDRS)? },
            pod_cidrs: KernelLpm { name: m::POD_CIDRS, map: lpm_of(bpffs, m::POD_CIDRS)? },
            dst_policy: KernelLpm { name: m::DST_POLICY, map: lpm_of(bpffs, m::DST_POLICY)? },
            source_ranges: KernelRanges(lpm_of(bpffs, m::SOURCE_RANGES)?),
            frontend_filter: KernelWords(
                Array::try_from(pinned(bpffs, m::FRONTEND_FILTER, Map::Array)?)
                    .map_err(|e| setup(m::FRONTEND_FILTER, e))?,
            ),
            service_cidrs: KernelServiceCidrs(
                Array::try_from(pinned(bpffs, m::SERVICE_CIDRS, Map::Array)?)
                    .map_err(|e| setup(m::SERVICE_CIDRS, e))?,
            ),
            conntrack: lru_of(bpffs, m::CONNTRACK)?,
            revnat: lru_of(bpffs, m::REVNAT)?,
            affinity: lru_of(bpffs, m::AFFINITY)?,
            sock_revnat: lru_of(bpffs, m::SOCK_REVNAT)?,
            stats: PerCpuArray::try_from(pinned(bpffs, m::STATS, Map::PerCpuArray)?)
                .map_err(|e| setup(m::STATS, e))?,
            sizes: sizes.clone(),
        })
    }

    fn take(ebpf: &mut Ebpf, sizes: &MapSizes) -> Result<Self, KernelError> {
        let maglev =
            KernelMaglev(HashMap::try_from(take(ebpf, m::MAGLEV)?).map_err(|e| setup(m::MAGLEV, e))?);
        Ok(Self {
            services: hash(ebpf, m::SERVICES)?,
            endpoints: hash(ebpf, m::ENDPOINTS)?,
            maglev,
            node_addrs: hash(ebpf, m::NODE_ADDRS)?,
            pod_cidrs: KernelLpm { name: m::POD_CIDRS, map: lpm(ebpf, m::POD_CIDRS)? },
            dst_policy: KernelLpm { name: m::DST_POLICY, map: lpm(ebpf, m::DST_POLICY)? },
            source_ranges: KernelRanges(lpm(ebpf, m::SOURCE_RANGES)?),
            frontend_filter: KernelWords(
                Array::try_from(take(ebpf, m::FRONTEND_FILTER)?).map_err(|e| setup(m::FRONTEND_FILTER, e))?,
            ),
            service_cidrs: KernelServiceCidrs(
                Array::try_from(take(ebpf, m::SERVICE_CIDRS)?).map_err(|e| setup(m::SERVICE_CIDRS, e))?,
            ),
            conntrack: lru(ebpf, m::CONNTRACK)?,
            revnat: lru(ebpf, m::REVNAT)?,
            affinity: lru(ebpf, m::AFFINITY)?,
            sock_revnat: lru(ebpf, m::SOCK_REVNAT)?,
            stats: PerCpuArray::try_from(take(ebpf, m::STATS)?).map_err(|e| setup(m::STATS, e))?,
            sizes: sizes.clone(),
        })
    }

    /// Deletes the UDP connection entries (and their reply entries) translated to one of
    /// `gone` (endpoints that stopped serving), so the next datagram of such a flow chooses
    /// again instead of following a dead endpoint (kube-proxy clears UDP conntrack entries the
    /// same way). TCP connections are left to end by themselves. Returns how many were deleted.
    pub fn purge_udp_connections(&mut self, gone: &std::collections::HashSet<std::net::SocketAddr>) -> usize {
        use super::maps::ip_of;
        if gone.is_empty() {
            return 0;
        }
        let doomed: Vec<(FlowKey, CtValue)> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                k.protocol == proxy_common::protocol::UDP
                    && gone.contains(&std::net::SocketAddr::new(ip_of(&v.addr), u16::from_be(v.port)))
            })
            .collect();
        for (k, v) in &doomed {
            let reply = FlowKey {
                saddr: v.addr,
                daddr: k.saddr,
                sport: v.port,
                dport: k.sport,
                protocol: k.protocol,
                _pad: [0; 3],
            };
            let _ = self.conntrack.remove(k);
            let _ = self.revnat.remove(&reply);
        }
        doomed.len()
    }

    /// Entries of one of the programs' own maps.
    pub fn connection_count(&self, name: &str) -> usize {
        match name {
            m::CONNTRACK => self.conntrack.keys().count(),
            m::REVNAT => self.revnat.keys().count(),
            m::AFFINITY => self.affinity.keys().count(),
            m::SOCK_REVNAT => self.sock_revnat.keys().count(),
            _ => 0,
        }
    }
}

impl DataPathMaps for KernelMaps {
    fn services(&mut self) -> &mut dyn MapTable<FrontendKey, FrontendValue> {
        &mut self.services
    }
    fn endpoints(&mut self) -> &mut dyn MapTable<EndpointKey, Endpoint> {
        &mut self.endpoints
    }
    fn maglev(&mut self) -> &mut dyn MapTable<u32, Box<MaglevTable>> {
        &mut self.maglev
    }
    fn node_addrs(&mut self) -> &mut dyn MapTable<[u8; 16], u32> {
        &mut self.node_addrs
    }
    fn pod_cidrs(&mut self) -> &mut dyn MapTable<Cidr, u32> {
        &mut self.pod_cidrs
    }
    fn dst_policy(&mut self) -> &mut dyn MapTable<Cidr, u32> {
        &mut self.dst_policy
    }
    fn source_ranges(&mut self) -> &mut dyn MapTable<SourceRange, u32> {
        &mut self.source_ranges
    }
    fn frontend_filter(&mut self) -> &mut dyn WordArray {
        &mut self.frontend_filter
    }
    fn service_cidrs(&mut self) -> &mut dyn OneValue<proxy_common::ServiceCidrs> {
        &mut self.service_cidrs
    }
    fn connection_destinations(&self) -> Result<Vec<[u8; 16]>, MapError> {
        self.conntrack.keys().map(|k| k.map(|k| k.daddr).map_err(|e| err(m::CONNTRACK, "keys", e))).collect()
    }
    fn occupancy(&mut self) -> Vec<(&'static str, usize, u32)> {
        let s = self.sizes.clone();
        let mut out = vec![
            (m::SERVICES, self.services.map.keys().count(), s.services),
            (m::ENDPOINTS, self.endpoints.map.keys().count(), s.endpoints),
            (m::MAGLEV, self.maglev.0.keys().count(), s.maglev),
        ];
        for (name, max) in [
            (m::CONNTRACK, s.conntrack),
            (m::REVNAT, s.revnat),
            (m::AFFINITY, s.affinity),
            (m::SOCK_REVNAT, s.sock_revnat),
        ] {
            out.push((name, self.connection_count(name), max));
        }
        out
    }
    fn stats(&self) -> Vec<u64> {
        Stat::ALL.iter().map(|s| self.stats.get(&s.index(), 0).map(|v| v.iter().sum()).unwrap_or(0)).collect()
    }
}
