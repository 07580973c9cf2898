//! A distribution point's side of one connection to the site, as a state
//! machine: what to do next to bring its content in line with what the
//! site assigned.
//!
//! The driver (the DP agent) feeds it the assignments
//! ([`Session::assign`]), what the DP holds when the session starts
//! ([`Held`]), the result of every job it ran and the time; it answers with
//! the next job ([`Session::poll_job`]) and when to ask again
//! ([`Session::poll_timeout`]). Jobs run one at a time, in this order:
//!
//! 1. packages no longer assigned are removed (that frees space), and
//!    staged transfers of revisions no longer wanted are dropped;
//! 2. each assignment, in the site's order: a rebuild the site asked for
//!    deletes the copy first; a revision held is confirmed (reported
//!    installed once per session); anything else is fetched;
//! 3. the site's latest validation request, once everything else is done.
//!
//! A failed job is retried after [`backoff`] of its failures so far, while
//! the others go on; new assignments try everything again at once. A job
//! never ends the session: only the driver's connection does. The machine
//! never reads a clock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::sync::backoff;

/// One package revision the site assigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// The package id.
    pub package: String,
    /// The revision to hold.
    pub revision: u32,
    /// The site's rebuild number for this package (0: none asked).
    pub rebuild: u64,
}

/// Everything the site assigned, as one message carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// The revisions to hold, in the site's order.
    pub items: Vec<Want>,
    /// The site's latest validation request (0: none).
    pub validate: u64,
    /// The packages it names (all when empty).
    pub validate_packages: Vec<String>,
}

/// What the DP holds when a session starts, read from its store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Installed revision per package.
    pub installed: BTreeMap<String, u32>,
    /// Staged (unfinished) transfers: package and revision.
    pub stages: Vec<(String, u32)>,
    /// Per package, the rebuild number last carried out.
    pub rebuilt: HashMap<String, u64>,
    /// The last validation request answered.
    pub validated: u64,
}

/// A job for the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Job {
    /// Delete an installed package that is no longer assigned.
    Remove {
        /// The package.
        package: String,
        /// Its installed revision.
        revision: u32,
    },
    /// Drop the staged transfer of a revision no longer wanted; with
    /// `uninstall`, the package's record too (it was never installed).
    DropStage {
        /// The package.
        package: String,
        /// The staged revision.
        revision: u32,
        /// Whether the package is not assigned at all any more.
        uninstall: bool,
    },
    /// Delete the copy held, as the site asked for a rebuild.
    Rebuild(Want),
    /// The revision is installed: tell the site (after proving a copy of
    /// an older layout against the signed manifest).
    Confirm(Want),
    /// Fetch the revision; `base` is the revision installed now, to send
    /// the delta against; `from_scratch` copies nothing from the DP's own
    /// files (a rebuild).
    Fetch {
        /// What to fetch.
        want: Want,
        /// The package's installed revision, if any.
        base: Option<u32>,
        /// Fetch every chunk from the site.
        from_scratch: bool,
    },
    /// Answer validation request `request` for `packages` (all when
    /// empty) among the installed revisions still assigned (`wanted`).
    Validate {
        /// The request number.
        request: u64,
        /// The packages named.
        packages: Vec<String>,
        /// The assigned revision per package.
        wanted: BTreeMap<String, u32>,
    },
}

/// How a [`Job::Confirm`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirmed {
    /// The copy stays and was reported installed.
    Kept,
    /// The copy did not check out and was deleted: fetch it again.
    Dropped,
}

/// Which job a failure or retry belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Package(String, u32),
    Validation(u64),
}

/// The session. See the module documentation.
#[derive(Debug, Default)]
pub struct Session {
    desired: Option<Desired>,
    held: Held,
    /// Failures so far per job (cleared when it succeeds).
    failures: HashMap<Key, u32>,
    /// When a failed job may run again.
    retry_at: HashMap<Key, Instant>,
    /// Revisions reported installed in this session.
    told: HashSet<(String, u32)>,
    /// Packages whose copy was deleted for a rebuild, to fetch from
    /// scratch.
    rebuilding: HashSet<String>,
}

impl Session {
    /// A session of a DP holding `held`.
    pub fn new(held: Held) -> Self {
        Self {
            held,
            ..Self::default()
        }
    }

