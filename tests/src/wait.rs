//! Polling helpers: wait for a condition with a deadline instead of sleeping a fixed time.

use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};

const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> Result<()> {
    wait_until(what, timeout, || Ok(condition()))
}

/// Polls `condition` until it returns `Ok(true)` or `timeout` passes; an `Err` from the
/// condition ends the wait at once (e.g. the process being waited on exited).
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout {
                what: what.to_string(),
                timeout,
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_once_the_condition_holds() {
        let mut calls = 0;
        wait_for("three calls", Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        })
        .unwrap();
        assert_eq!(calls, 3);
    }

    #[test]
    fn times_out_and_says_what_it_waited_for() {
        let start = Instant::now();
        let err = wait_for("never", Duration::from_millis(250), || false).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(250));
        assert!(err.to_string().contains("waiting for never"), "{err}");
    }

    #[test]
    fn stops_at_the_first_error() {
        let mut calls = 0;
        let err = wait_until("an error", Duration::from_secs(5), || {
            calls += 1;
            Err(HarnessError::invalid("thing", "broken"))
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(err.to_string().contains("broken"));
    }
}
