//! The worker agent (`flowtel worker -- COMMAND...`): runs in each worker pod in front of the pool's command, asks
//! the leader for an attempt, runs it as a fresh process with the attempt's environment, reports its end, and asks
//! again. One attempt at a time. It kills its process at the attempt's deadline, when the leader says so, when its
//! pod is stopped, and when it has not reached the leader for the fence period (then a new leader may run the
//! run's next attempt elsewhere: never two at once).

use std::collections::HashMap;
use std::process::ExitStatus;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::EnvVar;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::protocol::{
    Answer, Assignment, Ended, HEARTBEAT, IDLE_HOLD, POLL_PATH, Poll, Running, job_name_of, log_end, log_prefix,
};

/// How long the last of an ended attempt's output may take to reach the log (what it started is killed by then).
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);
/// How long a process has between SIGTERM and SIGKILL (a pod's default grace).
const KILL_GRACE: Duration = Duration::from_secs(10);
/// Variables of the agent's own, not passed to the workload.
const AGENT_VARS: [&str; 3] = ["FLOWTEL_DISPATCH_URL", "FLOWTEL_POOL", "FLOWTEL_TOKEN_FILE"];

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("FLOWTEL_DISPATCH_URL {0:?} is not a URL")]
    Url(String),
    #[error("the pool's command is empty")]
    NoCommand,
}

/// Where the agent is and whom it asks.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// e.g. `http://flowtel-dispatch.flowtel-system.svc:8090`.
    pub dispatch_url: String,
    /// `<namespace>/<pool>`.
    pub pool: String,
    pub pod_name: String,
    pub node_name: String,
    pub namespace: String,
    /// The pool's command; an assignment's argv replaces it (it starts with it).
    pub command: Vec<String>,
    /// The pod's ServiceAccount token, read before every request (the kubelet rotates it).
    pub token_file: Option<std::path::PathBuf>,
}

/// A Job container's environment as the kubelet would resolve it in this pod: field references to the pod's name,
/// namespace and node, and `$(VAR)` references to variables defined earlier in the list.
pub fn resolve_env(env: &[EnvVar], pod_name: &str, node_name: &str, namespace: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for var in env {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("metadata.name") => pod_name.to_string(),
                Some("spec.nodeName") => node_name.to_string(),
                Some("metadata.namespace") => namespace.to_string(),
                _ => String::new(),
            },
            _ => String::new(),
        };
        let mut expanded = value;
        for (name, v) in &out {
            expanded = expanded.replace(&format!("$({name})"), v);
        }
        out.push((var.name.clone(), expanded));
    }
    out
}

