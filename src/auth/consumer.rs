//! Consumers: the known clients of the configuration, compiled into O(1)
//! lookup tables, and the grow-only [`Slots`] registry that gives each
//! consumer id a stable metrics slot across reloads.

use super::{parse_sha256_hex, sha256_hex};
use crate::config::model;
use http::HeaderValue;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Metrics slot of requests without a consumer on routes that allow
/// anonymous access (or have no `auth` policy).
pub const SLOT_ANONYMOUS: u32 = 0;
/// Metrics slot of authenticated requests whose credential names no
/// configured consumer (a JWT without `consumer_claim`), and of consumers
/// beyond [`MAX_SLOTS`].
pub const SLOT_OTHER: u32 = 1;
/// At most this many consumer label values (beyond: `other`).
pub const MAX_SLOTS: u32 = 16_384;

/// A compiled consumer.
#[derive(Debug)]
pub struct Consumer {
    pub id: Arc<str>,
    pub groups: Box<[Arc<str>]>,
    pub plan: Option<Arc<str>>,
    pub metadata: BTreeMap<String, String>,
    /// The metrics slot (stable across reloads, see [`Slots`]).
    pub slot: u32,
    /// Prebuilt values of the consumer headers.
    pub id_header: HeaderValue,
    pub groups_header: Option<HeaderValue>,
    pub plan_header: Option<HeaderValue>,
}

impl Consumer {
    pub fn in_group(&self, g: &str) -> bool {
        self.groups.iter().any(|x| &**x == g)
    }
}

/// An API key entry: whose, and whether revoked.
#[derive(Debug, Clone, Copy)]
pub struct KeyEntry {
    pub consumer: u32,
    pub revoked: bool,
}

/// Every consumer of a snapshot and the credential indexes.
#[derive(Debug, Default)]
pub struct Consumers {
    pub list: Vec<Arc<Consumer>>,
    by_id: HashMap<Arc<str>, u32>,
    /// SHA-256 of the key → entry (see [`Consumers::api_key`] for why
    /// looking keys up by digest leaks nothing through timing).
    api_keys: HashMap<[u8; 32], KeyEntry>,
    by_fingerprint: HashMap<String, u32>,
    by_subject: HashMap<String, u32>,
    by_san: HashMap<String, u32>,
    /// The slot registry this snapshot assigned from (kept by the next one).
    pub slots: Arc<Slots>,
}

