//! What an operator sends the site's API: any body is one of the request
//! types or a refusal, and the texts inside them — transfer windows, cron
//! schedules, start times, port ranges — read to a value or an error, and
//! what reads is evaluated as the site would (the limit in force and the
//! next change, the next run). The first byte picks the route; bytes past
//! a 64 KiB body are cut as the site's limit cuts them. Routes 0–3 give the
//! text straight to one parser.
#![no_main]
use ferry_api::requests::{self as r, DpSettings, MulticastChange, ServiceRequest};
use ferry_api::schedule::{self, Schedule};
use ferry_api::windows::Windows;
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;

/// Times the site could be at: 2026, 2038, 2099.
fn moments() -> [OffsetDateTime; 3] {
    [1_795_000_000, 2_147_483_647, 4_070_000_000]
        .map(|s| OffsetDateTime::from_unix_timestamp(s).unwrap())
}

/// A zone with daylight saving changes, read once.
fn zone() -> tzfile::ArcTz {
    static ZONE: std::sync::OnceLock<tzfile::ArcTz> = std::sync::OnceLock::new();
    ZONE.get_or_init(|| {
        tzfile::ArcTz::new(
            tzfile::Tz::named("Europe/Berlin").unwrap_or_else(|_| chrono::Utc.into()),
        )
    })
    .clone()
}

fn windows(text: &str) {
    if let Ok(w) = Windows::parse_in(text, zone()) {
        // What it says it is reads again to the same.
        let again = Windows::parse_in(w.text(), zone()).expect("its own text reads");
        assert_eq!(again.text(), w.text());
        for t in moments() {
            let (_, next) = w.at(t);
            assert!(
                next > t && next <= t + time::Duration::days(7),
                "{next} after {t}"
            );
            let _ = w.clock_at(next, t);
        }
    }
}

fn cron(expr: &str) {
    if let Ok(s) = Schedule::parse(expr) {
        assert!(
            Schedule::parse(s.expr()).is_ok(),
            "{:?} does not read again",
            s.expr()
        );
        for t in moments() {
            if let Some(next) = s.next_after(t) {
                assert!(next > t, "{next} is not after {t}");
            }
        }
    }
}

fn at(text: &str) {
    for now in moments() {
        let _ = schedule::parse_at(text, now);
    }
}

fn body<T: serde::de::DeserializeOwned>(b: &[u8]) -> Option<T> {
    serde_json::from_slice(b).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, b)) = data.split_first() else {
        return;
    };
    let b = &b[..b.len().min(64 * 1024)];
    let text = std::str::from_utf8(b).unwrap_or("");
    match route % 24 {
        0 => windows(text),
        1 => cron(text),
        2 => at(text),
        3 => {
            if let Ok((a, z)) = r::parse_ports(text) {
                assert!(a >= 1 && a <= z);
            }
        }
        4 => {
            if let Some(s) = body::<DpSettings>(b) {
                s.window.as_deref().map(windows);
                s.validate_schedule.as_deref().map(cron);
            }
        }
        5 => {
            if let Some(s) = body::<ServiceRequest>(b) {
                s.at.as_deref().map(at);
                s.schedule.as_deref().map(cron);
            }
        }
        6 => {
            if let Some(c) = body::<MulticastChange>(b) {
                let _ = c.ports.as_deref().map(r::parse_ports);
            }
        }
        7 => drop(body::<r::ImportRequest>(b)),
        8 => drop(body::<r::UpgradeRequest>(b)),
        9 => drop(body::<r::RefreshRequest>(b)),
        10 => drop(body::<r::Properties>(b)),
        11 => {
            if let Some(m) = body::<r::MulticastSettings>(b) {
                let _ = m.describe();
            }
        }
        12 => drop(body::<r::RollbackRequest>(b)),
        13 => drop(body::<r::VerifyRequest>(b)),
        14 => drop(body::<r::AddDpRequest>(b)),
        15 => drop(body::<r::ValidateRequest>(b)),
        16 => drop(body::<r::GroupRequest>(b)),
        17 => drop(body::<r::MembersRequest>(b)),
        18 => drop(body::<r::ClientTokenRequest>(b)),
        19 => drop(body::<r::DistributeRequest>(b)),
        20 => drop(body::<r::UpdateImportRequest>(b)),
        // Queries arrive as URL-encoded text.
        21 => drop(serde_urlencoded::from_str::<r::FileQuery>(text)),
        22 => drop(serde_urlencoded::from_str::<r::PrestageQuery>(text)),
        _ => drop(serde_urlencoded::from_str::<r::StatusQuery>(text)),
    }
});
