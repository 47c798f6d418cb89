//! The stack's status as a pure function of the stack, what flowtel applied and what the workloads report:
//! per-component readiness, the endpoints WorkflowRuns use, and the conditions `Ready`, `Progressing` and
//! `Degraded` by the Kubernetes API conventions (kstatus and Argo CD read them).

use flowtel_crds::TelemetryStack;
use flowtel_crds::telemetry_stack::{ComponentStatus, ComponentsStatus, Endpoints, TelemetryStackStatus};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};

use super::build::{Component, Stack};
use crate::runtime::conditions::set_condition;

/// The reasons of a stack's conditions (CamelCase, as the API conventions ask); a refused spec's reason is the
/// problem's own (`InvalidSpec`, `InvalidCollectorConfig`, `AdminSecretNotFound`).
pub mod reason {
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const ALL_COMPONENTS_READY: &str = "AllComponentsReady";
    pub const COMPONENTS_NOT_READY: &str = "ComponentsNotReady";
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const INVALID_COLLECTOR_CONFIG: &str = "InvalidCollectorConfig";
    pub const ADMIN_SECRET_NOT_FOUND: &str = "AdminSecretNotFound";
}

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";

/// A component's workload as the caches hold it.
#[derive(Clone, Debug)]
pub enum Workload {
    Deployment(Deployment),
    StatefulSet(StatefulSet),
    DaemonSet(DaemonSet),
}

/// Desired and ready replicas of a workload, and whether its rollout of the current template is complete.
fn rollout(workload: &Workload) -> (i32, i32, bool) {
    match workload {
        Workload::Deployment(d) => {
            let s = d.status.clone().unwrap_or_default();
            let desired = d.spec.replicas.unwrap_or(1);
            let current = s.observed_generation >= d.metadata.generation;
            let ready = s.ready_replicas.unwrap_or(0);
            let done = current
                && s.updated_replicas.unwrap_or(0) >= desired
                && ready >= desired
                && s.replicas.unwrap_or(0) <= desired;
            (desired, ready, done)
        }
        Workload::StatefulSet(t) => {
            let s = t.status.clone().unwrap_or_default();
            let desired = t.spec.replicas.unwrap_or(1);
            let current = s.observed_generation >= t.metadata.generation;
            let ready = s.ready_replicas.unwrap_or(0);
            let revision_done = s.update_revision.is_none() || s.update_revision == s.current_revision;
            let done = current && revision_done && s.updated_replicas.unwrap_or(0) >= desired && ready >= desired;
            (desired, ready, done)
        }
        Workload::DaemonSet(d) => {
            let s = d.status.clone().unwrap_or_default();
            let current = s.observed_generation >= d.metadata.generation;
            let desired = s.desired_number_scheduled;
            let done = current
                && s.updated_number_scheduled.unwrap_or(0) >= desired
                && s.number_ready >= desired
                && desired > 0;
            (desired, s.number_ready, done)
        }
    }
}

/// What went wrong before (or while) applying, if anything: the Degraded condition's reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: String,
    pub message: String,
}

