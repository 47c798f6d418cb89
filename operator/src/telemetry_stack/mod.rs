//! The TelemetryStack controller: this file wires the watches, caches and the controller; `reconcile.rs` holds
//! the steps, `build/` the pure builders (one file per component), `validate.rs` the checks before rollout and
//! `status.rs` the pure status.

pub mod build;
pub mod reconcile;
pub mod status;
pub mod validate;

use std::sync::Arc;

use flowtel_crds::TelemetryStack;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};

use crate::runtime::FIELD_MANAGER;
use crate::runtime::expiring::ExpiringMap;
use crate::runtime::rates::RunRates;
use crate::runtime::readiness::{Gate, SyncTracker};
use crate::runtime::slim::{self, Skips, Slim, Watched};
use build::{MANAGED_BY, MANAGED_BY_LABEL};
pub use reconcile::Context;

/// The caches of everything a stack owns, trimmed of managedFields. Secrets are not among them: flowtel holds no
/// get, list or watch on Secrets (it creates the generated admin Secret if absent, `reconcile.rs`).
#[derive(Clone)]
pub struct Caches {
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
    pub deployments: Store<Deployment>,
    pub stateful_sets: Store<StatefulSet>,
    pub daemon_sets: Store<DaemonSet>,
    pub disruption_budgets: Store<PodDisruptionBudget>,
    pub autoscalers: Store<HorizontalPodAutoscaler>,
}

fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

// The stack and its objects are read whole, but for `managedFields` (skipped while decoding: runtime::slim).
impl Skips for TelemetryStack {}
impl Skips for ConfigMap {}
impl Skips for Service {}
impl Skips for Deployment {}
impl Skips for StatefulSet {}
impl Skips for DaemonSet {}
impl Skips for PodDisruptionBudget {}
impl Skips for HorizontalPodAutoscaler {}

/// A trimmed, cached watch of the objects flowtel manages of one kind.
fn managed<K>(
    client: &Client,
    namespace: &Option<String>,
    trackers: [&SyncTracker; 2],
    what: &'static str,
) -> (Store<K>, impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static)
where
    K: Watched + Resource<Scope = kube::core::NamespaceResourceScope>,
{
    let config = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY},{}", build::STACK_LABEL));
    let (store, writer) = reflector::store();
    let stream = watcher(api::<Slim<K>>(client, namespace), config)
        .default_backoff()
        .map_ok(slim::unwrap_event)
        .reflect(writer)
        .inspect(trackers[0].watch(what))
        .inspect(trackers[1].watch(what))
        .touched_objects();
    (store, stream)
}

/// The watches `run` opens (its SyncTracker waits for each).
pub const WATCHES: usize = 8;

