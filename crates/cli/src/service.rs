//! Servicing commands shared by `ferry image …` and `ferry upgrade …`
//! (`updates`, `service`, `history`), and `ferry jobs`.

use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use ferry_site::servicing::jobs::{JobRecord, JobState, ServiceRequest};
use ferry_site::servicing::service::{HistoryView, UpdatesView};
use reqwest::Method;

use crate::client::Client;
use crate::output::{bytes, print_json, table};
use crate::Global;

/// Options of `ferry image service` and `ferry upgrade service`.
#[derive(Args, Debug)]
pub(crate) struct ServiceArgs {
    /// Package id.
    pub(crate) id: String,
    /// Updates to apply, in order (comma-separated ids from the catalog).
    #[arg(long, value_delimiter = ',')]
    pub(crate) updates: Vec<String>,
    /// Run once at this time instead of now: RFC 3339, "YYYY-MM-DD HH:MM"
    /// (UTC), or + and a duration (+30m, +1h30m, +2days).
    #[arg(long, conflicts_with = "schedule")]
    pub(crate) at: Option<String>,
    /// Run at every occurrence of this cron expression: standard 5 fields
    /// (minute hour day month weekday; weekdays 0-6 from Sunday, 7 also
    /// Sunday, or SUN-SAT), in UTC, or in a zone when it starts with
    /// CRON_TZ=ZONE ("CRON_TZ=Europe/Berlin 0 2 * * 6"); 6 with seconds
    /// first.
    #[arg(long)]
    pub(crate) schedule: Option<String>,
    /// Record a failing update and apply the rest (without it, the job stops
    /// and makes no revision).
    #[arg(long)]
    pub(crate) continue_on_error: bool,
    /// When done, send the new revision to every DP that holds the package.
    #[arg(long)]
    pub(crate) distribute: bool,
    /// Rebuild the WIM so content nothing refers to any more is dropped;
    /// reports the size before and after.
    #[arg(long)]
    pub(crate) optimize: bool,
}

/// `ferry jobs`.
#[derive(Args, Debug)]
pub(crate) struct JobsCmd {
    /// Only this package's jobs.
    #[arg(long)]
    package: Option<String>,
    #[command(subcommand)]
    action: Option<JobsAction>,
}

#[derive(Subcommand, Debug)]
enum JobsAction {
    /// One job with every run and update outcome.
    Show {
        /// Job number.
        id: u64,
    },
    /// Cancel jobs that have not started (or a cron job's future runs).
    Cancel {
        /// Job numbers.
        #[arg(required = true)]
        ids: Vec<u64>,
    },
    /// Wait for a job to end and print its outcome.
    Wait {
        /// Job number.
        id: u64,
        /// Give up waiting after this long (e.g. 90s, 30m, 1h30m); the job
        /// goes on.
        #[arg(long, value_name = "DURATION", value_parser = crate::dp::parse_duration)]
        timeout: Option<Duration>,
    },
}

/// `… updates ID`.
pub(crate) async fn updates(client: &Client, g: &Global, id: &str) -> anyhow::Result<()> {
    let v: UpdatesView = client
        .json(client.request(Method::GET, &format!("/images/{id}/updates")))
        .await?;
    if g.json {
        return print_json(&v);
    }
    println!("{} revision {}", v.package, v.revision);
    let mut t = table(&[
        "UPDATE",
        "STATE",
        "CLASSIFICATION",
        "RELEASED",
        "IMAGES",
        "TITLE",
        "NOTE",
    ]);
    for r in v.applicable.iter().chain(&v.superseded).chain(&v.applied) {
        t.add_row(vec![
            r.id.clone(),
            r.state.clone(),
            serde_json::to_value(r.classification)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            r.released.clone(),
            r.images
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            r.title.clone(),
            r.detail.clone().unwrap_or_default(),
        ]);
    }
    if v.applicable.is_empty() && v.superseded.is_empty() && v.applied.is_empty() {
        println!("no update in the catalog is for this image");
    } else {
        println!("{t}");
    }
    println!(
        "{} applicable, {} applied, {} superseded; {} in the catalog are for other images",
        v.applicable.len(),
        v.applied.len(),
        v.superseded.len(),
        v.not_applicable
    );
    Ok(())
}

