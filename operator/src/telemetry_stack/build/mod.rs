//! The objects one TelemetryStack produces: pure functions of the stack (and what flowtel observed of its
//! load), one file per component, golden-tested in `testdata/`. Nothing here talks to the apiserver.

pub mod collector;
pub mod dashboard;
pub mod grafana;
pub mod loki;
pub mod prometheus;
pub mod tempo;

use std::collections::BTreeMap;

use flowtel_crds::TelemetryStack;
use flowtel_crds::telemetry_stack::{Endpoints, LogApi, StorageSpec, TraceApi};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ContainerPort, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext,
    ResourceRequirements, SeccompProfile, Secret, SecurityContext, Service, ServicePort, ServiceSpec,
    VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::runtime::names;

pub use crate::runtime::{MANAGED_BY, MANAGED_BY_LABEL};
/// On every object of a stack: which stack made it (pruning selects by it).
pub const STACK_LABEL: &str = "flowtel.dev/stack";
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// On every applied object: the hash of what flowtel applied (see `StackObject::applied_hash`).
pub const APPLIED_HASH_ANNOTATION: &str = "flowtel.dev/applied-hash";
/// On pod templates: the hash of the configuration the pods read, so a change rolls exactly those pods.
pub const CONFIG_HASH_ANNOTATION: &str = "flowtel.dev/config-hash";

/// The components of a stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Collector,
    Prometheus,
    Tempo,
    Loki,
    Grafana,
}

impl Component {
    pub const ALL: [Component; 5] =
        [Component::Collector, Component::Prometheus, Component::Tempo, Component::Loki, Component::Grafana];

    pub fn as_str(self) -> &'static str {
        match self {
            Component::Collector => "collector",
            Component::Prometheus => "prometheus",
            Component::Tempo => "tempo",
            Component::Loki => "loki",
            Component::Grafana => "grafana",
        }
    }
}

/// Errors building a stack's objects: the stack lacks what every object needs.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BuildError {
    #[error("the TelemetryStack has no metadata.{0}")]
    MissingMetadata(&'static str),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// What the builders know besides the stack's spec: where it lives and what flowtel observed of its load.
#[derive(Clone, Debug)]
pub struct Stack<'a> {
    pub stack: &'a TelemetryStack,
    pub name: String,
    pub namespace: String,
    /// WorkflowRuns referencing the stack started per second (recent average), for `runsPerSecondPerReplica`.
    pub observed_runs_per_second: f64,
}

impl<'a> Stack<'a> {
    pub fn new(stack: &'a TelemetryStack, observed_runs_per_second: f64) -> Result<Self, BuildError> {
        let name = stack.metadata.name.clone().ok_or(BuildError::MissingMetadata("name"))?;
        let namespace = stack.metadata.namespace.clone().ok_or(BuildError::MissingMetadata("namespace"))?;
        Ok(Self { stack, name, namespace, observed_runs_per_second })
    }

    /// `<stack>-<component>[-<suffix>]`, at most 63 characters (a Service name and a label value).
    pub fn object_name(&self, component: Component, suffix: Option<&str>) -> String {
        let full = match suffix {
            Some(s) => format!("{}-{}-{s}", self.name, component.as_str()),
            None => format!("{}-{}", self.name, component.as_str()),
        };
        names::shorten(&full, 63)
    }

    /// The stack's name as a label value.
    pub fn label_value(&self) -> String {
        names::shorten(&self.name, 63)
    }

    /// Labels that select a component's pods.
    pub fn selector(&self, component: Component) -> BTreeMap<String, String> {
        BTreeMap::from([
            (NAME_LABEL.to_string(), component.as_str().to_string()),
            (INSTANCE_LABEL.to_string(), self.label_value()),
        ])
    }

    /// Labels of a component's pods: the selector and the stack. Not managed-by: the pods are the workloads'.
    pub fn pod_labels(&self, component: Component) -> BTreeMap<String, String> {
        let mut labels = self.selector(component);
        labels.insert(COMPONENT_LABEL.into(), "telemetry".into());
        labels.insert(STACK_LABEL.into(), self.label_value());
        labels
    }

