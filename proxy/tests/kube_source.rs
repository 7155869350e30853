//! The Kubernetes API source, end to end: the real kube-rs client and kube-runtime watchers,
//! configured through a kubeconfig file, against a fake API server speaking list/watch over
//! HTTP, feeding a real store.
//!
//! Run with `cargo test -p proxy --test kube_source`.

mod support;

use std::time::Duration;

use proxy::model::{Kind, ServiceKey};
use proxy::source::kube::{LABEL_SELECTOR, Options};
use proxy::store::StoreEvent;
use support::*;

const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// A server with services `d/keep` and `d/gone`, each with one slice, and this node.
async fn two_service_cluster() -> FakeApiServer {
    let server = FakeApiServer::start().await;
    server.apply(Resource::Services, service("d", "keep", "10.96.0.10"));
    server.apply(Resource::Services, service("d", "gone", "10.96.0.11"));
    server.apply(Resource::EndpointSlices, slice("d", "keep-1", "keep", &["10.0.1.1"]));
    server.apply(Resource::EndpointSlices, slice("d", "gone-1", "gone", &["10.0.1.2"]));
    server.apply(Resource::Nodes, node(NODE, "z1"));
    server
}

/// `keep` and its endpoints are in the store.
fn keep_is_intact(store: &proxy::store::Store, event: &StoreEvent) {
    let key = ServiceKey::new("d", "keep");
    assert!(store.service(&key).is_some(), "service d/keep vanished after {event:#?}");
    assert_eq!(store.slices_of(&key).count(), 1, "the slice of d/keep vanished after {event:#?}");
}

fn port_of(store: &proxy::store::Store, namespace: &str, name: &str) -> Option<u16> {
    store.service(&ServiceKey::new(namespace, name)).and_then(|s| s.ports.first()).map(|p| p.port)
}

#[tokio::test]
async fn initial_lists_arrive_as_one_replace_per_kind_and_fill_the_store() {
    let server = two_service_cluster().await;
    server.apply(Resource::Nodes, node("node-b", "z2"));
    server.apply(Resource::ServiceCidrs, service_cidr("kubernetes", &["10.96.0.0/16"]));
    let mut h = Harness::start(server).await;

    h.initial_lists().await;

    let mut replaces: Vec<(Vec<Kind>, Vec<String>)> = h.events.iter().filter_map(replace_parts).collect();
    replaces.sort();
    assert_eq!(
        replaces,
        [
            (vec![Kind::Service], vec!["Service d/gone".to_owned(), "Service d/keep".to_owned()]),
            (
                vec![Kind::EndpointSlice],
                vec!["EndpointSlice d/gone-1".to_owned(), "EndpointSlice d/keep-1".to_owned()]
            ),
            (vec![Kind::Node], vec![format!("Node {NODE}")]),
            (vec![Kind::ServiceCIDR], vec!["ServiceCIDR kubernetes".to_owned()]),
        ],
        "one Replace per kind, with exactly the listed objects"
    );
    assert_eq!(h.events.len(), 4, "nothing but the four lists: {:#?}", h.events);
    assert_eq!(h.store.service_count(), 2);
    assert!(h.has_service("d", "keep") && h.has_service("d", "gone"));
    assert_eq!(h.store.slices_of(&ServiceKey::new("d", "keep")).count(), 1);
    assert_eq!(h.store.node().map(|n| n.name.as_str()), Some(NODE));
    assert_eq!(h.store.service_cidrs().map(ToString::to_string).collect::<Vec<_>>(), ["10.96.0.0/16"]);
}

