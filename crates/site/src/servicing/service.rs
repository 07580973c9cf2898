//! Offline servicing: applying catalog updates to a package's WIM with
//! wimlib, on Ferry's own copy, and committing the result as a new revision
//! of the same package.
//!
//! One run: write the newest revision's WIM from the library into
//! `DATA/work/job-N/` — for an append only its header, tables and
//! metadata, the rest left as holes (wimlib's append reads nothing else);
//! whole, checked against its hash, for a rebuild — apply each
//! update to every image it is for (one `wimlib_update_image` call per
//! image, which wimlib rolls back whole on error), write the WIM back
//! (appending, or rebuilt with `--optimize`), verify it, and import it. An
//! append keeps the old file as its prefix, so only what it wrote is
//! verified (each new blob against its SHA-1) and chunked; the old
//! resources keep their chunks and are only read for the whole-file hash. A
//! rebuilt WIM is verified and imported whole. The other files of an
//! upgrade package are carried over by reference. Nothing is committed
//! unless the run succeeds.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_core::Manifest;
use ferry_store::{Library, StoreError};
use ferry_wim::Wim;

use crate::library::catalog::{
    FileRecord, PackageRecord, RevisionRecord, ServiceRecord, SourceRecord,
};
use crate::library::ingest::Kept;
use crate::library::packages::{self, ImageError};
use crate::servicing::jobs::{
    JobRecord, JobRun, JobState, ServiceRequest, UpdateOutcome, UpdateResult,
};
use crate::servicing::updates::{self, UpdateRecord};

/// Checks a service request before it becomes a job: the package exists
/// and has a WIM, every update is in the catalog, and each applies to at
/// least one of its images now.
pub fn check(
    lib: &Library,
    data: &Path,
    package: &str,
    req: &ServiceRequest,
) -> Result<(), String> {
    if let Some(at) = &req.at {
        let now = time::OffsetDateTime::now_utc();
        if crate::schedule::parse_at(at, now)? < now - time::Duration::MINUTE {
            return Err(format!(
                "--at {at} is in the past (times are UTC; now is {})",
                crate::now()
            ));
        }
    }
    if let Some(expr) = &req.schedule {
        crate::schedule::parse_cron(expr)?;
    }
    let rec = packages::record(lib, package).map_err(|e| e.to_string())?;
    let latest = rec
        .latest()
        .ok_or_else(|| format!("{package} has no revision"))?;
    if rec.wim_path(latest).is_none() {
        return Err(format!(
            "{package} has no {} to service",
            crate::library::catalog::INSTALL_WIM
        ));
    }
    if req.updates.is_empty() && !req.optimize {
        return Err(
            "name the updates to apply with --updates (or ask for --optimize alone)".into(),
        );
    }
    let mut seen = BTreeSet::new();
    for id in &req.updates {
        if !seen.insert(id) {
            return Err(format!("{id} is named twice in --updates"));
        }
        let u = updates::read(data, id).map_err(|e| e.to_string())?;
        let reasons: Vec<String> = latest
            .images
            .iter()
            .filter_map(|img| updates::applicability(&u.manifest, img).err())
            .collect();
        if reasons.len() == latest.images.len() {
            return Err(format!(
                "{id} does not apply to {package}: {}",
                reasons.join("; ")
            ));
        }
    }
    Ok(())
}

/// A failed run's reason.
struct Stop(String);

impl From<ImageError> for Stop {
    fn from(e: ImageError) -> Self {
        Stop(e.to_string())
    }
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop(e.to_string())
    }
}

/// Runs one servicing job; never panics, the outcome is in the result.
pub fn run(lib: &Library, data: &Path, job: &JobRecord) -> JobRun {
    let t0 = Instant::now();
    let mut run = JobRun::start();
    let work = job_dir(data, job.id);
    let result = service(lib, data, job, &work, &mut run);
    let _ = std::fs::remove_dir_all(&work);
    // Skips are decided before anything is applied; report in the order asked.
    let asked = |id: &str| job.request.updates.iter().position(|u| u == id);
    run.updates.sort_by_key(|u| asked(&u.id));
    if let Err(Stop(reason)) = result {
        run.outcome = JobState::Failed;
        run.error = Some(reason);
        run.revision = None;
    }
    run.seconds = t0.elapsed().as_secs_f64();
    run.finished = Some(crate::now());
    run
}

