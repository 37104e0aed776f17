//! Leader election on a `coordination.k8s.io/v1` Lease that cannot split: only the holder runs
//! controllers, whatever the replicas' wall clocks say and however long a process stalls.
//!
//! The protocol is client-go's `leaderelection`:
//! - A candidate never compares the holder's `renewTime` (the holder's wall clock) with its own
//!   wall clock. It notes, by its own monotonic clock, when it last saw the Lease change, and
//!   takes over only once the Lease has stayed unchanged for its `leaseDurationSeconds` as
//!   measured locally (`Observed`, client-go's `observedTime`).
//! - Takeover and renewal are optimistic-concurrency replaces (the resourceVersion read), so a
//!   renewal the candidate has not seen makes its takeover fail with a conflict.
//! - The leader counts its leadership from the start of its last successful renewal and holds it
//!   for `renew_deadline` (2/3 of the lease duration) after that (`Leadership`); every renewal
//!   attempt is bounded by that deadline. A candidate saw that renewal after it was sent, so it
//!   cannot take over before the leader has given up: the margin is a third of the lease.
//! - Reconciles run only while leadership is held (`while_leading`, checked before every step).
//!   A process frozen (SIGSTOP) past its lease sees the gap at once on resume: `Instant` is
//!   `CLOCK_MONOTONIC` on Linux, which keeps counting while a process is stopped. The lead loop
//!   then stops the controllers and the process exits to restart as a candidate.
//!
//! Like client-go, this assumes the replicas' monotonic clocks run at about the same rate, and
//! `CLOCK_MONOTONIC` does not count a suspend of the whole machine.
//!
//! Why not a crate: `kube-leader-election` and `kube-lease-manager` judge expiry by comparing
//! the holder's `renewTime` with the local wall clock (clock skew splits the brain), bound no
//! renewal by a deadline and give controllers nothing to check before acting; kube-runtime has
//! no leader election.

use std::fmt;
use std::pin::pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use tokio::time::{Instant, timeout, timeout_at};

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub holder: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
}

impl LeaseConfig {
    /// The lease duration written in the Lease (whole seconds, at least one).
    fn seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// How long leadership lasts after the start of the last successful renewal: 2/3 of the
    /// lease duration written, so the leader stops a third of it before anyone may take over.
    fn renew_deadline(&self) -> Duration {
        Duration::from_secs(self.seconds().unsigned_abs().into()) * 2 / 3
    }

    /// Pause between attempts to acquire or renew (several fit in the renew deadline).
    fn retry_period(&self) -> Duration {
        (self.renew_deadline() / 4).max(Duration::from_millis(100))
    }
}

/// Whether this process leads, by its own monotonic clock: held until `renew_deadline` after
/// the start of the last successful acquire or renewal. Cheap to clone and to check.
#[derive(Clone, Debug)]
pub struct Leadership {
    /// Start of the last successful acquire or renewal; `None` when not held.
    renewed: Arc<Mutex<Option<Instant>>>,
    renew_deadline: Duration,
}

impl Leadership {
    fn new(renew_deadline: Duration) -> Self {
        Self {
            renewed: Default::default(),
            renew_deadline,
        }
    }

    /// True while the last successful renewal started less than the renew deadline ago.
    pub fn is_held(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() < d)
    }

    /// When leadership lapses unless renewed; `None` when it is not held.
    fn deadline(&self) -> Option<Instant> {
        let renewed = *self.renewed.lock().expect("leadership lock");
        renewed.map(|t| t + self.renew_deadline)
    }

    /// Records a successful acquire or renewal whose request was sent after `started`.
    fn renewed(&self, started: Instant) {
        let mut renewed = self.renewed.lock().expect("leadership lock");
        *renewed = Some(renewed.map_or(started, |t| t.max(started)));
    }

    /// Gives leadership up at once (the Lease was taken, lapsed or is being released).
    fn resign(&self) {
        *self.renewed.lock().expect("leadership lock") = None;
    }
}

/// The leadership every reconcile checks (see `while_leading`); unset with leader election off.
static CURRENT: OnceLock<Leadership> = OnceLock::new();

/// Makes `leadership` the one `while_leading` checks (the first call per process wins).
pub fn guard_reconciles(leadership: &Leadership) {
    let _ = CURRENT.set(leadership.clone());
}

