//! Retrying: the one place the center's retry policy is written. Work that must happen
//! (a commit after post-copy, bringing hosts in line with a migration's record) is a step
//! that may fail, run again by [`Retry::run`] until it succeeds or its attempts run out.

use std::future::Future;
use std::time::Duration;

/// How a failing step is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Wait between a failure and the next attempt.
    pub every: Duration,
    /// Attempts in all (`None`: until the step succeeds).
    pub attempts: Option<u32>,
}

impl Retry {
    /// At most `attempts` attempts, `every` apart.
    pub const fn times(attempts: u32, every: Duration) -> Retry {
        Retry {
            every,
            attempts: Some(attempts),
        }
    }

    /// Until the step succeeds, `every` apart: for work whose only obstacle is a peer's or
    /// the store's trouble, and that must not be given up.
    pub const fn forever(every: Duration) -> Retry {
        Retry {
            every,
            attempts: None,
        }
    }

    /// Runs `step(failures_so_far)` until it succeeds or the attempts run out; the last
    /// error then. The step learns how many attempts failed before it, to say so once (or
    /// every few attempts) rather than on every one.
    pub async fn run<T, E, F, Fut>(&self, mut step: F) -> Result<T, E>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut failures = 0u32;
        loop {
            match step(failures).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if self.attempts.is_some_and(|n| failures >= n) {
                        return Err(e);
                    }
                    tokio::time::sleep(self.every).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test(start_paused = true)]
    async fn stops_at_the_first_success_and_tells_the_step_its_failures() {
        let seen = Cell::new(Vec::new());
        let r: Result<u32, String> = Retry::times(5, Duration::from_secs(2))
            .run(|failures| {
                let mut v = seen.take();
                v.push(failures);
                seen.set(v);
                async move {
                    if failures < 2 {
                        Err(format!("fail {failures}"))
                    } else {
                        Ok(failures)
                    }
                }
            })
            .await;
        assert_eq!(r, Ok(2));
        assert_eq!(seen.take(), vec![0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_its_attempts_with_the_last_error() {
        let calls = Cell::new(0);
        let started = tokio::time::Instant::now();
        let r: Result<(), String> = Retry::times(3, Duration::from_secs(2))
            .run(|failures| {
                calls.set(calls.get() + 1);
                async move { Err(format!("fail {failures}")) }
            })
            .await;
        assert_eq!(r, Err("fail 2".to_string()));
        assert_eq!(calls.get(), 3);
        // Two waits between three attempts, none after the last.
        assert_eq!(started.elapsed(), Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn forever_keeps_going_until_the_step_succeeds() {
        let r: Result<u32, ()> = Retry::forever(Duration::from_secs(2))
            .run(|failures| async move {
                if failures < 100 {
                    Err(())
                } else {
                    Ok(failures)
                }
            })
            .await;
        assert_eq!(r, Ok(100));
    }
}
