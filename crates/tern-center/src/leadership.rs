//! Whether this center may change the cluster: always in single-node mode; in HA mode only
//! while it holds the etcd leader key and has recovered the previous leader's work (see
//! [`crate::ha`]). Owns the leader's term, which every call to an agent carries so agents
//! refuse a deposed leader, and who leads, which a standby names when it refuses a change.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The leader as it announces itself in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The center's name (`--ha-name`).
    pub name: String,
    /// Where its API is (`--advertise-url`).
    pub url: String,
}

/// This center's standing.
#[derive(Debug)]
pub struct Leadership {
    ha: bool,
    name: String,
    /// The term while this center leads and may write (0 otherwise): the etcd revision that
    /// created its leader key. Shared with the agents' HTTP pool, which sends it.
    term: Arc<AtomicU64>,
    /// The revision at which this center won, from the moment it won (0 when it does not
    /// lead): rows the replica is sent from that revision on are this center's own.
    won_at: AtomicI64,
    /// Leads, caught up and recovered: takes changes.
    ready: AtomicBool,
    leader: Mutex<Option<LeaderInfo>>,
    /// Set once this center lost the leadership it held: it must stop (see `ha`).
    lost: watch::Sender<bool>,
}

impl Leadership {
    /// Single-node mode: this center is the only one and always leads.
    pub fn single() -> Leadership {
        Leadership {
            ha: false,
            name: String::new(),
            term: Arc::default(),
            won_at: AtomicI64::new(0),
            ready: AtomicBool::new(true),
            leader: Mutex::new(None),
            lost: watch::channel(false).0,
        }
    }

    /// HA mode: a standby until it wins an election.
    pub fn standby(name: &str) -> Leadership {
        Leadership {
            ha: true,
            name: name.to_string(),
            ready: AtomicBool::new(false),
            ..Leadership::single()
        }
    }

    pub fn is_ha(&self) -> bool {
        self.ha
    }

    /// Whether this center takes changes now.
    pub fn writable(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The term agents are sent (0: single-node, or not leading).
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::SeqCst)
    }

    /// The shared cell the agents' HTTP pool reads the term from.
    pub fn term_cell(&self) -> Arc<AtomicU64> {
        self.term.clone()
    }

    pub fn won_at(&self) -> i64 {
        self.won_at.load(Ordering::SeqCst)
    }

    /// This center won at etcd revision `revision` (it is catching up, not yet writing).
    pub fn won(&self, revision: i64) {
        self.won_at.store(revision, Ordering::SeqCst);
    }

    /// Caught up: this center's writes go to etcd under `term` from now on.
    pub fn lead(&self, term: u64) {
        self.term.store(term, Ordering::SeqCst);
    }

    /// Recovered the previous leader's work: take changes.
    pub fn ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Lost the leadership (lease expired, or a write fenced out): write nothing more.
    pub fn lose(&self, why: &str) {
        if self.won_at() == 0 {
            return;
        }
        self.ready.store(false, Ordering::SeqCst);
        self.term.store(0, Ordering::SeqCst);
        tracing::error!("{} lost the leadership: {why}", self.name);
        self.lost.send_replace(true);
    }

    /// Resolves when this center lost the leadership it held.
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.subscribe()
    }

    pub fn set_leader(&self, leader: Option<LeaderInfo>) {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = leader;
    }

    pub fn leader(&self) -> Option<LeaderInfo> {
        self.leader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why this center refuses a change now, naming the leader when one is known.
    pub fn refusal(&self) -> String {
        match self.leader() {
            Some(l) if l.name != self.name => format!(
                "this center ({}) is a standby: the leader is {} at {}; send changes there",
                self.name, l.name, l.url
            ),
            Some(_) => format!(
                "this center ({}) has just been elected and is taking over; retry in a moment",
                self.name
            ),
            None => format!(
                "this center ({}) is a standby and no center leads right now (an election is \
                 under way); retry in a few seconds",
                self.name
            ),
        }
    }
}