/// For an append: writes of the WIM `m` describes only what wimlib reads
/// when it appends (header, blob table, XML, metadata resources), each
/// chunk checked against its id, the rest left as holes. False (and
/// nothing to rely on at `dest`) when the WIM needs a whole copy: an
/// integrity table, which wimlib recomputes over the whole file, or solid
/// resources.
fn sparse_copy(lib: &Library, m: &Manifest, dest: &Path) -> Result<bool, Stop> {
    use ferry_core::SegmentKind as K;
    if m.segments.iter().any(|s| s.kind == K::Integrity) {
        return Ok(false);
    }
    let wanted = |s: &ferry_core::manifest::SegmentRecord| {
        matches!(s.kind, K::Header | K::BlobTable | K::Xml | K::Metadata)
    };
    ferry_store::file::write_sparse(dest, m, wanted, |c, buf| {
        buf.extend_from_slice(&lib.read_chunk(&c.id)?);
        Ok::<(), StoreError>(())
    })
    .map_err(|e| Stop(e.to_string()))?;
    let layout = layout_of(dest, &format!("the work copy of {}", m.path))?;
    let solid = layout
        .blobs
        .iter()
        .any(|b| b.reshdr.flags & ferry_wim::layout::RESHDR_FLAG_SOLID != 0);
    Ok(!solid)
}

/// Writes the file `m` describes to `dest` from the library and checks it
/// against its whole-file hash (which a damaged chunk cannot pass).
fn rebuild_file(lib: &Library, m: &Manifest, dest: &Path) -> Result<(), Stop> {
    let scratch = ferry_store::file::Durability::Scratch;
    ferry_store::file::write_file(dest, m, scratch, |c, buf| {
        lib.with_chunk(&c.id, |b| buf.extend_from_slice(b))
    })
    .map_err(|e| match e {
        ferry_store::file::WriteError::Mismatch { .. } => Stop(format!(
            "{} rebuilt from the library does not match its hash; run `ferry content verify`",
            m.path
        )),
        other => Stop(other.to_string()),
    })
}

fn outcome(
    u: Option<&UpdateRecord>,
    id: &str,
    result: UpdateResult,
    detail: Option<String>,
) -> UpdateOutcome {
    UpdateOutcome {
        id: id.to_string(),
        title: u.map(|u| u.manifest.title.clone()).unwrap_or_default(),
        result,
        detail,
        images: Vec::new(),
    }
}

/// The failed updates of a run with their reasons, for the job's error.
fn failures(run: &JobRun) -> String {
    run.updates
        .iter()
        .filter(|u| u.result == UpdateResult::Failed)
        .map(|u| format!("{}: {}", u.id, u.detail.as_deref().unwrap_or("failed")))
        .collect::<Vec<_>>()
        .join("; ")
}