/// The process an attempt runs in.
struct Current {
    assignment: Assignment,
    child: Child,
    /// The tasks copying its stdout and stderr to the worker's, each line marked with the attempt (`log_prefix`).
    output: Vec<tokio::task::JoinHandle<()>>,
    deadline: Instant,
    /// Why the agent is stopping it, once it is.
    stopping: Option<(&'static str, Instant)>,
}

/// Runs until SIGTERM; then stops the current process, reports it, and returns.
pub async fn run(config: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    let uri: hyper::Uri = format!("{}{POLL_PATH}", config.dispatch_url.trim_end_matches('/'))
        .parse()
        .map_err(|_| AgentError::Url(config.dispatch_url.clone()))?;
    if config.command.is_empty() {
        return Err(AgentError::NoCommand);
    }
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut current: Option<Current> = None;
    let mut ended: Vec<Ended> = Vec::new();
    let mut fence = Duration::from_secs(15);
    let mut last_answer = Instant::now();
    let mut stopping = false;
    let instance = instance_id();
    let mut seq = 0u64;
    tokio::pin!(shutdown);
    loop {
        seq += 1;
        let poll = Poll {
            pool: config.pool.clone(),
            worker: config.pod_name.clone(),
            node: config.node_name.clone(),
            instance: instance.clone(),
            seq,
            running: current.as_ref().map(|c| Running { key: c.assignment.key.clone(), run: c.assignment.run.clone() }),
            ended: ended.clone(),
        };
        let hold = if current.is_some() { Duration::from_secs(5) } else { IDLE_HOLD + Duration::from_secs(10) };
        // One request at a time, never abandoned for a process's end (a busy worker's is answered at once): an
        // abandoned request could reach the leader after a later one (`Poll::seq` makes that harmless anyway).
        let answer = tokio::select! {
            answer = ask(&client, &uri, &poll, hold, config.token_file.as_deref()) => answer,
            () = &mut shutdown, if !stopping => {
                stopping = true;
                if let Some(c) = current.as_mut() {
                    stop(c, "WorkerStopping");
                }
                None
            }
        };
        let answered = answer.is_some();
        match answer {
            Some(answer) => {
                last_answer = Instant::now();
                // Kept until recorded: a leader that heard an end may die before its run's status holds it.
                ended.retain(|e| !answer.recorded.contains(&e.key));
                fence = Duration::from_secs(answer.fence_seconds.max(1));
                if let (Some(key), Some(c)) = (&answer.kill, current.as_mut())
                    && *key == c.assignment.key
                {
                    stop(c, "Killed");
                }
                if let Some(assignment) = answer.assign {
                    if current.is_some() || stopping {
                        // Never two at once: refused work ends as a disruption, which the run retries elsewhere.
                        ended.push(refused(&assignment, "WorkerStopping"));
                    } else {
                        match start(&config, &assignment) {
                            Ok(c) => current = Some(c),
                            Err(e) => {
                                tracing::warn!(attempt = %assignment.key, error = %e, "cannot start the pool's command");
                                ended.push(refused(&assignment, "StartFailed"));
                            }
                        }
                    }
                }
            }
            None => {
                if last_answer.elapsed() >= fence
                    && let Some(c) = current.as_mut()
                    && c.stopping.is_none()
                {
                    tracing::warn!(attempt = %c.assignment.key, "no leader within the fence period: stopping the process");
                    stop(c, "Fenced");
                }
            }
        }
        if stopping && current.is_none() && ended.is_empty() {
            return Ok(());
        }
        if stopping && current.is_none() && last_answer.elapsed() >= fence {
            // The leader is away: what ended is lost with this pod, which the leader counts as a disruption.
            return Ok(());
        }
        // Between requests: the process's end, the heartbeat, its deadline, or its kill grace.
        if let Some(c) = current.as_mut() {
            let wake = [Some(c.deadline), c.stopping.map(|(_, at)| at + KILL_GRACE)]
                .into_iter()
                .flatten()
                .min()
                .map_or(Instant::now() + HEARTBEAT, |at| at.min(Instant::now() + HEARTBEAT));
            let group = group_of(&c.child);
            tokio::select! {
                status = c.child.wait() => {
                    end_group(group);
                    let mut c = current.take().expect("current");
                    drain_output(&mut c).await;
                    ended.push(end_of(&c, status));
                }
                () = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if now >= c.deadline && c.stopping.is_none() {
                        stop(c, "DeadlineExceeded");
                    } else if let Some((_, at)) = c.stopping && now >= at + KILL_GRACE {
                        kill_group(c);
                    }
                }
                () = &mut shutdown, if !stopping => {
                    stopping = true;
                    stop(c, "WorkerStopping");
                }
            }
        } else if !answered && !stopping {
            // An unreachable leader is asked again after a pause, not in a tight loop.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// This agent process's identity in its requests (`Poll::instance`).
fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    let random = getrandom::fill(&mut bytes).map(|()| u64::from_le_bytes(bytes));
    format!("{:016x}-{}", random.unwrap_or_default(), std::process::id())
}

/// One request; None when the leader did not answer.
async fn ask(
    client: &hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    uri: &hyper::Uri,
    poll: &Poll,
    hold: Duration,
    token_file: Option<&std::path::Path>,
) -> Option<Answer> {
    let body = serde_json::to_vec(poll).ok()?;
    let mut request = hyper::Request::post(uri.clone()).header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(token) = token_file.and_then(|f| std::fs::read_to_string(f).ok()) {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.trim()));
    }
    let request = request.body(Full::new(Bytes::from(body))).ok()?;
    let exchange = async {
        let response = client.request(request).await.ok()?;
        if !response.status().is_success() {
            let status = response.status();
            let why = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            tracing::warn!(%status, answer = %String::from_utf8_lossy(&why), "the dispatcher refused the request");
            return None;
        }
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice::<Answer>(&bytes).ok()
    };
    tokio::time::timeout(hold, exchange).await.ok().flatten()
}

