//! Servicing jobs: what `ferry image service` asked for, when it runs, and
//! how each run went.
//!
//! Jobs live in `DATA/jobs.json`, rewritten whole (synced, renamed) on every
//! change. [`Jobs::scheduler`] runs on the site server: it sleeps until the
//! next job is due (or a job is added or cancelled), then runs due jobs one
//! at a time on a blocking thread. A job given `--schedule` (cron) stays
//! scheduled after each run, for the next occurrence; the others end with
//! their outcome. Times are UTC.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::schedule::{next_occurrence, parse_at};

pub use ferry_api::requests::ServiceRequest;

/// The jobs file inside the data folder.
pub const JOBS_FILE: &str = "jobs.json";
/// Runs kept per job (a cron job runs again and again).
pub const MAX_RUNS_KEPT: usize = 50;

/// Why a job request or change was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request is not valid.
    #[error("{0}")]
    Bad(String),
    /// No such job.
    #[error("no job {0}; `ferry jobs` lists them")]
    NoJob(u64),
    /// The job cannot change any more.
    #[error("job {id} is {state} and can no longer be cancelled")]
    Started {
        /// The job.
        id: u64,
        /// Its state.
        state: String,
    },
    /// The jobs file could not be written or read.
    #[error("{path}: {detail}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

/// Where a job stands, or how a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Waiting for its time.
    Scheduled,
    /// Running now.
    Running,
    /// Every update it was asked for is in the new revision (or was skipped
    /// as already applied or superseded).
    Succeeded,
    /// With `--continue-on-error`: some updates failed, the others are in
    /// the new revision.
    PartlySucceeded,
    /// Nothing was committed.
    Failed,
    /// Cancelled before it started.
    Cancelled,
    /// Every update was already applied or superseded; no revision made.
    NothingToDo,
}

impl JobState {
    /// The kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::PartlySucceeded => "partly-succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::NothingToDo => "nothing-to-do",
        }
    }

    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Scheduled | JobState::Running)
    }
}

/// What happened to one update in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateResult {
    /// In the new revision.
    Applied,
    /// Not applied: already there, superseded, or not for this image.
    Skipped,
    /// wimlib refused it (or it left the catalog).
    Failed,
    /// Not tried: an earlier update failed and the job stopped.
    NotRun,
}

/// One update's outcome in a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOutcome {
    /// Update id.
    pub id: String,
    /// Its title, when it is in the catalog.
    pub title: String,
    /// What happened.
    pub result: UpdateResult,
    /// Why (for skipped and failed ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Image indexes it was applied to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<u32>,
}

/// One run of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRun {
    /// When it started (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub started: OffsetDateTime,
    /// When it ended.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub finished: Option<OffsetDateTime>,
    /// How it ended.
    pub outcome: JobState,
    /// The revision it worked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_revision: Option<u32>,
    /// The revision it made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
    /// Per update, in the order asked.
    #[serde(default)]
    pub updates: Vec<UpdateOutcome>,
    /// Bytes of the WIM before servicing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_before: Option<u64>,
    /// Bytes of the WIM after servicing (after the rebuild with `--optimize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_after: Option<u64>,
    /// Whether the new revision was released to the DPs.
    #[serde(default)]
    pub distributed: bool,
    /// Revisions removed afterwards because no DP used them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<u32>,
    /// Why the run failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Wall time of the run.
    #[serde(default)]
    pub seconds: f64,
}

impl JobRun {
    /// A run starting now.
    pub fn start() -> Self {
        Self {
            started: crate::now(),
            finished: None,
            outcome: JobState::Running,
            base_revision: None,
            revision: None,
            updates: Vec::new(),
            size_before: None,
            size_after: None,
            distributed: false,
            pruned: Vec::new(),
            error: None,
            seconds: 0.0,
        }
    }
}

/// A servicing job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// 1, 2, … on this site.
    pub id: u64,
    /// The package it services.
    pub package: String,
    /// What was asked.
    #[serde(flatten)]
    pub request: ServiceRequest,
    /// When it was created (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// Where it stands.
    pub state: JobState,
    /// When it runs next (RFC 3339), while scheduled.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub next_run: Option<OffsetDateTime>,
    /// Its runs, oldest first.
    #[serde(default)]
    pub runs: Vec<JobRun>,
}