    /// Metadata of an object flowtel applies for this stack: owned by it (garbage collection on delete), labelled
    /// for pruning.
    pub fn metadata(&self, component: Component, name: String) -> ObjectMeta {
        let mut labels = self.pod_labels(component);
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: self.owner_reference().map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }

    fn owner_reference(&self) -> Option<OwnerReference> {
        let uid = self.stack.uid()?;
        Some(OwnerReference {
            api_version: TelemetryStack::api_version(&()).into_owned(),
            kind: TelemetryStack::kind(&()).into_owned(),
            name: self.stack.name_any(),
            uid,
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
    }

    fn service_host(&self, component: Component) -> String {
        format!("{}.{}.svc", self.object_name(component, None), self.namespace)
    }

    /// Where the collector exports metrics: Prometheus' OTLP receiver (deployed or external).
    pub fn prometheus_url(&self) -> Option<String> {
        let p = &self.stack.spec.prometheus;
        if p.enabled {
            Some(format!("http://{}:{}", self.service_host(Component::Prometheus), prometheus::HTTP_PORT))
        } else {
            p.external_url.as_ref().map(|u| u.trim_end_matches('/').to_string())
        }
    }

    /// Tempo's HTTP API (deployed or external).
    pub fn tempo_url(&self) -> Option<String> {
        let t = &self.stack.spec.tempo;
        if t.enabled {
            Some(format!("http://{}:{}", self.service_host(Component::Tempo), tempo::HTTP_PORT))
        } else {
            t.external_query_url.as_ref().or(t.external_url.as_ref()).map(|u| trim(u))
        }
    }

    /// Which API the trace backend serves (a deployed one is Tempo).
    pub fn trace_api(&self) -> TraceApi {
        let t = &self.stack.spec.tempo;
        if t.enabled { TraceApi::Tempo } else { t.external_api.unwrap_or_default() }
    }

    /// Where the collector sends traces over OTLP/HTTP: an external backend's OTLP traces path.
    pub fn traces_otlp_http(&self) -> Option<String> {
        let t = &self.stack.spec.tempo;
        if t.enabled { None } else { t.external_url.as_ref().map(|u| format!("{}/v1/traces", trim(u))) }
    }

    /// Where the collector sends traces over OTLP gRPC: the deployed Tempo's distributor, else None (an external
    /// Tempo is reached over OTLP HTTP at its base URL).
    pub fn tempo_otlp_grpc(&self) -> Option<String> {
        self.stack
            .spec
            .tempo
            .enabled
            .then(|| format!("{}:{}", self.service_host(Component::Tempo), tempo::OTLP_GRPC_PORT))
    }

    /// The log backend's HTTP API (a deployed Loki, or the external backend).
    pub fn loki_url(&self) -> Option<String> {
        let l = &self.stack.spec.loki;
        if l.enabled {
            Some(format!("http://{}:{}", self.service_host(Component::Loki), loki::HTTP_PORT))
        } else {
            l.external_url.as_ref().map(|u| trim(u))
        }
    }

    /// Which API the log backend serves (a deployed one is Loki).
    pub fn log_api(&self) -> LogApi {
        let l = &self.stack.spec.loki;
        if l.enabled { LogApi::Loki } else { l.external_api.unwrap_or_default() }
    }

    /// Where the collector sends logs over OTLP/HTTP: the path the log backend's API takes them at.
    pub fn logs_otlp_http(&self) -> Option<String> {
        let path = match self.log_api() {
            LogApi::Loki => "/otlp/v1/logs",
            LogApi::VictoriaLogs => "/insert/opentelemetry/v1/logs",
        };
        self.loki_url().map(|url| format!("{url}{path}"))
    }

    /// The stack's endpoints, as WorkflowRuns and people reach them (in-cluster URLs or the external ones).
    pub fn endpoints(&self) -> Endpoints {
        let spec = &self.stack.spec;
        let collector = &spec.collector;
        let (otlp_grpc, otlp_http) = if collector.enabled {
            let host = self.service_host(Component::Collector);
            (
                Some(format!("http://{host}:{}", collector::OTLP_GRPC_PORT)),
                Some(format!("http://{host}:{}", collector::OTLP_HTTP_PORT)),
            )
        } else {
            (collector.external_endpoint.clone(), None)
        };
        Endpoints {
            otlp_grpc,
            otlp_http,
            prometheus: self.prometheus_url(),
            tempo: self.tempo_url(),
            loki: self.loki_url(),
            grafana: spec
                .grafana
                .enabled
                .then(|| format!("http://{}:{}", self.service_host(Component::Grafana), grafana::HTTP_PORT)),
        }
    }
}

/// One object flowtel applies for a stack.
#[derive(Clone, Debug, PartialEq)]
pub enum StackObject {
    ConfigMap(ConfigMap),
    Secret(Secret),
    Service(Service),
    Deployment(Deployment),
    StatefulSet(StatefulSet),
    DaemonSet(DaemonSet),
    PodDisruptionBudget(PodDisruptionBudget),
    HorizontalPodAutoscaler(HorizontalPodAutoscaler),
}

/// The kinds a stack's objects have, in apply order (configuration before the workloads that read it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ConfigMap,
    Secret,
    Service,
    Deployment,
    StatefulSet,
    DaemonSet,
    PodDisruptionBudget,
    HorizontalPodAutoscaler,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::ConfigMap,
        Kind::Secret,
        Kind::Service,
        Kind::Deployment,
        Kind::StatefulSet,
        Kind::DaemonSet,
        Kind::PodDisruptionBudget,
        Kind::HorizontalPodAutoscaler,
    ];
}