fn service(
    lib: &Library,
    data: &Path,
    job: &JobRecord,
    work: &Path,
    run: &mut JobRun,
) -> Result<(), Stop> {
    let req = &job.request;
    let rec = packages::record(lib, &job.package)?;
    let base = rec
        .latest()
        .ok_or_else(|| Stop(format!("{} has no revision", job.package)))?
        .clone();
    run.base_revision = Some(base.revision);
    let wim_path = rec
        .wim_path(&base)
        .ok_or_else(|| Stop(format!("{} has no WIM to service", job.package)))?
        .to_string();
    let applied_before = rec.applied_updates(base.revision);
    let catalog = updates::list(data).map_err(|e| Stop(e.to_string()))?;
    let superseded_before = updates::superseded_by(&applied_before, &catalog);

    let plan = plan_updates(data, req, &base, &applied_before, &superseded_before, run)?;
    if plan.is_empty() && nothing_to_do(req.optimize, &base, run)? {
        run.outcome = JobState::NothingToDo;
        return Ok(());
    }

    let manifests = lib.manifests(&job.package, base.revision)?;
    let old = manifests
        .iter()
        .find(|m| m.path == wim_path)
        .ok_or_else(|| Stop(format!("{wim_path} is not in revision {}", base.revision)))?;
    run.size_before = Some(old.size);
    let t_rebuild = Instant::now();
    let (copy, sparse) = work_copy(lib, old, work, req.optimize)?;
    let t_update = Instant::now();
    let mut wim = Wim::open_for_update(&copy).map_err(|e| Stop(e.to_string()))?;

    let (applied, failed) = apply_updates(&mut wim, data, req, &plan, &catalog, run)?;
    if applied.is_empty() && !req.optimize && nothing_to_do(false, &base, run)? {
        run.outcome = JobState::NothingToDo;
        return Ok(());
    }
    let t_write = Instant::now();
    let appended = !req.optimize;
    let (wim_info, image_infos, t_verify) = write_verified(wim, &copy, appended, sparse, old.size)?;
    run.size_after = std::fs::metadata(&copy).map(|m| m.len()).ok();

    // The new revision: the WIM read again, every other file carried over.
    let t_import = Instant::now();
    let kept = appended.then(|| Kept::after_append(lib, old));
    let shown = format!("job {} copy of {}", job.id, wim_path);
    let (import, new_wim) = ingest_copy(lib, &copy, &wim_path, &shown, kept.as_ref())?;
    let new_manifests: Vec<Manifest> = manifests
        .iter()
        .map(|m| {
            if m.path == wim_path {
                new_wim.clone()
            } else {
                m.clone()
            }
        })
        .collect();
    let mut all_applied = applied_before.clone();
    all_applied.extend(applied.iter().cloned());
    let number = base.revision + 1;
    let mut record: PackageRecord = rec.clone();
    let service = ServiceRecord {
        job: job.id,
        base_revision: base.revision,
        applied,
        all_applied,
        failed: failed.clone(),
        optimized: req
            .optimize
            .then(|| (old.size, run.size_after.unwrap_or(0))),
    };
    let files = new_manifests.iter().map(FileRecord::of).collect();
    record.revisions.push(serviced_revision(
        &job.package,
        &base,
        &new_wim,
        service,
        (wim_info, image_infos),
        files,
    ));
    let release = if req.distribute {
        packages::Release::Newest
    } else {
        packages::Release::Unchanged
    };
    packages::commit(import, &mut record, &new_manifests, release)?;
    let secs = |from: Instant, to: Instant| (to - from).as_secs_f64();
    let end = Instant::now();
    tracing::info!(
        job = job.id,
        sparse,
        copy_s = secs(t_rebuild, t_update),
        update_s = secs(t_update, t_write),
        write_s = secs(t_write, t_verify),
        verify_s = secs(t_verify, t_import),
        import_s = secs(t_import, end),
        "servicing job committed revision {number}"
    );
    // Committed: from here on the run succeeded, whatever else fails.
    run.revision = Some(number);
    run.distributed = req.distribute;
    run.outcome = if failed.is_empty() {
        JobState::Succeeded
    } else {
        JobState::PartlySucceeded
    };
    if let Err(e) = lib.try_collect() {
        tracing::warn!(error = %e, "unreferenced chunks are left for the next collection");
    }
    Ok(())
}

/// With no update to apply: whether the job has nothing to do (no
/// `--optimize`, or the image is optimized already); when every update
/// asked for failed, the job stops with their reasons.
fn nothing_to_do(optimize: bool, base: &RevisionRecord, run: &JobRun) -> Result<bool, Stop> {
    if optimize {
        // A cron job with --optimize alone would otherwise rebuild an
        // unchanged image into a new revision at every run.
        return Ok(base
            .service
            .as_ref()
            .is_some_and(|s| s.optimized.is_some() && s.applied.is_empty()));
    }
    let why = failures(run);
    if !why.is_empty() {
        return Err(Stop(format!(
            "no update applied ({why}); no revision was made"
        )));
    }
    Ok(true)
}

/// Ferry's own copy of the WIM `old` in `work`: sparse (only the parts
/// wimlib reads when it appends) unless `optimize` rewrites it whole.
/// Returns the copy and whether it is sparse.
fn work_copy(
    lib: &Library,
    old: &Manifest,
    work: &Path,
    optimize: bool,
) -> Result<(PathBuf, bool), Stop> {
    std::fs::create_dir_all(work).map_err(|e| Stop(format!("{}: {e}", work.display())))?;
    let copy = work.join("image.wim");
    let sparse = !optimize && sparse_copy(lib, old, &copy)?;
    if !sparse {
        rebuild_file(lib, old, &copy)?;
    }
    Ok((copy, sparse))
}

/// The serviced `copy` read into the library as `wim_path` (what `kept`
/// says is unchanged is not read again); on failure the chunks it added
/// are collected.
fn ingest_copy<'l>(
    lib: &'l Library,
    copy: &Path,
    wim_path: &str,
    shown: &str,
    kept: Option<&Kept>,
) -> Result<(ferry_store::Import<'l>, Manifest), Stop> {
    let mut import = lib.begin_import();
    match packages::ingest_path(
        &mut import,
        copy,
        wim_path,
        packages::Read::Wim,
        shown,
        kept,
        |_| {},
    ) {
        Ok(m) => Ok((import, m)),
        Err(e) => {
            drop(import);
            lib.try_collect()?;
            Err(e.into())
        }
    }
}

