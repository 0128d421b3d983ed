//! The inventory's rules: clusters, host registration and heartbeats, the liveness monitor,
//! VM creation (checks and placement), deletion and console.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tern_api::center::{
    Cluster, ClusterMigrationSettings, CreateCluster, CreateVm, Heartbeat, Ownership, RegisterHost,
    Registered, Vm,
};
use tern_api::{valid_name, HostState, PowerState, VmSpec};
use tokio::sync::watch;
use uuid::Uuid;

use crate::app::App;
use crate::config::new_token;
use crate::error::CenterError;
use crate::store::{HostRecord, Link, NewEvent, StoreError, Tx, VmRecord};
use crate::vmcheck::{self, Candidate};
use tern_pki::CertInfo;

pub async fn create_cluster(app: &App, req: CreateCluster) -> Result<Cluster, CenterError> {
    if !valid_name(&req.name) {
        return Err(CenterError::invalid(format!(
            "cluster name {:?} is not valid: use 1 to 32 characters of a-z, 0-9 and '-', \
             starting with a letter or digit",
            req.name
        )));
    }
    let evc = req.evc_mode.filter(|m| !m.trim().is_empty());
    if let Some(m) = &evc {
        if m.len() > 64 || m.chars().any(char::is_whitespace) {
            return Err(CenterError::invalid(format!(
                "evc_mode {m:?} is not a CPU model name (e.g. x86-64-v2, Haswell)"
            )));
        }
    }
    // A catalogue baseline, in its canonical spelling.
    let evc = crate::evc::creation_mode(evc.as_deref())?;
    app.db
        .write(move |tx| {
            let now = Utc::now();
            let mut c = tx.insert_cluster(&req.name, evc.as_deref(), now)?;
            if let Some(mode) = req.migration_encryption {
                tx.set_migration_encryption(c.id, mode)?;
                c.migration_encryption = mode;
            }
            let baseline = evc
                .map(|m| format!(" with CPU baseline {m}"))
                .unwrap_or_default();
            tx.add_event(
                NewEvent::info(format!(
                    "cluster {} created{baseline}, migration encryption {}",
                    c.name, c.migration_encryption
                )),
                now,
            )?;
            Ok(c)
        })
        .await
}

/// A cluster's migration policy.
pub async fn migration_settings(
    app: &App,
    cluster: String,
) -> Result<ClusterMigrationSettings, CenterError> {
    app.db
        .read(move |tx| {
            let c = tx
                .cluster(&cluster)?
                .ok_or_else(|| CenterError::cluster_not_found(&cluster))?;
            Ok::<_, CenterError>(ClusterMigrationSettings {
                encryption: c.migration_encryption,
            })
        })
        .await
}

/// Sets a cluster's migration policy; migrations already running keep theirs.
pub async fn set_migration_settings(
    app: &App,
    cluster: String,
    s: ClusterMigrationSettings,
) -> Result<ClusterMigrationSettings, CenterError> {
    app.db
        .write(move |tx| {
            let now = Utc::now();
            let id = tx
                .cluster_id(&cluster)?
                .ok_or_else(|| CenterError::cluster_not_found(&cluster))?;
            let before = tx.set_migration_encryption(id, s.encryption)?;
            if before != s.encryption {
                tx.add_event(
                    NewEvent::info(format!(
                        "cluster {cluster}: migration encryption {before} → {} (migrations \
                         already running keep theirs)",
                        s.encryption
                    )),
                    now,
                )?;
            }
            Ok::<_, CenterError>(s)
        })
        .await
}

/// Host names: what an agent may call itself (hostnames included), and not a path word.
fn valid_host_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
        && name != "register"
}

/// Names of the VMs placed on a host.
fn vm_names_on(tx: &Tx, host: Uuid) -> Result<Vec<String>, StoreError> {
    Ok(tx
        .vms_on_host(host)?
        .iter()
        .map(|v| v.name().to_string())
        .collect())
}

/// Forgets a host that has no VMs: its record and its secret, so its agent can no longer
/// heartbeat or register again without a new join token.
pub async fn remove_host(app: &Arc<App>, name: String) -> Result<(), CenterError> {
    app.db
        .write(move |tx| {
            let h = tx.host_by_name(&name)?.ok_or_else(|| {
                CenterError::not_found(format!("host {name} is not registered: see tern host list"))
            })?;
            let vms = vm_names_on(tx, h.id)?;
            if !vms.is_empty() {
                return Err(CenterError::conflict(format!(
                    "host {name} still has VMs ({}): migrate them away (tern host maintenance \
                     enter {name}) or delete them first",
                    vms.join(", ")
                )));
            }
            if let Some(m) = tx
                .unfinished_migrations()?
                .into_iter()
                .find(|m| m.source_host_id == h.id || m.dest_host_id == h.id)
            {
                return Err(CenterError::conflict(format!(
                    "host {name} takes part in the migration of VM {} (task {}): wait for it \
                     to end",
                    m.vm_name, m.task_id
                )));
            }
            tx.delete_host(h.id, &name)?;
            tx.add_event(
                NewEvent::warning(format!(
                    "host {name} removed: its secret is revoked; it can join again only with a \
                     new join token (tern host add {name})"
                ))
                .host(Some(&name)),
                Utc::now(),
            )?;
            Ok(())
        })
        .await
}

/// Issues a one-time join token for host `name`, valid for `ttl`; returns the secret and its
/// expiry.
pub async fn add_host(
    app: &Arc<App>,
    name: String,
    ttl: std::time::Duration,
    by: String,
) -> Result<(String, chrono::DateTime<Utc>), CenterError> {
    if !valid_host_name(&name) {
        return Err(CenterError::invalid(format!(
            "host name {name:?} is not valid: use 1 to 63 characters of letters, digits, '-', \
             '.' and '_' (and not \"register\")"
        )));
    }
    let ttl = chrono::Duration::from_std(ttl)
        .map_err(|_| CenterError::invalid("the join token's lifetime is too long"))?;
    // With TLS the token carries the CA's fingerprint: the agent checks the center with it
    // before it sends the token.
    let token = match &app.pki {
        Some(p) => format!(
            "tern_join_{}{}{}",
            new_token(),
            tern_api::center::JOIN_TOKEN_CA_MARK,
            p.ca.fingerprint()
        ),
        None => format!("tern_join_{}", new_token()),
    };
    let hash = crate::auth::token_hash(&token);
    let expires = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let expires = now + ttl;
            tx.insert_join_token(&hash, &name, expires, &by, now)?;
            tx.add_event(
                NewEvent::info(format!(
                    "join token for host {name} issued by {by}, valid until {expires}"
                ))
                .host(Some(&name))
                .actor(by.clone()),
                now,
            )?;
            Ok::<_, CenterError>(expires)
        })
        .await?;
    Ok((token, expires))
}

