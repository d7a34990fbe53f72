//! `headers` policy: sets, appends and removes request headers (before the
//! action) and response headers (after it).

use super::{Ctx, Flow, Policy, Step};
use crate::body::Body;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};

#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Removes first, then sets, then appends.
    pub fn apply(&self, h: &mut HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
    }
}

pub struct HeadersPolicy {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

impl Policy for HeadersPolicy {
    fn name(&self) -> &'static str {
        "headers"
    }

    fn on_request<'a>(&'a self, req: &'a mut Request<Body>, _ctx: &'a mut Ctx) -> Step<'a> {
        self.request.apply(req.headers_mut());
        Step::Ready(Ok(Flow::Continue))
    }

    fn on_response(&self, resp: &mut Response<Body>, _ctx: &Ctx) {
        self.response.apply(resp.headers_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    #[test]
    fn remove_then_set_then_add() {
        let ops = HeaderOps {
            set: vec![(HeaderName::from_static("x-a"), hv("1"))],
            add: vec![(HeaderName::from_static("x-b"), hv("2"))],
            remove: vec![HeaderName::from_static("x-c")],
        };
        let mut h = HeaderMap::new();
        h.insert("x-a", hv("old"));
        h.insert("x-b", hv("kept"));
        h.insert("x-c", hv("gone"));
        ops.apply(&mut h);
        assert_eq!(h.get("x-a").unwrap(), "1");
        let b: Vec<_> = h.get_all("x-b").iter().collect();
        assert_eq!(b, vec![&hv("kept"), &hv("2")]);
        assert!(h.get("x-c").is_none());
    }
}
