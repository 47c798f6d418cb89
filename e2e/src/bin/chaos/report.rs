//! What survived: runs, Jobs, metrics, spans and the operator's writes (the audit log) counted, and the table.

use super::*;

/// A run as the report needs it, read as JSON so that the harness does not break when the API types change.
#[derive(Clone)]
pub(crate) struct RunView {
    pub(crate) name: String,
    pub(crate) uid: String,
    pub(crate) phase: String,
    pub(crate) reason: String,
    pub(crate) attempts: i64,
    /// Attempts ended by a disruption (not counted against the retry budget).
    pub(crate) disruptions: i64,
    /// Attempts ended by a transient failure.
    pub(crate) transient: i64,
    pub(crate) finished: bool,
    pub(crate) dropped: bool,
}

impl RunView {
    pub(crate) fn of(o: &DynamicObject) -> Self {
        let status = &o.data["status"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let reason = status["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Succeeded"))
            .map(|c| text(&c["reason"]))
            .unwrap_or_default();
        Self {
            name: o.metadata.name.clone().unwrap_or_default(),
            uid: o.metadata.uid.clone().unwrap_or_default(),
            phase: text(&status["phase"]),
            reason,
            attempts: status["attemptCount"].as_i64().unwrap_or_default(),
            disruptions: status["disruptions"].as_i64().unwrap_or_default(),
            transient: status["transientFailures"].as_i64().unwrap_or_default(),
            finished: status["telemetry"]["finished"].as_bool().unwrap_or(false),
            dropped: status["telemetry"]["dropped"].as_bool().unwrap_or(false),
        }
    }

    pub(crate) fn terminal(&self) -> bool {
        self.phase == "Succeeded" || self.phase == "Failed"
    }

    pub(crate) fn done(&self) -> bool {
        self.terminal() && self.finished
    }

    /// The `status` label `workflow.run.status` should carry for this run.
    pub(crate) fn status_label(&self) -> &'static str {
        match (self.phase.as_str(), self.reason.as_str()) {
            ("Succeeded", _) => "success",
            (_, "Cancelled") => "cancelled",
            _ => "failure",
        }
    }
}

/// What the pool's workers executed: `(run, attempt)` → how many processes (`POOL_SCRIPT`'s lines).
pub(crate) fn executions(path: &Path) -> BTreeMap<(String, i64), usize> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let mut fields = line.split_whitespace();
        if let (Some(run), Some(attempt)) = (fields.next(), fields.next().and_then(|a| a.parse().ok())) {
            *out.entry((run.to_string(), attempt)).or_default() += 1;
        }
    }
    out
}

/// Live processes of the runs `uids` (their environment's resource attributes name the run): `run uid pid`.
pub(crate) fn live_run_processes(uids: &BTreeSet<&str>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let attributes = env.split(|b| *b == 0).find_map(|v| v.strip_prefix(b"OTEL_RESOURCE_ATTRIBUTES="))?;
            let attributes = String::from_utf8_lossy(attributes);
            let uid = attributes.split(',').find_map(|kv| kv.strip_prefix("workflow.run_id="))?;
            uids.contains(uid).then(|| format!("{uid} {pid}"))
        })
        .collect()
}

