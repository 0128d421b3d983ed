//! The hand-over: the states of a migration's ownership record, which changes of state are
//! legal, and which way a migration that stopped part-way (a failed step, a restarted center)
//! must be settled.
//!
//! The record decides who owns the VM: the source until the record says `Committed`, the
//! destination from then on. The one fact the record cannot hold is whether the source's
//! migration already went post-copy (QEMU switches on its own, before the hand-over): its
//! memory is then no longer the whole truth, so the source can never resume, and the only way
//! left is forward even though nothing was committed yet.
//!
//! ```text
//!   Preparing ──▶ Switching ──▶ Committed ──▶ Done
//!       │  └──────────┼────────────▲
//!       ▼             ▼   (post-copy: forward from Preparing too)
//!   RolledBack ◀──────┘
//! ```

use serde::{Deserialize, Serialize};

/// Where a migration's hand-over stands: the ownership record the commit rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Intent recorded: the destination may be prepared, the source owns the VM.
    Preparing,
    /// The source was told to send its final state; the source still owns the VM.
    Switching,
    /// The destination owns the VM (the VM's host and generation change in the same
    /// transaction); the source must never run it again.
    Committed,
    /// Committed and both hosts cleaned up.
    Done,
    /// Not committed; the VM runs on the source, the destination is cleaned up.
    RolledBack,
}

/// One end of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl RecordState {
    pub const ALL: [RecordState; 5] = [
        RecordState::Preparing,
        RecordState::Switching,
        RecordState::Committed,
        RecordState::Done,
        RecordState::RolledBack,
    ];

    /// Who owns the VM in this state.
    pub fn owner(self) -> Side {
        match self {
            RecordState::Committed | RecordState::Done => Side::Destination,
            _ => Side::Source,
        }
    }

    /// States recovery must finish (forward if committed, backward otherwise).
    pub fn unfinished(self) -> bool {
        !matches!(self, RecordState::Done | RecordState::RolledBack)
    }

    /// Is `self → next` a legal change of the record? Ownership moves once, forward only:
    /// nothing leaves `Committed` but `Done`, nothing leaves the two final states.
    pub fn may_become(self, next: RecordState) -> bool {
        use RecordState::*;
        matches!(
            (self, next),
            (Preparing, Switching)
                | (Preparing, Committed)
                | (Switching, Committed)
                | (Preparing, RolledBack)
                | (Switching, RolledBack)
                | (Committed, Done)
        )
    }

    /// The states from which `to` may be reached: the guard of a compare-and-set write.
    pub fn predecessors(to: RecordState) -> Vec<RecordState> {
        RecordState::ALL
            .into_iter()
            .filter(|from| from.may_become(to))
            .collect()
    }
}

/// What the source's agent says of its outgoing migration when one must be settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Its memory is whole: it runs, or is paused and can resume.
    Whole,
    /// The migration went post-copy: it cannot resume; the destination holds the device state
    /// and fetches the pages it lacks from it.
    PostCopy,
    /// It could not be asked (agent unreachable): nothing backward may be done yet.
    Unknown,
}

/// Which way a stopped migration goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Nothing left to do: the record is final.
    Settled,
    /// The source keeps (or gets back) the VM; the destination is removed.
    Back,
    /// The destination gets the VM; the source is removed.
    Forward,
    /// Not decidable now: ask the source again.
    Wait,
}

/// One step of settling, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Commit the record (ownership to the destination) — only where the source cannot resume.
    CommitRecord,
    /// Run the guest on the destination (idempotent).
    RunDestination,
    /// Quit the source QEMU and remove the VM from the source host.
    QuitSource,
    /// Cancel the source's migration and run the guest there again (idempotent).
    ResumeSource,
    /// Kill the destination QEMU and remove its files.
    RemoveDestination,
    /// Record the end: `Done` or `RolledBack`.
    Finish(RecordState),
}

