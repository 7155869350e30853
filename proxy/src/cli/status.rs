//! `ferry status`: asks the running daemon's admin endpoint what it has programmed and prints it
//! as tables, or as the endpoint's JSON with `-o json`.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use crate::admin::{DEFAULT_ADMIN_ADDRESS, StatusReport};
use crate::httpd::{self, ListenAddr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The daemon's --admin-address: IP:PORT or unix:/PATH.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN_ADDRESS)]
    pub admin: String,
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Output,
    /// How long to wait for the daemon.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = super::run::humantime_duration)]
    pub timeout: Duration,
}

pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let addr: ListenAddr = args.admin.parse().map_err(|e| anyhow::anyhow!("--admin: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (code, body) = rt
        .block_on(httpd::get(&addr, "/status", args.timeout))
        .with_context(|| format!("is `ferry run` serving its admin endpoint on {addr}? (--admin-address)"))?;
    if !code.is_success() {
        bail!("{addr} answered {code}: {}", body.trim());
    }
    let report: StatusReport = serde_json::from_str(&body)
        .with_context(|| format!("{addr} answered something else than a status"))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => print!("{}", format_text(&report)),
    }
    Ok(())
}

/// The report as tables for people.
pub fn format_text(r: &StatusReport) -> String {
    let mut out = String::new();
    let health = match (r.healthy, r.node_eligible) {
        (true, true) => "healthy",
        (true, false) => "healthy, but the node is going away (/healthz 503)",
        (false, _) => "UNHEALTHY: changes wait too long for a sync",
    };
    let _ = writeln!(out, "ferry {} on node {}, backend {}: {health}", r.version, r.node, r.backend);
    let _ = writeln!(
        out,
        "started {}, last synced {}; {} services, {} service ports",
        r.started,
        r.last_synced.as_deref().unwrap_or("never"),
        r.services,
        r.service_ports.len()
    );

    out.push('\n');
    let mut rows =
        vec![row(&["SERVICE", "PORT", "FAMILY", "FRONTENDS", "ENDPOINTS", "LOCAL", "POLICY (int/ext)"])];
    for p in &r.service_ports {
        let port = if p.port.is_empty() { p.protocol.clone() } else { format!("{}/{}", p.port, p.protocol) };
        rows.push(vec![
            p.service.clone(),
            port,
            p.family.clone(),
            p.frontends.join(", "),
            p.endpoints.to_string(),
            p.local_endpoints.to_string(),
            format!("{}/{}", p.internal_policy, p.external_policy),
        ]);
    }
    table(&mut out, &rows);

    if !r.health_check_node_ports.is_empty() {
        out.push('\n');
        let mut rows = vec![row(&["HEALTH CHECK NODE PORT", "SERVICE", "LOCAL ENDPOINTS", "LISTENING"])];
        for h in &r.health_check_node_ports {
            let answer = if h.local_endpoints > 0 { "yes (200)" } else { "yes (503)" };
            rows.push(vec![
                h.port.to_string(),
                h.service.clone(),
                h.local_endpoints.to_string(),
                if h.listening { answer.to_owned() } else { "NO (bind failed)".to_owned() },
            ]);
        }
        table(&mut out, &rows);
    }

    out.push('\n');
    let mut rows = vec![row(&["SYNC STARTED", "KIND", "RESULT", "DURATION", "OPERATIONS", "CHANGED"])];
    for s in r.syncs.iter().rev() {
        rows.push(vec![
            s.time.clone(),
            s.kind.clone(),
            match &s.error {
                None => "ok".to_owned(),
                Some(e) => format!("failed: {e}"),
            },
            format!("{:.1}ms", s.duration_seconds * 1e3),
            s.operations.to_string(),
            s.changed.to_string(),
        ]);
    }
    table(&mut out, &rows);

    if let Some(programmed) = &r.programmed {
        let _ = writeln!(out, "\nPROGRAMMED (read back from the kernel, backend {})", r.backend);
        out.push_str(programmed);
        if !programmed.ends_with('\n') {
            out.push('\n');
        }
    }

    if !r.skipped.is_empty() {
        out.push('\n');
        let mut rows = vec![row(&["SKIPPED OBJECT", "REASON", "DETAIL"])];
        for s in &r.skipped {
            rows.push(vec![s.object.clone(), s.reason.clone(), s.detail.clone()]);
        }
        table(&mut out, &rows);
    }
    out
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Left-aligned columns two spaces apart; the last column is not padded.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{HealthCheckStatus, PortStatus, SyncRecord};

    #[test]
    fn the_text_report_has_a_row_per_service_port_and_sync() {
        let r = StatusReport {
            node: "node-a".into(),
            backend: "nftables".into(),
            version: "0.1.0".into(),
            started: "2025-01-01T00:00:00Z".into(),
            now: "2025-01-01T00:01:00Z".into(),
            healthy: true,
            node_eligible: true,
            last_synced: Some("2025-01-01T00:00:59Z".into()),
            services: 1,
            service_ports: vec![PortStatus {
                service: "e2e/web".into(),
                port: "http".into(),
                protocol: "TCP".into(),
                family: "IPv4".into(),
                frontends: vec!["10.96.0.10:80".into(), "*:30080 (NodePort)".into()],
                endpoints: 3,
                local_endpoints: 2,
                internal_policy: "Cluster".into(),
                external_policy: "Local".into(),
            }],
            syncs: vec![SyncRecord {
                time: "2025-01-01T00:00:59Z".into(),
                kind: "full".into(),
                ok: true,
                duration_seconds: 0.0042,
                operations: 17,
                changed: 2,
                error: None,
            }],
            health_check_node_ports: vec![HealthCheckStatus {
                service: "e2e/web".into(),
                port: 32000,
                local_endpoints: 2,
                listening: true,
            }],
            skipped: vec![],
            programmed: Some("# SERVICES (1 entries)\n10.96.0.10:80/tcp service=1 set=1x3 flags=-\n".into()),
        };
        let text = format_text(&r);
        assert!(
            text.contains("PROGRAMMED (read back from the kernel, backend nftables)\n# SERVICES"),
            "{text}"
        );
        assert!(text.starts_with("ferry 0.1.0 on node node-a, backend nftables: healthy\n"), "{text}");
        let line = text.lines().find(|l| l.starts_with("e2e/web")).unwrap();
        let cells: Vec<&str> = line.split("  ").filter(|c| !c.is_empty()).map(str::trim).collect();
        assert_eq!(
            cells,
            ["e2e/web", "http/TCP", "IPv4", "10.96.0.10:80, *:30080 (NodePort)", "3", "2", "Cluster/Local"]
        );
        assert!(text.lines().any(|l| l.starts_with("32000") && l.ends_with("yes (200)")), "{text}");
        assert!(
            text.lines().any(|l| l.starts_with("2025-01-01T00:00:59Z  full  ok") && l.contains("4.2ms")),
            "{text}"
        );
    }
}
