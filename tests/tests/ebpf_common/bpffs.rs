//! A bpffs of one test: shared by the eBPF suites and the end-to-end fixture.

use std::path::{Path, PathBuf};

/// A bpffs mounted on a per-test temporary directory; unmounted and removed on drop.
pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    #[expect(unsafe_code, reason = "mount(2) through libc")]
    pub fn mount(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ferry-bpffs-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&path).expect("bpffs directory");
        let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).expect("path");
        // SAFETY: valid C strings, no data.
        let rc = unsafe { libc::mount(c"bpf".as_ptr(), c.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        assert_eq!(rc, 0, "mount bpffs at {}: {}", path.display(), std::io::Error::last_os_error());
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bpffs {
    #[expect(unsafe_code, reason = "umount2(2) through libc")]
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(self.path.to_string_lossy().as_bytes()) {
            // SAFETY: a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