/// Checks that `url` is `http://HOST:PORT` (or https) and nothing more: no path, query or
/// user part (the center appends its own paths), a real port, and not a wildcard address.
fn check_agent_url(url: &str) -> Result<(), CenterError> {
    let bad = || {
        CenterError::invalid(format!(
            "agent_url {url:?} must look like http://IP:PORT, with nothing after the port"
        ))
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(bad)?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || url.len() > 256
        || authority
            .chars()
            .any(|c| matches!(c, '/' | '?' | '#' | '@' | '%') || c.is_whitespace())
    {
        return Err(bad());
    }
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
        return Err(bad());
    }
    if matches!(host, "0.0.0.0" | "[::]" | "") {
        return Err(CenterError::invalid(format!(
            "agent_url {url} is a wildcard address the center cannot call: start the agent with \
             --advertise-url http://IP:PORT"
        )));
    }
    Ok(())
}

/// The client certificate of a call made for host `name`, with what it says.
pub type PeerHost = Option<(String, CertInfo)>;

/// Checks that a call for host `name` comes with that host's current certificate (when the
/// center serves TLS): one naming another host, an older one of this host, or any after the
/// host was removed is refused.
fn check_host_cert(app: &App, tx: &Tx, name: &str, peer: &PeerHost) -> Result<(), CenterError> {
    if app.pki.is_none() {
        return Ok(());
    }
    let current = tx.host_cert_serial(name)?;
    match (peer, current) {
        (Some((host, _)), _) if host != name => Err(CenterError::unauthorized(format!(
            "this client certificate names host {host}, not {name}"
        ))),
        (Some((_, info)), Some(serial)) if info.serial == serial => Ok(()),
        (Some(_), Some(_)) => Err(CenterError::unauthorized(format!(
            "this certificate of host {name} is not its current one (renewed or revoked): \
             the agent must use the last certificate the center gave it"
        ))),
        (_, None) => Err(CenterError::unauthorized(format!(
            "host {name} has no certificate on record: join it again with a token from tern \
             host add {name}"
        ))),
        (None, Some(_)) => Err(CenterError::unauthorized(format!(
            "calls for host {name} need its client certificate (mutual TLS): the agent keeps \
             it in its state dir"
        ))),
    }
}

/// What a registration presents as its right to the host name.
enum Credential {
    /// The host's own secret, given at its first join: re-registers that host only.
    HostSecret,
    /// A one-time join token bound to this name (`tern host add NAME`): consumed, and the
    /// host gets a new secret (an admin's way to re-join a host that lost its state).
    JoinToken { hash: String },
    /// The cluster-wide enrolment token: joins a new name only, never takes over one.
    Shared,
}

/// Checks the bearer of a registration against the name it asks for.
fn registration_credential(
    app: &App,
    tx: &Tx,
    bearer: &str,
    name: &str,
    existing: Option<&HostRecord>,
    peer: &PeerHost,
    now: chrono::DateTime<Utc>,
) -> Result<Credential, CenterError> {
    let hash = crate::auth::token_hash(bearer);
    if let Some(h) = existing {
        if crate::auth::token_eq(&hash, &h.host_token) {
            // The secret alone is not enough with TLS: the host's certificate must come too.
            check_host_cert(app, tx, name, peer)?;
            return Ok(Credential::HostSecret);
        }
    }
    if let Some((bound, expires)) = tx.join_token(&hash)? {
        if bound != name {
            return Err(CenterError::unauthorized(format!(
                "this join token is for host {bound}, not {name}: start the agent with --name \
                 {bound}, or create a token for {name} with tern host add {name}"
            )));
        }
        if expires < now {
            return Err(CenterError::unauthorized(format!(
                "this join token for {name} expired at {expires}: create a new one with tern \
                 host add {name}"
            )));
        }
        return Ok(Credential::JoinToken { hash });
    }
    if app.config.shared_enrolment && crate::auth::token_eq(bearer, &app.enrol_token) {
        if existing.is_some() {
            return Err(CenterError::unauthorized(format!(
                "host {name} is registered already: registering it again needs that host's own \
                 secret (its agent keeps it in its state dir) or a join token for it (tern host \
                 add {name}); the enrolment token only joins new hosts"
            )));
        }
        return Ok(Credential::Shared);
    }
    Err(CenterError::unauthorized(format!(
        "registering host {name} needs Authorization: Bearer <token>: a join token from tern \
         host add {name} (give the agent --enrol-token-file), or the host's own secret"
    )))
}

