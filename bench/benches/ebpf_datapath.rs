//! eBPF data-path benchmarks (root): the per-packet cost of ferry's TC programs with 10,000
//! services loaded, measured by BPF_PROG_TEST_RUN with `repeat` (the kernel's own timer), and
//! the cost of writing the maps: one endpoint change, and a full load of 10,000 services × 10
//! endpoints.
//!
//! Run: `cargo bench -p ferry-bench --bench ebpf_datapath` as root (add `-- per_packet` to
//! filter). Nothing is attached anywhere: the programs are only loaded, their maps pinned
//! under a bpffs mounted on a temporary directory and unmounted afterwards.

#[path = "../../tests/tests/ebpf_common/mod.rs"]
mod ebpf_common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::programs::{TestRun as _, TestRunOptions};
use criterion::{Criterion, criterion_group, criterion_main};
use ebpf_common::{Bpffs, Frame, PortPlan, plan_of};
use proxy::backend::ebpf::kernel::Kernel;
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

/// Runs `program` on `frame` `iters` times in the kernel; the kernel reports the mean.
fn run(kernel: &Kernel, program: &str, frame: &Frame, iters: u64) -> Duration {
    let prog = kernel.tc_program(program).expect("program");
    let mut out = vec![0u8; frame.0.len() + 256];
    let mut left = iters;
    let mut total = Duration::ZERO;
    while left > 0 {
        let repeat = left.min(1_000_000) as u32;
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame.0),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        total += r.duration * repeat;
        left -= u64::from(repeat);
    }
    total
}

fn per_packet(c: &mut Criterion) {
    let plan = plan_of(&ports(SERVICES));
    let (_fs, kernel, _state) = loaded("bench_per_packet", &plan);
    let client = Ipv4Addr::new(10, 0, 1, 2);
    let vip = Ipv4Addr::new(10, 96, 20, 5);
    let syn = Frame::tcp4(client, 40000, vip, 80, Frame::SYN);
    // The first run creates the connection entry; the frames below then hit it.
    run(&kernel, programs::TC_INGRESS, &syn, 1);
    let ack = Frame::tcp4(client, 40000, vip, 80, Frame::ACK);
    let miss = Frame::tcp4(client, 40000, Ipv4Addr::new(192, 0, 2, 1), 80, Frame::ACK);
    let mut arp = miss.clone();
    arp.0[12..14].copy_from_slice(&[0x08, 0x06]);
    let reply = Frame::tcp4(Ipv4Addr::new(10, 0, 1, 10), 8080, client, 40000, Frame::ACK);
    let mut g = c.benchmark_group("ebpf_per_packet_10k_services");
    for (name, program, frame) in [
        ("ingress_established", programs::TC_INGRESS, &ack),
        ("ingress_not_a_service", programs::TC_INGRESS, &miss),
        ("ingress_non_ip_floor", programs::TC_INGRESS, &arp),
        ("egress_reply_lookup", programs::TC_EGRESS, &reply),
    ] {
        g.bench_function(name, |b| b.iter_custom(|iters| run(&kernel, program, frame, iters)));
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
