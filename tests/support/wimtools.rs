//! Real WIMs, built and inspected with wimlib's own command-line tools.
//!
//! Tests use these to make their inputs and to check Ferry's results
//! independently of Ferry's own WIM parser.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::tree::Content;

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| {
        format!("cannot run {cmd:?}: are wimtools installed? (scripts/setup.sh)")
    })?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Image properties that make a WIM look like Windows 11 x64.
pub const WINDOWS_PROPS: &[(&str, &str)] = &[
    ("WINDOWS/ARCH", "9"),
    ("WINDOWS/EDITIONID", "Enterprise"),
    ("WINDOWS/VERSION/MAJOR", "10"),
    ("WINDOWS/VERSION/MINOR", "0"),
    ("WINDOWS/VERSION/BUILD", "22631"),
    ("WINDOWS/VERSION/SPBUILD", "2861"),
    ("WINDOWS/LANGUAGES/LANGUAGE", "en-US"),
];

fn with_props<'c>(cmd: &'c mut Command, props: &[(&str, &str)]) -> &'c mut Command {
    for (k, v) in props {
        cmd.arg("--image-property").arg(format!("{k}={v}"));
    }
    cmd
}

/// `wimcapture TREE WIM NAME --compress=COMPRESS` with image properties.
pub fn capture(
    tree: &Path,
    wim: &Path,
    name: &str,
    compress: &str,
    props: &[(&str, &str)],
) -> anyhow::Result<()> {
    capture_with(tree, wim, name, compress, props, &[])
}

/// [`capture`] with more `wimcapture` options (`--check`: an integrity
/// table).
pub fn capture_with(
    tree: &Path,
    wim: &Path,
    name: &str,
    compress: &str,
    props: &[(&str, &str)],
    extra: &[&str],
) -> anyhow::Result<()> {
    let mut cmd = Command::new("wimcapture");
    cmd.arg(tree)
        .arg(wim)
        .arg(name)
        .arg(format!("--compress={compress}"))
        .args(extra);
    run(with_props(&mut cmd, props)).map(drop)
}

/// `wimappend TREE WIM NAME`: adds another image.
pub fn append(tree: &Path, wim: &Path, name: &str, props: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut cmd = Command::new("wimappend");
    cmd.arg(tree).arg(wim).arg(name);
    run(with_props(&mut cmd, props)).map(drop)
}

/// How to service an image.
#[derive(Clone, Copy, Debug)]
pub struct ServiceSpec {
    /// Seed for which files and what content.
    pub seed: u64,
    /// Fraction of files replaced with new content.
    pub replace: f64,
    /// Fraction of the larger files (≥ 96 KiB) patched in place: a few bytes
    /// changed, as a monthly update patches a binary.
    pub patch: f64,
    /// Files added.
    pub add: usize,
    /// Fraction of files deleted.
    pub delete: f64,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            seed: 2,
            replace: 0.03,
            patch: 0.3,
            add: 40,
            delete: 0.01,
        }
    }
}

/// What a servicing run changed (paths inside the image, `/`-rooted).
#[derive(Clone, Debug, Default)]
pub struct Changes {
    /// Replaced with new content.
    pub replaced: Vec<String>,
    /// Patched in place.
    pub patched: Vec<String>,
    /// Added.
    pub added: Vec<String>,
    /// Deleted.
    pub deleted: Vec<String>,
}

