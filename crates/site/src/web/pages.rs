//! The status pages' HTML, rendered from the site's views (pure: data in,
//! markup out; `maud` escapes every value).

use maud::{html, Markup, DOCTYPE};
use time::OffsetDateTime;

use ferry_core::units::bytes;

use crate::api::RevisionsView;
use crate::distribution::status::{DpView, StatusRow};
use crate::distribution::validation::ValidationView;
use crate::human;
use crate::library::catalog::{MulticastSettings, PackageRecord, PackageSummary};
use crate::servicing::jobs::{JobRecord, JobState};
use crate::servicing::service::HistoryView;

/// Which part of the site a page belongs to (the menu marks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nav {
    /// Overview, packages and DPs.
    Overview,
    /// Servicing jobs.
    Jobs,
    /// Multicast sessions.
    Multicast,
}

/// A rendered page: its title and the part that refreshes by itself.
#[derive(Debug)]
pub struct Page {
    /// The page's title.
    pub title: String,
    /// The menu entry it belongs to.
    pub nav: Nav,
    /// What `live.js` swaps in every [`super::REFRESH_MS`].
    pub live: Markup,
}

/// What the overview shows.
#[derive(Clone, Debug)]
pub struct Overview {
    /// Every package × DP.
    pub rows: Vec<StatusRow>,
    /// Every DP.
    pub dps: Vec<DpView>,
    /// Every package.
    pub packages: Vec<PackageSummary>,
    /// Every servicing job.
    pub jobs: Vec<JobRecord>,
    /// When it was read.
    pub now: OffsetDateTime,
}

/// What a package's page shows.
#[derive(Clone, Debug)]
pub struct PackagePage {
    /// Its record.
    pub record: PackageRecord,
    /// Its revisions and where each is installed.
    pub revisions: RevisionsView,
    /// Its rows, one per DP.
    pub rows: Vec<StatusRow>,
    /// Its servicing history (none for a package without revisions).
    pub history: Option<HistoryView>,
    /// Its servicing jobs.
    pub jobs: Vec<JobRecord>,
    /// When it was read.
    pub now: OffsetDateTime,
}

/// What a DP's page shows.
#[derive(Clone, Debug)]
pub struct DpPage {
    /// The DP.
    pub view: DpView,
    /// Its rows, one per package.
    pub rows: Vec<StatusRow>,
    /// Its validation schedule and results.
    pub validation: ValidationView,
    /// When it was read.
    pub now: OffsetDateTime,
}

/// The whole document around a page.
pub fn layout(p: &Page) -> Markup {
    let item = |nav: Nav, href: &str, label: &str| {
        html! {
            a href=(href) aria-current=[(p.nav == nav).then_some("page")] { (label) }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (p.title) " · Ferry" }
                link rel="stylesheet" href="/ui/assets/style.css";
                script src="/ui/assets/live.js" defer {}
            }
            body {
                header {
                    strong.brand { "Ferry" }
                    nav {
                        (item(Nav::Overview, "/ui/", "Overview"))
                        (item(Nav::Jobs, "/ui/jobs", "Jobs"))
                        (item(Nav::Multicast, "/ui/multicast", "Multicast"))
                    }
                    span #updated aria-live="polite" { "live" }
                    form method="post" action="/ui/logout" {
                        button type="submit" { "Log out" }
                    }
                }
                main {
                    h1 { (p.title) }
                    div #live data-every=(super::REFRESH_MS) { (p.live) }
                }
            }
        }
    }
}

/// The login form, with what went wrong the last time.
pub fn login(next: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Log in · Ferry" }
                link rel="stylesheet" href="/ui/assets/style.css";
            }
            body.login {
                main {
                    h1 { "Ferry site" }
                    @if let Some(e) = error {
                        p.error role="alert" { (e) }
                    }
                    form method="post" action="/ui/login" {
                        label for="token" { "Operator token" }
                        input #token type="password" name="token" autocomplete="current-password" required autofocus;
                        input type="hidden" name="next" value=(next);
                        button type="submit" { "Log in" }
                    }
                    p.hint { "The token is in " code { "operator.token" } " in the site's data folder." }
                }
            }
        }
    }
}

