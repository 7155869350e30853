#!/usr/bin/env bash
# Measures ferry's real kernel apply with the nftables backend inside a throwaway network
# namespace (never the root namespace): first full sync at N services x 10 endpoints, then
# one endpoint change of one service, and ferry's peak RSS.
# Usage (root): bench/scripts/kernel-apply.sh [N...]      default: 1000 10000
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet -p proxy --bin ferry
FERRY=target/release/ferry
NS="ferry-bench-$$"
DIR=$(mktemp -d)
PID=""
cleanup() {
    if [ -n "$PID" ]; then
        kill "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
printf "%-10s %-16s %-22s %-12s\n" services full_sync_ms one_endpoint_sync_ms peak_rss_MiB
for N in "${@:-1000 10000}"; do
    for n in $N; do
        ip netns add "$NS"
        rm -f "$DIR"/*.yaml
        python3 bench/scripts/gen-manifests.py "$n" 10 "$DIR/svc.yaml"
        ip netns exec "$NS" "$FERRY" run --manifests "$DIR" --node-name node --node-ip 192.168.0.10 \
            --cluster-cidr 10.0.0.0/8 --service-cidr 10.96.0.0/12 --min-sync-period 100ms --sync-period 1h \
            >"$DIR/log" 2>&1 &
        PID=$!
        until grep -q " synced" "$DIR/log"; do sleep 0.1; kill -0 $PID; done
        full=$(grep " synced" "$DIR/log" | head -1 | grep -oP 'took_ms=\K[0-9.]+')
        python3 bench/scripts/gen-manifests.py "$n" 10 "$DIR/svc.yaml.tmp" 1 && mv "$DIR/svc.yaml.tmp" "$DIR/svc.yaml"
        until [ "$(grep -c " synced" "$DIR/log")" -ge 2 ]; do sleep 0.1; kill -0 $PID; done
        one=$(grep " synced" "$DIR/log" | sed -n 2p | grep -oP 'took_ms=\K[0-9.]+')
        rss=$(awk '/VmHWM/ {printf "%.0f", $2/1024}' /proc/$PID/status)
        kill $PID; wait $PID 2>/dev/null || true; PID=""
        ip netns exec "$NS" nft list tables >/dev/null
        ip netns del "$NS"
        printf "%-10s %-16s %-22s %-12s\n" "$n" "$full" "$one" "$rss"
    done
done
