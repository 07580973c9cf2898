//! Software updates in Ferry's format (`update.toml` + `payload/`), made on
//! the spot for tests and benches, and whole-tree hashing to compare
//! folders.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// An update to write.
#[derive(Clone, Debug, Default)]
pub struct UpdateSpec {
    /// Its id.
    pub id: String,
    /// Release date, `YYYY-MM-DD`.
    pub released: String,
    /// Ids it supersedes.
    pub supersedes: Vec<String>,
    /// Architectures it is for (empty: any).
    pub architectures: Vec<String>,
    /// Files it adds or replaces: image path → content.
    pub add: Vec<(String, Vec<u8>)>,
    /// Paths it deletes.
    pub delete: Vec<String>,
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

impl UpdateSpec {
    /// An update `id` released on `released` that changes nothing yet.
    pub fn new(id: &str, released: &str) -> Self {
        Self {
            id: id.into(),
            released: released.into(),
            architectures: vec!["x64".into()],
            ..Self::default()
        }
    }

    /// Writes the update folder `dir/<id>` and returns it.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let root = dir.join(&self.id);
        fs::create_dir_all(&root)?;
        let adds: Vec<String> = self.add.iter().map(|(p, _)| p.clone()).collect();
        let text = format!(
            "id = {:?}\ntitle = \"Test update {}\"\nclassification = \"security-update\"\nreleased = {:?}\nsupersedes = {}\n\n[applies-to]\narchitectures = {}\nmin-build = \"10.0.22000.0\"\n\n[payload]\nadd = {}\ndelete = {}\n",
            self.id,
            self.id,
            self.released,
            toml_list(&self.supersedes),
            toml_list(&self.architectures),
            toml_list(&adds),
            toml_list(&self.delete),
        );
        fs::write(root.join("update.toml"), text)?;
        for (p, bytes) in &self.add {
            let f = root.join("payload").join(p);
            fs::create_dir_all(f.parent().unwrap_or(&root))?;
            fs::write(f, bytes)?;
        }
        Ok(root)
    }
}

/// Every regular file below `root`: relative path → BLAKE3 (hex). Links are
/// reported as `link:` entries so a test notices them.
pub fn tree_hashes(root: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> anyhow::Result<()> {
        for e in fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(root, &p, out)?;
            } else if ft.is_file() {
                out.insert(rel, blake3::hash(&fs::read(&p)?).to_hex().to_string());
            } else {
                out.insert(rel, format!("link:{}", fs::read_link(&p)?.display()));
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}
