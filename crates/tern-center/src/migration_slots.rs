//! The center's migration scheduler: how many live migrations each host sends and receives
//! at once, whoever started them (an operator, maintenance, an evacuation, DRS).
//!
//! Each migration takes a ticket when its task is queued, so tickets keep the order the
//! callers asked in (a maintenance plan's order, DRS's priority order), and waits on it after
//! its pre-checks until its source has an outgoing slot and its destination an incoming one.
//! Mandatory moves (an operator's, maintenance, evacuations, rule fixes) go before optional
//! ones (DRS balance); within a class, first come first served, but only among tickets that
//! compete for the same slots, so a queue on one host never holds up migrations elsewhere.
//!
//! A host's limit follows vSphere's network cost model (4 at once on 1 GbE, 8 on 10 GbE; 2
//! below or while unmeasured), from the fastest link this center measured to or from the
//! host, capped by its cores: a stream costs about a core (more with encryption), which
//! vSphere's hosts offload and QEMU's do not.
//!
//! A link between two hosts has a budget of its own, from the bandwidth last measured
//! between them: each migration over it keeps at least 250 Mbit/s (vSphere's share at 1 GbE
//! with 4 at once), so a slow link between two otherwise fast hosts (another rack, a WAN
//! hop) carries one or two at a time instead of starving four that then never converge.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use uuid::Uuid;

/// Which queue a migration waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MoveClass {
    /// Asked by an operator, or needed by maintenance, an evacuation or a rule.
    Mandatory,
    /// A DRS balance move: waits behind every mandatory one.
    Optional,
}

/// Concurrent migrations a host sends (and, separately, receives), from the fastest link
/// measured at it (`None`: not measured yet) and its cores.
pub fn host_limit(link_mbit: Option<f64>, cores: u32) -> usize {
    let by_link = match link_mbit {
        Some(m) if m >= 10_000.0 => 8,
        Some(m) if m >= 1_000.0 => 4,
        _ => 2,
    };
    by_link.min((cores as usize).max(2))
}

/// Bandwidth each migration over a link keeps at least (Mbit/s).
const LINK_SHARE_MBIT: f64 = 250.0;

/// Concurrent migrations over the link between two hosts, from its last measured bandwidth
/// (`None`: never measured, so only the hosts' limits count).
pub fn link_limit(pair_mbit: Option<f64>) -> usize {
    match pair_mbit {
        Some(m) if m.is_finite() && m > 0.0 => ((m / LINK_SHARE_MBIT) as usize).clamp(1, 8),
        _ => usize::MAX,
    }
}

/// What one migration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRequest {
    pub source: Uuid,
    pub source_limit: usize,
    pub dest: Uuid,
    pub dest_limit: usize,
    /// Migrations the link between source and destination carries at once ([`link_limit`]).
    pub link_limit: usize,
    pub class: MoveClass,
}

/// What a host sends and receives now, after a slot was taken or freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCounts {
    pub sending: usize,
    pub send_limit: usize,
    pub receiving: usize,
    pub receive_limit: usize,
    /// Migrations over the link between the two hosts, and its limit (`usize::MAX`: none).
    pub on_link: usize,
    pub link_limit: usize,
}

#[derive(Default)]
struct State {
    sending: HashMap<Uuid, usize>,
    receiving: HashMap<Uuid, usize>,
    /// Migrations over each link (host pair, either way).
    on_link: HashMap<(Uuid, Uuid), usize>,
    /// Waiting tickets by (class, arrival).
    waiting: BTreeMap<(MoveClass, u64), SlotRequest>,
    next: u64,
}

/// The scheduler (one per center).
#[derive(Default)]
pub struct MigrationSlots {
    state: Mutex<State>,
    changed: Notify,
    /// The fastest link measured to or from each host, Mbit/s.
    links: Mutex<HashMap<Uuid, f64>>,
    /// The last link measured between two hosts (either way), Mbit/s, and when.
    pairs: Mutex<HashMap<(Uuid, Uuid), (f64, Instant)>>,
    /// Held while a slot event is recorded ([`Ticket::record_order`]).
    record: tokio::sync::Mutex<()>,
}

