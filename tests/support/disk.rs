//! Small disks and what `du` says about folders.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// A tmpfs of a fixed size mounted at a folder for the life of the value
/// (needs root).
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mounts `mib` MiB of tmpfs at `dir`.
    pub fn mount(dir: &Path, mib: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .output()
            .context("cannot run mount")?;
        if !out.status.success() {
            bail!(
                "this test needs root to mount a small tmpfs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self(dir.to_path_buf()))
    }

    /// Bytes in use on it.
    pub fn used(&self) -> anyhow::Result<u64> {
        self.df("used")
    }

    /// Bytes still free on it.
    pub fn free(&self) -> anyhow::Result<u64> {
        self.df("avail")
    }

    fn df(&self, field: &str) -> anyhow::Result<u64> {
        let out = Command::new("df")
            .args([format!("--output={field}").as_str(), "-B1"])
            .arg(&self.0)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("df printed no free space: {text}"))
    }
}

impl SmallDisk {
    /// Makes an XFS filesystem with reflinks (`mkfs.xfs -m reflink=1`) of
    /// `mib` MiB in the file `image` and loop-mounts it at `dir`.
    pub fn xfs(image: &Path, dir: &Path, mib: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let f = std::fs::File::create(image)?;
        f.set_len(mib << 20)?;
        drop(f);
        let out = Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(image)
            .output()
            .context("cannot run mkfs.xfs (Debian's xfsprogs; scripts/setup.sh installs it)")?;
        if !out.status.success() {
            bail!("mkfs.xfs failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "this test needs root to loop-mount a filesystem: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self(dir.to_path_buf()))
    }

    /// Takes every free byte with a file at `path` (as another program
    /// filling the disk would); removing the file gives them back.
    pub fn fill(&self, path: &Path) -> anyhow::Result<()> {
        let free = self.free()?;
        let out = Command::new("fallocate")
            .args(["-l", &free.to_string()])
            .arg(path)
            .output()
            .context("cannot run fallocate")?;
        if !out.status.success() {
            bail!("fallocate failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Bytes `du` counts on disk under each folder, together (`du -s -B1 -c`).
pub fn du(dirs: &[&Path]) -> anyhow::Result<u64> {
    let out = Command::new("du")
        .args(["-s", "-B1", "-c"])
        .args(dirs)
        .output()
        .context("cannot run du")?;
    if !out.status.success() {
        bail!("du failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .last()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du printed no total: {text}"))
}
