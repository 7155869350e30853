//! The guest kernel: Debian's kernel package, downloaded with `apt-get download` and extracted
//! (never installed on this machine), its modules indexed with `depmod`, and the uncompressed
//! `vmlinux` taken out of the bzImage, because QEMU's microvm boots an ELF kernel (PVH entry)
//! and the XZ decompressor inside the bzImage is slow under TCG.
//!
//! Cached under `<tools>/vm/kernel/<package>_<version>/`, keyed by the package version apt
//! resolves today, so a security update brings a new kernel at the next run and the old one is
//! removed. When apt cannot answer (no package lists, no network), the newest cached kernel of
//! the package is used.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{capture, run_quiet};

/// Marks a cache entry as complete; written last.
const COMPLETE: &str = "complete";
/// The start of an XZ stream: its magic bytes followed by the first flag byte (always 0).
const XZ_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0x00];
/// An ELF file starts with these.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The binary package the kernel came from, e.g. `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// Its Debian version, e.g. `6.1.192-2`.
    pub version: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`: the directory under `lib/modules`.
    pub release: String,
    /// The extracted package (`boot/`, `lib/modules/<release>/` with `modules.dep`).
    pub tree: PathBuf,
    /// The uncompressed kernel image.
    pub vmlinux: PathBuf,
}

impl Kernel {
    /// `lib/modules/<release>` inside the extracted tree.
    pub fn modules_dir(&self) -> PathBuf {
        self.tree.join("lib/modules").join(&self.release)
    }

    /// `CONFIG_HZ` from the configuration the package ships.
    pub fn hz(&self) -> Result<u64> {
        let path = self.tree.join("boot").join(format!("config-{}", self.release));
        let config = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        config_hz(&config).with_context(|| format!("no CONFIG_HZ in {}", path.display()))
    }
}

fn config_hz(config: &str) -> Option<u64> {
    config.lines().find_map(|line| line.strip_prefix("CONFIG_HZ=")?.trim().parse().ok())
}

/// Resolves `package` (a metapackage such as `linux-image-amd64`, or a versioned image package)
/// with apt and returns the cached kernel for it, preparing it first if needed.
pub fn prepare(cache: &Path, package: &str) -> Result<Kernel> {
    let root = cache.join("kernel");
    let (real, version) = match resolve(package) {
        Ok(resolved) => resolved,
        Err(e) => {
            // Offline, or apt's lists are gone: a kernel prepared earlier still serves.
            let Some(kernel) = newest_cached(&root, package)? else {
                return Err(e.context(format!("resolving {package} (and no cached kernel for it)")));
            };
            println!("vm: cannot ask apt about {package} ({e:#}); using cached {}", kernel.version);
            return Ok(kernel);
        }
    };
    let dir = root.join(entry_name(&real, &version));
    if dir.join(COMPLETE).exists() {
        return load(&dir, &real, &version);
    }
    let start = Instant::now();
    println!("vm: preparing kernel {real} {version} in {}", dir.display());
    let partial = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    build_entry(&partial, &real, &version)?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&partial, &dir)
        .with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))?;
    remove_other_versions(&root, &real, &version);
    println!("vm: kernel {real} {version} ready in {:.1}s", start.elapsed().as_secs_f64());
    load(&dir, &real, &version)
}

/// Name of the cache entry of one package version (apt versions may hold `:` and `~`).
fn entry_name(package: &str, version: &str) -> String {
    let safe: String = version
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || ".-+".contains(c) { c } else { '_' })
        .collect();
    format!("{package}_{safe}")
}

/// The package that holds the kernel, and its candidate version.
fn resolve(package: &str) -> Result<(String, String)> {
    let depends = capture(Command::new("apt-cache").args(["depends", package]))?;
    let real = image_dependency(&depends).unwrap_or_else(|| package.to_owned());
    let policy = capture(Command::new("apt-cache").args(["policy", &real]))?;
    let Some(version) = candidate_version(&policy) else {
        bail!("apt knows no installable version of {real} (run `apt-get update`?)");
    };
    Ok((real, version))
}

/// The `linux-image-*` package a metapackage depends on, from `apt-cache depends` output:
///
/// ```text
/// linux-image-amd64
///   Depends: linux-image-6.1.0-56-amd64
/// ```
fn image_dependency(depends: &str) -> Option<String> {
    depends.lines().find_map(|line| {
        // `|Depends:` marks an alternative; `<name>` a virtual package.
        let rest = line.trim().trim_start_matches('|').strip_prefix("Depends:")?;
        let name = rest.trim().trim_start_matches('<').trim_end_matches('>');
        name.starts_with("linux-image-").then(|| name.to_owned())
    })
}

/// The `Candidate:` of `apt-cache policy` output, if there is an installable one.
fn candidate_version(policy: &str) -> Option<String> {
    policy.lines().find_map(|line| {
        let version = line.trim().strip_prefix("Candidate:")?.trim();
        (!version.is_empty() && version != "(none)").then(|| version.to_owned())
    })
}

