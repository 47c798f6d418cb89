//! The leader's dispatcher: the queue of pooled attempts, the workers that poll for them, and what each attempt came
//! to. Memory only: a worker is the truth of what it runs, so a new leader rebuilds this from the workers' reports.
//! An attempt's start is recorded in the run's status after `running_status_delay` or with its end, as a Job's is.
//!
//! The rules that keep a run from executing twice at once or getting lost:
//! - an attempt's key (`<namespace>/<job name>`) is fixed by its number; dispatching a known key does nothing;
//! - a worker that has not been heard from for `WORKER_LOST` has its attempt ended as a disruption (the run retries
//!   on another worker, outside its retry budget); the agent itself kills its process after `fence` without an
//!   answer, which is shorter than `WORKER_LOST` plus its heartbeat;
//! - a new leader (this dispatcher younger than `fence`) does not dispatch an attempt recorded before it started:
//!   it waits for a worker to claim it, and declares it lost only after `fence`, when any worker that could not
//!   reach it has killed it;
//! - nor, while young, an unrecorded attempt of a run created before it started (its predecessor may have handed it
//!   out before the start was written, `running_status_delay`): it waits for a claim the same way, and is lost after
//!   `fence`, as the attempt may have run on a worker that died with the leader; the run goes on with the next one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowtel_crds::{WorkerPool, WorkflowRun};
use kube::runtime::reflector::ObjectRef;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

use super::protocol::{Answer, Assignment, Ended, Poll, RunName};

/// A worker not heard from for this long has lost its attempt (its pod was killed, evicted or cut off).
pub const WORKER_LOST: Duration = Duration::from_secs(15);
/// Ended attempts are remembered this long: a reconcile on a copy of the run older than the status write that
/// recorded the end must not dispatch the attempt again.
const ENDED_KEPT: Duration = Duration::from_secs(600);

/// `<namespace>/<pool name>`.
pub type PoolKey = String;

/// Where an attempt stands, as the run controller reads it.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptState {
    /// Waiting for a worker.
    Queued,
    /// Recorded before this leader started and not claimed by a worker yet.
    Unclaimed,
    Running {
        worker: String,
        node: String,
    },
    Ended(Ending),
    /// Stopped by the run (cancel, deadline), which recorded the end itself; its process is killed if it runs.
    Stopped,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Ending {
    pub exit_code: Option<i32>,
    pub reason: String,
    /// The worker's pod went away or lost the leader: not the workload's fault.
    pub disrupted: bool,
    pub worker: Option<String>,
    pub finished_at: jiff::Timestamp,
}

struct Attempt {
    run: RunName,
    pool: PoolKey,
    assignment: Option<Assignment>,
    state: AttemptState,
    queued_at: Instant,
    /// When a claim is awaited (Unclaimed) until, or when it ended (Ended).
    since: Instant,
    /// When the attempt started, as its run's status records it (or will: the planner reads it from here).
    started_at: jiff::Timestamp,
}

/// What the run says of an attempt handed to `Dispatcher::dispatch`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dispatched {
    /// When the attempt started (the planner's start, which a Job's would carry).
    pub started_at: jiff::Timestamp,
    /// Whether the run's status held the attempt before this dispatch.
    pub recorded: bool,
    /// The run's UID: a run this leader's first list did not hold was created after it started, and was never
    /// another leader's to hand out (`Dispatcher::listed`).
    pub run_uid: String,
}

#[derive(Default)]
struct Worker {
    /// The agent process and its latest request's number (`Poll::seq`).
    instance: String,
    seq: u64,
    pool: PoolKey,
    node: String,
    last_seen: Option<Instant>,
    running: Option<String>,
    kill: Option<String>,
    parked: Option<oneshot::Sender<Answer>>,
    /// Ends it reported that no run's status holds yet: until they are recorded it is given no new attempt.
    holding: Vec<String>,
}

#[derive(Default)]
struct State {
    attempts: HashMap<String, Attempt>,
    queues: HashMap<PoolKey, VecDeque<String>>,
    workers: HashMap<(PoolKey, String), Worker>,
    /// Ended attempts whose end the run's status holds.
    recorded: HashSet<String>,
    /// The runs (UIDs) this leader's first list of runs held, and whether that list is complete: the runs a previous
    /// leader may have seen. Kept while young.
    listed: HashSet<String>,
    listed_complete: bool,
}

/// The dispatcher's metrics on the operator's `/metrics`.
#[derive(Clone)]
pub struct DispatchMetrics {
    pub queue_depth: Family<Vec<(String, String)>, Gauge>,
    pub busy_workers: Family<Vec<(String, String)>, Gauge>,
    pub wait_seconds: Histogram,
}

impl DispatchMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            queue_depth: Family::default(),
            busy_workers: Family::default(),
            wait_seconds: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
        };
        registry.register(
            "flowtel_pool_queue_depth",
            "Pooled attempts waiting for a worker",
            metrics.queue_depth.clone(),
        );
        registry.register("flowtel_pool_busy_workers", "Workers running an attempt", metrics.busy_workers.clone());
        registry.register(
            "flowtel_pool_wait_seconds",
            "Time from an attempt's dispatch to a worker starting it",
            metrics.wait_seconds.clone(),
        );
        metrics
    }
}

/// The leader's dispatcher; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    state: Arc<Mutex<State>>,
    notify: mpsc::UnboundedSender<ObjectRef<WorkflowRun>>,
    started: Instant,
    /// `started` on the wall clock, which runs' timestamps are on.
    started_wall: jiff::Timestamp,
    fence: Duration,
    metrics: DispatchMetrics,
    /// Wakes a pool whose queue grew (the pool controller sizes it from `load`).
    pool_wakes: Arc<Mutex<Option<mpsc::UnboundedSender<ObjectRef<WorkerPool>>>>>,
    /// This dispatcher's identity in its answers (`Answer::leader`).
    id: String,
}

