//! A small typed client for the three parts of Consul's HTTP API that berth
//! uses: agent service registration with a TTL check, TTL check updates, and
//! blocking health queries for a service's passing instances.
//!
//! Why not a client crate: rs-consul 0.15 covers catalog reads and KV but has no
//! agent service registration, no TTL check update and no agent-level
//! deregistration, which are the core of membership here; a few typed calls
//! over `reqwest` are smaller than adapting it. Tested against the real Consul
//! 1.8.7 agent the project installs.
//!
//! A service instance and its TTL check belong to the agent they were
//! registered with, so every call of a client goes to one agent even when the
//! address is a name with several (a DNS alias over three servers, as in the
//! reference deployment): [`ConsulClient::pin`] picks one of its addresses,
//! and [`ConsulClient::repin`] moves to another when that one stops answering
//! (the caller then registers again there).
//!
//! With ACLs on, every call carries the configured token (`X-Consul-Token`);
//! Consul's 403 (an unknown token: `ACL not found`; a token whose policy does
//! not allow the call, or no token under `default_policy = "deny"`:
//! `Permission denied: ...`) is [`ConsulError::Forbidden`]. The token is a
//! secret: it is kept as a sensitive header value and never printed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::header::HeaderValue;
use reqwest::Method;
use serde::{Deserialize, Serialize};

/// The header that carries the ACL token.
pub const TOKEN_HEADER: &str = "X-Consul-Token";

/// Why a Consul call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConsulError {
    /// Could not talk to the agent (connection refused, timeout, bad body).
    #[error("consul unreachable: {0}")]
    Unreachable(String),
    /// The agent answered with an error status.
    #[error("consul answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Response body (Consul's error text).
        body: String,
    },
    /// The agent refused the token (HTTP 403): an unknown token (`ACL not
    /// found`), or one whose policy does not allow the call (`Permission
    /// denied: ...`; also what a call without a token gets under a
    /// default-deny policy). Retrying with the same token does not help.
    #[error("consul refused the token: {body}")]
    Forbidden {
        /// Consul's error text.
        body: String,
    },
    /// The configured token cannot be sent (it must be visible ASCII, as
    /// Consul's UUID tokens are). The token itself is not repeated here.
    #[error("the consul token is not a valid header value (visible ASCII characters only)")]
    InvalidToken,
}

impl From<reqwest::Error> for ConsulError {
    fn from(e: reqwest::Error) -> Self {
        ConsulError::Unreachable(e.to_string())
    }
}

/// A service registration with one TTL check (`PUT /v1/agent/service/register`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Registration {
    /// Service instance id (berth: the node id).
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub name: String,
    /// Address of the instance.
    pub address: String,
    /// Port of the instance.
    pub port: u16,
    /// Free-form metadata (berth: peer address, public address, version).
    pub meta: BTreeMap<String, String>,
    /// The TTL check.
    pub check: TtlCheck,
}

/// A TTL check: passing while updated more often than `ttl`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TtlCheck {
    /// Check id (used to pass it).
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// Consul duration text, e.g. `1s`.
    #[serde(rename = "TTL")]
    pub ttl: String,
    /// Remove the instance after being critical this long (Consul raises it to at least 1m).
    pub deregister_critical_service_after: String,
    /// Initial status (`passing`, so a node counts as soon as it registers).
    pub status: String,
}

/// One passing instance, as `GET /v1/health/service/:name?passing` reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Instance {
    /// Service instance id.
    #[serde(rename = "ID")]
    pub id: String,
    /// Address.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Metadata.
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    service: Instance,
}

