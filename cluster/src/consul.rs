//! A small typed client for the three parts of Consul's HTTP API that berth
//! uses: agent service registration with a TTL check, TTL check updates, and
//! blocking health queries for a service's passing instances.
//!
//! Why not a client crate: rs-consul 0.15 covers catalog reads and KV but has no
//! agent service registration, no TTL check update and no agent-level
//! deregistration, which are the core of membership here; a few typed calls
//! over `reqwest` are smaller than adapting it. Tested against the real Consul
//! 1.8.7 agent the project installs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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

/// A client of one Consul agent.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base: String,
}

impl ConsulClient {
    /// A client of the agent at `addr` (`http://127.0.0.1:8500`). `timeout`
    /// bounds every call except blocking queries, whose bound is their wait
    /// plus `timeout`.
    pub fn new(addr: &str, timeout: Duration) -> Result<Self, ConsulError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .build()
            .map_err(ConsulError::from)?;
        Ok(ConsulClient {
            http,
            base: format!("{}/v1", addr.trim_end_matches('/')),
        })
    }

    async fn ok(resp: reqwest::Response) -> Result<reqwest::Response, ConsulError> {
        let status = resp.status();
        if status.is_success() {
            Ok(resp)
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
            .http
            .put(format!("{}/agent/service/register", self.base))
            .json(reg)
            .timeout(timeout)
            .send()
            .await?;
        Self::ok(resp).await.map(drop)
    }

    /// Marks a TTL check as passing.
    pub async fn pass(&self, check_id: &str, timeout: Duration) -> Result<(), ConsulError> {
        let resp = self
            .http
            .put(format!("{}/agent/check/pass/{check_id}", self.base))
            .timeout(timeout)
            .send()
            .await?;
        Self::ok(resp).await.map(drop)
    }

    /// Removes a service instance from the agent.
    pub async fn deregister(&self, service_id: &str, timeout: Duration) -> Result<(), ConsulError> {
        let resp = self
            .http
            .put(format!(
                "{}/agent/service/deregister/{service_id}",
                self.base
            ))
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
        let mut url = format!("{}/health/service/{service}?passing=true", self.base);
        if index > 0 {
            url.push_str(&format!("&index={index}&wait={}", duration_text(wait)));
        }
        let req = self.http.get(url);
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
