//! eBPF data-path benchmarks (root): the per-packet cost of ferry's TC programs with 10,000
//! services loaded, timed by the kernel (BPF_PROG_TEST_RUN), and the cost of writing the maps:
//! one endpoint change, and a full load of 10,000 services × 10 endpoints.
//!
//! Each per-packet iteration is one test run with `repeat = 1` on a fresh copy of its frame: with
//! `repeat = N` the kernel runs the program N times on one skb, so a translated packet would be
//! measured once and its translation (a packet to the pod IP) N − 1 times (see
//! `tests/tests/ebpf_common/timing.rs`). The kernel's timer around one run also covers the
//! harness (two clock reads, softirq disable/enable, the call): the `empty_program` row is that
//! floor; a program's own cost is its row minus the floor.
//!
//! Run: `cargo bench -p ferry-bench --bench ebpf_datapath` as root (add `-- per_packet` to
//! filter). Nothing is attached anywhere: the programs are only loaded, their maps pinned
//! under a bpffs mounted on a temporary directory and unmounted afterwards.

#[path = "../../tests/tests/ebpf_common/mod.rs"]
mod ebpf_common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use ebpf_common::timing::{EmptyProgram, pin_to_current_cpu, run_once_ns};
use ebpf_common::{Bpffs, Frame, PortPlan, TestRun, plan_of};
use proxy::backend::ebpf::kernel::{Kernel, ProgramSettings};
use proxy::backend::ebpf::state::State;
use proxy::backend::ebpf::{MapSizes, maglev};
use proxy::plan::{NodeConfig, Plan, PlanDiff};
use proxy_common::programs;

const SERVICES: u32 = 10_000;
const ENDPOINTS: u8 = 10;

fn config() -> NodeConfig {
    NodeConfig::for_test("node", &["192.168.0.10"], &["10.0.0.0/16"])
}

fn ports(n: u32) -> Vec<PortPlan> {
    (0..n)
        .map(|i| {
            let vip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            let eps: Vec<SocketAddr> = (0..ENDPOINTS)
                .map(|e| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, (i % 200) as u8 + 1, 10 + e)), 8080))
                .collect();
            PortPlan::cluster_ip(&format!("svc{i}"), &vip, 80, &eps)
        })
        .collect()
}

fn loaded(test: &str, plan: &Plan) -> (Bpffs, Kernel, State) {
    let fs = Bpffs::mount(test);
    let mut kernel = Kernel::load(fs.path(), &MapSizes::default()).expect("load ferry's eBPF object (root?)");
    let mut state = State::new(maglev::DEFAULT_TABLE_SIZE);
    state.full(plan, &config(), kernel.maps()).expect("fill the maps");
    (fs, kernel, state)
}

/// The kernel-timed durations of `iters` runs, each on a fresh copy of its frame.
fn timed(iters: u64, mut run: impl FnMut() -> u32) -> Duration {
    (0..iters).map(|_| Duration::from_nanos(u64::from(run()))).sum()
}

fn per_packet(c: &mut Criterion) {
    // Criterion times on this thread: one CPU for every row (see `pin_to_current_cpu`).
    pin_to_current_cpu();
    let plan = plan_of(&ports(SERVICES));
    let (fs, kernel, _state) = loaded("bench_per_packet", &plan);
    let client = Ipv4Addr::new(10, 0, 1, 2);
    let vip = Ipv4Addr::new(10, 96, 20, 5);
    // The SYN creates the connection entries; the frames below then hit them.
    let syn = Frame::tcp4(client, 40000, vip, 80, Frame::SYN);
    let endpoint = TestRun::ingress(&kernel, &syn).parse().dst;
    let IpAddr::V4(endpoint_ip) = endpoint.ip() else { panic!("an IPv4 endpoint") };
    let ack = Frame::tcp4(client, 40000, vip, 80, Frame::ACK);
    let miss = Frame::tcp4(client, 40000, Ipv4Addr::new(192, 0, 2, 1), 80, Frame::ACK);
    let mut arp = miss.clone();
    arp.0[12..14].copy_from_slice(&[0x08, 0x06]);
    let reply = Frame::tcp4(endpoint_ip, endpoint.port(), client, 40000, Frame::ACK);
    let stranger = Frame::tcp4(endpoint_ip, endpoint.port(), client, 40001, Frame::ACK);
    // The same programs on the same maps with the checksum helpers only: the path of kernels
    // before 6.2 (where the two kernels are the same path, the rows say so by being equal).
    let settings = ProgramSettings { checksum_helpers_only: true, ..Default::default() };
    let helpers = Kernel::load_with(fs.path(), &MapSizes::default(), &settings).expect("load");
    let empty = EmptyProgram::load();
    let mut g = c.benchmark_group("ebpf_per_packet_10k_services");
    g.bench_function("empty_program_floor", |b| b.iter_custom(|iters| timed(iters, || empty.run_ns(&ack))));
    for (name, program, frame) in [
        ("ingress_established", programs::TC_INGRESS, &ack),
        ("ingress_not_a_service", programs::TC_INGRESS, &miss),
        ("ingress_non_ip", programs::TC_INGRESS, &arp),
        ("egress_reply", programs::TC_EGRESS, &reply),
        ("egress_no_reverse_entry", programs::TC_EGRESS, &stranger),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| timed(iters, || run_once_ns(&kernel, program, frame)))
        });
    }
    for (name, program, frame) in [
        ("ingress_established_checksum_helpers", programs::TC_INGRESS, &ack),
        ("egress_reply_checksum_helpers", programs::TC_EGRESS, &reply),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| timed(iters, || run_once_ns(&helpers, program, frame)))
        });
    }
    g.finish();
}

fn map_updates(c: &mut Criterion) {
    let base = ports(SERVICES);
    let plan = plan_of(&base);
    let (_fs, mut kernel, mut state) = loaded("bench_map_updates", &plan);
    let cfg = config();
    let mut g = c.benchmark_group("ebpf_map_updates");
    g.sample_size(20);
    // One endpoint added to one service, then removed again: each sync writes a new set of
    // that service and flips its frontend (the previous set is deleted one sync later).
    let before = base[42].0.clone();
    let mut after = before.clone();
    after.cluster_endpoints.push("10.0.9.99:8080".parse().expect("addr"));
    let (before, after) = (Arc::new(before), Arc::new(after));
    let mut flip = false;
    g.bench_function("one_endpoint_change", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let (from, to) = if flip { (&after, &before) } else { (&before, &after) };
                flip = !flip;
                let diff = PlanDiff { changed: vec![(from.clone(), to.clone())], ..PlanDiff::default() };
                state.partial(&plan, &diff, &cfg, kernel.maps()).expect("partial sync");
            }
            start.elapsed()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("ebpf_map_full_load");
    g.sample_size(10);
    g.bench_function("10k_services_x10_endpoints", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for i in 0..iters {
                // Fresh maps each time: a first start, nothing to adopt.
                let fs = Bpffs::mount(&format!("bench_full_{i}"));
                let mut k = Kernel::load(fs.path(), &MapSizes::default()).expect("load");
                let mut s = State::new(maglev::DEFAULT_TABLE_SIZE);
                let start = Instant::now();
                s.full(&plan, &cfg, k.maps()).expect("full load");
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, per_packet, map_updates);
criterion_main!(benches);
