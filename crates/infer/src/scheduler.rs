//! The server's decode loop: one thread owns the compute, takes jobs from a bounded FIFO queue and decodes every
//! admitted job together in one `BatchDecoder` (jobs arriving while a batch runs take a free row at once; each
//! row has its own cache slots; otherwise they wait for a row to finish). Submitting to a full queue fails at once (the
//! server answers 429). A job whose receiver is dropped (client gone) is cancelled at the next step, or skipped
//! if still queued. `shutdown` lets queued and running jobs finish, then the thread exits.
//! Does not tokenize, decode text or speak HTTP.

use crate::decoding::{BatchDecoder, FinishReason, SeqParams};
use crate::logprobs::TokenLogprob;
use neox::Model;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// What a job's receiver gets.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// A token of the job's sequence `index` (its groups' sequences numbered in order).
    Token { index: usize, id: u32, finish: Option<FinishReason>, logprob: Option<TokenLogprob> },
    /// The log-probabilities of group `group`'s prompt tokens (before its first token; the first entry is None).
    Prompt { group: usize, logprobs: Vec<Option<TokenLogprob>> },
    /// The engine failed; the job is over.
    Error(String),
}

/// Sequences continuing one prompt, decoded in rows that share its prefill.
#[derive(Clone, Debug)]
pub struct Group {
    pub prompt: Vec<u32>,
    pub seqs: Vec<SeqParams>,
    /// Some(k): send the prompt tokens' log-probabilities with k alternatives (`JobEvent::Prompt`).
    pub prompt_logprobs: Option<usize>,
}

impl Group {
    fn max_new(&self) -> usize {
        self.seqs.iter().map(|p| p.max_new_tokens).max().unwrap_or(1)
    }
}

/// Scheduler settings.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most jobs waiting for a row (beyond that, `submit` fails).
    pub queue_size: usize,
    /// KV cache slots per row (one sequence's prompt and generated tokens).
    pub kv_slots: usize,
    /// Only ids below this are sampled (tokenizer size).
    pub vocab_limit: usize,
    pub stop_id: Option<u32>,
    /// When idle, wait this long after the first arrival so that concurrent requests start in one batch.
    pub batch_window: Duration,
}

/// Counters, readable at any time (`/health`).
#[derive(Default, Debug)]
pub struct Stats {
    pub queued: AtomicU64,
    pub running: AtomicU64,
    /// Sequences finished (a request with `n` > 1 or several prompts counts each).
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
    pub tokens: AtomicU64,
}

/// One flag per sequence of a job: set to stop that sequence (a stop string was found in its text).
pub type Cancels = Arc<Vec<AtomicBool>>;

struct Job {
    cancels: Cancels,
    /// Groups not yet admitted (admitted from the front as rows free up).
    groups: VecDeque<Group>,
    /// Index of the next group's first sequence, and of the next group.
    next_index: usize,
    next_group: usize,
    tx: UnboundedSender<JobEvent>,
}

struct Shared {
    queue: Mutex<VecDeque<Job>>,
    cv: Condvar,
    shutdown: AtomicBool,
}

/// Handle for submitting jobs; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
    pub stats: Arc<Stats>,
    cfg: Arc<SchedulerConfig>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Why `submit` refused a job.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    ShuttingDown,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Scheduler {
    pub fn start(model: Arc<Model>, cfg: SchedulerConfig) -> Self {
        let shared =
            Arc::new(Shared { queue: Mutex::new(VecDeque::new()), cv: Condvar::new(), shutdown: false.into() });
        let stats = Arc::new(Stats::default());
        let cfg = Arc::new(cfg);
        let (s2, st2, c2) = (shared.clone(), stats.clone(), cfg.clone());
        let handle = std::thread::Builder::new()
            .name("dolly-decode".into())
            .spawn(move || decode_loop(&model, &c2, &s2, &st2))
            .expect("spawn decode thread");
        Scheduler { shared, stats, cfg, thread: Arc::new(Mutex::new(Some(handle))) }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queue a one-sequence job; its tokens arrive on the returned receiver. Dropping the receiver cancels it.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: SeqParams,
    ) -> std::result::Result<UnboundedReceiver<JobEvent>, SubmitError> {
        Ok(self.submit_groups(vec![Group { prompt, seqs: vec![params], prompt_logprobs: None }])?.0)
    }

    /// Queue a job of several groups (prompts), each of one or more sequences (at most `max_batch` per group:
    /// a group's rows start together). Events of every sequence arrive on the one receiver.
    pub fn submit_groups(
        &self,
        groups: Vec<Group>,
    ) -> std::result::Result<(UnboundedReceiver<JobEvent>, Cancels), SubmitError> {
        if self.shared.shutdown.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let (tx, rx) = unbounded_channel();
        let mut q = lock(&self.shared.queue);
        if q.len() >= self.cfg.queue_size {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull);
        }
        let cancels: Cancels = Arc::new(groups.iter().flat_map(|g| &g.seqs).map(|_| AtomicBool::new(false)).collect());
        q.push_back(Job { cancels: cancels.clone(), groups: groups.into(), next_index: 0, next_group: 0, tx });
        self.stats.queued.store(q.len() as u64, Ordering::Relaxed);
        drop(q);
        self.shared.cv.notify_all();
        Ok((rx, cancels))
    }

    /// Refuse new jobs, finish the queued and running ones, and wait for the decode thread to end.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
    }
}