/// `… history ID`.
pub(crate) async fn history(client: &Client, g: &Global, id: &str) -> anyhow::Result<()> {
    let v: HistoryView = client
        .json(client.request(Method::GET, &format!("/images/{id}/history")))
        .await?;
    if g.json {
        return print_json(&v);
    }
    println!(
        "{} revision {}: {}",
        v.package,
        v.revision,
        if v.applied.is_empty() {
            "no updates applied by Ferry".to_string()
        } else {
            format!("holds {}", v.applied.join(", "))
        }
    );
    if !v.entries.is_empty() {
        let mut t = table(&[
            "TIME", "JOB", "UPDATE", "OUTCOME", "REVISION", "TITLE", "DETAIL",
        ]);
        for e in &v.entries {
            t.add_row(vec![
                crate::output::rfc3339(e.time),
                e.job.to_string(),
                e.update.clone(),
                result_name(e.result).into(),
                e.revision
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "-".into()),
                e.title.clone(),
                e.detail.clone().unwrap_or_default(),
            ]);
        }
        println!("{t}");
    }
    if let Some(n) = &v.note {
        println!("note: {n}");
    }
    Ok(())
}

fn result_name(r: ferry_site::servicing::jobs::UpdateResult) -> &'static str {
    use ferry_site::servicing::jobs::UpdateResult::*;
    match r {
        Applied => "applied",
        Skipped => "skipped",
        Failed => "failed",
        NotRun => "not run",
    }
}

/// `… service ID --updates …`: creates the job; without `--at` or
/// `--schedule`, waits for it and fails when it fails.
pub(crate) async fn service(client: &Client, g: &Global, a: ServiceArgs) -> anyhow::Result<()> {
    let req = ServiceRequest {
        updates: a.updates,
        at: a.at,
        schedule: a.schedule,
        continue_on_error: a.continue_on_error,
        distribute: a.distribute,
        optimize: a.optimize,
    };
    let later = req.at.is_some() || req.schedule.is_some();
    let job: JobRecord = client
        .json(
            client
                .request(Method::POST, &format!("/images/{}/service", a.id))
                .json(&req),
        )
        .await?;
    if later {
        if g.json {
            return print_json(&job);
        }
        println!(
            "job {} scheduled for {} UTC ({}); `ferry jobs` follows it, `ferry jobs cancel {}` cancels it",
            job.id,
            job.next_run.map_or("-".into(), crate::output::when),
            job.request
                .schedule
                .as_deref()
                .map_or("once".to_string(), |s| format!("cron {s}")),
            job.id
        );
        return Ok(());
    }
    if !g.json {
        eprintln!("job {} started on {}", job.id, job.package);
    }
    wait(client, g, job.id, None).await
}

