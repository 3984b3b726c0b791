//! The CLI's client of the HTTP API: finds a reachable replica, follows the
//! leader (421 + URL), and retries while an election is in progress.

use crate::api::{ClusterStatus, ErrorBody, SubmitReply};
use reqwest::StatusCode;
use std::time::{Duration, Instant};

/// What went wrong talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No endpoint answered.
    #[error(
        "cannot reach any coordinator at {endpoints}: {last}; is the cluster running? check --endpoints"
    )]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last error.
        last: String,
    },
    /// The cluster answered with an error.
    #[error("{0}")]
    Refused(String),
    /// No leader emerged in time.
    #[error("no coordinator leader within {0:?}: {1}; does a majority of replicas run?")]
    NoLeader(Duration, String),
}

/// Why the CLI's HTTP client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The `--tls-ca` file could not be read.
    #[error("--tls-ca {}: cannot read it: {source}", .path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The `--tls-ca` file is not PEM, or holds no certificate.
    #[error("--tls-ca {}: {why}", .path.display())]
    NotPem {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP client: {0}")]
    Build(reqwest::Error),
}

/// An HTTP client for the coordinators' API: `https://` URLs are verified
/// against the cluster CA in `ca` only (never the system's roots).
pub fn http_client(ca: Option<&std::path::Path>) -> Result<reqwest::Client, CaError> {
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).use_rustls_tls();
    builder = builder.tls_built_in_root_certs(false);
    if let Some(ca) = ca {
        let path = ca.to_path_buf();
        let pem = std::fs::read(ca).map_err(|source| CaError::Read { path: path.clone(), source })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| CaError::NotPem {
            path: path.clone(),
            why: format!("not a PEM certificate file: {e}"),
        })?;
        if certs.is_empty() {
            return Err(CaError::NotPem { path, why: "holds no PEM certificate".into() });
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(CaError::Build)
}

/// A client of a coordinator cluster.
pub struct Client {
    http: reqwest::Client,
    /// Whether a CA was given (`with_ca`), for the hint on TLS failures.
    has_ca: bool,
    endpoints: Vec<String>,
    token: Option<String>,
    /// How long mutations keep retrying through elections.
    pub patience: Duration,
}

impl Client {
    /// A client for `endpoints` (base URLs like `http://127.0.0.1:9201`).
    pub fn new(endpoints: Vec<String>, token: Option<String>) -> Self {
        let endpoints = endpoints.into_iter().map(|e| e.trim_end_matches('/').to_string()).collect();
        let http = http_client(None).expect("an HTTP client without a CA file always builds");
        Self { http, has_ca: false, endpoints, token, patience: Duration::from_secs(20) }
    }

    /// Trusts the cluster CA in `ca` (`--tls-ca`) for `https://` endpoints.
    pub fn with_ca(mut self, ca: &std::path::Path) -> Result<Self, CaError> {
        self.http = http_client(Some(ca))?;
        self.has_ca = true;
        Ok(self)
    }

    /// A request error with its causes (reqwest's own text hides them, a
    /// refused certificate among them), and the way out for HTTPS without
    /// the cluster CA.
    fn describe(&self, e: &reqwest::Error) -> String {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        if !self.has_ca && e.url().is_some_and(|u| u.scheme() == "https") {
            text.push_str("; for https:// endpoints give the cluster CA with --tls-ca (or FLOTILLA_TLS_CA)");
        }
        text
    }

    fn unreachable(&self, last: String) -> ClientError {
        ClientError::Unreachable { endpoints: self.endpoints.join(","), last }
    }

    /// The status from the first replica that answers, re-asked from the
    /// leader when that one knows a different leader (so job progress is
    /// the leader's view).
    pub async fn status(&self, job: Option<&str>) -> Result<ClusterStatus, ClientError> {
        let query = job.map(|j| format!("?job={j}")).unwrap_or_default();
        let mut last = String::from("no endpoints given");
        for base in &self.endpoints {
            match self.get_status(base, &query).await {
                Ok(status) => {
                    if let Some(url) = status.leader_url.as_deref().filter(|u| *u != base.as_str()) {
                        if status.role != crate::raft::node::Role::Leader {
                            if let Ok(from_leader) = self.get_status(url, &query).await {
                                return Ok(from_leader);
                            }
                        }
                    }
                    return Ok(status);
                }
                Err(ClientError::Unreachable { last: why, .. }) => last = format!("{base}: {why}"),
                Err(e) => return Err(e),
            }
        }
        Err(self.unreachable(last))
    }