/// Two hosts in a fixed order: a link is measured one way and used both ways.
fn pair(a: Uuid, b: Uuid) -> (Uuid, Uuid) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

impl MigrationSlots {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a link measurement between two hosts.
    pub fn measured(&self, a: Uuid, b: Uuid, mbit: f64) {
        if !(mbit.is_finite() && mbit > 0.0) {
            return;
        }
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        for h in [a, b] {
            let e = links.entry(h).or_insert(0.0);
            *e = e.max(mbit);
        }
        self.pairs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pair(a, b), (mbit, Instant::now()));
    }

    /// The link last measured between two hosts and how long ago, if no older than
    /// `max_age`.
    pub fn pair_link(&self, a: Uuid, b: Uuid, max_age: Duration) -> Option<(f64, Duration)> {
        let (mbit, at) = *self
            .pairs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pair(a, b))?;
        let age = at.elapsed();
        (age <= max_age).then_some((mbit, age))
    }

    /// The fastest link measured at a host.
    pub fn link_mbit(&self, host: Uuid) -> Option<f64> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host)
            .copied()
    }

    /// Takes a place in the queue now (the caller's order is the queue's order).
    pub fn ticket(self: &Arc<Self>, req: SlotRequest) -> Ticket {
        let mut st = self.lock();
        let seq = st.next;
        st.next += 1;
        st.waiting.insert((req.class, seq), req);
        Ticket {
            slots: self.clone(),
            key: (req.class, seq),
            req,
            held: false,
        }
    }

    /// Whether ticket `key` may take its slots now: both have room, and no ticket ahead of
    /// it waits for one of the same slots.
    fn may_take(st: &State, key: (MoveClass, u64), req: &SlotRequest) -> bool {
        let link = pair(req.source, req.dest);
        let ahead_competes = st.waiting.range(..key).any(|(_, a)| {
            a.source == req.source || a.dest == req.dest || pair(a.source, a.dest) == link
        });
        !ahead_competes
            && st.sending.get(&req.source).copied().unwrap_or(0) < req.source_limit
            && st.receiving.get(&req.dest).copied().unwrap_or(0) < req.dest_limit
            && st.on_link.get(&link).copied().unwrap_or(0) < req.link_limit
    }

    fn counts(st: &State, req: &SlotRequest) -> (SlotCounts, SlotCounts) {
        let on_link = st
            .on_link
            .get(&pair(req.source, req.dest))
            .copied()
            .unwrap_or(0);
        let c = |h: Uuid, send_limit: usize, receive_limit: usize| SlotCounts {
            sending: st.sending.get(&h).copied().unwrap_or(0),
            send_limit,
            receiving: st.receiving.get(&h).copied().unwrap_or(0),
            receive_limit,
            on_link,
            link_limit: req.link_limit,
        };
        (
            c(req.source, req.source_limit, req.source_limit),
            c(req.dest, req.dest_limit, req.dest_limit),
        )
    }
}

/// A place in the queue; once [`Ticket::wait`] returns, the slots it holds. Dropping it
/// leaves the queue or frees the slots, and wakes the waiters.
pub struct Ticket {
    slots: Arc<MigrationSlots>,
    key: (MoveClass, u64),
    req: SlotRequest,
    held: bool,
}

impl Ticket {
    /// Waits until the migration may run, takes its slots, and returns the source's and the
    /// destination's counts with them taken.
    pub async fn wait(&mut self) -> (SlotCounts, SlotCounts) {
        loop {
            let notified = {
                let mut st = self.slots.lock();
                if MigrationSlots::may_take(&st, self.key, &self.req) {
                    st.waiting.remove(&self.key);
                    *st.sending.entry(self.req.source).or_default() += 1;
                    *st.receiving.entry(self.req.dest).or_default() += 1;
                    *st.on_link
                        .entry(pair(self.req.source, self.req.dest))
                        .or_default() += 1;
                    self.held = true;
                    let counts = MigrationSlots::counts(&st, &self.req);
                    drop(st);
                    // Those queued behind this ticket may now be first for other slots.
                    self.slots.changed.notify_waiters();
                    return counts;
                }
                // Registered before the lock drops, so a release in between is not missed.
                let mut n = Box::pin(self.slots.changed.notified());
                n.as_mut().enable();
                n
            };
            notified.await;
        }
    }