/// Consul duration text for a `Duration` (`1500ms`).
pub fn duration_text(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// A client of one Consul agent (clones share the agent it is pinned to).
#[derive(Debug, Clone)]
pub struct ConsulClient {
    pinned: Arc<RwLock<Pinned>>,
    base: String,
    /// Host name and port of `base` when it names a host rather than an IP.
    name: Option<(String, u16)>,
    timeout: Duration,
    /// `X-Consul-Token` of every call, marked sensitive (its `Debug` prints
    /// `Sensitive`, never the token).
    token: Option<HeaderValue>,
}

#[derive(Debug)]
struct Pinned {
    http: reqwest::Client,
    to: Option<SocketAddr>,
}

impl ConsulClient {
    /// A client of the agent at `addr` (`http://127.0.0.1:8500`). `timeout`
    /// bounds every call except blocking queries, whose bound is their wait
    /// plus `timeout`. A host name is resolved by [`ConsulClient::pin`].
    pub fn new(addr: &str, timeout: Duration) -> Result<Self, ConsulError> {
        let base = format!("{}/v1", addr.trim_end_matches('/'));
        let url = reqwest::Url::parse(&base)
            .map_err(|e| ConsulError::Unreachable(format!("consul address {addr:?}: {e}")))?;
        let name = match (url.host_str(), url.port_or_known_default()) {
            (Some(h), Some(port)) if h.trim_matches(['[', ']']).parse::<IpAddr>().is_err() => {
                Some((h.to_owned(), port))
            }
            _ => None,
        };
        Ok(ConsulClient {
            pinned: Arc::new(RwLock::new(Pinned {
                http: Self::http_client(timeout, None)?,
                to: None,
            })),
            base,
            name,
            timeout,
            token: None,
        })
    }

    /// The same client sending `token` as `X-Consul-Token` on every call
    /// (`None`: no token, Consul's anonymous token applies). Surrounding
    /// whitespace is ignored; an empty token counts as none.
    pub fn with_token(mut self, token: Option<&str>) -> Result<Self, ConsulError> {
        self.token = match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => {
                if !t.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ConsulError::InvalidToken);
                }
                let mut v = HeaderValue::from_str(t).map_err(|_| ConsulError::InvalidToken)?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(self)
    }

    /// Whether calls carry a token.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// A request to `path` (below `/v1`) with the token, if any.
    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http().request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.header(TOKEN_HEADER, t.clone()),
            None => req,
        }
    }

    fn http_client(
        timeout: Duration,
        pin: Option<(&str, SocketAddr)>,
    ) -> Result<reqwest::Client, ConsulError> {
        let mut b = reqwest::Client::builder().connect_timeout(timeout);
        if let Some((name, to)) = pin {
            b = b.resolve(name, to);
        }
        b.build().map_err(ConsulError::from)
    }

    fn http(&self) -> reqwest::Client {
        self.pinned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .http
            .clone()
    }

    /// The agent address calls go to, once pinned (`None` for an IP address,
    /// which needs no pinning, or before [`ConsulClient::pin`]).
    pub fn pinned(&self) -> Option<SocketAddr> {
        self.pinned.read().unwrap_or_else(|p| p.into_inner()).to
    }

    /// Resolves the agent's name and sends every later call to one of its
    /// addresses (at random, so nodes spread over the agents). Keeps the
    /// current pin when the name does not resolve.
    pub async fn pin(&self) -> Option<SocketAddr> {
        self.pin_avoiding(None).await
    }

    /// Moves to another of the name's addresses if calls still go to
    /// `failed` (the agent that stopped answering); a no-op when another
    /// caller already moved. Answers the address calls go to now.
    pub async fn repin(&self, failed: Option<SocketAddr>) -> Option<SocketAddr> {
        if self.pinned() != failed {
            return self.pinned();
        }
        self.pin_avoiding(failed).await
    }

    async fn pin_avoiding(&self, avoid: Option<SocketAddr>) -> Option<SocketAddr> {
        use rand::seq::IndexedRandom;
        let (name, port) = self.name.as_ref()?;
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((name.as_str(), *port)).await {
            Ok(a) => a.collect(),
            Err(e) => {
                tracing::warn!(agent = %name, error = %e, "consul agent name does not resolve; keeping the current agent");
                return self.pinned();
            }
        };
        let others: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| Some(*a) != avoid)
            .collect();
        let to = *others.choose(&mut rand::rng()).or(addrs.first())?;
        let http = Self::http_client(self.timeout, Some((name, to))).ok()?;
        let mut p = self.pinned.write().unwrap_or_else(|p| p.into_inner());
        if p.to != Some(to) {
            tracing::info!(agent = %name, address = %to, of = addrs.len(), "consul agent pinned");
        }
        *p = Pinned { http, to: Some(to) };
        Some(to)
    }

    async fn ok(resp: reqwest::Response) -> Result<reqwest::Response, ConsulError> {
        let status = resp.status();
        if status.is_success() {
            Ok(resp)
        } else if status == reqwest::StatusCode::FORBIDDEN {
            Err(ConsulError::Forbidden {
                body: resp.text().await.unwrap_or_default().trim().to_owned(),
            })
        } else {
            Err(ConsulError::Status {
                status: status.as_u16(),
                body: resp.text().await.unwrap_or_default(),
            })
        }
    }

    /// Registers (or re-registers) a service instance with its TTL check.
    pub async fn register(&self, reg: &Registration, timeout: Duration) -> Result<(), ConsulError> {
        let resp = self
            .request(Method::PUT, "/agent/service/register")
            .json(reg)
            .timeout(timeout)
            .send()
            .await?;
        Self::ok(resp).await.map(drop)
    }

    /// Marks a TTL check as passing.
    pub async fn pass(&self, check_id: &str, timeout: Duration) -> Result<(), ConsulError> {
        self.check_update("pass", check_id, timeout).await
    }

    /// Marks a TTL check as critical now (the instance leaves the passing set
    /// at once instead of when its TTL runs out).
    pub async fn fail(&self, check_id: &str, timeout: Duration) -> Result<(), ConsulError> {
        self.check_update("fail", check_id, timeout).await
    }

    async fn check_update(
        &self,
        verb: &str,
        check_id: &str,
        timeout: Duration,
    ) -> Result<(), ConsulError> {
        let resp = self
            .request(Method::PUT, &format!("/agent/check/{verb}/{check_id}"))
            .timeout(timeout)
            .send()
            .await?;
        Self::ok(resp).await.map(drop)
    }

    /// Removes a service instance from the agent.
    pub async fn deregister(&self, service_id: &str, timeout: Duration) -> Result<(), ConsulError> {
        let resp = self
            .request(
                Method::PUT,
                &format!("/agent/service/deregister/{service_id}"),
            )
            .timeout(timeout)
            .send()
            .await?;
        Self::ok(resp).await.map(drop)
    }

    /// The passing instances of `service`. With `index > 0` this is a blocking
    /// query: it returns when the result changes past `index` or after `wait`.
    /// Returns the new index (`X-Consul-Index`) and the instances.
    pub async fn passing(
        &self,
        service: &str,
        index: u64,
        wait: Duration,
        timeout: Duration,
    ) -> Result<(u64, Vec<Instance>), ConsulError> {
        let mut path = format!("/health/service/{service}?passing=true");
        if index > 0 {
            path.push_str(&format!("&index={index}&wait={}", duration_text(wait)));
        }
        let req = self.request(Method::GET, &path);
        // The client-side bound sits above Consul's wait (which it may exceed by
        // up to wait/16 of jitter).
        let resp = req.timeout(wait + wait / 8 + timeout).send().await?;
        let resp = Self::ok(resp).await?;
        let new_index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let entries: Vec<HealthEntry> = resp.json().await?;
        Ok((new_index, entries.into_iter().map(|e| e.service).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_named_agent_is_pinned_to_one_address_and_an_ip_needs_no_pin() {
        let t = Duration::from_secs(1);
        let ip = ConsulClient::new("http://127.0.0.1:8500", t).unwrap();
        assert_eq!(ip.pin().await, None, "an IP address is already one agent");

        let named = ConsulClient::new("http://localhost:8500", t).unwrap();
        assert_eq!(named.pinned(), None);
        let to = named.pin().await.expect("localhost resolves");
        assert!(to.ip().is_loopback() && to.port() == 8500, "{to}");
        // Clones share the pin (the registrar and the watcher follow one agent).
        assert_eq!(named.clone().pinned(), Some(to));
        // A repin away from an address nobody uses any more is a no-op...
        let elsewhere: SocketAddr = "10.9.9.9:8500".parse().unwrap();
        assert_eq!(named.repin(Some(elsewhere)).await, Some(to));
        // ...and away from the only address stays there (nothing else to use).
        let single = tokio::net::lookup_host(("localhost", 8500))
            .await
            .unwrap()
            .count()
            == 1;
        if single {
            assert_eq!(named.repin(Some(to)).await, Some(to));
        }
    }

    #[test]
    fn the_token_is_never_printed_and_must_be_visible_ascii() {
        let t = Duration::from_secs(1);
        let secret = "0b5e7f0c-1c2d-4e3f-9a8b-7c6d5e4f3a2b";
        let c = ConsulClient::new("http://127.0.0.1:8500", t)
            .unwrap()
            .with_token(Some(secret))
            .unwrap();
        assert!(c.has_token());
        let debug = format!("{c:?}");
        assert!(!debug.contains(secret), "{debug}");
        let none = ConsulClient::new("http://127.0.0.1:8500", t).unwrap();
        assert!(!none.clone().with_token(Some("  ")).unwrap().has_token());
        assert!(!none.clone().with_token(None).unwrap().has_token());
        let e = none.with_token(Some("two words")).unwrap_err();
        assert!(matches!(e, ConsulError::InvalidToken));
        assert!(!e.to_string().contains("two words"), "{e}");
    }

    #[test]
    fn a_bad_agent_address_is_an_error_that_names_it() {
        let e = ConsulClient::new("not a url", Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("not a url"), "{e}");
    }
}
