//! Types shared by ferry's eBPF programs and userspace.
#![no_std]