impl StackObject {
    pub fn kind(&self) -> Kind {
        match self {
            StackObject::ConfigMap(_) => Kind::ConfigMap,
            StackObject::Secret(_) => Kind::Secret,
            StackObject::Service(_) => Kind::Service,
            StackObject::Deployment(_) => Kind::Deployment,
            StackObject::StatefulSet(_) => Kind::StatefulSet,
            StackObject::DaemonSet(_) => Kind::DaemonSet,
            StackObject::PodDisruptionBudget(_) => Kind::PodDisruptionBudget,
            StackObject::HorizontalPodAutoscaler(_) => Kind::HorizontalPodAutoscaler,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            StackObject::ConfigMap(o) => &o.metadata,
            StackObject::Secret(o) => &o.metadata,
            StackObject::Service(o) => &o.metadata,
            StackObject::Deployment(o) => &o.metadata,
            StackObject::StatefulSet(o) => &o.metadata,
            StackObject::DaemonSet(o) => &o.metadata,
            StackObject::PodDisruptionBudget(o) => &o.metadata,
            StackObject::HorizontalPodAutoscaler(o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            StackObject::ConfigMap(o) => &mut o.metadata,
            StackObject::Secret(o) => &mut o.metadata,
            StackObject::Service(o) => &mut o.metadata,
            StackObject::Deployment(o) => &mut o.metadata,
            StackObject::StatefulSet(o) => &mut o.metadata,
            StackObject::DaemonSet(o) => &mut o.metadata,
            StackObject::PodDisruptionBudget(o) => &mut o.metadata,
            StackObject::HorizontalPodAutoscaler(o) => &mut o.metadata,
        }
    }

    pub fn name(&self) -> String {
        self.metadata().name.clone().unwrap_or_default()
    }

    /// The hash of everything flowtel applies for this object, recorded on it: an object whose cached copy
    /// carries the same hash is not applied again, so a reconcile without a change writes nothing.
    pub fn applied_hash(&self) -> Option<&str> {
        self.metadata().annotations.as_ref()?.get(APPLIED_HASH_ANNOTATION).map(String::as_str)
    }

    /// The object as JSON, with apiVersion and kind.
    pub fn to_value(&self) -> serde_json::Value {
        let value = match self {
            StackObject::ConfigMap(o) => serde_json::to_value(o),
            StackObject::Secret(o) => serde_json::to_value(o),
            StackObject::Service(o) => serde_json::to_value(o),
            StackObject::Deployment(o) => serde_json::to_value(o),
            StackObject::StatefulSet(o) => serde_json::to_value(o),
            StackObject::DaemonSet(o) => serde_json::to_value(o),
            StackObject::PodDisruptionBudget(o) => serde_json::to_value(o),
            StackObject::HorizontalPodAutoscaler(o) => serde_json::to_value(o),
        };
        // Serialising a k8s-openapi object cannot fail: every field is plain data.
        value.unwrap_or(serde_json::Value::Null)
    }
}

/// Everything a stack produces, in apply order, plus the configuration files flowtel validates before rollout.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub objects: Vec<StackObject>,
    /// The collector's configuration (YAML) when the collector is deployed.
    pub collector_config: Option<String>,
    /// Prometheus' configuration (YAML) when Prometheus is deployed.
    pub prometheus_config: Option<String>,
}