    /// The site's assignments, whenever they arrive: everything waiting
    /// for a retry is tried again at once.
    pub fn assign(&mut self, desired: Desired) {
        self.desired = Some(desired);
        self.retry_at.clear();
    }

    /// What to hold while the DP is in maintenance: what it holds now
    /// (an interrupted transfer's stage goes on), nothing new, nothing
    /// removed, no rebuild; `next`'s validation request still stands.
    pub fn frozen(&self, next: &Desired) -> Desired {
        let mut at: BTreeMap<&str, u32> = self
            .held
            .installed
            .iter()
            .map(|(p, &r)| (p.as_str(), r))
            .collect();
        for (p, r) in &self.held.stages {
            at.insert(p, *r);
        }
        Desired {
            items: at
                .into_iter()
                .map(|(package, revision)| Want {
                    package: package.to_string(),
                    revision,
                    rebuild: self.held.rebuilt.get(package).copied().unwrap_or(0),
                })
                .collect(),
            validate: next.validate,
            validate_packages: next.validate_packages.clone(),
        }
    }

    /// Whether a job of `key` waits for its retry.
    fn waiting(&self, key: &Key, now: Instant) -> bool {
        self.retry_at.get(key).is_some_and(|&t| t > now)
    }

    /// The next job to run, if any is due at `now`.
    pub fn poll_job(&mut self, now: Instant) -> Option<Job> {
        let desired = self.desired.as_ref()?;
        let wanted: BTreeMap<&str, u32> = desired
            .items
            .iter()
            .map(|w| (w.package.as_str(), w.revision))
            .collect();
        for (package, &revision) in &self.held.installed {
            let key = Key::Package(package.clone(), revision);
            if !wanted.contains_key(package.as_str()) && !self.waiting(&key, now) {
                return Some(Job::Remove {
                    package: package.clone(),
                    revision,
                });
            }
        }
        for (package, revision) in &self.held.stages {
            let key = Key::Package(package.clone(), *revision);
            if wanted.get(package.as_str()) != Some(revision) && !self.waiting(&key, now) {
                return Some(Job::DropStage {
                    package: package.clone(),
                    revision: *revision,
                    uninstall: !wanted.contains_key(package.as_str()),
                });
            }
        }
        for w in &desired.items {
            let key = Key::Package(w.package.clone(), w.revision);
            if self.waiting(&key, now) {
                continue;
            }
            let rebuild_due = w.rebuild > 0
                && self.held.rebuilt.get(&w.package).copied().unwrap_or(0) != w.rebuild
                && !self.rebuilding.contains(&w.package);
            if rebuild_due {
                return Some(Job::Rebuild(w.clone()));
            }
            let installed = self.held.installed.get(&w.package).copied();
            if installed == Some(w.revision) {
                if self.told.contains(&(w.package.clone(), w.revision)) {
                    continue;
                }
                return Some(Job::Confirm(w.clone()));
            }
            return Some(Job::Fetch {
                want: w.clone(),
                base: installed,
                from_scratch: self.rebuilding.contains(&w.package),
            });
        }
        let key = Key::Validation(desired.validate);
        if desired.validate > self.held.validated && !self.waiting(&key, now) {
            return Some(Job::Validate {
                request: desired.validate,
                packages: desired.validate_packages.clone(),
                wanted: desired
                    .items
                    .iter()
                    .map(|w| (w.package.clone(), w.revision))
                    .collect(),
            });
        }
        None
    }

