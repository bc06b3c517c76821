//! Endpoint choice within one backend: power of two choices over peak-EWMA latency, with
//! failure accrual (consecutive failures back an endpoint off; one probe request is let
//! through when the backoff ends). Lock-free: every piece of per-endpoint state is an
//! atomic, shared by `Arc` so that a discovery update keeps what was learned about the
//! endpoints that remain.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::discovery::Endpoint;

/// How fast an old latency observation fades (time constant of the exponential decay).
const DECAY_TAU_NANOS: f64 = 10e9;
/// Cost of an endpoint nothing is known about yet: neither a magnet nor a pariah.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Keeps in-flight counts meaningful when latencies have decayed to (almost) zero.
const COST_FLOOR_NANOS: f64 = 1_000.0;
/// Consecutive failures after which an endpoint is backed off.
pub const FAILURES_BEFORE_BACKOFF: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How a request to an endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered; the latency is what the caller measured (e.g. to response headers).
    Success(Duration),
    /// Connection failure, reset, or a timeout: counts toward failure accrual.
    Failure,
}

/// The endpoints of one backend and what has been learned about each.
#[derive(Debug, Clone, Default)]
pub struct Balancer {
    endpoints: Vec<Arc<EndpointState>>,
}

#[derive(Debug)]
struct EndpointState {
    endpoint: Endpoint,
    /// Peak-EWMA latency estimate in nanoseconds, as `f64` bits.
    cost_bits: AtomicU64,
    /// When `cost_bits` was last written (nanoseconds since `epoch()`).
    cost_stamp: AtomicU64,
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Backoffs since the last success; each doubles the next one.
    backoff_level: AtomicU32,
    /// Nanoseconds since `epoch()` until which the endpoint gets no traffic; 0 = healthy.
    backoff_until: AtomicU64,
    /// Set while the one probe request after a backoff is in flight.
    probing: AtomicBool,
}

enum Health {
    Ready,
    /// Backoff over and no probe out yet: the next request goes here.
    ProbeDue(u64),
    BackedOff(u64),
}

