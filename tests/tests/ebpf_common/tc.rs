//! Which TC programs are attached to an interface, through either hook: TCX links (asked
//! through aya, on kernels that have TCX) and cls_bpf filters (listed by `tc filter show`).

use aya::programs::{SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use ferry_sandbox::Netns;

/// The names of the programs attached to `iface` in `ns`, both directions, both hooks; each
/// prefixed with its hook (`tcx:` or `cls_bpf:`), so a test can tell where ferry put them.
pub fn tc_programs(ns: &Netns, iface: &str) -> Vec<String> {
    let mut names = Vec::new();
    let has_tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if has_tcx {
        let owned = iface.to_owned();
        let tcx = ns
            .run(move || {
                let mut found = Vec::new();
                for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
                    let (_, progs) = SchedClassifier::query_tcx(&owned, dir)
                        .unwrap_or_else(|e| panic!("querying the TCX programs of {owned}: {e}"));
                    found.extend(progs.iter().map(|p| format!("tcx:{}", p.name_as_str().unwrap_or("?"))));
                }
                found
            })
            .unwrap_or_else(|e| panic!("entering {ns}: {e}"));
        names.extend(tcx);
    }
    for dir in ["ingress", "egress"] {
        // Without a clsact qdisc there is nothing to list, and tc says so on stderr.
        let text = ns.exec(&["tc", "filter", "show", "dev", iface, dir]).unwrap_or_default();
        names.extend(filter_names(&text).map(|n| format!("cls_bpf:{n}")));
    }
    names
}

/// The program names in `tc filter show` output: a bpf filter line reads
/// `filter protocol all pref 1 bpf chain 0 handle 0xfe tc_ingress direct-action ...`.
fn filter_names(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines().filter(|l| l.contains(" bpf ")).filter_map(|line| {
        let mut words = line.split_whitespace().skip_while(|w| *w != "handle");
        words.nth(2).map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::filter_names;

    #[test]
    fn a_filter_line_names_its_program() {
        let text = "filter protocol all pref 1 bpf chain 0 \n\
                    filter protocol all pref 1 bpf chain 0 handle 0xfe tc_ingress direct-action not_in_hw id 7 tag ab jited \n";
        assert_eq!(filter_names(text).collect::<Vec<_>>(), ["tc_ingress"]);
    }
}
