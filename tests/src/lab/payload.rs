//! What a lab test adds to the guest: files, host binaries with the shared
//! libraries they need, and the payload script `/lab/payload.sh` that the
//! lab's `/init` runs. Written as a cpio archive that is appended to the
//! cached base initramfs (the kernel unpacks concatenated archives in
//! order, later entries replacing earlier ones).
//!
//! Host binaries (bookworm builds) run on the guest's trixie libc and
//! loader. A library the base image already holds (listed in
//! `OUTDIR/base-libs` by `tests/lab/build-lab.sh`: libc, libm, libgcc_s,
//! ...) is taken from the base; every other one is copied from the host
//! with its chain of symbolic links, at the host's canonical (merged-/usr)
//! path. So each library exists once as a file: DPDK's EAL, which loads
//! every plugin in its PMD directory, then never finds a second copy of a
//! library a binary already linked.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use super::cpio;
use super::LabError;

/// Where the payload script goes in the guest.
pub const SCRIPT_PATH: &str = "lab/payload.sh";
/// The guest's library directory (merged /usr).
pub const LIB_DIR: &str = "usr/lib/x86_64-linux-gnu";

/// One entry of the payload, by guest path.
#[derive(Debug, Clone)]
enum Entry {
    Dir,
    /// A host file, copied at archive time.
    HostFile(PathBuf),
    /// Contents given by the test.
    Bytes {
        data: Vec<u8>,
        perm: u32,
    },
    Symlink(String),
}

/// An entry and, for the files and links of a shared library, its soname:
/// left out when the base image has a library of that name.
#[derive(Debug, Clone)]
struct Item {
    entry: Entry,
    library: Option<String>,
}

/// The files one lab run adds to the guest, and its script.
#[derive(Debug, Clone, Default)]
pub struct Payload {
    entries: BTreeMap<String, Item>,
}

impl Payload {
    /// A payload whose `/lab/payload.sh` is `script` (run by dash as
    /// `/bin/sh` after `/etc/lab/lib.sh` helpers are available to source;
    /// its exit status decides the verdict).
    pub fn new(script: &str) -> Payload {
        let mut payload = Payload::default();
        payload.bytes(SCRIPT_PATH, script.as_bytes(), 0o755);
        payload
    }

    fn insert(&mut self, guest: &str, entry: Entry, library: Option<&str>) {
        let item = Item {
            entry,
            library: library.map(str::to_string),
        };
        self.entries.insert(normalize(guest), item);
    }

    /// Add `data` at guest path `guest` (absolute or relative to `/`).
    pub fn bytes(&mut self, guest: &str, data: &[u8], perm: u32) -> &mut Self {
        let data = data.to_vec();
        self.insert(guest, Entry::Bytes { data, perm }, None);
        self
    }

    /// Add the host file `host` at guest path `guest`, keeping its
    /// permission bits. The file is read when the archive is written.
    pub fn file(&mut self, guest: &str, host: &Path) -> &mut Self {
        self.insert(guest, Entry::HostFile(host.to_path_buf()), None);
        self
    }

    /// Add a symbolic link `guest` -> `target`.
    pub fn symlink(&mut self, guest: &str, target: &str) -> &mut Self {
        self.insert(guest, Entry::Symlink(target.to_string()), None);
        self
    }

    /// Add the host executable `host` at guest path `guest` and every shared
    /// library it loads (`ldd` on the host) that the base image lacks.
    pub fn binary(&mut self, guest: &str, host: &Path) -> Result<&mut Self, LabError> {
        self.libraries_of(host)?;
        Ok(self.file(guest, host))
    }

    /// Add the shared libraries `object` (an executable or a library)
    /// needs, as [`Payload::binary`] does.
    pub fn libraries_of(&mut self, object: &Path) -> Result<&mut Self, LabError> {
        for (soname, host) in ldd(object)? {
            // With its chain of links as on the host (libnuma.so.1 ->
            // libnuma.so.1.0.0; librte_bus_vdev.so.23 -> the PMD directory).
            self.add_with_links(&host, Some(&soname))?;
        }
        Ok(self)
    }