/// Services image 1 of `wim` in place with `wimupdate` (committed by
/// appending, as DISM does), changing files of `tree` (the captured folder,
/// left untouched). Staging files go to `staging`.
pub fn service(
    wim: &Path,
    tree: &Path,
    files: &[PathBuf],
    staging: &Path,
    spec: &ServiceSpec,
) -> anyhow::Result<Changes> {
    fs::create_dir_all(staging)?;
    let mut c = Content::new(spec.seed);
    let mut changes = Changes::default();
    let mut cmds = String::new();
    let mut touched = HashSet::new();
    let image_path = |rel: &Path| format!("/{}", rel.display());
    let n_replace = (files.len() as f64 * spec.replace) as usize;
    let n_delete = (files.len() as f64 * spec.delete) as usize;
    for i in 0..n_replace {
        let rel = &files[c.below(files.len())];
        if !touched.insert(rel.clone()) {
            continue;
        }
        let len = fs::metadata(tree.join(rel))?.len() as usize;
        let staged = staging.join(format!("r{i}"));
        fs::write(&staged, c.bytes(len.max(1)))?;
        cmds += &format!("add '{}' '{}'\n", staged.display(), image_path(rel));
        changes.replaced.push(image_path(rel));
    }
    let large: Vec<&PathBuf> = files
        .iter()
        .filter(|f| {
            fs::metadata(tree.join(f))
                .map(|m| m.len() >= 96 << 10)
                .unwrap_or(false)
        })
        .collect();
    let n_patch = (large.len() as f64 * spec.patch) as usize;
    for i in 0..n_patch {
        let rel = large[c.below(large.len())];
        if !touched.insert(rel.clone()) {
            continue;
        }
        let mut bytes = fs::read(tree.join(rel))?;
        for _ in 0..3 {
            let at = c.below(bytes.len() - 16);
            bytes[at..at + 16].copy_from_slice(&c.bytes(16));
        }
        let staged = staging.join(format!("p{i}"));
        fs::write(&staged, bytes)?;
        cmds += &format!("add '{}' '{}'\n", staged.display(), image_path(rel));
        changes.patched.push(image_path(rel));
    }
    for i in 0..spec.add {
        let staged = staging.join(format!("a{i}"));
        let len = c.size(1.0);
        fs::write(&staged, c.bytes(len))?;
        let dest = format!("/Windows/Servicing/Packages/kb{}/new{i:04}.dll", spec.seed);
        cmds += &format!("add '{}' '{dest}'\n", staged.display());
        changes.added.push(dest);
    }
    for _ in 0..n_delete {
        let rel = &files[c.below(files.len())];
        if !touched.insert(rel.clone()) {
            continue;
        }
        cmds += &format!("delete '{}'\n", image_path(rel));
        changes.deleted.push(image_path(rel));
    }
    let cmd_file = staging.join("commands.txt");
    fs::write(&cmd_file, cmds)?;
    let file = fs::File::open(&cmd_file)?;
    let out = Command::new("wimupdate")
        .arg(wim)
        .arg("1")
        .stdin(file)
        .output()
        .context("cannot run wimupdate")?;
    if !out.status.success() {
        bail!("wimupdate failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(changes)
}

/// `wimoptimize WIM`: rebuilds the file, resources at new offsets.
pub fn optimize(wim: &Path) -> anyhow::Result<()> {
    run(Command::new("wimoptimize").arg(wim)).map(drop)
}

/// `wimverify WIM`: wimlib's own integrity check.
pub fn verify(wim: &Path) -> anyhow::Result<()> {
    run(Command::new("wimverify").arg(wim)).map(drop)
}

/// The file paths in an image, from `wimdir --detailed`-free listing.
pub fn list_files(wim: &Path, image: u32) -> anyhow::Result<Vec<String>> {
    let out = run(Command::new("wimdir").arg(wim).arg(image.to_string()))?;
    Ok(out.lines().map(str::to_string).collect())
}

/// One blob table entry as `wiminfo --blobs` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// SHA-1, hex.
    pub hash: String,
    /// Bytes in the file.
    pub compressed: u64,
    /// Offset in the file.
    pub offset: u64,
    /// A metadata resource.
    pub metadata: bool,
}

/// The blob table, read by `wiminfo --blobs`.
pub fn blobs(wim: &Path) -> anyhow::Result<Vec<BlobInfo>> {
    let out = run(Command::new("wiminfo").arg("--blobs").arg(wim))?;
    let mut v = Vec::new();
    let mut cur: HashMap<&str, &str> = HashMap::new();
    let flush = |cur: &mut HashMap<&str, &str>, v: &mut Vec<BlobInfo>| -> anyhow::Result<()> {
        if let Some(h) = cur.get("Hash") {
            let num = |k: &str| -> anyhow::Result<u64> {
                let s = cur
                    .get(k)
                    .with_context(|| format!("wiminfo printed no {k}"))?;
                Ok(s.split_whitespace().next().unwrap_or("").parse()?)
            };
            v.push(BlobInfo {
                hash: h.trim_start_matches("0x").to_string(),
                compressed: num("Compressed size")?,
                offset: num("Offset in WIM")?,
                metadata: cur.get("Flags").is_some_and(|f| f.contains("METADATA")),
            });
        }
        cur.clear();
        Ok(())
    };
    for line in out.lines() {
        if line.trim().is_empty() {
            flush(&mut cur, &mut v)?;
        } else if let Some((k, val)) = line.split_once('=') {
            cur.insert(k.trim(), val.trim());
        }
    }
    flush(&mut cur, &mut v)?;
    Ok(v)
}

/// The header, read by `wiminfo --header`, as `name → value`.
pub fn header(wim: &Path) -> anyhow::Result<HashMap<String, String>> {
    let out = run(Command::new("wiminfo").arg("--header").arg(wim))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

/// The blob floor of `serviced` over `base`: the stored bytes of the
/// serviced WIM's resources whose SHA-1 is not in the base WIM, plus its
/// metadata resources, blob table, XML data and integrity table. Computed
/// from wimlib's own view of both blob tables.
pub fn blob_floor(base: &Path, serviced: &Path) -> anyhow::Result<u64> {
    let old: HashSet<String> = blobs(base)?
        .into_iter()
        .filter(|b| !b.metadata)
        .map(|b| b.hash)
        .collect();
    let mut floor = 0u64;
    for b in blobs(serviced)? {
        if b.metadata || !old.contains(&b.hash) {
            floor += b.compressed;
        }
    }
    let h = header(serviced)?;
    for k in ["Blob Table Size", "XML Data Size", "Integrity Size"] {
        floor += h
            .get(k)
            .with_context(|| format!("wiminfo printed no {k}"))?
            .parse::<u64>()?;
    }
    Ok(floor)
}

/// A base WIM and its serviced copy, made in `dir`.
pub struct ServicedPair {
    /// The base WIM.
    pub base: PathBuf,
    /// The serviced copy (updated in place by appending).
    pub serviced: PathBuf,
    /// The tree the base was captured from.
    pub tree: PathBuf,
    /// What servicing changed.
    pub changes: Changes,
}

/// Makes `base.wim` from a generated tree and `serviced.wim`, a copy
/// serviced with `spec`.
pub fn serviced_pair(
    dir: &Path,
    tree_spec: &crate::tree::TreeSpec,
    compress: &str,
    spec: &ServiceSpec,
) -> anyhow::Result<ServicedPair> {
    let tree = dir.join("tree");
    let files = crate::tree::make_tree(&tree, tree_spec)?;
    let base = dir.join("base.wim");
    capture(
        &tree,
        &base,
        "Windows 11 Enterprise",
        compress,
        WINDOWS_PROPS,
    )?;
    let serviced = dir.join("serviced.wim");
    fs::copy(&base, &serviced)?;
    let changes = service(&serviced, &tree, &files, &dir.join("staging"), spec)?;
    Ok(ServicedPair {
        base,
        serviced,
        tree,
        changes,
    })
}

/// A WIM of `mib` MiB of incompressible data stored uncompressed (files of
/// 16 MiB): big enough to stop a transfer in the middle.
pub fn big_wim(dir: &Path, mib: usize, seed: u64) -> anyhow::Result<PathBuf> {
    let tree = dir.join(format!("big-tree-{seed}"));
    fs::create_dir_all(&tree)?;
    let mut c = Content::new(seed);
    for i in 0..mib / 16 {
        fs::write(tree.join(format!("part{i}.bin")), c.bytes(16 << 20))?;
    }
    let wim = dir.join(format!("big-{seed}.wim"));
    capture(&tree, &wim, "big", "none", &[])?;
    fs::remove_dir_all(&tree)?;
    Ok(wim)
}

/// A resource header of the WIM format: stored size, flags, offset,
/// original size.
#[derive(Clone, Copy, Debug)]
struct ResHdr {
    stored: u64,
    flags: u8,
    offset: u64,
    original: u64,
}

const RES_COMPRESSED: u8 = 0x04;
const RES_SOLID: u8 = 0x10;

fn reshdr(b: &[u8]) -> ResHdr {
    let mut stored = [0u8; 8];
    stored[..7].copy_from_slice(&b[..7]);
    ResHdr {
        stored: u64::from_le_bytes(stored),
        flags: b[7],
        offset: u64::from_le_bytes(b[8..16].try_into().unwrap_or_default()),
        original: u64::from_le_bytes(b[16..24].try_into().unwrap_or_default()),
    }
}

/// One WIM read with a parser of its own (independent of Ferry's): the
/// table sizes and, per resource, its SHA-1 and its pieces — the chunk
/// table and each compressed chunk (a resource that is not compressed, or
/// solid, is one piece).
struct WimPieces {
    tables: u64,
    /// Per resource: its SHA-1, its pieces, its chunk table's length.
    resources: Vec<([u8; 20], Vec<Vec<u8>>, u64)>,
}

fn wim_pieces(path: &Path) -> anyhow::Result<WimPieces> {
    let data = fs::read(path)?;
    if data.len() < 208 || &data[..8] != b"MSWIM\0\0\0" {
        bail!("{} is not a WIM", path.display());
    }
    let chunk_size = u64::from(u32::from_le_bytes(data[20..24].try_into()?));
    let blob_table = reshdr(&data[48..72]);
    let xml = reshdr(&data[72..96]);
    let integrity = reshdr(&data[124..148]);
    let tables = 208 + blob_table.stored + xml.stored + integrity.stored;
    let at = |o: u64, n: u64| -> anyhow::Result<&[u8]> {
        data.get(o as usize..(o + n) as usize)
            .with_context(|| format!("{}: range {o}+{n} is past the end", path.display()))
    };
    let table = at(blob_table.offset, blob_table.stored)?;
    let mut resources = Vec::new();
    for e in table.chunks_exact(50) {
        let r = reshdr(&e[..24]);
        let sha: [u8; 20] = e[30..50].try_into()?;
        let body = at(r.offset, r.stored)?;
        if r.flags & RES_COMPRESSED == 0 || r.flags & RES_SOLID != 0 || r.original == 0 {
            resources.push((sha, vec![body.to_vec()], 0));
            continue;
        }
        let chunks = r.original.div_ceil(chunk_size);
        let entry = if r.original > u64::from(u32::MAX) {
            8
        } else {
            4
        };
        let table_len = (chunks - 1) * entry;
        let offs: Vec<u64> = std::iter::once(0)
            .chain(
                body[..table_len as usize]
                    .chunks_exact(entry as usize)
                    .map(|b| {
                        if entry == 8 {
                            u64::from_le_bytes(b.try_into().unwrap_or_default())
                        } else {
                            u64::from(u32::from_le_bytes(b.try_into().unwrap_or_default()))
                        }
                    }),
            )
            .collect();
        let data_part = &body[table_len as usize..];
        let mut pieces = Vec::with_capacity(offs.len());
        for (i, &o) in offs.iter().enumerate() {
            let end = offs.get(i + 1).copied().unwrap_or(data_part.len() as u64);
            pieces.push(
                data_part
                    .get(o as usize..end as usize)
                    .with_context(|| format!("{}: a chunk table out of range", path.display()))?
                    .to_vec(),
            );
        }
        resources.push((sha, pieces, table_len));
    }
    Ok(WimPieces { tables, resources })
}

/// The chunk floor of `new` over `old`, from the WIMs' own tables: the
/// header, blob table, XML and integrity table of `new`, plus, for every
/// resource of `new` (file data and metadata alike) whose SHA-1 `old`
/// lacks, its chunk table and those of its compressed chunks that appear
/// nowhere in `old`. What any tool that knows the WIM format must send.
pub fn chunk_floor(old: &Path, new: &Path) -> anyhow::Result<u64> {
    let o = wim_pieces(old)?;
    let n = wim_pieces(new)?;
    let old_sha: HashSet<[u8; 20]> = o.resources.iter().map(|r| r.0).collect();
    let old_pieces: HashSet<[u8; 32]> = o
        .resources
        .iter()
        .flat_map(|r| r.1.iter().map(|p| *blake3::hash(p).as_bytes()))
        .collect();
    let mut floor = n.tables;
    for (sha, pieces, table) in &n.resources {
        if old_sha.contains(sha) {
            continue;
        }
        floor += table;
        for p in pieces {
            if !old_pieces.contains(blake3::hash(p).as_bytes()) {
                floor += p.len() as u64;
            }
        }
    }
    Ok(floor)
}

/// Applies `changes` (from [`service`]) to a copy of `tree` in `out`, as the
/// serviced image's files, for recapturing it from scratch. Needs the
/// serviced WIM to read the replaced and added files from.
pub fn serviced_tree(serviced: &Path, out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        fs::remove_dir_all(out)?;
    }
    fs::create_dir_all(out)?;
    run(Command::new("wimapply").arg(serviced).arg("1").arg(out)).map(drop)
}

/// A WIM (LZX) of a generated tree of `files` files: `DIR/NAME.wim`, image
/// named NAME, with `props`.
pub fn tree_wim(
    dir: &Path,
    name: &str,
    files: usize,
    seed: u64,
    props: &[(&str, &str)],
) -> anyhow::Result<PathBuf> {
    let spec = crate::tree::TreeSpec {
        files,
        seed,
        ..crate::tree::TreeSpec::default()
    };
    let tree = dir.join(format!("{name}-tree"));
    crate::tree::make_tree(&tree, &spec)?;
    let wim = dir.join(format!("{name}.wim"));
    capture(&tree, &wim, name, "LZX", props)?;
    Ok(wim)
}