pub async fn register_host(
    app: &Arc<App>,
    bearer: Option<String>,
    peer: PeerHost,
    req: RegisterHost,
) -> Result<Registered, CenterError> {
    let Some(bearer) = bearer else {
        return Err(CenterError::unauthorized(format!(
            "registering a host needs Authorization: Bearer <token>: a join token from tern host \
             add {}, given to the agent with --enrol-token-file",
            req.name
        )));
    };
    if !valid_host_name(&req.name) {
        return Err(CenterError::invalid(format!(
            "host name {:?} is not valid: use 1 to 63 characters of letters, digits, '-', '.' \
             and '_' (and not \"register\")",
            req.name
        )));
    }
    check_agent_url(&req.agent_url)?;
    if req.agent_token.trim().is_empty() {
        return Err(CenterError::invalid(
            "agent_token is empty: the agent must give the token the center presents to it",
        ));
    }
    if req.facts.cores == 0 || req.facts.memory_mib == 0 {
        return Err(CenterError::invalid(
            "facts report 0 cores or 0 MiB of memory: the agent could not read the host's \
             facts",
        ));
    }
    if req.csr.as_ref().is_some_and(|c| c.len() > 16 * 1024) {
        return Err(CenterError::invalid(
            "csr is longer than 16 KiB: send a PEM certificate signing request",
        ));
    }
    // Who is asking comes first: an unproven caller learns nothing and records nothing.
    let credential = {
        let (app2, bearer, name, peer) =
            (app.clone(), bearer.clone(), req.name.clone(), peer.clone());
        app.db
            .read(move |tx| {
                let existing = tx.host_by_name(&name)?;
                registration_credential(
                    &app2,
                    tx,
                    &bearer,
                    &name,
                    existing.as_ref(),
                    &peer,
                    Utc::now(),
                )
            })
            .await?
    };
    // With TLS, a host that joins gets a certificate naming it, from its own key; one that
    // registers again may renew its certificate the same way.
    let issued = match (&app.pki, &req.csr) {
        (Some(pki), Some(csr)) => Some(
            pki.sign_host(&req.name, csr)
                .map_err(|e| CenterError::invalid(format!("csr: {e}")))?,
        ),
        (Some(_), None) if !matches!(credential, Credential::HostSecret) => {
            return Err(CenterError::invalid(format!(
                "joining host {} needs a certificate signing request (csr): this center speaks \
                 only TLS, and the host needs a certificate naming it",
                req.name
            )));
        }
        _ => None,
    };
    // EVC: a host that cannot offer the cluster's mode is refused, and the refusal recorded.
    let (name, cluster, facts) = (req.name.clone(), req.cluster.clone(), req.facts.clone());
    let refusal = app
        .db
        .read(move |tx| crate::evc::join_refusal(tx, &name, &cluster, &facts))
        .await?;
    if let Some(why) = refusal {
        crate::evc::record_join_refusal(app, req.name.clone(), why.clone()).await?;
        return Err(CenterError::unsatisfiable(why));
    }
    let app2 = app.clone();
    let interval = app.config.heartbeat_interval_ms;
    app.db
        .write(move |tx| {
            let now = Utc::now();
            let cluster_id = tx.cluster_id(&req.cluster)?.ok_or_else(|| {
                CenterError::not_found(format!(
                    "cluster {c} does not exist: create it with: tern cluster create {c}",
                    c = req.cluster
                ))
            })?;
            if let Some(why) = crate::evc::join_refusal(tx, &req.name, &req.cluster, &req.facts)? {
                return Err(CenterError::unsatisfiable(why));
            }
            let existing = tx.host_by_name(&req.name)?;
            let credential = registration_credential(
                &app2,
                tx,
                &bearer,
                &req.name,
                existing.as_ref(),
                &peer,
                now,
            )?;
            // The host keeps its secret across registrations; a join gives it a new one. The
            // store keeps only its hash.
            let host_token = match &credential {
                Credential::HostSecret => bearer.clone(),
                Credential::JoinToken { hash } => {
                    tx.consume_join_token(hash, now)?;
                    new_token()
                }
                Credential::Shared => new_token(),
            };
            let host_token_hash = crate::auth::token_hash(&host_token);
            let summary = format!(
                "{} cores, {} MiB, {} {}",
                req.facts.cores,
                req.facts.memory_mib,
                req.facts.accelerator,
                req.facts.cpu_model_name
            );
            let id = match existing {
                Some(mut h) => {
                    let was = h.state();
                    if h.cluster_id != cluster_id {
                        let vms = vm_names_on(tx, h.id)?;
                        if !vms.is_empty() {
                            return Err(CenterError::conflict(format!(
                                "host {} is in cluster {} with VMs ({}); it cannot join cluster \
                                 {}: delete its VMs first, or start the agent with --cluster {}",
                                h.name,
                                h.cluster,
                                vms.join(", "),
                                req.cluster,
                                h.cluster
                            )));
                        }
                        tx.add_event(
                            NewEvent::warning(format!(
                                "host {} moves from cluster {} to {}",
                                h.name, h.cluster, req.cluster
                            ))
                            .host(Some(&h.name)),
                            now,
                        )?;
                    }
                    h.cluster_id = cluster_id;
                    h.link = Link::Connected;
                    h.agent_url = req.agent_url.clone();
                    h.agent_token = req.agent_token.clone();
                    h.host_token = host_token_hash.clone();
                    h.facts = req.facts.clone();
                    h.last_heartbeat = Some(now);
                    tx.update_host_registration(&h)?;
                    tx.add_event(
                        NewEvent::info(format!(
                            "host {} registered again (agent at {}; {summary}); was {was}",
                            h.name, h.agent_url
                        ))
                        .host(Some(&h.name)),
                        now,
                    )?;
                    h.id
                }
                None => {
                    let h = HostRecord {
                        id: Uuid::new_v4(),
                        name: req.name.clone(),
                        cluster_id,
                        cluster: req.cluster.clone(),
                        link: Link::Connected,
                        maintenance: false,
                        agent_url: req.agent_url.clone(),
                        agent_token: req.agent_token.clone(),
                        host_token: host_token_hash.clone(),
                        facts: req.facts.clone(),
                        load: None,
                        last_heartbeat: Some(now),
                        health: Default::default(),
                    };
                    tx.insert_host(&h, now)?;
                    tx.add_event(
                        NewEvent::info(format!(
                            "host {} joined cluster {} (agent at {}; {summary})",
                            h.name, h.cluster, h.agent_url
                        ))
                        .host(Some(&h.name)),
                        now,
                    )?;
                    h.id
                }
            };
            app2.mark_alive(id);
            let certificate = match issued {
                Some((chain, info)) => {
                    let not_after =
                        chrono::DateTime::from_timestamp(info.not_after, 0).unwrap_or(now);
                    tx.set_host_cert(&req.name, &info.serial, not_after, now)?;
                    tx.add_event(
                        NewEvent::info(format!(
                            "certificate issued to host {} (serial {}, valid until {not_after}); \
                             earlier ones are no longer accepted",
                            req.name, info.serial
                        ))
                        .host(Some(&req.name)),
                        now,
                    )?;
                    Some(chain)
                }
                None => None,
            };
            Ok(Registered {
                host_id: id,
                host_token,
                heartbeat_interval_ms: interval,
                certificate,
                ca: app2.pki.as_ref().map(|p| p.ca.cert_pem().to_string()),
            })
        })
        .await
        // A host (re)joined: the scheduler looks at its cluster now.
        .inspect(|_| app.drs.wake.notify_one())
}

/// What a VM's actual state becomes after a heartbeat of its host: what the host reports,
/// or — when the host does not list it — stopped if it was meant to be (or already was)
/// stopped, crashed otherwise.
pub fn next_actual(
    desired: PowerState,
    actual: PowerState,
    reported: Option<PowerState>,
) -> PowerState {
    match reported {
        Some(s) => s,
        None if actual == PowerState::Stopped || desired == PowerState::Stopped => {
            PowerState::Stopped
        }
        None => PowerState::Crashed,
    }
}

