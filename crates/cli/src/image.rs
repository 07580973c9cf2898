//! `ferry image …`: import, list, show and remove OS images.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use ferry_site::api::{ImportEvent, RevisionsView};
use ferry_site::library::catalog::{
    PackageKind, PackageRecord, PackageSummary, PackageView, RevisionRecord, SourceState,
};
use ferry_site::library::packages::{ImportRequest, RemoveView};
use futures_util::StreamExt;
use reqwest::Method;

use crate::client::Client;
use crate::output::{bytes, emit, percent, print_json, table};
use crate::Global;

#[derive(Subcommand, Debug)]
pub(crate) enum ImageCmd {
    /// Import a WIM file as a new package; prints its id.
    Add {
        /// The .wim file (on the site server's file system).
        path: PathBuf,
        /// Package name (default: the name of the WIM's first image).
        #[arg(long)]
        name: Option<String>,
        /// Your organisation's version string.
        #[arg(long)]
        version: Option<String>,
        /// Free-text comment.
        #[arg(long)]
        comment: Option<String>,
        /// Import only this image index (Ferry exports it into a WIM of its
        /// own; the source file is not modified).
        #[arg(long)]
        index: Option<u32>,
        /// Do not check every resource against its SHA-1 while importing
        /// (faster; the record says it was not checked).
        #[arg(long)]
        no_verify: bool,
    },
    /// Change an image's name, version or comment.
    Set(SetArgs),
    /// Whether DPs may send the image to clients by multicast: --allow
    /// [--encrypt] [--only], or --off.
    Multicast(MulticastArgs),
    /// The kept revisions of an image: which one DPs receive, where each is
    /// installed.
    Revisions {
        /// Package id.
        id: String,
    },
    /// Release an older kept revision to every DP holding the image (each
    /// fetches only what it lacks); `ferry distribute ID` goes back to the
    /// newest.
    Rollback {
        /// Package id.
        id: String,
        /// The revision.
        #[arg(long, value_name = "N")]
        to: u32,
    },
    /// List the images in the library.
    List,
    /// Show one image: its WIM metadata and library figures.
    Show {
        /// Package id (from `ferry image list`).
        id: String,
    },
    /// Remove an image; chunks nothing else uses are freed.
    Remove {
        /// Package id.
        id: String,
    },
    /// Updates from the catalog for this image: applicable, applied,
    /// superseded.
    Updates {
        /// Package id.
        id: String,
    },
    /// Apply updates to Ferry's copy of the image, as a new revision (a
    /// servicing job; now, at a time, or on a cron schedule).
    Service(crate::service::ServiceArgs),
    /// Which updates were applied to the image, when, by which job, and how.
    History {
        /// Package id.
        id: String,
    },
}

