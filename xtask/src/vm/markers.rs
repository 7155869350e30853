//! The lines the guest's `/init` prints on the serial console so the host can follow a run:
//! the boot finished, a step started or ended with an exit status, the run ended, or the
//! harness itself failed. [`script`](super::script) writes them, [`parse`] reads them.
//!
//! A marker may follow other text on the same line (a kernel message or a test's output without
//! its newline), so the parser looks for it anywhere in the line.

/// `FERRY-VM-BOOTED <uptime seconds> <kernel release>`: everything is mounted and loaded.
pub const BOOTED: &str = "FERRY-VM-BOOTED";
/// `FERRY-VM-START <step> <name>`.
pub const START: &str = "FERRY-VM-START";
/// `FERRY-VM-END <step> <exit status>`.
pub const END: &str = "FERRY-VM-END";
/// `FERRY-VM-EXIT <status>`: the overall status (the first failing step's), then power off.
pub const EXIT: &str = "FERRY-VM-EXIT";
/// `FERRY-VM-FAILED <what>`: the guest could not prepare itself (a mount failed).
pub const FAILED: &str = "FERRY-VM-FAILED";
/// What the kernel prints when it panics (then the guest hangs or reboots).
const PANIC: &str = "Kernel panic - not syncing";

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Booted { uptime: f64, release: String },
    Start { step: usize, name: String },
    End { step: usize, status: i32 },
    Exit { status: i32 },
    Failed { what: String },
    Panic { message: String },
}

/// The event a serial line carries, if any.
pub fn parse(line: &str) -> Option<Event> {
    if let Some(at) = line.find(PANIC) {
        return Some(Event::Panic { message: line[at..].trim().to_owned() });
    }
    let (marker, rest) = [BOOTED, START, END, EXIT, FAILED].into_iter().find_map(|marker| {
        let at = line.find(marker)?;
        let rest = line[at + marker.len()..].strip_prefix(' ')?;
        Some((marker, rest.trim_end()))
    })?;
    let mut words = rest.splitn(2, ' ');
    let first = words.next().unwrap_or_default();
    let second = words.next().unwrap_or_default().trim();
    match marker {
        BOOTED => Some(Event::Booted { uptime: first.parse().ok()?, release: second.to_owned() }),
        START => Some(Event::Start { step: first.parse().ok()?, name: second.to_owned() }),
        END => Some(Event::End { step: first.parse().ok()?, status: second.parse().ok()? }),
        EXIT => Some(Event::Exit { status: first.parse().ok()? }),
        _ => Some(Event::Failed { what: rest.to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_should_read_each_marker() {
        assert_eq!(
            parse("FERRY-VM-BOOTED 1.23 6.1.0-56-amd64"),
            Some(Event::Booted { uptime: 1.23, release: "6.1.0-56-amd64".into() })
        );
        assert_eq!(
            parse("FERRY-VM-START 2 nftables_e2e --test-threads=1"),
            Some(Event::Start { step: 2, name: "nftables_e2e --test-threads=1".into() })
        );
        assert_eq!(parse("FERRY-VM-END 2 101"), Some(Event::End { step: 2, status: 101 }));
        assert_eq!(parse("FERRY-VM-EXIT 0"), Some(Event::Exit { status: 0 }));
        assert_eq!(
            parse("FERRY-VM-FAILED mount 9p /work/main"),
            Some(Event::Failed { what: "mount 9p /work/main".into() })
        );
    }

    #[test]
    fn parse_should_find_a_marker_after_other_output_on_the_line() {
        assert_eq!(parse("test result: ok.FERRY-VM-END 1 0\r"), Some(Event::End { step: 1, status: 0 }));
        assert_eq!(
            parse("[    3.1] Kernel panic - not syncing: No working init found."),
            Some(Event::Panic { message: "Kernel panic - not syncing: No working init found.".into() })
        );
    }

    #[test]
    fn parse_should_ignore_ordinary_and_malformed_lines() {
        assert_eq!(parse("test a ... ok"), None);
        assert_eq!(parse("FERRY-VM-EXIT"), None);
        assert_eq!(parse("FERRY-VM-EXIT zero"), None);
        assert_eq!(parse("FERRY-VM-END 1"), None);
        assert_eq!(parse("FERRY-VM-EXITED 0"), None);
    }
}