fn transition_event(vm: &VmRecord, host: &str, next: PowerState, reported: bool) -> NewEvent {
    let ev = match (next, reported) {
        (PowerState::Crashed, true) => NewEvent::error(format!(
            "VM {} crashed on host {host} (was {})",
            vm.name(),
            vm.actual
        )),
        (PowerState::Crashed, false) => NewEvent::error(format!(
            "VM {} is no longer running on host {host} although it should (was {}): marked \
             crashed",
            vm.name(),
            vm.actual
        )),
        _ => NewEvent::info(format!(
            "VM {} is {next} on host {host} (was {})",
            vm.name(),
            vm.actual
        )),
    };
    ev.vm(vm.name()).host(Some(host))
}

/// Applies an agent's heartbeat: the host's facts and load, its connection, its VMs' states.
pub async fn heartbeat(
    app: &Arc<App>,
    host_id: Uuid,
    token: Option<String>,
    peer: PeerHost,
    hb: Heartbeat,
) -> Result<(), CenterError> {
    let app2 = app.clone();
    let evacuation = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let host = authenticated_host(&app2, tx, host_id, token.as_deref(), &peer)?;
            tx.record_heartbeat(host.id, &hb.facts, &hb.load, now)?;
            app2.mark_alive(host.id);
            if host.link == Link::Disconnected {
                tx.set_host_link(host.id, Link::Connected)?;
                tx.add_event(
                    NewEvent::info(format!("host {} is connected again", host.name))
                        .host(Some(&host.name)),
                    now,
                )?;
            }
            let crashes = apply_vm_reports(&app2, tx, &host, &hb, now)?;
            let reconnected = host.link == Link::Disconnected;
            Ok::<_, CenterError>(crate::health::on_heartbeat(
                &app2,
                tx,
                &host,
                hb.health.as_ref(),
                crashes,
                reconnected,
                now,
            )?)
        })
        .await?;
    if let Some(e) = evacuation {
        crate::health::start_evacuation(app, e).await;
    }
    Ok(())
}

/// Host `host_id`, when `token` is its host token and `peer` its current certificate: the
/// credential of every call an agent makes for itself after registering.
fn authenticated_host(
    app: &App,
    tx: &Tx,
    host_id: Uuid,
    token: Option<&str>,
    peer: &PeerHost,
) -> Result<HostRecord, CenterError> {
    let host = tx.host_by_id(host_id)?.ok_or_else(|| {
        CenterError::not_found(format!(
            "host {host_id} is not registered with this center: register again"
        ))
    })?;
    let Some(token) = token else {
        return Err(CenterError::unauthorized(
            "missing Authorization: Bearer <host token> (the token registration gave)",
        ));
    };
    if !crate::auth::token_eq(&crate::auth::token_hash(token), &host.host_token) {
        return Err(CenterError::unauthorized(format!(
            "wrong token for host {}: register again to get a new host token",
            host.name
        )));
    }
    check_host_cert(app, tx, &host.name, peer)?;
    Ok(host)
}

/// Whether the store names host `host_id` the owner of VM `vm` (read from this center's copy,
/// so a standby answers too). Only the owner learns the generation; any other host, or a VM
/// that does not exist, gets "not owned here".
pub async fn ownership(
    app: &Arc<App>,
    host_id: Uuid,
    token: Option<String>,
    peer: PeerHost,
    vm: Uuid,
) -> Result<Ownership, CenterError> {
    let app2 = app.clone();
    app.db
        .read(move |tx| {
            let host = authenticated_host(&app2, tx, host_id, token.as_deref(), &peer)?;
            let owned = tx.vm_by_id(vm)?.filter(|r| r.host_id == Some(host.id));
            Ok::<_, CenterError>(Ownership {
                vm,
                owned_here: owned.is_some(),
                generation: owned.map(|r| r.generation),
            })
        })
        .await
}

fn apply_vm_reports(
    app: &App,
    tx: &Tx,
    host: &HostRecord,
    hb: &Heartbeat,
    now: chrono::DateTime<Utc>,
) -> Result<u64, StoreError> {
    // A VM a task is starting or stopping belongs to that task until it ends.
    let mut crashes = 0;
    let busy = tx.vms_with_active_tasks()?;
    let reports: HashMap<Uuid, PowerState> =
        hb.load.vms.iter().map(|l| (l.vm_id, l.state)).collect();
    let placed = tx.vms_on_host(host.id)?;
    for l in &hb.load.vms {
        if !placed.iter().any(|v| v.id == l.vm_id) {
            tracing::debug!(
                host = host.name,
                vm = l.name,
                "host runs a VM the center does not place there"
            );
        }
    }
    for vm in placed {
        if busy.contains(&vm.id) || app.settling(vm.id) {
            continue;
        }
        let reported = reports.get(&vm.id).copied();
        let next = next_actual(vm.desired, vm.actual, reported);
        if next != vm.actual {
            if next == PowerState::Crashed {
                crashes += 1;
            }
            tx.set_vm_actual(vm.id, next)?;
            tx.add_event(
                transition_event(&vm, &host.name, next, reported.is_some()),
                now,
            )?;
        }
    }
    Ok(crashes)
}

/// Marks hosts disconnected when their heartbeats stop, until `shutdown` turns true.
pub async fn monitor(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let timeout = app.heartbeat_timeout();
    let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut next_prune = std::time::Instant::now();
    loop {
        if std::time::Instant::now() >= next_prune {
            next_prune = std::time::Instant::now() + PRUNE_EVERY;
            prune_history(&app).await;
        }
        if !crate::app::tick(tick, &mut shutdown).await {
            return;
        }
        let app2 = app.clone();
        let r = app
            .db
            .write(move |tx| check_liveness(&app2, tx, timeout))
            .await;
        if let Err(e) = r {
            tracing::error!("host monitor: {e}");
        }
    }
}

/// How often the history is pruned, and what it keeps: the newest events and finished tasks
/// up to a count, none older than an age.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
const KEEP_EVENTS: u32 = 200_000;
const KEEP_TASKS: u32 = 20_000;
const KEEP_DAYS: i64 = 90;

async fn prune_history(app: &App) {
    let (mut events, mut tasks) = (0, 0);
    // In batches (see PRUNE_BATCH), each its own transaction.
    loop {
        let r = app
            .db
            .write(|tx| {
                let now = Utc::now();
                let age = chrono::Duration::days(KEEP_DAYS);
                Ok::<_, StoreError>((
                    tx.prune_events(KEEP_EVENTS, age, now)?,
                    tx.prune_tasks(KEEP_TASKS, age, now)?,
                ))
            })
            .await;
        match r {
            Ok((0, 0)) => break,
            Ok((e, t)) => {
                events += e;
                tasks += t;
            }
            Err(e) => {
                tracing::error!("pruning the history: {e}");
                break;
            }
        }
    }
    if events + tasks > 0 {
        tracing::info!(events, tasks, "pruned old history");
    }
}