/// `ferry image set` / `ferry upgrade set`.
#[derive(clap::Args, Debug)]
pub(crate) struct SetArgs {
    /// Package id.
    pub(crate) id: String,
    /// New name.
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// New version string.
    #[arg(long)]
    pub(crate) version: Option<String>,
    /// New comment.
    #[arg(long)]
    pub(crate) comment: Option<String>,
    /// Keep this many revisions of the package (0: the site's
    /// keep_revisions again).
    #[arg(long, value_name = "N")]
    pub(crate) keep: Option<u32>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct MulticastArgs {
    /// Package id.
    pub(crate) id: String,
    /// Allow this package to be transferred via multicast.
    #[arg(long, conflicts_with = "off")]
    pub(crate) allow: bool,
    /// Encrypt multicast packets (a per-session key only clients with a
    /// valid token receive).
    #[arg(long, requires = "allow")]
    pub(crate) encrypt: bool,
    /// Transfer this package only via multicast (DPs refuse HTTPS
    /// downloads of it).
    #[arg(long, requires = "allow")]
    pub(crate) only: bool,
    /// No multicast: HTTPS only.
    #[arg(long)]
    pub(crate) off: bool,
}

/// `image multicast` / `upgrade multicast`.
pub(crate) async fn multicast(client: &Client, g: &Global, a: MulticastArgs) -> anyhow::Result<()> {
    if !a.allow && !a.off {
        anyhow::bail!("give --allow [--encrypt] [--only], or --off");
    }
    let m = ferry_site::library::catalog::MulticastSettings {
        allow: a.allow,
        encrypt: a.encrypt,
        only: a.only,
    };
    let rec: ferry_site::library::catalog::PackageRecord = client
        .json(
            client
                .request(Method::POST, &format!("/images/{}/multicast", a.id))
                .json(&m),
        )
        .await?;
    emit(g, &rec.multicast, || {
        println!("{}: multicast {}", rec.id, rec.multicast.describe())
    })
}

/// `image revisions` / `upgrade revisions`.
pub(crate) async fn revisions(client: &Client, g: &Global, id: &str) -> anyhow::Result<()> {
    let v: RevisionsView = client
        .json(client.request(Method::GET, &format!("/images/{id}/revisions")))
        .await?;
    emit(g, &v, || print_revisions(&v))
}

/// `image rollback` / `upgrade rollback`.
pub(crate) async fn rollback(client: &Client, g: &Global, id: &str, to: u32) -> anyhow::Result<()> {
    let v: RevisionsView = client
        .json(
            client
                .request(Method::POST, &format!("/images/{id}/rollback"))
                .json(&ferry_site::api::RollbackRequest { to }),
        )
        .await?;
    emit(g, &v, || {
        println!("{id} revision {to} released: every DP holding {id} moves to it, fetching only what it lacks");
        print_revisions(&v);
    })
}

fn print_revisions(v: &RevisionsView) {
    let mut t = table(&[
        "REV",
        "CREATED (UTC)",
        "SOURCE",
        "SIZE",
        "NEW",
        "VERIFIED",
        "RELEASED",
        "INSTALLED ON",
    ]);
    for r in &v.revisions {
        t.add_row(vec![
            format!("{}{}", r.revision, if r.latest { " (newest)" } else { "" }),
            crate::output::when(r.created),
            r.source.clone(),
            bytes(r.size),
            bytes(r.new_bytes),
            if r.verified { "yes" } else { "no" }.into(),
            if r.released { "yes" } else { "" }.into(),
            r.installed_on.join(" "),
        ]);
    }
    println!("{}: {} revision(s) kept at most", v.package, v.keep);
    println!("{t}");
}

/// Sends the properties of `image set` / `upgrade set` and prints the
/// package as it now is.
pub(crate) async fn set(
    client: &Client,
    g: &Global,
    id: &str,
    props: ferry_site::library::packages::Properties,
) -> anyhow::Result<()> {
    let rec: ferry_site::library::catalog::PackageRecord = client
        .json(
            client
                .request(Method::PATCH, &format!("/images/{id}"))
                .json(&props),
        )
        .await?;
    emit(g, &rec, || {
        println!(
            "{}: name {:?}, version {:?}, comment {:?}{}",
            rec.id,
            rec.name,
            rec.version,
            rec.comment,
            if rec.architecture.is_empty() && rec.language.is_empty() {
                String::new()
            } else {
                format!(", arch {:?}, lang {:?}", rec.architecture, rec.language)
            }
        )
    })
}

pub(crate) async fn run(cmd: ImageCmd, g: &Global) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    match cmd {
        ImageCmd::Add {
            path,
            name,
            version,
            comment,
            index,
            no_verify,
        } => {
            let req = ImportRequest {
                path,
                name,
                version,
                comment,
                index,
                package: None,
                no_verify,
            };
            add(&client, g, req).await
        }
        ImageCmd::Multicast(a) => multicast(&client, g, a).await,
        ImageCmd::Set(a) => {
            let props = ferry_site::library::packages::Properties {
                name: a.name,
                version: a.version,
                comment: a.comment,
                keep: a.keep,
                ..Default::default()
            };
            set(&client, g, &a.id, props).await
        }
        ImageCmd::Revisions { id } => revisions(&client, g, &id).await,
        ImageCmd::Rollback { id, to } => rollback(&client, g, &id, to).await,
        ImageCmd::List => list(&client, g, PackageKind::Image).await,
        ImageCmd::Show { id } => show(&client, g, &id).await,
        ImageCmd::Remove { id } => remove(&client, g, &id).await,
        ImageCmd::Updates { id } => crate::service::updates(&client, g, &id).await,
        ImageCmd::Service(a) => crate::service::service(&client, g, a).await,
        ImageCmd::History { id } => crate::service::history(&client, g, &id).await,
    }
}