async fn wait(
    client: &Client,
    g: &Global,
    id: u64,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let job = loop {
        let job: JobRecord = client
            .json(client.request(Method::GET, &format!("/jobs/{id}")))
            .await?;
        let ran = !job.runs.is_empty() && job.runs.last().is_some_and(|r| r.finished.is_some());
        if job.state.is_final() || (job.state == JobState::Scheduled && ran) {
            break job;
        }
        if let Some(t) = timeout.filter(|t| start.elapsed() >= *t) {
            bail!(
                "job {id} is still {} after {}; it goes on (`ferry jobs wait {id}` again, or `ferry jobs cancel {id}`)",
                job.state.name(),
                humantime::format_duration(Duration::from_secs(t.as_secs()))
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let failure = match job.runs.last().map(|r| r.outcome) {
        Some(JobState::Failed) => Some(format!(
            "job {id} failed: {}",
            job.runs
                .last()
                .and_then(|r| r.error.clone())
                .unwrap_or_default()
        )),
        Some(JobState::PartlySucceeded) => Some(format!(
            "job {id}: some updates failed ({})",
            if g.json { "see runs" } else { "see above" }
        )),
        _ if job.state == JobState::Cancelled => Some(format!("job {id} was cancelled")),
        _ => None,
    };
    match failure {
        Some(message) => Err(crate::output::failed_with(
            g,
            &job,
            "job-failed",
            message,
            || print_job(&job),
        )),
        None => crate::output::emit(g, &job, || print_job(&job)),
    }
}

fn print_job(job: &JobRecord) {
    println!(
        "job {}  {}  {}{}",
        job.id,
        job.package,
        job.state.name(),
        job.next_run
            .map(|t| format!(" (next run {})", crate::output::rfc3339(t)))
            .unwrap_or_default()
    );
    for run in &job.runs {
        println!(
            "  run {} → {}: {}{}",
            crate::output::rfc3339(run.started),
            run.finished.map_or("…".into(), crate::output::rfc3339),
            run.outcome.name(),
            match (run.base_revision, run.revision) {
                (Some(b), Some(r)) => format!(", revision {b} → {r}"),
                (Some(b), None) => format!(", from revision {b}, no revision made"),
                _ => String::new(),
            }
        );
        if let (Some(before), Some(after)) = (run.size_before, run.size_after) {
            println!(
                "  size        {} → {}{}",
                bytes(before),
                bytes(after),
                if job.request.optimize {
                    " (optimized)"
                } else {
                    ""
                }
            );
        }
        if run.distributed {
            println!("  distributed to the DPs that hold the package");
        }
        if !run.pruned.is_empty() {
            println!("  removed unused revision(s) {:?}", run.pruned);
        }
        if let Some(e) = &run.error {
            println!("  error       {e}");
        }
        let mut t = table(&["UPDATE", "OUTCOME", "IMAGES", "DETAIL"]);
        for u in &run.updates {
            t.add_row(vec![
                u.id.clone(),
                result_name(u.result).into(),
                u.images
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                u.detail.clone().unwrap_or_default(),
            ]);
        }
        if !run.updates.is_empty() {
            println!("{t}");
        }
    }
}

/// `ferry jobs …`.
pub(crate) async fn jobs(cmd: JobsCmd, g: &Global) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    match cmd.action {
        Some(JobsAction::Show { id }) => {
            let job: JobRecord = client
                .json(client.request(Method::GET, &format!("/jobs/{id}")))
                .await?;
            if g.json {
                return print_json(&job);
            }
            print_job(&job);
            Ok(())
        }
        Some(JobsAction::Cancel { ids }) => {
            // Each is cancelled on its own; one that cannot be is named and
            // the others still are.
            let mut done = Vec::new();
            let mut refused = Vec::new();
            for id in &ids {
                match client
                    .json::<JobRecord>(client.request(Method::POST, &format!("/jobs/{id}/cancel")))
                    .await
                {
                    Ok(job) => done.push(job),
                    Err(e) => refused.push(format!("job {id}: {}", crate::message(&e))),
                }
            }
            if g.json && refused.is_empty() {
                return print_json(&done);
            }
            if !g.json {
                for j in &done {
                    println!("job {} cancelled; it will not run", j.id);
                }
            }
            match refused.len() {
                0 => Ok(()),
                _ => bail!(
                    "{} of {} not cancelled: {}",
                    refused.len(),
                    ids.len(),
                    refused.join("; ")
                ),
            }
        }
        Some(JobsAction::Wait { id, timeout }) => wait(&client, g, id, timeout).await,
        None => {
            let mut req = client.request(Method::GET, "/jobs");
            if let Some(p) = &cmd.package {
                req = req.query(&[("package", p)]);
            }
            let list: Vec<JobRecord> = client.json(req).await?;
            if g.json {
                return print_json(&list);
            }
            if list.is_empty() {
                println!("no servicing jobs yet; `ferry image service ID --updates KB…` makes one");
                return Ok(());
            }
            let mut t = table(&[
                "JOB",
                "PACKAGE",
                "UPDATES",
                "WHEN",
                "STATE",
                "NEXT RUN (UTC)",
                "LAST OUTCOME",
                "REVISION",
            ]);
            for j in &list {
                let last = j.last_run();
                t.add_row(vec![
                    j.id.to_string(),
                    j.package.clone(),
                    j.request.updates.join(","),
                    match (&j.request.at, &j.request.schedule) {
                        (_, Some(c)) => format!("cron {c}"),
                        (Some(a), _) => format!(
                            "at {}",
                            time::OffsetDateTime::parse(
                                a,
                                &time::format_description::well_known::Rfc3339
                            )
                            .map_or_else(|_| a.clone(), crate::output::when)
                        ),
                        _ => "now".into(),
                    },
                    j.state.name().into(),
                    j.next_run.map_or("-".into(), crate::output::when),
                    last.map(|r| match &r.error {
                        Some(e) => format!("{}: {e}", r.outcome.name()),
                        None => r.outcome.name().to_string(),
                    })
                    .unwrap_or_else(|| "-".into()),
                    last.and_then(|r| r.revision)
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{t}");
            Ok(())
        }
    }
}
