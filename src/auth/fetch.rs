//! A small HTTP/1.1 client for the services identity depends on: JWKS
//! documents and OAuth2 token introspection endpoints.
//!
//! One [`Fetcher`] per configured URL (`http://` or `https://`, verified with
//! the webpki roots or a configured CA bundle). It keeps a few idle
//! keep-alive connections (a mutex held only to push or pop, never across an
//! `.await`), bounds every exchange with one timeout (connect, TLS, request,
//! whole body) and every answer's size, and never follows redirects.

use crate::tls::client::{ClientSettings, TargetTls, UpstreamTls};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Idle connections kept per URL.
const MAX_IDLE: usize = 8;

/// An answer read whole (bounded).
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Fetcher {
    url: String,
    /// `host:port` to connect to.
    authority: String,
    host_header: HeaderValue,
    path: String,
    tls: Option<TargetTls>,
    timeout: Duration,
    max_body: usize,
    idle: Mutex<Vec<http1::SendRequest<Full<Bytes>>>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").field("url", &self.url).finish()
    }
}

impl Fetcher {
    /// Parses `url` and prepares TLS (reading `ca`, a PEM bundle, when
    /// given). Errors are messages for the configuration key holding the
    /// URL.
    pub fn new(
        url: &str,
        ca: Option<PathBuf>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Fetcher, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("`{url}` must start with http:// or https://")),
        };
        let Some(host) = uri.host() else {
            return Err(format!("`{url}` has no host"));
        };
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(format!("`{url}`: no user info in the URL"));
        }
        if ca.is_some() && !https {
            return Err(format!("`{url}`: a CA bundle is only used with https://"));
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let authority = if bare.contains(':') {
            format!("[{bare}]:{port}")
        } else {
            format!("{bare}:{port}")
        };
        let tls = if https {
            let settings = ClientSettings {
                ca,
                server_name: None,
                client_cert: None,
                alpn: vec![b"http/1.1".to_vec()],
            };
            let up = UpstreamTls::new(settings).map_err(|es| {
                es.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
            Some(Arc::new(up).for_target(bare)?)
        } else {
            None
        };
        let host_header = HeaderValue::try_from(uri.authority().map_or(host, |a| a.as_str()))
            .map_err(|_| format!("`{url}`: bad host"))?;
        Ok(Fetcher {
            url: url.to_string(),
            authority,
            host_header,
            path: uri
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string()),
            tls,
            timeout,
            max_body,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET` the URL.
    pub async fn get(&self, headers: &[(HeaderName, HeaderValue)]) -> Result<Fetched, String> {
        self.send(Method::GET, headers, Bytes::new()).await
    }

    /// `POST` an `application/x-www-form-urlencoded` body.
    pub async fn post_form(
        &self,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Fetched, String> {
        self.send(Method::POST, headers, body).await
    }

    async fn send(
        &self,
        method: Method,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Fetched, String> {
        match tokio::time::timeout(self.timeout, self.exchange(method, headers, body)).await {
            Ok(r) => r,
            Err(_) => Err(format!("{}: no answer within {:?}", self.url, self.timeout)),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Fetched, String> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(self.path.as_str())
            .header(header::HOST, self.host_header.clone())
            .header(header::ACCEPT, HeaderValue::from_static("application/json"));
        if method == Method::POST {
            b = b.header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            );
        }
        for (k, v) in headers {
            b = b.header(k, v);
        }
        let req = b
            .body(Full::new(body))
            .map_err(|e| format!("{}: cannot build the request: {e}", self.url))?;
        let mut sender = match self.pop_idle() {
            Some(s) => s,
            None => self.connect().await?,
        };
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{}: {e}", self.url))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, self.max_body)
            .collect()
            .await
            .map_err(|e| format!("{}: reading the answer: {e}", self.url))?
            .to_bytes();
        let reusable = parts
            .headers
            .get(header::CONNECTION)
            .is_none_or(|v| !v.as_bytes().eq_ignore_ascii_case(b"close"));
        if reusable {
            self.push_idle(sender);
        }
        Ok(Fetched {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    fn pop_idle(&self) -> Option<http1::SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(s) = idle.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    fn push_idle(&self, s: http1::SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE && !s.is_closed() {
            idle.push(s);
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, String> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("{}: cannot connect to {}: {e}", self.url, self.authority))?;
        let _ = tcp.set_nodelay(true);
        let stream = crate::tls::client::ClientStream::connect(self.tls.as_ref(), tcp)
            .await
            .map_err(|e| format!("{}: TLS: {e}", self.url))?;
        let (tx, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{}: {e}", self.url))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let t = Duration::from_secs(1);
        assert!(Fetcher::new("ftp://x/", None, t, 10).is_err());
        assert!(Fetcher::new("http://u:p@x/", None, t, 10).is_err());
        assert!(Fetcher::new("http:///nohost", None, t, 10).is_err());
        assert!(Fetcher::new("http://x/", Some("/ca.pem".into()), t, 10).is_err());
        let f = Fetcher::new("http://[::1]:8080/a?b=1", None, t, 10).unwrap();
        assert_eq!(f.authority, "[::1]:8080");
        assert_eq!(f.path, "/a?b=1");
        let f = Fetcher::new("https://id.example.com/jwks", None, t, 10).unwrap();
        assert_eq!(f.authority, "id.example.com:443");
        assert!(f.tls.is_some());
    }

    #[tokio::test]
    async fn fetches_and_reuses_connections() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let c2 = conns.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                c2.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let m = req.method().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let text = format!("{m} {}", String::from_utf8_lossy(&body));
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(text),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let f = Fetcher::new(
            &format!("http://{addr}/x"),
            None,
            Duration::from_secs(5),
            1024,
        )
        .unwrap();
        let a = f.get(&[]).await.unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(&a.body[..], b"GET ");
        let b = f
            .post_form(&[], Bytes::from_static(b"token=t"))
            .await
            .unwrap();
        assert_eq!(&b.body[..], b"POST token=t");
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        let small =
            Fetcher::new(&format!("http://{addr}/x"), None, Duration::from_secs(5), 3).unwrap();
        assert!(small.get(&[]).await.is_err());
    }
}