    /// Held while a slot event is written, with the counts read under it: events of takes and
    /// frees are then logged one at a time, each with the counts as they stand when it is
    /// written. Without it two migrations taking slots at once could log their takes in the
    /// other order, the second logged showing fewer than the log already held.
    pub async fn record_order(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.slots.record.lock().await
    }

    /// The counts the two hosts have now, this ticket's slots included (`None` while it
    /// holds none).
    pub fn counts_now(&self) -> Option<(SlotCounts, SlotCounts)> {
        if !self.held {
            return None;
        }
        Some(MigrationSlots::counts(&self.slots.lock(), &self.req))
    }

    /// The counts the two hosts will have once this ticket's slots are freed (`None` while
    /// it holds none): recorded before [`Ticket::release`], so that in the event log a slot
    /// is never shown free before it is.
    pub fn counts_after_release(&self) -> Option<(SlotCounts, SlotCounts)> {
        if !self.held {
            return None;
        }
        let st = self.slots.lock();
        let (mut src, mut dst) = MigrationSlots::counts(&st, &self.req);
        src.sending = src.sending.saturating_sub(1);
        dst.receiving = dst.receiving.saturating_sub(1);
        src.on_link = src.on_link.saturating_sub(1);
        dst.on_link = dst.on_link.saturating_sub(1);
        Some((src, dst))
    }

    /// Frees the slots (or leaves the queue) now; returns the counts after.
    pub fn release(mut self) -> Option<(SlotCounts, SlotCounts)> {
        self.free()
    }