/// A page that could not be shown, and why.
pub fn trouble(why: &str) -> Markup {
    layout(&Page {
        title: "Not shown".into(),
        nav: Nav::Overview,
        live: html! { p.error { (why) } p { a href="/ui/" { "Back to the overview" } } },
    })
}

fn when(t: OffsetDateTime, now: OffsetDateTime) -> Markup {
    html! { time datetime=(crate::rfc3339(t)) title=(crate::rfc3339(t)) { (human::ago_at(t, now)) } }
}

fn package_link(id: &str, name: &str) -> Markup {
    html! {
        a href={ "/ui/packages/" (id) } { (id) }
        @if !name.is_empty() { " " span.muted { (name) } }
    }
}

fn dp_link(name: &str) -> Markup {
    html! { a href={ "/ui/dps/" (name) } { (name) } }
}

fn state_badge(state: &str) -> Markup {
    html! { span class={ "state s-" (state) } { (state) } }
}

fn online_badge(online: bool) -> Markup {
    if online {
        html! { span.dot.on title="connected" { "online" } }
    } else {
        html! { span.dot.off title="not connected" { "offline" } }
    }
}

/// Where a row's bytes come from: the site or source DPs as the DP said,
/// a prestage bundle, and the multicast sessions it runs of the package.
fn source(r: &StatusRow, prestaged: bool) -> Markup {
    html! {
        @if !r.sources.is_empty() {
            @for (i, s) in r.sources.iter().enumerate() {
                @if i > 0 { " + " }
                @if s.source == "site" { "site" } @else { "pull " (dp_link(&s.source)) }
                " " span.muted { (bytes(s.bytes)) }
            }
        } @else if prestaged || r.waits_for_prestage {
            "prestage"
        } @else if r.state == "in-progress" || r.state == "installed" {
            "site"
        } @else {
            "-"
        }
        @for v in r.multicast.iter().filter(|v| v.ended.is_none()) {
            br;
            span.badge { "multicast " (v.state) ", " (v.clients_joined) " client(s)" }
        }
    }
}

