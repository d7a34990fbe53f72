//! A fake OAuth2 introspection endpoint (RFC 7662) on loopback, and the
//! gateway configuration that uses it.
//!
//! The endpoint checks the request like a real authorization server would
//! (POST, form body with `token_type_hint=access_token`, HTTP Basic client
//! credentials `gateway` / `s3cr+t/x`, form-encoded before base64) and
//! answers `401` when any of it is wrong. Its `hits()` counts calls.
//!
//! Tokens:
//! - `claims:<json object>` → active, with those fields (percent-encoding
//!   of the token is exercised by the JSON's `{`, `"`, `:`, spaces);
//! - `inactive` → `{"active": false}`;
//! - `expired` → active with an `exp` in 1970;
//! - `badjson` → `200` with a body that is not JSON;
//! - `noactive` → a JSON object without `active`;
//! - `error` → `500`;
//! - `slow` → active, after 5 s (longer than any test's `timeout`);
//! - anything else → inactive.

use super::upstream::{self, response, TestUpstream};
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::time::Duration;

/// `Basic base64("gateway:s3cr%2Bt%2Fx")`: RFC 6749 §2.3.1 encodes the
/// id and the secret `s3cr+t/x` as form values first.
pub const BASIC: &str = "Basic Z2F0ZXdheTpzM2NyJTJCdCUyRng=";

/// The `client_secret` line value: from the environment, with the test
/// secret as default (the gateway refuses a secret written in the file).
pub const SECRET_REF: &str = "${PORTICO_TEST_IDP_SECRET:-s3cr+t/x}";

pub async fn start() -> TestUpstream {
    upstream::start(|req: Request<Incoming>| async move {
        let ok_shape = req.method() == http::Method::POST
            && req.uri().path() == "/introspect"
            && req
                .headers()
                .get("content-type")
                .is_some_and(|v| v == "application/x-www-form-urlencoded")
            && req
                .headers()
                .get("authorization")
                .is_some_and(|v| v == BASIC);
        let body = req.into_body().collect().await.unwrap().to_bytes();
        if !ok_shape {
            return response(401, r#"{"error":"invalid_client"}"#);
        }
        let form = String::from_utf8_lossy(&body).into_owned();
        let mut token = None;
        let mut hint = None;
        for pair in form.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "token" => token = Some(form_decode(v)),
                "token_type_hint" => hint = Some(form_decode(v)),
                _ => {}
            }
        }
        let (Some(token), Some("access_token")) = (token, hint.as_deref()) else {
            return response(400, r#"{"error":"invalid_request"}"#);
        };
        json_answer(&token).await
    })
    .await
}

async fn json_answer(token: &str) -> http::Response<upstream::TestBody> {
    let far = now() + 3600;
    let doc = match token {
        "inactive" => r#"{"active":false}"#.to_string(),
        "expired" => r#"{"active":true,"sub":"old","exp":1000}"#.to_string(),
        "badjson" => return response(200, "{not json"),
        "noactive" => r#"{"sub":"x","scope":"read"}"#.to_string(),
        "error" => return response(500, "boom"),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            format!(r#"{{"active":true,"exp":{far}}}"#)
        }
        t => match t.strip_prefix("claims:") {
            Some(json) => {
                let mut v: serde_json::Value = serde_json::from_str(json).expect("claims JSON");
                v["active"] = true.into();
                if v.get("exp").is_none() {
                    v["exp"] = far.into();
                }
                v.to_string()
            }
            None => r#"{"active":false}"#.to_string(),
        },
    };
    let mut r = response(200, doc);
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Decodes one `application/x-www-form-urlencoded` value.
pub fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// `Authorization: Bearer claims:<json>`.
pub fn bearer_claims(json: serde_json::Value) -> String {
    format!("Bearer claims:{json}")
}

/// A gateway configuration: listener `main` (with `listener_extra` lines,
/// indented 4), upstream `up` → `up_addr`, `consumers` (a YAML list,
/// indented 2, may be empty), `auth.introspection` server `idp` at `idp`
/// with `server_extra` lines (indented 6) plus `more_servers` (list items
/// indented 4), and `routes` (list items indented 2).
pub struct Config<'a> {
    pub idp: std::net::SocketAddr,
    pub up: std::net::SocketAddr,
    pub listener_extra: &'a str,
    pub consumers: &'a str,
    pub server_extra: &'a str,
    pub more_servers: &'a str,
    pub routes: &'a str,
}

impl Config<'_> {
    pub fn yaml(&self) -> String {
        let consumers = if self.consumers.is_empty() {
            String::new()
        } else {
            format!("consumers:\n{}", self.consumers)
        };
        format!(
            "listeners:\n  - name: main\n    address: 127.0.0.1:0\n{le}upstreams:\n  - name: up\n    targets: [{{address: \"{up}\"}}]\n{consumers}auth:\n  introspection:\n    - name: idp\n      url: http://{idp}/introspect\n      client_id: gateway\n      client_secret: {SECRET_REF}\n{se}{more}routes:\n{routes}",
            le = self.listener_extra,
            up = self.up,
            idp = self.idp,
            se = self.server_extra,
            more = self.more_servers,
            routes = self.routes,
        )
    }
}
