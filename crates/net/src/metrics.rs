//! The Prometheus exposition the site's and a DP's `/metrics` write:
//! OpenMetrics to a reader that asks for it (Prometheus does), else
//! Prometheus's older text format (curl, `promtool check metrics`).

use prometheus_client::registry::Registry;

/// The content type of OpenMetrics, what Prometheus asks for first.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of Prometheus's older text format, for every other
/// reader.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Labels of one series.
pub type Labels = Vec<(&'static str, String)>;

/// `registries` one after the other, in the format `accept` (the request's
/// `Accept` header) asks for; with its content type.
pub fn exposition(
    registries: &[&Registry],
    accept: &str,
) -> Result<(&'static str, String), std::fmt::Error> {
    use prometheus_client::encoding::text;
    let mut out = String::new();
    for r in registries {
        text::encode_registry(&mut out, r)?;
    }
    text::encode_eof(&mut out)?;
    if accept.contains("application/openmetrics-text") {
        Ok((OPENMETRICS, out))
    } else {
        Ok((TEXT, text_format(&out)))
    }
}

/// Prometheus's text format (0.0.4) of an OpenMetrics exposition of
/// counters, gauges and histograms without exemplars: a counter's HELP
/// and TYPE name its samples (`x_total`, not `x`), and there is no UNIT or
/// EOF line. prometheus-client writes only OpenMetrics; readers of the
/// older format (`promtool check metrics`, Prometheus before 2.5) would
/// see each counter's samples as an untyped metric without help.
pub fn text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;

    #[test]
    fn the_older_format_names_counter_samples_in_their_metadata_and_has_no_eof() {
        let mut r = Registry::default();
        let c = Counter::<u64>::default();
        c.inc_by(3);
        r.register("ferry_things", "Things", c);
        r.register("ferry_level", "Level", Gauge::<i64>::default());
        let (kind, om) = exposition(&[&r], "application/openmetrics-text;version=1.0.0").unwrap();
        assert_eq!(kind, OPENMETRICS);
        assert!(om.contains("# TYPE ferry_things counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let (kind, old) = exposition(&[&r, &Registry::default()], "*/*").unwrap();
        assert_eq!(kind, TEXT);
        assert!(old.contains("# HELP ferry_things_total Things.\n"), "{old}");
        assert!(old.contains("# TYPE ferry_things_total counter\n"), "{old}");
        assert!(old.contains("ferry_things_total 3\n"), "{old}");
        assert!(old.contains("# TYPE ferry_level gauge\n"), "{old}");
        assert!(!old.contains("# EOF"), "{old}");
    }
}
