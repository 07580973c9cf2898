//! Disk accounting: what a store's folders take and what their filesystem
//! has left.

use std::path::Path;

/// Bytes allocated on disk under `path` (files and folders, as `du`
/// counts them; links are not followed).
pub fn usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks().saturating_mul(512);
    if meta.is_dir() {
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.flatten() {
                total = total.saturating_add(usage(&e.path()));
            }
        }
    }
    total
}

/// Bytes an unprivileged writer can still use on the filesystem of `path`.
pub fn available(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A DP's disk, as it reports it to the site.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Disk {
    /// Bytes allocated below the data and content folders.
    pub used: u64,
    /// Bytes free for an unprivileged writer on the content's filesystem.
    pub free: u64,
    /// That filesystem's size.
    pub total: u64,
}

/// The disk of a store kept in `data` with its files in `content` (counted
/// once when one holds the other). Unreadable parts count as nothing.
pub fn of(data: &Path, content: &Path) -> Disk {
    let mut used = usage(data);
    if !content.starts_with(data) {
        used = used.saturating_add(usage(content));
    }
    let (free, total) = rustix::fs::statvfs(content)
        .map(|st| {
            (
                st.f_bavail.saturating_mul(st.f_frsize),
                st.f_blocks.saturating_mul(st.f_frsize),
            )
        })
        .unwrap_or((0, 0));
    Disk { used, free, total }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_counts_in_its_folder_and_once_when_content_is_inside_data() {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("content");
        std::fs::create_dir(&content).unwrap();
        std::fs::write(content.join("f"), vec![7u8; 1 << 20]).unwrap();
        let inside = of(dir.path(), &content);
        assert!(inside.used >= 1 << 20, "{inside:?}");
        assert!(inside.used < 2 << 20, "counted twice: {inside:?}");
        assert!(
            inside.total >= inside.free && inside.total > 0,
            "{inside:?}"
        );
        let other = tempfile::tempdir().unwrap();
        let apart = of(other.path(), &content);
        assert!(apart.used >= 1 << 20, "{apart:?}");
        assert_eq!(available(&content).unwrap() > 0, inside.free > 0);
    }
}
