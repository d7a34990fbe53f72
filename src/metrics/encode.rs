//! The exposition formats, written by hand: the Prometheus text format 0.0.4
//! and OpenMetrics 1.0 text. They differ in little: OpenMetrics names a
//! counter family without its `_total` suffix, has an `info` type, escapes
//! `"` in HELP, and ends with `# EOF`.
//!
//! The encoder writes into one `String`; it is used on scrape only.

use super::{HistogramSnapshot, BUCKETS};
use std::fmt::Write;

pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    /// A constant `1` whose labels carry the information (`_info` suffix).
    Info,
}

pub struct Encoder {
    out: String,
    openmetrics: bool,
}

/// A sample value.
pub trait Value {
    fn write(&self, out: &mut String);
}

impl Value for u64 {
    fn write(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl Value for i64 {
    fn write(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl Value for f64 {
    fn write(&self, out: &mut String) {
        write_float(out, *self);
    }
}

/// Floats as both formats accept them: `+Inf`, `-Inf`, `NaN`, otherwise
/// Rust's shortest round-trip form (never an exponent), with `.0` on whole
/// numbers (OpenMetrics' canonical form of `le` values).
fn write_float(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{v:.1}");
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl Encoder {
    pub fn new(openmetrics: bool) -> Encoder {
        Encoder {
            out: String::with_capacity(16 * 1024),
            openmetrics,
        }
    }

    pub fn content_type(&self) -> &'static str {
        if self.openmetrics {
            OPENMETRICS_CONTENT_TYPE
        } else {
            TEXT_CONTENT_TYPE
        }
    }

    /// Starts a family. `name` is the family name without type suffixes:
    /// `portico_requests` for the counter `portico_requests_total`,
    /// `portico_build` for the info metric `portico_build_info`.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let (shown, ty) = match (kind, self.openmetrics) {
            (Kind::Counter, false) => (format!("{name}_total"), "counter"),
            (Kind::Counter, true) => (name.to_string(), "counter"),
            (Kind::Gauge, _) => (name.to_string(), "gauge"),
            (Kind::Histogram, _) => (name.to_string(), "histogram"),
            (Kind::Info, false) => (format!("{name}_info"), "gauge"),
            (Kind::Info, true) => (name.to_string(), "info"),
        };
        self.out.push_str("# HELP ");
        self.out.push_str(&shown);
        self.out.push(' ');
        for c in help.chars() {
            match c {
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '"' if self.openmetrics => self.out.push_str("\\\""),
                c => self.out.push(c),
            }
        }
        self.out.push('\n');
        let _ = writeln!(self.out, "# TYPE {shown} {ty}");
    }

    /// One sample line: `name` is the full sample name (`..._total`,
    /// `..._bucket`, `..._info`).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Value) {
        self.sample_with(name, labels, None, value);
    }

    fn sample_with(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        le: Option<f64>,
        value: impl Value,
    ) {
        self.out.push_str(name);
        if !labels.is_empty() || le.is_some() {
            self.out.push('{');
            let mut first = true;
            for (k, v) in labels {
                if !first {
                    self.out.push(',');
                }
                first = false;
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label_value(v, &mut self.out);
                self.out.push('"');
            }
            if let Some(le) = le {
                if !first {
                    self.out.push(',');
                }
                self.out.push_str("le=\"");
                write_float(&mut self.out, le);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        value.write(&mut self.out);
        self.out.push('\n');
    }

    /// A counter sample (`name_total`).
    pub fn counter(&mut self, family: &str, labels: &[(&str, &str)], value: u64) {
        self.sample(&format!("{family}_total"), labels, value);
    }

    /// The `_bucket`, `_sum` and `_count` samples of one histogram.
    pub fn histogram(&mut self, family: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{family}_bucket");
        for (i, le) in BUCKETS.iter().enumerate() {
            self.sample_with(&bucket, labels, Some(*le), h.cumulative[i]);
        }
        self.sample_with(&bucket, labels, Some(f64::INFINITY), h.count());
        self.sample(&format!("{family}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{family}_count"), labels, h.count());
    }

    /// The exposition, with `# EOF` in OpenMetrics.
    pub fn finish(mut self) -> String {
        if self.openmetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

/// Whether a scraper's `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&http::HeaderValue>) -> bool {
    accept
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Histogram;
    use std::time::Duration;

    #[test]
    fn label_values_are_escaped() {
        let mut e = Encoder::new(false);
        e.sample("m", &[("a", "x\"y\\z\nw"), ("b", "plain")], 1u64);
        assert_eq!(e.finish(), "m{a=\"x\\\"y\\\\z\\nw\",b=\"plain\"} 1\n");
    }

    #[test]
    fn counters_and_info_in_both_formats() {
        let mut e = Encoder::new(false);
        e.family(
            "portico_requests",
            Kind::Counter,
            "Requests \"served\".\nAll.",
        );
        e.counter("portico_requests", &[("route", "r")], 3);
        e.family("portico_build", Kind::Info, "Build.");
        e.sample("portico_build_info", &[("version", "1")], 1u64);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP portico_requests_total Requests \"served\".\\nAll.\n\
             # TYPE portico_requests_total counter\n\
             portico_requests_total{route=\"r\"} 3\n\
             # HELP portico_build_info Build.\n\
             # TYPE portico_build_info gauge\n\
             portico_build_info{version=\"1\"} 1\n"
        );
        let mut e = Encoder::new(true);
        e.family("portico_requests", Kind::Counter, "Requests \"served\".");
        e.counter("portico_requests", &[], 3);
        e.family("portico_build", Kind::Info, "Build.");
        e.sample("portico_build_info", &[("version", "1")], 1u64);
        let om = e.finish();
        assert_eq!(
            om,
            "# HELP portico_requests Requests \\\"served\\\".\n\
             # TYPE portico_requests counter\n\
             portico_requests_total 3\n\
             # HELP portico_build Build.\n\
             # TYPE portico_build info\n\
             portico_build_info{version=\"1\"} 1\n\
             # EOF\n"
        );
    }

    #[test]
    fn histogram_lines() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut e = Encoder::new(false);
        e.family("d_seconds", Kind::Histogram, "D.");
        e.histogram("d_seconds", &[("route", "a")], &h.snapshot());
        let text = e.finish();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"d_seconds_bucket{route=\"a\",le=\"0.0025\"} 0"));
        assert!(lines.contains(&"d_seconds_bucket{route=\"a\",le=\"0.005\"} 1"));
        assert!(lines.contains(&"d_seconds_bucket{route=\"a\",le=\"1.0\"} 1"));
        assert!(lines.contains(&"d_seconds_bucket{route=\"a\",le=\"30.0\"} 1"));
        assert!(lines.contains(&"d_seconds_bucket{route=\"a\",le=\"+Inf\"} 2"));
        assert!(lines.contains(&"d_seconds_sum{route=\"a\"} 60.003"));
        assert!(lines.contains(&"d_seconds_count{route=\"a\"} 2"));
        // 2 comment lines, 16 buckets, sum, count.
        assert_eq!(lines.len(), 2 + 16 + 2);
    }

    #[test]
    fn floats() {
        let f = |v: f64| {
            let mut s = String::new();
            write_float(&mut s, v);
            s
        };
        assert_eq!(f(0.0005), "0.0005");
        assert_eq!(f(30.0), "30.0");
        assert_eq!(f(f64::INFINITY), "+Inf");
        assert_eq!(f(1e-9), "0.000000001");
    }

    #[test]
    fn negotiation() {
        let v = |s: &'static str| Some(http::HeaderValue::from_static(s));
        assert!(wants_openmetrics(
            v("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3")
                .as_ref()
        ));
        assert!(!wants_openmetrics(v("text/plain").as_ref()));
        assert!(!wants_openmetrics(None));
    }
}
