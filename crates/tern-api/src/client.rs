//! A small JSON-over-HTTP client for both APIs, over TCP or a unix socket.
//!
//! The CLI reaches the center through its unix socket (the center lives in a network
//! namespace of the lab, the socket in the file system crosses namespaces); agents and the
//! center talk over TCP on the management network.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ApiError, ErrorBody};

/// Where an API server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `http://host:port` (no trailing slash).
    Tcp(String),
    /// Path of a unix socket.
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `unix:/path`, a path starting with `/`, or an `http://` URL.
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
/// Not process-global on purpose: a pooled connection belongs to the async runtime that opened
/// it, and one process may run several (tests do).
#[derive(Debug, Clone)]
pub struct HttpPool(reqwest::Client);

impl HttpPool {
    /// A pool for TCP peers.
    pub fn new() -> Result<HttpPool, ApiError> {
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .no_proxy()
            .build()
            .map(HttpPool)
            .map_err(|e| ApiError::Transport {
                endpoint: "(HTTP client)".into(),
                source: e,
            })
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
}

impl ApiClient {
    pub fn new(endpoint: Endpoint, token: impl Into<String>) -> Result<Self, ApiError> {
        Self::with_timeout(endpoint, token, DEFAULT_TIMEOUT)
    }

    /// A client of a TCP peer (`http://host:port`) over a shared pool of connections.
    pub fn pooled(pool: &HttpPool, url: &str, token: impl Into<String>) -> ApiClient {
        let url = url.trim_end_matches('/').to_string();
        ApiClient {
            http: pool.0.clone(),
            base: url.clone(),
            endpoint: Endpoint::Tcp(url),
            token: token.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another time allowed per call.
    pub fn timeout(&self, timeout: Duration) -> ApiClient {
        ApiClient {
            timeout,
            ..self.clone()
        }
    }

    pub fn with_timeout(
        endpoint: Endpoint,
        token: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, ApiError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .no_proxy();
        let base = match &endpoint {
            Endpoint::Tcp(url) => url.clone(),
            Endpoint::Unix(path) => {
                b = b.unix_socket(path.clone());
                "http://localhost".to_string()
            }
        };
        let http = b.build().map_err(|e| ApiError::Transport {
            endpoint: endpoint.to_string(),
            source: e,
        })?;
        Ok(ApiClient {
            http,
            base,
            endpoint,
            token: token.into(),
            timeout,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ApiError> {
        let resp = req
            .timeout(self.timeout)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| ApiError::Transport {
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
