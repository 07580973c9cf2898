//! Folder trees shaped like an OS image.

use std::fs;
use std::path::{Path, PathBuf};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub struct TreeSpec {
    /// How many files.
    pub files: usize,
    /// Seed: the same seed gives the same tree.
    pub seed: u64,
    /// Scale of file sizes (1.0: about 45 KiB average; the size mix is 75 %
    /// of 1–16 KiB, 23 % of 16–128 KiB, 2 % of 256 KiB–2 MiB, times this).
    pub size_scale: f64,
    /// Fraction of files that are copies of another file.
    pub duplicates: f64,
}

impl Default for TreeSpec {
    fn default() -> Self {
        Self {
            files: 1500,
            seed: 1,
            size_scale: 1.0,
            duplicates: 0.05,
        }
    }
}

/// Compressible content: words from a random vocabulary with random bytes
/// mixed in, compressing roughly 2:1 like Windows binaries do.
pub struct Content {
    rng: SmallRng,
    vocab: Vec<[u8; 48]>,
}

impl Content {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0xC0FFEE);
        let vocab = (0..512)
            .map(|_| {
                let mut w = [0u8; 48];
                rng.fill_bytes(&mut w);
                w
            })
            .collect();
        Self { rng, vocab }
    }

    /// `len` bytes of content.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 64);
        while out.len() < len {
            if self.rng.random_bool(0.35) {
                let mut r = [0u8; 48];
                self.rng.fill_bytes(&mut r);
                out.extend_from_slice(&r);
            } else {
                let w = self.vocab[self.rng.random_range(0..self.vocab.len())];
                out.extend_from_slice(&w);
            }
        }
        out.truncate(len);
        out
    }

    /// A random size from the OS-image-like mix.
    pub fn size(&mut self, scale: f64) -> usize {
        let p: f64 = self.rng.random();
        let (lo, hi) = if p < 0.75 {
            (1 << 10, 16 << 10)
        } else if p < 0.98 {
            (16 << 10, 128 << 10)
        } else {
            (256 << 10, 2 << 20)
        };
        ((self.rng.random_range(lo..hi) as f64) * scale).max(1.0) as usize
    }

    /// A random number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }
}

/// [`make_tree`] with `files` files from `seed`, other settings default.
pub fn make_tree_of(root: &Path, files: usize, seed: u64) -> anyhow::Result<Vec<PathBuf>> {
    make_tree(
        root,
        &TreeSpec {
            files,
            seed,
            ..TreeSpec::default()
        },
    )
}

/// Generates a tree under `root` and returns the relative paths of its files.
pub fn make_tree(root: &Path, spec: &TreeSpec) -> anyhow::Result<Vec<PathBuf>> {
    let mut c = Content::new(spec.seed);
    let dirs = [
        "Windows/System32",
        "Windows/SysWOW64",
        "Windows/WinSxS/amd64_pkg",
        "Program Files/App",
        "Users/Default",
        "Windows/Fonts",
    ];
    let mut files = Vec::with_capacity(spec.files);
    for i in 0..spec.files {
        let dir = dirs[i % dirs.len()];
        let sub = format!("{dir}/d{:02}", c.below(20));
        let rel = PathBuf::from(format!("{sub}/file{i:05}.dll"));
        let abs = root.join(&rel);
        fs::create_dir_all(abs.parent().unwrap_or(root))?;
        if i > 10 && c.rng.random_bool(spec.duplicates) {
            let src = &files[c.below(files.len())];
            fs::copy(root.join(src), &abs)?;
        } else {
            let len = c.size(spec.size_scale);
            fs::write(&abs, c.bytes(len))?;
        }
        files.push(rel);
    }
    Ok(files)
}
