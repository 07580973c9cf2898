//! `ferry update …`: the catalog of software updates for offline servicing.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use ferry_site::api::UpdateImportRequest;
use ferry_site::servicing::updates::UpdateRecord;
use reqwest::Method;

use crate::client::Client;
use crate::output::{bytes, print_json, table};
use crate::Global;

#[derive(Subcommand, Debug)]
pub(crate) enum UpdateCmd {
    /// Add an update (a folder with update.toml and payload/, or a .tar or
    /// .tar.gz of one) to the site's catalog; see docs/updates.md.
    Import {
        /// The folder or archive (on the site server's file system).
        path: PathBuf,
    },
    /// List the updates in the catalog.
    List,
    /// Show one update: applicability, supersedence and payload.
    Show {
        /// Update id (KB…).
        id: String,
    },
    /// Remove updates from the catalog (refused for one a servicing job
    /// that has not run yet names). History keeps their ids.
    Remove {
        /// Update ids (KB…).
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

fn classification(u: &UpdateRecord) -> String {
    serde_json::to_value(u.manifest.classification)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub(crate) async fn run(cmd: UpdateCmd, g: &Global) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    match cmd {
        UpdateCmd::Remove { ids } => {
            let mut removed = Vec::new();
            let mut refused = Vec::new();
            for id in &ids {
                match client
                    .json::<UpdateRecord>(client.request(Method::DELETE, &format!("/updates/{id}")))
                    .await
                {
                    Ok(u) => removed.push(u.manifest.id),
                    Err(e) => refused.push(format!("{id}: {}", crate::message(&e))),
                }
            }
            if g.json && refused.is_empty() {
                return print_json(&serde_json::json!({ "removed": removed }));
            }
            if !g.json {
                for id in &removed {
                    println!("removed {id} from the catalog");
                }
            }
            if !refused.is_empty() {
                anyhow::bail!(
                    "{} of {} not removed: {}",
                    refused.len(),
                    ids.len(),
                    refused.join("; ")
                );
            }
            Ok(())
        }
        UpdateCmd::Import { path } => {
            let path = std::path::absolute(&path)
                .with_context(|| format!("{}: cannot make the path absolute", path.display()))?;
            let u: UpdateRecord = client
                .json(
                    client
                        .request(Method::POST, "/updates")
                        .json(&UpdateImportRequest { path }),
                )
                .await?;
            if g.json {
                return print_json(&u);
            }
            println!("{}", u.manifest.id);
            eprintln!(
                "imported {} ({}): {} file(s) to add ({}), {} path(s) to delete",
                u.manifest.id,
                u.manifest.title,
                u.manifest.payload.add.len(),
                bytes(u.payload_bytes),
                u.manifest.payload.delete.len()
            );
            Ok(())
        }
        UpdateCmd::List => {
            let list: Vec<UpdateRecord> =
                client.json(client.request(Method::GET, "/updates")).await?;
            if g.json {
                return print_json(&list);
            }
            if list.is_empty() {
                println!("the update catalog is empty; add one with `ferry update import PATH`");
                return Ok(());
            }
            let mut t = table(&[
                "UPDATE",
                "RELEASED",
                "CLASSIFICATION",
                "ARCH",
                "BUILDS",
                "SUPERSEDES",
                "PAYLOAD",
                "TITLE",
            ]);
            for u in &list {
                let a = &u.manifest.applies_to;
                t.add_row(vec![
                    u.manifest.id.clone(),
                    u.manifest.released.clone(),
                    classification(u),
                    if a.architectures.is_empty() {
                        "any".into()
                    } else {
                        a.architectures.join(",")
                    },
                    format!(
                        "{}..{}",
                        a.min_build.as_deref().unwrap_or(""),
                        a.max_build.as_deref().unwrap_or("")
                    ),
                    u.manifest.supersedes.join(","),
                    format!(
                        "+{} -{} ({})",
                        u.manifest.payload.add.len(),
                        u.manifest.payload.delete.len(),
                        bytes(u.payload_bytes)
                    ),
                    u.manifest.title.clone(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        UpdateCmd::Show { id } => {
            let u: UpdateRecord = client
                .json(client.request(Method::GET, &format!("/updates/{id}")))
                .await?;
            if g.json {
                return print_json(&u);
            }
            let m = &u.manifest;
            let a = &m.applies_to;
            println!("{}  {}", m.id, m.title);
            println!("  classification {}", classification(&u));
            println!("  released       {}", m.released);
            println!(
                "  imported       {} from {}",
                crate::output::rfc3339(u.imported),
                u.source
            );
            println!("  product        {}", a.product.as_deref().unwrap_or("any"));
            println!(
                "  architectures  {}",
                if a.architectures.is_empty() {
                    "any".into()
                } else {
                    a.architectures.join(", ")
                }
            );
            println!(
                "  builds         {} .. {}",
                a.min_build.as_deref().unwrap_or("any"),
                a.max_build.as_deref().unwrap_or("any")
            );
            println!(
                "  supersedes     {}",
                if m.supersedes.is_empty() {
                    "-".into()
                } else {
                    m.supersedes.join(", ")
                }
            );
            for p in &m.payload.add {
                println!("  add            /{p}");
            }
            for p in &m.payload.delete {
                println!("  delete         /{p}");
            }
            Ok(())
        }
    }
}
