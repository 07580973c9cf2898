//! `ferry-fixture`: makes sample WIMs for the demo and the benches.
//!
//! ```text
//! ferry-fixture pair DIR [--files N] [--scale X] [--compress LZX|XPRESS]
//! ```
//! writes `DIR/base.wim` and `DIR/serviced.wim` (a copy serviced in place
//! with wimupdate) and prints what changed as JSON.

use std::path::PathBuf;

use anyhow::{bail, Context};
use ferry_tests::tree::TreeSpec;
use ferry_tests::wimtools::{self, ServiceSpec};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .context("usage: ferry-fixture pair DIR [--files N] [--scale X] [--compress C]")?;
    if cmd != "pair" {
        bail!("unknown command {cmd}; try `pair`");
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
