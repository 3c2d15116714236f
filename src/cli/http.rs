//! A small HTTP/1.1 client for the admin API.
//!
//! It speaks through hyper's low-level `client::conn::http1`, which axum already brings into
//! the build: no second HTTP stack. An `https://` URL goes through tokio-rustls (the admin API
//! serves HTTPS when `admin_tls_cert_file` is set), trusting `--admin-ca-file` or the system's
//! roots. One connection per request is plenty for a command that asks once a second at most,
//! so there is no pool either.

use std::path::Path;
use std::time::Duration;

use axum::http::{header, Method, Request, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls::pki_types::ServerName;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("--admin-url {url:?} is invalid: {fix}")]
    BadUrl { url: String, fix: &'static str },
    #[error("cannot reach the admin API at {url}: {message}; is `weir run` listening there? (--admin-url, WEIR_ADMIN_URL)")]
    Unreachable { url: String, message: String },
    #[error("cannot set up TLS for {url}: {message}")]
    Tls { url: String, message: String },
    #[error("the admin API at {url} did not answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("the admin API at {url} answered {path} with something that is not JSON: {message}")]
    NotJson {
        url: String,
        path: String,
        message: String,
    },
}

/// An answer: the status and the body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Where the admin API is.
#[derive(Debug, Clone)]
pub struct AdminClient {
    url: String,
    authority: String,
    host: String,
    port: u16,
    /// A path prefix, for an API behind a proxy (`http://host/weir`); empty otherwise.
    prefix: String,
    timeout: Duration,
    /// For `https://`.
    tls: Option<Tls>,
}

/// The connector and the name the server's certificate must carry.
#[derive(Clone)]
struct Tls(tokio_rustls::TlsConnector, ServerName<'static>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({:?})", self.1)
    }
}

impl AdminClient {
    /// `url` is `http://host:port` (the scheme may be left out), optionally with a path prefix.
    pub fn new(url: &str) -> Result<AdminClient, HttpError> {
        AdminClient::with_ca(url, None)
    }

    /// As [`AdminClient::new`]; an `https://` URL trusts only the CA in `ca_file` when given,
    /// else the system's roots.
    pub fn with_ca(url: &str, ca_file: Option<&Path>) -> Result<AdminClient, HttpError> {
        let bad = |fix| HttpError::BadUrl {
            url: url.to_string(),
            fix,
        };
        const FIX: &str = "give the admin address, e.g. http://127.0.0.1:9090";
        let full = if url.contains("://") {
            url.to_string()
        } else {
            format!("http://{url}")
        };
        let uri: Uri = full.parse().map_err(|_| bad(FIX))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad(FIX)),
        };
        let authority = uri.authority().ok_or_else(|| bad(FIX))?;
        if uri.query().is_some() || authority.as_str().contains('@') {
            return Err(bad(FIX));
        }
        let host = authority.host().trim_matches(['[', ']']).to_string();
        let tls = match https {
            false => None,
            true => {
                let tls_err = |message| HttpError::Tls {
                    url: full.clone(),
                    message,
                };
                let config = crate::tls::client_config(ca_file).map_err(tls_err)?;
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| tls_err(format!("{host:?} is not a valid server name: {e}")))?;
                Some(Tls(tokio_rustls::TlsConnector::from(config), name))
            }
        };
        Ok(AdminClient {
            url: full.trim_end_matches('/').to_string(),
            authority: authority.to_string(),
            host,
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
            prefix: uri.path().trim_end_matches('/').to_string(),
            timeout: Duration::from_secs(10),
            tls,
        })
    }

    /// The base URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn get(&self, path: &str) -> Result<Answer, HttpError> {
        self.request(Method::GET, path, None, None).await
    }

    /// Sends one request; `path` starts with `/` and may carry a query string. A JSON `body` is
    /// sent with its content type; `token` as a bearer token.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        token: Option<&str>,
    ) -> Result<Answer, HttpError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("serialisable"));
        let content_type = body.as_ref().map(|_| "application/json");
        self.request_raw(method, path, content_type, body.unwrap_or_default(), token)
            .await
    }

    /// Sends `body` as it is, with `content_type` if given (tests send malformed bodies).
    pub async fn request_raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        token: Option<&str>,
    ) -> Result<Answer, HttpError> {
        let send = self.send(method, path, content_type, Bytes::from(body), token);
        tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| HttpError::Timeout {
                url: self.url.clone(),
                secs: self.timeout.as_secs(),
            })?
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
        token: Option<&str>,
    ) -> Result<Answer, HttpError> {
        let unreachable = |e: &dyn std::fmt::Display| HttpError::Unreachable {
            url: self.url.clone(),
            message: e.to_string(),
        };
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(&e))?;
        let mut sender = match &self.tls {
            None => open(stream).await,
            Some(Tls(connector, name)) => match connector.connect(name.clone(), stream).await {
                Ok(tls) => open(tls).await,
                Err(e) => Err(e.to_string()),
            },
        }
        .map_err(|e| unreachable(&e))?;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(header::HOST, &self.authority)
            .header(header::CONNECTION, "close")
            .header(header::ACCEPT, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(t) = content_type {
            req = req.header(header::CONTENT_TYPE, t);
        }
        let req = req.body(Full::new(body)).map_err(|e| unreachable(&e))?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// Parses an answer's body as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        answer: &Answer,
    ) -> Result<T, HttpError> {
        serde_json::from_str(&answer.body).map_err(|e| HttpError::NotJson {
            url: self.url.clone(),
            path: path.to_string(),
            message: format!("{e} (status {}, body {:?})", answer.status, answer.body),
        })
    }
}

/// An HTTP/1.1 connection over `io`; its task ends with the request (which asks to close it).
async fn open<IO>(io: IO) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The message of an API error answer (`{"error": "..."}`), or the body itself.
pub fn error_message(answer: &Answer) -> String {
    serde_json::from_str::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("HTTP {}: {}", answer.status, answer.body))
}

/// Percent-encodes one path segment (a key may hold bytes a URL path may not).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = AdminClient::new("http://127.0.0.1:9090/").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.prefix.as_str()),
            ("127.0.0.1", 9090, "")
        );
        let c = AdminClient::new("localhost:1234/weir").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.prefix.as_str()),
            ("localhost", 1234, "/weir")
        );
        let c = AdminClient::new("http://[::1]:9").unwrap();
        assert_eq!(c.host, "::1");
        let c = AdminClient::new("https://127.0.0.1/").unwrap();
        assert_eq!((c.port, c.tls.is_some()), (443, true));
        for bad in ["ftp://x", "http://", "http://a b"] {
            assert!(AdminClient::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("acme-1_x"), "acme-1_x");
        assert_eq!(segment("a@b/c"), "a%40b%2Fc");
        assert_eq!(segment("ü"), "%C3%BC");
    }
}
