//! Retry decisions for one route: which responses and methods may be retried, how long to
//! wait between attempts, and the retry budget that keeps retries from multiplying load on
//! a failing backend. Transport-free; the HTTP plumbing asks and acts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::Method;
use weft_api::destination as proto;

/// A non-idempotent request is retried only when its body was buffered whole and is at most this big.
pub const MAX_REPLAY_BODY_BYTES: usize = 64 * 1024;

pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
pub const DEFAULT_BUDGET_WINDOW_SECS: u32 = 10;
// Bounds the per-route bucket array a control plane can make us allocate.
const MAX_BUDGET_WINDOW_SECS: u32 = 300;
// Exponential backoff stops growing here (unless the configured base is already longer).
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);

/// A route's retry policy, built once per discovery update.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts including the first; 1 means never retried.
    pub max_attempts: u32,
    codes: StatusSet,
    /// Minimum wait before the first retry; later retries wait exponentially longer.
    pub backoff: Duration,
    /// Whether non-idempotent methods (POST, PATCH, ...) may be retried when their body was buffered.
    pub non_idempotent: bool,
    /// Shared by every request on the route, so it must survive policy updates to mean anything.
    pub budget: Arc<RetryBudget>,
}

impl RetryPolicy {
    pub fn from_proto(policy: &proto::RetryPolicy) -> RetryPolicy {
        Self::from_proto_reusing(policy, None)
    }

    /// Like `from_proto`, but keeps `previous`'s budget (and its accounting) when the budget
    /// parameters did not change, so a discovery update does not hand out a fresh allowance.
    pub fn from_proto_reusing(
        policy: &proto::RetryPolicy,
        previous: Option<&RetryPolicy>,
    ) -> RetryPolicy {
        let mut codes = StatusSet::default();
        for &code in &policy.codes {
            if !codes.insert(code) {
                tracing::warn!(code, "ignoring retry status code outside 100..=599");
            }
        }
        let fresh = RetryBudget::from_proto(policy.budget.as_ref());
        let budget = match previous {
            Some(prev) if prev.budget.same_parameters(&fresh) => prev.budget.clone(),
            _ => Arc::new(fresh),
        };
        RetryPolicy {
            // 0 comes from an unset proto field; the first attempt always happens.
            max_attempts: policy.max_attempts.max(1),
            codes,
            backoff: Duration::from_millis(u64::from(policy.backoff_ms)),
            non_idempotent: policy.non_idempotent,
            budget,
        }
    }

    /// Whether a response with this status is worth another attempt (connection failures
    /// always are; the caller decides those without asking).
    pub fn should_retry_status(&self, status: u16) -> bool {
        self.codes.contains(status)
    }

    /// Whether a request with this method may be sent again.
    ///
    /// `body_replayable` must be true when the request can be re-sent byte for byte: it had
    /// no body, or its body was buffered whole (at most [`MAX_REPLAY_BODY_BYTES`]). A streamed
    /// body that was already consumed cannot be replayed whatever the method, so it is
    /// required for idempotent methods too.
    pub fn is_retryable_method(&self, method: &Method, body_replayable: bool) -> bool {
        if !body_replayable || method == Method::CONNECT {
            return false;
        }
        is_idempotent(method) || self.non_idempotent
    }

    /// Wait before retry number `retry` (1 = the first retry), with random jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        self.backoff_with(retry, rand::random::<u32>())
    }

    /// `backoff` with the jitter supplied: the wait is the configured backoff doubled per
    /// retry (capped), plus up to half of that again chosen by `jitter`. Never less than
    /// the configured backoff, which Gateway API defines as a minimum.
    pub fn backoff_with(&self, retry: u32, jitter: u32) -> Duration {
        if self.backoff.is_zero() {
            return Duration::ZERO;
        }
        let doublings = retry.saturating_sub(1).min(16);
        let cap = MAX_RETRY_BACKOFF.max(self.backoff);
        let base = self.backoff.saturating_mul(1 << doublings).min(cap);
        let extra_nanos = base.as_nanos() * u128::from(jitter) / (u128::from(u32::MAX) * 2).max(1);
        base + Duration::from_nanos(u64::try_from(extra_nanos).unwrap_or(u64::MAX))
    }
}

fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(method)
}

/// Status codes 100..=599 as a bitset: one lookup per response, no allocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StatusSet([u64; 8]);

impl StatusSet {
    fn insert(&mut self, code: u32) -> bool {
        if !(100..=599).contains(&code) {
            return false;
        }
        let bit = (code - 100) as usize;
        self.0[bit / 64] |= 1 << (bit % 64);
        true
    }

    fn contains(&self, code: u16) -> bool {
        if !(100..=599).contains(&code) {
            return false;
        }
        let bit = usize::from(code - 100);
        self.0[bit / 64] & (1 << (bit % 64)) != 0
    }
}

/// Limits retries to `ratio` of the requests seen over a sliding window, plus a floor of
/// `min_retries_per_second * window_secs` so low-traffic routes can still retry.
///
/// One bucket per second of the window, each a single `AtomicU64` packing the second it
/// counts for with its request and retry counts, so a bucket rolls over to a new second
/// and counts in one compare-and-swap: no lock, no lost reset. Concurrent `try_withdraw`
/// calls may each see the same remaining allowance and overshoot it by at most the number
/// of racing threads; for a load-shedding heuristic that is fine.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_retries_per_second: u32,
    window_secs: u32,
    buckets: Box<[AtomicU64]>,
}

// Bucket layout: second (24 bits, wraps every ~194 days) | requests (20) | retries (20).
// Counts saturate at ~1M per second per route, far beyond one sidecar's load.
const SECOND_BITS: u32 = 24;
const COUNT_BITS: u32 = 20;
const SECOND_MASK: u64 = (1 << SECOND_BITS) - 1;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;

fn pack(second: u64, requests: u64, retries: u64) -> u64 {
    ((second & SECOND_MASK) << (2 * COUNT_BITS)) | (requests << COUNT_BITS) | retries
}

fn unpack(bucket: u64) -> (u64, u64, u64) {
    (
        bucket >> (2 * COUNT_BITS),
        (bucket >> COUNT_BITS) & COUNT_MAX,
        bucket & COUNT_MAX,
    )
}