impl JobRecord {
    /// The latest run.
    pub fn last_run(&self) -> Option<&JobRun> {
        self.runs.last()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct JobsFile {
    next_id: u64,
    jobs: Vec<JobRecord>,
    /// Entries this release cannot read (damaged, or from a newer one):
    /// kept as they were and written back, never dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unreadable: Vec<serde_json::Value>,
}

/// `jobs.json` read entry by entry: one that cannot be read is set aside
/// (and logged), not a reason to lose the others.
#[derive(Deserialize)]
struct RawJobsFile {
    #[serde(default)]
    next_id: u64,
    #[serde(default)]
    jobs: Vec<serde_json::Value>,
    #[serde(default)]
    unreadable: Vec<serde_json::Value>,
}

impl JobsFile {
    fn parse(bytes: &[u8], path: &Path) -> Result<Self, JobError> {
        let raw: RawJobsFile = serde_json::from_slice(bytes).map_err(|e| JobError::Storage {
            path: path.to_path_buf(),
            detail: format!("not a valid jobs file: {e}"),
        })?;
        let mut out = JobsFile {
            next_id: raw.next_id,
            jobs: Vec::new(),
            unreadable: raw.unreadable,
        };
        for v in raw.jobs {
            match serde_json::from_value::<JobRecord>(v.clone()) {
                Ok(j) => out.jobs.push(j),
                Err(e) => {
                    tracing::error!(
                        path = %path.display(),
                        job = %v.get("id").map(ToString::to_string).unwrap_or_default(),
                        error = %e,
                        "a job in the jobs file cannot be read; it is kept aside"
                    );
                    out.unreadable.push(v);
                }
            }
        }
        // `next_id` is the last id given; new ones stay clear of every id
        // in the file, readable or not.
        let highest = out
            .jobs
            .iter()
            .map(|j| j.id)
            .chain(out.unreadable.iter().filter_map(|v| v.get("id")?.as_u64()))
            .max()
            .unwrap_or(0);
        out.next_id = out.next_id.max(highest);
        Ok(out)
    }
}

/// The job list with its lock and wake-up signal.
pub struct Jobs {
    path: PathBuf,
    /// The list as last written.
    file: Mutex<JobsFile>,
    /// Held by the one change being made and written.
    writing: Mutex<()>,
    wake: Notify,
}

impl Jobs {
    /// Loads `DATA/jobs.json`. A job left running by a site that stopped is
    /// settled: `committed(package, job)` tells whether its revision made it
    /// into the library (the commit is atomic), as `(revision, partly)`; if
    /// so the run succeeded, else it failed and nothing of it was kept.
    pub fn load(
        data: &Path,
        committed: impl Fn(&str, u64) -> Option<(u32, bool)>,
    ) -> Result<Self, JobError> {
        let path = data.join(JOBS_FILE);
        let mut file: JobsFile = match std::fs::read(&path) {
            Ok(b) => JobsFile::parse(&b, &path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => JobsFile::default(),
            Err(e) => {
                return Err(JobError::Storage {
                    path,
                    detail: e.to_string(),
                })
            }
        };
        let mut changed = false;
        for j in &mut file.jobs {
            if j.state == JobState::Running {
                let done = committed(&j.package, j.id);
                let outcome = match done {
                    Some((_, false)) => JobState::Succeeded,
                    Some((_, true)) => JobState::PartlySucceeded,
                    None => JobState::Failed,
                };
                if let Some(r) = j.runs.last_mut() {
                    r.outcome = outcome;
                    r.finished = Some(crate::now());
                    r.revision = done.map(|(rev, _)| rev);
                    r.error = Some(match done {
                        Some(_) => "the site server stopped after the job committed its revision; the update outcomes of this run were not recorded".into(),
                        None => "the site server stopped while the job ran; nothing of it was kept".into(),
                    });
                }
                j.state = if j.request.schedule.is_some() {
                    JobState::Scheduled
                } else {
                    outcome
                };
                changed = true;
            }
        }
        let jobs = Self {
            path,
            file: Mutex::new(file),
            writing: Mutex::new(()),
            wake: Notify::new(),
        };
        if changed {
            let f = jobs.file.lock().unwrap_or_else(|p| p.into_inner()).clone();
            jobs.save(&f)?;
        }
        Ok(jobs)
    }

    fn save(&self, f: &JobsFile) -> Result<(), JobError> {
        crate::save_json(&self.path, f).map_err(|e| JobError::Storage {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    /// Runs `f` on a copy of the list and keeps the result only if it
    /// succeeds and is written. Changes are made and written one at a time
    /// (`writing`), so they land in order; readers see the list as last
    /// written and never wait for the disk; the write runs off the async
    /// runtime's threads.
    fn update<T>(
        &self,
        f: impl FnOnce(&mut JobsFile) -> Result<T, JobError>,
    ) -> Result<T, JobError> {
        crate::off_runtime(|| {
            let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
            let mut next = self.file.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let out = f(&mut next)?;
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            if next != *file {
                drop(file);
                self.save(&next)?;
                file = self.file.lock().unwrap_or_else(|p| p.into_inner());
                *file = next;
            }
            Ok(out)
        })
    }

    /// Records a new job for `package` (checked by the caller) and wakes the
    /// scheduler.
    pub fn create(&self, package: &str, request: ServiceRequest) -> Result<JobRecord, JobError> {
        let now = OffsetDateTime::now_utc();
        if request.at.is_some() && request.schedule.is_some() {
            return Err(JobError::Bad("give --at or --schedule, not both".into()));
        }
        let next = match (&request.at, &request.schedule) {
            (Some(at), _) => parse_at(at, now).map_err(JobError::Bad)?,
            (_, Some(expr)) => next_occurrence(expr, now).map_err(JobError::Bad)?,
            _ => now,
        };
        let job = self.update(|f| {
            f.next_id = f
                .next_id
                .max(f.jobs.iter().map(|j| j.id).max().unwrap_or(0))
                + 1;
            let job = JobRecord {
                id: f.next_id,
                package: package.to_string(),
                request,
                created: crate::to_the_second(now),
                state: JobState::Scheduled,
                next_run: Some(crate::to_the_second(next)),
                runs: Vec::new(),
            };
            f.jobs.push(job.clone());
            Ok(job)
        })?;
        self.wake.notify_one();
        Ok(job)
    }

    /// Cancels a job that has not started (or the future runs of a cron job
    /// between runs).
    pub fn cancel(&self, id: u64) -> Result<JobRecord, JobError> {
        let job = self.update(|f| {
            let j = f
                .jobs
                .iter_mut()
                .find(|j| j.id == id)
                .ok_or(JobError::NoJob(id))?;
            if j.state != JobState::Scheduled {
                return Err(JobError::Started {
                    id,
                    state: j.state.name().into(),
                });
            }
            j.state = JobState::Cancelled;
            j.next_run = None;
            Ok(j.clone())
        })?;
        self.wake.notify_one();
        Ok(job)
    }

    /// One job.
    pub fn get(&self, id: u64) -> Result<JobRecord, JobError> {
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.jobs
            .iter()
            .find(|j| j.id == id)
            .cloned()
            .ok_or(JobError::NoJob(id))
    }

    /// Every job, oldest first; only `package`'s when given.
    pub fn list(&self, package: Option<&str>) -> Vec<JobRecord> {
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.jobs
            .iter()
            .filter(|j| package.is_none_or(|p| p == j.package))
            .cloned()
            .collect()
    }

    /// Whether any job of `package` is scheduled or running.
    pub fn pending_for(&self, package: &str) -> Vec<u64> {
        self.list(Some(package))
            .into_iter()
            .filter(|j| !j.state.is_final())
            .map(|j| j.id)
            .collect()
    }

    /// Takes the first due job and marks it running.
    fn take_due(&self, now: OffsetDateTime) -> Result<Option<JobRecord>, JobError> {
        self.update(|f| {
            let due = f
                .jobs
                .iter_mut()
                .find(|j| j.state == JobState::Scheduled && j.next_run.is_some_and(|t| t <= now));
            Ok(due.map(|j| {
                j.state = JobState::Running;
                j.runs.push(JobRun::start());
                j.clone()
            }))
        })
    }

    /// When the earliest scheduled job is due.
    fn next_due(&self) -> Option<OffsetDateTime> {
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.jobs
            .iter()
            .filter(|j| j.state == JobState::Scheduled)
            .filter_map(|j| j.next_run)
            .min()
    }

    /// Records the end of a run; a cron job is scheduled again.
    fn finish(&self, id: u64, run: JobRun) -> Result<(), JobError> {
        self.update(|f| {
            let j = f
                .jobs
                .iter_mut()
                .find(|j| j.id == id)
                .ok_or(JobError::NoJob(id))?;
            let outcome = run.outcome;
            match j.runs.last_mut() {
                Some(last) => *last = run,
                None => j.runs.push(run),
            }
            // A cron job keeps its most recent runs only.
            if j.runs.len() > MAX_RUNS_KEPT {
                let extra = j.runs.len() - MAX_RUNS_KEPT;
                j.runs.drain(..extra);
            }
            j.next_run = None;
            j.state = outcome;
            if let Some(expr) = &j.request.schedule {
                if let Ok(next) = next_occurrence(expr, OffsetDateTime::now_utc()) {
                    j.state = JobState::Scheduled;
                    j.next_run = Some(crate::to_the_second(next));
                }
            }
            Ok(())
        })
    }

    /// Runs due jobs, one at a time, for as long as the site runs. `run`
    /// does the work of one run on a blocking thread.
    pub async fn scheduler(
        self: Arc<Self>,
        run: impl Fn(&JobRecord) -> JobRun + Send + Sync + 'static,
    ) {
        let run = Arc::new(run);
        loop {
            let now = OffsetDateTime::now_utc();
            match self.take_due(now) {
                Ok(Some(job)) => {
                    tracing::info!(job = job.id, package = %job.package, updates = ?job.request.updates, "servicing job started");
                    let r = run.clone();
                    let j = job.clone();
                    let result = tokio::task::spawn_blocking(move || r(&j)).await;
                    let mut done = result.unwrap_or_else(|e| {
                        let mut failed = JobRun::start();
                        failed.outcome = JobState::Failed;
                        failed.error = Some(format!("the job's thread failed: {e}"));
                        failed
                    });
                    done.finished.get_or_insert_with(crate::now);
                    tracing::info!(job = job.id, outcome = done.outcome.name(), revision = ?done.revision, error = ?done.error, "servicing job ended");
                    if let Err(e) = self.finish(job.id, done) {
                        tracing::error!(job = job.id, error = %e, "cannot record the job's outcome");
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "cannot update the jobs file"),
            }
            let wait = self
                .next_due()
                .map(|t| (t - OffsetDateTime::now_utc()).max(time::Duration::ZERO))
                .map(|d| std::time::Duration::from_secs_f64(d.as_seconds_f64().min(3600.0)))
                .unwrap_or(std::time::Duration::from_secs(3600));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_persist_and_only_scheduled_ones_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(dir.path(), |_, _| None).unwrap();
        let req = ServiceRequest {
            updates: vec!["KB1".into()],
            at: Some("+1h".into()),
            ..ServiceRequest::default()
        };
        let a = jobs.create("FRY00001", req.clone()).unwrap();
        let b = jobs.create("FRY00001", ServiceRequest::default()).unwrap();
        assert_eq!((a.id, b.id), (1, 2));
        // b is due now, a in an hour.
        let due = jobs.take_due(OffsetDateTime::now_utc()).unwrap().unwrap();
        assert_eq!(due.id, 2);
        assert!(jobs.take_due(OffsetDateTime::now_utc()).unwrap().is_none());
        assert!(matches!(jobs.cancel(2), Err(JobError::Started { .. })));
        assert_eq!(jobs.cancel(1).unwrap().state, JobState::Cancelled);
        assert!(matches!(jobs.cancel(9), Err(JobError::NoJob(9))));
        // A site that stops while b runs finds it failed on restart, or
        // succeeded when its revision was committed.
        drop(jobs);
        let file = std::fs::read(dir.path().join(JOBS_FILE)).unwrap();
        let jobs = Jobs::load(dir.path(), |_, _| None).unwrap();
        let b = jobs.get(2).unwrap();
        assert_eq!(b.state, JobState::Failed);
        assert!(b.runs[0].error.as_deref().unwrap().contains("stopped"));
        assert_eq!(b.runs[0].revision, None);
        drop(jobs);
        std::fs::write(dir.path().join(JOBS_FILE), file).unwrap();
        let jobs = Jobs::load(dir.path(), |p, id| {
            (p == "FRY00001" && id == 2).then_some((7, false))
        })
        .unwrap();
        let b = jobs.get(2).unwrap();
        assert_eq!(
            (b.state, b.runs[0].revision),
            (JobState::Succeeded, Some(7))
        );
        assert_eq!(jobs.get(1).unwrap().state, JobState::Cancelled);
        assert!(jobs.next_due().is_none());
    }

    #[test]
    fn an_unreadable_job_is_kept_aside_and_hides_none_of_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(dir.path(), |_, _| None).unwrap();
        let later = ServiceRequest {
            at: Some("+1h".into()),
            ..ServiceRequest::default()
        };
        for _ in 0..3 {
            jobs.create("FRY00001", later.clone()).unwrap();
        }
        drop(jobs);
        let path = dir.path().join(JOBS_FILE);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["jobs"][2]["state"] = "exploded".into();
        v["next_id"] = 0.into();
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();

        let jobs = Jobs::load(dir.path(), |_, _| None).unwrap();
        assert_eq!(jobs.get(1).unwrap().id, 1);
        assert_eq!(jobs.get(2).unwrap().id, 2);
        assert!(jobs.get(3).is_err(), "the damaged one is not a job");
        // A new job gets an id no entry has, and the damaged entry is
        // written back as it was.
        let d = jobs.create("FRY00001", later).unwrap();
        assert_eq!(d.id, 4);
        drop(jobs);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["unreadable"][0]["id"], 3);
        assert_eq!(v["unreadable"][0]["state"], "exploded");
        let jobs = Jobs::load(dir.path(), |_, _| None).unwrap();
        assert_eq!(jobs.get(4).unwrap().id, 4);
    }

    #[test]
    fn a_jobs_file_of_the_previous_release_loads_whole_and_keeps_its_ids() {
        // As commit 5eb3e20 wrote it: no `unreadable` list, the request
        // flattened into each job, `next_id` the last id given.
        let old = r#"{
  "next_id": 3,
  "jobs": [
    {"id": 1, "package": "FRY00001", "updates": ["KB1"], "continue_on_error": false,
     "distribute": true, "optimize": false, "created": "2026-11-01T02:00:00Z",
     "state": "succeeded",
     "runs": [{"started": "2026-11-01T02:00:00Z", "finished": "2026-11-01T02:00:09Z",
               "outcome": "succeeded", "base_revision": 1, "revision": 2,
               "updates": [], "size_before": 100, "size_after": 120}]},
    {"id": 3, "package": "FRY00002", "updates": ["KB2"], "schedule": "0 2 * * 6",
     "continue_on_error": true, "distribute": false, "optimize": false,
     "created": "2026-11-02T02:00:00Z", "state": "scheduled",
     "next_run": "2099-01-03T02:00:00Z", "runs": []}
  ]
}"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(JOBS_FILE), old).unwrap();
        let jobs = Jobs::load(dir.path(), |_, _| None).unwrap();
        let one = jobs.get(1).unwrap();
        assert_eq!(one.state, JobState::Succeeded);
        assert_eq!(one.runs[0].revision, Some(2));
        assert!(one.request.distribute);
        let three = jobs.get(3).unwrap();
        assert_eq!(three.state, JobState::Scheduled);
        assert_eq!(three.request.schedule.as_deref(), Some("0 2 * * 6"));
        assert!(three.request.continue_on_error);
        let due = jobs.next_due().unwrap();
        assert_eq!(due.year(), 2099, "the scheduled job keeps its next run");
        let next = jobs.create("FRY00001", ServiceRequest::default()).unwrap();
        assert_eq!(next.id, 4, "ids go on after the last one given");
    }
}
