//! The destination's way out when the commit call never comes.
//!
//! A center commits a migration in its store (in an HA group: in etcd) and then tells the
//! destination to run the guest. A leader that dies between the two leaves the guest paused
//! on both hosts until the next leader has taken over (the dead leader's lease must expire
//! first) and recovered the task: seconds. Every center of the group keeps a copy of the store,
//! standbys included, and a row there is durable in etcd before any center sees it. So once the
//! steer has told this host the switchover is under way, it waits a moment for the commit, then
//! asks the centers whether the store names it the VM's owner under the generation it was
//! prepared for; if one says so, it runs the guest itself. The next leader's commit call then
//! finds the guest running (commits are idempotent) and only finishes the source.
//!
//! Safety rests on the store: only a committed migration makes a center answer "owned here"
//! with the new generation, and after a commit no center ever resumes the source. A center
//! that is behind answers "not owned" and the watch asks again. Frames the source held for the
//! hand-over are not delivered this way (the leader that had them is gone): their senders
//! retransmit them.

use std::sync::Arc;
use std::time::Duration;

use tern_api::center::{Ownership, OwnershipQuery};
use tern_api::migration::Commit;
use tern_api::routes::center as route;
use uuid::Uuid;

use crate::config::CenterLink;
use crate::Agent;

/// How long after the steer the commit call is waited for before the store is asked: the
/// center commits as soon as the destination holds the guest, normally within milliseconds.
const GRACE: Duration = Duration::from_millis(500);
/// How long the commit call is still given once the store shows the commit: a live leader
/// sends it within milliseconds of its store write, with the frames the source held, which
/// this host cannot get otherwise.
const LAST_CHANCE: Duration = Duration::from_millis(150);
/// How often the centers are asked once the grace is over.
const ASK_EVERY: Duration = Duration::from_millis(250);
/// How long one center may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts watching VM `vm`'s incoming migration for a commit that does not come; ends when the
/// migration is committed or aborted (by a center or by itself). Does nothing on an agent
/// without a center, or one not yet registered.
pub fn after_steer(agent: Arc<Agent>, vm: Uuid) {
    let Some(generation) = agent.migrations.watch_for_commit(vm) else {
        return;
    };
    if agent.cfg.center.is_none() {
        return;
    }
    tokio::spawn(async move { watch(agent, vm, generation).await });
}

async fn watch(agent: Arc<Agent>, vm: Uuid, generation: u64) {
    tokio::time::sleep(GRACE).await;
    let mut said = false;
    while agent.migrations.awaits_commit(vm) {
        if owned_here(&agent, vm, generation).await {
            tokio::time::sleep(LAST_CHANCE).await;
            if !agent.migrations.awaits_commit(vm) {
                return;
            }
            tracing::warn!(
                %vm, generation,
                "the store records this host as the VM's owner but no center told it to run \
                 the guest (its leader died after committing?): running it now"
            );
            let commit = Commit {
                generation,
                frames: Vec::new(),
            };
            match agent.migrations.commit(vm, commit).await {
                Ok(_) => {
                    agent.migrations.count_self_commit();
                    return;
                }
                Err(e) => {
                    tracing::warn!(%vm, error = %e, "running the committed guest failed; trying again")
                }
            }
        } else if !said {
            tracing::info!(%vm, "no commit yet after the switchover's steer; asking the centers until one comes");
            said = true;
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
}

/// Whether any center of the group says the store names this host VM `vm`'s owner under
/// `generation`.
async fn owned_here(agent: &Agent, vm: Uuid, generation: u64) -> bool {
    let (Some(link), Some(host_id), Some(token)) = (
        agent.cfg.center.as_ref(),
        agent.center_host_id(),
        agent.state.host_secret(),
    ) else {
        return false;
    };
    let path = route::HOST_OWNERSHIP.with_id(host_id);
    for url in &link.urls {
        let one = CenterLink {
            url: url.clone(),
            ..link.clone()
        };
        let client = match crate::enrol::center_client(agent, &one, token.clone(), ASK_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(center = %url, error = %e, "no client for the ownership question");
                continue;
            }
        };
        match client
            .get_query::<_, Ownership>(&path, &OwnershipQuery { vm })
            .await
        {
            Ok(o) if is_the_commit(&o, vm, generation) => return true,
            Ok(_) => {}
            Err(e) => tracing::debug!(center = %url, error = %e, "ownership question not answered"),
        }
    }
    false
}

/// An answer that proves the commit: this VM, owned here, under exactly the generation the
/// destination was prepared for (an older one is the VM's past here, not this migration).
fn is_the_commit(o: &Ownership, vm: Uuid, generation: u64) -> bool {
    o.vm == vm && o.owned_here && o.generation == Some(generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ownership_under_the_prepared_generation_proves_the_commit() {
        let vm = Uuid::new_v4();
        let owned = |g| Ownership {
            vm,
            owned_here: true,
            generation: Some(g),
        };
        assert!(is_the_commit(&owned(7), vm, 7));
        // The VM lived here before it left (generation 5); a center that is behind still
        // says so while this migration (6 -> 7) brings it back.
        assert!(!is_the_commit(&owned(5), vm, 7));
        assert!(!is_the_commit(&owned(7), Uuid::new_v4(), 7));
        let elsewhere = Ownership {
            vm,
            owned_here: false,
            generation: None,
        };
        assert!(!is_the_commit(&elsewhere, vm, 7));
    }
}