/// The objects of every enabled component. The generated Grafana admin Secret is left out: its password is drawn
/// once, when flowtel creates it, and never re-applied (see `grafana::admin_secret`).
pub fn desired(stack: &Stack<'_>) -> Result<Desired, BuildError> {
    let spec = &stack.stack.spec;
    let mut out = Desired::default();
    if spec.collector.enabled {
        let c = collector::build(stack)?;
        out.collector_config = Some(c.config_yaml);
        out.objects.extend(c.objects);
    }
    if spec.prometheus.enabled {
        let p = prometheus::build(stack);
        out.prometheus_config = Some(p.config_yaml);
        out.objects.extend(p.objects);
    }
    if spec.tempo.enabled {
        out.objects.extend(tempo::build(stack));
    }
    if spec.loki.enabled {
        out.objects.extend(loki::build(stack));
    }
    if spec.grafana.enabled {
        out.objects.extend(grafana::build(stack));
    }
    out.objects.sort_by_key(|o| o.kind());
    for object in &mut out.objects {
        let hash = names::content_hash(&object.to_value().to_string());
        object.metadata_mut().annotations.get_or_insert_default().insert(APPLIED_HASH_ANNOTATION.into(), hash);
    }
    Ok(out)
}

/// A user's URL without its trailing slashes, so paths can be appended.
fn trim(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

/// The YAML documents of `objects`, as `flowtel render` prints them.
pub fn to_yaml_documents(objects: &[StackObject]) -> String {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&o.to_value()).unwrap_or_default());
    }
    out
}

// Shared pieces of the component builders.

/// A ConfigMap with one or more files.
pub(crate) fn config_map(stack: &Stack<'_>, component: Component, name: String, files: &[(&str, &str)]) -> StackObject {
    StackObject::ConfigMap(ConfigMap {
        metadata: stack.metadata(component, name),
        data: Some(files.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..ConfigMap::default()
    })
}

/// A ClusterIP Service over the component's pods.
pub(crate) fn service(stack: &Stack<'_>, component: Component, ports: &[(&str, i32)]) -> StackObject {
    StackObject::Service(Service {
        metadata: stack.metadata(component, stack.object_name(component, None)),
        spec: Some(ServiceSpec {
            selector: Some(stack.selector(component)),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| ServicePort {
                        name: Some(name.to_string()),
                        port: *port,
                        target_port: Some(IntOrString::String(name.to_string())),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

pub(crate) fn container_ports(ports: &[(&str, i32)]) -> Vec<ContainerPort> {
    ports
        .iter()
        .map(|(name, port)| ContainerPort {
            name: Some(name.to_string()),
            container_port: *port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        })
        .collect()
}

/// Pod Security Standard "restricted" at pod level: non-root as `uid`, the runtime's seccomp profile.
pub(crate) fn restricted_pod(uid: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..PodSecurityContext::default()
    }
}

/// Pod Security Standard "restricted" at container level, with a read-only root filesystem.
pub(crate) fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..SecurityContext::default()
    }
}

/// The user's resources, else modest defaults: every component gets a memory limit (the collector's memory limiter
/// is a percentage of it).
pub(crate) fn resources(
    given: &Option<ResourceRequirements>,
    cpu: &str,
    memory: &str,
    memory_limit: &str,
) -> ResourceRequirements {
    given.clone().unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(memory.into())),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), Quantity(memory_limit.into()))])),
        ..ResourceRequirements::default()
    })
}

