//! Leader election over a `coordination.k8s.io` Lease, with client-go's timings and guarantees: candidates retry
//! every `retry_period`; a holder that has not renewed for `renew_deadline` gives up; another candidate takes the
//! Lease only after it has seen the same record unchanged for `lease_duration`. Because `renew_deadline` is shorter
//! than `lease_duration`, a leader cut off from the apiserver stops before anyone else can start.
//!
//! Why not kube-lease-manager (the maintained crate for kube 5): its holder keeps reporting itself leader while its
//! renewals fail, so a leader behind a partition would go on reconciling after its Lease expired.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("--leader-elect-renew-deadline ({renew:?}) must be shorter than --leader-elect-lease-duration ({lease:?})")]
    RenewDeadlineNotShorter { renew: Duration, lease: Duration },
    #[error("--leader-elect-retry-period ({retry:?}) must be shorter than --leader-elect-renew-deadline ({renew:?})")]
    RetryPeriodNotShorter { retry: Duration, renew: Duration },
    #[error("--leader-elect-lease-duration must be a whole number of seconds, at least 1 (got {0:?})")]
    LeaseDuration(Duration),
    #[error("the Lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Where the Lease lives, who we are, and the three timings.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// The timings in the order client-go requires them: retry < renew deadline < lease duration.
    pub fn validate(&self) -> Result<(), LeaderError> {
        if self.lease_duration.as_secs() == 0 || self.lease_duration.subsec_nanos() != 0 {
            return Err(LeaderError::LeaseDuration(self.lease_duration));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(LeaderError::RenewDeadlineNotShorter {
                renew: self.renew_deadline,
                lease: self.lease_duration,
            });
        }
        if self.retry_period >= self.renew_deadline {
            return Err(LeaderError::RetryPeriodNotShorter { retry: self.retry_period, renew: self.renew_deadline });
        }
        Ok(())
    }
}

/// What a candidate may do with the Lease as it reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nobody holds it, or its holder let it expire: take it.
    Take,
    /// It is ours: renew it.
    Renew,
    /// Another candidate holds it.
    Held { holder: String },
}

/// `unchanged_for`: how long this process has seen the Lease's record unchanged (its own clock, never the holder's
/// timestamps, so clock skew between nodes cannot shorten a lease).
pub fn verdict(spec: Option<&LeaseSpec>, me: &str, unchanged_for: Duration, default_duration: Duration) -> Verdict {
    let holder = spec.and_then(|s| s.holder_identity.as_deref()).filter(|h| !h.is_empty());
    match holder {
        None => Verdict::Take,
        Some(h) if h == me => Verdict::Renew,
        Some(h) => {
            let duration = spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(default_duration);
            if unchanged_for >= duration { Verdict::Take } else { Verdict::Held { holder: h.to_string() } }
        }
    }
}

/// The Lease's spec once `me` has taken or renewed it at `now`.
pub fn claimed(previous: Option<&LeaseSpec>, me: &str, now: Timestamp, duration: Duration) -> LeaseSpec {
    let previous_holder = previous.and_then(|s| s.holder_identity.as_deref()).filter(|h| !h.is_empty());
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    let renewing = previous_holder == Some(me);
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: if renewing { previous.and_then(|s| s.acquire_time.clone()) } else { Some(MicroTime(now)) },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if renewing || previous_holder.is_none() { transitions } else { transitions + 1 }),
        ..LeaseSpec::default()
    }
}

/// Why a leader stopped leading.
#[derive(Debug, PartialEq, Eq)]
pub enum Lost {
    /// No renewal succeeded within the renew deadline (the apiserver unreachable, or too slow).
    RenewDeadline,
    /// Another candidate holds the Lease (it expired while this process was paused).
    TakenBy(String),
}

/// One candidate.
pub struct Elector {
    api: Api<Lease>,
    config: ElectionConfig,
    /// The Lease's resourceVersion as last read, and since when this process has seen it.
    observed: Option<(String, Instant)>,
}

