//! The agent's link to the center: registration with the enrolment token (retried with
//! back-off), then heartbeats carrying facts and load; registers again when the center forgets
//! the host, and to renew the host's certificate (see [`crate::identity`]).

use std::sync::Arc;
use std::time::Duration;

use tern_api::center::{Heartbeat, RegisterHost, Registered};
use tern_api::routes::center as route;
use tern_api::{ApiClient, ApiError, Endpoint};
use tokio_util::sync::CancellationToken;

use crate::config::CenterLink;
use crate::Agent;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a registration attempt failed, in words that tell the operator what to do.
fn explain_register_error(e: &ApiError, link: &CenterLink, cluster: &str) -> String {
    match e {
        ApiError::Transport { .. } => format!("center unreachable at {}: {e}", link.url),
        ApiError::Status {
            status: 401 | 403,
            message,
        } => format!(
            "the center refused the token from {} ({message}); put a join token there (on the \
             center: tern host add NAME)",
            link.enrol_token_file.display()
        ),
        ApiError::Status {
            status: 404,
            message,
        } if message.contains("tern cluster create") => {
            format!("cluster {cluster:?} is missing in the center: {message}")
        }
        ApiError::Status {
            status: 404,
            message,
        } => format!(
            "cluster {cluster:?} is missing in the center ({message}); create it with \
             `tern cluster create {cluster}`"
        ),
        other => format!("registration refused: {other}"),
    }
}

fn read_enrol_token(link: &CenterLink) -> Result<String, String> {
    match std::fs::read_to_string(&link.enrol_token_file) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(format!(
            "the enrolment token file {} is empty",
            link.enrol_token_file.display()
        )),
        Err(e) => Err(format!(
            "cannot read the enrolment token file {}: {e}",
            link.enrol_token_file.display()
        )),
    }
}

/// A client of the center presenting `token`: over TLS when the center speaks it (checked
/// against the known CA, or the fingerprint the enrolment token carries).
pub(crate) fn center_client(
    agent: &Agent,
    link: &CenterLink,
    token: String,
    timeout: Duration,
) -> Result<ApiClient, String> {
    let endpoint = Endpoint::Tcp(link.url.clone());
    let client = match &agent.tls {
        Some(tls) => {
            let pin = std::fs::read_to_string(&link.enrol_token_file)
                .ok()
                .and_then(|t| {
                    tern_api::center::join_token_ca(t.trim()).and_then(|fp| fp.parse().ok())
                });
            let cfg = tls.client_config(pin).map_err(|e| format!("{e:#}"))?;
            ApiClient::with_tls(endpoint, token, timeout, cfg)
        }
        None => ApiClient::with_timeout(endpoint, token, timeout),
    };
    client.map_err(|e| e.to_string())
}

/// Registers with `token`. With TLS, a join (`joining`) always sends a signing request for a
/// new key; a registration with the host's secret sends one when the certificate is due.
async fn register_with(
    agent: &Agent,
    link: &CenterLink,
    agent_url: &str,
    token: String,
    joining: bool,
) -> Result<Result<Registered, ApiError>, String> {
    let client = center_client(agent, link, token, CALL_TIMEOUT)?;
    let csr = match &agent.tls {
        Some(tls) => tls.request_if_due_or(joining),
        None => Ok(None),
    }
    .map_err(|e| format!("making a signing request: {e:#}"))?;
    let body = RegisterHost {
        name: agent.cfg.name.clone(),
        cluster: agent.cfg.cluster.clone(),
        agent_url: agent_url.to_string(),
        agent_token: agent.token.clone(),
        facts: agent.facts(),
        csr,
    };
    Ok(client.post(&route::HOST_REGISTER.path(), &body).await)
}

/// Registers with the host's own secret when it has one, else with the token of
/// `--enrol-token-file` (a one-time join token, or the cluster's enrolment token); keeps the
/// secret the center gives back.
async fn register_once(
    agent: &Agent,
    link: &CenterLink,
    agent_url: &str,
) -> Result<Registered, String> {
    let explain = |e: &ApiError| explain_register_error(e, link, &agent.cfg.cluster);
    let reg = match agent.state.host_secret() {
        Some(secret) => match register_with(agent, link, agent_url, secret, false).await? {
            Err(ApiError::Status {
                status: 401,
                message,
            }) => {
                tracing::warn!(
                    "the center refused this host's secret ({message}); registering with the \
                     token of {}",
                    link.enrol_token_file.display()
                );
                agent.state.forget_host_secret();
                let token = read_enrol_token(link)?;
                register_with(agent, link, agent_url, token, true).await?
            }
            other => other,
        },
        None => register_with(agent, link, agent_url, read_enrol_token(link)?, true).await?,
    }
    .map_err(|e| explain(&e))?;
    if let Some(tls) = &agent.tls {
        match (&reg.certificate, &reg.ca) {
            (Some(chain), Some(ca)) => {
                let info = tls
                    .install(chain, ca)
                    .map_err(|e| format!("keeping the certificate the center issued: {e:#}"))?;
                tracing::info!(
                    serial = %info.serial,
                    valid_until = info.not_after,
                    "host certificate issued by the center"
                );
            }
            (Some(_), None) => return Err("the center sent a certificate without its CA".into()),
            (None, _) => {}
        }
    }
    if agent.state.host_secret().as_deref() != Some(reg.host_token.as_str()) {
        agent
            .state
            .save_host_secret(&reg.host_token)
            .map_err(|e| format!("keeping the host secret: {e:#}"))?;
    }
    Ok(reg)
}