fn check_liveness(app: &App, tx: &Tx, timeout: Duration) -> Result<(), StoreError> {
    let now = Utc::now();
    for host in tx.hosts()? {
        if host.link != Link::Connected {
            continue;
        }
        let silent = app.silence(host.id);
        if silent <= timeout {
            continue;
        }
        tx.set_host_link(host.id, Link::Disconnected)?;
        tx.add_event(
            NewEvent::warning(format!(
                "host {} disconnected: no heartbeat for {:.1} s; its VMs keep running, their \
                 state is unknown until it reconnects",
                host.name,
                silent.as_secs_f64()
            ))
            .host(Some(&host.name)),
            now,
        )?;
        for vm in tx.vms_on_host(host.id)? {
            if matches!(vm.actual, PowerState::Stopped | PowerState::Unknown) {
                continue;
            }
            tx.set_vm_actual(vm.id, PowerState::Unknown)?;
            tx.add_event(
                NewEvent::warning(format!(
                    "VM {} state unknown: host {} is disconnected (was {})",
                    vm.name(),
                    host.name,
                    vm.actual
                ))
                .vm(vm.name())
                .host(Some(&host.name)),
                now,
            )?;
        }
    }
    Ok(())
}

struct CreateSnapshot {
    cluster_id: Uuid,
    /// The cluster's EVC mode.
    evc_mode: Option<String>,
    hosts: Vec<(HostRecord, Candidate)>,
    /// The cluster's VMs (what the DRS engine weighs a placement against).
    vms: Vec<VmRecord>,
}

fn candidate(tx: &Tx, h: &HostRecord) -> Result<Candidate, StoreError> {
    let placed = tx
        .vms_on_host(h.id)?
        .iter()
        .fold(0u64, |sum, v| sum.saturating_add(v.spec.memory_mib));
    Ok(Candidate {
        id: h.id,
        name: h.name.clone(),
        cluster: h.cluster.clone(),
        state: h.state(),
        degraded: h.health.is_degraded().then(|| h.health.summary()),
        cores: h.facts.cores,
        memory_mib: h.facts.memory_mib,
        placed_memory_mib: placed,
        uefi: h.facts.uefi,
    })
}

/// The DRS engine's host for a new VM (index into `snap.hosts`) and its reason, among the
/// usable hosts of the cluster that pass the creation checks (size, free memory, CPU); `None`
/// when the engine finds none (the caller keeps the simple rule's choice and its errors).
fn drs_place(
    app: &App,
    snap: &CreateSnapshot,
    cluster: &str,
    spec: &VmSpec,
) -> Option<(usize, String)> {
    let mut refused = crate::drs::Refused::new();
    let mut hosts = Vec::new();
    for (h, cand) in snap
        .hosts
        .iter()
        .filter(|(h, _)| h.cluster_id == snap.cluster_id)
    {
        let mut why = Vec::new();
        if let Err(e) = vmcheck::check_host(cand, cluster, spec) {
            why.push(("size".to_string(), e.into_message()));
        }
        if let Err(e) = crate::evc::resolve(spec, snap.evc_mode.as_deref(), h) {
            why.push(("cpu".to_string(), e));
        }
        if let Some(e) = crate::datastores::known_unreachable(app, h.id, spec) {
            why.push(("storage".to_string(), e));
        }
        if !why.is_empty() {
            refused.insert(h.name.clone(), why);
        }
        hosts.push(h.clone());
    }
    let new = VmRecord {
        id: Uuid::new_v4(),
        cluster_id: snap.cluster_id,
        cluster: cluster.to_string(),
        host_id: None,
        host: None,
        spec: spec.clone(),
        desired: PowerState::Stopped,
        actual: PowerState::Stopped,
        generation: 1,
        created_at: Utc::now(),
        pool: None,
    };
    match crate::drs::place_new(&hosts, &snap.vms, &new, &refused) {
        Ok(p) if !refused.contains_key(&p.host) => {
            let idx = snap.hosts.iter().position(|(h, _)| h.name == p.host)?;
            Some((idx, crate::drs::placement_reason(&p)))
        }
        Ok(p) => {
            tracing::warn!(vm = %spec.name, host = %p.host, "DRS chose a host the checks refuse");
            None
        }
        Err(e) => {
            tracing::info!(vm = %spec.name, "DRS cannot place the VM: {e}");
            None
        }
    }
}

/// The LUN an image's disk is to be written onto (`--image-on san:2`), when it goes on an
/// iSCSI datastore; `None` for the image's own directory datastore.
fn image_on_lun(
    from: &tern_api::images::DiskFromImage,
    stores: &[tern_api::datastores::Datastore],
) -> Result<Option<String>, CenterError> {
    use tern_api::datastores::DatastoreBackend;
    let Some(name) = &from.datastore else {
        if from.volume.is_some() {
            return Err(CenterError::invalid(
                "a volume for the image's disk needs its datastore (DATASTORE:VOLUME)",
            ));
        }
        return Ok(None);
    };
    let ds = stores.iter().find(|d| &d.name == name).ok_or_else(|| {
        CenterError::unsatisfiable(format!(
            "no datastore named {name} (see tern datastore list)"
        ))
    })?;
    match &ds.backend {
        DatastoreBackend::Iscsi { .. } => {
            let volume = from.volume.as_deref().ok_or_else(|| {
                CenterError::invalid(format!(
                    "name the LUN of iSCSI datastore {name} the disk goes on ({name}:LUN)"
                ))
            })?;
            if !from.full_copy {
                return Err(CenterError::unsatisfiable(format!(
                    "a disk on iSCSI datastore {name} is a full copy of the image written onto \
                     the LUN (a linked clone keeps its template on a directory datastore): add \
                     --full-copy"
                )));
            }
            ds.backend
                .locate(volume)
                .map(Some)
                .map_err(CenterError::invalid)
        }
        DatastoreBackend::Directory { .. } => {
            if from.volume.is_some() {
                return Err(CenterError::invalid(
                    "on a directory datastore the disk made from an image is vms/VM.qcow2: leave \
                     out the volume",
                ));
            }
            Ok(None)
        }
        DatastoreBackend::Block { .. } => Err(CenterError::unsatisfiable(format!(
            "datastore {name} is a block device; VM disks on block datastores are not supported \
             yet"
        ))),
    }
}

