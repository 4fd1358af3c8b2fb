//! `batchd mock-upstream --engine-sim`: the mock answers like an inference server with a
//! GPU behind it, for tests and benchmarks of what batchd's order and window do to a real
//! engine (prefix caching, KV cache pressure, preemption). It is a model with the right
//! mechanisms and proportions, not a claim about any GPU; `docs/engine-sim.md` gives its
//! parameters and where their defaults come from.
//!
//! - [`prompt`] renders a request through a chat template and cuts it into tokens;
//! - [`blocks`] is the KV cache: fixed-size blocks, reference counts, the prefix cache with
//!   LRU eviction of unused blocks;
//! - [`engine`] is the scheduler: continuous batching under a sequence cap and a token budget,
//!   prefill per uncached token, decode steps that cost more with more sequences, preemption
//!   with recompute when the cache is full. Pure and deterministic.
//!
//! This module runs the engine as a tokio task, in (scaled) real time: requests arrive over
//! a channel and join at the next step; each step sleeps its simulated duration divided by
//! `speedup` (until a deadline, so the timer's millisecond coarseness does not add up; an
//! idle engine waits on the channel, never polls); finished requests are answered through
//! their oneshot. A request whose HTTP client goes away is
//! aborted in the engine, as vLLM aborts it. Its state is published after every step for
//! `GET /metrics`, under vLLM's metric names.

pub mod blocks;
pub mod engine;
pub mod prompt;

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use engine::{Done, Params, Refused, Snapshot};
use engine::{Engine, ReqId};

/// The defaults of [`Params`] and of the command-line flags.
pub const DEFAULT: Params = Params {
    max_num_seqs: 256,
    max_batched_tokens: 8192,
    block_size: 16,
    num_blocks: 26_000,
    prefix_caching: true,
    max_model_len: 32_768,
    step_us: 7_000.0,
    prefill_us_per_token: 50.0,
    decode_us_per_seq: 30.0,
    attn_ns_per_token: 40.0,
};

/// The engine simulator's flags (`batchd mock-upstream --engine-sim ...`).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct SimArgs {
    /// Answer chat, completions, responses, messages and embeddings with a simulated
    /// inference engine (continuous batching, KV cache, prefix caching, preemption).
    #[arg(long)]
    pub engine_sim: bool,
    /// Most sequences running at once (vLLM's --max-num-seqs).
    #[arg(long, default_value_t = DEFAULT.max_num_seqs)]
    pub sim_max_seqs: u32,
    /// Most tokens computed in one step (vLLM's --max-num-batched-tokens; chunked prefill).
    #[arg(long, default_value_t = DEFAULT.max_batched_tokens)]
    pub sim_batched_tokens: u32,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = DEFAULT.block_size)]
    pub sim_block_size: u32,
    /// KV cache blocks (the cache holds blocks × block size tokens).
    #[arg(long, default_value_t = DEFAULT.num_blocks)]
    pub sim_kv_blocks: u32,
    /// Disable the prefix cache (vLLM's --no-enable-prefix-caching).
    #[arg(long)]
    pub sim_no_prefix_caching: bool,
    /// Longest prompt + output, in tokens (longer requests get a 400).
    #[arg(long, default_value_t = DEFAULT.max_model_len)]
    pub sim_max_model_len: u32,
    /// Fixed cost of one engine step, in microseconds.
    #[arg(long, default_value_t = DEFAULT.step_us)]
    pub sim_step_us: f64,
    /// Cost of one prompt token computed (not found in the prefix cache), in microseconds.
    #[arg(long, default_value_t = DEFAULT.prefill_us_per_token)]
    pub sim_prefill_us: f64,
    /// Cost of one decoding sequence in a step, in microseconds.
    #[arg(long, default_value_t = DEFAULT.decode_us_per_seq)]
    pub sim_decode_us: f64,
    /// Cost of one context token a decoding sequence attends to, in nanoseconds.
    #[arg(long, default_value_t = DEFAULT.attn_ns_per_token)]
    pub sim_attn_ns: f64,
    /// Run the simulated clock this many times faster than the wall clock.
    #[arg(long, default_value_t = 1.0)]
    pub sim_speedup: f64,
}

impl Default for SimArgs {
    fn default() -> SimArgs {
        SimArgs {
            engine_sim: false,
            sim_max_seqs: DEFAULT.max_num_seqs,
            sim_batched_tokens: DEFAULT.max_batched_tokens,
            sim_block_size: DEFAULT.block_size,
            sim_kv_blocks: DEFAULT.num_blocks,
            sim_no_prefix_caching: !DEFAULT.prefix_caching,
            sim_max_model_len: DEFAULT.max_model_len,
            sim_step_us: DEFAULT.step_us,
            sim_prefill_us: DEFAULT.prefill_us_per_token,
            sim_decode_us: DEFAULT.decode_us_per_seq,
            sim_attn_ns: DEFAULT.attn_ns_per_token,
            sim_speedup: 1.0,
        }
    }
}