/// The rows table; `package` and `dp` say whether those columns show.
fn rows_table(
    rows: &[&StatusRow],
    dps: &[DpView],
    now: OffsetDateTime,
    package: bool,
    dp: bool,
) -> Markup {
    let prestaged = |name: &str| dps.iter().any(|d| d.name == name && d.prestaged);
    html! {
        @if rows.is_empty() {
            p.muted { "Nothing is distributed here yet: " code { "ferry distribute ID --dp NAME" } "." }
        } @else {
            table.rows #rows {
                thead { tr {
                    @if package { th { "Package" } }
                    @if dp { th { "DP" } }
                    th { "Rev" } th { "State" } th { "Progress" } th { "Received" }
                    th { "Rate" } th { "ETA" } th { "Source" } th { "Last contact" }
                } }
                tbody {
                    @for r in rows {
                        tr data-package=(r.package) data-dp=(r.dp) data-state=(r.state) {
                            @if package { td data-label="Package" { (package_link(&r.package, &r.name)) } }
                            @if dp { td data-label="DP" { (dp_link(&r.dp)) " " (online_badge(r.online)) } }
                            td data-label="Rev" {
                                @match r.revision { Some(v) => { "r" (v) }, None => "-" }
                            }
                            td data-label="State" {
                                (state_badge(&r.state))
                                @let detail = r.describe();
                                @if detail != r.state { div.detail { (detail) } }
                                @if let Some(w) = &r.multicast_warning { div.detail.warn { (w) } }
                            }
                            td data-label="Progress" {
                                @match (r.state.as_str(), r.percent) {
                                    ("installed", _) => { progress max="100" value="100" {} " " span.pct { "100%" } },
                                    (_, Some(p)) => { progress max="100" value=(p) {} " " span.pct { (p) "%" } },
                                    _ => "-",
                                }
                            }
                            td data-label="Received" {
                                (bytes(r.bytes_done)) " of " (bytes(r.bytes_needed))
                                div.muted { "full copy " (bytes(r.full_bytes)) }
                            }
                            td data-label="Rate" { (r.rate_bps.map_or("-".into(), human::rate)) }
                            td data-label="ETA" { (r.eta_secs.map_or("-".into(), human::eta)) }
                            td data-label="Source" { (source(r, prestaged(&r.dp))) }
                            td data-label="Last contact" {
                                @if r.online { "now" }
                                @else if let Some(t) = r.last_contact { (when(t, now)) }
                                @else { "never" }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// How many rows are in each state, in the order operators read them.
fn counts(rows: &[StatusRow]) -> Vec<(&'static str, usize)> {
    [
        "installed",
        "in-progress",
        "pending",
        "validating",
        "failed",
        "removing",
        "revoked",
    ]
    .into_iter()
    .map(|s| (s, rows.iter().filter(|r| r.state == s).count()))
    .filter(|(s, n)| *n > 0 || matches!(*s, "installed" | "in-progress" | "failed"))
    .collect()
}

/// Rows of the package × DP table on one page of the overview.
pub const ROWS_PER_PAGE: usize = 200;

/// Which of the package × DP rows the overview shows (`/ui/?state=&page=`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct RowFilter {
    /// Only rows in this state.
    #[serde(default)]
    pub state: Option<String>,
    /// The page, from 1.
    #[serde(default)]
    pub page: Option<usize>,
}

/// The order an operator reads rows in: what needs them first (failed,
/// then moving, then waiting), installed last.
fn attention(state: &str) -> u8 {
    match state {
        "failed" => 0,
        "in-progress" => 1,
        "validating" => 2,
        "pending" => 3,
        "removing" => 4,
        "revoked" => 5,
        _ => 6,
    }
}

/// `text` percent-encoded for a query value: letters, digits and
/// `/-_.` stay.
pub(super) fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// `/ui/` with `state` and `page` set.
fn overview_href(state: Option<&str>, page: usize) -> String {
    let mut q = Vec::new();
    if let Some(s) = state {
        q.push(format!("state={}", percent(s)));
    }
    if page > 1 {
        q.push(format!("page={page}"));
    }
    if q.is_empty() {
        "/ui/".into()
    } else {
        format!("/ui/?{}", q.join("&"))
    }
}

/// The rows `f` selects in reading order, the page shown (clamped) and
/// the count of pages.
fn select<'a>(rows: &'a [StatusRow], f: &RowFilter) -> (Vec<&'a StatusRow>, usize, usize, usize) {
    let mut chosen: Vec<&StatusRow> = rows
        .iter()
        .filter(|r| f.state.as_deref().is_none_or(|s| r.state == s))
        .collect();
    chosen.sort_by_key(|r| attention(&r.state));
    let total = chosen.len();
    let pages = total.div_ceil(ROWS_PER_PAGE).max(1);
    let page = f.page.unwrap_or(1).clamp(1, pages);
    let shown = chosen
        .into_iter()
        .skip((page - 1) * ROWS_PER_PAGE)
        .take(ROWS_PER_PAGE)
        .collect();
    (shown, total, page, pages)
}

/// The overview: counts, packages, and one row per package × DP, those
/// that need attention first, [`ROWS_PER_PAGE`] at a time, filtered by
/// state when `f` says so.
pub fn overview(o: &Overview, f: &RowFilter) -> Page {
    let online = o.dps.iter().filter(|d| d.online).count();
    let running = o
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Running)
        .count();
    let live = html! {
        section.cards {
            div.card { b { (o.packages.len()) } " packages" }
            div.card { b { (online) " of " (o.dps.len()) } " DPs online" }
            @for (s, n) in counts(&o.rows) {
                a class={ "card c-" (s) @if f.state.as_deref() == Some(s) { " chosen" } }
                    href=(overview_href(Some(s), 1)) title={ "only the rows " (s) } { b { (n) } " " (s) }
            }
            div.card { b { (running) } " servicing job(s) running" }
        }
        h2 { "Packages" }
        @if o.packages.is_empty() {
            p.muted { "No package yet: " code { "ferry image add FILE.wim" } "." }
        } @else {
            table.packages {
                thead { tr { th { "Package" } th { "Kind" } th { "Revision" } th { "Size" } th { "Installed on" } th { "Failed" } } }
                tbody {
                    @for p in &o.packages {
                        @let mine: Vec<&StatusRow> = o.rows.iter().filter(|r| r.package == p.id).collect();
                        tr {
                            td data-label="Package" { (package_link(&p.id, &p.name)) }
                            td data-label="Kind" { (p.kind.noun()) }
                            td data-label="Revision" {
                                "r" (p.released)
                                @if p.revision != p.released { span.muted { " (latest r" (p.revision) ")" } }
                            }
                            td data-label="Size" { (bytes(p.size)) }
                            td data-label="Installed on" {
                                (mine.iter().filter(|r| r.state == "installed").count()) " of " (mine.len()) " DPs"
                            }
                            td data-label="Failed" { (mine.iter().filter(|r| r.state == "failed").count()) }
                        }
                    }
                }
            }
        }
        h2 #package-dp { "Package × DP" }
        @let (shown, total, page, pages) = select(&o.rows, f);
        p.pager {
            @if let Some(s) = &f.state { "Only " (state_badge(s)) ": " }
            @if total == 0 { "no row" }
            @else {
                "rows " ((page - 1) * ROWS_PER_PAGE + 1) "–" ((page - 1) * ROWS_PER_PAGE + shown.len())
                " of " (total) ", failed first, installed last"
            }
            @if f.state.is_some() { " · " a href="/ui/" { "all rows" } }
            @if page > 1 { " · " a rel="prev" href=(overview_href(f.state.as_deref(), page - 1)) { "← previous" } }
            @if page < pages { " · " a rel="next" href=(overview_href(f.state.as_deref(), page + 1)) { "next →" } }
        }
        (rows_table(&shown, &o.dps, o.now, true, true))
        h2 { "DPs" }
        (dps_table(&o.dps, o.now))
    };
    Page {
        title: "Overview".into(),
        nav: Nav::Overview,
        live,
    }
}

fn dps_table(dps: &[DpView], now: OffsetDateTime) -> Markup {
    html! {
        @if dps.is_empty() {
            p.muted { "No DP yet: " code { "ferry dp add NAME" } "." }
        } @else {
            table.dps {
                thead { tr { th { "DP" } th { "Connected" } th { "Enrollment" } th { "Installed" } th { "Sent to it" } th { "Rate limit" } th { "Window" } th { "Disk free" } } }
                tbody {
                    @for d in dps {
                        tr data-dp=(d.name) {
                            td data-label="DP" { (dp_link(&d.name)) @if d.maintenance { " " span.badge { "maintenance" } } }
                            td data-label="Connected" {
                                (online_badge(d.online))
                                @if !d.online { @if let Some(t) = d.last_contact { " " (when(t, now)) } }
                            }
                            td data-label="Enrollment" { (d.enrollment) }
                            td data-label="Installed" { (d.installed.len()) " of " (d.assigned.len()) }
                            td data-label="Sent to it" { (bytes(d.served_bytes)) }
                            td data-label="Rate limit" { (d.rate.map_or("-".into(), human::rate)) }
                            td data-label="Window" { (d.window.as_deref().unwrap_or("always")) }
                            td data-label="Disk free" {
                                @match &d.disk { Some(k) => { (bytes(k.free_bytes)) " of " (bytes(k.total_bytes)) }, None => "-" }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn jobs_table(jobs: &[JobRecord], now: OffsetDateTime, package: bool) -> Markup {
    html! {
        @if jobs.is_empty() {
            p.muted { "No servicing job: " code { "ferry image service ID --update KB…" } "." }
        } @else {
            table.jobs {
                thead { tr {
                    th { "Job" } @if package { th { "Package" } } th { "State" } th { "Updates" }
                    th { "When" } th { "Last run" } th { "Revision made" } th { "Size" }
                } }
                tbody {
                    @for j in jobs {
                        @let run = j.last_run();
                        tr data-job=(j.id) data-state=(j.state.name()) {
                            td data-label="Job" { "#" (j.id) }
                            @if package { td data-label="Package" { (package_link(&j.package, "")) } }
                            td data-label="State" { (state_badge(j.state.name())) }
                            td data-label="Updates" { (j.request.updates.join(", ")) }
                            td data-label="When" {
                                @if let Some(c) = &j.request.schedule { code { (c) } " " }
                                @if let Some(n) = j.next_run { "next " (when(n, now)) }
                                @else if j.request.schedule.is_none() { "created " (when(j.created, now)) }
                            }
                            td data-label="Last run" {
                                @match run {
                                    Some(r) => {
                                        (state_badge(r.outcome.name())) " "
                                        (when(r.finished.unwrap_or(r.started), now))
                                        @for u in r.updates.iter().filter(|u| u.detail.is_some()) {
                                            div.detail { (u.id) ": " (u.detail.as_deref().unwrap_or_default()) }
                                        }
                                    },
                                    None => "-",
                                }
                            }
                            td data-label="Revision made" {
                                @match run.and_then(|r| r.revision) {
                                    Some(v) => { "r" (v) @if run.is_some_and(|r| r.distributed) { span.muted { " (distributed)" } } },
                                    None => "-",
                                }
                            }
                            td data-label="Size" {
                                @match run.and_then(|r| r.size_before.zip(r.size_after)) {
                                    Some((a, b)) => { (bytes(a)) " → " (bytes(b)) },
                                    None => "-",
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A package: its facts, revisions, DPs, servicing history and jobs.
pub fn package(p: &PackagePage) -> Page {
    let r = &p.record;
    let live = html! {
        dl.facts {
            dt { "Name" } dd { (r.name) @if !r.version.is_empty() { " " (r.version) } }
            dt { "Kind" } dd { (r.kind.noun()) }
            dt { "Released" } dd { @match r.target() { Some(v) => { "r" (v) }, None => "-" } }
            dt { "Imported" } dd { (when(r.created, p.now)) }
            dt { "Multicast" } dd { (r.multicast.describe()) }
            @if !r.comment.is_empty() { dt { "Comment" } dd { (r.comment) } }
        }
        h2 { "Revisions" }
        table.revisions {
            thead { tr { th { "Rev" } th { "Made" } th { "Source" } th { "Size" } th { "New bytes" } th { "Installed on" } } }
            tbody {
                @for v in p.revisions.revisions.iter().rev() {
                    tr data-revision=(v.revision) {
                        td data-label="Rev" {
                            "r" (v.revision)
                            @if v.released { " " span.badge { "released" } }
                            @if v.latest && !v.released { " " span.badge { "latest" } }
                        }
                        td data-label="Made" { (when(v.created, p.now)) }
                        td data-label="Source" { code { (v.source) } @if v.verified { span.muted { " (SHA-1 verified)" } } }
                        td data-label="Size" { (bytes(v.size)) }
                        td data-label="New bytes" { (bytes(v.new_bytes)) }
                        td data-label="Installed on" {
                            @if v.installed_on.is_empty() { "-" }
                            @for (i, d) in v.installed_on.iter().enumerate() { @if i > 0 { ", " } (dp_link(d)) }
                        }
                    }
                }
            }
        }
        p.muted { "Keeps " (p.revisions.keep) " revisions." }
        h2 { "On its DPs" }
        (rows_table(&p.rows.iter().collect::<Vec<_>>(), &[], p.now, false, true))
        h2 { "Servicing history" }
        @match &p.history {
            Some(h) => {
                @if let Some(n) = &h.note { p.muted { (n) } }
                @if !h.entries.is_empty() {
                    table.history {
                        thead { tr { th { "When" } th { "Job" } th { "Update" } th { "Result" } th { "Revision" } } }
                        tbody {
                            @for e in h.entries.iter().rev() {
                                tr {
                                    td data-label="When" { (when(e.time, p.now)) }
                                    td data-label="Job" { "#" (e.job) }
                                    td data-label="Update" { (e.update) @if !e.title.is_empty() { div.muted { (e.title) } } }
                                    td data-label="Result" {
                                        @let word = serde_json::to_value(e.result).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
                                        (state_badge(&word))
                                        @if let Some(d) = &e.detail { div.detail { (d) } }
                                    }
                                    td data-label="Revision" { @match e.revision { Some(v) => { "r" (v) }, None => "-" } }
                                }
                            }
                        }
                    }
                }
            },
            None => p.muted { "No revision yet." },
        }
        h2 { "Jobs" }
        (jobs_table(&p.jobs, p.now, false))
    };
    Page {
        title: format!("{} {}", r.id, r.name),
        nav: Nav::Overview,
        live,
    }
}

/// A DP: its facts, its packages and its validation results.
pub fn dp(p: &DpPage) -> Page {
    let d = &p.view;
    let v = &p.validation;
    let live = html! {
        dl.facts {
            dt { "Connected" } dd {
                (online_badge(d.online))
                @if let Some(t) = d.last_contact { " last contact " (when(t, p.now)) }
                @if let Some(a) = &d.address { " from " code { (a) } }
            }
            dt { "Enrollment" } dd { (d.enrollment) }
            dt { "Groups" } dd { @if d.groups.is_empty() { "-" } @else { (d.groups.join(", ")) } }
            dt { "Rate limit" } dd { (d.rate.map_or("none".into(), human::rate)) }
            dt { "Transfer windows" } dd { (d.window.as_deref().unwrap_or("always open")) }
            dt { "Maintenance" } dd { @if d.maintenance { "yes: no transfer starts" } @else { "no" } }
            dt { "Content from" } dd {
                @if d.prestaged { "prestage bundles only" }
                @else if d.pull_from.is_empty() { "the site (push)" }
                @else {
                    "pulls from "
                    @for (i, s) in d.pull_from.iter().enumerate() { @if i > 0 { ", " } (dp_link(&s.dp)) " (rank " (s.rank) ")" }
                    ", then the site"
                }
            }
            @if let Some(a) = &d.peer_address { dt { "Serves pull DPs at" } dd { code { (a) } } }
            dt { "Sent to it" } dd { (bytes(d.served_bytes)) }
            dt { "Disk" } dd {
                @match &d.disk {
                    Some(k) => { (bytes(k.used_bytes)) " used, " (bytes(k.free_bytes)) " free of " (bytes(k.total_bytes)) " (" (when(k.updated, p.now)) ")" },
                    None => "not reported",
                }
            }
            dt { "Clients" } dd {
                @if d.client_names.is_empty() { "serves no clients" }
                @else { "HTTPS as " (d.client_names.join(", ")) @if d.anonymous_clients { " (no token needed)" } }
            }
            dt { "Multicast" } dd { (d.multicast.as_ref().map_or("off".into(), |m| m.describe())) }
        }
        h2 { "Packages" }
        (rows_table(&p.rows.iter().collect::<Vec<_>>(), std::slice::from_ref(d), p.now, true, false))
        h2 { "Validation" }
        p {
            @match &v.schedule { Some(s) => { "Schedule " code { (s) } }, None => "No schedule" }
            @if let Some(n) = v.next_run { ", next " (when(n, p.now)) }
            @if let Some(t) = v.requested_at { "; last asked " (when(t, p.now)) }
            "."
        }
        @if v.results.is_empty() {
            p.muted { "Never validated: " code { "ferry dp validate " (d.name) } "." }
        } @else {
            table.validation {
                thead { tr { th { "Package" } th { "Rev" } th { "Result" } th { "Checked" } th { "When" } } }
                tbody {
                    @for r in &v.results {
                        @let damaged = r.result.damaged.len();
                        @let repaired = r.result.damaged.iter().filter(|x| x.repaired).count();
                        tr data-package=(r.package) {
                            td data-label="Package" { (package_link(&r.package, "")) }
                            td data-label="Rev" { "r" (r.result.revision) }
                            td data-label="Result" {
                                @if !r.result.done { (state_badge("validating")) }
                                @else if damaged == 0 { (state_badge("installed")) " intact" }
                                @else {
                                    (state_badge("failed")) " " (damaged) " damaged chunk(s), " (repaired) " repaired"
                                    @for x in &r.result.damaged { div.detail { code { (x.path) } " at " (x.offset) ", " (x.len) " bytes" } }
                                }
                            }
                            td data-label="Checked" { (bytes(r.result.bytes_checked)) " of " (bytes(r.result.bytes_total)) }
                            td data-label="When" { (when(r.result.updated, p.now)) }
                        }
                    }
                }
            }
        }
    };
    Page {
        title: format!("DP {}", d.name),
        nav: Nav::Overview,
        live,
    }
}

/// Servicing jobs: running and scheduled first, then the rest newest first.
pub fn jobs(all: &[JobRecord], now: OffsetDateTime) -> Page {
    let mut sorted: Vec<JobRecord> = all.to_vec();
    sorted.sort_by_key(|j| (j.state.is_final(), std::cmp::Reverse(j.id)));
    Page {
        title: "Servicing jobs".into(),
        nav: Nav::Jobs,
        live: jobs_table(&sorted, now, true),
    }
}

/// Multicast: each package's settings, each DP's settings and sessions.
pub fn multicast(
    dps: &[DpView],
    packages: &[(String, String, MulticastSettings)],
    now: OffsetDateTime,
) -> Page {
    let live = html! {
        h2 { "Packages" }
        table.mpackages {
            thead { tr { th { "Package" } th { "Multicast" } } }
            tbody {
                @for (id, name, m) in packages {
                    tr { td data-label="Package" { (package_link(id, name)) } td data-label="Multicast" { (m.describe()) } }
                }
            }
        }
        h2 { "Sessions" }
        @let sessions: Vec<(&DpView, &ferry_mcast::SessionView)> = dps.iter().flat_map(|d| d.multicast_sessions.iter().map(move |s| (d, s))).collect();
        @if sessions.is_empty() {
            p.muted { "No session has run." }
        } @else {
            table.sessions {
                thead { tr { th { "DP" } th { "Package" } th { "Session" } th { "State" } th { "Clients" } th { "Rate" } th { "Sent" } th { "Opened" } } }
                tbody {
                    @for (d, s) in sessions {
                        tr data-session=(s.session) data-state=(s.state) {
                            td data-label="DP" { (dp_link(&d.name)) }
                            td data-label="Package" { (package_link(&s.package, "")) " r" (s.revision) }
                            td data-label="Session" {
                                code { (s.session) } div.muted { (s.address) @if s.encrypted { " encrypted" } }
                            }
                            td data-label="State" { (state_badge(&s.state)) " pass " (s.passes) }
                            td data-label="Clients" { (s.clients_joined) " joined, " (s.clients_done) " done, " (s.clients_left) " left" }
                            td data-label="Rate" { (human::rate(s.rate)) }
                            td data-label="Sent" { (bytes(s.bytes_sent)) span.muted { " (" (format!("{:.2}", s.cost())) "× the package)" } }
                            td data-label="Opened" {
                                @match OffsetDateTime::from_unix_timestamp(s.opened) { Ok(t) => (when(t, now)), Err(_) => "-" }
                            }
                        }
                    }
                }
            }
        }
        h2 { "DPs" }
        table.mdps {
            thead { tr { th { "DP" } th { "Multicast" } } }
            tbody {
                @for d in dps {
                    tr { td data-label="DP" { (dp_link(&d.name)) } td data-label="Multicast" { (d.multicast.as_ref().map_or("off".into(), |m| m.describe())) } }
                }
            }
        }
    };
    Page {
        title: "Multicast".into(),
        nav: Nav::Multicast,
        live,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: &str, percent: Option<u64>) -> StatusRow {
        serde_json::from_value(serde_json::json!({
            "package": "SITE0001", "name": "Win <11>", "dp": "dp1", "revision": 2,
            "state": state, "holds_revision": null, "bytes_needed": 1000, "bytes_done": 420,
            "full_bytes": 5000, "wire_bytes": 0, "percent": percent, "eta_secs": 65,
            "rate_bps": 2048, "error": null, "online": true, "last_contact": null,
            "validation": null, "next_retry": null,
        }))
        .unwrap()
    }

    #[test]
    fn the_overview_shows_rows_failed_first_a_page_at_a_time_and_filters_by_state() {
        let states = ["installed", "pending", "failed", "in-progress"];
        let rows: Vec<StatusRow> = (0..450)
            .map(|i| {
                let mut r = row(states[i % 4], Some(10));
                r.dp = format!("dp{i:03}");
                r
            })
            .collect();
        let o = Overview {
            rows,
            dps: vec![],
            packages: vec![],
            jobs: vec![],
            now: OffsetDateTime::now_utc(),
        };
        let shown = |f: &RowFilter| {
            let html = overview(&o, f).live.into_string();
            let states: Vec<String> = html
                .split(" data-state=\"")
                .skip(1)
                .map(|s| s[..s.find('"').unwrap()].to_string())
                .collect();
            (html, states)
        };
        let (html, first) = shown(&RowFilter::default());
        assert_eq!(first.len(), ROWS_PER_PAGE);
        // 112 failed, then 112 in progress (88 of them on this page).
        assert!(first[..112].iter().all(|s| s == "failed"), "{first:?}");
        assert!(first[112..].iter().all(|s| s == "in-progress"), "{first:?}");
        assert!(html.contains("rows 1–200 of 450"), "{html}");
        assert!(html.contains(r#"href="/ui/?page=2">next →"#), "{html}");
        let (html, last) = shown(&RowFilter {
            state: None,
            page: Some(9),
        });
        assert_eq!(last.len(), 50, "a page past the end is the last page");
        assert!(last.iter().all(|s| s == "installed"));
        assert!(
            html.contains("rows 401–450 of 450") && !html.contains("next →"),
            "{html}"
        );
        assert!(html.contains(r#"href="/ui/?page=2">← previous"#), "{html}");
        let f = RowFilter {
            state: Some("pending".into()),
            page: None,
        };
        let (html, pending) = shown(&f);
        assert_eq!(pending.len(), 113);
        assert!(pending.iter().all(|s| s == "pending"));
        assert!(html.contains(r#"class="card c-pending chosen""#), "{html}");
        assert!(html.contains(r#"href="/ui/?state=pending""#), "{html}");
        let f = RowFilter {
            state: Some("<b>&x=1".into()),
            page: None,
        };
        let (html, none) = shown(&f);
        assert!(none.is_empty());
        assert!(
            html.contains("no row") && !html.contains("<b>&x"),
            "escaped: {html}"
        );
    }

    #[test]
    fn a_row_says_state_percent_bytes_rate_and_eta_escaped() {
        let o = Overview {
            rows: vec![row("in-progress", Some(42))],
            dps: vec![],
            packages: vec![],
            jobs: vec![],
            now: OffsetDateTime::now_utc(),
        };
        let html = overview(&o, &RowFilter::default()).live.into_string();
        assert!(
            html.contains(r#"data-package="SITE0001" data-dp="dp1" data-state="in-progress""#),
            "{html}"
        );
        assert!(
            html.contains(r#"<span class="state s-in-progress">in-progress</span>"#),
            "{html}"
        );
        assert!(
            html.contains(r#"<progress max="100" value="42">"#),
            "{html}"
        );
        assert!(html.contains("420 B of 1000 B"), "{html}");
        assert!(
            html.contains("2.0 KiB/s") && html.contains("1m05s"),
            "{html}"
        );
        assert!(
            html.contains("Win &lt;11&gt;") && !html.contains("Win <11>"),
            "{html}"
        );
    }

    #[test]
    fn a_failed_row_gives_the_reason() {
        let mut r = row("failed", None);
        r.error = Some("disk full on D:".into());
        let html = rows_table(&[&r], &[], OffsetDateTime::now_utc(), true, true).into_string();
        assert!(html.contains("failed: disk full on D:"), "{html}");
    }

    #[test]
    fn the_page_pulls_its_script_and_style_from_the_site_only() {
        let html = layout(&overview(
            &Overview {
                rows: vec![],
                dps: vec![],
                packages: vec![],
                jobs: vec![],
                now: OffsetDateTime::now_utc(),
            },
            &RowFilter::default(),
        ))
        .into_string();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains(r#"<script src="/ui/assets/live.js" defer>"#));
        assert!(
            !html.contains("style=\""),
            "inline styles are refused by the policy"
        );
        assert!(html.contains(r#"name="viewport""#));
    }
}