impl RetryBudget {
    /// Zero, negative or non-finite parameters take the defaults (0.2, 10/s, 10 s), which
    /// is how proto3 reports "unset".
    pub fn new(ratio: f64, min_retries_per_second: u32, window_secs: u32) -> RetryBudget {
        let ratio = if ratio.is_finite() && ratio > 0.0 {
            ratio
        } else {
            DEFAULT_BUDGET_RATIO
        };
        let min_retries_per_second = if min_retries_per_second == 0 {
            DEFAULT_MIN_RETRIES_PER_SECOND
        } else {
            min_retries_per_second
        };
        let window_secs = if window_secs == 0 {
            DEFAULT_BUDGET_WINDOW_SECS
        } else {
            window_secs.min(MAX_BUDGET_WINDOW_SECS)
        };
        RetryBudget {
            ratio,
            min_retries_per_second,
            window_secs,
            buckets: (0..window_secs).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn from_proto(budget: Option<&proto::RetryBudget>) -> RetryBudget {
        match budget {
            Some(b) => Self::new(b.ratio, b.min_retries_per_second, b.window_secs),
            None => Self::new(0.0, 0, 0),
        }
    }

    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    pub fn min_retries_per_second(&self) -> u32 {
        self.min_retries_per_second
    }

    pub fn window_secs(&self) -> u32 {
        self.window_secs
    }

    fn same_parameters(&self, other: &RetryBudget) -> bool {
        self.ratio == other.ratio
            && self.min_retries_per_second == other.min_retries_per_second
            && self.window_secs == other.window_secs
    }

    /// Records one original request (not a retry).
    pub fn deposit(&self) {
        self.deposit_at(now_secs());
    }

    /// Takes permission for one retry; false means the budget is spent and the caller
    /// returns the failure it has.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(now_secs())
    }

    /// `deposit` at an explicit monotonic second (for deterministic tests and simulations).
    pub fn deposit_at(&self, now_secs: u64) {
        self.add_at(now_secs, 1, 0);
    }

    /// `try_withdraw` at an explicit monotonic second.
    pub fn try_withdraw_at(&self, now_secs: u64) -> bool {
        let (requests, retries) = self.totals_at(now_secs);
        let floor = u64::from(self.min_retries_per_second) * u64::from(self.window_secs);
        let allowed = self.ratio * requests as f64 + floor as f64;
        if (retries as f64) < allowed {
            self.add_at(now_secs, 0, 1);
            true
        } else {
            false
        }
    }

    fn bucket(&self, second: u64) -> &AtomicU64 {
        &self.buckets[(second % u64::from(self.window_secs)) as usize]
    }

    fn add_at(&self, now_secs: u64, requests: u64, retries: u64) {
        let slot = self.bucket(now_secs);
        let second = now_secs & SECOND_MASK;
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let (slot_second, slot_requests, slot_retries) = unpack(current);
            let ahead = slot_second.wrapping_sub(second) & SECOND_MASK;
            if ahead != 0 && ahead < (1 << (SECOND_BITS - 1)) {
                // A thread that read the clock earlier lost a race with the slot's next
                // second: its second has left the window, so its count no longer matters.
                return;
            }
            let (base_requests, base_retries) = if slot_second == second {
                (slot_requests, slot_retries)
            } else {
                (0, 0)
            };
            let next = pack(
                second,
                (base_requests + requests).min(COUNT_MAX),
                (base_retries + retries).min(COUNT_MAX),
            );
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// (requests, retries) over the window ending at `now_secs`.
    fn totals_at(&self, now_secs: u64) -> (u64, u64) {
        let first = now_secs.saturating_sub(u64::from(self.window_secs) - 1);
        let (mut requests, mut retries) = (0, 0);
        for second in first..=now_secs {
            let (slot_second, slot_requests, slot_retries) =
                unpack(self.bucket(second).load(Ordering::Relaxed));
            if slot_second == second & SECOND_MASK {
                requests += slot_requests;
                retries += slot_retries;
            }
        }
        (requests, retries)
    }
}

fn now_secs() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(codes: &[u32], non_idempotent: bool) -> RetryPolicy {
        RetryPolicy::from_proto(&proto::RetryPolicy {
            max_attempts: 3,
            codes: codes.to_vec(),
            backoff_ms: 25,
            non_idempotent,
            budget: None,
        })
    }

    #[test]
    fn status_codes_form_an_exact_set() {
        let p = policy(&[500, 502, 503, 504, 100, 599, 600, 42], false);
        for code in [500, 502, 503, 504, 100, 599] {
            assert!(p.should_retry_status(code), "{code}");
        }
        for code in [200, 404, 501, 505, 99, 600, 0, u16::MAX] {
            assert!(!p.should_retry_status(code), "{code}");
        }
    }

    #[test]
    fn defaults_apply_to_unset_fields() {
        let p = RetryPolicy::from_proto(&proto::RetryPolicy::default());
        assert_eq!(p.max_attempts, 1);
        assert_eq!(p.budget.ratio(), 0.2);
        assert_eq!(p.budget.min_retries_per_second(), 10);
        assert_eq!(p.budget.window_secs(), 10);
        let custom = RetryBudget::from_proto(Some(&proto::RetryBudget {
            ratio: 0.5,
            min_retries_per_second: 0,
            window_secs: 100_000,
        }));
        assert_eq!(custom.ratio(), 0.5);
        assert_eq!(custom.min_retries_per_second(), 10);
        assert_eq!(custom.window_secs(), MAX_BUDGET_WINDOW_SECS);
        assert_eq!(RetryBudget::new(f64::NAN, 3, 5).ratio(), 0.2);
    }

    #[test]
    fn only_idempotent_methods_unless_opted_in_and_buffered() {
        let strict = policy(&[503], false);
        let opted_in = policy(&[503], true);
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
            Method::TRACE,
        ] {
            assert!(strict.is_retryable_method(&m, true), "{m}");
            assert!(
                !strict.is_retryable_method(&m, false),
                "{m} with a streamed body"
            );
        }
        let custom = Method::from_bytes(b"PURGE").unwrap();
        for m in [Method::POST, Method::PATCH, custom] {
            assert!(!strict.is_retryable_method(&m, true), "{m}");
            assert!(opted_in.is_retryable_method(&m, true), "{m}");
            assert!(!opted_in.is_retryable_method(&m, false), "{m} unbuffered");
        }
        assert!(!opted_in.is_retryable_method(&Method::CONNECT, true));
    }