fn start(config: &AgentConfig, assignment: &Assignment) -> std::io::Result<Current> {
    let argv = if assignment.argv.is_empty() { &config.command } else { &assignment.argv };
    let (program, args) = argv.split_first().ok_or_else(|| std::io::Error::other("empty command"))?;
    let mut command = Command::new(program);
    // Its own process group: whatever the attempt starts is signalled with it, and ends with it (`end_group`).
    command.args(args).kill_on_drop(true).process_group(0);
    for var in AGENT_VARS {
        command.env_remove(var);
    }
    let env: HashMap<String, String> =
        resolve_env(&assignment.env, &config.pod_name, &config.node_name, &config.namespace).into_iter().collect();
    command.envs(env);
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = command.spawn()?;
    let prefix = log_prefix(job_name_of(&assignment.key));
    let mut output = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        output.push(tokio::spawn(forward(stdout, tokio::io::stdout(), prefix.clone())));
    }
    if let Some(stderr) = child.stderr.take() {
        output.push(tokio::spawn(forward(stderr, tokio::io::stderr(), prefix)));
    }
    tracing::info!(attempt = %assignment.key, pid = child.id(), "started");
    let seconds = u64::try_from(assignment.deadline_seconds.max(1)).unwrap_or(1);
    Ok(Current {
        assignment: assignment.clone(),
        child,
        output,
        deadline: Instant::now() + Duration::from_secs(seconds),
        stopping: None,
    })
}

/// Copies `from` to `to` line by line, each behind `prefix`, as it comes (bytes as they are: not all output is text).
/// A line longer than `LINE_MAX` goes out in pieces, as the kubelet splits long log lines.
async fn forward(from: impl tokio::io::AsyncRead + Unpin, mut to: impl tokio::io::AsyncWrite + Unpin, prefix: String) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    const LINE_MAX: u64 = 16 * 1024;
    let mut from = tokio::io::BufReader::new(from);
    let mut line = prefix.clone().into_bytes();
    loop {
        line.truncate(prefix.len());
        match (&mut from).take(LINE_MAX).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        if to.write_all(&line).await.is_err() || to.flush().await.is_err() {
            return;
        }
    }
}

/// Waits for the ended attempt's last output (bounded: something outside its process group may hold a pipe), then
/// marks its end in the log.
async fn drain_output(current: &mut Current) {
    use tokio::io::AsyncWriteExt;
    let tasks = std::mem::take(&mut current.output);
    let aborts: Vec<tokio::task::AbortHandle> = tasks.iter().map(tokio::task::JoinHandle::abort_handle).collect();
    if tokio::time::timeout(OUTPUT_DRAIN, futures::future::join_all(tasks)).await.is_err() {
        aborts.iter().for_each(tokio::task::AbortHandle::abort);
    }
    let end = format!("{}\n", log_end(job_name_of(&current.assignment.key)));
    let mut stdout = tokio::io::stdout();
    _ = stdout.write_all(end.as_bytes()).await;
    _ = stdout.flush().await;
}