/// Whether this process may act as the leader now (always, with leader election off).
pub fn leading() -> bool {
    CURRENT.get().is_none_or(Leadership::is_held)
}

/// Runs one reconcile only while this process leads. Checked before every step (poll), so a
/// reconcile neither starts nor goes on once leadership has lapsed (a missed renewal, a frozen
/// process resumed); it then ends with `await_change`, as the controllers are being stopped.
pub async fn while_leading<E>(
    reconcile: impl Future<Output = Result<Action, E>>,
) -> Result<Action, E> {
    while_held(CURRENT.get(), reconcile).await
}

/// `while_leading` for `leadership` (`None`: leader election is off).
async fn while_held<E>(
    leadership: Option<&Leadership>,
    reconcile: impl Future<Output = Result<Action, E>>,
) -> Result<Action, E> {
    let mut reconcile = pin!(reconcile);
    std::future::poll_fn(|cx| {
        if !leadership.is_none_or(Leadership::is_held) {
            tracing::debug!("not the leader (any more): reconcile skipped");
            return Poll::Ready(Ok(Action::await_change()));
        }
        reconcile.as_mut().poll(cx)
    })
    .await
}

/// Why leadership ended.
#[derive(Debug, PartialEq)]
pub enum Lost {
    /// Another replica holds the Lease.
    Taken,
    /// No renewal succeeded within the renew deadline (API server unreachable or slow, or this
    /// process was stalled).
    Lapsed,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lost::Taken => "another replica holds the leader Lease",
            Lost::Lapsed => {
                "the leader Lease was not renewed within the renew deadline (API server unreachable or slow, or this process was stalled)"
            }
        })
    }
}

/// The Lease as this candidate last saw it, and when (by its own monotonic clock) it last saw
/// it change.
#[derive(Clone, Debug)]
struct Observed {
    version: Option<String>,
    spec: LeaseSpec,
    at: Instant,
}

impl Observed {
    /// What is known after reading (`version`, `spec`) at `now`: the time stays while nothing
    /// changed.
    fn update(
        previous: Option<Self>,
        version: Option<String>,
        spec: LeaseSpec,
        now: Instant,
    ) -> Self {
        match previous {
            Some(p) if p.version == version && p.spec == spec => p,
            _ => Self {
                version,
                spec,
                at: now,
            },
        }
    }
}

/// What a replica does with the Lease it just read.
#[derive(Debug, PartialEq)]
enum Step {
    /// It holds the Lease: renew it.
    Renew,
    /// Nobody holds it, or the holder let it lapse: take it over.
    TakeOver,
    /// Another replica holds it.
    Wait,
}

/// The step for `me` at `now`. The holder's lease counts from when this replica saw the Lease
/// change (never from `renewTime`, another machine's clock), for the duration the holder wrote
/// (`fallback` when it wrote none).
fn step(seen: &Observed, me: &str, now: Instant, fallback: Duration) -> Step {
    let duration = seen
        .spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(fallback, Duration::from_secs);
    match seen.spec.holder_identity.as_deref().unwrap_or_default() {
        holder if holder == me => Step::Renew,
        "" => Step::TakeOver,
        _ if now.duration_since(seen.at) >= duration => Step::TakeOver,
        _ => Step::Wait,
    }
}

/// Renews through `renew` every `period` until it reports the Lease taken or leadership lapses;
/// every attempt is cut off at the renew deadline. Resigns before returning.
async fn keep<F, Fut, E>(leadership: &Leadership, period: Duration, mut renew: F) -> Lost
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, E>>,
    E: fmt::Display,
{
    let lost = loop {
        let Some(deadline) = leadership.deadline() else {
            break Lost::Lapsed;
        };
        tokio::time::sleep_until((Instant::now() + period).min(deadline)).await;
        if !leadership.is_held() {
            break Lost::Lapsed;
        }
        let started = Instant::now();
        match timeout_at(deadline, renew()).await {
            Ok(Ok(true)) => leadership.renewed(started),
            Ok(Ok(false)) => break Lost::Taken,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot renew the leader Lease; retrying until the renew deadline");
            }
            Err(_) => break Lost::Lapsed,
        }
    };
    leadership.resign();
    lost
}