pub async fn create_vm(app: &Arc<App>, req: CreateVm) -> Result<Vm, CenterError> {
    let CreateVm {
        mut spec,
        cluster,
        host,
        image,
    } = req;
    // A disk made from an image goes first, and the VM boots from it. Its path is known once
    // the host is chosen (that host's view of the shared storage); until then a placeholder
    // lets the spec's checks count the disk.
    let stores = app
        .db
        .read(|tx| Ok::<_, CenterError>(tx.datastores()?))
        .await?;
    // An image's disk written onto an iSCSI LUN (a full, raw copy), when asked for.
    let mut lun_target: Option<String> = None;
    if let Some(from) = &image {
        if !matches!(spec.boot, tern_api::BootSource::Disk) {
            return Err(CenterError::invalid(
                "a VM made from an image boots from its disk: leave out the kernel",
            ));
        }
        let mut disk = tern_api::DiskSpec {
            bus: from.bus,
            path: format!("/pending/{}.qcow2", spec.name),
            format: tern_api::DiskFormat::Qcow2,
            readonly: false,
            datastore: None,
            volume: None,
        };
        if let Some(url) = image_on_lun(from, &stores)? {
            disk.path = url.clone();
            disk.format = tern_api::DiskFormat::Raw;
            disk.datastore = from.datastore.clone();
            disk.volume = from.volume.clone();
            lun_target = Some(url);
        }
        spec.disks.insert(0, disk);
    }
    // Disks named by datastore and volume get their paths; disks given by path, their
    // datastore.
    crate::datastores::resolve_disks(&mut spec, &stores)?;
    vmcheck::check_spec(&mut spec)?;

    // 1. Read and check against a snapshot.
    let (spec2, cluster2, host2) = (spec.clone(), cluster.clone(), host.clone());
    let image2 = image.clone();
    let snap = app
        .db
        .read(move |tx| {
            if let Some(from) = &image2 {
                let img = tx.image(&from.image)?.ok_or_else(|| {
                    CenterError::not_found(format!(
                        "no image named {}: see tern image list",
                        from.image
                    ))
                })?;
                if let Some(ds) = &from.datastore {
                    let on_image_store = tx
                        .datastore(ds)?
                        .is_some_and(|d| d.backend.volume_of(&img.path).is_some());
                    if from.volume.is_none() && !on_image_store {
                        return Err(CenterError::unsatisfiable(format!(
                            "a disk made from image {} goes on the image's own datastore (or \
                             onto an iSCSI LUN): {ds} does not hold the image",
                            img.name
                        )));
                    }
                }
                if from.size_bytes.is_some_and(|s| s < img.virtual_size_bytes) {
                    return Err(CenterError::invalid(format!(
                        "the disk cannot be smaller than image {} ({} bytes)",
                        img.name, img.virtual_size_bytes
                    )));
                }
            }
            let cluster_id = tx.cluster_id(&cluster2)?.ok_or_else(|| {
                CenterError::not_found(format!(
                    "cluster {c} does not exist: create it with: tern cluster create {c}",
                    c = cluster2
                ))
            })?;
            if tx.vm_by_name(&spec2.name)?.is_some() {
                return Err(CenterError::conflict(format!(
                    "a VM named {} already exists; choose another name",
                    spec2.name
                )));
            }
            // One writer per disk: two VMs writing one LUN or file corrupt it.
            let others = tx.vms()?;
            for d in spec2.disks.iter().filter(|d| !d.readonly) {
                if let Some(v) = others
                    .iter()
                    .find(|v| v.spec.disks.iter().any(|o| o.path == d.path))
                {
                    return Err(CenterError::conflict(format!(
                        "{} is already a disk of VM {}: a disk has one VM writing it",
                        d.path,
                        v.name()
                    )));
                }
            }
            for nic in &spec2.nics {
                if let Some(other) = tx.vm_with_mac(&nic.mac)? {
                    return Err(CenterError::conflict(format!(
                        "MAC {} is already used by VM {other}; every NIC needs its own MAC",
                        nic.mac
                    )));
                }
            }
            if let Some(h) = &host2 {
                if tx.host_by_name(h)?.is_none() {
                    return Err(CenterError::not_found(format!(
                        "host {h} is not registered: see tern host list"
                    )));
                }
            }
            let mut hosts = Vec::new();
            for h in tx.hosts()? {
                let c = candidate(tx, &h)?;
                hosts.push((h, c));
            }
            let evc_mode = tx.cluster(&cluster2)?.and_then(|c| c.evc_mode);
            let vms = tx
                .vms()?
                .into_iter()
                .filter(|v| v.cluster_id == cluster_id)
                .collect();
            Ok(CreateSnapshot {
                cluster_id,
                evc_mode,
                hosts,
                vms,
            })
        })
        .await?;

    // 2. Choose the host.
    let placed_by_center = host.is_none();
    // The DRS engine's reason, when it chose the host.
    let mut drs_reason: Option<String> = None;
    let idx = match &host {
        Some(name) => {
            let idx = snap
                .hosts
                .iter()
                .position(|(h, _)| &h.name == name)
                .ok_or_else(|| CenterError::not_found(format!("host {name} is not registered")))?;
            vmcheck::check_host(&snap.hosts[idx].1, &cluster, &spec)?;
            crate::evc::resources_check(&spec, &snap.hosts[idx].0)
                .map_err(CenterError::unsatisfiable)?;
            idx
        }
        None => {
            // Only hosts that can run the VM's CPU (EVC) are candidates.
            let fits_cpu: Vec<usize> = (0..snap.hosts.len())
                .filter(|&i| {
                    let h = &snap.hosts[i].0;
                    h.cluster != cluster
                        || (crate::evc::resolve(&spec, snap.evc_mode.as_deref(), h).is_ok()
                            && crate::evc::resources_check(&spec, h).is_ok()
                            && crate::datastores::known_unreachable(app, h.id, &spec).is_none())
                })
                .collect();
            let cands: Vec<Candidate> = fits_cpu.iter().map(|&i| snap.hosts[i].1.clone()).collect();
            match vmcheck::place(&cands, &cluster, &spec) {
                // Some host fits: the engine chooses among those that do.
                Ok(i) => match drs_place(app, &snap, &cluster, &spec) {
                    Some((idx, reason)) => {
                        drs_reason = Some(reason);
                        idx
                    }
                    None => fits_cpu[i],
                },
                Err(e) => {
                    let refusals: Vec<String> = snap
                        .hosts
                        .iter()
                        .filter(|(h, _)| h.cluster == cluster && h.usable())
                        .filter_map(|(h, _)| {
                            crate::evc::resolve(&spec, snap.evc_mode.as_deref(), h)
                                .and_then(|_| crate::evc::resources_check(&spec, h))
                                .and_then(|_| {
                                    crate::datastores::known_unreachable(app, h.id, &spec)
                                        .map_or(Ok(String::new()), Err)
                                })
                                .err()
                        })
                        .collect();
                    if refusals.is_empty() {
                        return Err(e);
                    }
                    return Err(CenterError::unsatisfiable(format!(
                        "no host of cluster {cluster} can run VM {}: {}",
                        spec.name,
                        refusals.join("; ")
                    )));
                }
            }
        }
    };
    let (target, target_cand) = snap.hosts[idx].clone();
    crate::evc::resources_check(&spec, &target).map_err(CenterError::unsatisfiable)?;
    // EVC: the CPU the VM gets on that host (checked again, and recorded, at each power-on).
    let cpu = crate::evc::resolve(&spec, snap.evc_mode.as_deref(), &target)
        .map_err(|e| CenterError::unsatisfiable(format!("VM {}: {e}", spec.name)))?;

    // 2b. Make the disk from the image on that host's shared storage.
    if let Some(from) = &image {
        let vol = app
            .agent(&target)
            .clone_volume(&tern_api::images::CloneVolume {
                image: from.image.clone(),
                vm: spec.name.clone(),
                size_bytes: from.size_bytes,
                full_copy: from.full_copy,
                lun: lun_target.clone(),
            })
            .await
            .map_err(crate::images::from_agent)?;
        spec.disks[0].path = vol.path;
        if let Some((ds, volume)) = crate::datastores::locate_in(&stores, &spec.disks[0].path) {
            spec.disks[0].datastore = Some(ds);
            spec.disks[0].volume = Some(volume);
        }
    }
    // A file made for the VM goes if the VM is refused; a LUN is only overwritten.
    let made_disk = image
        .as_ref()
        .filter(|_| lun_target.is_none())
        .map(|_| (target.clone(), spec.name.clone()));
    let recorded = record_new_vm(
        app,
        spec,
        cluster,
        snap,
        (target, target_cand),
        cpu,
        placed_by_center,
        drs_reason,
        image.map(|i| i.image),
    )
    .await;
    if let (Err(_), Some((host, name))) = (&recorded, made_disk) {
        // Nothing records the disk: it goes.
        if let Err(e) = app.agent(&host).remove_image_file(true, &name).await {
            tracing::warn!(vm = %name, error = %e, "the disk made for a refused VM was not removed");
        }
    }
    recorded
}