/// The status to write: `stored` with every field recomputed; conditions keep their transition times unless
/// they flip.
pub fn compute(
    stack: &Stack<'_>,
    stored: &TelemetryStackStatus,
    workload: impl Fn(Component) -> Option<Workload>,
    problem: Option<&Problem>,
    now: Timestamp,
) -> TelemetryStackStatus {
    let spec = &stack.stack.spec;
    let mut components = ComponentsStatus::default();
    let mut all_ready = true;
    let mut rolling = Vec::new();
    let urls = stack.endpoints();
    for component in Component::ALL {
        let (enabled, external) = match component {
            Component::Collector => (spec.collector.enabled, spec.collector.external_endpoint.clone()),
            Component::Prometheus => (spec.prometheus.enabled, spec.prometheus.external_url.clone()),
            Component::Tempo => (spec.tempo.enabled, spec.tempo.external_url.clone()),
            Component::Loki => (spec.loki.enabled, spec.loki.external_url.clone()),
            Component::Grafana => (spec.grafana.enabled, None),
        };
        let status = if enabled {
            Some(match workload(component) {
                None => {
                    all_ready = false;
                    rolling.push(component.as_str());
                    ComponentStatus { ready: false, message: Some("not created yet".into()), ..Default::default() }
                }
                Some(w) => {
                    let (replicas, ready_replicas, done) = rollout(&w);
                    if !done {
                        all_ready = false;
                        rolling.push(component.as_str());
                    }
                    ComponentStatus {
                        ready: done,
                        replicas,
                        ready_replicas,
                        message: (!done).then(|| format!("{ready_replicas}/{replicas} replicas ready and updated")),
                    }
                }
            })
        } else {
            external.map(|url| ComponentStatus {
                ready: true,
                message: Some(format!("external: {url}")),
                ..Default::default()
            })
        };
        let slot = match component {
            Component::Collector => &mut components.collector,
            Component::Prometheus => &mut components.prometheus,
            Component::Tempo => &mut components.tempo,
            Component::Loki => &mut components.loki,
            Component::Grafana => &mut components.grafana,
        };
        *slot = status;
    }
    // An endpoint is published once its component serves it (a ready replica, or an external URL), so a
    // WorkflowRun never points its workload at a collector that is not there yet, and a rollout never hides it.
    let ready = |c: &Option<ComponentStatus>| c.as_ref().is_some_and(|s| s.ready || s.ready_replicas > 0);
    let endpoints = Endpoints {
        otlp_grpc: urls.otlp_grpc.filter(|_| ready(&components.collector)),
        otlp_http: urls.otlp_http.filter(|_| ready(&components.collector)),
        prometheus: urls.prometheus.filter(|_| ready(&components.prometheus)),
        tempo: urls.tempo.filter(|_| ready(&components.tempo)),
        loki: urls.loki.filter(|_| ready(&components.loki)),
        grafana: urls.grafana.filter(|_| ready(&components.grafana)),
    };

    let generation = stack.stack.metadata.generation;
    let mut conditions = stored.conditions.clone();
    match problem {
        Some(p) => {
            set_condition(&mut conditions, DEGRADED, "True", &p.reason, &p.message, generation, now);
            let message = format!("{} (the running stack is left as it was)", p.message);
            set_condition(&mut conditions, READY, "False", &p.reason, &message, generation, now);
        }
        None => {
            set_condition(&mut conditions, DEGRADED, "False", reason::AS_EXPECTED, "", generation, now);
            if all_ready {
                set_condition(&mut conditions, READY, "True", reason::ALL_COMPONENTS_READY, "", generation, now);
            } else {
                let message = format!("waiting for {}", rolling.join(", "));
                set_condition(&mut conditions, READY, "False", reason::COMPONENTS_NOT_READY, &message, generation, now);
            }
        }
    }
    if let Some(p) = problem {
        // Refused: nothing is being rolled out, and nothing will be until the spec changes.
        set_condition(&mut conditions, PROGRESSING, "False", &p.reason, &p.message, generation, now);
        set_condition(&mut conditions, RECONCILING, "False", &p.reason, &p.message, generation, now);
    } else if rolling.is_empty() {
        set_condition(&mut conditions, PROGRESSING, "False", reason::ROLLOUT_COMPLETE, "", generation, now);
        set_condition(&mut conditions, RECONCILING, "False", reason::ROLLOUT_COMPLETE, "", generation, now);
    } else {
        let message = format!("rolling out {}", rolling.join(", "));
        set_condition(&mut conditions, PROGRESSING, "True", reason::ROLLING_OUT, &message, generation, now);
        set_condition(&mut conditions, RECONCILING, "True", reason::ROLLING_OUT, &message, generation, now);
    }
    // kstatus (Flux, kpt) reads Reconciling and Stalled: a stack refused for bad input is Failed, not InProgress.
    match problem {
        Some(p) => set_condition(&mut conditions, STALLED, "True", &p.reason, &p.message, generation, now),
        None => set_condition(&mut conditions, STALLED, "False", reason::AS_EXPECTED, "", generation, now),
    };
    TelemetryStackStatus { components, endpoints, conditions, observed_generation: generation }
}