    /// Add DPDK plugins from the host's PMD directory
    /// (`/usr/lib/x86_64-linux-gnu/dpdk/pmds-*`), e.g. `net_virtio`,
    /// `mempool_ring`, `bus_vdev`: each `librte_NAME.so.ABI` with its links,
    /// and the libraries it needs. Returns the guest PMD directory.
    pub fn dpdk_plugins(&mut self, names: &[&str]) -> Result<String, LabError> {
        let dir = host_pmd_dir()?;
        for name in names {
            let prefix = format!("librte_{name}.so.");
            let mut found = false;
            let listing = std::fs::read_dir(&dir).map_err(|e| LabError::Payload {
                what: format!("reading {}: {e}", dir.display()),
            })?;
            for item in listing.flatten() {
                let file = item.file_name().to_string_lossy().into_owned();
                // librte_NAME.so.23 (the name EAL loads) and what it links to.
                if let Some(abi) = file.strip_prefix(&prefix) {
                    if !abi.contains('.') {
                        let path = dir.join(&file);
                        self.add_with_links(&path, None)?;
                        self.libraries_of(&path)?;
                        found = true;
                    }
                }
            }
            if !found {
                return Err(LabError::Payload {
                    what: format!(
                        "no DPDK plugin {prefix}ABI in {} (scripts/install-test-deps.sh installs the PMDs)",
                        dir.display()
                    ),
                });
            }
        }
        Ok(normalize(&dir.to_string_lossy()))
    }

    /// Add host `path` at the same guest path; a symbolic link is added as
    /// a link, followed by what it points to (recursively).
    pub fn host_path_with_links(&mut self, path: &Path) -> Result<&mut Self, LabError> {
        self.add_with_links(path, None)
    }

    fn add_with_links(
        &mut self,
        path: &Path,
        library: Option<&str>,
    ) -> Result<&mut Self, LabError> {
        let mut current = canonical_path(path)?;
        for _ in 0..16 {
            let meta = std::fs::symlink_metadata(&current).map_err(|e| LabError::Payload {
                what: format!("{}: {e}", current.display()),
            })?;
            let guest = normalize(&current.to_string_lossy());
            if !meta.file_type().is_symlink() {
                self.insert(&guest, Entry::HostFile(current), library);
                return Ok(self);
            }
            let target = std::fs::read_link(&current).map_err(|e| LabError::Payload {
                what: format!("readlink {}: {e}", current.display()),
            })?;
            let link = Entry::Symlink(target.to_string_lossy().into_owned());
            self.insert(&guest, link, library);
            let parent = current.parent().unwrap_or(Path::new("/"));
            current = canonical_path(&parent.join(&target))?;
        }
        Err(LabError::Payload {
            what: format!("{}: too many levels of symbolic links", path.display()),
        })
    }

