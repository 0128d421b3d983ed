//! A cluster's placement rules (affinity, anti-affinity, VM-host): checked against the
//! inventory and the other rules when created, stored, and handed to the DRS engine with
//! every snapshot (`drs::add_user_rules`), so placement, balancing and maintenance keep them.
//! Migrations check the must rules too (`rules_check`).

use std::collections::HashSet;
use std::sync::Arc;

use chrono::Utc;
use tern_api::drs::{DrsRule, DrsRuleKind};
use tern_api::valid_name;

use crate::app::App;
use crate::error::CenterError;
use crate::store::{NewEvent, VmRecord};

/// The most VMs or hosts one rule names.
const MAX_MEMBERS: usize = 256;

/// Checks a rule on its own: name, members, kind against hosts.
fn check_shape(rule: &DrsRule) -> Result<(), CenterError> {
    if !valid_name(&rule.name) {
        return Err(CenterError::invalid(format!(
            "rule name {:?} is not valid: use 1 to 32 characters of a-z, 0-9 and '-'",
            rule.name
        )));
    }
    let distinct = |list: &[String], what: &str| -> Result<(), CenterError> {
        if list.len() > MAX_MEMBERS {
            return Err(CenterError::invalid(format!(
                "rule {} names {} {what}s: at most {MAX_MEMBERS}",
                rule.name,
                list.len()
            )));
        }
        let mut seen = HashSet::new();
        for n in list {
            if !valid_name(n) {
                return Err(CenterError::invalid(format!(
                    "{what} name {n:?} is not valid"
                )));
            }
            if !seen.insert(n) {
                return Err(CenterError::invalid(format!(
                    "rule {} names {what} {n} twice",
                    rule.name
                )));
            }
        }
        Ok(())
    };
    distinct(&rule.vms, "VM")?;
    distinct(&rule.hosts, "host")?;
    if rule.kind.names_hosts() {
        if rule.vms.is_empty() || rule.hosts.is_empty() {
            return Err(CenterError::invalid(format!(
                "a {} rule needs at least one VM and one host",
                rule.kind
            )));
        }
    } else {
        if rule.vms.len() < 2 {
            return Err(CenterError::invalid(format!(
                "an {} rule needs at least two VMs",
                rule.kind
            )));
        }
        if !rule.hosts.is_empty() {
            return Err(CenterError::invalid(format!(
                "an {} rule names VMs only, not hosts",
                rule.kind
            )));
        }
    }
    Ok(())
}

/// Why `new` cannot hold together with `old`, if it cannot: VMs both together and apart,
/// or a VM bound to two host sets that leave it nowhere to run.
fn conflict(new: &DrsRule, old: &DrsRule) -> Option<String> {
    use DrsRuleKind as K;
    let shared: Vec<&String> = new.vms.iter().filter(|v| old.vms.contains(v)).collect();
    let pair = |a: K, b: K| (new.kind == a && old.kind == b) || (new.kind == b && old.kind == a);
    if pair(K::Affinity, K::AntiAffinity) && shared.len() >= 2 {
        let (together, apart) = if new.kind == K::Affinity {
            (new, old)
        } else {
            (old, new)
        };
        return Some(format!(
            "rule {} keeps {} and {} together and rule {} keeps them apart",
            together.name, shared[0], shared[1], apart.name
        ));
    }
    let vm = shared.first()?;
    let hosts = |r: &DrsRule| r.hosts.iter().cloned().collect::<HashSet<String>>();
    match (new.kind, old.kind) {
        (K::MustRunOn, K::MustRunOn) if hosts(new).is_disjoint(&hosts(old)) => Some(format!(
            "VM {vm} must run on {} by rule {} and on {} by rule {}: no host is in both",
            new.hosts.join(", "),
            new.name,
            old.hosts.join(", "),
            old.name
        )),
        (K::MustRunOn, K::MustNotRunOn) | (K::MustNotRunOn, K::MustRunOn) => {
            let (on, off) = if new.kind == K::MustRunOn {
                (new, old)
            } else {
                (old, new)
            };
            hosts(on).is_subset(&hosts(off)).then(|| {
                format!(
                    "VM {vm} must run on {} by rule {} and must not run on any of them by rule {}",
                    on.hosts.join(", "),
                    on.name,
                    off.name
                )
            })
        }
        _ => None,
    }
}

