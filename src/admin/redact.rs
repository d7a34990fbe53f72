//! Secret redaction for `/config` and `/routes`: the value of any key whose
//! name suggests a secret is replaced by `"<redacted>"`, and so are the
//! `exact`/`regex` values of a header or query match whose `name` does.
//! Every value of `tracing.otlp.headers` is redacted (collector API keys
//! have arbitrary header names). Paths to TLS keys and certificates are shown (they are paths, not
//! secrets); the files' contents are never read here.

use serde_json::Value;

pub const REDACTED: &str = "<redacted>";

/// Words that mark a key (or a matched header/query name) as secret,
/// compared case-insensitively with `-` read as `_`.
const SECRET_WORDS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "credential",
    "authorization",
    "api_key",
    "apikey",
    "private_key",
    "cookie",
    "session",
];

pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase().replace('-', "_");
    SECRET_WORDS.iter().any(|w| n.contains(w))
}

/// Redacts `v` in place.
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let secret_match = map
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(is_secret_name);
            // `tracing.otlp.headers`: collector credentials, whatever the name.
            if let Some(Value::Object(h)) = map
                .get_mut("otlp")
                .and_then(|o| o.as_object_mut())
                .and_then(|o| o.get_mut("headers"))
            {
                h.values_mut().for_each(|v| *v = Value::from(REDACTED));
            }
            for (k, val) in map.iter_mut() {
                let hide =
                    is_secret_name(k) || (secret_match && matches!(k.as_str(), "exact" | "regex"));
                if hide && !val.is_null() {
                    *val = Value::from(REDACTED);
                } else {
                    redact(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_redacted_paths_are_not() {
        let mut v = json!({
            "admin": {"address": "127.0.0.1:9901", "token": "t0k3n"},
            "listeners": [{"tls": {"certificates": [{"cert": "a.pem", "key": "a-key.pem"}]}}],
            "upstreams": [{"tls": {"client_key": "c.key", "ca": null}}],
            "routes": [{
                "match": {"headers": [
                    {"name": "X-Api-Key", "exact": "k1"},
                    {"name": "x-tenant", "exact": "acme"}
                ]},
                "policies": [{"headers": {"request": {"set": {"Authorization": "Bearer x", "x-env": "prod"}}}}]
            }],
            "db_password": "p", "auth": {"client_secret": ["a"], "session": null}
        });
        redact(&mut v);
        assert_eq!(v["admin"]["token"], REDACTED);
        assert_eq!(v["admin"]["address"], "127.0.0.1:9901");
        assert_eq!(
            v["listeners"][0]["tls"]["certificates"][0]["key"],
            "a-key.pem"
        );
        assert_eq!(v["upstreams"][0]["tls"]["client_key"], "c.key");
        let h = &v["routes"][0]["match"]["headers"];
        assert_eq!(h[0]["exact"], REDACTED);
        assert_eq!(h[0]["name"], "X-Api-Key");
        assert_eq!(h[1]["exact"], "acme");
        let set = &v["routes"][0]["policies"][0]["headers"]["request"]["set"];
        assert_eq!(set["Authorization"], REDACTED);
        assert_eq!(set["x-env"], "prod");
        assert_eq!(v["db_password"], REDACTED);
        assert_eq!(v["auth"]["client_secret"], REDACTED);
        assert!(v["auth"]["session"].is_null());
        assert!(!v.to_string().contains("t0k3n"));
    }
}