fn decode_loop(model: &Model, cfg: &SchedulerConfig, shared: &Shared, stats: &Stats) {
    let max_batch = cfg.max_batch.max(1);
    // One decoder for the server's life, max_batch rows: idle rows cost nothing (the engine computes real tokens
    // only), requests arriving while a batch decodes take a free row, and the KV cache is allocated once.
    let mut dec = BatchDecoder::new(model, max_batch, cfg.kv_slots, cfg.vocab_limit, cfg.stop_id);
    dec.commit_memory();
    loop {
        // idle: wait for work (or exit when shutting down with nothing queued)
        {
            let mut q = lock(&shared.queue);
            while q.is_empty() {
                if shared.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                q = shared
                    .cv
                    .wait_timeout(q, Duration::from_millis(200))
                    .map(|r| r.0)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if q.len() < max_batch && !cfg.batch_window.is_zero() {
                drop(q);
                std::thread::sleep(cfg.batch_window);
            }
        }
        let batch = max_batch;
        dec.reset();
        // each row's job channel and the sequence's index in its job
        let mut txs: Vec<Option<(UnboundedSender<JobEvent>, usize, Cancels)>> = vec![None; batch];
        // the group index of a group's first row (where its prompt log-probabilities come from)
        let mut group_of = vec![0usize; batch];
        loop {
            // admit queued jobs' groups while rows and slots allow (FIFO: the head waits if it does not fit)
            {
                let mut q = lock(&shared.queue);
                while let Some(job) = q.front_mut() {
                    if job.tx.is_closed() {
                        q.pop_front();
                        stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let Some(g) = job.groups.front() else {
                        q.pop_front();
                        continue;
                    };
                    if !dec.can_admit_group(g.prompt.len(), g.max_new(), g.seqs.len()) {
                        break;
                    }
                    let Some(g) = job.groups.pop_front() else { break };
                    let n = g.seqs.len();
                    match dec.admit_group(g.prompt, g.seqs, g.prompt_logprobs) {
                        Ok(rows) => {
                            group_of[rows[0]] = job.next_group;
                            for (j, row) in rows.into_iter().enumerate() {
                                txs[row] = Some((job.tx.clone(), job.next_index + j, job.cancels.clone()));
                            }
                            job.next_index += n;
                            job.next_group += 1;
                        }
                        Err(e) => {
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                            let _ = job.tx.send(JobEvent::Error(e.to_string()));
                            q.pop_front();
                        }
                    }
                }
                stats.queued.store(q.len() as u64, Ordering::Relaxed);
            }
            // cancel rows whose client is gone, end those stopped by a stop string
            for (row, tx) in txs.iter_mut().enumerate() {
                let Some((t, index, cancels)) = tx.as_ref() else { continue };
                let stopped = cancels.get(*index).is_some_and(|c| c.load(Ordering::Relaxed));
                if stopped || t.is_closed() {
                    dec.cancel(row);
                    *tx = None;
                    let counter = if stopped { &stats.completed } else { &stats.cancelled };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
            stats.running.store(dec.running() as u64, Ordering::Relaxed);
            if dec.running() == 0 {
                break;
            }
            match dec.step() {
                Ok(events) => {
                    stats.tokens.fetch_add(events.len() as u64, Ordering::Relaxed);
                    for (row, logprobs) in dec.take_prompt_logprobs() {
                        if let Some((tx, ..)) = &txs[row] {
                            let _ = tx.send(JobEvent::Prompt { group: group_of[row], logprobs });
                        }
                    }
                    for e in events {
                        let Some((tx, index, _)) = &txs[e.row] else { continue };
                        let ev = JobEvent::Token { index: *index, id: e.token, finish: e.finish, logprob: e.logprob };
                        if tx.send(ev).is_err() {
                            dec.cancel(e.row);
                            txs[e.row] = None;
                            stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        } else if e.finish.is_some() {
                            txs[e.row] = None;
                            stats.completed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => {
                    for (tx, ..) in txs.iter_mut().filter_map(|t| t.take()) {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.send(JobEvent::Error(e.to_string()));
                    }
                    break;
                }
            }
        }
        stats.running.store(0, Ordering::Relaxed);
    }
}