    /// When the next job waiting for its retry is due, if one waits at
    /// `now`. Call after [`Session::poll_job`] answered `None`: a retry
    /// due by then belongs to a job no longer wanted, and is forgotten.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        self.retry_at.retain(|_, &mut t| t > now);
        self.retry_at.values().copied().min()
    }

    fn key(job: &Job) -> Key {
        match job {
            Job::Remove { package, revision }
            | Job::DropStage {
                package, revision, ..
            } => Key::Package(package.clone(), *revision),
            Job::Rebuild(w) | Job::Confirm(w) | Job::Fetch { want: w, .. } => {
                Key::Package(w.package.clone(), w.revision)
            }
            Job::Validate { request, .. } => Key::Validation(*request),
        }
    }

    /// `job` succeeded (a [`Job::Confirm`] answers with
    /// [`Session::handle_confirmed`]).
    pub fn handle_done(&mut self, job: &Job) {
        let key = Self::key(job);
        self.failures.remove(&key);
        self.retry_at.remove(&key);
        match job {
            Job::Remove { package, .. } => {
                self.held.installed.remove(package);
            }
            Job::DropStage {
                package, revision, ..
            } => self
                .held
                .stages
                .retain(|(p, r)| !(p == package && r == revision)),
            Job::Rebuild(w) => {
                self.held.installed.remove(&w.package);
                self.held.stages.retain(|(p, _)| *p != w.package);
                self.told.remove(&(w.package.clone(), w.revision));
                self.rebuilding.insert(w.package.clone());
            }
            Job::Confirm(w) => {
                self.told.insert((w.package.clone(), w.revision));
            }
            Job::Fetch { want: w, .. } => {
                self.held.installed.insert(w.package.clone(), w.revision);
                self.held.stages.retain(|(p, _)| *p != w.package);
                self.told.insert((w.package.clone(), w.revision));
                if self.rebuilding.remove(&w.package) || w.rebuild > 0 {
                    self.held.rebuilt.insert(w.package.clone(), w.rebuild);
                }
            }
            Job::Validate { request, .. } => {
                self.held.validated = self.held.validated.max(*request);
            }
        }
    }

    /// How a [`Job::Confirm`] ended.
    pub fn handle_confirmed(&mut self, job: &Job, how: Confirmed) {
        match (job, how) {
            (Job::Confirm(_), Confirmed::Kept) => self.handle_done(job),
            (Job::Confirm(w), Confirmed::Dropped) => {
                self.held.installed.remove(&w.package);
            }
            _ => {}
        }
    }

    /// `job` failed at `now`: it runs again after the delay returned (its
    /// failures so far, doubling), while other jobs go on.
    pub fn handle_failed(&mut self, job: &Job, now: Instant) -> Duration {
        let key = Self::key(job);
        let n = self.failures.entry(key.clone()).or_default();
        let delay = backoff(*n);
        *n += 1;
        self.retry_at.insert(key, now + delay);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(p: &str, r: u32) -> Want {
        Want {
            package: p.into(),
            revision: r,
            rebuild: 0,
        }
    }

    fn desired(items: Vec<Want>) -> Desired {
        Desired {
            items,
            ..Desired::default()
        }
    }

    fn held(installed: &[(&str, u32)]) -> Held {
        Held {
            installed: installed.iter().map(|(p, r)| (p.to_string(), *r)).collect(),
            ..Held::default()
        }
    }

    /// Runs every due job with success; the jobs in order.
    fn run_all(s: &mut Session, now: Instant) -> Vec<Job> {
        let mut out = Vec::new();
        while let Some(j) = s.poll_job(now) {
            match j {
                Job::Confirm(_) => s.handle_confirmed(&j, Confirmed::Kept),
                _ => s.handle_done(&j),
            }
            out.push(j);
            assert!(out.len() < 100, "no end: {out:?}");
        }
        out
    }

    #[test]
    fn nothing_happens_before_the_first_assignments() {
        let mut s = Session::new(held(&[("A", 1)]));
        assert_eq!(s.poll_job(Instant::now()), None);
    }

    #[test]
    fn removals_and_stale_stages_come_first_then_assignments_in_order() {
        let mut h = held(&[("OLD", 3), ("B", 1)]);
        h.stages = vec![("B".into(), 1), ("GONE".into(), 2), ("C".into(), 5)];
        let mut s = Session::new(h);
        s.assign(desired(vec![want("C", 5), want("B", 2)]));
        let jobs = run_all(&mut s, Instant::now());
        assert_eq!(
            jobs,
            vec![
                Job::Remove {
                    package: "OLD".into(),
                    revision: 3
                },
                Job::DropStage {
                    package: "B".into(),
                    revision: 1,
                    uninstall: false
                },
                Job::DropStage {
                    package: "GONE".into(),
                    revision: 2,
                    uninstall: true
                },
                Job::Fetch {
                    want: want("C", 5),
                    base: None,
                    from_scratch: false
                },
                Job::Fetch {
                    want: want("B", 2),
                    base: Some(1),
                    from_scratch: false
                },
            ]
        );
        assert_eq!(run_all(&mut s, Instant::now()), vec![], "converged");
    }

    #[test]
    fn in_maintenance_an_interrupted_transfer_goes_on_and_nothing_new_starts() {
        let mut h = held(&[("A", 1), ("B", 1), ("OLD", 4)]);
        h.stages = vec![("B".into(), 2)];
        h.rebuilt.insert("A".into(), 7);
        let mut s = Session::new(h);
        // The site now wants A at 2 rebuilt, no B, no OLD, a new C, and a
        // validation: only B's interrupted transfer and the validation run.
        let mut next = desired(vec![
            Want {
                rebuild: 8,
                ..want("A", 2)
            },
            want("C", 1),
        ]);
        next.validate = 3;
        let frozen = s.frozen(&next);
        assert_eq!(frozen.validate, 3);
        s.assign(frozen);
        let jobs = run_all(&mut s, Instant::now());
        assert!(
            jobs.iter().all(|j| !matches!(
                j,
                Job::Remove { .. } | Job::DropStage { .. } | Job::Rebuild(_)
            )),
            "{jobs:?}"
        );
        let fetched: Vec<&Want> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Fetch { want, .. } => Some(want),
                _ => None,
            })
            .collect();
        assert_eq!(fetched, vec![&want("B", 2)], "{jobs:?}");
        assert!(
            jobs.iter()
                .any(|j| matches!(j, Job::Validate { request: 3, .. })),
            "{jobs:?}"
        );
        // Out of maintenance, the site's assignments apply again.
        s.assign(next);
        let jobs = run_all(&mut s, Instant::now());
        assert!(jobs.contains(&Job::Remove {
            package: "OLD".into(),
            revision: 4
        }));
        assert!(jobs
            .iter()
            .any(|j| matches!(j, Job::Fetch { want, .. } if want.package == "C")));
    }

    #[test]
    fn a_held_revision_is_confirmed_once_per_session() {
        let mut s = Session::new(held(&[("A", 2)]));
        s.assign(desired(vec![want("A", 2)]));
        assert_eq!(
            run_all(&mut s, Instant::now()),
            vec![Job::Confirm(want("A", 2))]
        );
        s.assign(desired(vec![want("A", 2)]));
        assert_eq!(run_all(&mut s, Instant::now()), vec![]);
    }

    #[test]
    fn a_copy_that_does_not_check_out_is_fetched_again() {
        let mut s = Session::new(held(&[("A", 2)]));
        s.assign(desired(vec![want("A", 2)]));
        let now = Instant::now();
        let j = s.poll_job(now).unwrap();
        s.handle_confirmed(&j, Confirmed::Dropped);
        assert_eq!(
            s.poll_job(now),
            Some(Job::Fetch {
                want: want("A", 2),
                base: None,
                from_scratch: false
            })
        );
    }

    #[test]
    fn a_failed_fetch_waits_its_backoff_while_the_others_go_on() {
        let mut s = Session::new(Held::default());
        s.assign(desired(vec![want("A", 1), want("B", 1)]));
        let t0 = Instant::now();
        let a = s.poll_job(t0).unwrap();
        assert_eq!(s.handle_failed(&a, t0), backoff(0));
        let b = s.poll_job(t0).unwrap();
        assert!(matches!(&b, Job::Fetch { want, .. } if want.package == "B"));
        s.handle_done(&b);
        assert_eq!(s.poll_job(t0), None);
        assert_eq!(s.poll_timeout(t0), Some(t0 + backoff(0)));
        let t1 = t0 + backoff(0);
        let again = s.poll_job(t1).unwrap();
        assert_eq!(again, a);
        assert_eq!(s.handle_failed(&again, t1), backoff(1), "doubles");
        s.assign(desired(vec![want("A", 1), want("B", 1)]));
        assert_eq!(s.poll_job(t1), Some(a), "new assignments retry at once");
    }

    #[test]
    fn a_due_retry_is_no_timer_and_its_job_still_runs() {
        let mut s = Session::new(Held::default());
        s.assign(desired(vec![want("A", 2)]));
        let t0 = Instant::now();
        let fetch = s.poll_job(t0).unwrap();
        s.handle_failed(&fetch, t0);
        assert_eq!(s.poll_timeout(t0), Some(t0 + backoff(0)));
        let later = t0 + Duration::from_secs(5);
        assert_eq!(s.poll_timeout(later), None, "no timer in the past");
        assert_eq!(s.poll_job(later), Some(fetch));
    }

    #[test]
    fn a_failed_removal_is_retried_and_blocks_nothing() {
        let mut s = Session::new(held(&[("OLD", 1)]));
        s.assign(desired(vec![want("A", 1)]));
        let t0 = Instant::now();
        let rm = s.poll_job(t0).unwrap();
        assert!(matches!(rm, Job::Remove { .. }));
        s.handle_failed(&rm, t0);
        assert!(matches!(s.poll_job(t0), Some(Job::Fetch { .. })));
        let later = t0 + Duration::from_secs(60);
        assert_eq!(s.poll_job(later), Some(rm));
    }

    #[test]
    fn a_rebuild_deletes_the_copy_then_fetches_from_scratch_once() {
        let mut s = Session::new(held(&[("A", 4)]));
        let w = Want {
            rebuild: 2,
            ..want("A", 4)
        };
        s.assign(desired(vec![w.clone()]));
        let jobs = run_all(&mut s, Instant::now());
        assert_eq!(
            jobs,
            vec![
                Job::Rebuild(w.clone()),
                Job::Fetch {
                    want: w.clone(),
                    base: None,
                    from_scratch: true
                }
            ]
        );
        s.assign(desired(vec![w]));
        assert_eq!(run_all(&mut s, Instant::now()), vec![], "done once");
    }

    #[test]
    fn a_rebuild_already_done_before_the_session_is_not_repeated() {
        let mut h = held(&[("A", 4)]);
        h.rebuilt.insert("A".into(), 2);
        let mut s = Session::new(h);
        let w = Want {
            rebuild: 2,
            ..want("A", 4)
        };
        s.assign(desired(vec![w.clone()]));
        assert_eq!(run_all(&mut s, Instant::now()), vec![Job::Confirm(w)]);
    }

    #[test]
    fn validation_runs_after_everything_else_once_per_request() {
        let mut s = Session::new(held(&[("A", 1)]));
        let mut d = desired(vec![want("A", 1), want("B", 1)]);
        d.validate = 7;
        d.validate_packages = vec!["A".into()];
        s.assign(d.clone());
        let jobs = run_all(&mut s, Instant::now());
        assert_eq!(jobs.len(), 3, "{jobs:?}");
        assert_eq!(
            jobs[2],
            Job::Validate {
                request: 7,
                packages: vec!["A".into()],
                wanted: [("A".to_string(), 1), ("B".to_string(), 1)].into(),
            }
        );
        s.assign(d);
        assert_eq!(run_all(&mut s, Instant::now()), vec![]);
    }

    #[test]
    fn a_failed_validation_is_retried_without_ending_the_session() {
        let mut h = held(&[("A", 1)]);
        h.validated = 6;
        let mut s = Session::new(h);
        let mut d = desired(vec![want("A", 1)]);
        d.validate = 7;
        s.assign(d.clone());
        let t0 = Instant::now();
        assert!(matches!(s.poll_job(t0), Some(Job::Confirm(_))));
        s.handle_confirmed(&Job::Confirm(want("A", 1)), Confirmed::Kept);
        let v = s.poll_job(t0).unwrap();
        assert!(matches!(v, Job::Validate { request: 7, .. }));
        let delay = s.handle_failed(&v, t0);
        assert_eq!(s.poll_job(t0), None, "waits its backoff");
        assert_eq!(s.poll_timeout(t0), Some(t0 + delay));
        // Meanwhile a new assignment is served as ever.
        d.items.push(want("B", 1));
        s.assign(d);
        let next = s.poll_job(t0).unwrap();
        assert!(matches!(&next, Job::Fetch { want, .. } if want.package == "B"));
        s.handle_done(&next);
        let v2 = s.poll_job(t0).unwrap();
        assert!(matches!(v2, Job::Validate { request: 7, .. }), "{v2:?}");
        s.handle_done(&v2);
        assert_eq!(s.poll_job(t0 + Duration::from_secs(3600)), None);
    }
}
