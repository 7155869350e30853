#!/usr/bin/env python3
"""Writes N ClusterIP services x E ready endpoints (kube-proxy's BenchmarkSyncProxyRules shape)
as one manifest file. Usage: gen-manifests.py N E OUT.yaml [GENERATION]"""
import sys

n, e, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
gen = int(sys.argv[4]) if len(sys.argv) > 4 else 0
with open(out, "w") as f:
    for i in range(n):
        ip = f"10.96.{(i >> 8) & 0xff}.{i & 0xff}"
        f.write(f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n"
                f"spec: {{clusterIP: {ip}, ports: [{{name: p, port: 80, protocol: TCP}}]}}\n")
        eps = []
        for k in range(e):
            m = i * e + k + (gen if i == 0 else 0)
            eps.append(f"{{addresses: [10.{1 + ((m >> 16) & 0x7f)}.{(m >> 8) & 0xff}.{m & 0xff}], nodeName: node}}")
        f.write(f"---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
                f"metadata: {{name: svc-{i}-x, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n"
                f"addressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints: [{', '.join(eps)}]\n")