impl Dispatcher {
    /// `notify` wakes a run whose attempt changed; `fence` is how long an agent keeps running without the leader.
    pub fn new(
        notify: mpsc::UnboundedSender<ObjectRef<WorkflowRun>>,
        fence: Duration,
        metrics: DispatchMetrics,
    ) -> Self {
        let mut bytes = [0u8; 8];
        // Uniqueness across restarts is all this needs; the time is the fallback.
        let id = match getrandom::fill(&mut bytes) {
            Ok(()) => u64::from_le_bytes(bytes),
            Err(_) => u64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or_default(),
        };
        let id = format!("{id:016x}");
        Self {
            state: Arc::default(),
            notify,
            started: Instant::now(),
            started_wall: jiff::Timestamp::now(),
            fence,
            metrics,
            pool_wakes: Arc::default(),
            id,
        }
    }

    /// Where to say that a pool's queue grew.
    pub fn wake_pools(&self, pools: mpsc::UnboundedSender<ObjectRef<WorkerPool>>) {
        *self.pool_wakes.lock().unwrap_or_else(|e| e.into_inner()) = Some(pools);
    }

    pub fn fence(&self) -> Duration {
        self.fence
    }

    /// The answer "nothing" (a held request's, when its hold ends).
    pub fn nothing(&self) -> Answer {
        Answer { fence_seconds: self.fence.as_secs(), leader: self.id.clone(), ..Default::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self, run: &RunName) {
        _ = self.notify.send(ObjectRef::new(&run.name).within(&run.namespace));
    }

    /// Where the attempt `key` stands, if this dispatcher knows it.
    pub fn state(&self, key: &str) -> Option<AttemptState> {
        self.lock().attempts.get(key).map(|a| a.state.clone())
    }

    /// Younger than the fence: a worker of the previous leader may still run what that leader handed out.
    pub fn is_young(&self) -> bool {
        self.started.elapsed() < self.fence
    }

    /// When the attempt `key` started, if this dispatcher knows it.
    pub fn started_at(&self, key: &str) -> Option<jiff::Timestamp> {
        self.lock().attempts.get(key).map(|a| a.started_at)
    }

    /// Queued and running attempts of `pool`: what its size follows.
    pub fn load(&self, pool: &str) -> usize {
        let state = self.lock();
        let queued = state.queues.get(pool).map_or(0, VecDeque::len);
        let busy = state.workers.values().filter(|w| w.pool == pool && w.running.is_some()).count();
        queued + busy
    }

    /// `pool`'s queue as its status shows it: waiting attempts, busy workers, and how long the oldest has waited.
    pub fn queue_state(&self, pool: &str) -> (usize, usize, Option<Duration>) {
        let state = self.lock();
        let queue = state.queues.get(pool);
        let queued = queue.map_or(0, VecDeque::len);
        let busy = state.workers.values().filter(|w| w.pool == pool && w.running.is_some()).count();
        let oldest = queue.and_then(|q| q.front()).and_then(|k| state.attempts.get(k)).map(|a| a.queued_at.elapsed());
        (queued, busy, oldest)
    }

    /// Hands the attempt to a worker of `pool`, or queues it. An attempt the previous leader may have handed out (the
    /// run recorded it before this dispatcher started, or, while this one is young, an unrecorded one of an older
    /// run) may still run on one of its workers: it is claimed or declared lost, never dispatched again.
    pub fn dispatch(&self, pool: &str, assignment: Assignment, attempt: Dispatched) {
        let mut state = self.lock();
        if state.attempts.contains_key(&assignment.key) {
            return;
        }
        let now = Instant::now();
        let young = self.is_young();
        let recorded_before_us = attempt.recorded && attempt.started_at < self.started_wall;
        let maybe_handed_out = !attempt.recorded && state.listed_before(&attempt.run_uid);
        let key = assignment.key.clone();
        if young && (recorded_before_us || maybe_handed_out) {
            state.attempts.insert(key, self.unclaimed(assignment.run, pool, now, attempt.started_at));
            return;
        }
        if recorded_before_us {
            // Recorded before this leader, and unclaimed past the fence: every worker has killed what it could not
            // report, so this attempt is lost; the run retries with the next one.
            let run = assignment.run.clone();
            state.attempts.insert(key, lost(run, pool, now, None, attempt.started_at));
            drop(state);
            self.wake(&assignment.run);
            return;
        }
        let run = assignment.run.clone();
        state.attempts.insert(
            key.clone(),
            Attempt {
                run,
                pool: pool.into(),
                assignment: Some(assignment),
                state: AttemptState::Queued,
                queued_at: now,
                since: now,
                started_at: attempt.started_at,
            },
        );
        state.queues.entry(pool.into()).or_default().push_back(key);
        self.hand_out(&mut state, pool);
        self.measure(&state, pool);
        let waiting = state.queues.get(pool).is_some_and(|q| !q.is_empty());
        drop(state);
        if waiting {
            self.wake_pool(pool);
        }
    }

    /// Tells the pool controller that `pool`'s load changed in a way its size or status follows.
    fn wake_pool(&self, pool: &str) {
        if let Some(wakes) = self.pool_wakes.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let (namespace, name) = pool.split_once('/').unwrap_or(("", pool));
            _ = wakes.send(ObjectRef::new(name).within(namespace));
        }
    }