impl Elector {
    pub fn new(client: kube::Client, config: ElectionConfig) -> Result<Self, LeaderError> {
        config.validate()?;
        Ok(Self { api: Api::namespaced(client, &config.namespace), config, observed: None })
    }

    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// Returns once this process holds the Lease. Errors (the apiserver down, a conflicting write) are retried.
    pub async fn acquire(&mut self) {
        tracing::info!(lease = %self.config.lease_name, namespace = %self.config.namespace,
            identity = %self.config.identity, "waiting for leadership");
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Verdict::Take | Verdict::Renew) => {
                    tracing::info!(identity = %self.config.identity, "leadership acquired");
                    return;
                }
                Ok(Verdict::Held { holder }) => tracing::debug!(%holder, "the Lease is held"),
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews every retry period while leading; returns when leadership is lost. The caller must stop writing at
    /// once: by then another candidate may take the Lease within `lease_duration - renew_deadline`.
    pub async fn hold(&mut self) -> Lost {
        // The renewal that made us leader was sent just before this instant.
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let attempt_started = Instant::now();
            let Some(left) = self.config.renew_deadline.checked_sub(last_renewal.elapsed()) else {
                return Lost::RenewDeadline;
            };
            // A hung request must not outlive the deadline.
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(Verdict::Take | Verdict::Renew)) => last_renewal = attempt_started,
                Ok(Ok(Verdict::Held { holder })) => return Lost::TakenBy(holder),
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing the Lease failed"),
                Err(_) => tracing::warn!("renewing the Lease timed out"),
            }
            if last_renewal.elapsed() >= self.config.renew_deadline {
                return Lost::RenewDeadline;
            }
        }
    }

    /// Gives the Lease up (at a graceful stop), so that a standby takes over at its next retry instead of after a
    /// whole lease duration. Best effort: an error only delays the takeover.
    pub async fn release(&mut self) {
        let result = async {
            let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await.map_err(|e| self.api_error(e))?
            else {
                return Ok(());
            };
            if lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api
                .replace(&self.config.lease_name, &PostParams::default(), &lease)
                .await
                .map_err(|e| self.api_error(e))
                .map(|_| ())
        }
        .await;
        match result {
            Ok(()) => tracing::info!("leadership released"),
            Err(e) => tracing::warn!(error = %e, "releasing the Lease failed"),
        }
    }

    /// One round: read the Lease and, when the verdict allows, write our claim (a conflict means another
    /// candidate wrote first: nothing is taken this round).
    async fn try_acquire_or_renew(&mut self) -> Result<Verdict, LeaderError> {
        let now = Timestamp::now();
        let duration = self.config.lease_duration;
        let me = self.config.identity.clone();
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await.map_err(|e| self.api_error(e))? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(claimed(None, &me, now, duration)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(Verdict::Take)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Verdict::Held { holder: String::new() }),
                Err(e) => Err(self.api_error(e)),
            };
        };
        let unchanged_for = self.observe(&lease);
        let verdict = verdict(lease.spec.as_ref(), &me, unchanged_for, duration);
        if let Verdict::Held { .. } = verdict {
            return Ok(verdict);
        }
        lease.spec = Some(claimed(lease.spec.as_ref(), &me, now, duration));
        match self.api.replace(&self.config.lease_name, &PostParams::default(), &lease).await {
            Ok(written) => {
                self.observe(&written);
                Ok(verdict)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Verdict::Held { holder: String::new() }),
            Err(e) => Err(self.api_error(e)),
        }
    }

    /// Records the Lease as read; returns how long its record has been seen unchanged.
    fn observe(&mut self, lease: &Lease) -> Duration {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        match &self.observed {
            Some((seen, since)) if *seen == version => since.elapsed(),
            _ => {
                self.observed = Some((version, Instant::now()));
                Duration::ZERO
            }
        }
    }

    fn api_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api { namespace: self.config.namespace.clone(), name: self.config.lease_name.clone(), source }
    }
}