/// Waits (up to 30 s: a stopped process has a 10 s grace) until no process of a finished run is left; returns how
/// many were at the first look and what is left.
pub(crate) async fn processes_at_rest(uids: &BTreeSet<&str>) -> (usize, Vec<String>) {
    let until = Instant::now() + Duration::from_secs(30);
    let first = live_run_processes(uids).len();
    loop {
        let left = live_run_processes(uids);
        if left.is_empty() || Instant::now() > until {
            return (first, left);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The OTLP documents of a collector output file that every collector process appended to.
pub(crate) fn json_lines(path: &Path) -> Vec<Value> {
    flowtel_e2e::otlp_documents(&std::fs::read_to_string(path).unwrap_or_default())
}

pub(crate) fn attr(item: &Value, key: &str) -> Option<String> {
    item["attributes"].as_array()?.iter().find(|a| a["key"] == key).and_then(|a| {
        let v = &a["value"];
        v["stringValue"].as_str().map(str::to_string).or_else(|| v["intValue"].as_str().map(str::to_string))
    })
}

/// Sum over operator processes of each counter series `(metric, workflow_name, status)`: the largest value per
/// process (resource `service.instance.id`) and start time, added up. That is the latest of a cumulative series and
/// every point of a delta one (each delta point has its own start time).
pub(crate) fn counters_across_processes(dir: &Path, prefix: &str) -> BTreeMap<(String, String, String), i64> {
    let mut latest = BTreeMap::<(String, String, String, String, String), i64>::new();
    for doc in json_lines(&dir.join("metrics.json")) {
        for rm in doc["resourceMetrics"].as_array().into_iter().flatten() {
            let instance = attr(&rm["resource"], "service.instance.id").unwrap_or_default();
            for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                for m in sm["metrics"].as_array().into_iter().flatten() {
                    let name = m["name"].as_str().unwrap_or_default();
                    if !matches!(name, "workflow.run.total" | "workflow.run.status" | "workflow.retry.count") {
                        continue;
                    }
                    for p in m["sum"]["dataPoints"].as_array().into_iter().flatten() {
                        let Some(workflow) = attr(p, "workflow_name").filter(|w| w.starts_with(prefix)) else {
                            continue;
                        };
                        let status = attr(p, "status").unwrap_or_default();
                        let start = p["startTimeUnixNano"].as_str().unwrap_or_default().to_string();
                        let value = p["asInt"].as_str().and_then(|s| s.parse().ok()).unwrap_or_default();
                        let key = (name.to_string(), workflow, status, instance.clone(), start);
                        let e = latest.entry(key).or_default();
                        *e = (*e).max(value);
                    }
                }
            }
        }
    }
    let mut sums = BTreeMap::new();
    for ((name, workflow, status, _, _), v) in latest {
        *sums.entry((name, workflow, status)).or_default() += v;
    }
    sums
}

#[derive(Default)]
pub(crate) struct SpanCounts {
    /// workflow.run spans received, duplicates included.
    pub(crate) run_raw: usize,
    /// Distinct workflow.run span ids per run UID.
    pub(crate) run_ids: BTreeMap<String, BTreeSet<String>>,
    /// Distinct workflow.attempt span ids per run UID.
    pub(crate) attempt_ids: BTreeMap<String, BTreeSet<String>>,
}

pub(crate) fn spans(dir: &Path, uids: &BTreeSet<String>) -> SpanCounts {
    let mut out = SpanCounts::default();
    for doc in json_lines(&dir.join("traces.json")) {
        for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let Some(uid) = attr(s, "workflow.run_id").filter(|u| uids.contains(u)) else { continue };
                    let id = s["spanId"].as_str().unwrap_or_default().to_string();
                    if s["name"] == "workflow.run" {
                        out.run_raw += 1;
                        out.run_ids.entry(uid).or_default().insert(id);
                    } else if s["name"] == "workflow.attempt" {
                        out.attempt_ids.entry(uid).or_default().insert(id);
                    }
                }
            }
        }
    }
    out
}

/// The run a Job belongs to: Job names are `<run>-<attempt>`.
pub(crate) fn run_of_job(job: &str) -> (&str, Option<i64>) {
    match job.rsplit_once('-') {
        Some((run, n)) if n.chars().all(|c| c.is_ascii_digit()) => (run, n.parse().ok()),
        _ => (job, None),
    }
}

#[derive(Default)]
pub(crate) struct AuditCounts {
    /// Successful creations (HTTP 201, by create or by server-side apply) per Job name.
    pub(crate) job_creates: BTreeMap<String, u32>,
    /// The operator's writes (Events apart) per run, Jobs counted with their run.
    pub(crate) writes_by_run: BTreeMap<String, u64>,
    pub(crate) writes_by_request: BTreeMap<String, u64>,
    pub(crate) writes_by_code: BTreeMap<i64, u64>,
    pub(crate) writes: u64,
    pub(crate) events: u64,
    pub(crate) conflicts: u64,
    pub(crate) errors: u64,
}