impl Consumers {
    pub fn get(&self, id: &str) -> Option<&Arc<Consumer>> {
        self.by_id.get(id).map(|&i| &self.list[i as usize])
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The entry of an API key, by the SHA-256 of the presented key.
    ///
    /// What is constant-time, and why nothing more needs to be: the
    /// presented key is never compared with anything. It is hashed
    /// (SHA-256, whose time depends only on the key's length, which the
    /// caller knows) and the digest is looked up in a hash table. That
    /// lookup is not constant-time — SipHash picks a bucket, then digests
    /// in it are compared with ordinary `==`, which may stop at the first
    /// differing byte — so its timing could at most tell how many leading
    /// bytes of the *digest* of a guess equal those of a stored digest.
    /// That is worth nothing: a guess's digest is unpredictable until it is
    /// computed, and a key whose digest starts with chosen bytes can only be
    /// found by brute force (SHA-256 preimage resistance), so closeness of
    /// digests says nothing about closeness of keys. (SipHash's key is
    /// random, so which stored digests share a bucket with a guess is
    /// hidden too.) A byte-wise constant-time comparison after the
    /// lookup would add nothing: the table has already found equal digests.
    pub fn api_key(&self, digest: &[u8; 32]) -> Option<(KeyEntry, &Arc<Consumer>)> {
        let e = self.api_keys.get(digest)?;
        Some((*e, &self.list[e.consumer as usize]))
    }

    /// The consumer a verified client certificate identifies: by
    /// fingerprint, then SAN, then subject.
    pub fn by_certificate(&self, id: &crate::tls::ClientIdentity) -> Option<&Arc<Consumer>> {
        let i = self
            .by_fingerprint
            .get(&id.fingerprint_sha256)
            .or_else(|| id.sans.iter().find_map(|s| self.by_san.get(s)))
            .or_else(|| self.by_subject.get(&id.subject))?;
        Some(&self.list[*i as usize])
    }

    /// Compiles `consumers`. `err(key_path, message)` reports problems;
    /// `raw_line(key_path)` returns the line of the file (before `${VAR}`
    /// interpolation) holding a key, to check that plaintext secrets come
    /// from the environment. `previous` keeps metrics slots stable.
    pub fn compile(
        list: &[model::Consumer],
        previous: Option<&Consumers>,
        mut err: impl FnMut(String, String),
        raw_line: impl Fn(&str) -> Option<String>,
    ) -> Consumers {
        let slots = previous
            .map(|p| p.slots.clone())
            .unwrap_or_else(|| Arc::new(Slots::default()));
        let mut out = Consumers {
            slots: slots.clone(),
            ..Default::default()
        };
        for (i, c) in list.iter().enumerate() {
            let p = format!("consumers[{i}]");
            if c.id.is_empty() || c.id == super::ANONYMOUS || c.id == "other" {
                err(
                    format!("{p}.id"),
                    "must be non-empty and not `anonymous` (the id the upstream receives for callers without credentials) or `other` (reserved metric labels)"
                        .into(),
                );
                continue;
            }
            let id_header = match HeaderValue::try_from(c.id.as_str()) {
                Ok(v) => v,
                Err(_) => {
                    err(
                        format!("{p}.id"),
                        "must be valid in an HTTP header (visible ASCII)".into(),
                    );
                    continue;
                }
            };
            if out.by_id.contains_key(c.id.as_str()) {
                err(
                    format!("{p}.id"),
                    format!("duplicate consumer id `{}`", c.id),
                );
                continue;
            }
            let groups_header = if c.groups.is_empty() {
                None
            } else {
                match HeaderValue::try_from(c.groups.join(",")) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        err(
                            format!("{p}.groups"),
                            "group names must be valid in an HTTP header".into(),
                        );
                        None
                    }
                }
            };
            for (j, g) in c.groups.iter().enumerate() {
                if g.is_empty() || g.contains(',') {
                    err(
                        format!("{p}.groups[{j}]"),
                        "must be non-empty, without commas".into(),
                    );
                }
            }
            let plan_header = c.plan.as_deref().and_then(|pl| {
                HeaderValue::try_from(pl)
                    .map_err(|_| {
                        err(
                            format!("{p}.plan"),
                            "must be valid in an HTTP header".into(),
                        )
                    })
                    .ok()
            });
            let idx = out.list.len() as u32;
            for (j, k) in c.credentials.api_keys.iter().enumerate() {
                let kp = format!("{p}.credentials.api_keys[{j}]");
                let digest = match (&k.sha256, &k.key) {
                    (Some(h), None) => match parse_sha256_hex(h) {
                        Some(d) => d,
                        None => {
                            err(
                                format!("{kp}.sha256"),
                                "must be 64 hex digits (`portico hash-key` prints it)".into(),
                            );
                            continue;
                        }
                    },
                    (None, Some(key)) => {
                        let line = raw_line(&format!("{kp}.key")).unwrap_or_default();
                        if !line.contains("${") {
                            err(
                                format!("{kp}.key"),
                                "a plaintext key must come from the environment (`key: ${API_KEY_VAR}`); store its SHA-256 in `sha256` instead (`portico hash-key`)".into(),
                            );
                            continue;
                        }
                        if key.len() < 16 {
                            err(
                                format!("{kp}.key"),
                                "is shorter than 16 characters (is the variable set?)".into(),
                            );
                            continue;
                        }
                        match parse_sha256_hex(&sha256_hex(key.as_bytes())) {
                            Some(d) => d,
                            None => continue,
                        }
                    }
                    _ => {
                        err(kp, "give exactly one of `sha256` or `key`".into());
                        continue;
                    }
                };
                if out.api_keys.contains_key(&digest) {
                    err(kp, "this key is already given to a consumer".into());
                    continue;
                }
                out.api_keys.insert(
                    digest,
                    KeyEntry {
                        consumer: idx,
                        revoked: k.revoked,
                    },
                );
            }
            for (j, m) in c.credentials.mtls.iter().enumerate() {
                let mp = format!("{p}.credentials.mtls[{j}]");
                let (table, value) = match (&m.fingerprint, &m.subject, &m.san) {
                    (Some(f), None, None) => {
                        let f = f.trim().replace(':', "").to_ascii_lowercase();
                        if parse_sha256_hex(&f).is_none() {
                            err(
                                format!("{mp}.fingerprint"),
                                "must be a SHA-256 in hex (64 digits, colons allowed)".into(),
                            );
                            continue;
                        }
                        (&mut out.by_fingerprint, f)
                    }
                    (None, Some(s), None) => (&mut out.by_subject, s.clone()),
                    (None, None, Some(s)) => {
                        if !["DNS:", "URI:", "IP:", "Email:"]
                            .iter()
                            .any(|pfx| s.starts_with(pfx))
                        {
                            err(
                                format!("{mp}.san"),
                                "must start with `DNS:`, `URI:`, `IP:` or `Email:`".into(),
                            );
                            continue;
                        }
                        (&mut out.by_san, s.clone())
                    }
                    _ => {
                        err(
                            mp,
                            "give exactly one of `fingerprint`, `subject` or `san`".into(),
                        );
                        continue;
                    }
                };
                if table.insert(value, idx).is_some() {
                    err(
                        format!("{p}.credentials.mtls[{j}]"),
                        "this certificate identity is already given to a consumer".into(),
                    );
                }
            }
            let id: Arc<str> = c.id.as_str().into();
            out.by_id.insert(id.clone(), idx);
            out.list.push(Arc::new(Consumer {
                slot: slots.slot(&id),
                id,
                groups: c.groups.iter().map(|g| Arc::from(g.as_str())).collect(),
                plan: c.plan.as_deref().map(Arc::from),
                metadata: c.metadata.clone(),
                id_header,
                groups_header,
                plan_header,
            }));
        }
        out
    }
}