impl EndpointState {
    fn new(endpoint: Endpoint, now: u64) -> EndpointState {
        EndpointState {
            endpoint,
            cost_bits: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            cost_stamp: AtomicU64::new(now),
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            backoff_level: AtomicU32::new(0),
            backoff_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn health(&self, now: u64) -> Health {
        let until = self.backoff_until.load(Ordering::Acquire);
        if until == 0 {
            Health::Ready
        } else if now < until || self.probing.load(Ordering::Acquire) {
            Health::BackedOff(until)
        } else {
            Health::ProbeDue(until)
        }
    }

    /// The latency estimate at `now`. It decays toward zero while nothing is observed, so
    /// an endpoint that was slow once gets tried again instead of being starved forever.
    fn latency_estimate(&self, now: u64) -> f64 {
        let stored = f64::from_bits(self.cost_bits.load(Ordering::Relaxed));
        let stamp = self.cost_stamp.load(Ordering::Relaxed);
        stored * decay(now.saturating_sub(stamp))
    }

    fn load(&self, now: u64) -> f64 {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        self.latency_estimate(now).max(COST_FLOOR_NANOS) * (f64::from(in_flight) + 1.0)
    }

    /// Peak-sensitive update: a sample above the current estimate replaces it at once (a
    /// slowing endpoint is shunned immediately); a lower one is blended in with a weight
    /// that grows with the time since the last update (recovery is believed gradually).
    /// With `peak_only`, low samples are ignored (fast failures must not look attractive).
    ///
    /// The estimate and its timestamp are separate atomics; a racing update may blend with
    /// a slightly stale timestamp, which only nudges the weight.
    fn observe(&self, sample_nanos: f64, now: u64, peak_only: bool) {
        let stamp = self.cost_stamp.load(Ordering::Relaxed);
        let w = decay(now.saturating_sub(stamp));
        let mut current = self.cost_bits.load(Ordering::Relaxed);
        loop {
            let stored = f64::from_bits(current);
            let decayed = stored * w;
            let next = if sample_nanos >= decayed {
                sample_nanos
            } else if peak_only {
                decayed
            } else {
                stored * w + sample_nanos * (1.0 - w)
            };
            match self.cost_bits.compare_exchange_weak(
                current,
                next.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.cost_stamp.fetch_max(now, Ordering::Relaxed);
    }

    fn try_claim_probe(&self) -> bool {
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn complete(&self, outcome: Option<Outcome>, started: Instant, probe: bool, now: Instant) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let now_nanos = nanos_since_epoch(now);
        let elapsed = now.saturating_duration_since(started).as_nanos() as f64;
        match outcome {
            Some(Outcome::Success(latency)) => {
                self.observe(latency.as_nanos() as f64, now_nanos, false);
                self.consecutive_failures.store(0, Ordering::Relaxed);
                self.backoff_level.store(0, Ordering::Relaxed);
                self.backoff_until.store(0, Ordering::Release);
            }
            Some(Outcome::Failure) => {
                self.observe(elapsed, now_nanos, true);
                let failures = self
                    .consecutive_failures
                    .fetch_add(1, Ordering::AcqRel)
                    .saturating_add(1);
                let until = self.backoff_until.load(Ordering::Acquire);
                // Failures of requests sent before the current backoff began must not
                // escalate it; only a failure once the backoff is over (the probe) does.
                if failures >= FAILURES_BEFORE_BACKOFF && until <= now_nanos {
                    let level = self.backoff_level.fetch_add(1, Ordering::AcqRel);
                    let backoff = FIRST_BACKOFF
                        .saturating_mul(1 << level.min(16))
                        .min(MAX_BACKOFF);
                    let until = now_nanos.saturating_add(backoff.as_nanos() as u64);
                    self.backoff_until.store(until.max(1), Ordering::Release);
                }
            }
            // Cancelled (the caller gave up or went away): the time waited still says
            // something about latency, nothing about health.
            None => self.observe(elapsed, now_nanos, true),
        }
        if probe {
            self.probing.store(false, Ordering::Release);
        }
    }
}

fn decay(elapsed_nanos: u64) -> f64 {
    // The pure-Rust `libm`: `f64::exp` would be the proxy's one reason to load the
    // system's libm, which costs every proxy ~0.4 MiB of mapped pages (bench/README.md).
    libm::exp(-(elapsed_nanos as f64) / DECAY_TAU_NANOS)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

impl Balancer {
    /// A balancer that knows nothing about its endpoints yet (duplicates by address dropped).
    pub fn new(endpoints: Vec<Endpoint>) -> Balancer {
        EndpointPool::default().balancer(endpoints)
    }

    /// The balancer for a new endpoint set, keeping the learned state (latency, in-flight,
    /// failures) of endpoints that stay with the same address and identity.
    pub fn updated(&self, new_endpoints: Vec<Endpoint>) -> Balancer {
        let mut pool = EndpointPool::default();
        pool.remember(self);
        pool.balancer(new_endpoints)
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().map(|s| &s.endpoint)
    }

    /// Chooses an endpoint for one request; `None` only when there are no endpoints.
    pub fn pick(&self) -> Option<EndpointHandle> {
        self.pick_at(&mut rand::rng(), Instant::now())
    }

    /// `pick` with the randomness and clock supplied.
    ///
    /// An endpoint whose backoff just ended gets the request as its probe. Otherwise two
    /// distinct endpoints are drawn at random from those not backed off and the one with
    /// the lower latency estimate × (in-flight + 1) wins. When every endpoint is backed
    /// off, the one whose backoff ends first is used rather than failing the request.
    /// O(endpoints), no allocation.
    pub fn pick_at(&self, rng: &mut dyn RngCore, now: Instant) -> Option<EndpointHandle> {
        let now_nanos = nanos_since_epoch(now);
        let mut ready = 0usize;
        let mut soonest: Option<(u64, &Arc<EndpointState>)> = None;
        for state in &self.endpoints {
            let until = match state.health(now_nanos) {
                Health::Ready => {
                    ready += 1;
                    continue;
                }
                Health::ProbeDue(until) => {
                    if state.try_claim_probe() {
                        return Some(EndpointHandle::start(state, now, true));
                    }
                    until
                }
                Health::BackedOff(until) => until,
            };
            if soonest.is_none_or(|(best, _)| until < best) {
                soonest = Some((until, state));
            }
        }
        let chosen = match ready {
            0 => soonest.map(|(_, state)| state),
            1 => self.nth_ready(0, now_nanos).or(soonest.map(|(_, s)| s)),
            _ => {
                let r = rng.next_u64();
                let first = (r as u32) as usize % ready;
                let mut second = ((r >> 32) as u32) as usize % (ready - 1);
                if second >= first {
                    second += 1;
                }
                // Health can change between the two scans under concurrency; take what is found.
                let (a, b) = self.two_ready(first, second, now_nanos);
                match (a, b) {
                    (Some(a), Some(b)) => Some(if b.load(now_nanos) < a.load(now_nanos) {
                        b
                    } else {
                        a
                    }),
                    (a, b) => a.or(b).or(soonest.map(|(_, s)| s)),
                }
            }
        };
        chosen
            .or_else(|| self.endpoints.first())
            .map(|state| EndpointHandle::start(state, now, false))
    }

    fn nth_ready(&self, n: usize, now: u64) -> Option<&Arc<EndpointState>> {
        self.endpoints
            .iter()
            .filter(|s| matches!(s.health(now), Health::Ready))
            .nth(n)
    }

    fn two_ready(
        &self,
        first: usize,
        second: usize,
        now: u64,
    ) -> (Option<&Arc<EndpointState>>, Option<&Arc<EndpointState>>) {
        let (mut a, mut b) = (None, None);
        let ready = self
            .endpoints
            .iter()
            .filter(|s| matches!(s.health(now), Health::Ready));
        for (i, state) in ready.enumerate() {
            if i == first {
                a = Some(state);
            }
            if i == second {
                b = Some(state);
            }
            if a.is_some() && b.is_some() {
                break;
            }
        }
        (a, b)
    }
}

/// Builds balancers that share per-endpoint state: with the previous generation's
/// balancers (so a discovery update keeps what was learned) and with each other (the same
/// pod behind two routes has one latency and one in-flight count).
#[derive(Debug, Default)]
pub struct EndpointPool {
    previous: HashMap<SocketAddr, Arc<EndpointState>>,
    current: HashMap<SocketAddr, Arc<EndpointState>>,
}

impl EndpointPool {
    /// Makes `balancer`'s endpoint state available for reuse.
    pub fn remember(&mut self, balancer: &Balancer) {
        for state in &balancer.endpoints {
            self.previous
                .entry(state.endpoint.addr)
                .or_insert_with(|| state.clone());
        }
    }

    /// A balancer over `endpoints`, reusing remembered state for an endpoint whose address
    /// and identity are unchanged (a new identity at the same address is a different pod).
    pub fn balancer(&mut self, endpoints: Vec<Endpoint>) -> Balancer {
        let now = nanos_since_epoch(Instant::now());
        let mut seen = HashSet::with_capacity(endpoints.len());
        let mut states = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            if !seen.insert(endpoint.addr) {
                tracing::warn!(addr = %endpoint.addr, "ignoring duplicate endpoint");
                continue;
            }
            let reusable = |s: &&Arc<EndpointState>| s.endpoint == endpoint;
            let state = match self
                .current
                .get(&endpoint.addr)
                .filter(reusable)
                .or_else(|| self.previous.get(&endpoint.addr).filter(reusable))
            {
                Some(state) => state.clone(),
                None => Arc::new(EndpointState::new(endpoint, now)),
            };
            self.current.insert(state.endpoint.addr, state.clone());
            states.push(state);
        }
        Balancer { endpoints: states }
    }
}

/// One request's claim on an endpoint: counts as in flight until finished or dropped.
/// Dropping it without `finish` (cancellation) records the time waited as a latency
/// observation but says nothing about the endpoint's health.
#[derive(Debug)]
pub struct EndpointHandle {
    state: Arc<EndpointState>,
    started: Instant,
    probe: bool,
    finished: bool,
}

impl EndpointHandle {
    fn start(state: &Arc<EndpointState>, now: Instant, probe: bool) -> EndpointHandle {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        EndpointHandle {
            state: state.clone(),
            started: now,
            probe,
            finished: false,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.state.endpoint
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// True for the single request let through to test an endpoint after its backoff.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn finish(self, outcome: Outcome) {
        self.finish_at(outcome, Instant::now());
    }

    /// `finish` with the clock supplied.
    pub fn finish_at(mut self, outcome: Outcome, now: Instant) {
        self.finished = true;
        self.state
            .complete(Some(outcome), self.started, self.probe, now);
    }
}

impl Drop for EndpointHandle {
    fn drop(&mut self) {
        if !self.finished {
            self.state
                .complete(None, self.started, self.probe, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    fn ep(last: u8) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([198, 18, 0, last], 8080)),
            identity: None,
        }
    }

    fn state_of(b: &Balancer, addr: SocketAddr) -> &Arc<EndpointState> {
        b.endpoints
            .iter()
            .find(|s| s.endpoint.addr == addr)
            .unwrap()
    }

    #[test]
    fn balancer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Balancer>();
        assert_send_sync::<EndpointHandle>();
    }

    #[test]
    fn empty_balancer_picks_nothing() {
        assert!(Balancer::new(Vec::new()).pick().is_none());
    }

    #[test]
    fn slow_endpoint_gets_little_traffic() {
        // Discrete-event simulation: a request arrives every millisecond; three endpoints
        // answer in 10 ms, one in 100 ms. Uniform choice would give the slow one 25%.
        let balancer = Balancer::new(vec![ep(1), ep(2), ep(3), ep(4)]);
        let slow = ep(3).addr;
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut pending: BinaryHeap<Reverse<(Duration, u64)>> = BinaryHeap::new();
        let mut handles = HashMap::new();
        let mut picks: HashMap<SocketAddr, u32> = HashMap::new();
        for i in 0..10_000u64 {
            let now = Duration::from_millis(i);
            while let Some(Reverse((done, id))) = pending.peek().copied() {
                if done > now {
                    break;
                }
                pending.pop();
                let handle: EndpointHandle = handles.remove(&id).unwrap();
                let latency = done - handle.started().duration_since(t0);
                handle.finish_at(Outcome::Success(latency), t0 + done);
            }
            let handle = balancer.pick_at(&mut rng, t0 + now).unwrap();
            let addr = handle.endpoint().addr;
            *picks.entry(addr).or_default() += 1;
            let latency = Duration::from_millis(if addr == slow { 100 } else { 10 });
            pending.push(Reverse((now + latency, i)));
            handles.insert(i, handle);
        }
        let slow_share = f64::from(picks[&slow]) / 10_000.0;
        assert!(
            slow_share < 0.15,
            "slow endpoint got {slow_share:.3} of picks"
        );
        for fast in [ep(1), ep(2), ep(4)] {
            assert!(picks[&fast.addr] > 2_500, "{picks:?}");
        }
        // In-flight accounting balances once everything finishes.
        drop(handles);
        assert!(balancer
            .endpoints
            .iter()
            .all(|s| s.in_flight.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn in_flight_spreads_load_among_equal_endpoints() {
        let balancer = Balancer::new(vec![ep(1), ep(2)]);
        let now = Instant::now();
        let mut rng = SmallRng::seed_from_u64(1);
        let held: Vec<_> = (0..10)
            .map(|_| balancer.pick_at(&mut rng, now).unwrap())
            .collect();
        let on_first = held
            .iter()
            .filter(|h| h.endpoint().addr == ep(1).addr)
            .count();
        assert_eq!(on_first, 5);
    }

    #[test]
    fn ewma_takes_peaks_at_once_and_recovers_gradually() {
        let balancer = Balancer::new(vec![ep(1)]);
        let state = state_of(&balancer, ep(1).addr).clone();
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(1);
        let h = balancer.pick_at(&mut rng, t0).unwrap();
        h.finish_at(Outcome::Success(Duration::from_millis(200)), t0);
        let at = |t: Instant| state.latency_estimate(nanos_since_epoch(t)) / 1e6;
        assert!((at(t0) - 200.0).abs() < 1.0, "{}", at(t0));
        // One fast answer right after barely moves it.
        let t1 = t0 + Duration::from_millis(10);
        balancer
            .pick_at(&mut rng, t1)
            .unwrap()
            .finish_at(Outcome::Success(Duration::from_millis(10)), t1);
        assert!(at(t1) > 190.0, "{}", at(t1));
        // A steady stream of fast answers brings it down over tens of seconds.
        let mut t = t1;
        for _ in 0..600 {
            t += Duration::from_millis(100);
            balancer
                .pick_at(&mut rng, t)
                .unwrap()
                .finish_at(Outcome::Success(Duration::from_millis(10)), t);
        }
        assert!(at(t) < 15.0, "{}", at(t));
        // Unobserved, the estimate fades so the endpoint is tried again eventually.
        let idle = t + Duration::from_secs(10);
        assert!((at(idle) - at(t) / std::f64::consts::E).abs() < 0.5);
        // Failures never make an endpoint look faster.
        let before = at(idle);
        let h = balancer.pick_at(&mut rng, idle).unwrap();
        h.finish_at(Outcome::Failure, idle);
        assert!((at(idle) - before).abs() < 1e-6);
    }

    #[test]
    fn failing_endpoint_is_backed_off_and_probed_back() {
        let mut rng = SmallRng::seed_from_u64(3);
        let t0 = Instant::now();
        let alone = Balancer::new(vec![ep(1)]);
        for i in 0..FAILURES_BEFORE_BACKOFF {
            let h = alone.pick_at(&mut rng, t0).unwrap();
            // Alone, it is used even when backed off: better a try than a certain failure.
            assert_eq!(h.endpoint().addr, ep(1).addr, "attempt {i}");
            h.finish_at(Outcome::Failure, t0);
        }
        assert!(matches!(
            state_of(&alone, ep(1).addr).health(nanos_since_epoch(t0)),
            Health::BackedOff(_)
        ));

        let balancer = alone.updated(vec![ep(1), ep(2)]);
        let during = t0 + Duration::from_millis(900);
        for _ in 0..100 {
            let h = balancer.pick_at(&mut rng, during).unwrap();
            assert_eq!(h.endpoint().addr, ep(2).addr);
        }

        // Backoff (1 s) over: exactly one probe goes through.
        let t1 = t0 + Duration::from_millis(1_001);
        let probe = balancer.pick_at(&mut rng, t1).unwrap();
        assert_eq!(probe.endpoint().addr, ep(1).addr);
        assert!(probe.is_probe());
        for _ in 0..50 {
            let h = balancer.pick_at(&mut rng, t1).unwrap();
            assert_eq!(h.endpoint().addr, ep(2).addr);
            assert!(!h.is_probe());
        }
        // The probe fails: the backoff doubles to 2 s.
        probe.finish_at(Outcome::Failure, t1);
        let still_off = t1 + Duration::from_millis(1_900);
        assert_eq!(
            balancer
                .pick_at(&mut rng, still_off)
                .unwrap()
                .endpoint()
                .addr,
            ep(2).addr
        );
        let t2 = t1 + Duration::from_millis(2_001);
        let probe = balancer.pick_at(&mut rng, t2).unwrap();
        assert!(probe.is_probe() && probe.endpoint().addr == ep(1).addr);
        probe.finish_at(Outcome::Success(Duration::from_millis(5)), t2);

        // Healthy again: it takes traffic (and, being faster now, most of it).
        let mut to_first = 0;
        for _ in 0..100 {
            let h = balancer.pick_at(&mut rng, t2).unwrap();
            if h.endpoint().addr == ep(1).addr {
                to_first += 1;
            }
            h.finish_at(Outcome::Success(Duration::from_millis(5)), t2);
        }
        assert!(to_first > 30, "{to_first}");
    }

    #[test]
    fn cancelled_probe_lets_the_next_request_probe() {
        let mut rng = SmallRng::seed_from_u64(4);
        let t0 = Instant::now();
        let balancer = Balancer::new(vec![ep(1), ep(2)]);
        let state = state_of(&balancer, ep(1).addr).clone();
        for _ in 0..FAILURES_BEFORE_BACKOFF {
            EndpointHandle::start(&state, t0, false).finish_at(Outcome::Failure, t0);
        }
        let t1 = t0 + Duration::from_secs(2);
        let probe = balancer.pick_at(&mut rng, t1).unwrap();
        assert!(probe.is_probe());
        drop(probe);
        let again = balancer.pick_at(&mut rng, t1).unwrap();
        assert!(again.is_probe() && again.endpoint().addr == ep(1).addr);
    }

    #[test]
    fn all_backed_off_uses_the_one_back_soonest() {
        let mut rng = SmallRng::seed_from_u64(5);
        let t0 = Instant::now();
        let balancer = Balancer::new(vec![ep(1), ep(2), ep(3)]);
        for (i, last) in [1u8, 2, 3].into_iter().enumerate() {
            let state = state_of(&balancer, ep(last).addr).clone();
            // ep(1) fails at +300 ms, ep(2) at +200 ms, ep(3) at +100 ms.
            let at = t0 + Duration::from_millis(100 * (3 - i as u64));
            for _ in 0..FAILURES_BEFORE_BACKOFF {
                EndpointHandle::start(&state, at, false).finish_at(Outcome::Failure, at);
            }
        }
        // ep(3) failed first (t0 + 100 ms), so its backoff ends first.
        let h = balancer
            .pick_at(&mut rng, t0 + Duration::from_millis(500))
            .unwrap();
        assert_eq!(h.endpoint().addr, ep(3).addr);
        assert!(!h.is_probe());
    }

    #[test]
    fn update_keeps_state_of_remaining_endpoints() {
        let mut rng = SmallRng::seed_from_u64(6);
        let t0 = Instant::now();
        let old = Balancer::new(vec![ep(1), ep(2)]);
        let a = state_of(&old, ep(1).addr).clone();
        EndpointHandle::start(&a, t0, false)
            .finish_at(Outcome::Success(Duration::from_millis(500)), t0);
        let in_flight = EndpointHandle::start(&a, t0, false);

        let mut moved = ep(2);
        moved.identity = Some(crate::discovery::MeshPeer {
            id: weft_certs::SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap(),
            server_name: rustls::pki_types::ServerName::try_from("web.shop.example").unwrap(),
        });
        let new = old.updated(vec![ep(1), moved.clone(), ep(3), ep(1)]);
        assert_eq!(new.len(), 3, "duplicate address dropped");
        assert!(Arc::ptr_eq(state_of(&new, ep(1).addr), &a));
        assert_eq!(a.in_flight.load(Ordering::Relaxed), 1);
        // Same address, new identity: another pod, nothing carried over.
        assert!(!Arc::ptr_eq(
            state_of(&new, ep(2).addr),
            state_of(&old, ep(2).addr)
        ));
        assert_eq!(state_of(&new, ep(2).addr).endpoint.identity, moved.identity);
        // The old handle's completion is seen by the new balancer.
        drop(in_flight);
        assert_eq!(
            state_of(&new, ep(1).addr).in_flight.load(Ordering::Relaxed),
            0
        );
        // And the slow endpoint's history still steers traffic away from it.
        for _ in 0..100 {
            let h = new.pick_at(&mut rng, t0).unwrap();
            assert_ne!(h.endpoint().addr, ep(1).addr);
        }
    }

    #[test]
    fn pool_shares_state_between_balancers_built_together() {
        let mut pool = EndpointPool::default();
        let first = pool.balancer(vec![ep(1), ep(2)]);
        let second = pool.balancer(vec![ep(2), ep(3)]);
        assert!(Arc::ptr_eq(
            state_of(&first, ep(2).addr),
            state_of(&second, ep(2).addr)
        ));
    }
}