    /// The guest paths in the payload, sorted (for messages and tests).
    pub fn paths(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// Write the archive to `out`, leaving out libraries whose soname is in
    /// `base_libs`. Parent directories are added as needed. Returns the
    /// number of bytes written.
    pub fn write_archive(&self, out: &Path, base_libs: &BTreeSet<String>) -> Result<u64, LabError> {
        let fail = |what: String| LabError::Payload { what };
        let file = std::fs::File::create(out)
            .map_err(|e| fail(format!("creating {}: {e}", out.display())))?;
        let mut writer = cpio::Writer::new(std::io::BufWriter::new(file));
        let mut dirs: BTreeSet<String> = BTreeSet::new();
        for (path, item) in &self.entries {
            if item.library.as_ref().is_some_and(|l| base_libs.contains(l)) {
                continue;
            }
            // Ancestors first (they sort before their children anyway, but
            // a file's directory may not be an entry of its own).
            let mut ancestors: Vec<&str> = Vec::new();
            let mut rest = path.as_str();
            while let Some((parent, _)) = rest.rsplit_once('/') {
                ancestors.push(parent);
                rest = parent;
            }
            for dir in ancestors.into_iter().rev() {
                if dirs.insert(dir.to_string()) {
                    writer
                        .dir(dir, 0o755)
                        .map_err(|e| fail(format!("{}: {e}", out.display())))?;
                }
            }
            let written = match &item.entry {
                Entry::Dir => {
                    if !dirs.insert(path.clone()) {
                        continue;
                    }
                    writer.dir(path, 0o755)
                }
                Entry::Bytes { data, perm } => writer.file(path, *perm, data),
                Entry::Symlink(target) => writer.symlink(path, target),
                Entry::HostFile(host) => {
                    let data = std::fs::read(host)
                        .map_err(|e| fail(format!("reading {}: {e}", host.display())))?;
                    let perm = std::fs::metadata(host)
                        .map(|m| m.permissions().mode() & 0o7777)
                        .unwrap_or(0o644);
                    writer.file(path, perm, &data)
                }
            };
            written.map_err(|e| fail(format!("{}: {e}", out.display())))?;
        }
        let mut buffered = writer
            .finish()
            .map_err(|e| fail(format!("{}: {e}", out.display())))?;
        buffered
            .flush()
            .map_err(|e| fail(format!("{}: {e}", out.display())))?;
        std::fs::metadata(out)
            .map(|m| m.len())
            .map_err(|e| fail(format!("{}: {e}", out.display())))
    }

    /// Add a directory (created empty).
    pub fn dir(&mut self, guest: &str) -> &mut Self {
        self.insert(guest, Entry::Dir, None);
        self
    }
}

/// A guest path without its leading `/`, with the merged-/usr directories
/// spelled as their targets: an entry named `lib/...` would make the kernel
/// replace the base image's `/lib -> usr/lib` link with a directory.
fn normalize(guest: &str) -> String {
    let trimmed = guest.trim_start_matches('/');
    for (link, target) in [("lib/", "usr/lib/"), ("lib64/", "lib64/")] {
        if let Some(rest) = trimmed.strip_prefix(link) {
            return format!("{target}{rest}");
        }
    }
    trimmed.to_string()
}

/// `path` with its directory resolved (links followed) but its last
/// component kept, so a link stays a link.
fn canonical_path(path: &Path) -> Result<PathBuf, LabError> {
    let name = match path.components().next_back() {
        Some(Component::Normal(name)) => name.to_os_string(),
        _ => {
            return Err(LabError::Payload {
                what: format!("{}: not a file path", path.display()),
            })
        }
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    let dir = std::fs::canonicalize(parent).map_err(|e| LabError::Payload {
        what: format!("{}: {e}", parent.display()),
    })?;
    Ok(dir.join(name))
}

/// The libraries `object` loads on the host: (soname, path) per `ldd`
/// line, without the vDSO and the loader (the base image has its own).
fn ldd(object: &Path) -> Result<Vec<(String, PathBuf)>, LabError> {
    let out = Command::new("ldd")
        .arg(object)
        .output()
        .map_err(|e| LabError::Payload {
            what: format!("running ldd {}: {e}", object.display()),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(LabError::Payload {
            what: format!(
                "ldd {} failed: {}{}",
                object.display(),
                text,
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((soname, rest)) = line.split_once(" => ") else {
            continue; // linux-vdso.so.1 (0x...) or the loader
        };
        let path = rest.split(" (").next().unwrap_or("").trim();
        if path == "not found" || path.is_empty() {
            return Err(LabError::Payload {
                what: format!("ldd {}: {soname} not found on the host", object.display()),
            });
        }
        libs.push((soname.to_string(), PathBuf::from(path)));
    }
    Ok(libs)
}

/// The host's DPDK plugin directory.
fn host_pmd_dir() -> Result<PathBuf, LabError> {
    let base = Path::new("/usr/lib/x86_64-linux-gnu/dpdk");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(base)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("pmds-"))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop().ok_or_else(|| LabError::Payload {
        what: format!(
            "no DPDK plugin directory {}/pmds-*: run `sudo scripts/install-test-deps.sh`",
            base.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_usr_paths_are_normalized() {
        assert_eq!(
            normalize("/lib/x86_64-linux-gnu/libz.so.1"),
            "usr/lib/x86_64-linux-gnu/libz.so.1"
        );
        assert_eq!(normalize("/usr/bin/vhost-agent"), "usr/bin/vhost-agent");
        assert_eq!(normalize("lab/payload.sh"), "lab/payload.sh");
    }

    #[test]
    fn a_host_binary_brings_the_libraries_the_base_lacks() {
        // On bookworm /bin/ls links libselinux (and libpcre2) besides libc.
        let mut payload = Payload::new("exit 0\n");
        let bin = Path::new("/bin/ls");
        payload.binary("/usr/bin/ls", bin).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("p.cpio");
        let mut base = BTreeSet::new();
        base.insert("libc.so.6".to_string());
        payload.write_archive(&archive, &base).unwrap();
        let listing = Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&listing.stdout);
        assert!(names.lines().any(|l| l == "usr/bin/ls"), "{names}");
        assert!(names.lines().any(|l| l == "lab/payload.sh"), "{names}");
        assert!(
            !names.contains("libc.so.6"),
            "the base's libc is not copied: {names}"
        );
        assert!(names.contains("libselinux.so.1"), "{names}");
        assert!(names.lines().all(|l| !l.starts_with("lib/")), "{names}");
    }
}
