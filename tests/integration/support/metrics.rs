//! Scraping the admin listener's `/metrics` and reading the result with a
//! real Prometheus text-format parser (`prometheus-parse`), after a strict
//! line-by-line check of the exposition (that parser skips what it does not
//! understand, so it alone would not catch a malformed line).

use super::client::{self, Reply};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use prometheus_parse::{Scrape, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

/// GET `path` on the admin listener, with a bearer token if given.
pub async fn admin_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Reply {
    admin_request(addr, "GET", path, token, &[]).await
}

pub async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    client::send(b.body(Full::new(Bytes::new())).unwrap()).await
}

/// A parsed scrape.
pub struct Metrics {
    pub text: String,
    pub scrape: Scrape,
}

impl Metrics {
    /// The value of the counter or gauge `name` whose labels include all of
    /// `labels`; panics when none or several series match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in:\n{}", self.text))
    }

    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && has_labels(&s.labels, labels))
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                other => panic!("{name} is not a single value: {other:?}"),
            })
            .collect();
        assert!(found.len() <= 1, "{name}{labels:?} matches {found:?}");
        found.first().copied()
    }

    /// The cumulative buckets `(le, count)` of histogram `name` with
    /// `labels`, and its `_sum` and `_count`.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> (Vec<(f64, f64)>, f64, f64) {
        let buckets = self
            .scrape
            .samples
            .iter()
            .find(|s| s.metric == name && has_labels(&s.labels, labels))
            .map(|s| match &s.value {
                Value::Histogram(h) => h.iter().map(|b| (b.less_than, b.count)).collect(),
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .unwrap_or_else(|| panic!("no histogram {name}{labels:?} in:\n{}", self.text));
        let sum = self.value(&format!("{name}_sum"), labels);
        let count = self.value(&format!("{name}_count"), labels);
        (buckets, sum, count)
    }
}

fn has_labels(have: &prometheus_parse::Labels, want: &[(&str, &str)]) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(*v))
}

/// Scrapes and parses `/metrics` (Prometheus text format).
pub async fn scrape(addr: SocketAddr, token: Option<&str>) -> Metrics {
    let r = admin_get(addr, "/metrics", token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = r.text();
    check_text_format(&text);
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses");
    Metrics { text, scrape }
}

/// Strict checks of the text format 0.0.4: only `# HELP`/`# TYPE` comments,
/// HELP and TYPE once per family and before its samples, sample names
/// belonging to the family (`_bucket`/`_sum`/`_count` for histograms),
/// well-formed labels and values, no duplicate series.
pub fn check_text_format(text: &str) {
    assert!(text.ends_with('\n'), "exposition ends with a newline");
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut series: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(helps.insert(name.to_string()), "HELP twice: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, ty) = (it.next().unwrap(), it.next().unwrap());
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                "{line}"
            );
            assert!(helps.contains(name), "TYPE before HELP: {line}");
            assert!(
                types.insert(name.to_string(), ty.to_string()).is_none(),
                "TYPE twice: {line}"
            );
            current = Some(name.to_string());
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        assert!(!line.is_empty(), "empty line");
        let (series_id, value) = line.rsplit_once(' ').expect("name and value");
        assert!(
            value == "+Inf" || value == "NaN" || value.parse::<f64>().is_ok(),
            "bad value: {line}"
        );
        let name_end = series_id.find('{').unwrap_or(series_id.len());
        let name = &series_id[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name: {line}"
        );
        if name_end < series_id.len() {
            check_labels(&series_id[name_end..], line);
        }
        let family = current.as_deref().expect("sample before any TYPE");
        let ok = match types[family].as_str() {
            "histogram" => [
                format!("{family}_bucket"),
                format!("{family}_sum"),
                format!("{family}_count"),
            ]
            .contains(&name.to_string()),
            _ => name == family,
        };
        assert!(ok, "sample {name} outside its family {family}: {line}");
        assert!(
            series.insert(series_id.to_string()),
            "duplicate series: {line}"
        );
    }
}

/// `{k="v",...}` with escaped values.
fn check_labels(s: &str, line: &str) {
    let inner = s
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or_else(|| panic!("bad labels: {line}"));
    let b = inner.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        assert!(
            i > start && b.get(i) == Some(&b'=') && b.get(i + 1) == Some(&b'"'),
            "bad label: {line}"
        );
        i += 2;
        loop {
            match b.get(i) {
                Some(b'\\') => {
                    assert!(
                        matches!(b.get(i + 1), Some(b'\\' | b'"' | b'n')),
                        "bad escape: {line}"
                    );
                    i += 2;
                }
                Some(b'"') => {
                    i += 1;
                    break;
                }
                Some(b'\n') | None => panic!("unterminated label value: {line}"),
                Some(_) => i += 1,
            }
        }
        if i < b.len() {
            assert_eq!(b[i], b',', "labels separated by commas: {line}");
            i += 1;
        }
    }
}

/// Polls `/metrics` until `cond` holds (request metrics are recorded when
/// the server is done with a response body, a moment after the client has
/// read it), then returns that scrape; panics with the last one after 5 s.
pub async fn scrape_until(
    addr: SocketAddr,
    token: Option<&str>,
    mut cond: impl FnMut(&Metrics) -> bool,
) -> Metrics {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let m = scrape(addr, token).await;
        if cond(&m) {
            return m;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("condition never held; last scrape:\n{}", m.text);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