/// The objects flowtel would apply for `stack`, as YAML documents, the generated admin Secret included without
/// its password. With `check`, the validation a reconcile runs first; errors name the field.
pub fn render(stack: &TelemetryStack, check: bool) -> Result<String, Vec<String>> {
    let view = build::Stack::new(stack, 0.0).map_err(|e| vec![e.to_string()])?;
    if check {
        let invalid: Vec<String> = validate::spec(&stack.spec).iter().map(ToString::to_string).collect();
        if !invalid.is_empty() {
            return Err(invalid);
        }
    }
    let desired = build::desired(&view).map_err(|e| vec![e.to_string()])?;
    if check
        && let Some(config) = &desired.collector_config
        && let Some(problem) = reconcile::check_collector_config(stack, config)
    {
        return Err(vec![problem.message]);
    }
    let mut out = build::to_yaml_documents(&desired.objects);
    let grafana = &stack.spec.grafana;
    if grafana.enabled && grafana.admin_credentials_secret_ref.is_none() {
        let mut secret = build::grafana::admin_secret(&view, "");
        secret.string_data = None;
        secret.metadata.annotations = Some(std::collections::BTreeMap::from([(
            "flowtel.dev/note".to_string(),
            "created once by flowtel with a random admin-password; never applied from Git".to_string(),
        )]));
        out.push_str(&build::to_yaml_documents(&[build::StackObject::Secret(secret)]));
    }
    Ok(out)
}

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(client: Client, namespace: Option<String>, rates: RunRates, sync: SyncTracker, concurrency: u16) {
    // The stacks' watch starts once what they own is cached: a stack reconciled before would apply every object
    // again after each restart or takeover.
    let children_synced = Gate::standalone("telemetrystack-children-synced");
    let owned = SyncTracker::new(WATCHES - 1, children_synced.clone());
    let trackers = [&sync, &owned];
    let (config_maps, config_map_stream) = managed::<ConfigMap>(&client, &namespace, trackers, "stack-configmaps");
    let (services, service_stream) = managed::<Service>(&client, &namespace, trackers, "stack-services");
    let (deployments, deployment_stream) = managed::<Deployment>(&client, &namespace, trackers, "stack-deployments");
    let (stateful_sets, stateful_set_stream) =
        managed::<StatefulSet>(&client, &namespace, trackers, "stack-statefulsets");
    let (daemon_sets, daemon_set_stream) = managed::<DaemonSet>(&client, &namespace, trackers, "stack-daemonsets");
    let (disruption_budgets, pdb_stream) =
        managed::<PodDisruptionBudget>(&client, &namespace, trackers, "stack-poddisruptionbudgets");
    let (autoscalers, hpa_stream) =
        managed::<HorizontalPodAutoscaler>(&client, &namespace, trackers, "stack-horizontalpodautoscalers");

    let (stacks, stacks_writer) = reflector::store();
    let stacks_api = api::<Slim<TelemetryStack>>(&client, &namespace);
    let stacks_synced = sync.watch("stack-controller-telemetrystacks");
    let stack_stream = futures::stream::once(async move {
        children_synced.opened().await;
        watcher(stacks_api, watcher::Config::default())
            .default_backoff()
            .map_ok(slim::unwrap_event)
            .reflect(stacks_writer)
            .inspect(stacks_synced)
            .touched_objects()
    })
    .flatten();
    let context = Arc::new(Context {
        client: client.clone(),
        caches: Caches {
            config_maps,
            services,
            deployments,
            stateful_sets,
            daemon_sets,
            disruption_budgets,
            autoscalers,
        },
        rates,
        recorder: Recorder::new(client.clone(), Reporter { controller: FIELD_MANAGER.into(), instance: None }),
        applied: ExpiringMap::new(reconcile::APPLIED_MEMORY),
    });
    Controller::for_stream(stack_stream, stacks)
        .owns_stream(config_map_stream)
        .owns_stream(service_stream)
        .owns_stream(deployment_stream)
        .owns_stream(stateful_set_stream)
        .owns_stream(daemon_set_stream)
        .owns_stream(pdb_stream)
        .owns_stream(hpa_stream)
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, context)
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden files: every stack under `testdata/stacks/` rendered (and checked) as flowtel applies it (insta: a
    /// drift fails with a diff and leaves a `.snap.new` beside the file; `cargo insta review`, or
    /// `INSTA_UPDATE=always`, accepts it).
    #[test]
    fn every_golden_stack_renders_to_its_checked_in_objects() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/telemetry_stack/testdata");
        let mut inputs: Vec<_> =
            std::fs::read_dir(dir.join("stacks")).expect("testdata/stacks").map(|e| e.expect("entry").path()).collect();
        inputs.sort();
        assert_eq!(inputs.len(), 5, "every golden stack is listed and runs");
        for input in inputs {
            let stack: TelemetryStack =
                serde_yaml_ng::from_str(&std::fs::read_to_string(&input).expect("read")).expect("a TelemetryStack");
            let rendered = render(&stack, true).unwrap_or_else(|e| panic!("{}: {e:?}", input.display()));
            let name = input.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            insta::with_settings!({snapshot_path => "testdata", prepend_module_to_snapshot => false, omit_expression => true}, {
                insta::assert_snapshot!(name, rendered);
            });
        }
    }
}
