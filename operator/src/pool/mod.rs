//! Pooled execution (docs/pooled-execution.md): WorkerPools of warm worker pods, the leader's dispatcher that hands
//! pooled runs' attempts to their workers over its own connection (no apiserver object per run), and the agent that
//! runs inside each worker. What a pooled run's attempt *is* (its environment, how its end reads as a Job's) is the
//! WorkflowRun controller's (`workflow_run::pooled`); this module knows nothing of runs but their names.

pub mod agent;
pub mod auth;
pub mod controller;
pub mod dispatch;
pub mod protocol;