    /// While this dispatcher is young: the unrecorded attempt `key` of a run created before it started, unknown to
    /// it, may run on a worker of the previous leader. It stands as unclaimed (claimed by its worker's report, or lost
    /// after the fence), so the run neither starts it again nor ends (a cancel, a deadline) without it.
    pub fn may_run_elsewhere(&self, pool: &str, key: &str, run: RunName, run_uid: &str) {
        let young = self.is_young();
        let mut state = self.lock();
        if young && state.listed_before(run_uid) && !state.attempts.contains_key(key) {
            let attempt = self.unclaimed(run, pool, Instant::now(), jiff::Timestamp::now());
            state.attempts.insert(key.into(), attempt);
        }
    }

    /// The run controller's first list of runs, as it comes: each run (`Some(uid)`), then its end (`None`). Runs it
    /// holds existed when this leader started; one created later was never another leader's.
    pub fn listed(&self, run_uid: Option<&str>) {
        let mut state = self.lock();
        match run_uid {
            _ if state.listed_complete => {}
            Some(uid) => _ = state.listed.insert(uid.to_string()),
            None => state.listed_complete = true,
        }
    }

    /// An attempt awaiting its claim until the fence.
    fn unclaimed(&self, run: RunName, pool: &str, now: Instant, started_at: jiff::Timestamp) -> Attempt {
        Attempt {
            run,
            pool: pool.into(),
            assignment: None,
            state: AttemptState::Unclaimed,
            queued_at: now,
            since: self.started + self.fence,
            started_at,
        }
    }

    /// Stops the attempt (cancel, deadline): dequeued, or its worker told to kill it. Remembered as stopped, so
    /// that its worker's next report is answered with a kill, never adopted.
    pub fn stop(&self, key: &str) {
        let mut state = self.lock();
        let Some(attempt) = state.attempts.get_mut(key) else { return };
        let was = std::mem::replace(&mut attempt.state, AttemptState::Stopped);
        attempt.since = Instant::now();
        let pool = attempt.pool.clone();
        if let Some(queue) = state.queues.get_mut(&pool) {
            queue.retain(|k| k != key);
        }
        if let AttemptState::Running { worker, .. } = was
            && let Some(w) = state.workers.get_mut(&(pool.clone(), worker))
        {
            w.kill = Some(key.to_string());
            if let Some(parked) = w.parked.take() {
                let kill = Answer {
                    kill: Some(key.to_string()),
                    fence_seconds: self.fence.as_secs(),
                    leader: self.id.clone(),
                    ..Default::default()
                };
                _ = parked.send(kill);
            }
        }
        self.measure(&state, &pool);
    }

    /// Stops whatever of `run` a worker still runs, the run being over. A new leader adopts what workers report
    /// running, and the run's end may have been recorded by its predecessor, whose kill went with it.
    pub fn stop_run(&self, run: &RunName) {
        let running = of_run(&self.lock(), run, |w| w.running.iter());
        for key in running {
            self.stop(&key);
        }
    }

