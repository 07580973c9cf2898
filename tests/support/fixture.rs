//! `ferry-fixture`: makes sample WIMs for the demo and the benches.
//!
//! ```text
//! ferry-fixture pair DIR [--files N] [--scale X] [--compress LZX|XPRESS]
//! ```
//! writes `DIR/base.wim` and `DIR/serviced.wim` (a copy serviced in place
//! with wimupdate) and prints what changed as JSON.
//!
//! ```text
//! ferry-fixture update DIR --tree TREE --id KB… [--percent P] [--seed S]
//! ```
//! writes an update in Ferry's format (`DIR/<id>/update.toml`, `payload/`)
//! that replaces about P % (default 5) of the files of TREE with new content
//! of the same size, and prints a summary as JSON.
//!
//! ```text
//! ferry-fixture floor BASE SERVICED
//! ```
//! prints the blob floor of SERVICED over BASE (see `wimtools::blob_floor`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use ferry_tests::tree::TreeSpec;
use ferry_tests::wimtools::{self, ServiceSpec};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .context("usage: ferry-fixture pair|update|floor …")?;
    match cmd.as_str() {
        "pair" => {}
        "update" => return update(rest),
        "floor" => {
            let [base, serviced] = rest else {
                bail!("usage: ferry-fixture floor BASE SERVICED");
            };
            println!(
                "{}",
                wimtools::blob_floor(base.as_ref(), serviced.as_ref())?
            );
            return Ok(());
        }
        _ => bail!("unknown command {cmd}; try pair, update or floor"),
    }
    let dir = PathBuf::from(rest.first().context("pair needs DIR")?);
    let mut spec = TreeSpec::default();
    let mut compress = "LZX".to_string();
    let mut it = rest[1..].iter();
    while let Some(flag) = it.next() {
        let val = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--files" => spec.files = val.parse()?,
            "--scale" => spec.size_scale = val.parse()?,
            "--seed" => spec.seed = val.parse()?,
            "--compress" => compress = val.clone(),
            other => bail!("unknown option {other}"),
        }
    }
    std::fs::create_dir_all(&dir)?;
    let pair = wimtools::serviced_pair(&dir, &spec, &compress, &ServiceSpec::default())?;
    let floor = wimtools::blob_floor(&pair.base, &pair.serviced)?;
    println!(
        "{}",
        serde_json::json!({
            "base": pair.base,
            "serviced": pair.serviced,
            "base_bytes": std::fs::metadata(&pair.base)?.len(),
            "serviced_bytes": std::fs::metadata(&pair.serviced)?.len(),
            "replaced": pair.changes.replaced.len(),
            "patched": pair.changes.patched.len(),
            "added": pair.changes.added.len(),
            "deleted": pair.changes.deleted.len(),
            "blob_floor": floor,
        })
    );
    Ok(())
}

/// `update DIR --tree TREE --id ID [--percent P] [--seed S]`.
fn update(rest: &[String]) -> anyhow::Result<()> {
    let dir = PathBuf::from(rest.first().context("update needs DIR")?);
    let (mut tree, mut id, mut percent, mut seed) = (None, None, 5.0f64, 77u64);
    let mut it = rest[1..].iter();
    while let Some(flag) = it.next() {
        let val = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--tree" => tree = Some(PathBuf::from(val)),
            "--id" => id = Some(val.clone()),
            "--percent" => percent = val.parse()?,
            "--seed" => seed = val.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    let tree = tree.context("update needs --tree")?;
    let id = id.context("update needs --id")?;
    let mut files = Vec::new();
    let mut stack = vec![tree.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    files.sort();
    let step = (100.0 / percent.max(0.01)).round().max(1.0) as usize;
    let mut c = ferry_tests::tree::Content::new(seed);
    let mut spec = ferry_tests::updates::UpdateSpec::new(&id, "2026-11-10");
    let mut bytes = 0u64;
    for f in files.iter().step_by(step) {
        let len = std::fs::metadata(f)?.len() as usize;
        let rel = f.strip_prefix(&tree)?.to_string_lossy().replace('\\', "/");
        bytes += len as u64;
        spec.add.push((rel, c.bytes(len.max(1))));
    }
    let folder = spec.write(&dir)?;
    println!(
        "{}",
        serde_json::json!({
            "update": folder,
            "files_replaced": spec.add.len(),
            "files_in_tree": files.len(),
            "payload_bytes": bytes,
        })
    );
    Ok(())
}