    /// How many of the endpoints answer `/healthz` within 2 s, of how many.
    pub async fn reachable(&self) -> (usize, usize) {
        let probes = self
            .endpoints
            .iter()
            .map(|base| self.http.get(format!("{base}/healthz")).timeout(Duration::from_secs(2)).send());
        let answers = futures::future::join_all(probes).await;
        (
            answers.iter().filter(|r| r.as_ref().is_ok_and(|r| r.status().is_success())).count(),
            self.endpoints.len(),
        )
    }

    /// How many of the cluster's voters answer `/healthz` within 2 s, of
    /// how many voters there are: the membership comes from the replica
    /// that answered `status`, so one endpoint is enough to tell a lost
    /// quorum from an election. Falls back to the endpoints given when
    /// that replica cannot list the membership.
    pub async fn voters_reachable(&self, status: &ClusterStatus) -> (usize, usize) {
        let url_of = |id| status.nodes.iter().find(|n| n.id == id).map(|n| n.http_url.clone());
        let Some(answering) = url_of(status.node_id) else { return self.reachable().await };
        let replicas = self
            .http
            .get(format!("{answering}/v1/replicas"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success());
        let view = match replicas {
            Some(r) => r.json::<crate::api::ReplicasView>().await.ok(),
            None => None,
        };
        let Some(view) = view.filter(|v| !v.voters.is_empty()) else { return self.reachable().await };
        let probes = view.voters.iter().map(|id| {
            let url = url_of(*id);
            async move {
                let Some(url) = url else { return false };
                let probe = self.http.get(format!("{url}/healthz")).timeout(Duration::from_secs(2)).send();
                probe.await.is_ok_and(|r| r.status().is_success())
            }
        });
        let answers = futures::future::join_all(probes).await;
        (answers.iter().filter(|up| **up).count(), view.voters.len())
    }

    async fn get_status(&self, base: &str, query: &str) -> Result<ClusterStatus, ClientError> {
        let resp = self
            .http
            .get(format!("{base}/v1/status{query}"))
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable { endpoints: base.to_string(), last: self.describe(&e) })?;
        if resp.status().is_success() {
            resp.json().await.map_err(|e| ClientError::Refused(format!("{base} sent an invalid status: {e}")))
        } else {
            Err(ClientError::Refused(error_text(resp).await))
        }
    }

    /// The membership, from the leader (which alone knows each member's
    /// progress); from the first replica that answers when none leads.
    pub async fn replicas(&self) -> Result<crate::api::ReplicasView, ClientError> {
        let status = self.status(None).await?;
        self.replicas_of(&status).await
    }