/// Creates a rule in `cluster`; refuses a rule that names unknown VMs or hosts (or ones of
/// another cluster), reuses a name, or conflicts with a rule already there.
pub async fn create(
    app: &Arc<App>,
    cluster: String,
    rule: DrsRule,
    by: String,
) -> Result<DrsRule, CenterError> {
    check_shape(&rule)?;
    let r = rule.clone();
    app.db
        .write(move |tx| {
            let cluster_id = tx
                .cluster_id(&cluster)?
                .ok_or_else(|| CenterError::cluster_not_found(&cluster))?;
            if tx.drs_rule(&r.name)?.is_some() {
                return Err(CenterError::conflict(format!(
                    "a rule named {} already exists: remove it first (tern rule remove {})",
                    r.name, r.name
                )));
            }
            let mut vms: Vec<VmRecord> = Vec::new();
            for v in &r.vms {
                let vm = tx
                    .vm_by_name(v)?
                    .ok_or_else(|| CenterError::vm_not_found(v))?;
                if vm.cluster_id != cluster_id {
                    return Err(CenterError::unsatisfiable(format!(
                        "VM {v} is in cluster {}, not {cluster}",
                        vm.cluster
                    )));
                }
                vms.push(vm);
            }
            for h in &r.hosts {
                let host = tx.host_by_name(h)?.ok_or_else(|| {
                    CenterError::not_found(format!(
                        "host {h} is not registered: see tern host list"
                    ))
                })?;
                if host.cluster_id != cluster_id {
                    return Err(CenterError::unsatisfiable(format!(
                        "host {h} is in cluster {}, not {cluster}",
                        host.cluster
                    )));
                }
            }
            for old in tx.drs_rules(cluster_id)? {
                if let Some(why) = conflict(&r, &old) {
                    return Err(CenterError::conflict(format!(
                        "rule {} conflicts with rule {}: {why}",
                        r.name, old.name
                    )));
                }
            }
            let now = Utc::now();
            tx.insert_drs_rule(cluster_id, &r, now)?;
            let broken = broken_now(&r, &vms);
            tx.add_event(
                NewEvent::info(format!(
                    "DRS rule {r} created in cluster {cluster}{}",
                    match &broken {
                        Some(why) => format!(
                            "; {why} now: DRS moves them at its next pass (tern drs recommend \
                             {cluster})"
                        ),
                        None => String::new(),
                    }
                ))
                .actor(by),
                now,
            )?;
            Ok(r)
        })
        .await
}

/// How the running VMs break a new rule right now, if they do.
fn broken_now(rule: &DrsRule, vms: &[VmRecord]) -> Option<String> {
    let running: Vec<(&str, &str)> = vms
        .iter()
        .filter(|v| v.actual == tern_api::PowerState::Running)
        .filter_map(|v| Some((v.name(), v.host.as_deref()?)))
        .collect();
    match rule.kind {
        DrsRuleKind::AntiAffinity => {
            let mut seen: Vec<(&str, &str)> = Vec::new();
            for (vm, host) in &running {
                if let Some((other, _)) = seen.iter().find(|(_, h)| h == host) {
                    return Some(format!("{other} and {vm} share host {host}"));
                }
                seen.push((vm, host));
            }
            None
        }
        DrsRuleKind::Affinity => {
            let hosts: HashSet<&str> = running.iter().map(|(_, h)| *h).collect();
            (hosts.len() > 1).then(|| "its VMs run on different hosts".to_string())
        }
        DrsRuleKind::MustRunOn | DrsRuleKind::ShouldRunOn => running
            .iter()
            .find(|(_, h)| !rule.hosts.iter().any(|x| x == h))
            .map(|(vm, h)| format!("{vm} runs on {h}")),
        DrsRuleKind::MustNotRunOn | DrsRuleKind::ShouldNotRunOn => running
            .iter()
            .find(|(_, h)| rule.hosts.iter().any(|x| x == h))
            .map(|(vm, h)| format!("{vm} runs on {h}")),
    }
}

pub async fn list(app: &Arc<App>, cluster: String) -> Result<Vec<DrsRule>, CenterError> {
    app.db
        .read(move |tx| {
            let id = tx
                .cluster_id(&cluster)?
                .ok_or_else(|| CenterError::cluster_not_found(&cluster))?;
            Ok::<_, CenterError>(tx.drs_rules(id)?)
        })
        .await
}

pub async fn remove(app: &Arc<App>, name: String, by: String) -> Result<(), CenterError> {
    app.db
        .write(move |tx| {
            let Some((_, rule)) = tx.drs_rule(&name)? else {
                return Err(CenterError::not_found(format!(
                    "no rule named {name}: see tern rule list CLUSTER"
                )));
            };
            tx.delete_drs_rule(&name)?;
            tx.add_event(
                NewEvent::info(format!("DRS rule {rule} removed")).actor(by),
                Utc::now(),
            )?;
            Ok(())
        })
        .await
}