    /// The runs' statuses hold these attempts' ends: their workers forget them and may take new attempts.
    pub fn recorded(&self, keys: &[String]) {
        let mut state = self.lock();
        let known: Vec<String> = keys.iter().filter(|k| state.attempts.contains_key(*k)).cloned().collect();
        state.recorded.extend(known);
        let holders: Vec<(PoolKey, String)> = state
            .workers
            .iter()
            .filter(|(_, w)| w.holding.iter().any(|k| keys.contains(k)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in holders {
            let Some(w) = state.workers.get_mut(&id) else { continue };
            let acks: Vec<String> = w.holding.iter().filter(|k| keys.contains(k)).cloned().collect();
            w.holding.retain(|k| !keys.contains(k));
            let free = w.holding.is_empty() && w.running.is_none();
            let Some(parked) = w.parked.take().filter(|p| !p.is_closed()) else { continue };
            let assign = if free { self.next_for(&mut state, &id.0, &id.1) } else { None };
            let answer = Answer {
                assign: assign.map(Box::new),
                fence_seconds: self.fence.as_secs(),
                leader: self.id.clone(),
                recorded: acks,
                ..Default::default()
            };
            if let Err(answer) = parked.send(answer)
                && let Some(assignment) = answer.assign
            {
                requeue_front(&mut state, &id.0, assignment.key);
            }
        }
    }

    /// Every end of `run` that a worker holds is recorded: the run is over, its status holds them all.
    pub fn recorded_run(&self, run: &RunName) {
        let keys = of_run(&self.lock(), run, |w| w.holding.iter());
        if !keys.is_empty() {
            self.recorded(&keys);
        }
    }

    /// A worker's request: what it reports is recorded, and the answer is ready now or when there is one (the
    /// receiver; the caller answers "nothing" after its hold).
    pub fn poll(&self, poll: Poll) -> Result<Answer, oneshot::Receiver<Answer>> {
        let mut state = self.lock();
        let now = Instant::now();
        let id = (poll.pool.clone(), poll.worker.clone());
        if state.workers.get(&id).is_some_and(|w| w.instance == poll.instance && poll.seq <= w.seq) {
            // Older than a request already served: what it says is out of date.
            return Ok(self.nothing());
        }
        let mut woken = Vec::new();
        let young = self.is_young();
        for ended in &poll.ended {
            match state.attempts.get_mut(&ended.key) {
                // Ended on the worker that ran it, or reported again to a new leader that was waiting for its claim.
                Some(a)
                    if matches!(&a.state, AttemptState::Running { worker, .. } if *worker == poll.worker)
                        || a.state == AttemptState::Unclaimed =>
                {
                    a.state = AttemptState::Ended(ending(ended, &poll.worker));
                    a.since = now;
                    a.assignment = None;
                    woken.push(a.run.clone());
                }
                // An end the previous leader may not have recorded: adopted while this leader is young.
                None if young => {
                    let mut adopted = lost(ended.run.clone(), &poll.pool, now, None, jiff::Timestamp::now());
                    adopted.state = AttemptState::Ended(ending(ended, &poll.worker));
                    state.attempts.insert(ended.key.clone(), adopted);
                    woken.push(ended.run.clone());
                }
                _ => {}
            }
        }
        // Which reported ends are safe to forget: recorded, or not this leader's to record (stale, long over), or
        // past the fence (a run that never records them must not hold its worker for ever).
        let (mut acks, mut holding) = (Vec::new(), Vec::new());
        for ended in &poll.ended {
            let hold = state.attempts.get(&ended.key).is_some_and(|a| {
                matches!(a.state, AttemptState::Ended(_))
                    && !state.recorded.contains(&ended.key)
                    && now.duration_since(a.since) < self.fence
            });
            if hold { holding.push(ended.key.clone()) } else { acks.push(ended.key.clone()) }
        }
        let mut kill = None;
        let running = match &poll.running {
            None => None,
            Some(r) => match state.attempts.get_mut(&r.key) {
                Some(a) => match &a.state {
                    AttemptState::Running { worker, .. } if *worker == poll.worker => Some(r.key.clone()),
                    AttemptState::Unclaimed => {
                        a.state = AttemptState::Running { worker: poll.worker.clone(), node: poll.node.clone() };
                        woken.push(a.run.clone());
                        Some(r.key.clone())
                    }
                    _ => {
                        kill = Some(r.key.clone());
                        None
                    }
                },
                // Unknown to this leader: adopted while it is young (the run's reconcile finds it), else stale.
                None if young => {
                    state.attempts.insert(
                        r.key.clone(),
                        Attempt {
                            run: r.run.clone(),
                            pool: poll.pool.clone(),
                            assignment: None,
                            state: AttemptState::Running { worker: poll.worker.clone(), node: poll.node.clone() },
                            queued_at: now,
                            since: now,
                            started_at: jiff::Timestamp::now(),
                        },
                    );
                    woken.push(r.run.clone());
                    Some(r.key.clone())
                }
                None => {
                    kill = Some(r.key.clone());
                    None
                }
            },
        };
        // What this worker was running and no longer reports, without its end: its agent restarted, or never received
        // the assignment (the answer was lost). Lost, as a disruption; the run retries at once.
        let previous = state.workers.get(&id).and_then(|w| w.running.clone());
        if let Some(previous) =
            previous.filter(|p| running.as_ref() != Some(p) && !poll.ended.iter().any(|e| e.key == *p))
            && let Some(a) = state.attempts.get_mut(&previous)
            && matches!(&a.state, AttemptState::Running { worker, .. } if *worker == poll.worker)
        {
            *a = lost(a.run.clone(), &a.pool, now, Some(poll.worker.clone()), a.started_at);
            woken.push(a.run.clone());
        }
        state.queues.entry(poll.pool.clone()).or_default();
        let worker = state.workers.entry(id).or_default();
        worker.instance.clone_from(&poll.instance);
        worker.seq = poll.seq;
        worker.pool.clone_from(&poll.pool);
        worker.node.clone_from(&poll.node);
        worker.last_seen = Some(now);
        worker.running.clone_from(&running);
        worker.holding = holding;
        let holds = !worker.holding.is_empty();
        // An earlier request of this worker, still held, is answered "nothing": the new one replaces it.
        worker.parked = None;
        let kill = kill.or_else(|| worker.kill.take().filter(|k| running.as_ref() == Some(k)));
        let fence_seconds = self.fence.as_secs();
        let answer = |assign: Option<Assignment>, kill: Option<String>, recorded: Vec<String>| Answer {
            assign: assign.map(Box::new),
            kill,
            fence_seconds,
            leader: self.id.clone(),
            recorded,
        };
        let answer = if kill.is_some() {
            Ok(answer(None, kill, acks))
        } else if running.is_none() && !holds {
            match self.next_for(&mut state, &poll.pool, &poll.worker) {
                Some(assign) => Ok(answer(Some(assign), None, acks)),
                None if acks.is_empty() => Err(()),
                None => Ok(answer(None, None, acks)),
            }
        } else if running.is_none() && acks.is_empty() {
            // Idle, holding an end: held until the run's status records it (`recorded`).
            Err(())
        } else {
            Ok(answer(None, None, acks))
        };
        let answer = answer.map_err(|()| {
            let (tx, rx) = oneshot::channel();
            if let Some(w) = state.workers.get_mut(&(poll.pool.clone(), poll.worker.clone())) {
                w.parked = Some(tx);
            }
            rx
        });
        self.measure(&state, &poll.pool);
        drop(state);
        for run in &woken {
            self.wake(run);
        }
        answer
    }

    /// The next queued attempt of `pool`, given to `worker`.
    fn next_for(&self, state: &mut State, pool: &str, worker: &str) -> Option<Assignment> {
        let node =
            state.workers.get(&(pool.to_string(), worker.to_string())).map(|w| w.node.clone()).unwrap_or_default();
        while let Some(key) = state.queues.get_mut(pool).and_then(VecDeque::pop_front) {
            let Some(attempt) = state.attempts.get_mut(&key) else { continue };
            let Some(assignment) = attempt.assignment.clone() else { continue };
            attempt.state = AttemptState::Running { worker: worker.into(), node };
            self.metrics.wait_seconds.observe(attempt.queued_at.elapsed().as_secs_f64());
            if let Some(w) = state.workers.get_mut(&(pool.to_string(), worker.to_string())) {
                w.running = Some(key);
            }
            return Some(assignment);
        }
        None
    }

    /// Gives queued attempts of `pool` to its idle workers whose requests are held.
    fn hand_out(&self, state: &mut State, pool: &str) {
        loop {
            if state.queues.get(pool).is_none_or(VecDeque::is_empty) {
                return;
            }
            let idle = state
                .workers
                .iter()
                .find(|((p, _), w)| {
                    p == pool
                        && w.running.is_none()
                        && w.holding.is_empty()
                        && w.parked.as_ref().is_some_and(|t| !t.is_closed())
                })
                .map(|((_, name), _)| name.clone());
            let Some(name) = idle else { return };
            let Some(assign) = self.next_for(state, pool, &name) else { return };
            let parked = state.workers.get_mut(&(pool.to_string(), name)).and_then(|w| {
                // Its attempt's heartbeats count from now, not from when its held request came.
                w.last_seen = Some(Instant::now());
                w.parked.take()
            });
            let key = assign.key.clone();
            let answer = Answer {
                assign: Some(Box::new(assign)),
                fence_seconds: self.fence.as_secs(),
                leader: self.id.clone(),
                ..Default::default()
            };
            if let Some(Err(_)) = parked.map(|p| p.send(answer)) {
                requeue_front(state, pool, key);
            }
        }
    }

    /// Ends what lost its worker or its claim, forgets what ended long ago. Liveness is a heartbeat's absence, so
    /// only a clock sees it: this runs every second.
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let mut state = self.lock();
        let mut woken = Vec::new();
        let lost_workers: Vec<(PoolKey, String)> = state
            .workers
            .iter()
            // A worker whose request is held is connected, however long ago it came.
            .filter(|(_, w)| w.parked.as_ref().is_none_or(oneshot::Sender::is_closed))
            .filter(|(_, w)| w.last_seen.is_none_or(|t| now.duration_since(t) > WORKER_LOST))
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost_workers {
            let Some(worker) = state.workers.remove(&id) else { continue };
            let Some(key) = worker.running else { continue };
            if let Some(a) = state.attempts.get_mut(&key)
                && matches!(a.state, AttemptState::Running { .. })
            {
                *a = lost(a.run.clone(), &a.pool, now, Some(id.1.clone()), a.started_at);
                woken.push(a.run.clone());
            }
        }
        for a in state.attempts.values_mut() {
            if a.state == AttemptState::Unclaimed && now >= a.since {
                *a = lost(a.run.clone(), &a.pool, now, None, a.started_at);
                woken.push(a.run.clone());
            }
        }
        state.attempts.retain(|_, a| {
            !matches!(a.state, AttemptState::Ended(_) | AttemptState::Stopped)
                || now.duration_since(a.since) < ENDED_KEPT
        });
        let State { attempts, recorded, .. } = &mut *state;
        recorded.retain(|key| attempts.contains_key(key));
        if now.duration_since(self.started) >= self.fence && state.listed_complete {
            // Asked only while young.
            state.listed = HashSet::new();
        }
        // A pool with nothing queued, no worker and no attempt left (deleted, or idle at zero) is forgotten, its
        // gauges with it: pools come and go, and each would otherwise stay in memory and on /metrics.
        let gone: Vec<PoolKey> = state
            .queues
            .iter()
            .filter(|(pool, queue)| {
                queue.is_empty()
                    && !state.workers.keys().any(|(p, _)| p == *pool)
                    && !state.attempts.values().any(|a| a.pool == **pool)
            })
            .map(|(pool, _)| pool.clone())
            .collect();
        for pool in &gone {
            state.queues.remove(pool);
            let labels = pool_labels(pool);
            self.metrics.queue_depth.remove(&labels);
            self.metrics.busy_workers.remove(&labels);
        }
        let pools: Vec<PoolKey> = state.queues.keys().cloned().collect();
        for pool in pools {
            self.measure(&state, &pool);
        }
        drop(state);
        for run in &woken {
            self.wake(run);
        }
    }

    fn measure(&self, state: &State, pool: &str) {
        let labels = pool_labels(pool);
        let queued = state.queues.get(pool).map_or(0, VecDeque::len);
        let busy = state.workers.values().filter(|w| w.pool == pool && w.running.is_some()).count();
        let queue_depth = self.metrics.queue_depth.get_or_create(&labels);
        let busy_workers = self.metrics.busy_workers.get_or_create(&labels);
        let was_loaded = queue_depth.get() + busy_workers.get() > 0;
        queue_depth.set(i64::try_from(queued).unwrap_or(i64::MAX));
        busy_workers.set(i64::try_from(busy).unwrap_or(i64::MAX));
        // Gone idle: its status would show the last load for ever, and its scale-down delay starts now.
        if was_loaded && queued + busy == 0 {
            self.wake_pool(pool);
        }
    }
}

impl State {
    /// Whether the run existed when this leader started (in its first list, or that list is not complete yet).
    fn listed_before(&self, run_uid: &str) -> bool {
        !self.listed_complete || self.listed.contains(run_uid)
    }
}

/// The attempt keys of `run` among what `pick` takes from each worker (what it runs, the ends it holds).
fn of_run<'a, I>(state: &'a State, run: &RunName, pick: impl Fn(&'a Worker) -> I) -> Vec<String>
where
    I: Iterator<Item = &'a String>,
{
    state
        .workers
        .values()
        .flat_map(pick)
        .filter(|key| state.attempts.get(*key).is_some_and(|a| a.run == *run))
        .cloned()
        .collect()
}

/// A handed-out attempt whose request went away as it was answered: back to the front of its queue.
fn requeue_front(state: &mut State, pool: &str, key: String) {
    if let Some(a) = state.attempts.get_mut(&key) {
        a.state = AttemptState::Queued;
    }
    state.queues.entry(pool.into()).or_default().push_front(key);
}

fn pool_labels(pool: &str) -> Vec<(String, String)> {
    let (namespace, name) = pool.split_once('/').unwrap_or(("", pool));
    vec![("namespace".into(), namespace.into()), ("pool".into(), name.into())]
}

fn lost(run: RunName, pool: &str, now: Instant, worker: Option<String>, started_at: jiff::Timestamp) -> Attempt {
    Attempt {
        run,
        pool: pool.into(),
        assignment: None,
        state: AttemptState::Ended(Ending {
            exit_code: None,
            reason: "WorkerLost".into(),
            disrupted: true,
            worker,
            finished_at: jiff::Timestamp::now(),
        }),
        queued_at: now,
        since: now,
        started_at,
    }
}

fn ending(ended: &Ended, worker: &str) -> Ending {
    Ending {
        exit_code: Some(ended.exit_code),
        // A process the agent killed because it lost the leader is a disruption, as a pod lost with its node is.
        disrupted: matches!(ended.reason.as_str(), "Fenced" | "WorkerStopping"),
        reason: ended.reason.clone(),
        worker: Some(worker.into()),
        finished_at: ended.finished_at.parse().unwrap_or_else(|_| jiff::Timestamp::now()),
    }
}

/// What the endpoint serves with.
#[derive(Clone)]
struct Served {
    dispatcher: Dispatcher,
    auth: Option<super::auth::Authenticator>,
}

/// Serves the dispatch endpoint until `shutdown`; sweeps every second. With `auth`, a request is served only with
/// the token of the pool's own ServiceAccount (`auth.rs`).
pub async fn serve(
    dispatcher: Dispatcher,
    auth: Option<super::auth::Authenticator>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::post;
    let sweeper = dispatcher.clone();
    let sweep = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            sweeper.sweep();
        }
    });
    let app =
        axum::Router::new().route(super::protocol::POLL_PATH, post(handle)).with_state(Served { dispatcher, auth });
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    sweep.abort();
    served
}