/// Downloads, extracts and indexes one kernel package into `dir`.
fn build_entry(dir: &Path, package: &str, version: &str) -> Result<()> {
    let deb = download(dir, package, version)?;
    let tree = dir.join("tree");
    run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    let release = release_of(&tree)?;
    // Debian's package ships no modules.dep: the postinst runs depmod on install.
    run_quiet(Command::new("depmod").arg("-b").arg(&tree).arg(&release))?;
    let vmlinuz = tree.join("boot").join(format!("vmlinuz-{release}"));
    let image = fs::read(&vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let vmlinux = decompress_bzimage(&image)
        .with_context(|| format!("extracting vmlinux from {}", vmlinuz.display()))?;
    fs::write(dir.join("vmlinux"), vmlinux)?;
    fs::write(dir.join("release"), &release)?;
    fs::write(dir.join(COMPLETE), "")?;
    Ok(())
}

/// `apt-get download package=version` into `dir`; on failure `apt-get update` once and again,
/// because the security archive drops a version as soon as it has a newer one.
fn download(dir: &Path, package: &str, version: &str) -> Result<PathBuf> {
    let try_download = || {
        Command::new("apt-get")
            .current_dir(dir)
            // The download runs as root into a root-owned directory; apt's sandbox user could
            // not write there and would only warn.
            .args(["-o", "APT::Sandbox::User=root", "-q", "download"])
            .arg(format!("{package}={version}"))
            .stdin(Stdio::null())
            .status()
            .context("starting apt-get download")
    };
    if !try_download()?.success() {
        println!("vm: apt-get download failed; updating apt's package lists and trying again");
        run_quiet(Command::new("apt-get").args(["-q", "update"]))?;
        let status = try_download()?;
        ensure!(status.success(), "apt-get download {package}={version} failed: {status}");
    }
    let deb = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"));
    deb.with_context(|| format!("apt-get download left no .deb in {}", dir.display()))
}

/// The one directory under `lib/modules` of an extracted kernel package.
fn release_of(tree: &Path) -> Result<String> {
    let modules = tree.join("lib/modules");
    let mut releases: Vec<String> = fs::read_dir(&modules)
        .with_context(|| format!("reading {} (is this a kernel image package?)", modules.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    ensure!(releases.len() == 1, "expected one kernel release in {}, found {releases:?}", modules.display());
    Ok(releases.remove(0))
}

/// Offset of the first XZ stream in `image`.
pub fn xz_stream_offset(image: &[u8]) -> Option<usize> {
    memchr::memmem::find(image, XZ_MAGIC)
}

/// The uncompressed kernel ELF inside an XZ-compressed bzImage (Debian's `CONFIG_KERNEL_XZ`).
fn decompress_bzimage(image: &[u8]) -> Result<Vec<u8>> {
    let Some(offset) = xz_stream_offset(image) else {
        bail!("no XZ stream in the image (a kernel not compressed with XZ is not supported)");
    };
    // --single-stream: the bzImage goes on after the stream (its size trailer and padding).
    let mut child = Command::new("xz")
        .args(["--decompress", "--stdout", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting xz (apt package xz-utils)")?;
    let mut stdin = child.stdin.take().context("xz stdin")?;
    let input = image[offset..].to_vec();
    // Written from another thread: xz's output pipe fills long before it has read all its input.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().context("waiting for xz")?;
    let _ = writer.join();
    ensure!(
        out.status.success(),
        "xz failed: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    ensure!(out.stdout.starts_with(ELF_MAGIC), "the XZ stream at offset {offset} is not an ELF kernel");
    Ok(out.stdout)
}

fn load(dir: &Path, package: &str, version: &str) -> Result<Kernel> {
    let release = fs::read_to_string(dir.join("release"))
        .with_context(|| format!("reading {}/release", dir.display()))?;
    Ok(Kernel {
        package: package.to_owned(),
        version: version.to_owned(),
        release: release.trim().to_owned(),
        tree: dir.join("tree"),
        vmlinux: dir.join("vmlinux"),
    })
}

/// Complete cache entries, as (package, version, dir).
fn cached(root: &Path) -> Vec<(String, String, PathBuf)> {
    let Ok(entries) = fs::read_dir(root) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(COMPLETE).exists())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            let (package, version) = name.rsplit_once('_')?;
            Some((package.to_owned(), version.to_owned(), p))
        })
        .collect()
}

/// The most recently prepared cached kernel whose package is `package` or one it may have
/// resolved to (`linux-image-amd64` → `linux-image-6.1.0-56-amd64`).
fn newest_cached(root: &Path, package: &str) -> Result<Option<Kernel>> {
    let prefix = package.strip_suffix("-amd64").unwrap_or(package);
    let newest = cached(root)
        .into_iter()
        .filter(|(p, _, _)| p == package || p.starts_with(prefix))
        .max_by_key(|(_, _, dir)| fs::metadata(dir.join(COMPLETE)).and_then(|m| m.modified()).ok());
    newest.map(|(p, v, dir)| load(&dir, &p, &v)).transpose()
}

/// Removes the other cached versions of `package`, and those of the same kernel series under
/// an older ABI name (`linux-image-6.1.0-55-amd64` once `-56` is there): each is ~500 MB.
fn remove_other_versions(root: &Path, package: &str, version: &str) {
    let keep = entry_name(package, version);
    for (p, _, dir) in cached(root) {
        if same_series(&p, package) && dir.file_name().is_some_and(|n| n != keep.as_str()) {
            println!("vm: removing the older kernel {}", dir.display());
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Whether two image packages differ at most in their ABI number
/// (`linux-image-<version>-<abi>-<flavour>`).
fn same_series(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('-').collect(), b.split('-').collect());
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .enumerate()
            .all(|(i, (x, y))| x == y || (i == 3 && x.parse::<u32>().is_ok() && y.parse::<u32>().is_ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_dependency_should_take_the_linux_image_package_of_a_metapackage() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(image_dependency(out).as_deref(), Some("linux-image-6.1.0-56-amd64"));
    }

    #[test]
    fn image_dependency_should_skip_other_dependencies_and_unwrap_alternatives() {
        let out = "linux-image-amd64\n  Depends: kmod\n |Depends: <linux-image-6.1.0-9-amd64-unsigned>\n  \
                   Depends: linux-image-6.1.0-9-amd64\n";
        assert_eq!(image_dependency(out).as_deref(), Some("linux-image-6.1.0-9-amd64-unsigned"));
    }

    #[test]
    fn image_dependency_should_be_none_for_an_image_package_itself() {
        let out = "linux-image-6.1.0-56-amd64\n  Depends: kmod\n  Depends: linux-base\n  \
                   Depends: initramfs-tools\n |Depends: <linux-initramfs-tool>\n";
        assert_eq!(image_dependency(out), None);
    }

    #[test]
    fn candidate_version_should_read_the_policy_candidate() {
        let out = "linux-image-6.1.0-56-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n     \
                   6.1.192-2 500\n";
        assert_eq!(candidate_version(out).as_deref(), Some("6.1.192-2"));
        assert_eq!(candidate_version("x:\n  Installed: (none)\n  Candidate: (none)\n"), None);
        assert_eq!(candidate_version(""), None);
    }

    #[test]
    fn config_hz_should_read_the_tick_rate() {
        assert_eq!(config_hz("CONFIG_HZ_250=y\nCONFIG_HZ=250\n"), Some(250));
        assert_eq!(config_hz("# CONFIG_HZ is not set\n"), None);
    }

    #[test]
    fn same_series_should_differ_only_in_the_abi_number() {
        assert!(same_series("linux-image-6.1.0-55-amd64", "linux-image-6.1.0-56-amd64"));
        assert!(same_series("linux-image-6.1.0-56-amd64", "linux-image-6.1.0-56-amd64"));
        assert!(!same_series("linux-image-6.1.0-56-amd64", "linux-image-6.12.0-56-amd64"));
        assert!(!same_series("linux-image-6.1.0-56-amd64", "linux-image-6.1.0-56-rt-amd64"));
        assert!(!same_series("linux-image-6.1.0-56-amd64", "linux-image-6.1.0-56-cloud"));
    }

    #[test]
    fn entry_name_should_keep_versions_file_system_safe() {
        assert_eq!(entry_name("linux-image-x", "1:6.1.192-2~bpo"), "linux-image-x_1_6.1.192-2_bpo");
    }

    #[test]
    fn xz_stream_offset_should_find_the_magic_after_the_setup_code() {
        let mut image = vec![0u8; 100];
        image[10..14].copy_from_slice(b"\xFD7zX"); // an incomplete magic first
        image.extend_from_slice(XZ_MAGIC);
        image.extend_from_slice(b"payload");
        assert_eq!(xz_stream_offset(&image), Some(100));
        assert_eq!(xz_stream_offset(&image[..103]), None);
    }

    #[test]
    fn decompress_bzimage_should_stop_at_the_end_of_the_xz_stream() {
        let elf = b"\x7fELF rest of a kernel".repeat(1000);
        let mut xz = Command::new("xz")
            .args(["--compress", "--stdout", "--check=crc32"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("xz");
        xz.stdin.take().expect("stdin").write_all(&elf).expect("write");
        let compressed = xz.wait_with_output().expect("xz output").stdout;
        let mut image = b"MZ setup code".repeat(50);
        image.extend_from_slice(&compressed);
        image.extend_from_slice(&[0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0]); // trailer after the stream
        assert_eq!(decompress_bzimage(&image).expect("decompress"), elf);
        assert!(decompress_bzimage(b"no stream here").is_err());
    }
}