/// The migration pre-check of the cluster's rules: running `vm` on `dest` must keep every
/// must rule and anti-affinity rule (`running`: where the cluster's other VMs run now). An
/// affinity rule is left to DRS, which moves its VMs together.
pub fn rules_check(
    rules: &[DrsRule],
    vm: &str,
    dest: &str,
    running: &[(String, String)],
) -> Result<String, String> {
    let mut broken_rules = Vec::new();
    for r in rules.iter().filter(|r| r.vms.iter().any(|v| v == vm)) {
        let on_dest = r.hosts.iter().any(|h| h == dest);
        let broken = match r.kind {
            DrsRuleKind::MustRunOn => {
                (!on_dest).then(|| format!("{vm} must run on {}", r.hosts.join(", ")))
            }
            DrsRuleKind::MustNotRunOn => on_dest.then(|| format!("{vm} must not run on {dest}")),
            DrsRuleKind::AntiAffinity => running
                .iter()
                .find(|(other, host)| other != vm && host == dest && r.vms.contains(other))
                .map(|(other, _)| {
                    format!("{vm} and {other} must not share a host, and {other} runs on {dest}")
                }),
            _ => None,
        };
        if let Some(why) = broken {
            broken_rules.push(format!("rule {}: {why}", r.name));
        }
    }
    if !broken_rules.is_empty() {
        return Err(broken_rules.join("; "));
    }
    Ok(format!("running on {dest} keeps every rule of VM {vm}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, kind: DrsRuleKind, vms: &[&str], hosts: &[&str]) -> DrsRule {
        DrsRule {
            name: name.into(),
            kind,
            vms: vms.iter().map(|s| s.to_string()).collect(),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn rules_must_have_the_members_their_kind_needs() {
        use DrsRuleKind as K;
        assert!(check_shape(&rule("apart", K::AntiAffinity, &["a", "b"], &[])).is_ok());
        assert!(check_shape(&rule("pin", K::MustRunOn, &["a"], &["h1"])).is_ok());
        for (r, needle) in [
            (rule("apart", K::AntiAffinity, &["a"], &[]), "two VMs"),
            (
                rule("apart", K::Affinity, &["a", "b"], &["h1"]),
                "not hosts",
            ),
            (rule("pin", K::MustRunOn, &["a"], &[]), "one host"),
            (rule("pin", K::MustRunOn, &["a", "a"], &["h1"]), "twice"),
            (rule("../x", K::MustRunOn, &["a"], &["h1"]), "not valid"),
            (rule("pin", K::MustRunOn, &["a"], &["h 1"]), "not valid"),
        ] {
            let e = check_shape(&r).expect_err(needle).into_message();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn conflicting_rules_are_found() {
        use DrsRuleKind as K;
        let together = rule("together", K::Affinity, &["a", "b", "c"], &[]);
        let apart = rule("apart", K::AntiAffinity, &["b", "c"], &[]);
        assert!(conflict(&apart, &together).is_some());
        assert!(conflict(&rule("x", K::AntiAffinity, &["a", "d"], &[]), &together).is_none());
        let on_h1 = rule("on-h1", K::MustRunOn, &["a"], &["h1"]);
        let on_h2 = rule("on-h2", K::MustRunOn, &["a"], &["h2"]);
        assert!(conflict(&on_h2, &on_h1).is_some());
        assert!(conflict(&rule("y", K::MustRunOn, &["a"], &["h1", "h2"]), &on_h1).is_none());
        let off = rule("off", K::MustNotRunOn, &["a"], &["h1", "h3"]);
        assert!(conflict(&off, &on_h1).is_some());
        assert!(conflict(&rule("z", K::ShouldRunOn, &["a"], &["h2"]), &on_h1).is_none());
    }

    #[test]
    fn migrations_keep_must_and_anti_affinity_rules() {
        use DrsRuleKind as K;
        let rules = [
            rule("apart", K::AntiAffinity, &["a", "b"], &[]),
            rule("pin", K::MustRunOn, &["c"], &["h1"]),
            rule("soft", K::ShouldRunOn, &["a"], &["h3"]),
        ];
        let running = vec![
            ("a".to_string(), "h1".to_string()),
            ("b".to_string(), "h2".to_string()),
        ];
        let e = rules_check(&rules, "a", "h2", &running).expect_err("a next to b");
        assert!(e.contains("rule apart"), "{e}");
        assert!(rules_check(&rules, "a", "h3", &running).is_ok());
        let e = rules_check(&rules, "c", "h2", &running).expect_err("c pinned");
        assert!(e.contains("rule pin: c must run on h1"), "{e}");
        assert!(rules_check(&rules, "c", "h1", &running).is_ok());
        // Every broken rule is named, not only the first.
        let both = [
            rule("apart", K::AntiAffinity, &["a", "b"], &[]),
            rule("pin", K::MustRunOn, &["a"], &["h1"]),
        ];
        let e = rules_check(&both, "a", "h2", &running).expect_err("two rules");
        assert!(e.contains("rule apart") && e.contains("rule pin"), "{e}");
    }
}
