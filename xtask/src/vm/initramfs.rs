//! The guest's root file system: an uncompressed cpio archive (nothing to decompress under
//! TCG) holding static busybox, the host's own network tools with every shared library `ldd`
//! names (also those of the test binaries, which stay on the 9p share), the kernel modules,
//! a few files of `/etc`, and `/init`.
//!
//! Host files keep their paths, and `/bin`, `/lib`... are the same symlinks as on the host
//! (merged /usr), so the paths in ELF interpreters and in `ldd`'s output are valid in the guest.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{kernel::Kernel, modules, script};

/// Static busybox from Debian's `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";
/// Host programs every kernel suite drives (`ip netns exec`, nftables, conntrack, TC, bash for
/// the socket tests' `/dev/tcp`), and the host's `sh`: busybox's shell runs its own applets
/// before anything on `PATH` (so `ip` in a busybox `sh -c` would be busybox's), the host's
/// shell runs the real programs.
const REQUIRED_TOOLS: &[&str] = &["ip", "tc", "bridge", "nft", "conntrack", "bash", "sh"];
/// Copied when the host has them.
const OPTIONAL_TOOLS: &[&str] = &["iperf3", "ethtool", "ipvsadm", "ss", "sysctl"];
/// Where host programs are looked for.
const TOOL_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];
/// Top-level directories that are symlinks on a merged-/usr host.
const TOP_LEVEL_LINKS: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// Files of the host's `/etc` that tools read (protocol and service names, iproute2's tables).
const ETC_FILES: &[&str] = &["/etc/protocols", "/etc/services", "/etc/ethertypes", "/etc/iproute2"];

/// What went into the archive, for the log.
pub struct Built {
    pub archive: PathBuf,
    pub bytes: u64,
    pub modules: modules::Staged,
    pub tools: Vec<String>,
}

/// Builds the archive in `work` (a fresh directory) with `init` as `/init`; `extra_binaries`
/// are executables the guest reaches over 9p whose libraries must be in the archive.
pub fn build(work: &Path, kernel: &Kernel, init: &str, extra_binaries: &[PathBuf]) -> Result<Built> {
    let root = work.join("root");
    fs::create_dir_all(&root)?;
    layout(&root)?;

    let busybox_dir = root.join(script::BUSYBOX_DIR.trim_start_matches('/'));
    fs::create_dir_all(&busybox_dir)?;
    fs::copy(BUSYBOX, busybox_dir.join("busybox"))
        .with_context(|| format!("copying {BUSYBOX} (apt package busybox-static)"))?;
    for applet in busybox_applets()? {
        // The applet list names busybox itself.
        if applet != "busybox" {
            symlink("busybox", busybox_dir.join(&applet))?;
        }
    }

    let mut binaries = Vec::new();
    let mut tools = Vec::new();
    for (name, required) in
        REQUIRED_TOOLS.iter().map(|t| (t, true)).chain(OPTIONAL_TOOLS.iter().map(|t| (t, false)))
    {
        match find_tool(name) {
            Some(path) => {
                copy_into(&root, &path)?;
                binaries.push(path);
                tools.push((*name).to_owned());
            }
            None if required => bail!("{name} is not installed on this machine (run `cargo xtask setup`)"),
            None => {}
        }
    }
    binaries.extend(extra_binaries.iter().cloned());
    for library in libraries(&binaries)? {
        copy_into(&root, &library)?;
    }
    for file in ETC_FILES {
        let path = Path::new(file);
        if path.is_dir() {
            copy_dir(path, &root.join(file.trim_start_matches('/')))?;
        } else if path.exists() {
            copy_into(&root, path)?;
        }
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;

    let staged = modules::stage(kernel, &root)?;
    let list = root.join(script::MODULE_LIST.trim_start_matches('/'));
    fs::create_dir_all(list.parent().context("module list path")?)?;
    fs::write(&list, staged.boot.iter().map(|m| format!("{m}\n")).collect::<String>())?;

    let init_path = root.join("init");
    fs::write(&init_path, init)?;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))?;

    let archive = work.join("initramfs.cpio");
    pack(&root, &archive)?;
    let bytes = fs::metadata(&archive)?.len();
    Ok(Built { archive, bytes, modules: staged, tools })
}