/// A Lease held or contended for.
pub struct LeaderLease {
    api: Api<Lease>,
    config: LeaseConfig,
    leadership: Leadership,
}

impl LeaderLease {
    /// A contender for `config`.
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            leadership: Leadership::new(config.renew_deadline()),
            config,
        }
    }

    /// This replica's leadership (held once `acquire` returns, until `hold` returns).
    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    /// One attempt to take or renew the Lease; true when we hold it afterwards. `seen` is what
    /// this replica last saw of it (updated here).
    async fn try_acquire(&self, seen: &mut Option<Observed>) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return self.create().await;
        };
        let read_at = Instant::now();
        let spec = lease.spec.get_or_insert_default();
        let version = lease.metadata.resource_version.clone();
        let observed = Observed::update(seen.take(), version, spec.clone(), read_at);
        let me = &self.config.holder;
        let next = step(&observed, me, read_at, self.config.duration);
        *seen = Some(observed);
        let now = MicroTime(Timestamp::now());
        match next {
            Step::Wait => return Ok(false),
            Step::Renew => {}
            Step::TakeOver => {
                spec.holder_identity = Some(me.clone());
                spec.acquire_time = Some(now.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        // Informational: no replica judges expiry by this timestamp.
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.config.seconds());
        // resourceVersion is kept from the read: a concurrent change makes this a 409.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates the Lease held by this replica; false when another one created it first.
    async fn create(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.holder.clone()),
                lease_duration_seconds: Some(self.config.seconds()),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease (its `leadership` is then held).
    pub async fn acquire(&self) {
        let mut seen = None;
        loop {
            let started = Instant::now();
            match timeout(self.config.renew_deadline(), self.try_acquire(&mut seen)).await {
                Ok(Ok(true)) => {
                    self.leadership.renewed(started);
                    if self.leadership.is_held() {
                        return;
                    }
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot read or update the leader Lease"),
                Err(_) => {
                    tracing::warn!("the leader Lease did not answer within the renew deadline")
                }
            }
            tokio::time::sleep(self.config.retry_period()).await;
        }
    }

    /// Renews the Lease until it cannot; returns (leadership already given up) when another
    /// replica took it or no renewal succeeded within the renew deadline.
    pub async fn hold(&self) -> Lost {
        keep(&self.leadership, self.config.retry_period(), || async {
            self.try_acquire(&mut None).await
        })
        .await
    }

    /// Gives leadership and the Lease up on shutdown, once the controllers have stopped, so
    /// another replica takes over at once.
    pub async fn release(&self) {
        self.leadership.resign();
        let release = async {
            if let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await {
                let spec = lease.spec.get_or_insert_default();
                if spec.holder_identity.as_deref() == Some(self.config.holder.as_str()) {
                    spec.holder_identity = None;
                    let _ = self
                        .api
                        .replace(&self.config.name, &PostParams::default(), &lease)
                        .await;
                }
            }
        };
        let _ = timeout(self.config.renew_deadline(), release).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn spec(holder: &str, renew_time: &str, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()).filter(|h: &String| !h.is_empty()),
            renew_time: Some(MicroTime(renew_time.parse().unwrap())),
            lease_duration_seconds: Some(seconds),
            ..Default::default()
        }
    }

    /// Expiry is judged by how long this replica has seen the Lease unchanged, never by the
    /// holder's `renewTime`: a holder whose clock is an hour behind still keeps its Lease, and
    /// one an hour ahead loses it once it stops renewing.
    #[test]
    fn a_lease_expires_only_after_staying_unchanged_for_its_duration_by_our_clock() {
        let t0 = Instant::now();
        let behind = spec("other", "2000-01-01T00:00:00Z", 4);
        let seen = Observed::update(None, Some("1".into()), behind.clone(), t0);
        assert_eq!(step(&seen, "me", t0, SEC), Step::Wait);
        assert_eq!(step(&seen, "me", t0 + 3 * SEC, SEC), Step::Wait);
        assert_eq!(step(&seen, "me", t0 + 4 * SEC, SEC), Step::TakeOver);

        // Reading it again unchanged keeps the first time it was seen.
        let again = Observed::update(Some(seen.clone()), Some("1".into()), behind, t0 + 3 * SEC);
        assert_eq!(again.at, t0);

        // A renewal (another renewTime and resourceVersion) restarts the count, whatever
        // renewTime says (here far in the future).
        let ahead = spec("other", "2999-01-01T00:00:00Z", 4);
        let renewed = Observed::update(Some(again), Some("2".into()), ahead, t0 + 3 * SEC);
        assert_eq!(renewed.at, t0 + 3 * SEC);
        assert_eq!(step(&renewed, "me", t0 + 6 * SEC, SEC), Step::Wait);
        assert_eq!(step(&renewed, "me", t0 + 7 * SEC, SEC), Step::TakeOver);

        // Any change counts: a new holder, or only a new resourceVersion.
        let new_holder = spec("third", "2999-01-01T00:00:00Z", 4);
        let seen = Observed::update(
            Some(renewed.clone()),
            Some("2".into()),
            new_holder,
            t0 + 9 * SEC,
        );
        assert_eq!(seen.at, t0 + 9 * SEC);
        let touched = Observed::update(
            Some(seen.clone()),
            Some("3".into()),
            seen.spec.clone(),
            t0 + 10 * SEC,
        );
        assert_eq!(touched.at, t0 + 10 * SEC);
    }

    /// A fresh candidate waits a full lease duration even for a Lease renewed long ago: it
    /// cannot know how long the Lease has really been unchanged.
    #[test]
    fn a_fresh_candidate_waits_a_full_lease_duration() {
        let t0 = Instant::now();
        let stale = spec("other", "1970-01-01T00:00:00Z", 15);
        let seen = Observed::update(None, Some("9".into()), stale, t0);
        assert_eq!(step(&seen, "me", t0 + 14 * SEC, SEC), Step::Wait);
        assert_eq!(step(&seen, "me", t0 + 15 * SEC, SEC), Step::TakeOver);
    }

    /// Our own Lease is renewed, a released one (no holder) taken at once, and a Lease without
    /// a duration gets ours.
    #[test]
    fn own_and_released_leases() {
        let t0 = Instant::now();
        let mine = Observed::update(None, None, spec("me", "2000-01-01T00:00:00Z", 4), t0);
        assert_eq!(step(&mine, "me", t0, SEC), Step::Renew);
        let released = Observed::update(None, None, spec("", "2000-01-01T00:00:00Z", 4), t0);
        assert_eq!(step(&released, "me", t0, SEC), Step::TakeOver);
        let mut no_duration = spec("other", "2000-01-01T00:00:00Z", 4);
        no_duration.lease_duration_seconds = None;
        let seen = Observed::update(None, None, no_duration, t0);
        assert_eq!(step(&seen, "me", t0 + 9 * SEC, 10 * SEC), Step::Wait);
        assert_eq!(step(&seen, "me", t0 + 10 * SEC, 10 * SEC), Step::TakeOver);
    }

    /// The leader stops a third of the lease before any candidate may take over, and every
    /// candidate's wait is at least the lease written.
    #[test]
    fn the_renew_deadline_is_two_thirds_of_the_lease_written() {
        let config = |duration| LeaseConfig {
            namespace: "ns".into(),
            name: "lease".into(),
            holder: "me".into(),
            duration,
        };
        assert_eq!(config(15 * SEC).renew_deadline(), 10 * SEC);
        assert_eq!(config(15 * SEC).seconds(), 15);
        // A fraction of a second is not written, so it does not count for the leader either.
        assert_eq!(config(Duration::from_millis(1900)).seconds(), 1);
        assert!(config(Duration::from_millis(1900)).renew_deadline() < SEC);
        assert!(config(4 * SEC).retry_period() * 3 < config(4 * SEC).renew_deadline());
    }

    /// Leadership lasts the renew deadline from the START of the last successful renewal, never
    /// moves back, and ends at once on resign.
    #[test]
    fn leadership_counts_from_the_start_of_the_last_renewal() {
        let leadership = Leadership::new(10 * SEC);
        assert!(!leadership.is_held());
        let t0 = Instant::now();
        leadership.renewed(t0);
        assert!(leadership.is_held());
        assert_eq!(leadership.deadline(), Some(t0 + 10 * SEC));
        leadership.renewed(t0 + 5 * SEC);
        leadership.renewed(t0);
        assert_eq!(leadership.deadline(), Some(t0 + 15 * SEC));
        // A renewal that started more than the deadline ago (e.g. its answer came after a
        // freeze) does not make leadership held.
        let stale = Leadership::new(Duration::from_millis(5));
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(10));
        stale.renewed(started);
        assert!(!stale.is_held());
        leadership.resign();
        assert!(!leadership.is_held());
    }

    fn held_for(deadline: Duration) -> Leadership {
        let leadership = Leadership::new(deadline);
        leadership.renewed(Instant::now());
        leadership
    }

    /// A renewal that hangs is cut off at the renew deadline, and leadership is given up then.
    #[tokio::test]
    async fn a_hung_renewal_ends_leadership_at_the_renew_deadline() {
        let leadership = held_for(Duration::from_millis(300));
        let start = Instant::now();
        let lost = keep(&leadership, Duration::from_millis(50), || {
            std::future::pending::<Result<bool, String>>()
        })
        .await;
        assert_eq!(lost, Lost::Lapsed);
        assert!(!leadership.is_held());
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < 2 * SEC,
            "{took:?}"
        );
    }

    /// Failed renewals are retried within the deadline; one success keeps leadership.
    #[tokio::test]
    async fn failed_renewals_are_retried_within_the_deadline() {
        let leadership = held_for(Duration::from_millis(400));
        let attempts = std::sync::atomic::AtomicUsize::new(0);
        let kept = timeout(
            Duration::from_millis(900),
            keep(&leadership, Duration::from_millis(40), || {
                let n = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    match n {
                        0..3 => Err("API server unreachable".to_string()),
                        _ => Ok(true),
                    }
                }
            }),
        )
        .await;
        assert!(kept.is_err(), "still leading: {kept:?}");
        assert!(leadership.is_held());
        assert!(attempts.load(std::sync::atomic::Ordering::SeqCst) > 4);

        // Only failures: leadership lapses at the deadline after several attempts.
        let leadership = held_for(Duration::from_millis(300));
        let attempts = std::sync::atomic::AtomicUsize::new(0);
        let lost = keep(&leadership, Duration::from_millis(40), || {
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Err::<bool, _>("API server unreachable") }
        })
        .await;
        assert_eq!(lost, Lost::Lapsed);
        assert!(attempts.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    }

    /// A Lease found taken by another replica ends leadership at once.
    #[tokio::test]
    async fn a_taken_lease_ends_leadership_at_once() {
        let leadership = held_for(10 * SEC);
        let lost = keep(&leadership, Duration::from_millis(10), || async {
            Ok::<_, String>(false)
        })
        .await;
        assert_eq!(lost, Lost::Taken);
        assert!(!leadership.is_held());
    }

    /// A reconcile neither starts nor goes on once leadership has lapsed: it is dropped at its
    /// next step and ends with `await_change`. Without leader election it always runs.
    #[tokio::test]
    async fn reconciles_stop_at_their_next_step_once_leadership_lapses() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let leadership = held_for(10 * SEC);
        let steps = AtomicUsize::new(0);
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let mut reconcile = Box::pin(while_held(Some(&leadership), async {
            steps.fetch_add(1, SeqCst);
            let _ = go_rx.await;
            steps.fetch_add(1, SeqCst);
            Ok::<_, String>(Action::requeue(SEC))
        }));
        assert!(futures::poll!(reconcile.as_mut()).is_pending());
        assert_eq!(steps.load(SeqCst), 1);
        leadership.resign();
        let _ = go_tx.send(());
        assert_eq!(reconcile.await, Ok(Action::await_change()));
        assert_eq!(steps.load(SeqCst), 1, "no step ran after leadership lapsed");

        let started = AtomicUsize::new(0);
        let skipped = while_held(Some(&leadership), async {
            started.fetch_add(1, SeqCst);
            Ok::<_, String>(Action::requeue(SEC))
        });
        assert_eq!(skipped.await, Ok(Action::await_change()));
        assert_eq!(
            started.load(SeqCst),
            0,
            "no reconcile starts without leadership"
        );

        let unguarded = while_held(None, async { Ok::<_, String>(Action::requeue(SEC)) });
        assert_eq!(unguarded.await, Ok(Action::requeue(SEC)));
    }
}
