//! Removing a lab: its processes (recorded, and whatever runs in its namespaces), its
//! namespaces (their links go with them) and its directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

use super::state::LabState;
use super::{absolute, net, plan, procs, require_root, say};

/// What a teardown removed.
#[derive(Debug, Default, Serialize)]
pub struct Removed {
    pub processes: Vec<u32>,
    pub namespaces: Vec<String>,
    pub dir: Option<PathBuf>,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty() && self.namespaces.is_empty() && self.dir.is_none()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} processes, {} namespaces{}",
            self.processes.len(),
            self.namespaces.len(),
            self.dir
                .as_ref()
                .map(|d| format!(", {}", d.display()))
                .unwrap_or_default()
        )
    }
}

/// Removes the lab in `dir` and every namespace of `prefixes` (plus the recorded lab's
/// prefix): processes (the recorded ones and everything inside the namespaces, QEMU
/// included), namespaces (their links go with them), then the directory. Idempotent.
pub fn teardown(dir: &Path, prefixes: &[String]) -> anyhow::Result<Removed> {
    require_root()?;
    let dir = absolute(dir)?;
    let state = match LabState::load(&dir) {
        Ok(s) => s,
        Err(e) => {
            say(&format!("ignoring unreadable lab record: {e:#}"));
            None
        }
    };
    let mut prefixes = prefixes.to_vec();
    if let Some(s) = &state {
        prefixes.push(s.prefix.clone());
    }
    let existing = net::list_namespaces()?;
    let namespaces: Vec<String> = existing
        .into_iter()
        .filter(|ns| {
            state.as_ref().is_some_and(|s| s.namespaces.contains(ns))
                || prefixes.iter().any(|p| plan::namespace_belongs(p, ns))
        })
        .collect();

    let me = std::process::id();
    let mut killed = Vec::new();
    // Recorded pids count only while their command line still names the lab's directory (as
    // recorded: the same path the daemons were given), so a reused pid is never killed.
    let mut recorded: Vec<u32> = state
        .iter()
        .flat_map(|s| {
            s.processes()
                .filter_map(|p| p.pid)
                .map(move |pid| (pid, &s.dir))
        })
        .filter(|(pid, lab_dir)| procs::is_ours(*pid, lab_dir))
        .map(|(pid, _)| pid)
        .collect();
    // A dying agent may still start a QEMU: go round until the namespaces are empty.
    for round in 0..5 {
        let mut pids = std::mem::take(&mut recorded);
        for ns in &namespaces {
            pids.extend(net::namespace_pids(ns).unwrap_or_default());
        }
        pids.retain(|p| *p != me && procs::alive(*p));
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() {
            break;
        }
        if round == 4 {
            bail!("processes keep appearing in the lab's namespaces: {pids:?}");
        }
        procs::terminate(&pids, Duration::from_secs(3))?;
        killed.extend(pids);
    }
    for ns in &namespaces {
        net::ip(&["netns", "del", ns])?;
    }
    // The agents' VM cgroups (empty once their QEMUs are gone).
    for p in &prefixes {
        let parent = format!("{}/{p}", super::daemons::LAB_CGROUP);
        if let Err(e) = tern_host::cgroups::remove_tree(&parent) {
            say(&format!("cannot remove the lab's cgroups {parent}: {e:#}"));
        }
    }
    // Block LUNs: the by-id links and loop devices (their QEMUs are gone).
    super::block::remove(&dir, &prefixes);
    let dir_removed = remove_lab_dir(&dir)?;
    Ok(Removed {
        processes: killed,
        namespaces,
        dir: dir_removed.then_some(dir),
    })
}

/// Removes `dir` if it is a lab's (holds lab.json) or empty; refuses anything else.
fn remove_lab_dir(dir: &Path) -> anyhow::Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    let is_lab = LabState::path(dir).exists();
    let empty = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .next()
        .is_none();
    if !is_lab && !empty {
        bail!(
            "{} is not a lab directory (no lab.json) and not empty: not removing it; \
             choose another --dir",
            dir.display()
        );
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(true)
}
