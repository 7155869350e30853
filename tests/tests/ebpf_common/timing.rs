//! Per-packet cost of the TC programs, timed by the kernel (BPF_PROG_TEST_RUN), measured so
//! that every timed run sees the packet it is meant to measure.
//!
//! A test run with `repeat = N` builds the skb once and runs the program N times on it
//! (net/bpf/test_run.c): a program that rewrites the packet sees its own output from the second
//! run on. A ClusterIP packet is DNATed by the first run and the other N − 1 runs measure a
//! packet to the pod IP, which is no service (the suite's
//! `a_repeated_test_run_measures_the_packet_its_first_run_rewrote` shows it). So a rewriting
//! path is timed one run per test run (`repeat = 1`, a fresh copy of the frame each time), with
//! the kernel's own timer around that one run. That timer also covers what the harness does
//! around the program (two clock reads, softirq disable/enable, the indirect call): the same
//! measurement of an empty program ([`EmptyProgram`]) is that overhead, reported beside the
//! figures and subtracted from them.

use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use proxy::backend::ebpf::kernel::Kernel;

use super::Frame;

/// Keeps the calling thread on the CPU it is running on, for the rest of its life, and returns
/// that CPU. A test run executes on the caller's CPU; a thread the scheduler moves between
/// CPUs measured the same program up to twice as slow from one process to the next on this
/// 2-vCPU guest (62–114 ns for one `repeat` figure), pinned it repeats within a few ns.
#[expect(unsafe_code, reason = "sched_getcpu and sched_setaffinity through libc")]
pub fn pin_to_current_cpu() -> usize {
    // SAFETY: no arguments; returns the CPU or -1.
    let cpu = unsafe { libc::sched_getcpu() };
    assert!(cpu >= 0, "sched_getcpu: {}", std::io::Error::last_os_error());
    // SAFETY: cpu_set_t is plain data; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (the kernel numbered it); `set` is a valid set.
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(rc, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
    cpu as usize
}

/// `bpf(2)` commands and the program type used here (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// Large enough for the fields set below; the kernel treats the rest as zero.
const ATTR_LEN: usize = 128;

/// A TC program that returns `TC_ACT_OK` at once (`r0 = 0; exit`): its kernel-timed run is the
/// test-run harness's own cost, the floor under every figure.
pub struct EmptyProgram {
    fd: OwnedFd,
}

impl EmptyProgram {
    #[expect(unsafe_code, reason = "bpf(2) BPF_PROG_LOAD through libc: aya loads programs from objects only")]
    pub fn load() -> Self {
        // mov64 r0, 0; exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        let mut attr = [0u8; ATTR_LEN];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
        attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        // SAFETY: `attr` describes buffers that live across the call; the kernel reads ATTR_LEN bytes.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), ATTR_LEN as u32) };
        assert!(fd >= 0, "load an empty TC program: {}", std::io::Error::last_os_error());
        // SAFETY: a new file descriptor the kernel just returned to us.
        Self { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) } }
    }

    /// One kernel-timed run on `frame`, in nanoseconds.
    pub fn run_ns(&self, frame: &Frame) -> u32 {
        self.repeat_ns(frame, 1)
    }

    /// The kernel's average over `repeat` runs on one copy of `frame`, in nanoseconds.
    #[expect(unsafe_code, reason = "bpf(2) BPF_PROG_TEST_RUN through libc")]
    pub fn repeat_ns(&self, frame: &Frame, repeat: u32) -> u32 {
        let mut out = vec![0u8; frame.0.len() + 256];
        let mut attr = [0u8; ATTR_LEN];
        attr[0..4].copy_from_slice(&(self.fd.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&(frame.0.len() as u32).to_ne_bytes());
        attr[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
        attr[16..24].copy_from_slice(&(frame.0.as_ptr() as u64).to_ne_bytes());
        attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
        attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
        // SAFETY: as in `load`; `out` is writable for its whole length.
        let rc =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, attr.as_mut_ptr(), ATTR_LEN as u32) };
        assert_eq!(rc, 0, "test run of the empty program: {}", std::io::Error::last_os_error());
        u32::from_ne_bytes(attr[36..40].try_into().expect("4 bytes"))
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One kernel-timed run of `program` on a fresh copy of `frame` (`repeat = 1`), in nanoseconds.
pub fn run_once_ns(kernel: &Kernel, program: &str, frame: &Frame) -> u32 {
    run_prog_once_ns(kernel.tc_program(program).expect("the TC program is loaded"), frame)
}

/// [`run_once_ns`] for a program of any loaded object.
pub fn run_prog_once_ns(prog: &SchedClassifier, frame: &Frame) -> u32 {
    let mut out = vec![0u8; frame.0.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(&frame.0),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    r.duration.as_nanos() as u32
}

/// The median of `samples` (sorted in place).
pub fn median(samples: &mut [u32]) -> u32 {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Runs each case `per_round` times per round, the cases taking turns round after round (so
/// that a change in the machine's load affects them alike), and returns each case's median.
pub fn interleaved_medians(
    cases: &mut [(&str, &mut dyn FnMut() -> u32)],
    rounds: usize,
    per_round: usize,
) -> Vec<u32> {
    let mut samples: Vec<Vec<u32>> = cases.iter().map(|_| Vec::with_capacity(rounds * per_round)).collect();
    for _ in 0..rounds {
        for (case, out) in cases.iter_mut().zip(samples.iter_mut()) {
            for _ in 0..per_round {
                out.push((case.1)());
            }
        }
    }
    samples.iter_mut().map(|s| median(s)).collect()
}