/// How to settle a migration whose record reads `record`, the source being `source`.
///
/// Backward, the source is resumed before the destination is removed: a source that refuses
/// to resume (it went post-copy after all) then leaves the destination — which holds what it
/// no longer has — in place. Forward, the record is committed before the destination runs,
/// and the destination runs before the source is removed (the source serves the pages a
/// post-copy destination still lacks).
pub fn settle(record: RecordState, source: SourceState) -> (Way, Vec<Step>) {
    use Step::*;
    match (record, source) {
        (RecordState::Done | RecordState::RolledBack, _) => (Way::Settled, Vec::new()),
        (RecordState::Committed, _) => (
            Way::Forward,
            vec![RunDestination, QuitSource, Finish(RecordState::Done)],
        ),
        (_, SourceState::PostCopy) => (
            Way::Forward,
            vec![
                CommitRecord,
                RunDestination,
                QuitSource,
                Finish(RecordState::Done),
            ],
        ),
        (_, SourceState::Unknown) => (Way::Wait, Vec::new()),
        (_, SourceState::Whole) => (
            Way::Back,
            vec![
                ResumeSource,
                RemoveDestination,
                Finish(RecordState::RolledBack),
            ],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn transitions_are_forward_only_and_ownership_moves_once() {
        for from in RecordState::ALL {
            for to in RecordState::ALL {
                if !from.may_become(to) {
                    continue;
                }
                assert!(from.unfinished(), "{from:?} is final but may become {to:?}");
                // The owner changes at most once, from source to destination.
                assert!(
                    !(from.owner() == Side::Destination && to.owner() == Side::Source),
                    "{from:?} → {to:?} gives the VM back to the source"
                );
            }
        }
        assert_eq!(
            RecordState::predecessors(RecordState::RolledBack),
            vec![RecordState::Preparing, RecordState::Switching]
        );
        assert_eq!(
            RecordState::predecessors(RecordState::Done),
            vec![RecordState::Committed]
        );
        assert!(!RecordState::Committed.may_become(RecordState::RolledBack));
    }

    #[test]
    fn the_record_serializes_as_the_store_writes_it() {
        let text: Vec<String> = RecordState::ALL
            .iter()
            .map(|s| serde_json::to_string(s).expect("serialize"))
            .collect();
        assert_eq!(
            text,
            [
                "\"preparing\"",
                "\"switching\"",
                "\"committed\"",
                "\"done\"",
                "\"rolled_back\""
            ]
        );
    }

    // ---- a model of the two hosts, driven through every fault point ----

    /// The source QEMU.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Src {
        Running,
        /// Paused at pre-switchover or after its final copy: memory whole, can resume.
        PausedWhole,
        /// Went post-copy: cannot resume; serves the destination's missing pages.
        PostCopy,
        Gone,
    }

    /// The destination QEMU.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Dst {
        Absent,
        /// Paused, loading or holding the migrated state.
        Incoming,
        Running,
    }

    #[derive(Debug, Clone)]
    struct World {
        record: RecordState,
        src: Src,
        dst: Dst,
        /// The destination has run the guest at some point.
        dst_ran: bool,
        /// The destination holds the device state sent at a post-copy switch.
        dst_has_postcopy_state: bool,
    }

    impl World {
        fn new() -> World {
            World {
                record: RecordState::Preparing,
                src: Src::Running,
                dst: Dst::Absent,
                dst_ran: false,
                dst_has_postcopy_state: false,
            }
        }

        fn set_record(&mut self, to: RecordState) {
            assert!(
                self.record.may_become(to),
                "illegal record change {:?} → {to:?} in {self:?}",
                self.record
            );
            self.record = to;
        }

        /// Never two runners; never no way to run the guest.
        fn check(&self, when: &str) {
            let runners =
                usize::from(self.src == Src::Running) + usize::from(self.dst == Dst::Running);
            assert!(runners <= 1, "{when}: two runners: {self:?}");
            let source_can_run = matches!(self.src, Src::Running | Src::PausedWhole);
            let destination_can_run = match self.dst {
                Dst::Running => true,
                // A post-copy destination needs its source to serve the missing pages.
                Dst::Incoming if self.dst_has_postcopy_state => self.src == Src::PostCopy,
                // Whole only once the paused source has sent its final state.
                Dst::Incoming => self.src == Src::PausedWhole,
                Dst::Absent => false,
            };
            assert!(
                source_can_run || destination_can_run,
                "{when}: the VM is lost: {self:?}"
            );
        }
    }

    /// The driver's happy path, one event at a time (`postcopy`: QEMU switches to post-copy
    /// during pre-copy, before the record says Switching).
    fn driver_steps(postcopy: bool) -> Vec<fn(&mut World)> {
        let mut steps: Vec<fn(&mut World)> = vec![|w| w.dst = Dst::Incoming];
        if postcopy {
            // QEMU switches on its own during pre-copy; the center learns it at the switchover.
            steps.push(|w| {
                w.src = Src::PostCopy;
                w.dst_has_postcopy_state = true;
            });
            steps.push(|w| w.set_record(RecordState::Switching));
            steps.push(|w| w.set_record(RecordState::Committed));
        } else {
            steps.push(|w| w.set_record(RecordState::Switching));
            steps.push(|w| w.src = Src::PausedWhole);
            steps.push(|w| w.set_record(RecordState::Committed));
        }
        steps.push(|w| {
            w.dst = Dst::Running;
            w.dst_ran = true;
        });
        steps.push(|w| w.src = Src::Gone);
        steps.push(|w| w.set_record(RecordState::Done));
        steps
    }

    /// What the source agent reports.
    fn report(w: &World) -> SourceState {
        match w.src {
            Src::PostCopy => SourceState::PostCopy,
            _ => SourceState::Whole,
        }
    }

    /// Carries out one settling step as the agents would; `Err` = the agent refused.
    fn apply(w: &mut World, step: Step) -> Result<(), String> {
        match step {
            Step::CommitRecord => w.set_record(RecordState::Committed),
            Step::RunDestination => {
                assert_eq!(
                    w.record.owner(),
                    Side::Destination,
                    "ran an uncommitted destination: {w:?}"
                );
                match w.dst {
                    Dst::Running => {}
                    Dst::Incoming => {
                        w.dst = Dst::Running;
                        w.dst_ran = true;
                    }
                    Dst::Absent => return Err("no destination to run".into()),
                }
            }
            Step::QuitSource => {
                assert_eq!(w.record.owner(), Side::Destination, "{w:?}");
                w.src = Src::Gone;
            }
            Step::ResumeSource => {
                assert!(
                    !w.dst_ran,
                    "resumed the source after the destination ran: {w:?}"
                );
                match w.src {
                    Src::Running => {}
                    Src::PausedWhole => w.src = Src::Running,
                    Src::PostCopy => return Err("post-copy: cannot resume".into()),
                    Src::Gone => return Err("no source".into()),
                }
            }
            Step::RemoveDestination => {
                if w.dst == Dst::Running {
                    return Err("the destination runs the guest".into());
                }
                w.dst = Dst::Absent;
            }
            Step::Finish(to) => w.set_record(to),
        }
        Ok(())
    }

    /// Settles `w` the way the center's convergence does: plan from the record and the
    /// source's report, carry the steps out, and on a refusal plan again. `commit_failures`
    /// store failures hit the first commits.
    /// `late_postcopy`: a source still in pre-copy goes post-copy right after it was asked
    /// (its agent's watcher decides on its own), so the plan was made on a stale report.
    fn settle_world(w: &mut World, mut commit_failures: u32, mut late_postcopy: bool) {
        for _round in 0..64 {
            let (way, steps) = settle(w.record, report(w));
            if way == Way::Settled {
                return;
            }
            if late_postcopy && w.src == Src::Running && w.dst == Dst::Incoming {
                late_postcopy = false;
                w.src = Src::PostCopy;
                w.dst_has_postcopy_state = true;
            }
            let mut refused = false;
            for step in steps {
                if step == Step::CommitRecord && commit_failures > 0 {
                    commit_failures -= 1;
                    refused = true;
                    break;
                }
                if apply(w, step).is_err() {
                    refused = true;
                    break;
                }
                w.check(&format!("after {step:?}"));
            }
            if !refused {
                let (way, _) = settle(w.record, report(w));
                assert_eq!(way, Way::Settled, "{w:?}");
                return;
            }
        }
        panic!("never settled: {w:?}");
    }

    #[test]
    fn every_stop_point_settles_to_exactly_one_copy() {
        for postcopy in [false, true] {
            let steps = driver_steps(postcopy);
            for stop_after in 0..=steps.len() {
                for (commit_failures, late_postcopy) in
                    [(0, false), (1, false), (20, false), (0, true)]
                {
                    let mut w = World::new();
                    w.check("start");
                    for step in &steps[..stop_after] {
                        step(&mut w);
                        w.check("driver");
                    }
                    settle_world(&mut w, commit_failures, late_postcopy);
                    let case = format!(
                        "postcopy {postcopy}, stopped after {stop_after}, {commit_failures} \
                         commit failures, late post-copy {late_postcopy}: {w:?}"
                    );
                    w.check(&case);
                    let runners =
                        usize::from(w.src == Src::Running) + usize::from(w.dst == Dst::Running);
                    assert_eq!(runners, 1, "{case}");
                    match w.record.owner() {
                        Side::Source => {
                            assert_eq!(w.src, Src::Running, "{case}");
                            assert_eq!(w.dst, Dst::Absent, "{case}");
                        }
                        Side::Destination => {
                            assert_eq!(w.dst, Dst::Running, "{case}");
                            assert_eq!(w.src, Src::Gone, "{case}");
                        }
                    }
                    // After a post-copy switch the only way is forward.
                    if w.dst_has_postcopy_state {
                        assert_eq!(w.record, RecordState::Done, "{case}");
                    }
                }
            }
        }
    }

    /// What can go wrong while a stopped migration is settled.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fault {
        /// Nothing: the next step goes through.
        None,
        /// The agent refuses the step (nothing happens).
        Refused,
        /// The step is done but its answer is lost: the center sees an error.
        AnswerLost,
        /// The source's agent cannot be asked this round.
        SourceUnreachable,
        /// The store refuses the commit.
        CommitFails,
        /// A source still in pre-copy goes post-copy on its own right after it was asked.
        LatePostCopy,
        /// The center restarts: the plan in hand is dropped and made again.
        CenterRestart,
    }

    fn fault() -> impl Strategy<Value = Fault> {
        prop_oneof![
            4 => Just(Fault::None),
            2 => Just(Fault::Refused),
            2 => Just(Fault::AnswerLost),
            1 => Just(Fault::SourceUnreachable),
            1 => Just(Fault::CommitFails),
            1 => Just(Fault::LatePostCopy),
            1 => Just(Fault::CenterRestart),
        ]
    }

    /// Settles `w` as the center's convergence does, with `faults` hitting it in order (then
    /// none): plan from the record and the source's report, carry the steps out, plan again
    /// on any trouble. Checks the invariants after every step that changed the world.
    fn settle_with_faults(w: &mut World, faults: &[Fault]) {
        let mut faults = faults.iter().copied();
        let mut next = move || faults.next().unwrap_or(Fault::None);
        for _round in 0..400 {
            let report = match next() {
                Fault::SourceUnreachable => SourceState::Unknown,
                _ => report(w),
            };
            let (way, steps) = settle(w.record, report);
            if way == Way::Settled {
                return;
            }
            if next() == Fault::LatePostCopy
                && w.src == Src::Running
                && w.dst == Dst::Incoming
                && w.record.owner() == Side::Source
            {
                w.src = Src::PostCopy;
                w.dst_has_postcopy_state = true;
                w.check("late post-copy");
            }
            for step in steps {
                match next() {
                    Fault::Refused | Fault::CenterRestart => break,
                    Fault::CommitFails if step == Step::CommitRecord => break,
                    Fault::AnswerLost => {
                        let _ = apply(w, step);
                        w.check(&format!("after {step:?} (answer lost)"));
                        break;
                    }
                    _ => {
                        if apply(w, step).is_err() {
                            break;
                        }
                        w.check(&format!("after {step:?}"));
                    }
                }
            }
        }
        panic!("never settled: {w:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random fault sequences at random stop points: never two runners, never none, never
        /// a resume of the source after the destination may have run (asserted in `apply`),
        /// and in the end exactly one copy, on the side the record names.
        #[test]
        fn random_faults_always_settle_to_exactly_one_copy(
            postcopy in any::<bool>(),
            stop_at in 0usize..16,
            faults in proptest::collection::vec(fault(), 0..64),
        ) {
            let steps = driver_steps(postcopy);
            let stop_after = stop_at % (steps.len() + 1);
            let mut w = World::new();
            for step in &steps[..stop_after] {
                step(&mut w);
                w.check("driver");
            }
            settle_with_faults(&mut w, &faults);
            w.check("settled");
            let runners = usize::from(w.src == Src::Running) + usize::from(w.dst == Dst::Running);
            prop_assert_eq!(runners, 1, "{:?}", w);
            match w.record.owner() {
                Side::Source => {
                    prop_assert_eq!(w.src, Src::Running, "{:?}", w);
                    prop_assert_eq!(w.dst, Dst::Absent, "{:?}", w);
                    prop_assert_eq!(w.record, RecordState::RolledBack, "{:?}", w);
                }
                Side::Destination => {
                    prop_assert_eq!(w.dst, Dst::Running, "{:?}", w);
                    prop_assert_eq!(w.src, Src::Gone, "{:?}", w);
                    prop_assert_eq!(w.record, RecordState::Done, "{:?}", w);
                }
            }
            // After a post-copy switch the only way is forward.
            if w.dst_has_postcopy_state {
                prop_assert_eq!(w.record, RecordState::Done, "{:?}", w);
            }
        }
    }

    #[test]
    fn an_unreachable_source_defers_a_backward_settling() {
        for r in [RecordState::Preparing, RecordState::Switching] {
            assert_eq!(settle(r, SourceState::Unknown), (Way::Wait, Vec::new()));
        }
        // Committed needs nothing of the source to go forward.
        assert_eq!(
            settle(RecordState::Committed, SourceState::Unknown).0,
            Way::Forward
        );
    }
}
