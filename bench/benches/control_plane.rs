//! Control-plane benchmarks: plan build, incremental re-plan, nftables compilation (full, one
//! endpoint change, one service add), and the eBPF backend's map diff.
//!
//! Run: `cargo bench -p ferry-bench --bench control_plane` (add `-- plan` to filter).
//! Shapes follow kube-proxy's BenchmarkSyncProxyRules: ClusterIP services, one TCP port,
//! 10 ready endpoints each. Every benchmark checks its output so a broken compiler can't look fast.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ferry_bench::{RecordingRunner, config, service, slice, store};
use proxy::backend::Backend;
use proxy::backend::ebpf::{self, maps::FakeMaps};
use proxy::backend::nftables::NftBackend;
use proxy::plan::{self, NodeConfig, PlanDiff, Planner};
use proxy::store::{Store, StoreEvent};

// kube-proxy's BenchmarkSyncProxyRules sizes (100, 1,000, 5,000) and ferry's targets (10,000, 50,000).
const SIZES: [usize; 5] = [100, 1_000, 5_000, 10_000, 50_000];
const ENDPOINTS: usize = 10;

/// `n` synthetic services in a store, planned once: the starting point of every incremental case.
fn planned(n: usize) -> (Store, NodeConfig, Planner, PlanDiff) {
    let mut s = store(n, ENDPOINTS);
    let cfg = config();
    let mut planner = Planner::new();
    let initial = s.take_changes();
    let diff = planner.update(&s, &cfg, &initial);
    (s, cfg, planner, diff)
}

fn plan_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("plan_build");
    g.sample_size(10);
    for n in SIZES {
        let s = store(n, ENDPOINTS);
        let cfg = config();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let p = plan::build(black_box(&s), &cfg);
                assert_eq!(p.ports.len(), n);
                p
            })
        });
    }
}

fn replan_one_endpoint_change(c: &mut Criterion) {
    let mut g = c.benchmark_group("replan_one_endpoint_change");
    for n in SIZES {
        let (mut s, cfg, mut planner, _) = planned(n);
        let mut generation = 0;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                generation = (generation + 1) % 2;
                s.handle(StoreEvent::Apply(slice(7, ENDPOINTS, generation)));
                let changes = s.take_changes();
                let diff = planner.update(&s, &cfg, &changes);
                assert_eq!(diff.changed.len(), 1);
                diff
            })
        });
    }
}

fn nft_compile_full(c: &mut Criterion) {
    let mut g = c.benchmark_group("nft_compile_full");
    g.sample_size(10);
    for n in SIZES {
        let s = store(n, ENDPOINTS);
        let cfg = config();
        let p = plan::build(&s, &cfg);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let runner = RecordingRunner::default();
                let scripts = runner.scripts.clone();
                let mut backend = NftBackend::new(Box::new(runner));
                let report = backend.sync(&p, None, &cfg).expect("recording runner cannot fail");
                assert!(report.operations >= n * (ENDPOINTS + 1));
                let len = scripts.lock().map(|s| s[0].len()).unwrap_or(0);
                assert!(len > n * 50, "script too short for {n} services");
                len
            })
        });
    }
}

fn nft_compile_incremental(c: &mut Criterion) {
    let mut g = c.benchmark_group("nft_compile_one_endpoint_change");
    for n in SIZES {
        let (mut s, cfg, mut planner, diff) = planned(n);
        let mut backend = NftBackend::new(Box::new(RecordingRunner::default()));
        backend.sync(planner.plan(), Some(&diff), &cfg).expect("recording runner cannot fail");
        let mut generation = 0;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                generation = (generation + 1) % 2;
                s.handle(StoreEvent::Apply(slice(7, ENDPOINTS, generation)));
                let changes = s.take_changes();
                let diff = planner.update(&s, &cfg, &changes);
                let report = backend.sync(planner.plan(), Some(&diff), &cfg).expect("no kernel");
                // Every endpoint address moved: each of the 10 slot entries is replaced, and
                // the hairpin set changes for the local ones.
                assert!(report.operations >= ENDPOINTS && !report.full, "{report:?}");
                report
            })
        });
    }
}

/// One new service (a Service and its slice) planned and compiled; removing it again, so every
/// sample starts from the same table, is not timed.
fn nft_compile_one_service_add(c: &mut Criterion) {
    let mut g = c.benchmark_group("nft_compile_one_service_add");
    for n in SIZES {
        let (mut s, cfg, mut planner, diff) = planned(n);
        let mut backend = NftBackend::new(Box::new(RecordingRunner::default()));
        backend.sync(planner.plan(), Some(&diff), &cfg).expect("recording runner cannot fail");
        let added = service(n);
        let added_ref = added.object_ref();
        let slice_ref = slice(n, ENDPOINTS, 0).object_ref();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    s.handle(StoreEvent::Apply(added.clone()));
                    s.handle(StoreEvent::Apply(slice(n, ENDPOINTS, 0)));
                    let start = Instant::now();
                    let changes = s.take_changes();
                    let diff = planner.update(&s, &cfg, &changes);
                    let report = backend.sync(planner.plan(), Some(&diff), &cfg).expect("no kernel");
                    timed += start.elapsed();
                    // Its frontend, ClusterIP and one slot element per endpoint.
                    assert!(
                        diff.added.len() == 1 && report.operations > ENDPOINTS && !report.full,
                        "{report:?}"
                    );
                    s.handle(StoreEvent::Delete(added_ref.clone()));
                    s.handle(StoreEvent::Delete(slice_ref.clone()));
                    let changes = s.take_changes();
                    let diff = planner.update(&s, &cfg, &changes);
                    assert_eq!(diff.removed.len(), 1);
                    backend.sync(planner.plan(), Some(&diff), &cfg).expect("no kernel");
                }
                timed
            })
        });
    }
}

/// The eBPF backend's share of a one-endpoint change: the map writes computed from the plan
/// diff (a new endpoint set, the frontend flipped to it), applied to in-memory maps — no root,
/// no kernel; the kernel's own cost of a map write is in docs/benchmarks.md (bench-kernel).
fn ebpf_map_diff_one_endpoint_change(c: &mut Criterion) {
    let mut g = c.benchmark_group("ebpf_map_diff_one_endpoint_change");
    for n in SIZES {
        let (mut s, cfg, mut planner, _) = planned(n);
        let mut maps = FakeMaps::default();
        let mut state = ebpf::state::State::new(ebpf::maglev::DEFAULT_TABLE_SIZE);
        state.full(planner.plan(), &cfg, &mut maps).expect("in-memory maps cannot fail");
        assert!(maps.services.0.len() >= n, "every ClusterIP has a frontend entry");
        let mut generation = 0;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                generation = (generation + 1) % 2;
                s.handle(StoreEvent::Apply(slice(7, ENDPOINTS, generation)));
                let changes = s.take_changes();
                let diff = planner.update(&s, &cfg, &changes);
                state.partial(planner.plan(), &diff, &cfg, &mut maps).expect("in-memory maps");
                // A new set of 10 endpoints and the frontend pointing at it.
                assert!(state.operations > ENDPOINTS, "{} map operations", state.operations);
                state.operations
            })
        });
    }
}

criterion_group!(
    benches,
    plan_build,
    replan_one_endpoint_change,
    nft_compile_full,
    nft_compile_incremental,
    nft_compile_one_service_add,
    ebpf_map_diff_one_endpoint_change
);
criterion_main!(benches);
