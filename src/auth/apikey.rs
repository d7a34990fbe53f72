//! The `api_key` method: a key from a header or a query parameter, looked
//! up by its SHA-256 among the consumers' keys (the file stores digests
//! only). The key itself is never compared, so no timing depends on how
//! close a guess is (`Consumers::api_key` explains why the digest lookup
//! needs no constant-time comparison).
//!
//! And the mTLS method: the connection's verified client certificate,
//! mapped to a consumer by fingerprint, SAN or subject.

use super::credential::Source;
use super::{Attempt, AttemptStep, AuthFailure, Authenticator, Consumers, Identity, Method};
use super::{Reason, Scheme};
use crate::body::Body;
use crate::policy::Ctx;
use http::Request;
use std::sync::Arc;

pub struct ApiKeyAuth {
    /// Header first, then query parameter.
    pub sources: Vec<Source>,
    pub consumers: Arc<Consumers>,
}

impl Authenticator for ApiKeyAuth {
    fn method(&self) -> Method {
        Method::ApiKey
    }

    fn authenticate(&self, req: &Request<Body>, _ctx: &Ctx) -> AttemptStep {
        let Some(key) = self.sources.iter().find_map(|s| s.find(req)) else {
            return AttemptStep::Ready(Attempt::Absent);
        };
        let refused = |r| Attempt::Refused(AuthFailure::new(r, Method::ApiKey, Scheme::ApiKey));
        if key.len() > 1024 {
            return AttemptStep::Ready(refused(Reason::TooLarge));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut d = [0u8; 32];
        d.copy_from_slice(digest.as_ref());
        AttemptStep::Ready(match self.consumers.api_key(&d) {
            None => refused(Reason::UnknownKey),
            Some((e, _)) if e.revoked => refused(Reason::Revoked),
            Some((_, c)) => Attempt::Verified(Identity {
                consumer: Some(c.clone()),
                method: Method::ApiKey,
                principal: None,
            }),
        })
    }

    fn strip(&self, req: &mut Request<Body>) {
        for s in &self.sources {
            s.strip(req);
        }
    }

    fn scheme(&self) -> Scheme {
        Scheme::ApiKey
    }
}

pub struct MtlsAuth {
    pub consumers: Arc<Consumers>,
}

impl Authenticator for MtlsAuth {
    fn method(&self) -> Method {
        Method::Mtls
    }

    fn authenticate(&self, _req: &Request<Body>, ctx: &Ctx) -> AttemptStep {
        let Some(cert) = &ctx.client_cert else {
            return AttemptStep::Ready(Attempt::Absent);
        };
        AttemptStep::Ready(match self.consumers.by_certificate(cert) {
            Some(c) => Attempt::Verified(Identity {
                consumer: Some(c.clone()),
                method: Method::Mtls,
                principal: None,
            }),
            None => Attempt::Refused(
                AuthFailure::new(Reason::UnknownConsumer, Method::Mtls, Scheme::Certificate)
                    .detail(format!(
                        "client certificate {} ({}) names no consumer",
                        cert.subject, cert.fingerprint_sha256
                    )),
            ),
        })
    }

    fn strip(&self, _req: &mut Request<Body>) {}

    fn scheme(&self) -> Scheme {
        Scheme::Certificate
    }
}