/// The revision after `base` that servicing made: `new_wim` its image
/// (with `wim`'s properties and images), `service` what was done, `files`
/// every file of it.
fn serviced_revision(
    package: &str,
    base: &RevisionRecord,
    new_wim: &Manifest,
    service: ServiceRecord,
    wim: (ferry_wim::WimInfo, Vec<ferry_wim::ImageInfo>),
    files: Vec<FileRecord>,
) -> RevisionRecord {
    RevisionRecord {
        // The appended resources were checked; the others are the base's.
        verified: base.verified,
        revision: base.revision + 1,
        created: crate::now(),
        source: SourceRecord {
            path: format!(
                "{package} revision {} serviced by job {}",
                base.revision, service.job
            ),
            size: new_wim.size,
            modified_ns: 0,
            hash: new_wim.hash,
        },
        exported_index: base.exported_index,
        wim: wim.0,
        images: wim.1,
        files,
        stats: Default::default(),
        service: Some(service),
        warnings: base.warnings.clone(),
    }
}

/// Decides what to apply, in the order asked: each update read from the
/// catalog with the images it applies to; those already applied, superseded
/// or not applicable are recorded as skipped, a missing one as failed
/// (which stops the job unless `--continue-on-error`).
fn plan_updates(
    data: &Path,
    req: &ServiceRequest,
    base: &RevisionRecord,
    applied_before: &[String],
    superseded_before: &std::collections::BTreeMap<String, String>,
    run: &mut JobRun,
) -> Result<Vec<(UpdateRecord, Vec<u32>)>, Stop> {
    let mut plan: Vec<(UpdateRecord, Vec<u32>)> = Vec::new();
    for id in &req.updates {
        let u = match updates::read(data, id) {
            Ok(u) => u,
            Err(e) => {
                run.updates
                    .push(outcome(None, id, UpdateResult::Failed, Some(e.to_string())));
                if req.continue_on_error {
                    continue;
                }
                return Err(Stop(format!("{id}: {e}")));
            }
        };
        let skip = if applied_before.contains(id) {
            Some(format!("already applied (revision {})", base.revision))
        } else {
            superseded_before
                .get(id)
                .map(|by| format!("superseded by {by}, already applied"))
        };
        if let Some(why) = skip {
            run.updates
                .push(outcome(Some(&u), id, UpdateResult::Skipped, Some(why)));
            continue;
        }
        let mut targets = Vec::new();
        let mut reasons = Vec::new();
        for img in &base.images {
            match updates::applicability(&u.manifest, img) {
                Ok(()) => targets.push(img.index),
                Err(r) => reasons.push(r),
            }
        }
        if targets.is_empty() {
            run.updates.push(outcome(
                Some(&u),
                id,
                UpdateResult::Skipped,
                Some(format!("not applicable: {}", reasons.join("; "))),
            ));
            continue;
        }
        plan.push((u, targets));
    }
    Ok(plan)
}