/// `image list` / `upgrade list`: the packages of one kind.
pub(crate) async fn list(client: &Client, g: &Global, kind: PackageKind) -> anyhow::Result<()> {
    let list: Vec<PackageSummary> = client.json(client.request(Method::GET, "/images")).await?;
    let list: Vec<PackageSummary> = list.into_iter().filter(|p| p.kind == kind).collect();
    if g.json {
        return print_json(&list);
    }
    if list.is_empty() {
        match kind {
            PackageKind::Image => println!("no images yet; add one with `ferry image add PATH`"),
            PackageKind::Upgrade => println!(
                "no upgrade packages yet; add one with `ferry upgrade add DIR --name NAME`"
            ),
        }
        return Ok(());
    }
    let mut t = table(&[
        "ID",
        "NAME",
        "VERSION",
        "REV",
        "RELEASED",
        "IMAGES",
        "FILES",
        "SIZE",
        "NEWLY STORED",
        "CREATED (UTC)",
    ]);
    for p in &list {
        t.add_row(vec![
            p.id.clone(),
            p.name.clone(),
            p.version.clone(),
            p.revision.to_string(),
            p.released.to_string(),
            p.image_count.to_string(),
            p.file_count.to_string(),
            bytes(p.size),
            bytes(p.new_bytes),
            crate::output::when(p.created),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// `image show` / `upgrade show`.
pub(crate) async fn show(client: &Client, g: &Global, id: &str) -> anyhow::Result<()> {
    let view: PackageView = client
        .json(client.request(Method::GET, &format!("/images/{id}")))
        .await?;
    if g.json {
        return print_json(&view);
    }
    print_view(&view);
    Ok(())
}

/// `image remove` / `upgrade remove`.
pub(crate) async fn remove(client: &Client, g: &Global, id: &str) -> anyhow::Result<()> {
    let r: RemoveView = client
        .json(client.request(Method::DELETE, &format!("/images/{id}")))
        .await?;
    if g.json {
        return print_json(&r);
    }
    println!(
        "removed {id}; freed {} chunks ({})",
        r.freed_chunks,
        bytes(r.freed_bytes)
    );
    Ok(())
}

async fn add(client: &Client, g: &Global, mut req: ImportRequest) -> anyhow::Result<()> {
    // The site reads the file itself: send an absolute path. A path that does
    // not exist is still sent so the site explains it in one place.
    req.path = std::path::absolute(&req.path)
        .with_context(|| format!("{}: cannot make the path absolute", req.path.display()))?;
    let resp = client
        .send(client.request(Method::POST, "/images").json(&req))
        .await?;
    follow_import(resp, g, "importing").await
}

/// Follows an import's NDJSON answer (progress bar on a terminal) and prints
/// the outcome.
pub(crate) async fn follow_import(
    resp: reqwest::Response,
    g: &Global,
    verb: &'static str,
) -> anyhow::Result<()> {
    let bar = crate::output::byte_bar(!g.json, 0, verb);
    let mut stream = resp.bytes_stream();
    let mut pending = Vec::new();
    let mut outcome: Option<ImportEvent> = None;
    while let Some(chunk) = stream.next().await {
        pending
            .extend_from_slice(&chunk.context("the site closed the connection during the import")?);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            match serde_json::from_slice::<ImportEvent>(&line)
                .context("unexpected answer from the site")?
            {
                ImportEvent::Progress(p) => {
                    bar.set_length(p.total);
                    bar.set_position(p.done);
                }
                other => outcome = Some(other),
            }
        }
    }
    bar.finish_and_clear();
    match outcome {
        Some(ImportEvent::Done { package }) => {
            if g.json {
                return print_json(&package);
            }
            if package.unchanged {
                let r = package.record.latest();
                println!("{}", package.record.id);
                eprintln!(
                    "unchanged: {} holds what {} revision {} holds; no revision made",
                    r.map_or("-", |r| r.source.path.as_str()),
                    package.record.id,
                    r.map_or(0, |r| r.revision)
                );
                return Ok(());
            }
            let r = package.record.latest();
            let st = r.map(|r| r.stats).unwrap_or_default();
            println!("{}", package.record.id);
            eprintln!(
                "imported {} ({} revision {}): {} in {} chunks, {} newly stored, {} shared with the library ({})",
                package.record.name,
                package.record.id,
                r.map_or(1, |r| r.revision),
                bytes(st.logical_bytes),
                st.chunks,
                bytes(st.new_bytes),
                bytes(st.shared_bytes),
                percent(st.shared_bytes, st.logical_bytes),
            );
            Ok(())
        }
        Some(ImportEvent::Failed { error }) => bail!("{error}"),
        _ => bail!("the site ended the import without a result; see its log"),
    }
}

fn print_view(v: &PackageView) {
    let r = &v.record;
    println!("{}  {}  ({})", r.id, r.name, r.kind.noun());
    println!(
        "  version     {}",
        if r.version.is_empty() {
            "-"
        } else {
            &r.version
        }
    );
    println!(
        "  comment     {}",
        if r.comment.is_empty() {
            "-"
        } else {
            &r.comment
        }
    );
    println!("  created     {}", crate::output::rfc3339(r.created));
    let Some(rev) = r.latest() else { return };
    let state = match v.source_state {
        SourceState::Unchanged => "unchanged since import".to_string(),
        SourceState::Changed => format!(
            "CHANGED since import (not picked up: `ferry content refresh {}` makes it a new revision)",
            r.id
        ),
        SourceState::Missing => "missing".into(),
        SourceState::NotChecked => "not checked".into(),
        SourceState::Serviced => "made by Ferry's servicing".into(),
    };
    print_revision(r, rev, &state);
    print_files(rev);
    print_revision_table(&r.revisions);
    print_images(rev);
}

/// What the newest revision is: lineage, source, checks, WIM.
fn print_revision(r: &PackageRecord, rev: &RevisionRecord, state: &str) {
    if !r.architecture.is_empty() || !r.language.is_empty() {
        println!("  arch/lang   {} {}", r.architecture, r.language);
    }
    println!(
        "  revision    {} (revisions kept: {})",
        rev.revision,
        r.revisions
            .iter()
            .map(|x| x.revision.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(t) = r.target() {
        if t != rev.revision {
            println!(
                "  released    revision {t} goes to DPs; `ferry distribute {}` sends revision {}",
                r.id, rev.revision
            );
        }
    }
    if let Some(sv) = &rev.service {
        println!(
            "  serviced    by job {} from revision {}: applied {}{}",
            sv.job,
            sv.base_revision,
            if sv.applied.is_empty() {
                "nothing".to_string()
            } else {
                sv.applied.join(", ")
            },
            if sv.failed.is_empty() {
                String::new()
            } else {
                format!("; failed {}", sv.failed.join(", "))
            }
        );
        if let Some((before, after)) = sv.optimized {
            println!("  optimized   {} → {}", bytes(before), bytes(after));
        }
    }
    for w in &rev.warnings {
        println!("  warning     {w}");
    }
    println!("  source      {} ({state})", rev.source.path);
    println!("  multicast   {}", r.multicast.describe());
    println!(
        "  verified    {}",
        if rev.verified {
            "every WIM resource matched its SHA-1 when imported"
        } else {
            "no: imported with --no-verify (or by a release that did not check)"
        }
    );
    println!("  source hash {}", rev.source.hash);
    if let Some(i) = rev.exported_index {
        println!("  index       {i} of the source, exported into a WIM of Ferry's own");
    }
    println!(
        "  wim         {} image(s), {} compression, {} chunks, boot index {}",
        rev.wim.image_count,
        rev.wim.compression,
        bytes(u64::from(rev.wim.chunk_size)),
        rev.wim.boot_index
    );
}

/// The revision's files (the first few) and what the library holds of it.
fn print_files(rev: &RevisionRecord) {
    const SHOWN_FILES: usize = 20;
    for f in rev.files.iter().take(SHOWN_FILES) {
        println!("  file        {} ({})", f.path, bytes(f.size));
        println!("              blake3 {}", f.hash);
    }
    if rev.files.len() > SHOWN_FILES {
        println!(
            "  …           {} more files (`--json` lists them all)",
            rev.files.len() - SHOWN_FILES
        );
    }
    let st = rev.stats;
    println!(
        "  library     {} logical in {} chunks from {} segments\n              {} newly stored ({} chunks), {} shared ({})",
        bytes(st.logical_bytes),
        st.chunks,
        st.segments,
        bytes(st.new_bytes),
        st.new_chunks,
        bytes(st.shared_bytes),
        percent(st.shared_bytes, st.logical_bytes)
    );
}

/// Every revision kept: when, from what, how big, how much was new.
fn print_revision_table(revisions: &[RevisionRecord]) {
    let mut revs = table(&[
        "REVISION",
        "CREATED (UTC)",
        "SOURCE",
        "SIZE",
        "NEWLY STORED",
    ]);
    for r in revisions {
        revs.add_row(vec![
            r.revision.to_string(),
            crate::output::when(r.created),
            r.source.path.clone(),
            bytes(r.stats.logical_bytes),
            bytes(r.stats.new_bytes),
        ]);
    }
    println!("{revs}");
}

/// One line per image index (a table of ten columns does not fit 100).
fn print_images(rev: &RevisionRecord) {
    for i in &rev.images {
        let mut facts = vec![];
        for f in [&i.edition, &i.architecture] {
            if !f.is_empty() {
                facts.push(f.clone());
            }
        }
        if !i.languages.is_empty() {
            facts.push(i.languages.join(","));
        }
        if !i.build.is_empty() {
            facts.push(format!("build {}", i.build));
        }
        facts.push(format!(
            "{} files, {} dirs, {}",
            i.file_count,
            i.dir_count,
            bytes(i.total_bytes)
        ));
        println!("  image {:<5} {}: {}", i.index, i.name, facts.join(", "));
        if !i.description.is_empty() {
            println!("              {}", i.description);
        }
    }
}