    fn free(&mut self) -> Option<(SlotCounts, SlotCounts)> {
        let mut st = self.slots.lock();
        let counts = if self.held {
            self.held = false;
            let st = &mut *st;
            for (map, h) in [
                (&mut st.sending, self.req.source),
                (&mut st.receiving, self.req.dest),
            ] {
                if let Some(n) = map.get_mut(&h) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        map.remove(&h);
                    }
                }
            }
            let link = pair(self.req.source, self.req.dest);
            if let Some(n) = st.on_link.get_mut(&link) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.on_link.remove(&link);
                }
            }
            Some(MigrationSlots::counts(st, &self.req))
        } else {
            st.waiting.remove(&self.key);
            None
        };
        drop(st);
        self.slots.changed.notify_waiters();
        counts
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.free();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(source: Uuid, dest: Uuid, limit: usize, class: MoveClass) -> SlotRequest {
        SlotRequest {
            source,
            source_limit: limit,
            dest,
            dest_limit: limit,
            link_limit: usize::MAX,
            class,
        }
    }

    #[test]
    fn a_link_carries_a_migration_per_250_mbit() {
        assert_eq!(link_limit(None), usize::MAX);
        assert_eq!(link_limit(Some(f64::NAN)), usize::MAX);
        assert_eq!(link_limit(Some(90.0)), 1);
        assert_eq!(link_limit(Some(600.0)), 2);
        assert_eq!(link_limit(Some(1_000.0)), 4);
        assert_eq!(link_limit(Some(40_000.0)), 8);
    }

    /// A slow link between fast hosts carries one migration at a time, in either direction,
    /// while the same hosts go on migrating over their other links.
    #[tokio::test]
    async fn a_slow_link_carries_no_more_than_its_budget() {
        let s = Arc::new(MigrationSlots::default());
        let (h1, h2, h3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let slow = |source, dest| SlotRequest {
            link_limit: link_limit(Some(200.0)),
            ..req(source, dest, 4, MoveClass::Mandatory)
        };
        let mut a = s.ticket(slow(h1, h2));
        let mut back = s.ticket(slow(h2, h1));
        let mut other = s.ticket(req(h1, h3, 4, MoveClass::Mandatory));
        let (src, _) = a.wait().await;
        assert_eq!((src.on_link, src.link_limit), (1, 1));
        assert!(!taken(&mut back).await, "the slow link carried two at once");
        assert!(
            taken(&mut other).await,
            "h1's other link waited on the slow one"
        );
        drop(a);
        assert!(taken(&mut back).await);
    }

    #[test]
    fn a_link_is_remembered_per_pair_both_ways_until_too_old() {
        let slots = MigrationSlots::default();
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(slots.pair_link(a, b, Duration::from_secs(600)), None);
        slots.measured(a, b, 950.0);
        let (mbit, age) = slots
            .pair_link(b, a, Duration::from_secs(600))
            .expect("remembered both ways");
        assert_eq!(mbit, 950.0);
        assert!(age < Duration::from_secs(600));
        assert_eq!(slots.pair_link(a, c, Duration::from_secs(600)), None);
        // Too old (any age beats zero).
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(slots.pair_link(a, b, Duration::ZERO), None);
        // A newer measurement replaces the older, even a slower one.
        slots.measured(b, a, 90.0);
        assert_eq!(
            slots.pair_link(a, b, Duration::from_secs(600)).map(|l| l.0),
            Some(90.0)
        );
        // A failed measurement changes nothing.
        slots.measured(a, b, f64::NAN);
        assert_eq!(
            slots.pair_link(a, b, Duration::from_secs(600)).map(|l| l.0),
            Some(90.0)
        );
    }

    async fn taken(t: &mut Ticket) -> bool {
        tokio::time::timeout(Duration::from_millis(50), t.wait())
            .await
            .is_ok()
    }

    #[test]
    fn limits_follow_the_link_and_the_cores() {
        assert_eq!(host_limit(None, 32), 2);
        assert_eq!(host_limit(Some(500.0), 32), 2);
        assert_eq!(host_limit(Some(1_000.0), 32), 4);
        assert_eq!(host_limit(Some(25_000.0), 32), 8);
        assert_eq!(host_limit(Some(25_000.0), 4), 4);
        assert_eq!(host_limit(Some(25_000.0), 1), 2);
    }

    #[tokio::test]
    async fn a_host_sends_no_more_than_its_limit() {
        let s = Arc::new(MigrationSlots::default());
        let (h1, h2, h3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut a = s.ticket(req(h1, h2, 2, MoveClass::Mandatory));
        let mut b = s.ticket(req(h1, h3, 2, MoveClass::Mandatory));
        let mut c = s.ticket(req(h1, h2, 2, MoveClass::Mandatory));
        let (src, dst) = a.wait().await;
        assert_eq!((src.sending, dst.receiving), (1, 1));
        assert!(taken(&mut b).await);
        assert!(!taken(&mut c).await, "a third migration left h1");
        let after = a.release().expect("held");
        assert_eq!(after.0.sending, 1);
        assert!(taken(&mut c).await);
    }

    #[tokio::test]
    async fn mandatory_moves_go_first_and_queues_do_not_block_other_hosts() {
        let s = Arc::new(MigrationSlots::default());
        let (h1, h2, h3, h4) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let mut first = s.ticket(req(h1, h2, 1, MoveClass::Optional));
        assert!(taken(&mut first).await);
        let mut optional = s.ticket(req(h1, h2, 1, MoveClass::Optional));
        let mut mandatory = s.ticket(req(h1, h3, 1, MoveClass::Mandatory));
        // Elsewhere: not held up by h1's queue.
        let mut elsewhere = s.ticket(req(h3, h4, 1, MoveClass::Optional));
        assert!(taken(&mut elsewhere).await);
        assert!(!taken(&mut optional).await);
        drop(first);
        assert!(
            !taken(&mut optional).await,
            "the optional move overtook the mandatory one"
        );
        assert!(taken(&mut mandatory).await);
        drop(mandatory);
        assert!(taken(&mut optional).await);
    }

    #[tokio::test]
    async fn a_dropped_ticket_leaves_the_queue() {
        let s = Arc::new(MigrationSlots::default());
        let (h1, h2) = (Uuid::new_v4(), Uuid::new_v4());
        let mut a = s.ticket(req(h1, h2, 1, MoveClass::Mandatory));
        let waiting = s.ticket(req(h1, h2, 1, MoveClass::Mandatory));
        let mut c = s.ticket(req(h1, h2, 1, MoveClass::Mandatory));
        assert!(taken(&mut a).await);
        drop(waiting); // cancelled while queued
        drop(a);
        assert!(taken(&mut c).await);
    }
}