    /// The membership from the leader `status` names (a status already
    /// fetched: no second round trip to find the leader).
    pub async fn replicas_of(&self, status: &ClusterStatus) -> Result<crate::api::ReplicasView, ClientError> {
        let base = status.leader_url.clone().unwrap_or_else(|| self.endpoints[0].clone());
        let resp = self
            .http
            .get(format!("{base}/v1/replicas"))
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable { endpoints: base.clone(), last: self.describe(&e) })?;
        if !resp.status().is_success() {
            return Err(ClientError::Refused(error_text(resp).await));
        }
        resp.json().await.map_err(|e| ClientError::Refused(format!("{base} sent an invalid answer: {e}")))
    }

    /// Adds replica `id` (reached at `raft_addr`) as a learner.
    pub async fn add_replica(&self, id: u64, raft_addr: &str) -> Result<(), ClientError> {
        let body = serde_json::json!({ "raft_addr": raft_addr }).to_string();
        self.mutate(&format!("/v1/replicas/{id}"), body).await.map(drop)
    }

    /// Makes learner `id` a voter.
    pub async fn promote_replica(&self, id: u64) -> Result<(), ClientError> {
        self.mutate(&format!("/v1/replicas/{id}/promote"), String::new()).await.map(drop)
    }

    /// Removes replica `id` from the membership.
    pub async fn remove_replica(&self, id: u64) -> Result<(), ClientError> {
        self.mutate(&format!("/v1/replicas/{id}/remove"), String::new()).await.map(drop)
    }

    /// Submits a job spec (TOML).
    pub async fn submit(&self, toml: &str) -> Result<SubmitReply, ClientError> {
        let resp = self.mutate("/v1/jobs", toml.to_string()).await?;
        resp.json().await.map_err(|e| ClientError::Refused(format!("invalid answer: {e}")))
    }

    /// Asks for a checkpoint of `job` now and waits until it is committed;
    /// returns `{"id", "step"}`.
    pub async fn checkpoint(&self, job: &str) -> Result<serde_json::Value, ClientError> {
        // the server answers once the checkpoint is committed: up to the
        // job's timeout_seconds, so this request may take minutes
        let resp = self
            .mutate_with_timeout(
                &format!("/v1/jobs/{job}/checkpoint"),
                String::new(),
                Duration::from_secs(3600),
            )
            .await?;
        resp.json().await.map_err(|e| ClientError::Refused(format!("invalid answer: {e}")))
    }

    /// Whole-job restore of `job` from `checkpoint` (the latest committed by
    /// default); returns `{"job", "generation"}`.
    pub async fn restore(
        &self,
        job: &str,
        checkpoint: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = checkpoint.map(|c| format!("{{\"checkpoint\": {c}}}")).unwrap_or_default();
        let resp = self.mutate(&format!("/v1/jobs/{job}/restore"), body).await?;
        resp.json().await.map_err(|e| ClientError::Refused(format!("invalid answer: {e}")))
    }

    /// Re-verifies condemned checkpoint `id` of `job` on the leader and, when
    /// every shard matches its checksums, clears the verdict.
    pub async fn verify(&self, job: &str, id: u64) -> Result<serde_json::Value, ClientError> {
        let resp = self
            .mutate_with_timeout(
                &format!("/v1/jobs/{job}/checkpoints/{id}/verify"),
                String::new(),
                Duration::from_secs(3600),
            )
            .await?;
        resp.json().await.map_err(|e| ClientError::Refused(format!("invalid answer: {e}")))
    }

    /// Cancels `job`; returns `{"job", "state", "aborted"}`.
    pub async fn cancel(&self, job: &str) -> Result<serde_json::Value, ClientError> {
        let resp = self.mutate(&format!("/v1/jobs/{job}/cancel"), String::new()).await?;
        resp.json().await.map_err(|e| ClientError::Refused(format!("invalid answer: {e}")))
    }

    /// Deletes terminal job `job` from the ledger, and with
    /// `remove_checkpoints` its checkpoint directory; returns `{"job",
    /// "dir", "remove_checkpoints", "removed"}`.
    pub async fn delete_job(
        &self,
        job: &str,
        remove_checkpoints: bool,
    ) -> Result<serde_json::Value, ClientError> {
        let resp = self
            .request_leader(
                reqwest::Method::DELETE,
                &format!("/v1/jobs/{job}?remove_checkpoints={remove_checkpoints}"),
                String::new(),
                Duration::from_secs(60),
            )
            .await?;
        resp.json().await.map_err(|e| ClientError::Refused(format!("invalid answer: {e}")))
    }

    /// POSTs to the leader: tries each endpoint, follows 421 to the leader's
    /// URL, retries 503 (no leader yet) until `patience` runs out.
    async fn mutate(&self, path: &str, body: String) -> Result<reqwest::Response, ClientError> {
        self.mutate_with_timeout(path, body, Duration::from_secs(15)).await
    }

    async fn mutate_with_timeout(
        &self,
        path: &str,
        body: String,
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        self.request_leader(reqwest::Method::POST, path, body, timeout).await
    }

    /// Sends a mutation (`method`) to the leader, as [`Self::mutate`] does.
    async fn request_leader(
        &self,
        method: reqwest::Method,
        path: &str,
        body: String,
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let deadline = Instant::now() + self.patience;
        let mut targets: Vec<String> = self.endpoints.clone();
        let mut last = String::from("no endpoints given");
        let mut reached_any = false;
        loop {
            for base in std::mem::take(&mut targets) {
                let mut req = self
                    .http
                    .request(method.clone(), format!("{base}{path}"))
                    .body(body.clone())
                    .timeout(timeout);
                if let Some(token) = &self.token {
                    req = req.bearer_auth(token);
                }
                let resp = match req.send().await {
                    Ok(resp) => resp,
                    Err(e) => {
                        last = format!("{base}: {}", self.describe(&e));
                        continue;
                    }
                };
                reached_any = true;
                match resp.status() {
                    s if s.is_success() => return Ok(resp),
                    StatusCode::MISDIRECTED_REQUEST => {
                        let body: Option<ErrorBody> = resp.json().await.ok();
                        last = body.as_ref().map_or("not the leader".into(), |b| b.error.clone());
                        if let Some(leader) = body.and_then(|b| b.leader) {
                            targets.insert(0, leader);
                        }
                    }
                    StatusCode::SERVICE_UNAVAILABLE => last = error_text(resp).await,
                    _ => return Err(ClientError::Refused(error_text(resp).await)),
                }
            }
            if Instant::now() >= deadline {
                return Err(if reached_any {
                    ClientError::NoLeader(self.patience, last)
                } else {
                    self.unreachable(last)
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            if targets.is_empty() {
                targets = self.endpoints.clone();
            }
        }
    }
}

async fn error_text(resp: reqwest::Response) -> String {
    let code = resp.status();
    match resp.json::<ErrorBody>().await {
        Ok(body) => body.error,
        Err(_) => format!("HTTP {code}"),
    }
}