/// Steps 3 and 4 of [`create_vm`]: the host's file check, then the record.
#[allow(clippy::too_many_arguments)]
async fn record_new_vm(
    app: &Arc<App>,
    spec: VmSpec,
    cluster: String,
    snap: CreateSnapshot,
    (target, target_cand): (HostRecord, Candidate),
    cpu: tern_cpu::vm::VmCpu,
    placed_by_center: bool,
    drs_reason: Option<String>,
    image: Option<String>,
) -> Result<Vm, CenterError> {
    // 3. Ask the host whether it reaches the VM's datastores, sees the VM's files on its
    // shared storage, and reaches its LUNs.
    crate::datastores::check_host(app, &target, &spec)
        .await
        .map_err(|e| {
            CenterError::unsatisfiable(format!("{e}; pick another host, or fix its storage"))
        })?;
    let files = vmcheck::spec_storage(&spec);
    if !files.is_empty() {
        let report = app
            .agent(&target)
            .check_paths(files)
            .await
            .map_err(|e| CenterError::agent(format!("could not check the VM's files: {e}")))?;
        let shared = &target.facts.shared_storage;
        if !report.missing.is_empty() {
            return Err(CenterError::unsatisfiable(format!(
                "host {} does not have these files: {}; copy them to the shared storage \
                 (which {} sees at {shared})",
                target.name,
                report.missing.join(", "),
                target.name
            )));
        }
        if !report.outside_shared_storage.is_empty() {
            return Err(CenterError::unsatisfiable(format!(
                "these files are not on host {}'s shared storage ({shared}): {}; a VM's files \
                 must live there so every host of the cluster can run it",
                target.name,
                report.outside_shared_storage.join(", ")
            )));
        }
        if !report.unreachable.is_empty() {
            return Err(CenterError::unsatisfiable(format!(
                "host {} cannot reach the SAN: {}; check its storage network, or pick another \
                 host",
                target.name,
                report.unreachable.join(", ")
            )));
        }
    }

    // 4. Record, checking again what may have changed meanwhile.
    let cluster_id = snap.cluster_id;
    app.db
        .write(move |tx| {
            let now = Utc::now();
            let host = tx
                .host_by_id(target.id)?
                .filter(|h| h.cluster_id == cluster_id && h.state() == HostState::Connected)
                .ok_or_else(|| {
                    CenterError::conflict(format!(
                        "host {} changed state while the VM was being created; try again",
                        target.name
                    ))
                })?;
            if placed_by_center {
                let now_cand = candidate(tx, &host)?;
                if now_cand.free_memory_mib() < i128::from(spec.memory_mib) {
                    return Err(CenterError::conflict(format!(
                        "host {} filled up while the VM was being created; try again",
                        host.name
                    )));
                }
            }
            let vm = VmRecord {
                id: Uuid::new_v4(),
                cluster_id,
                cluster: cluster.clone(),
                host_id: Some(host.id),
                host: Some(host.name.clone()),
                spec,
                desired: PowerState::Stopped,
                actual: PowerState::Stopped,
                generation: 1,
                created_at: now,
                pool: None,
            };
            tx.insert_vm(&vm)?;
            if let Some(image) = &image {
                tx.set_vm_image(vm.id, image)?;
            }
            tx.set_vm_cpu(vm.id, &crate::evc::creation_row(cpu, &host.name), now)?;
            if let Some(reason) = drs_reason.filter(|_| placed_by_center) {
                tx.add_event(
                    NewEvent::info(format!(
                        "DRS placed VM {} on host {}: {reason}",
                        vm.name(),
                        host.name
                    ))
                    .vm(vm.name())
                    .host(Some(&host.name)),
                    now,
                )?;
            } else if placed_by_center {
                tx.add_event(
                    NewEvent::info(format!(
                        "placed VM {} on host {}: most free memory in cluster {} ({} MiB free \
                         before, {} MiB after)",
                        vm.name(),
                        host.name,
                        cluster,
                        target_cand.free_memory_mib(),
                        target_cand.free_memory_mib() - i128::from(vm.spec.memory_mib)
                    ))
                    .vm(vm.name())
                    .host(Some(&host.name)),
                    now,
                )?;
            }
            tx.add_event(
                NewEvent::info(format!(
                    "VM {} created in cluster {} on host {} ({} vcpus, {} MiB)",
                    vm.name(),
                    cluster,
                    host.name,
                    vm.spec.vcpus,
                    vm.spec.memory_mib
                ))
                .vm(vm.name())
                .host(Some(&host.name)),
                now,
            )?;
            Ok(crate::evc::vm_view(tx, &vm)?)
        })
        .await
}