/// Consumer id → metrics slot, grow-only and shared by every snapshot, so a
/// route's per-consumer counters (carried across reloads by route name)
/// keep meaning the same consumer. Slot 0 is `anonymous`, 1 is `other`.
/// Touched only when compiling and when rendering metrics.
#[derive(Debug)]
pub struct Slots {
    inner: Mutex<SlotTable>,
}

/// Id → slot, and slot → id.
type SlotTable = (HashMap<Arc<str>, u32>, Vec<Arc<str>>);

impl Default for Slots {
    fn default() -> Self {
        Slots {
            inner: Mutex::new((
                HashMap::new(),
                vec![Arc::from("anonymous"), Arc::from("other")],
            )),
        }
    }
}

impl Slots {
    /// The slot of `id`, assigned on first sight; `SLOT_OTHER` when full.
    pub fn slot(&self, id: &Arc<str>) -> u32 {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&s) = g.0.get(id) {
            return s;
        }
        let s = g.1.len() as u32;
        if s >= MAX_SLOTS {
            return SLOT_OTHER;
        }
        g.0.insert(id.clone(), s);
        g.1.push(id.clone());
        s
    }

    /// Label values by slot (`anonymous`, `other`, then consumers ever
    /// configured in this process).
    pub fn names(&self) -> Vec<Arc<str>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Vec<model::Consumer> {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn compile(list: &[model::Consumer], prev: Option<&Consumers>) -> (Consumers, Vec<String>) {
        let mut errs = Vec::new();
        let c = Consumers::compile(
            list,
            prev,
            |p, m| errs.push(format!("{p}: {m}")),
            |_| Some("key: ${X}".into()),
        );
        (c, errs)
    }

    #[test]
    fn keys_and_certificates_index_consumers() {
        let h = sha256_hex(b"secret-key-0123456789");
        let list = parse(&format!(
            "- id: app\n  groups: [partners]\n  plan: pro\n  credentials:\n    api_keys: [{{sha256: {h}}}]\n    mtls: [{{san: 'DNS:app.example'}}]\n- id: old\n  credentials:\n    api_keys: [{{key: old-key-0123456789, revoked: true}}]\n"
        ));
        let (c, errs) = compile(&list, None);
        assert!(errs.is_empty(), "{errs:?}");
        let d = parse_sha256_hex(&h).unwrap();
        let (e, who) = c.api_key(&d).unwrap();
        assert!(!e.revoked);
        assert_eq!(&*who.id, "app");
        assert_eq!(who.groups_header.as_ref().unwrap(), "partners");
        let d = parse_sha256_hex(&sha256_hex(b"old-key-0123456789")).unwrap();
        assert!(c.api_key(&d).unwrap().0.revoked);
        assert!(c.api_key(&[0u8; 32]).is_none());
        let id = crate::tls::ClientIdentity {
            subject: "CN=x".into(),
            sans: vec!["DNS:app.example".into()],
            fingerprint_sha256: "00".into(),
            header_value: HeaderValue::from_static("x"),
        };
        assert_eq!(&*c.by_certificate(&id).unwrap().id, "app");
    }

    #[test]
    fn slots_are_stable_across_recompiles() {
        let (a, _) = compile(&parse("- id: a\n- id: b\n"), None);
        assert_eq!(a.get("a").unwrap().slot, 2);
        assert_eq!(a.get("b").unwrap().slot, 3);
        let (b, _) = compile(&parse("- id: c\n- id: b\n"), Some(&a));
        assert_eq!(b.get("b").unwrap().slot, 3);
        assert_eq!(b.get("c").unwrap().slot, 4);
        assert_eq!(&*b.slots.names()[4], "c");
    }

    #[test]
    fn bad_consumers_are_errors() {
        let (_, errs) = compile(
            &parse("- id: a\n- id: a\n- id: anonymous\n- id: k\n  credentials:\n    api_keys: [{sha256: xyz}, {}]\n    mtls: [{san: 'foo'}]\n"),
            None,
        );
        let all = errs.join("\n");
        assert!(all.contains("consumers[1].id: duplicate"), "{all}");
        assert!(all.contains("consumers[2].id: must be non-empty"), "{all}");
        assert!(all.contains("api_keys[0].sha256: must be 64 hex"), "{all}");
        assert!(all.contains("api_keys[1]: give exactly one"), "{all}");
        assert!(all.contains("mtls[0].san: must start"), "{all}");
    }

    #[test]
    fn plaintext_keys_must_come_from_the_environment() {
        let mut errs = Vec::new();
        Consumers::compile(
            &parse("- id: a\n  credentials:\n    api_keys: [{key: written-in-the-file-123}]\n"),
            None,
            |p, m| errs.push(format!("{p}: {m}")),
            |_| Some("    api_keys: [{key: written-in-the-file-123}]".into()),
        );
        assert!(
            errs[0].contains("must come from the environment"),
            "{errs:?}"
        );
    }
}