async fn handle(
    axum::extract::State(Served { dispatcher, auth }): axum::extract::State<Served>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let poll: Poll = match serde_json::from_slice(&body) {
        Ok(poll) => poll,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not a poll: {e}")).into_response(),
    };
    if let Some(auth) = &auth {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if let Err(refused) = auth.authorize(token, &poll.pool).await {
            tracing::warn!(worker = %poll.worker, pool = %poll.pool, %refused, "worker refused");
            return (StatusCode::FORBIDDEN, refused.to_string()).into_response();
        }
    }
    let hold = if poll.running.is_some() { Duration::ZERO } else { super::protocol::IDLE_HOLD };
    let answer = match dispatcher.poll(poll) {
        Ok(answer) => answer,
        Err(parked) => match tokio::time::timeout(hold, parked).await {
            Ok(Ok(answer)) => answer,
            _ => dispatcher.nothing(),
        },
    };
    match serde_json::to_vec(&answer) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatcher() -> (Dispatcher, mpsc::UnboundedReceiver<ObjectRef<WorkflowRun>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = DispatchMetrics::register(&mut Registry::default());
        let d = Dispatcher::new(tx, Duration::from_secs(15), metrics);
        d.listed(Some("old"));
        d.listed(None);
        (d, rx)
    }

    /// A new attempt of a run created after the dispatcher started (its first list held only the run "old").
    fn fresh() -> Dispatched {
        let now = jiff::Timestamp::now();
        Dispatched { started_at: now, recorded: false, run_uid: "new".into() }
    }

    /// An attempt the run's status recorded as started at `at`.
    fn recorded(at: jiff::Timestamp) -> Dispatched {
        Dispatched { started_at: at, recorded: true, run_uid: "old".into() }
    }

    fn assignment(key: &str) -> Assignment {
        Assignment {
            key: format!("ns/{key}"),
            run: RunName { namespace: "ns".into(), name: key.trim_end_matches("-1").into() },
            argv: vec!["/bin/true".into()],
            env: vec![],
            deadline_seconds: 60,
        }
    }

    /// How a worker reports attempt `key`'s end.
    fn ended(key: &str, exit_code: i32, reason: &str) -> Ended {
        Ended {
            key: format!("ns/{key}"),
            run: assignment(key).run,
            exit_code,
            reason: reason.into(),
            finished_at: "2026-12-07T10:00:00Z".into(),
        }
    }

    /// A request of `worker`'s agent, numbered by a counter shared by the tests' agents (rising, as an agent's are).
    fn poll(worker: &str) -> Poll {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Poll {
            pool: "ns/p".into(),
            worker: worker.into(),
            node: "n".into(),
            instance: "i".into(),
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn an_idle_worker_gets_the_queued_attempt_and_its_end_wakes_the_run() {
        let (d, mut woken) = dispatcher();
        d.dispatch("ns/p", assignment("a-1"), fresh());
        assert_eq!(d.state("ns/a-1"), Some(AttemptState::Queued));
        let answer = d.poll(poll("w1")).expect("an answer now");
        assert_eq!(answer.assign.map(|a| a.key).as_deref(), Some("ns/a-1"));
        assert_eq!(d.state("ns/a-1"), Some(AttemptState::Running { worker: "w1".into(), node: "n".into() }));
        // Dispatching the same attempt again changes nothing.
        d.dispatch("ns/p", assignment("a-1"), fresh());
        assert_eq!(d.load("ns/p"), 1);
        let next = d.poll(Poll { ended: vec![ended("a-1", 3, "Error")], ..poll("w1") });
        assert!(next.is_err(), "nothing queued: the request is held");
        assert!(matches!(
            d.state("ns/a-1"),
            Some(AttemptState::Ended(Ending { exit_code: Some(3), disrupted: false, .. }))
        ));
        assert_eq!(woken.try_recv().map(|r| r.name).ok().as_deref(), Some("a"));
    }

    #[test]
    fn an_attempt_its_worker_no_longer_reports_is_lost_as_a_disruption() {
        let (d, mut woken) = dispatcher();
        d.dispatch("ns/p", assignment("e-1"), fresh());
        let _ = d.poll(poll("w1"));
        // The agent restarted (or never got the answer): it asks again, running nothing, reporting no end.
        let _ = d.poll(poll("w1"));
        let state = d.state("ns/e-1");
        assert!(matches!(state, Some(AttemptState::Ended(Ending { disrupted: true, .. }))), "{state:?}");
        assert_eq!(woken.try_recv().map(|r| r.name).ok().as_deref(), Some("e"));
    }

    #[test]
    fn a_new_leader_adopts_an_end_its_predecessor_never_recorded() {
        let (d, mut woken) = dispatcher();
        let before = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(30);
        // Recorded as started under the old leader; its end, reported to the old leader, is reported again here.
        d.dispatch("ns/p", assignment("f-1"), recorded(before));
        let completed = |key: &str| ended(key, 0, "Completed");
        let _ = d.poll(Poll { ended: vec![completed("f-1"), completed("g-1")], ..poll("w1") });
        for key in ["ns/f-1", "ns/g-1"] {
            let state = d.state(key);
            assert!(matches!(state, Some(AttemptState::Ended(Ending { exit_code: Some(0), .. }))), "{key}: {state:?}");
        }
        let runs: Vec<String> = std::iter::from_fn(|| woken.try_recv().ok()).map(|r| r.name).collect();
        assert_eq!(runs, ["f", "g"]);
    }

    #[test]
    fn a_stale_request_arriving_after_a_later_one_changes_nothing() {
        let (d, _woken) = dispatcher();
        d.dispatch("ns/p", assignment("h-1"), fresh());
        let stale = poll("w1");
        let _ = d.poll(poll("w1")); // assigned h-1
        // The earlier request (running nothing) arrives late: h-1 is not lost, nothing else is handed out.
        let answer = d.poll(stale).expect("answered at once");
        assert_eq!(answer.assign, None);
        assert_eq!(d.state("ns/h-1"), Some(AttemptState::Running { worker: "w1".into(), node: "n".into() }));
    }

    #[test]
    fn a_held_request_is_answered_by_the_next_dispatch() {
        let (d, _woken) = dispatcher();
        let Err(mut held) = d.poll(poll("w1")) else { panic!("held") };
        d.dispatch("ns/p", assignment("b-1"), fresh());
        let answer = held.try_recv().expect("answered");
        assert_eq!(answer.assign.map(|a| a.key).as_deref(), Some("ns/b-1"));
    }

    #[test]
    fn a_stopped_running_attempt_is_killed_on_the_workers_next_request() {
        let (d, _woken) = dispatcher();
        d.dispatch("ns/p", assignment("c-1"), fresh());
        let _ = d.poll(poll("w1"));
        d.stop("ns/c-1");
        let running = Some(super::super::protocol::Running { key: "ns/c-1".into(), run: assignment("c-1").run });
        let answer = d.poll(Poll { running, ..poll("w1") }).expect("at once");
        assert_eq!(answer.kill.as_deref(), Some("ns/c-1"));
        assert_eq!(d.state("ns/c-1"), Some(AttemptState::Stopped));
        // Its end, reported after the kill, changes nothing.
        let _ = d.poll(Poll { ended: vec![ended("c-1", 143, "Killed")], ..poll("w1") });
        assert_eq!(d.state("ns/c-1"), Some(AttemptState::Stopped));
    }

    #[test]
    fn an_attempt_recorded_before_a_new_leader_waits_for_its_claim_and_is_adopted() {
        let (d, _woken) = dispatcher();
        let before = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(30);
        d.dispatch("ns/p", assignment("d-1"), recorded(before));
        assert_eq!(d.state("ns/d-1"), Some(AttemptState::Unclaimed));
        assert_eq!(d.load("ns/p"), 0, "never queued");
        let running = Some(super::super::protocol::Running { key: "ns/d-1".into(), run: assignment("d-1").run });
        let answer = d.poll(Poll { running, ..poll("w9") }).expect("at once");
        assert_eq!(answer.kill, None);
        assert_eq!(d.state("ns/d-1"), Some(AttemptState::Running { worker: "w9".into(), node: "n".into() }));
    }

    #[test]
    fn a_new_leader_holds_an_unrecorded_attempt_of_an_older_run_until_it_is_claimed_or_lost_at_the_fence() {
        let (d, mut woken) = dispatcher();
        let now = jiff::Timestamp::now();
        // Its start not written yet (`running_status_delay`): the previous leader may have handed it out.
        let older = Dispatched { started_at: now, recorded: false, run_uid: "old".into() };
        d.dispatch("ns/p", assignment("j-1"), older.clone());
        d.dispatch("ns/p", assignment("k-1"), older);
        // The run controller asks before it acts on a run whose next attempt it has not heard of (a cancel).
        d.may_run_elsewhere("ns/p", "ns/l-1", assignment("l-1").run, "old");
        for key in ["ns/k-1", "ns/l-1"] {
            assert_eq!(d.state(key), Some(AttemptState::Unclaimed), "{key}");
        }
        assert_eq!(d.load("ns/p"), 0, "never queued while a worker may run it");
        let mut idle = d.poll(poll("w1")).expect_err("an idle worker gets none of them");
        // A worker of the previous leader reports j-1 running: adopted, started when the run planned it.
        let running = Some(super::super::protocol::Running { key: "ns/j-1".into(), run: assignment("j-1").run });
        let answer = d.poll(Poll { running, ..poll("w9") }).expect("at once");
        assert_eq!(answer.kill, None);
        assert_eq!(d.state("ns/j-1"), Some(AttemptState::Running { worker: "w9".into(), node: "n".into() }));
        assert_eq!(d.started_at("ns/j-1"), Some(now));
        // A run created after this leader started was nobody else's: dispatched at once, to the idle worker.
        d.dispatch("ns/p", assignment("m-1"), fresh());
        d.may_run_elsewhere("ns/p", "ns/n-1", assignment("n-1").run, "new");
        assert_eq!(d.state("ns/n-1"), None);
        assert_eq!(idle.try_recv().expect("answered").assign.expect("an attempt").key, "ns/m-1");
        _ = std::iter::from_fn(|| woken.try_recv().ok()).count();
        // Past the fence, unclaimed: it may have run on a worker that died with the old leader, so it is lost (a
        // disruption; the run's next attempt, with its own span, runs instead), never run again as it was.
        d.sweep_at(Instant::now() + Duration::from_secs(16));
        for key in ["ns/k-1", "ns/l-1"] {
            let state = d.state(key);
            assert!(matches!(state, Some(AttemptState::Ended(Ending { disrupted: true, .. }))), "{key}: {state:?}");
        }
        let runs: Vec<String> = std::iter::from_fn(|| woken.try_recv().ok()).map(|r| r.name).collect();
        assert!(runs.contains(&"k".to_string()) && runs.contains(&"l".to_string()), "{runs:?}");
    }

    #[test]
    fn a_pool_going_idle_is_woken_so_its_status_shows_the_empty_queue() {
        let (d, _woken) = dispatcher();
        let (tx, mut pools) = mpsc::unbounded_channel();
        d.wake_pools(tx);
        d.dispatch("ns/p", assignment("x-1"), fresh());
        assert!(pools.try_recv().is_ok(), "queued with no worker: the pool may grow");
        let _ = d.poll(poll("w1"));
        assert!(pools.try_recv().is_err(), "busy, not idle: nothing to say");
        let _ = d.poll(Poll { ended: vec![ended("x-1", 0, "Completed")], ..poll("w1") });
        assert_eq!(pools.try_recv().map(|p| p.name).ok().as_deref(), Some("p"), "idle again");
    }

    #[test]
    fn a_worker_holding_an_unrecorded_end_gets_no_new_attempt_until_the_run_records_it() {
        let (d, _woken) = dispatcher();
        d.dispatch("ns/p", assignment("h-1"), fresh());
        let _ = d.poll(poll("w1"));
        d.dispatch("ns/p", assignment("i-1"), fresh());
        // h-1 ended; its run has not written it yet: the end is not acknowledged and i-1 waits for another worker.
        let reported = || Poll { ended: vec![ended("h-1", 0, "Completed")], ..poll("w1") };
        let mut held = match d.poll(reported()) {
            Err(held) => held,
            Ok(answer) => panic!("answered at once: {answer:?}"),
        };
        assert_eq!(d.state("ns/i-1"), Some(AttemptState::Queued));
        // The leader dies before the write: a new one hears the same end again (the agent kept it).
        let (successor, _woken) = dispatcher();
        assert!(successor.poll(reported()).is_err(), "adopted, and held again");
        // The run's status records the end: the held request is answered with it, and with the next attempt.
        d.recorded(&["ns/h-1".to_string()]);
        let answer = held.try_recv().expect("answered");
        assert_eq!(answer.recorded, ["ns/h-1"]);
        assert_eq!(answer.assign.map(|a| a.key).as_deref(), Some("ns/i-1"));
        // Reported again, running i-1 now (the answer crossed a retry): acknowledged at once, i-1 untouched.
        let running = Some(super::super::protocol::Running { key: "ns/i-1".into(), run: assignment("i-1").run });
        let again = d.poll(Poll { running, ..reported() });
        assert!(again.is_ok_and(|a| a.recorded == ["ns/h-1"] && a.assign.is_none()));
        assert_eq!(d.state("ns/i-1"), Some(AttemptState::Running { worker: "w1".into(), node: "n".into() }));
    }

    #[test]
    fn a_pool_with_no_worker_queue_or_attempt_left_is_forgotten_with_its_gauges() {
        let (d, _woken) = dispatcher();
        let _ = d.poll(Poll { pool: "ns/gone".into(), ..poll("w1") });
        let _ = d.poll(poll("w2"));
        let gauge = |pool: &str| d.metrics.busy_workers.get(&pool_labels(pool)).is_some();
        assert!(gauge("ns/gone") && gauge("ns/p"));
        // Its workers went with its Deployment (taken for lost after WORKER_LOST).
        d.lock().workers.retain(|(pool, _), _| pool != "ns/gone");
        d.sweep();
        assert!(!d.lock().queues.contains_key("ns/gone"), "forgotten");
        assert!(!gauge("ns/gone"), "its gauges gone from /metrics");
        assert!(d.lock().queues.contains_key("ns/p") && gauge("ns/p"), "a pool with a worker stays");
    }

    #[test]
    fn an_adopted_attempt_of_a_run_that_is_over_is_killed() {
        let (d, _woken) = dispatcher();
        // A worker reports an attempt this (young) leader never dispatched: adopted.
        let running = || Some(super::super::protocol::Running { key: "ns/e-1".into(), run: assignment("e-1").run });
        let answer = d.poll(Poll { running: running(), ..poll("w1") }).expect("at once");
        assert_eq!(answer.kill, None);
        // The run's end was recorded by the previous leader: its reconcile stops what still runs.
        d.stop_run(&assignment("e-1").run);
        d.stop_run(&assignment("other-1").run);
        let answer = d.poll(Poll { running: running(), ..poll("w1") }).expect("at once");
        assert_eq!(answer.kill.as_deref(), Some("ns/e-1"));
    }
}
