//! A small JSON-over-HTTP client for both APIs, over TCP or a unix socket.
//!
//! The CLI reaches the center through its unix socket (the center lives in a network
//! namespace of the lab, the socket in the file system crosses namespaces) or over HTTPS;
//! agents and the center talk over mutual TLS on the management network.
//!
//! Every client carries explicit TLS settings (`tern_pki::tls`): a client made without any
//! trusts no server, so an `https://` URL never falls back to the system's roots.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_pki::rustls::ClientConfig;
use tern_pki::LiveIdentity;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ApiError, ErrorBody};

/// Where an API server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `https://host:port` or `http://host:port` (no trailing slash).
    Tcp(String),
    /// Path of a unix socket.
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `unix:/path`, a path starting with `/`, or an `https://` (`http://`) URL.
    pub fn parse(s: &str) -> Endpoint {
        if let Some(p) = s.strip_prefix("unix:") {
            Endpoint::Unix(PathBuf::from(p))
        } else if s.starts_with('/') {
            Endpoint::Unix(PathBuf::from(s))
        } else {
            Endpoint::Tcp(s.trim_end_matches('/').to_string())
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(u) => f.write_str(u),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Connections kept open to the peers of one process (or one center), shared by every client
/// made from it: a call reuses an idle connection instead of opening a new one — on the guest's
/// pause path too. Cheap to clone.
///
/// With TLS, each peer gets its own client whose verifier expects that peer's certificate
/// name, so a connection to one host can never be used for another.
///
/// Not process-global on purpose: a pooled connection belongs to the async runtime that opened
/// it, and one process may run several (tests do).
#[derive(Debug, Clone)]
pub struct HttpPool {
    plain: reqwest::Client,
    tls: Option<Arc<PoolTls>>,
    /// The caller's HA leader term, sent with every call when above 0 (see
    /// [`crate::LEADER_TERM_HEADER`]).
    term: Option<Arc<AtomicU64>>,
}

#[derive(Debug)]
struct PoolTls {
    ca_pem: String,
    identity: LiveIdentity,
    clients: Mutex<HashMap<String, reqwest::Client>>,
}

fn client_builder(tls: ClientConfig) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .no_proxy()
        .use_preconfigured_tls(tls)
}

fn build(b: reqwest::ClientBuilder, endpoint: &str) -> Result<reqwest::Client, ApiError> {
    b.build().map_err(|e| ApiError::Transport {
        endpoint: endpoint.to_string(),
        source: e,
    })
}

impl HttpPool {
    /// A pool for plain-HTTP peers.
    pub fn new() -> Result<HttpPool, ApiError> {
        Ok(HttpPool {
            plain: build(
                client_builder(tern_pki::tls::refusing_client_config()),
                "(HTTP client)",
            )?,
            tls: None,
            term: None,
        })
    }

    /// Calls made through this pool carry the term `term` holds (when above 0), so agents
    /// refuse a leader that was deposed since.
    pub fn with_leader_term(mut self, term: Arc<AtomicU64>) -> HttpPool {
        self.term = Some(term);
        self
    }

    /// A pool for peers that are hosts of the cluster whose CA is `ca_pem`, presenting
    /// `identity` (the center's certificate) to them.
    pub fn with_tls(ca_pem: &str, identity: LiveIdentity) -> Result<HttpPool, ApiError> {
        tern_pki::tls::ca_roots(ca_pem).map_err(|e| ApiError::Tls {
            detail: format!("the cluster CA: {e}"),
        })?;
        Ok(HttpPool {
            tls: Some(Arc::new(PoolTls {
                ca_pem: ca_pem.to_string(),
                identity,
                clients: Mutex::new(HashMap::new()),
            })),
            ..HttpPool::new()?
        })
    }

    /// The client for host `peer`: over TLS, one that accepts only `peer`'s certificate.
    fn client_for(&self, peer: &str) -> reqwest::Client {
        let Some(tls) = &self.tls else {
            return self.plain.clone();
        };
        let mut clients = tls.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(peer) {
            return c.clone();
        }
        let trust = tern_pki::tls::ServerTrust::Ca {
            ca_pem: tls.ca_pem.clone(),
            name: tern_pki::host_cert_name(peer),
        };
        let made = tern_pki::tls::client_config(&trust, Some(tls.identity.clone()))
            .map_err(|e| e.to_string())
            .and_then(|cfg| build(client_builder(cfg), peer).map_err(|e| e.to_string()));
        match made {
            Ok(c) => {
                clients.insert(peer.to_string(), c.clone());
                c
            }
            // The plain client trusts no server: calls to this peer fail, with the reason.
            Err(e) => {
                tracing::warn!(peer, "cannot make a TLS client for this host: {e}");
                self.plain.clone()
            }
        }
    }
}

/// How long an idle pooled connection is kept: well under the servers' idle timeout (10 s,
/// `tern-serve`), so a call never picks a connection the server is closing at that moment.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a whole call unless the caller says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// JSON client with a bearer token.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    endpoint: Endpoint,
    token: String,
    /// Time allowed for each call (connect, send, answer).
    timeout: Duration,
    /// The HA leader term sent with each call (see [`HttpPool::with_leader_term`]).
    term: Option<Arc<AtomicU64>>,
}

