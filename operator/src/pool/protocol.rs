//! The dispatch protocol between the leader and the worker agents: JSON over one long-polled HTTP request at a time.
//! A worker says what it runs or has just ended; the leader answers, at once or when it has something, with an
//! attempt to run or one to kill. An idle worker's request is held (`IDLE_HOLD`); a busy one's comes back every
//! `HEARTBEAT`, which is how the leader sees a worker die.

use std::time::Duration;

use k8s_openapi::api::core::v1::EnvVar;
use serde::{Deserialize, Serialize};

/// The path of the one endpoint.
pub const POLL_PATH: &str = "/v1/poll";
/// How long the leader holds an idle worker's request before answering "nothing".
pub const IDLE_HOLD: Duration = Duration::from_secs(20);
/// How often a busy worker reports that it is still running its attempt.
pub const HEARTBEAT: Duration = Duration::from_secs(3);

/// What a worker's log shows of an attempt: each line of its process's stdout and stderr behind `[<job name>] `, then
/// `[<job name>: ended]` once the process and all it started are gone (`kubectl flowtel logs` reads these).
pub fn log_prefix(job_name: &str) -> String {
    format!("[{job_name}] ")
}

/// The line after an attempt's last (`log_prefix`).
pub fn log_end(job_name: &str) -> String {
    format!("[{job_name}: ended]")
}

/// The attempt's job name: its key without the namespace.
pub fn job_name_of(key: &str) -> &str {
    key.split_once('/').map_or(key, |(_, job)| job)
}

/// One attempt handed to a worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// `<namespace>/<job name>`: the attempt, unique, and the same under any leader.
    pub key: String,
    /// The run's namespace and name (a new leader adopts a running attempt by it).
    pub run: RunName,
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// The process's environment, as a Job's container would have it: plain values, and field references to the
    /// worker pod's name and node, which the agent resolves.
    pub env: Vec<EnvVar>,
    /// What remains of the run's deadline: the agent kills the process past it even when the leader is away.
    pub deadline_seconds: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunName {
    pub namespace: String,
    pub name: String,
}

/// A worker's request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Poll {
    /// `<namespace>/<pool>`.
    pub pool: String,
    /// The worker pod's name.
    pub worker: String,
    #[serde(default)]
    pub node: String,
    /// The agent process (random at its start) and its request's number, rising: a request that arrives after a
    /// later one of the same agent (a retried or abandoned one) is stale and changes nothing.
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub seq: u64,
    /// The attempt running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<Running>,
    /// Attempts that ended and whose end the leader has not yet said is recorded (`Answer::recorded`), oldest
    /// first: sent again with every request, to whichever leader answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ended: Vec<Ended>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Running {
    pub key: String,
    pub run: RunName,
}

/// How a process ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Ended {
    pub key: String,
    /// The attempt's run: a new leader adopts an end reported to its predecessor by it.
    pub run: RunName,
    /// The exit code; a process ended by a signal reports 128 + the signal, as a container does.
    pub exit_code: i32,
    /// Why, in a container's words: Completed, Error, DeadlineExceeded (the agent killed it at the deadline),
    /// Fenced (the agent lost the leader and killed it), Killed (the leader asked), StartFailed.
    pub reason: String,
    /// RFC 3339, when the process ended.
    pub finished_at: String,
}

/// The leader's answer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assign: Option<Box<Assignment>>,
    /// Kill this attempt's process (the run was cancelled, passed its deadline, or the attempt is no longer the
    /// leader's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill: Option<String>,
    /// How long the agent may go without an answer before it kills what it runs (self-fencing): a new leader
    /// waits this long before it declares unclaimed attempts lost.
    pub fence_seconds: u64,
    /// Who answers (each leader process has its own id).
    #[serde(default)]
    pub leader: String,
    /// Reported ends that the run's status now holds (or that are past saving): the agent forgets them. Until then
    /// it reports them again and is given no new attempt, so an end is never lost with the leader that heard it
    /// (the leader may have exported the run's report already) while its worker goes on to other runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recorded: Vec<String>,
}
