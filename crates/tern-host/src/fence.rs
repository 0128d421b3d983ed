//! Fencing of deposed HA leaders: the highest leader term any center call has carried (see
//! `tern_api::LEADER_TERM_HEADER`), kept in `STATE_DIR/leader-term` so a restarted agent
//! still refuses an old leader. A call with a lower term is refused; a call without one (a
//! single center, or a peer agent) is let through.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;

/// The highest term seen, and where it is kept.
#[derive(Debug)]
pub struct Fence {
    highest: Mutex<u64>,
    file: PathBuf,
}

impl Fence {
    /// Reads the term kept under `state_root` (0 when none was seen).
    pub fn open(state_root: &std::path::Path) -> anyhow::Result<Fence> {
        let file = state_root.join("leader-term");
        let highest = match std::fs::read_to_string(&file) {
            Ok(t) => t
                .trim()
                .parse::<u64>()
                .with_context(|| format!("{} holds no leader term (a number)", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        Ok(Fence {
            highest: Mutex::new(highest),
            file,
        })
    }

    /// The highest term seen.
    pub fn highest(&self) -> u64 {
        *self.highest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a call made under `term`: refused (with the highest term seen) when a later
    /// leader has called; a higher term is kept on disk before the call goes on.
    pub fn admit(&self, term: u64) -> Result<(), String> {
        let mut highest = self.highest.lock().unwrap_or_else(|p| p.into_inner());
        if term < *highest {
            return Err(format!(
                "refused: this call comes from a center whose leadership ended (term {term}; \
                 a center with term {} leads since)",
                *highest
            ));
        }
        if term > *highest {
            let tmp = self.file.with_extension("tmp");
            std::fs::write(&tmp, format!("{term}\n"))
                .and_then(|_| std::fs::rename(&tmp, &self.file))
                .map_err(|e| format!("keeping the leader term in {}: {e}", self.file.display()))?;
            tracing::info!(term, "a new center leads");
            *highest = term;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_term_is_refused_and_the_highest_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fence::open(dir.path()).unwrap();
        assert_eq!(f.highest(), 0);
        f.admit(7).unwrap();
        f.admit(7).unwrap();
        let e = f.admit(5).unwrap_err();
        assert!(e.contains("term 5") && e.contains("term 7"), "{e}");
        let again = Fence::open(dir.path()).unwrap();
        assert_eq!(again.highest(), 7);
        assert!(again.admit(6).is_err());
        again.admit(9).unwrap();
        assert_eq!(Fence::open(dir.path()).unwrap().highest(), 9);
    }

    #[test]
    fn a_damaged_term_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("leader-term"), "seven").unwrap();
        assert!(Fence::open(dir.path()).is_err());
    }
}