/// Applies the planned updates to the open copy, in order, recording each
/// outcome. Returns the updates applied and those failed; an update that
/// failed on one image after applying to another, or a failure without
/// `--continue-on-error`, stops the job.
fn apply_updates(
    wim: &mut Wim,
    data: &Path,
    req: &ServiceRequest,
    plan: &[(UpdateRecord, Vec<u32>)],
    catalog: &[UpdateRecord],
    run: &mut JobRun,
) -> Result<(Vec<String>, Vec<String>), Stop> {
    let mut applied = Vec::new();
    // Updates that left the catalog already failed while planning.
    let mut failed: Vec<String> = run
        .updates
        .iter()
        .filter(|u| u.result == UpdateResult::Failed)
        .map(|u| u.id.clone())
        .collect();
    let mut stopped = false;
    for (u, targets) in plan {
        let id = &u.manifest.id;
        if stopped {
            run.updates.push(outcome(
                Some(u),
                id,
                UpdateResult::NotRun,
                Some("an earlier update failed".into()),
            ));
            continue;
        }
        // Applying it after one that supersedes it would undo that one.
        if let Some(by) = updates::superseded_by(&applied, catalog).get(id) {
            run.updates.push(outcome(
                Some(u),
                id,
                UpdateResult::Skipped,
                Some(format!("superseded by {by}, applied earlier in this job")),
            ));
            continue;
        }
        let folder = updates::folder(data, id).map_err(|e| Stop(e.to_string()))?;
        let cmds = u.manifest.commands(&folder);
        let mut done = Vec::new();
        let mut error = None;
        for &index in targets.iter() {
            match wim.update_image(index, &cmds) {
                Ok(()) => done.push(index),
                Err(e) => {
                    error = Some(e.message);
                    break;
                }
            }
        }
        match error {
            None => {
                let mut o = outcome(Some(u), id, UpdateResult::Applied, None);
                o.images = done;
                run.updates.push(o);
                applied.push(id.clone());
            }
            Some(reason) if !done.is_empty() => {
                // wimlib rolled back the failing image only; the others
                // cannot be undone in this copy, so nothing is committed.
                run.updates.push(outcome(
                    Some(u),
                    id,
                    UpdateResult::Failed,
                    Some(reason.clone()),
                ));
                return Err(Stop(format!(
                    "{id} applied to image(s) {done:?} but failed on another ({reason}); a half-applied update cannot be kept, nothing was committed"
                )));
            }
            Some(reason) => {
                run.updates.push(outcome(
                    Some(u),
                    id,
                    UpdateResult::Failed,
                    Some(reason.clone()),
                ));
                failed.push(id.clone());
                if !req.continue_on_error {
                    stopped = true;
                }
            }
        }
    }
    if stopped {
        let why = failures(run);
        return Err(Stop(format!(
            "{why}; the job stopped and no revision was made (--continue-on-error applies the rest)"
        )));
    }
    Ok((applied, failed))
}

/// Writes the serviced copy (appended, or rebuilt when optimizing) and
/// checks it: the appended blobs against their SHA-1, or the whole WIM.
/// Returns its WIM and image properties, and when the check began.
fn write_verified(
    mut wim: Wim,
    copy: &Path,
    appended: bool,
    sparse: bool,
    old_size: u64,
) -> Result<(ferry_wim::WimInfo, Vec<ferry_wim::ImageInfo>, Instant), Stop> {
    wim.overwrite(!appended).map_err(|e| Stop(e.to_string()))?;
    drop(wim);
    let t_verify = Instant::now();
    let mut check =
        Wim::open(copy).map_err(|e| Stop(format!("the serviced WIM does not open: {e}")))?;
    if !appended || !verify_appended(copy, old_size)? {
        if sparse {
            return Err(Stop(
                "the serviced WIM has a new blob in a solid resource, which Ferry verifies only in a whole copy; service it with --optimize".into(),
            ));
        }
        check
            .verify()
            .map_err(|e| Stop(format!("the serviced WIM does not verify: {e}")))?;
    }
    Ok((check.info(), check.images(), t_verify))
}

/// Checks the blobs an append wrote past `old_len` against their SHA-1.
/// False when they cannot be checked this way (a solid resource): the
/// caller verifies the whole WIM.
fn verify_appended(wim: &Path, old_len: u64) -> Result<bool, Stop> {
    let layout = layout_of(wim, "the serviced WIM")?;
    match ferry_wim::verify_blobs_from(wim, &layout, old_len) {
        Ok(Some(c)) => {
            tracing::debug!(
                blobs = c.blobs,
                bytes = c.bytes,
                "verified the appended blobs"
            );
            Ok(true)
        }
        Ok(None) => Ok(false),
        Err(e) => Err(Stop(format!("the serviced WIM does not verify: {e}"))),
    }
}

/// The header and blob table of the WIM at `path` (`what` names it in the
/// error).
fn layout_of(path: &Path, what: &str) -> Result<ferry_wim::Layout, Stop> {
    let unreadable = |e: String| Stop(format!("{what} cannot be read: {e}"));
    let mut f = std::fs::File::open(path).map_err(|e| unreadable(e.to_string()))?;
    let len = f.metadata().map_err(|e| unreadable(e.to_string()))?.len();
    ferry_wim::Layout::read(&mut f, len).map_err(|e| unreadable(e.to_string()))
}

/// Where a job's work files go.
pub fn job_dir(data: &Path, job: u64) -> PathBuf {
    packages::work_dir(data).join(format!("job-{job}"))
}

/// One update as `image updates` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpdateRow {
    /// Update id.
    pub id: String,
    /// Title.
    pub title: String,
    /// Classification.
    pub classification: updates::Classification,
    /// Release date.
    pub released: String,
    /// `applicable`, `applied` or `superseded`.
    pub state: String,
    /// For superseded ones, by which applied update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Image indexes it is for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<u32>,
}