impl SimArgs {
    pub fn params(&self) -> Params {
        Params {
            max_num_seqs: self.sim_max_seqs,
            max_batched_tokens: self.sim_batched_tokens,
            block_size: self.sim_block_size,
            num_blocks: self.sim_kv_blocks,
            prefix_caching: !self.sim_no_prefix_caching,
            max_model_len: self.sim_max_model_len,
            step_us: self.sim_step_us,
            prefill_us_per_token: self.sim_prefill_us,
            decode_us_per_seq: self.sim_decode_us,
            attn_ns_per_token: self.sim_attn_ns,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.sim_speedup > 0.0 && self.sim_speedup.is_finite()) {
            return Err("sim_speedup must be a finite number > 0".into());
        }
        self.params().validate()
    }
}

/// Why the engine did not answer.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("the engine simulator stopped")]
    Stopped,
}

enum Cmd {
    Add { id: ReqId, prompt: Vec<u32>, max_output: u32, reply: oneshot::Sender<Result<Done, Refused>> },
    Abort(ReqId),
}

/// A running engine simulator: its thread stops when this is dropped.
pub struct Sim {
    tx: mpsc::UnboundedSender<Cmd>,
    published: Arc<Mutex<Snapshot>>,
    next_id: AtomicU64,
    params: Params,
    speedup: f64,
}

/// Aborts its request in the engine unless it was answered (the HTTP client went away).
struct Pending<'a> {
    sim: &'a Sim,
    id: ReqId,
    answered: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.sim.tx.send(Cmd::Abort(self.id));
        }
    }
}

impl Sim {
    /// Starts the engine's task (on the current tokio runtime); it ends when this is dropped.
    pub fn start(args: &SimArgs) -> Sim {
        let (tx, rx) = mpsc::unbounded_channel();
        let published = Arc::new(Mutex::new(Snapshot::default()));
        let (params, speedup, out) = (args.params(), args.sim_speedup, published.clone());
        tokio::spawn(drive(Engine::new(params), speedup, rx, out));
        Sim { tx, published, next_id: AtomicU64::new(0), params, speedup }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn speedup(&self) -> f64 {
        self.speedup
    }

    /// Runs one request to its end: `prompt` tokens, then `max_output` generated.
    pub async fn run(&self, prompt: Vec<u32>, max_output: u32) -> Result<Done, SimError> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let (reply, answer) = oneshot::channel();
        self.tx.send(Cmd::Add { id, prompt, max_output, reply }).map_err(|_| SimError::Stopped)?;
        let mut pending = Pending { sim: self, id, answered: false };
        let done = answer.await.map_err(|_| SimError::Stopped)?;
        pending.answered = true;
        Ok(done?)
    }

