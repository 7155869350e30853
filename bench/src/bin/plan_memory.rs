//! Memory of the store and the plan for a synthetic cluster (kube-proxy's benchmark shape).
//!
//! Run: `cargo run --release -p ferry-bench --bin plan_memory -- 10000 10`
//! Prints the resident set growth while the store and plan are alive, read from
//! /proc/self/status (VmRSS), so allocator slack is included.

use ferry_bench::{config, service, slice};
use proxy::model::Kind;
use proxy::plan;
use proxy::store::{Store, StoreEvent};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let services: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let endpoints: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let before = rss_kib();
    let mut store = Store::new();
    // Objects are fed one by one, as a watch delivers them, so the API objects themselves are
    // not all alive at once: what stays is ferry's own state.
    store.handle(StoreEvent::Replace { kinds: vec![Kind::Service, Kind::EndpointSlice], objects: vec![] });
    for i in 0..services {
        store.handle(StoreEvent::Apply(service(i)));
        store.handle(StoreEvent::Apply(slice(i, endpoints, 0)));
    }
    let after_store = rss_kib();
    let p = plan::build(&store, &config());
    let after_plan = rss_kib();
    assert!(p.ports.len() >= services / 2, "plan has {} ports", p.ports.len());
    println!(
        "services={services} endpoints={endpoints} store_MiB={:.1} plan_MiB={:.1} total_MiB={:.1}",
        (after_store - before) as f64 / 1024.0,
        (after_plan - after_store) as f64 / 1024.0,
        (after_plan - before) as f64 / 1024.0
    );
}