impl ApiClient {
    pub fn new(endpoint: Endpoint, token: impl Into<String>) -> Result<Self, ApiError> {
        Self::with_timeout(endpoint, token, DEFAULT_TIMEOUT)
    }

    /// A client of the TCP peer `peer` (a host name) at `url` over a shared pool of
    /// connections.
    pub fn pooled(pool: &HttpPool, peer: &str, url: &str, token: impl Into<String>) -> ApiClient {
        let url = url.trim_end_matches('/').to_string();
        ApiClient {
            http: pool.client_for(peer),
            base: url.clone(),
            endpoint: Endpoint::Tcp(url),
            token: token.into(),
            timeout: DEFAULT_TIMEOUT,
            term: pool.term.clone(),
        }
    }

    /// The same client with another time allowed per call.
    pub fn timeout(&self, timeout: Duration) -> ApiClient {
        ApiClient {
            timeout,
            ..self.clone()
        }
    }

    /// A client that speaks plain HTTP (a unix socket, or an `http://` URL); an `https://`
    /// URL fails, as no CA is trusted.
    pub fn with_timeout(
        endpoint: Endpoint,
        token: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, ApiError> {
        Self::with_tls(
            endpoint,
            token,
            timeout,
            tern_pki::tls::refusing_client_config(),
        )
    }

    /// A client with the TLS settings `tls` (made by `tern_pki::tls::client_config`).
    pub fn with_tls(
        endpoint: Endpoint,
        token: impl Into<String>,
        timeout: Duration,
        tls: ClientConfig,
    ) -> Result<Self, ApiError> {
        let mut b = client_builder(tls);
        let base = match &endpoint {
            Endpoint::Tcp(url) => url.clone(),
            Endpoint::Unix(path) => {
                b = b.unix_socket(path.clone());
                "http://localhost".to_string()
            }
        };
        let http = build(b, &endpoint.to_string())?;
        Ok(ApiClient {
            http,
            base,
            endpoint,
            token: token.into(),
            timeout,
            term: None,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ApiError> {
        let mut req = req.timeout(self.timeout).bearer_auth(&self.token);
        if let Some(term) = self.term.as_ref().map(|t| t.load(Ordering::SeqCst)) {
            if term > 0 {
                req = req.header(crate::LEADER_TERM_HEADER, term);
            }
        }
        let resp = req.send().await.map_err(|e| ApiError::Transport {
            endpoint: self.endpoint.to_string(),
            source: e,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or_else(|_| {
                if text.is_empty() {
                    status.canonical_reason().unwrap_or("error").to_string()
                } else {
                    text
                }
            });
        Err(ApiError::Status {
            status: status.as_u16(),
            message,
        })
    }

    async fn decode<T: DeserializeOwned>(&self, resp: reqwest::Response) -> Result<T, ApiError> {
        let bytes = resp.bytes().await.map_err(|e| ApiError::Transport {
            endpoint: self.endpoint.to_string(),
            source: e,
        })?;
        // An empty body decodes as JSON null, so `()` answers work.
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|e| ApiError::Decode {
            endpoint: self.endpoint.to_string(),
            detail: e.to_string(),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let resp = self.send(self.http.get(self.url(path))).await?;
        self.decode(resp).await
    }

    /// GET with a query string built from `query` (serde, percent-encoded).
    pub async fn get_query<Q: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
    ) -> Result<T, ApiError> {
        let resp = self
            .send(self.http.get(self.url(path)).query(query))
            .await?;
        self.decode(resp).await
    }

    pub async fn get_text(&self, path: &str) -> Result<String, ApiError> {
        let resp = self.send(self.http.get(self.url(path))).await?;
        resp.text().await.map_err(|e| ApiError::Transport {
            endpoint: self.endpoint.to_string(),
            source: e,
        })
    }

    /// GET of a text answer, with a query string built from `query`.
    pub async fn get_text_query<Q: Serialize + ?Sized>(
        &self,
        path: &str,
        query: &Q,
    ) -> Result<String, ApiError> {
        let resp = self
            .send(self.http.get(self.url(path)).query(query))
            .await?;
        resp.text().await.map_err(|e| ApiError::Transport {
            endpoint: self.endpoint.to_string(),
            source: e,
        })
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let resp = self.send(self.http.post(self.url(path)).json(body)).await?;
        self.decode(resp).await
    }

    pub async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let resp = self.send(self.http.put(self.url(path)).json(body)).await?;
        self.decode(resp).await
    }

    pub async fn delete(&self, path: &str) -> Result<(), ApiError> {
        self.send(self.http.delete(self.url(path))).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("unix:/run/c.sock"),
            Endpoint::Unix("/run/c.sock".into())
        );
        assert_eq!(
            Endpoint::parse("/run/c.sock"),
            Endpoint::Unix("/run/c.sock".into())
        );
        assert_eq!(
            Endpoint::parse("http://10.0.0.1:8700/"),
            Endpoint::Tcp("http://10.0.0.1:8700".into())
        );
    }
}