/// Counts the operator's requests in one namespace from the apiserver's audit log (and its rotated files).
pub(crate) fn audit(logs: &Path, namespace: &str) -> Result<AuditCounts> {
    let mut out = AuditCounts::default();
    for e in flowtel_e2e::audit::audit_entries(logs, namespace) {
        if e.resource == "jobs" && e.subresource.is_none() && e.code == 201 {
            *out.job_creates.entry(e.name.clone()).or_default() += 1;
        }
        if !e.by_operator || !e.is_write() {
            continue;
        }
        if e.resource == "events" {
            out.events += 1;
            continue;
        }
        out.writes += 1;
        *out.writes_by_code.entry(e.code).or_default() += 1;
        match e.code {
            409 => out.conflicts += 1,
            200..=299 => {}
            _ => out.errors += 1,
        }
        *out.writes_by_request.entry(e.request()).or_default() += 1;
        let run = if e.resource == "jobs" { run_of_job(&e.name).0 } else { e.name.as_str() };
        *out.writes_by_run.entry(run.to_string()).or_default() += 1;
    }
    Ok(out)
}

/// Ended, or ending: the Job controller starts no pod for a Job once it set FailureTarget or SuccessCriteriaMet.
pub(crate) fn job_finished(job: &Job) -> bool {
    const ENDS: [&str; 4] = ["Complete", "Failed", "FailureTarget", "SuccessCriteriaMet"];
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| ENDS.contains(&c.type_.as_str()) && c.status == "True"))
}

/// Whether a Job not marked ended may still run something: a pod active or terminating, or none counted yet (it may
/// still start one). A Job whose one pod was counted failed or succeeded and that has none left runs nothing, even
/// if the Job controller has not marked it (seen after apiserver restarts: `failed: 1`, no condition, for minutes).
pub(crate) fn job_may_run(job: &Job) -> bool {
    let Some(s) = job.status.as_ref() else { return true };
    let live = s.active.unwrap_or(0) + s.terminating.unwrap_or(0);
    let counted = s.failed.unwrap_or(0) + s.succeeded.unwrap_or(0);
    live > 0 || counted == 0
}

/// The run a Job belongs to: its label, else its name.
pub(crate) fn run_of_labelled_job(job: &Job) -> String {
    let name = job.metadata.name.clone().unwrap_or_default();
    job.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("flowtel.dev/run").cloned())
        .unwrap_or_else(|| run_of_job(&name).0.to_string())
}

/// How long the Job controller gets to mark the Jobs of finished runs ended. Its own writes fail while the apiserver
/// restarts, and it retries them with a backoff of up to a minute: a Job whose disrupted pod is long gone can lack
/// its Failed condition for that long. Flowtel's part is not to leave a Job running, which a Job still unmarked
/// after this bound shows.
pub(crate) const JOBS_SETTLE: Duration = Duration::from_secs(90);