/// The attempt's process group (its leader's pid), while its leader has not been waited for.
fn group_of(child: &Child) -> Option<rustix::process::Pid> {
    child.id().and_then(|pid| rustix::process::Pid::from_raw(i32::try_from(pid).ok()?))
}

/// SIGTERM to the attempt's process group now, SIGKILL after the grace.
fn stop(current: &mut Current, why: &'static str) {
    if current.stopping.is_some() {
        return;
    }
    current.stopping = Some((why, Instant::now()));
    let terminated =
        group_of(&current.child).map(|group| rustix::process::kill_process_group(group, rustix::process::Signal::TERM));
    if !matches!(terminated, Some(Ok(()))) {
        _ = current.child.start_kill();
    }
}

/// SIGKILL to the whole process group.
fn kill_group(current: &mut Current) {
    if let Some(group) = group_of(&current.child) {
        _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    _ = current.child.start_kill();
}

/// What the attempt's main process left running ends with it, as a container's processes end with its main one:
/// nothing of one run outlives it into the next. The group's id is the main process's pid, not reused while a
/// member of the group lives.
fn end_group(group: Option<rustix::process::Pid>) {
    if let Some(group) = group {
        _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
}

fn end_of(current: &Current, status: std::io::Result<ExitStatus>) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    let (exit_code, natural) = match &status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => (code, if code == 0 { "Completed" } else { "Error" }),
            (None, Some(signal)) => (128 + signal, "Error"),
            (None, None) => (255, "Error"),
        },
        Err(_) => (255, "Error"),
    };
    let reason = current.stopping.map_or(natural, |(why, _)| why);
    let reason = if exit_code == 0 && reason == "Killed" { "Completed" } else { reason };
    tracing::info!(attempt = %current.assignment.key, exit_code, reason, "ended");
    Ended {
        key: current.assignment.key.clone(),
        run: current.assignment.run.clone(),
        exit_code,
        reason: reason.into(),
        finished_at: jiff::Timestamp::now().to_string(),
    }
}

fn refused(assignment: &Assignment, reason: &str) -> Ended {
    Ended {
        key: assignment.key.clone(),
        run: assignment.run.clone(),
        exit_code: 127,
        reason: reason.into(),
        finished_at: jiff::Timestamp::now().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EnvVarSource, ObjectFieldSelector};

    #[tokio::test]
    async fn each_line_of_the_output_is_marked_with_its_attempt() {
        let mut out = Vec::new();
        forward(&b"one\ntwo\n\nno newline at the end"[..], &mut out, log_prefix("r-1")).await;
        assert_eq!(
            String::from_utf8(out).expect("text"),
            "[r-1] one\n[r-1] two\n[r-1] \n[r-1] no newline at the end\n"
        );
        // No unbounded line in memory: 40 KiB without a newline goes out in three marked pieces.
        let mut out = Vec::new();
        forward(&vec![b'x'; 40 * 1024][..], &mut out, log_prefix("r-1")).await;
        let pieces: Vec<&[u8]> = out.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
        assert_eq!(pieces.iter().map(|l| l.len() - "[r-1] ".len()).collect::<Vec<_>>(), [16384, 16384, 8192]);
    }

    #[test]
    fn field_references_and_earlier_variables_resolve_as_the_kubelet_would() {
        let field = |name: &str, path: &str| EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: path.into(), api_version: None }),
                ..Default::default()
            }),
        };
        let plain = |name: &str, value: &str| EnvVar { name: name.into(), value: Some(value.into()), value_from: None };
        let env = [
            field("POD", "metadata.name"),
            field("NODE", "spec.nodeName"),
            plain("ATTRS", "k8s.pod.name=$(POD),k8s.node.name=$(NODE),later=$(LATER)"),
            plain("LATER", "x"),
        ];
        let resolved = resolve_env(&env, "w-1", "node-a", "ns");
        assert_eq!(resolved[2].1, "k8s.pod.name=w-1,k8s.node.name=node-a,later=$(LATER)");
    }
}