/// A volume claim template named `name` from a backend's storage spec (10Gi on the default class when unset).
pub(crate) fn claim_template(name: &str, storage: &StorageSpec, default_size: &str) -> PersistentVolumeClaim {
    claim(
        name,
        storage.size.clone().unwrap_or_else(|| Quantity(default_size.into())),
        storage.storage_class_name.clone(),
    )
}

pub(crate) fn claim(name: &str, size: Quantity, class: Option<String>) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: class,
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), size)])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// Pod template annotations: the hash of the configuration the pods read.
pub(crate) fn hash_annotation(config: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_string(), names::content_hash(config))])
}

/// `value` rendered as YAML (configuration files are generated as JSON values, then written as YAML).
pub(crate) fn yaml(value: &serde_json::Value) -> String {
    serde_yaml_ng::to_string(value).unwrap_or_default()
}

/// What a backend StatefulSet (Prometheus, Tempo, Loki) is made of.
pub(crate) struct Backend<'a> {
    pub component: Component,
    pub image: &'a str,
    pub uid: i64,
    pub replicas: i32,
    pub args: Vec<String>,
    /// The ConfigMap mounted read-only at `config_dir`, and the configuration text its hash is taken from.
    pub config_name: String,
    pub config_dir: &'a str,
    pub config_text: &'a str,
    /// The claimed volume, mounted at `data_dir`.
    pub data_dir: &'a str,
    pub storage: &'a StorageSpec,
    pub ports: &'a [(&'a str, i32)],
    /// HTTP path and port name of the readiness probe.
    pub ready_path: &'a str,
    pub resources: ResourceRequirements,
}

/// A backend in single-binary mode: a StatefulSet with its configuration and a claimed data volume.
pub(crate) fn backend_statefulset(stack: &Stack<'_>, b: Backend<'_>) -> StackObject {
    use k8s_openapi::api::apps::v1::StatefulSetSpec;
    use k8s_openapi::api::core::v1::{
        ConfigMapVolumeSource, Container, EmptyDirVolumeSource, HTTPGetAction, PodSpec, PodTemplateSpec, Probe, Volume,
        VolumeMount,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    let name = stack.object_name(b.component, None);
    let mount = |volume: &str, path: &str, read_only: bool| VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    StackObject::StatefulSet(StatefulSet {
        metadata: stack.metadata(b.component, name.clone()),
        spec: StatefulSetSpec {
            replicas: Some(b.replicas),
            service_name: Some(name),
            selector: LabelSelector { match_labels: Some(stack.selector(b.component)), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(stack.pod_labels(b.component)),
                    annotations: Some(hash_annotation(b.config_text)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    security_context: Some(restricted_pod(b.uid)),
                    containers: vec![Container {
                        name: b.component.as_str().into(),
                        image: Some(b.image.into()),
                        args: Some(b.args),
                        ports: Some(container_ports(b.ports)),
                        resources: Some(b.resources),
                        readiness_probe: Some(Probe {
                            http_get: Some(HTTPGetAction {
                                path: Some(b.ready_path.into()),
                                port: IntOrString::String(b.ports[0].0.into()),
                                ..HTTPGetAction::default()
                            }),
                            period_seconds: Some(10),
                            ..Probe::default()
                        }),
                        security_context: Some(restricted_container()),
                        volume_mounts: Some(vec![
                            mount("config", b.config_dir, true),
                            mount("data", b.data_dir, false),
                            mount("tmp", "/tmp", false),
                        ]),
                        ..Container::default()
                    }],
                    volumes: Some(vec![
                        Volume {
                            name: "config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: b.config_name,
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            name: "tmp".into(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Volume::default()
                        },
                    ]),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![claim_template("data", b.storage, "10Gi")]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    })
}