    #[test]
    fn backoff_grows_with_bounded_jitter() {
        let p = policy(&[503], false);
        assert_eq!(p.backoff_with(1, 0), Duration::from_millis(25));
        assert_eq!(p.backoff_with(1, u32::MAX), Duration::from_micros(37_500));
        assert_eq!(p.backoff_with(2, 0), Duration::from_millis(50));
        assert_eq!(p.backoff_with(3, 0), Duration::from_millis(100));
        assert_eq!(p.backoff_with(30, 0), MAX_RETRY_BACKOFF);
        assert_eq!(p.backoff_with(30, u32::MAX), Duration::from_secs(15));
        for retry in 1..6 {
            let d = p.backoff(retry);
            let floor = p.backoff_with(retry, 0);
            assert!(d >= floor && d <= floor + floor / 2, "{d:?}");
        }
        let none = RetryPolicy::from_proto(&proto::RetryPolicy::default());
        assert_eq!(none.backoff(3), Duration::ZERO);
    }

    #[test]
    fn budget_caps_retries_against_a_failing_backend() {
        let budget = RetryBudget::new(0.2, 10, 10);
        // 1000 requests within one second, each failing and asking for up to 2 retries.
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit_at(1_000);
            for _ in 0..2 {
                if budget.try_withdraw_at(1_000) {
                    retries += 1;
                }
            }
        }
        // 20% of 1000 plus the 10/s * 10 s floor; the floor is granted early, so the cap is reached.
        assert_eq!(retries, 300);
    }

    #[test]
    fn budget_slides_with_the_window() {
        let budget = RetryBudget::new(0.2, 1, 10);
        // Steady 100 requests/s, all failing, 60 s: each 10 s window allows 200 + 10 retries.
        let mut granted_per_second = Vec::new();
        for second in 0..60u64 {
            let mut granted = 0;
            for _ in 0..100 {
                budget.deposit_at(second);
                if budget.try_withdraw_at(second) {
                    granted += 1;
                }
            }
            granted_per_second.push(granted);
        }
        for end in 9..60 {
            let window: u32 = granted_per_second[end - 9..=end].iter().sum();
            assert!(window <= 210, "window ending {end}: {window}");
        }
        // In the steady state the budget is used, not starved.
        let last: u32 = granted_per_second[50..60].iter().sum();
        assert!(last >= 190, "{last}");
        // After a quiet window, the allowance is back to the floor only.
        let after_quiet = (0..50).filter(|_| budget.try_withdraw_at(200)).count();
        assert_eq!(after_quiet, 10);
    }

    #[test]
    fn stale_writer_does_not_reset_a_newer_bucket() {
        let budget = RetryBudget::new(0.2, 1, 10);
        budget.deposit_at(15);
        // Second 5 shares the slot with 15 but is outside 15's window.
        budget.deposit_at(5);
        assert_eq!(budget.totals_at(15), (1, 0));
    }
}
