//! Two operators for one namespace, one Lease: the leader reconciles, the standby is ready and idle; a killed
//! leader is replaced within a lease duration with every run in flight finished once; a leader cut off from the
//! apiserver exits before the standby can lead. The default timings (15 s / 10 s / 2 s) are used, as shipped.

use std::time::{Duration, SystemTime};

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunPhase;
use flowtel_e2e::{
    ApiserverProxy, Collector, Operator, TEST_MANAGER, TestNamespace, client, eventually, install_crds,
    operator_writes, simple_run,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, Patch, PatchParams};

const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

async fn candidate(ns: &str, tag: &str, endpoint: &str, env: &[(&str, &str)]) -> Operator {
    let extra = ["--leader-elect", "--leader-elect-namespace", ns];
    Operator::start_tagged(ns, tag, Some(endpoint), &extra, env).await.expect("operator")
}

fn holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref()?.holder_identity.clone().filter(|h| !h.is_empty())
}

/// Waits until the Lease is held by someone other than `previous`; returns the holder and its acquire time.
async fn new_holder(leases: &Api<Lease>, previous: Option<&str>, within: Duration) -> (String, SystemTime) {
    eventually("a new Lease holder", within, async || {
        let lease = leases.get_opt("flowtel").await.ok()??;
        let h = holder(&lease).filter(|h| Some(h.as_str()) != previous)?;
        let acquired = lease.spec.as_ref()?.acquire_time.as_ref()?.0;
        Some((h, SystemTime::from(acquired)))
    })
    .await
}

async fn gauge(op: &Operator, name: &str) -> Option<u64> {
    op.counter(name).await
}

#[tokio::test]
async fn a_killed_leader_is_replaced_within_a_lease_duration_and_runs_in_flight_finish_once() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "leader-kill").await.expect("namespace");
    let collector = Collector::start("leader-kill").await.expect("collector");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let mut first = candidate(&ns.name, "-a", &collector.endpoint, &[]).await;
    let (leader, _) = new_holder(&leases, None, Duration::from_secs(30)).await;
    let second = candidate(&ns.name, "-b", &collector.endpoint, &[]).await;
    // Ready and idle: /readyz answered 200 (start waits for it); it never reconciled and says it does not lead.
    assert_eq!(gauge(&first, "flowtel_leader").await, Some(1), "the first operator leads");
    assert_eq!(gauge(&second, "flowtel_leader").await, Some(0), "the second operator stands by");

    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let count = 6;
    for i in 0..count {
        let run = simple_run(&format!("inflight-{i}"), "wf-leader", "25s");
        runs.patch(&format!("inflight-{i}"), &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run))
            .await
            .expect("submit");
    }
    eventually("every run running with its Job", Duration::from_secs(60), async || {
        let list = runs.list(&ListParams::default()).await.ok()?.items;
        let running =
            list.iter().filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(WorkflowRunPhase::Running));
        (running.count() == count).then_some(())
    })
    .await;
    assert_eq!(gauge(&second, "flowtel_reconciles_total").await, Some(0), "the standby reconciled nothing");

    let killed_at = SystemTime::now();
    first.kill();
    let (next, acquired) = new_holder(&leases, Some(&leader), Duration::from_secs(60)).await;
    let takeover = acquired.duration_since(killed_at).expect("the Lease was acquired after the kill, not before");
    // The standby takes over once it has seen the Lease unchanged for a lease duration, checking every retry
    // period (so up to one retry period late), and it may have seen the dead leader's last renewal up to one retry
    // period after it was written.
    assert!(
        takeover <= LEASE_DURATION + 2 * RETRY_PERIOD,
        "takeover {takeover:?} after the kill (lease {LEASE_DURATION:?}, retry {RETRY_PERIOD:?})"
    );
    println!("takeover: {takeover:?} after SIGKILL; {leader} -> {next}");
    eventually("the standby leads", Duration::from_secs(10), async || {
        (gauge(&second, "flowtel_leader").await == Some(1)).then_some(())
    })
    .await;

    let list = eventually("every run terminal and exported", Duration::from_secs(120), async || {
        let list = runs.list(&ListParams::default()).await.ok()?.items;
        let done =
            list.iter().filter(|r| r.status.as_ref().and_then(|s| s.telemetry.as_ref()).is_some_and(|t| t.finished));
        (done.count() == count).then_some(list)
    })
    .await;
    for r in &list {
        assert_eq!(r.status.as_ref().and_then(|s| s.phase), Some(WorkflowRunPhase::Succeeded), "{:?}", r.metadata.name);
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(jobs.list(&ListParams::default()).await.expect("jobs").items.len(), count, "one Job per run");
    let job_creates: u64 = operator_writes(&ns.name).iter().filter(|(k, _)| k == "create jobs").map(|(_, n)| n).sum();
    assert_eq!(job_creates, count as u64, "each Job created once, by one leader: {:?}", operator_writes(&ns.name));
    let total = eventually("every run counted", Duration::from_secs(30), async || {
        let n = collector.total_across_processes("workflow.run.total", "wf-leader");
        (n >= count as i64).then_some(n)
    })
    .await;
    assert_eq!(total, count as i64, "workflow.run.total counts each run once");
}