#[tokio::test]
async fn watch_events_added_modified_and_deleted_reach_the_store_and_bookmarks_are_harmless() {
    let mut h = Harness::start(two_service_cluster().await).await;
    h.initial_lists().await;
    h.server.wait_until("the services watch is open", |s| s.live_watches(Resource::Services) == 1).await;

    h.server.apply(Resource::Services, service("d", "new", "10.96.0.12"));
    h.until("d/new is added", |s| has_service(s, "d", "new")).await;
    assert!(matches!(h.events.last(), Some(StoreEvent::Apply(_))), "an ADDED is an Apply");

    h.server.apply(Resource::EndpointSlices, slice("d", "new-1", "new", &["10.0.1.3", "10.0.1.4"]));
    h.until("d/new has endpoints", |s| s.slices_of(&ServiceKey::new("d", "new")).count() == 1).await;

    h.server.bookmark(Resource::Services);
    h.server.bookmark(Resource::EndpointSlices);
    let mut modified = service("d", "new", "10.96.0.12");
    modified["spec"]["ports"][0]["port"] = 8081.into();
    h.server.apply(Resource::Services, modified);
    h.server.bookmark(Resource::Services);
    h.until("d/new's port is modified", |s| port_of(s, "d", "new") == Some(8081)).await;
    assert!(matches!(h.events.last(), Some(StoreEvent::Apply(_))), "a MODIFIED is an Apply");

    h.server.delete(Resource::EndpointSlices, Some("d"), "new-1");
    h.server.delete(Resource::Services, Some("d"), "new");
    h.until("d/new is deleted", |s| {
        !has_service(s, "d", "new") && s.slices_of(&ServiceKey::new("d", "new")).count() == 0
    })
    .await;
    assert!(matches!(h.events.last(), Some(StoreEvent::Delete(_))), "a DELETED is a Delete");

    h.expect_no_event(Duration::from_millis(300)).await;
    assert_eq!(h.events.len(), 4 + 5, "bookmarks make no store events: {:#?}", h.events);
    assert!(h.has_service("d", "keep") && h.has_service("d", "gone"));
    for resource in [Resource::Services, Resource::EndpointSlices] {
        assert_eq!(
            h.server.requests_for(resource, false).len(),
            1,
            "bookmarks cause no relist of {resource:?}"
        );
        assert_eq!(
            h.server.requests_for(resource, true).len(),
            1,
            "bookmarks keep the {resource:?} watch open"
        );
    }
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_the_last_version_seen_without_a_relist() {
    let mut h = Harness::start(two_service_cluster().await).await;
    h.initial_lists().await;
    h.server.wait_until("the services watch is open", |s| s.live_watches(Resource::Services) == 1).await;
    let seen = h.server.apply(Resource::Services, service("d", "before", "10.96.0.13"));
    h.until("d/before is added", |s| has_service(s, "d", "before")).await;

    h.server.hold_watches(Resource::Services);
    assert_eq!(h.server.drop_watches(Resource::Services), 1);
    h.server.wait_until("the services watch reconnects", |s| s.held_watches(Resource::Services) == 1).await;
    h.server.apply(Resource::Services, service("d", "during", "10.96.0.14"));
    h.server.release_watches(Resource::Services);

    h.until_checking("d/during is added", |s| has_service(s, "d", "during"), keep_is_intact).await;
    assert!(
        matches!(h.events.last(), Some(StoreEvent::Apply(_))),
        "a resumed watch replays the change as an Apply"
    );
    let watches = h.server.requests_for(Resource::Services, true);
    assert_eq!(watches.len(), 2, "one watch, then one resumed watch");
    assert_eq!(
        watches[1].param("resourceVersion"),
        Some(seen.to_string().as_str()),
        "resumed from the last version"
    );
    assert_eq!(h.server.requests_for(Resource::Services, false).len(), 1, "no relist");
}

#[tokio::test]
async fn a_dropped_watch_that_cannot_resume_relists_and_services_deleted_meanwhile_vanish_while_others_never_do()
 {
    let mut h = Harness::start(two_service_cluster().await).await;
    h.initial_lists().await;
    h.server.wait_until("the services watch is open", |s| s.live_watches(Resource::Services) == 1).await;

    h.server.hold_watches(Resource::Services);
    assert_eq!(h.server.drop_watches(Resource::Services), 1);
    h.server.wait_until("the services watch reconnects", |s| s.held_watches(Resource::Services) == 1).await;
    h.server.delete(Resource::Services, Some("d"), "gone");
    h.server.apply(Resource::Services, service("d", "fresh", "10.96.0.15"));
    h.server.compact(Resource::Services);
    h.server.release_watches(Resource::Services);

    h.until_checking(
        "the relist removes d/gone and adds d/fresh",
        |s| !has_service(s, "d", "gone") && has_service(s, "d", "fresh"),
        keep_is_intact,
    )
    .await;
    let (kinds, names) = h.events.last().and_then(replace_parts).expect("the relist is one Replace");
    assert_eq!(kinds, [Kind::Service]);
    assert_eq!(names, ["Service d/fresh", "Service d/keep"]);
    assert_eq!(h.server.requests_for(Resource::Services, false).len(), 2, "the 410 Gone led to a relist");
    assert!(h.has_service("d", "keep"));
}

#[tokio::test]
async fn a_410_gone_on_an_open_watch_relists_and_unchanged_services_never_disappear() {
    let mut h = Harness::start(two_service_cluster().await).await;
    h.initial_lists().await;
    h.server.wait_until("the services watch is open", |s| s.live_watches(Resource::Services) == 1).await;

    // Events lost by the server's watch cache: the watch sees neither change, then 410 Gone.
    assert_eq!(h.server.stall_watches(Resource::Services), 1);
    h.server.delete(Resource::Services, Some("d"), "gone");
    h.server.apply(Resource::Services, service("d", "fresh", "10.96.0.15"));
    assert_eq!(h.server.expire_watches(Resource::Services), 1);

    h.until_checking(
        "the relist removes d/gone and adds d/fresh",
        |s| !has_service(s, "d", "gone") && has_service(s, "d", "fresh"),
        keep_is_intact,
    )
    .await;
    let (kinds, _) = h.events.last().and_then(replace_parts).expect("the relist is one Replace");
    assert_eq!(kinds, [Kind::Service]);
    assert_eq!(h.server.requests_for(Resource::Services, false).len(), 2, "the 410 Gone led to a relist");

    // The new watch works.
    h.server
        .wait_until("the services watch is open again", |s| s.live_watches(Resource::Services) == 1)
        .await;
    h.server.delete(Resource::Services, Some("d"), "fresh");
    h.until_checking("d/fresh is deleted", |s| !has_service(s, "d", "fresh"), keep_is_intact).await;
}

#[tokio::test]
async fn a_resumed_watch_refused_with_http_410_starts_over_with_a_relist() {
    let mut h = Harness::start(two_service_cluster().await).await;
    h.initial_lists().await;
    h.server.wait_until("the services watch is open", |s| s.live_watches(Resource::Services) == 1).await;

    h.server.set_gone_style(Resource::Services, GoneStyle::HttpStatus);
    h.server.hold_watches(Resource::Services);
    h.server.drop_watches(Resource::Services);
    h.server.wait_until("the services watch reconnects", |s| s.held_watches(Resource::Services) == 1).await;
    h.server.delete(Resource::Services, Some("d"), "gone");
    h.server.compact(Resource::Services);
    h.server.release_watches(Resource::Services);

    h.until_checking("the relist removes d/gone", |s| !has_service(s, "d", "gone"), keep_is_intact).await;
    assert!(replace_parts(h.events.last().expect("an event")).is_some(), "removed by a relist");
    assert_eq!(h.server.requests_for(Resource::Services, false).len(), 2);
}

#[tokio::test]
async fn services_and_slices_are_watched_with_kube_proxys_label_selector() {
    let server = two_service_cluster().await;
    let other =
        labelled(service("d", "other-proxy", "10.96.0.20"), serde_json::json!({PROXY_NAME_LABEL: "x"}));
    server.apply(Resource::Services, other);
    let mut h = Harness::start(server).await;
    h.initial_lists().await;
    h.server
        .wait_until("the watches are open", |s| s.requests().iter().filter(|r| r.is_watch()).count() == 4)
        .await;

    let expected = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
    assert_eq!(LABEL_SELECTOR, expected);
    for resource in [Resource::Services, Resource::EndpointSlices] {
        for watch in [false, true] {
            let requests = h.server.requests_for(resource, watch);
            assert!(!requests.is_empty(), "{resource:?} watch={watch} was requested");
            for r in requests {
                assert_eq!(r.param("labelSelector"), Some(expected), "{} {:?}", r.path, r.query);
            }
        }
    }
    for r in h.server.requests_for(Resource::Services, true) {
        assert_eq!(r.param("allowWatchBookmarks"), Some("true"), "bookmarks requested: {:?}", r.query);
    }
    for resource in [Resource::Nodes, Resource::ServiceCidrs] {
        for r in h.server.requests().into_iter().filter(|r| r.resource == Some(resource)) {
            assert_eq!(r.param("labelSelector"), None, "{} is not label-filtered", r.path);
        }
    }
    assert!(!h.has_service("d", "other-proxy"), "another proxy's service is not delivered");
    assert_eq!(h.store.service_count(), 2);
}

#[tokio::test]
async fn the_node_watch_selects_this_node_by_name_and_a_to_be_deleted_taint_reaches_the_store() {
    let server = two_service_cluster().await;
    server.apply(Resource::Nodes, node("node-b", "z2"));
    let mut h = Harness::start(server).await;
    h.initial_lists().await;
    h.server.wait_until("the node watch is open", |s| s.live_watches(Resource::Nodes) == 1).await;

    let node_requests: Vec<Request> =
        h.server.requests().into_iter().filter(|r| r.resource == Some(Resource::Nodes)).collect();
    assert!(node_requests.len() >= 2, "a list and a watch: {node_requests:?}");
    for r in &node_requests {
        assert_eq!(r.param("fieldSelector"), Some(format!("metadata.name={NODE}").as_str()), "{:?}", r.query);
    }
    let this = h.store.node().expect("this node is in the store");
    assert_eq!((this.name.as_str(), this.zone(), this.to_be_deleted_taint), (NODE, Some("z1"), false));

    h.server.apply(Resource::Nodes, with_taint(node("node-b", "z2"), "ToBeDeletedByClusterAutoscaler"));
    h.server.apply(Resource::Nodes, with_taint(node(NODE, "z1"), "ToBeDeletedByClusterAutoscaler"));
    h.until("the taint reaches the store", |s| s.node().is_some_and(|n| n.to_be_deleted_taint)).await;
    assert_eq!(h.store.node().map(|n| n.name.as_str()), Some(NODE));
    assert_eq!(h.events.len(), 4 + 1, "node-b's change is not delivered: {:#?}", h.events);
}

#[tokio::test]
async fn a_missing_service_cidr_api_counts_as_empty_and_does_not_stop_the_other_watches() {
    let server = two_service_cluster().await;
    server.set_served(Resource::ServiceCidrs, false);
    let options = Options { api_missing_retry: Duration::from_millis(100) };
    let mut h = Harness::start_with(server, options).await;

    h.initial_lists().await;
    let cidr_lists: Vec<&StoreEvent> = h
        .events
        .iter()
        .filter(|e| matches!(e, StoreEvent::Replace { kinds, .. } if kinds == &[Kind::ServiceCIDR]))
        .collect();
    assert!(
        matches!(cidr_lists[..], [StoreEvent::Replace { objects, .. }] if objects.is_empty()),
        "{cidr_lists:#?}"
    );
    assert_eq!(h.store.service_count(), 2);

    h.server
        .wait_until("ServiceCIDRs are asked for again", |s| {
            s.requests_for(Resource::ServiceCidrs, false).len() >= 3
        })
        .await;
    h.server.apply(Resource::Services, service("d", "new", "10.96.0.12"));
    h.until("the services watch still works", |s| has_service(s, "d", "new")).await;
    assert_eq!(h.events.len(), 4 + 1, "the repeated 404s make no further events: {:#?}", h.events);

    h.server.apply(Resource::ServiceCidrs, service_cidr("kubernetes", &["10.96.0.0/16"]));
    h.server.set_served(Resource::ServiceCidrs, true);
    h.until("ServiceCIDRs arrive once the API is served", |s| s.service_cidrs().count() == 1).await;
}

#[tokio::test]
async fn the_source_stops_when_the_store_side_is_gone() {
    let server = two_service_cluster().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = server.write_kubeconfig(dir.path());
    let client = tokio::time::timeout(STEP, proxy::source::kube::client(Some(&kubeconfig)))
        .await
        .expect("building the client timed out")
        .expect("a client");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(rx);
    let outcome = tokio::time::timeout(STEP, proxy::source::kube::run(client, NODE.to_owned(), tx)).await;
    assert!(matches!(outcome, Ok(Ok(()))), "run ends cleanly: {outcome:?}");
}

#[tokio::test]
async fn a_missing_kubeconfig_is_an_error_naming_the_file() {
    let missing = std::path::Path::new("/nonexistent/ferry-kubeconfig");
    let outcome = tokio::time::timeout(STEP, proxy::source::kube::client(Some(missing))).await;
    let Ok(Err(err)) = outcome else { panic!("expected an error for a missing kubeconfig") };
    assert!(format!("{err:#}").contains("/nonexistent/ferry-kubeconfig"), "{err:#}");
}