    /// The engine's state after its last step.
    pub fn snapshot(&self) -> Snapshot {
        *self.published.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The simulated clock: simulated time since `origin`, run `speedup` times faster.
struct Clock {
    origin: Instant,
    simulated: Duration,
    speedup: f64,
}

/// How far the wall clock may run ahead of the simulated one before the simulation gives up
/// catching up (a stalled machine is a stalled GPU, not a burst of instant steps after it).
const MAX_LAG: Duration = Duration::from_millis(100);

impl Clock {
    fn restart(&mut self) {
        (self.origin, self.simulated) = (Instant::now(), Duration::ZERO);
    }

    /// Adds one step and sleeps until the wall clock reaches it.
    async fn advance(&mut self, step: Duration) {
        self.simulated += step;
        let due = self.origin + self.simulated.div_f64(self.speedup);
        let now = Instant::now();
        match due.checked_duration_since(now) {
            Some(_) => tokio::time::sleep_until(due).await,
            None if now - due > MAX_LAG => self.origin += now - due - MAX_LAG,
            None => {}
        }
    }
}

/// The engine's task: takes requests, steps, answers; returns when the `Sim` is gone.
async fn drive(mut engine: Engine, speedup: f64, mut rx: mpsc::UnboundedReceiver<Cmd>, out: Arc<Mutex<Snapshot>>) {
    let mut replies: HashMap<ReqId, oneshot::Sender<Result<Done, Refused>>> = HashMap::new();
    let mut clock = Clock { origin: Instant::now(), simulated: Duration::ZERO, speedup };
    loop {
        if engine.is_idle() {
            let Some(cmd) = rx.recv().await else { return };
            clock.restart();
            take(&mut engine, &mut replies, cmd);
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => take(&mut engine, &mut replies, cmd),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
        *out.lock().unwrap_or_else(|e| e.into_inner()) = engine.snapshot();
        let Some(step) = engine.step() else { continue };
        clock.advance(step.duration).await;
        *out.lock().unwrap_or_else(|e| e.into_inner()) = engine.snapshot();
        for done in step.finished {
            if let Some(reply) = replies.remove(&done.id) {
                let _ = reply.send(Ok(done));
            }
        }
    }
}

fn take(engine: &mut Engine, replies: &mut HashMap<ReqId, oneshot::Sender<Result<Done, Refused>>>, cmd: Cmd) {
    match cmd {
        Cmd::Add { id, prompt, max_output, reply } => match engine.add(id, prompt, max_output) {
            Ok(()) => drop(replies.insert(id, reply)),
            Err(refused) => drop(reply.send(Err(refused))),
        },
        Cmd::Abort(id) => {
            engine.abort(id);
            replies.remove(&id);
        }
    }
}

/// The simulator's state in Prometheus text, under vLLM's names (V1 engine), with
/// `extra_waiting` added to the queue as the plain mock does.
pub fn metrics_text(sim: &Sim, extra_waiting: f64) -> String {
    let s = sim.snapshot();
    let c = s.counters;
    let p = sim.params();
    let labels = "model_name=\"mock-model\",engine=\"0\"";
    let mut t = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, String)]| {
        let _ = writeln!(t, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (suffix_labels, v) in samples {
            let sample = if kind == "counter" { format!("{name}_total") } else { name.to_string() };
            let _ = writeln!(t, "{sample}{{{labels}{suffix_labels}}} {v}");
        }
    };
    family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", &[("", s.running.to_string())]);
    family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", &[("", (f64::from(s.waiting) + extra_waiting).to_string())]);
    family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", &[("", s.kv_usage.to_string())]);
    family("vllm:num_preemptions", "counter", "Cumulative number of preemption from the engine.", &[("", c.preemptions.to_string())]);
    family("vllm:prefix_cache_queries", "counter", "Prefix cache queries, in terms of number of queried tokens.", &[("", c.prefix_queries.to_string())]);
    family("vllm:prefix_cache_hits", "counter", "Prefix cache hits, in terms of number of cached tokens.", &[("", c.prefix_hits.to_string())]);
    family("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.", &[("", c.prompt_tokens.to_string())]);
    family("vllm:generation_tokens", "counter", "Number of generation tokens processed.", &[("", c.generation_tokens.to_string())]);
    family("vllm:request_success", "counter", "Count of successfully processed requests.", &[(",finished_reason=\"length\"", c.finished.to_string())]);
    let config = format!(
        ",block_size=\"{}\",num_gpu_blocks=\"{}\",enable_prefix_caching=\"{}\",max_num_seqs=\"{}\",max_num_batched_tokens=\"{}\"",
        p.block_size,
        p.num_blocks,
        if p.prefix_caching { "True" } else { "False" },
        p.max_num_seqs,
        p.max_batched_tokens
    );
    family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig", &[(config.as_str(), "1.0".into())]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_flags_are_the_default_params() {
        assert_eq!(SimArgs::default().params(), DEFAULT);
        assert_eq!(Params::default(), DEFAULT);
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            sim: SimArgs,
        }
        assert_eq!(Cli::parse_from(["x"]).sim, SimArgs::default());
        let odd = SimArgs { sim_speedup: 0.0, ..SimArgs::default() };
        assert!(odd.validate().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_are_answered_in_scaled_real_time_and_aborted_when_dropped() {
        // A step of 10 ms simulated, 20× faster: 0.5 ms of wall clock per step.
        let args = SimArgs { sim_step_us: 10_000.0, sim_prefill_us: 0.0, sim_decode_us: 0.0, sim_attn_ns: 0.0, sim_speedup: 20.0, ..SimArgs::default() };
        let sim = Sim::start(&args);
        let t = Instant::now();
        let done = sim.run(vec![1; 100], 200).await.unwrap();
        let took = t.elapsed();
        assert_eq!((done.prompt_tokens, done.output_tokens), (100, 200));
        // 200 steps × 10 ms / 20 = 100 ms; the wall clock may only be later, by scheduling.
        assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(5), "{took:?}");
        assert_eq!(sim.snapshot().counters.finished, 1);

        let slow = sim.run(vec![2; 10], 30_000);
        assert!(tokio::time::timeout(Duration::from_millis(50), slow).await.is_err(), "the client gave up");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = sim.snapshot();
        assert_eq!((s.running, s.waiting), (0, 0), "the abandoned request was aborted: {s:?}");
        let err = sim.run(vec![3; 40_000], 1).await.unwrap_err();
        assert!(matches!(err, SimError::Refused(Refused::TooLong { .. })), "{err}");
    }

    #[tokio::test]
    async fn metrics_use_vllm_names_and_prometheus_counter_suffixes() {
        let sim = Sim::start(&SimArgs::default());
        let text = metrics_text(&sim, 2.0);
        for line in [
            "vllm:num_requests_waiting{model_name=\"mock-model\",engine=\"0\"} 2",
            "vllm:kv_cache_usage_perc{model_name=\"mock-model\",engine=\"0\"} 0",
            "# TYPE vllm:num_preemptions counter",
            "vllm:num_preemptions_total{model_name=\"mock-model\",engine=\"0\"} 0",
            "vllm:prefix_cache_hits_total{",
            "num_gpu_blocks=\"26000\"",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