#[tokio::test]
async fn a_leader_cut_off_from_the_apiserver_exits_before_the_standby_leads() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "leader-partition").await.expect("namespace");
    let collector = Collector::start("leader-partition").await.expect("collector");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let proxy = ApiserverProxy::start(&ns.name).await.expect("proxy");
    let kubeconfig = proxy.kubeconfig.display().to_string();
    let mut cut_off = candidate(&ns.name, "-a", &collector.endpoint, &[("KUBECONFIG", kubeconfig.as_str())]).await;
    let (leader, _) = new_holder(&leases, None, Duration::from_secs(30)).await;
    let standby = candidate(&ns.name, "-b", &collector.endpoint, &[]).await;
    assert_eq!(gauge(&standby, "flowtel_leader").await, Some(0), "the second operator stands by");

    let cut_at = SystemTime::now();
    proxy.cut();
    let exited_at = eventually("the cut-off leader exits", Duration::from_secs(60), async || {
        cut_off.exit_status().map(|status| (status, SystemTime::now()))
    })
    .await;
    assert!(!exited_at.0.success(), "a lost lease is an error exit (the pod restarts as a standby): {:?}", exited_at.0);
    let exited_at = exited_at.1;
    let log = std::fs::read_to_string(&cut_off.log).unwrap_or_default();
    assert!(log.contains("leadership lost"), "the log says why it stopped: {log}");
    let (next, acquired) = new_holder(&leases, Some(&leader), Duration::from_secs(60)).await;
    assert!(
        exited_at < acquired,
        "the old leader exited at {exited_at:?}, before {next} acquired the Lease at {acquired:?}"
    );
    let gap = acquired.duration_since(exited_at).expect("acquired after the old leader exited");
    let stopped = exited_at.duration_since(cut_at).expect("the old leader exited after the cut, not before");
    println!("cut-off leader stopped {stopped:?} after the cut; the standby led {gap:?} later");
    assert!(stopped <= RENEW_DEADLINE + RETRY_PERIOD, "stopped {stopped:?} after the cut");

    // The new leader reconciles.
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    runs.patch("after", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&simple_run("after", "wf-leader", "1s")))
        .await
        .expect("submit");
    eventually("the run after the takeover succeeds", Duration::from_secs(60), async || {
        let r = runs.get("after").await.ok()?;
        (r.status.as_ref().and_then(|s| s.phase) == Some(WorkflowRunPhase::Succeeded)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_leader_stopped_by_sigterm_releases_the_lease_and_the_standby_leads_at_its_next_retry() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "leader-release").await.expect("namespace");
    let collector = Collector::start("leader-release").await.expect("collector");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let mut first = candidate(&ns.name, "-a", &collector.endpoint, &[]).await;
    let (leader, _) = new_holder(&leases, None, Duration::from_secs(30)).await;
    let second = candidate(&ns.name, "-b", &collector.endpoint, &[]).await;
    let stopped_at = SystemTime::now();
    let status = first.terminate(Duration::from_secs(30)).await.expect("the leader stops on SIGTERM");
    assert!(status.success(), "a graceful stop exits 0: {status:?}");
    let (_, acquired) = new_holder(&leases, Some(&leader), Duration::from_secs(60)).await;
    let handover = acquired.duration_since(stopped_at).expect("the Lease was acquired after the SIGTERM, not before");
    println!("handover after SIGTERM: {handover:?}");
    // Without the release the standby would wait out a whole lease duration.
    assert!(handover < LEASE_DURATION / 2, "handover {handover:?} after SIGTERM");
    eventually("the standby leads", Duration::from_secs(10), async || {
        (gauge(&second, "flowtel_leader").await == Some(1)).then_some(())
    })
    .await;
}