/// The directories every Linux root needs, and the host's top-level symlinks.
fn layout(root: &Path) -> Result<()> {
    for dir in ["usr/bin", "usr/sbin", "usr/lib", "etc", "proc", "sys", "dev", "run", "tmp", "root"] {
        fs::create_dir_all(root.join(dir))?;
    }
    for name in TOP_LEVEL_LINKS {
        let host = Path::new("/").join(name);
        match fs::read_link(&host) {
            Ok(target) => {
                // A relative target (`usr/lib`) must exist in the guest too.
                if target.is_relative() {
                    fs::create_dir_all(root.join(&target))?;
                }
                symlink(&target, root.join(name))?;
            }
            Err(_) if host.is_dir() => fs::create_dir_all(root.join(name))?,
            Err(_) => {}
        }
    }
    Ok(())
}

fn busybox_applets() -> Result<Vec<String>> {
    let out = Command::new(BUSYBOX)
        .arg("--list")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {BUSYBOX} --list (apt package busybox-static)"))?;
    ensure!(out.status.success(), "{BUSYBOX} --list failed: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect())
}

fn find_tool(name: &str) -> Option<PathBuf> {
    TOOL_DIRS.iter().map(|dir| Path::new(dir).join(name)).find(|p| p.is_file())
}

/// Copies the host file `path` (following symlinks) to the same path under `root`.
fn copy_into(root: &Path, path: &Path) -> Result<()> {
    let to = root.join(path.strip_prefix("/").unwrap_or(path));
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::copy(path, &to).with_context(|| format!("copying {} into the initramfs", path.display()))?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let path = entry?.path();
        let target = to.join(path.file_name().context("file name")?);
        if path.is_dir() {
            copy_dir(&path, &target)?;
        } else {
            fs::copy(&path, &target).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// The shared libraries (and ELF interpreters) of `binaries`, by `ldd`.
fn libraries(binaries: &[PathBuf]) -> Result<BTreeSet<PathBuf>> {
    let mut all = BTreeSet::new();
    for binary in binaries {
        let out = Command::new("ldd").arg(binary).stdin(Stdio::null()).output().context("running ldd")?;
        let text = String::from_utf8_lossy(&out.stdout);
        // ldd fails for a static binary ("not a dynamic executable"): nothing to copy.
        if !out.status.success() {
            continue;
        }
        let (found, missing) = parse_ldd(&text);
        ensure!(missing.is_empty(), "{} needs libraries this machine lacks: {missing:?}", binary.display());
        all.extend(found);
    }
    Ok(all)
}

/// The library paths in `ldd` output, and the names it could not find. Lines look like
/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`
/// (the interpreter), `linux-vdso.so.1 (0x...)` (in the kernel) or `libx.so => not found`.
pub fn parse_ldd(text: &str) -> (Vec<PathBuf>, Vec<String>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for line in text.lines().map(str::trim) {
        let (name, rest) = match line.split_once("=>") {
            Some((name, rest)) => (name.trim(), rest.trim()),
            None => ("", line),
        };
        if rest.starts_with("not found") {
            missing.push(name.to_owned());
            continue;
        }
        let path = rest.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            found.push(PathBuf::from(path));
        }
    }
    (found, missing)
}

/// Packs `root` into a newc cpio archive (the format the kernel unpacks).
fn pack(root: &Path, archive: &Path) -> Result<()> {
    let out = fs::File::create(archive).with_context(|| format!("creating {}", archive.display()))?;
    // `find .` lists each directory before its contents, as the kernel needs.
    let mut find = Command::new("find")
        .arg(".")
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting find")?;
    let files = find.stdout.take().context("find's output")?;
    let status = Command::new("cpio")
        .args(["--create", "--format=newc", "--quiet", "--owner=0:0"])
        .current_dir(root)
        .stdin(files)
        .stdout(out)
        .status()
        .context("starting cpio (apt package cpio)")?;
    let find_status = find.wait()?;
    ensure!(find_status.success(), "find in {} failed: {find_status}", root.display());
    ensure!(status.success(), "cpio failed: {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_ldd_should_list_libraries_and_the_interpreter_but_not_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibmnl.so.0 => /lib/x86_64-linux-gnu/libmnl.so.0 (0x00007f86)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f86)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f86)\n";
        let (found, missing) = parse_ldd(text);
        assert_eq!(
            found,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libmnl.so.0"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(missing.is_empty());
    }

    #[test]
    fn parse_ldd_should_report_missing_libraries() {
        let (found, missing) = parse_ldd("\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n");
        assert_eq!(found, [PathBuf::from("/lib/libc.so.6")]);
        assert_eq!(missing, ["libfoo.so.1"]);
    }
}
