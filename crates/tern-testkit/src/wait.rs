//! Waiting on a condition with a deadline: the only way tests wait.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(50);

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout` (blocking).
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Polls the async check `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls the plain check `f` from async code (sleeping without blocking the runtime) until it
/// returns `Some`, or panics with `what` after `timeout`.
pub async fn poll_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    wait_until(what, timeout, || std::future::ready(f())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_condition_holds() {
        let mut n = 0;
        let v = wait_for("n to reach 3", Duration::from_secs(5), || {
            n += 1;
            (n >= 3).then_some(n)
        });
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "timed out")]
    fn panics_when_the_condition_never_holds() {
        wait_for("never", Duration::from_millis(120), || None::<()>);
    }

    #[tokio::test]
    async fn async_checks_poll_too() {
        let mut n = 0;
        let v = poll_until("n to reach 2", Duration::from_secs(5), || {
            n += 1;
            (n >= 2).then_some(n)
        })
        .await;
        assert_eq!(v, 2);
    }
}