pub async fn delete_vm(app: &Arc<App>, name: String) -> Result<(), CenterError> {
    let (vm, host, from_image) = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let vm = tx
                .vm_by_name(&name)?
                .ok_or_else(|| CenterError::vm_not_found(&name))?;
            let from_image = tx.vm_image(vm.id)?;
            if let Some(t) = tx.active_tasks(Some(vm.id))?.first() {
                return Err(CenterError::conflict(format!(
                    "task {} is still {} on VM {name}: wait for it, or cancel it with: tern task \
                     cancel {}",
                    t.task.id, t.task.state, t.task.id
                )));
            }
            let on = vm.host.clone().unwrap_or_else(|| "its host".into());
            match vm.actual {
                PowerState::Running | PowerState::Paused => {
                    return Err(CenterError::conflict(format!(
                        "VM {name} is {} on {on}: stop it first with: tern vm stop {name}",
                        vm.actual
                    )))
                }
                PowerState::Unknown => {
                    return Err(CenterError::conflict(format!(
                        "VM {name}'s state is unknown ({on} is disconnected) and it may be \
                         running: wait for the host to reconnect, then stop it"
                    )))
                }
                PowerState::Stopped | PowerState::Crashed => {}
            }
            let host = vm.host_id.map(|h| tx.host_by_id(h)).transpose()?.flatten();
            tx.delete_vm(vm.id)?;
            tx.forget_vm_in_rules(vm.cluster_id, &name)?;
            tx.add_event(
                NewEvent::info(format!("VM {name} deleted"))
                    .vm(&name)
                    .host(vm.host.as_deref()),
                now,
            )?;
            Ok((vm, host, from_image))
        })
        .await?;
    // Remove its runtime files on the host, and the disk the center made for it from an
    // image; the inventory no longer has it either way.
    if let Some(h) = host.filter(|h| h.link == Link::Connected) {
        let disk = match from_image {
            Some(_) => app.agent(&h).remove_image_file(true, vm.name()).await.err(),
            None => None,
        };
        if let Some(e) = disk {
            tracing::warn!(vm = %vm.name(), error = %e, "the VM's disk made from an image was not removed");
        }
        // A UEFI VM's variables store is the VM's, like its disk (the agent's own delete,
        // also used after a migration, leaves it: the VM lives on elsewhere then).
        if vm.spec.firmware == tern_api::Firmware::Uefi {
            if let Err(e) = app.agent(&h).remove_nvram(vm.id).await {
                tracing::warn!(vm = %vm.name(), error = %e, "the VM's UEFI variables store was not removed");
            }
        }
        if let Err(e) = app.agent(&h).delete(vm.id).await {
            let name = vm.name().to_string();
            let msg = format!(
                "VM {name}: could not remove its files on host {}: {e}",
                h.name
            );
            app.db
                .write(move |tx| {
                    tx.add_event(
                        NewEvent::warning(msg).vm(name).host(Some(&h.name)),
                        Utc::now(),
                    )
                })
                .await?;
        }
    }
    Ok(())
}

pub async fn console(
    app: &Arc<App>,
    name: String,
    bytes: Option<u64>,
) -> Result<String, CenterError> {
    let (vm, host) = app
        .db
        .read(move |tx| {
            let vm = tx
                .vm_by_name(&name)?
                .ok_or_else(|| CenterError::vm_not_found(&name))?;
            let host = vm
                .host_id
                .map(|h| tx.host_by_id(h))
                .transpose()?
                .flatten()
                .ok_or_else(|| CenterError::conflict(format!("VM {name} has no host")))?;
            Ok::<_, CenterError>((vm, host))
        })
        .await?;
    app.agent(&host)
        .console(vm.id, bytes)
        .await
        .map_err(|e| match e.status() {
            Some(404) => CenterError::not_found(format!(
                "VM {} has no console log on host {} yet: start it first",
                vm.name(),
                host.name
            )),
            _ => CenterError::agent(format!(
                "could not read the console of VM {}: {e}",
                vm.name()
            )),
        })
}

/// HA mode: tells every connected host this leader's term at once (any call carries it), so
/// from here on each one refuses the leader before it, even if that one wakes up.
pub async fn announce_term(app: &Arc<App>) {
    let hosts = match app.db.read(|tx| tx.hosts()).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("announcing the term: reading the hosts: {e}");
            return;
        }
    };
    let calls = hosts.iter().filter(|h| h.link == Link::Connected).map(|h| {
        let agent = app.agent(h);
        let name = h.name.clone();
        async move {
            if let Err(e) = agent.vms().await {
                tracing::warn!(host = name, "announcing the term: {e}");
            }
        }
    });
    futures::future::join_all(calls).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actual_state_after_a_heartbeat() {
        use PowerState::*;
        assert_eq!(next_actual(Running, Stopped, Some(Running)), Running);
        assert_eq!(next_actual(Running, Running, None), Crashed);
        assert_eq!(next_actual(Running, Unknown, None), Crashed);
        assert_eq!(next_actual(Stopped, Running, None), Stopped);
        assert_eq!(next_actual(Running, Stopped, None), Stopped);
        assert_eq!(next_actual(Stopped, Unknown, Some(Running)), Running);
    }

    #[test]
    fn agent_urls() {
        assert!(check_agent_url("http://10.77.0.11:8701").is_ok());
        assert!(check_agent_url("http://0.0.0.0:8701").is_err());
        assert!(check_agent_url("10.0.0.1:8701").is_err());
        assert!(check_agent_url("http://").is_err());
        // Nothing after the port: the center appends its own paths.
        assert!(check_agent_url("http://10.77.0.11:8701/").is_ok());
        for bad in [
            "http://10.77.0.11:8701/evil",
            "http://10.77.0.11:8701?x=1",
            "http://user@10.77.0.11:8701",
            "http://10.77.0.11",
            "http://10.77.0.11:0",
            "http://10.77.0.11:99999",
            "http://10.77.0.11:87 01",
        ] {
            assert!(check_agent_url(bad).is_err(), "{bad}");
        }
        assert!(valid_host_name("h1"));
        assert!(valid_host_name("node-3.example"));
        assert!(!valid_host_name("register"));
        assert!(!valid_host_name("-x"));
    }
}