/// Whether `stack`'s stored status says it is Ready.
pub fn is_ready(stack: &TelemetryStack) -> bool {
    stack.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == READY && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus, StatefulSetSpec, StatefulSetStatus};

    fn stack(spec: serde_json::Value) -> TelemetryStack {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack",
            "metadata": {"name": "s", "namespace": "ns", "uid": "u", "generation": 2},
            "spec": spec,
        }))
        .expect("stack")
    }

    fn deployment(ready: i32) -> Workload {
        let mut d =
            Deployment { spec: DeploymentSpec { replicas: Some(1), ..Default::default() }, ..Default::default() };
        d.metadata.generation = Some(1);
        d.status = Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(1),
            updated_replicas: Some(1),
            ready_replicas: Some(ready),
            ..Default::default()
        });
        Workload::Deployment(d)
    }

    fn statefulset(ready: i32) -> Workload {
        let mut s =
            StatefulSet { spec: StatefulSetSpec { replicas: Some(1), ..Default::default() }, ..Default::default() };
        s.metadata.generation = Some(1);
        s.status = Some(StatefulSetStatus {
            observed_generation: Some(1),
            replicas: 1,
            updated_replicas: Some(1),
            ready_replicas: Some(ready),
            ..Default::default()
        });
        Workload::StatefulSet(s)
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("time")
    }

    fn get<'a>(
        status: &'a TelemetryStackStatus,
        type_: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        status.conditions.iter().find(|c| c.type_ == type_).expect("condition")
    }

    #[test]
    fn ready_when_every_enabled_component_is_and_endpoints_follow_readiness() {
        let s = stack(serde_json::json!({"loki": {"enabled": false}, "grafana": {"enabled": false}}));
        let view = Stack::new(&s, 0.0).expect("view");
        let pending = compute(
            &view,
            &Default::default(),
            |c| match c {
                Component::Collector => Some(deployment(0)),
                _ => Some(statefulset(1)),
            },
            None,
            at(100),
        );
        assert_eq!(get(&pending, READY).status, "False");
        assert_eq!(get(&pending, READY).reason, "ComponentsNotReady");
        assert_eq!(get(&pending, PROGRESSING).status, "True");
        assert_eq!(pending.endpoints.otlp_grpc, None, "no endpoint before the collector is ready");
        assert_eq!(pending.endpoints.prometheus.as_deref(), Some("http://s-prometheus.ns.svc:9090"));
        assert_eq!(pending.observed_generation, Some(2));
        assert!(pending.components.loki.is_none() && pending.components.grafana.is_none());

        let ready = compute(
            &view,
            &pending,
            |c| match c {
                Component::Collector => Some(deployment(1)),
                _ => Some(statefulset(1)),
            },
            None,
            at(200),
        );
        assert_eq!(get(&ready, READY).status, "True");
        assert_eq!(get(&ready, READY).last_transition_time.0, at(200), "a flip moves the transition time");
        assert_eq!(get(&ready, DEGRADED).last_transition_time.0, at(100), "no flip, no new transition time");
        assert_eq!(ready.endpoints.otlp_grpc.as_deref(), Some("http://s-collector.ns.svc:4317"));

        let again = compute(
            &view,
            &ready,
            |c| match c {
                Component::Collector => Some(deployment(1)),
                _ => Some(statefulset(1)),
            },
            None,
            at(300),
        );
        assert_eq!(again, ready, "nothing changed, nothing to write");
    }

    #[test]
    fn a_problem_is_degraded_and_not_ready_while_the_running_endpoints_stay() {
        let s = stack(serde_json::json!({}));
        let view = Stack::new(&s, 0.0).expect("view");
        let problem =
            Problem { reason: "InvalidCollectorConfig".into(), message: "spec.collector.configOverride: x".into() };
        let status = compute(
            &view,
            &Default::default(),
            |c| match c {
                Component::Collector | Component::Grafana => Some(deployment(1)),
                _ => Some(statefulset(1)),
            },
            Some(&problem),
            at(10),
        );
        assert_eq!(get(&status, DEGRADED).status, "True");
        assert_eq!(get(&status, DEGRADED).reason, "InvalidCollectorConfig");
        assert_eq!(get(&status, READY).status, "False");
        assert_eq!(get(&status, STALLED).status, "True", "kstatus: Failed");
        assert_eq!(get(&status, RECONCILING).status, "False", "nothing rolls out while refused");
        assert!(status.endpoints.otlp_grpc.is_some());
    }

    #[test]
    fn external_backends_count_as_ready_and_publish_their_url() {
        let s = stack(serde_json::json!({
            "prometheus": {"enabled": false, "externalUrl": "http://prom.example:9090/"},
            "tempo": {"enabled": false}, "loki": {"enabled": false}, "grafana": {"enabled": false},
        }));
        let view = Stack::new(&s, 0.0).expect("view");
        let status = compute(&view, &Default::default(), |_| Some(deployment(1)), None, at(1));
        assert_eq!(get(&status, READY).status, "True");
        assert_eq!(status.endpoints.prometheus.as_deref(), Some("http://prom.example:9090"));
        assert!(status.components.prometheus.as_ref().is_some_and(|p| p.ready));
    }
}