/// Registers, retrying with back-off until it works or `shutdown` fires.
async fn register(
    agent: &Agent,
    link: &mut CenterLink,
    agent_url: &str,
    shutdown: &CancellationToken,
) -> Option<Registered> {
    let mut backoff = BACKOFF_MIN;
    loop {
        match register_once(agent, link, agent_url).await {
            Ok(r) => {
                tracing::info!(
                    center = %link.url,
                    host_id = %r.host_id,
                    cluster = %agent.cfg.cluster,
                    %agent_url,
                    "registered with the center"
                );
                return Some(r);
            }
            Err(why) => {
                tracing::warn!(
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot register: {why}"
                );
                // In an HA group the next center may be the leader.
                link.next_center();
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// What ended a run of heartbeats.
enum HeartbeatEnd {
    Shutdown,
    /// The host's certificate is due: register again with a signing request.
    Renew,
    /// The center no longer knows this host (or its token): register again.
    Forgotten(String),
    /// The center is down or a standby, and there are others in its HA group.
    Failover(String),
}

async fn heartbeats(
    agent: &Agent,
    link: &CenterLink,
    reg: &Registered,
    shutdown: &CancellationToken,
) -> HeartbeatEnd {
    let period = Duration::from_millis(agent.cfg.heartbeat_ms);
    if reg.heartbeat_interval_ms > 0 && reg.heartbeat_interval_ms < agent.cfg.heartbeat_ms {
        tracing::warn!(
            center_expects_ms = reg.heartbeat_interval_ms,
            heartbeat_ms = agent.cfg.heartbeat_ms,
            "the center expects heartbeats more often than configured"
        );
    }
    // Made after each registration: connections opened with a replaced certificate are not
    // reused.
    let client = match center_client(agent, link, reg.host_token.clone(), CALL_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return HeartbeatEnd::Forgotten(e),
    };
    let path = route::HOST_HEARTBEAT.with_id(reg.host_id);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return HeartbeatEnd::Shutdown,
            _ = tick.tick() => {}
        }
        if agent.tls.as_ref().is_some_and(|t| t.should_renew()) {
            return HeartbeatEnd::Renew;
        }
        let body = Heartbeat {
            facts: agent.facts(),
            load: agent.load().await,
            health: Some(agent.health()),
        };
        match client.post::<_, serde_json::Value>(&path, &body).await {
            Ok(_) => {
                if failing {
                    tracing::info!(center = %link.url, "heartbeats reach the center again");
                    failing = false;
                }
            }
            Err(ApiError::Status {
                status: status @ (401 | 404),
                message,
            }) => {
                return HeartbeatEnd::Forgotten(format!("HTTP {status}: {message}"));
            }
            Err(e @ (ApiError::Transport { .. } | ApiError::Status { status: 503, .. }))
                if link.urls.len() > 1 =>
            {
                return HeartbeatEnd::Failover(e.to_string());
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(center = %link.url, error = %e, "heartbeat failed; still trying");
                    failing = true;
                }
            }
        }
    }
}

/// Keeps the host registered and heartbeating until `shutdown` fires.
pub async fn run(
    agent: Arc<Agent>,
    link: CenterLink,
    agent_url: String,
    shutdown: CancellationToken,
) {
    let mut link = link;
    let mut registered = None;
    loop {
        let reg = match registered.take() {
            Some(r) => r,
            None => match register(&agent, &mut link, &agent_url, &shutdown).await {
                Some(r) => r,
                None => return,
            },
        };
        agent.set_center_host_id(reg.host_id);
        match heartbeats(&agent, &link, &reg, &shutdown).await {
            HeartbeatEnd::Shutdown => return,
            HeartbeatEnd::Failover(why) => {
                let from = link.url.clone();
                link.next_center();
                tracing::warn!(from, to = %link.url, "the center does not take heartbeats ({why}); trying the next of its group");
                // The group shares the host's registration: heartbeats go on at the next.
                registered = Some(reg);
                tokio::time::sleep(BACKOFF_MIN.min(Duration::from_millis(agent.cfg.heartbeat_ms)))
                    .await;
            }
            HeartbeatEnd::Renew => {
                tracing::info!("the host certificate is due for renewal: registering again");
            }
            HeartbeatEnd::Forgotten(why) => {
                tracing::warn!(
                    "the center does not know this host any more ({why}); registering again"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_errors_say_what_to_do() {
        let link = CenterLink {
            url: "http://10.0.0.2:8700".into(),
            urls: vec!["http://10.0.0.2:8700".into()],
            enrol_token_file: "/etc/tern/enrol.token".into(),
        };
        let refused = ApiError::Status {
            status: 401,
            message: "bad token".into(),
        };
        let m = explain_register_error(&refused, &link, "lab");
        assert!(
            m.contains("/etc/tern/enrol.token") && m.contains("bad token"),
            "{m}"
        );
        let missing = ApiError::Status {
            status: 404,
            message: "no such cluster".into(),
        };
        let m = explain_register_error(&missing, &link, "lab");
        assert!(m.contains("tern cluster create lab"), "{m}");
        let conflict = ApiError::Status {
            status: 409,
            message: "host has VMs elsewhere".into(),
        };
        let m = explain_register_error(&conflict, &link, "lab");
        assert!(m.contains("host has VMs elsewhere"), "{m}");
    }
}