/// Lists the Jobs until no Job of a finished run is unmarked and may still run (or `JOBS_SETTLE` passed); returns
/// them, with how many were so at the first look.
pub(crate) async fn jobs_at_rest(api: &Api<Job>, finished_runs: &BTreeSet<&str>) -> Result<(Vec<Job>, usize)> {
    let unmarked = |jobs: &[Job]| {
        jobs.iter()
            .filter(|j| {
                finished_runs.contains(run_of_labelled_job(j).as_str())
                    && j.metadata.deletion_timestamp.is_none()
                    && !job_finished(j)
                    && job_may_run(j)
            })
            .count()
    };
    let until = Instant::now() + JOBS_SETTLE;
    let mut first = None;
    loop {
        let jobs = tokio::time::timeout(Duration::from_secs(30), api.list(&ListParams::default()))
            .await
            .map_err(|_| "listing the Jobs took more than 30 s")??
            .items;
        let now_unmarked = unmarked(&jobs);
        let first = *first.get_or_insert(now_unmarked);
        if now_unmarked == 0 || Instant::now() > until {
            return Ok((jobs, first));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub(crate) fn examples<I: IntoIterator<Item = String>>(names: I) -> Vec<String> {
    names.into_iter().take(EXAMPLES).collect()
}

/// Builds the report from the final state: the runs, the Jobs, the audit log, the collector's files and the
/// operator's scraped counters.
pub(crate) async fn report(
    ctx: &Ctx,
    plan: &BTreeMap<String, Kind>,
    subs: &[Submitted],
    runs: &[RunView],
) -> Result<Value> {
    let ours: Vec<&RunView> = runs.iter().filter(|r| plan.contains_key(&r.name)).collect();
    let submitted = subs.iter().filter(|s| s.ok).count();
    let terminal: Vec<&RunView> = ours.iter().copied().filter(|r| r.done()).collect();
    let terminal_names: BTreeSet<&str> = terminal.iter().map(|r| r.name.as_str()).collect();
    let not_terminal: Vec<String> = {
        let seen: BTreeMap<&str, &RunView> = ours.iter().map(|r| (r.name.as_str(), *r)).collect();
        subs.iter()
            .filter(|s| s.ok && !seen.get(s.name.as_str()).is_some_and(|r| r.done()))
            .map(|s| match seen.get(s.name.as_str()) {
                Some(r) => {
                    format!("{} ({}, finished={})", r.name, if r.phase.is_empty() { "-" } else { &r.phase }, r.finished)
                }
                None => format!("{} (missing)", s.name),
            })
            .collect()
    };
    let mut by_phase = BTreeMap::<String, usize>::new();
    let mut by_reason = BTreeMap::<String, usize>::new();
    let mut by_label = BTreeMap::<&str, i64>::new();
    for r in &terminal {
        *by_phase.entry(r.phase.clone()).or_default() += 1;
        *by_reason.entry(r.reason.clone()).or_default() += 1;
        *by_label.entry(r.status_label()).or_default() += 1;
    }
    let mut by_kind = BTreeMap::<&str, Value>::new();
    let mut mismatched = Vec::new();
    let pooled = ctx.workers.is_some();
    // Pooled, a worker killed under an attempt (or an operator kill past the fence) disrupts it and the run goes on
    // with one more attempt: expected, as for a Job whose pod is evicted, and counted apart.
    let unplanned = |kind: Kind, r: &RunView| {
        if pooled { (r.disruptions - i64::from(kind == Kind::DisruptOnce)).max(0) } else { 0 }
    };
    // A fail-once run whose failing execution's end was lost with its worker (killed after the exit, before its
    // report) has that attempt as a disruption instead of a transient failure: one attempt fewer than the count.
    let failure_lost =
        |kind: Kind, r: &RunView| pooled && kind == Kind::FailOnce && r.transient == 0 && r.disruptions > 0;
    let mut unplanned_disruptions = 0;
    let mut failures_lost = 0;
    for kind in Kind::ALL {
        let of_kind: Vec<&&RunView> = terminal.iter().filter(|r| plan.get(&r.name) == Some(&kind)).collect();
        unplanned_disruptions += of_kind.iter().map(|r| unplanned(kind, r)).sum::<i64>();
        failures_lost += of_kind.iter().filter(|r| failure_lost(kind, r)).count();
        let (phase, reason, attempts) = kind.expected();
        let odd: Vec<&&RunView> = of_kind
            .iter()
            .copied()
            .filter(|r| {
                let counted = |a: i64| a + unplanned(kind, r) - i64::from(failure_lost(kind, r));
                r.phase != phase || r.reason != reason || attempts.is_some_and(|a| counted(a) != r.attempts)
            })
            .collect();
        mismatched.extend(
            odd.iter()
                .map(|r| format!("{} ({}: {}/{}, {} attempts)", r.name, kind.name(), r.phase, r.reason, r.attempts)),
        );
        by_kind.insert(
            kind.name(),
            json!({
                "submitted": plan.values().filter(|k| **k == kind).count(),
                "terminal": of_kind.len(),
                "as_expected": of_kind.len() - odd.len(),
                "expected": {"phase": phase, "reason": reason, "attempts": attempts},
            }),
        );
    }

    // Jobs: duplicates by name (audit), more Jobs than attempts, Jobs still running for a finished run.
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let (jobs, unmarked_at_first) = jobs_at_rest(&jobs, &terminal_names).await?;
    let logs = ctx.kubeconfig.parent().map(|d| d.join("logs")).unwrap_or_default();
    let audit = audit(&logs, &ctx.namespace)?;
    let created_twice: Vec<String> =
        audit.job_creates.iter().filter(|(_, n)| **n > 1).map(|(name, n)| format!("{name} ({n}×)")).collect();
    let mut created_per_run = BTreeMap::<&str, usize>::new();
    for name in audit.job_creates.keys() {
        *created_per_run.entry(run_of_job(name).0).or_default() += 1;
    }
    let mut present_per_run = BTreeMap::<String, usize>::new();
    let mut left_running = Vec::new();
    let mut unmarked_idle = Vec::new();
    for job in &jobs {
        let name = job.metadata.name.clone().unwrap_or_default();
        let run = run_of_labelled_job(job);
        *present_per_run.entry(run.clone()).or_default() += 1;
        if terminal_names.contains(run.as_str()) && job.metadata.deletion_timestamp.is_none() && !job_finished(job) {
            // What the Job controller last wrote, to tell a Job still running from one it never marked.
            let status = serde_json::to_string(&job.status).unwrap_or_default();
            let attempts = terminal.iter().find(|r| r.name == run).map(|r| r.attempts).unwrap_or_default();
            let example = format!("{name} (its run: {attempts} attempts) {status}");
            if job_may_run(job) {
                left_running.push(example);
            } else {
                unmarked_idle.push(example);
            }
        }
    }
    let extra_jobs: Vec<String> = terminal
        .iter()
        .filter_map(|r| {
            let created = created_per_run.get(r.name.as_str()).copied().unwrap_or_default();
            let present = present_per_run.get(&r.name).copied().unwrap_or_default();
            let attempts = usize::try_from(r.attempts).unwrap_or_default();
            (created > attempts || present > attempts)
                .then(|| format!("{} ({} attempts, {created} created, {present} present)", r.name, r.attempts))
        })
        .collect();

    // Metrics, summed across operator processes.
    let sums = counters_across_processes(&ctx.dir, &ctx.prefix);
    let metric = |name: &str, status: Option<&str>| -> i64 {
        sums.iter().filter(|((n, _, s), _)| n == name && status.is_none_or(|st| s == st)).map(|(_, v)| *v).sum()
    };
    let run_total = metric("workflow.run.total", None);
    let run_status = metric("workflow.run.status", None);
    let status_by_label: BTreeMap<&str, Value> = ["success", "failure", "cancelled"]
        .into_iter()
        .map(|l| {
            let got = metric("workflow.run.status", Some(l));
            let want = by_label.get(l).copied().unwrap_or_default();
            (l, json!({"exported": got, "terminal_runs": want, "difference": got - want}))
        })
        .collect();

    // Spans, deduplicated by span id.
    let uids: BTreeSet<String> = ours.iter().map(|r| r.uid.clone()).collect();
    let span_counts = spans(&ctx.dir, &uids);
    let unique_run_spans: usize = span_counts.run_ids.values().map(BTreeSet::len).sum();
    let no_span: Vec<String> = terminal
        .iter()
        .filter(|r| span_counts.run_ids.get(&r.uid).is_none_or(BTreeSet::is_empty))
        .map(|r| format!("{}{}", r.name, if r.dropped { " (telemetry dropped)" } else { "" }))
        .collect();
    let several_ids: Vec<String> = terminal
        .iter()
        .filter(|r| span_counts.run_ids.get(&r.uid).is_some_and(|s| s.len() > 1))
        .map(|r| r.name.clone())
        .collect();
    let attempt_span_mismatch: Vec<String> = terminal
        .iter()
        .filter(|r| span_counts.run_ids.get(&r.uid).is_some_and(|s| !s.is_empty()))
        .filter_map(|r| {
            let n = span_counts.attempt_ids.get(&r.uid).map_or(0, BTreeSet::len);
            let want = usize::try_from(r.attempts.min(32)).unwrap_or_default();
            (n != want).then(|| format!("{} ({n} attempt spans, {} attempts)", r.name, r.attempts))
        })
        .collect();

    // Pooled: what the workers executed, from the pool's command's own lines, and what is left running.
    let pooled_report = if pooled {
        let executed = executions(&ctx.dir.join("executions"));
        let twice: Vec<String> =
            executed.iter().filter(|(_, n)| **n > 1).map(|((run, a), n)| format!("{run} attempt {a} ({n}×)")).collect();
        let more_than_attempts: Vec<String> = terminal
            .iter()
            .filter_map(|r| {
                let n = executed.keys().filter(|(run, _)| *run == r.name).count();
                (n as i64 > r.attempts).then(|| format!("{} ({n} executed, {} attempts)", r.name, r.attempts))
            })
            .collect();
        let uids: BTreeSet<&str> = terminal.iter().map(|r| r.uid.as_str()).collect();
        let (at_first, left) = processes_at_rest(&uids).await;
        json!({
            "executions": executed.values().sum::<usize>(),
            "attempts_executed_more_than_once": twice.len(),
            "attempts_executed_more_than_once_examples": examples(twice),
            "runs_with_more_executions_than_attempts": more_than_attempts.len(),
            "runs_with_more_executions_than_attempts_examples": examples(more_than_attempts),
            "processes_of_finished_runs_at_first_look": at_first,
            "processes_left_running_by_finished_runs": left.len(),
            "processes_left_running_examples": examples(left),
            "attempts_disrupted_by_kills": unplanned_disruptions,
            "fail_once_failures_lost_with_their_worker": failures_lost,
            "worker_kills": ctx.journal.count("worker-kill"),
            "worker_exits": ctx.journal.count("worker-exit"),
        })
    } else {
        Value::Null
    };

    // The operator's own counters, summed over its processes.
    let mut counters = BTreeMap::<String, f64>::new();
    for sample in lock(&ctx.scraped).values() {
        for (k, v) in sample {
            *counters.entry(k.clone()).or_default() += v;
        }
    }
    let (processes, scraped) = (lock(&ctx.operator).generation, lock(&ctx.scraped).len());

    let submit_failed =
        subs.iter().filter(|s| !s.ok).map(|s| format!("{}: {}", s.name, s.error.clone().unwrap_or_default()));
    let harness_errors =
        subs.iter().filter(|s| s.ok).filter_map(|s| s.error.clone().map(|e| format!("{}: {e}", s.name)));
    let terminal_count = terminal.len();
    let per_run = |n: u64| if terminal_count == 0 { 0.0 } else { n as f64 / terminal_count as f64 };
    let busiest = audit.writes_by_run.iter().filter(|(r, _)| plan.contains_key(*r)).max_by_key(|(_, n)| **n);
    Ok(json!({
        "runs": {
            "submitted": submitted,
            "submit_failed": examples(submit_failed),
            "submit_retries": subs.iter().map(|s| u64::from(s.retries)).sum::<u64>(),
            "harness_errors": examples(harness_errors),
            "terminal": terminal_count,
            "by_phase": by_phase,
            "by_reason": by_reason,
            "by_kind": by_kind,
            "outcome_differs": mismatched.len(),
            "outcome_differs_examples": examples(mismatched),
            "not_terminal": not_terminal.len(),
            "not_terminal_examples": examples(not_terminal),
            "telemetry_dropped": terminal.iter().filter(|r| r.dropped).count(),
        },
        "jobs": {
            "created": audit.job_creates.len(),
            "names_created_more_than_once": created_twice.len(),
            "names_created_more_than_once_examples": examples(created_twice),
            "runs_with_more_jobs_than_attempts": extra_jobs.len(),
            "runs_with_more_jobs_than_attempts_examples": examples(extra_jobs),
            "left_running_by_finished_runs": left_running.len(),
            "not_yet_marked_ended_at_first_look": unmarked_at_first,
            "never_marked_ended_with_no_pod_left": unmarked_idle.len(),
            "never_marked_ended_with_no_pod_left_examples": examples(unmarked_idle),
            "left_running_examples": examples(left_running),
        },
        "metrics": {
            "workflow.run.total": {
                "exported": run_total, "terminal_runs": terminal_count, "difference": run_total - terminal_count as i64
            },
            "workflow.run.status": {
                "exported": run_status, "terminal_runs": terminal_count,
                "difference": run_status - terminal_count as i64, "by_status": status_by_label
            },
            "workflow.retry.count": metric("workflow.retry.count", None),
        },
        "spans": {
            "workflow_run_raw": span_counts.run_raw,
            "workflow_run_unique": unique_run_spans,
            "raw_duplicates": span_counts.run_raw.saturating_sub(unique_run_spans),
            "terminal_runs_without_span": no_span.len(),
            "terminal_runs_without_span_examples": examples(no_span),
            "runs_with_several_span_ids": several_ids.len(),
            "runs_with_several_span_ids_examples": examples(several_ids),
            "runs_whose_attempt_spans_differ_from_attempts": attempt_span_mismatch.len(),
            "attempt_span_examples": examples(attempt_span_mismatch),
        },
        "pooled": pooled_report,
        "operator": {
            "processes": processes,
            "processes_scraped": scraped,
            "counters_summed": counters,
        },
        "writes": {
            "total": audit.writes,
            "per_terminal_run": (per_run(audit.writes) * 100.0).round() / 100.0,
            "busiest_run": busiest.map(|(r, n)| json!({"run": r, "writes": n})),
            "by_request": audit.writes_by_request,
            "conflicts_409": audit.conflicts,
            "by_code": audit.writes_by_code,
            "other_errors": audit.errors,
            "events": audit.events,
            "events_per_terminal_run": (per_run(audit.events) * 100.0).round() / 100.0,
        },
    }))
}

/// The one table: each figure with its goal, where there is one.
pub(crate) fn table(r: &Value, ctx: &Ctx, header: &str) -> String {
    let mut t = String::new();
    let mut row = |what: &str, value: String, goal: &str| {
        let _ = writeln!(t, "{what:<58} {value:>14}   {goal}");
    };
    let n = |v: &Value| v.as_i64().map_or_else(|| v.to_string(), |x| x.to_string());
    let signed = |v: &Value| v.as_i64().map_or_else(|| v.to_string(), |x| format!("{x:+}"));
    let kills = ctx.journal.count("operator-kill");
    let exits = ctx.journal.count("operator-exit");
    row("runs submitted", n(&r["runs"]["submitted"]), "");
    row("runs terminal with telemetry exported", n(&r["runs"]["terminal"]), "all");
    for (map, label) in [("by_phase", "phase"), ("by_reason", "Succeeded condition reason")] {
        for (k, v) in r["runs"][map].as_object().into_iter().flatten() {
            row(&format!("  {label} {}", if k.is_empty() { "-" } else { k }), n(v), "");
        }
    }
    let kinds: Vec<String> = r["runs"]["by_kind"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k} {}/{}", n(&v["as_expected"]), n(&v["submitted"])))
        .collect();
    row("  as expected per kind (terminal & right outcome / submitted)", String::new(), "");
    for chunk in kinds.chunks(3) {
        row(&format!("    {}", chunk.join(", ")), String::new(), "");
    }
    row("runs whose outcome or attempts differ from their kind", n(&r["runs"]["outcome_differs"]), "0");
    row("runs not terminal after the bound", n(&r["runs"]["not_terminal"]), "0");
    let at = |kind: &str| ctx.journal.at(kind).map_or_else(|| "-".to_string(), |t| format!("{t:.0} s"));
    row("  faults ended at / the wait for the runs ended at", format!("{} / {}", at("faults-over"), at("settled")), "");
    row("runs with telemetry dropped", n(&r["runs"]["telemetry_dropped"]), "0");
    row("Job names created more than once (audit: 201s)", n(&r["jobs"]["names_created_more_than_once"]), "0");
    row(
        "runs with more Jobs than attempts (created or present)",
        n(&r["jobs"]["runs_with_more_jobs_than_attempts"]),
        "0",
    );
    row(
        "Jobs of finished runs unmarked, may run (first look)",
        n(&r["jobs"]["not_yet_marked_ended_at_first_look"]),
        "",
    );
    row(
        "Jobs of finished runs never marked, no pod left (Job controller)",
        n(&r["jobs"]["never_marked_ended_with_no_pod_left"]),
        "",
    );
    row("Jobs left running by finished runs (after up to 90 s)", n(&r["jobs"]["left_running_by_finished_runs"]), "0");
    let p = &r["pooled"];
    if !p.is_null() {
        row("pooled: attempts executed more than once", n(&p["attempts_executed_more_than_once"]), "0");
        row("pooled: runs with more executions than attempts", n(&p["runs_with_more_executions_than_attempts"]), "0");
        row(
            "pooled: processes left running by finished runs (30 s)",
            n(&p["processes_left_running_by_finished_runs"]),
            "0",
        );
        row(
            "pooled: attempts disrupted by worker/operator kills",
            n(&p["attempts_disrupted_by_kills"]),
            "each retried",
        );
        row(
            "pooled: fail-once failures lost with their worker (disruptions)",
            n(&p["fail_once_failures_lost_with_their_worker"]),
            "",
        );
        row(
            "pooled: workers killed / ended by disrupt-once runs",
            format!("{} / {}", n(&p["worker_kills"]), n(&p["worker_exits"])),
            "",
        );
    }
    let m = &r["metrics"];
    let worst = format!("0, at worst +1 per kill ({})", kills + exits);
    row("workflow.run.total (all processes) - terminal runs", signed(&m["workflow.run.total"]["difference"]), &worst);
    row("workflow.run.status (all processes) - terminal runs", signed(&m["workflow.run.status"]["difference"]), &worst);
    for (k, v) in m["workflow.run.status"]["by_status"].as_object().into_iter().flatten() {
        row(
            &format!("  status={k}: exported - terminal"),
            format!("{} - {}", n(&v["exported"]), n(&v["terminal_runs"])),
            "",
        );
    }
    let s = &r["spans"];
    row("terminal runs without a workflow.run span", n(&s["terminal_runs_without_span"]), "0");
    row("runs with more than one workflow.run span id", n(&s["runs_with_several_span_ids"]), "0");
    row("workflow.run spans received twice (same span id)", n(&s["raw_duplicates"]), "few (re-export after a kill)");
    row(
        "runs whose attempt spans differ from their attempts",
        n(&s["runs_whose_attempt_spans_differ_from_attempts"]),
        "0",
    );
    let op = &r["operator"];
    row("operator processes (kills by the harness)", format!("{} ({kills})", n(&op["processes"])), "");
    row("operator exits not caused by the harness", exits.to_string(), "0");
    let c = &op["counters_summed"];
    for (name, label) in [
        ("flowtel_telemetry_export_failures_total", "export failures (/metrics: last scrape per process, sum)"),
        ("flowtel_telemetry_dropped_total", "telemetry dropped (/metrics: last scrape per process, sum)"),
        ("flowtel_status_writes_total", "status writes (/metrics: last scrape per process, sum)"),
    ] {
        row(label, c.get(name).map_or_else(|| "missing".to_string(), |v| v.to_string()), "");
    }
    let w = &r["writes"];
    row("operator writes per terminal run (audit, Events apart)", w["per_terminal_run"].to_string(), "");
    row(
        "  total / 409 conflicts / other errors",
        format!("{} / {} / {}", n(&w["total"]), n(&w["conflicts_409"]), n(&w["other_errors"])),
        "",
    );
    row("operator Events per terminal run", w["events_per_terminal_run"].to_string(), "");
    let width = 90;
    format!("{header}\n{}\n{:<58} {:>14}   goal\n{t}{}", "-".repeat(width), "", "value", "-".repeat(width))
}