/// A candidate's identity: the pod's name (unique among replicas) or the host name, with a random suffix so that
/// a restarted process is a new candidate rather than the old holder resuming.
pub fn identity(pod_name: Option<&str>) -> String {
    let base = pod_name
        .map(str::to_string)
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "flowtel".into());
    let mut suffix = [0u8; 4];
    // Without randomness the pid still tells two processes on one host apart.
    let suffix = match getrandom::fill(&mut suffix) {
        Ok(()) => suffix.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        Err(_) => std::process::id().to_string(),
    };
    format!("{base}_{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn held_by(holder: &str, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            renew_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_free_or_released_lease_is_taken() {
        assert_eq!(verdict(None, "a", Duration::ZERO, D), Verdict::Take);
        let released = LeaseSpec { holder_identity: None, ..held_by("b", 3) };
        assert_eq!(verdict(Some(&released), "a", Duration::ZERO, D), Verdict::Take);
        let empty = LeaseSpec { holder_identity: Some(String::new()), ..held_by("b", 3) };
        assert_eq!(verdict(Some(&empty), "a", Duration::ZERO, D), Verdict::Take);
    }

    #[test]
    fn another_holder_is_respected_until_its_record_is_unchanged_for_a_whole_lease_duration() {
        let spec = held_by("b", 0);
        assert_eq!(verdict(Some(&spec), "a", Duration::ZERO, D), Verdict::Held { holder: "b".into() });
        let just_before = Duration::from_millis(14_999);
        assert_eq!(verdict(Some(&spec), "a", just_before, D), Verdict::Held { holder: "b".into() });
        assert_eq!(verdict(Some(&spec), "a", D, D), Verdict::Take);
        // The holder's own duration counts, not the candidate's.
        let long = LeaseSpec { lease_duration_seconds: Some(60), ..held_by("b", 0) };
        assert_eq!(verdict(Some(&long), "a", D, D), Verdict::Held { holder: "b".into() });
    }

    #[test]
    fn our_own_lease_is_renewed_however_old() {
        assert_eq!(verdict(Some(&held_by("a", 0)), "a", Duration::from_secs(3600), D), Verdict::Renew);
    }

    #[test]
    fn a_renewal_keeps_acquire_time_and_transitions_a_takeover_counts_one() {
        let now = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let renewed = claimed(Some(&held_by("a", 4)), "a", now, D);
        assert_eq!(renewed.acquire_time, Some(MicroTime(Timestamp::UNIX_EPOCH)));
        assert_eq!(renewed.renew_time, Some(MicroTime(now)));
        assert_eq!(renewed.lease_transitions, Some(4));
        let taken = claimed(Some(&held_by("b", 4)), "a", now, D);
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.acquire_time, Some(MicroTime(now)));
        assert_eq!(taken.lease_transitions, Some(5));
        assert_eq!(taken.lease_duration_seconds, Some(15));
        let first = claimed(None, "a", now, D);
        assert_eq!(first.lease_transitions, Some(0));
    }

    #[test]
    fn timings_must_nest() {
        let ok = ElectionConfig {
            namespace: "ns".into(),
            lease_name: "flowtel".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        };
        assert!(ok.validate().is_ok());
        let renew = ElectionConfig { renew_deadline: Duration::from_secs(15), ..ok.clone() };
        assert!(renew.validate().unwrap_err().to_string().contains("--leader-elect-renew-deadline"));
        let retry = ElectionConfig { retry_period: Duration::from_secs(10), ..ok.clone() };
        assert!(retry.validate().unwrap_err().to_string().contains("--leader-elect-retry-period"));
        let fractional = ElectionConfig { lease_duration: Duration::from_millis(15_500), ..ok };
        assert!(fractional.validate().unwrap_err().to_string().contains("--leader-elect-lease-duration"));
    }

    #[test]
    fn identities_differ_between_processes_of_one_pod() {
        let a = identity(Some("flowtel-7d9f"));
        let b = identity(Some("flowtel-7d9f"));
        assert!(a.starts_with("flowtel-7d9f_"));
        assert_ne!(a, b);
    }
}