/// What `ferry image updates ID` shows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpdatesView {
    /// The package.
    pub package: String,
    /// Its newest revision, which the rows are about.
    pub revision: u32,
    /// Applicable, not applied yet, in release order.
    pub applicable: Vec<UpdateRow>,
    /// Applied by Ferry to reach this revision.
    pub applied: Vec<UpdateRow>,
    /// Not applied, but superseded by an applied one.
    pub superseded: Vec<UpdateRow>,
    /// Catalog updates not for any of its images.
    pub not_applicable: usize,
}

/// The updates of the catalog as they stand for package `id`.
pub fn image_updates(lib: &Library, data: &Path, id: &str) -> Result<UpdatesView, String> {
    let rec = packages::record(lib, id).map_err(|e| e.to_string())?;
    let latest = rec
        .latest()
        .ok_or_else(|| format!("{id} has no revision"))?;
    if rec.wim_path(latest).is_none() {
        return Err(format!(
            "{id} has no {} to service",
            crate::library::catalog::INSTALL_WIM
        ));
    }
    let catalog = updates::list(data).map_err(|e| e.to_string())?;
    let applied = rec.applied_updates(latest.revision);
    let superseded = updates::superseded_by(&applied, &catalog);
    let mut view = UpdatesView {
        package: id.to_string(),
        revision: latest.revision,
        applicable: Vec::new(),
        applied: Vec::new(),
        superseded: Vec::new(),
        not_applicable: 0,
    };
    for u in &catalog {
        let m = &u.manifest;
        let images: Vec<u32> = latest
            .images
            .iter()
            .filter(|i| updates::applicability(m, i).is_ok())
            .map(|i| i.index)
            .collect();
        let mut row = UpdateRow {
            id: m.id.clone(),
            title: m.title.clone(),
            classification: m.classification,
            released: m.released.clone(),
            state: String::new(),
            detail: None,
            images,
        };
        if applied.contains(&m.id) {
            row.state = "applied".into();
            view.applied.push(row);
        } else if let Some(by) = superseded.get(&m.id) {
            row.state = "superseded".into();
            row.detail = Some(format!("superseded by {by}"));
            view.superseded.push(row);
        } else if row.images.is_empty() {
            view.not_applicable += 1;
        } else {
            row.state = "applicable".into();
            view.applicable.push(row);
        }
    }
    Ok(view)
}

/// One line of an image's servicing history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryEntry {
    /// The update.
    pub update: String,
    /// Its title.
    pub title: String,
    /// The job.
    pub job: u64,
    /// When the run ended (or started, if it has not).
    #[serde(with = "time::serde::rfc3339")]
    pub time: time::OffsetDateTime,
    /// What happened to the update.
    pub result: UpdateResult,
    /// Why, for skipped and failed ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The revision the run made, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
}

/// What `ferry image history ID` shows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryView {
    /// The package.
    pub package: String,
    /// Its newest revision.
    pub revision: u32,
    /// Updates Ferry applied to reach it, oldest first.
    pub applied: Vec<String>,
    /// Every update of every run of every job on the package, oldest first.
    pub entries: Vec<HistoryEntry>,
    /// A remark for operators, when the history says less than it seems.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The servicing history of package `id` from its jobs.
pub fn history(lib: &Library, jobs: &[JobRecord], id: &str) -> Result<HistoryView, String> {
    let rec = packages::record(lib, id).map_err(|e| e.to_string())?;
    let latest = rec
        .latest()
        .ok_or_else(|| format!("{id} has no revision"))?;
    let mut entries = Vec::new();
    for job in jobs.iter().filter(|j| j.package == id) {
        for run in &job.runs {
            for u in &run.updates {
                entries.push(HistoryEntry {
                    update: u.id.clone(),
                    title: u.title.clone(),
                    job: job.id,
                    time: run.finished.unwrap_or(run.started),
                    result: u.result,
                    detail: u.detail.clone(),
                    revision: run.revision,
                });
            }
        }
    }
    let note = if entries.is_empty() {
        Some(format!(
            "no updates applied by Ferry: revision {} is as it was imported; servicing done by other tools before import is not recorded",
            latest.revision
        ))
    } else if latest.service.is_none() {
        Some(format!(
            "revision {} was imported from outside after the runs below; Ferry does not know which of their updates it holds",
            latest.revision
        ))
    } else {
        None
    };
    Ok(HistoryView {
        package: id.to_string(),
        revision: latest.revision,
        applied: rec.applied_updates(latest.revision),
        entries,
        note,
    })
}
