//! `dolly serve MODEL_DIR`: the OpenAI-compatible HTTP server of the `infer` crate (completions, chat, SSE,
//! models, health) on `--host`/`--port`, stopping gracefully on SIGTERM or Ctrl-C (in-flight requests finish).
//! Front-end only: parses flags, loads the model and tokenizer, runs the server.

use anyhow::{bail, Context};
use clap::Args;
use data::DollyTokenizer;
use infer::server::{serve, ServerOptions};
use neox::Model;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// Model directory (config.json + safetensors; tokenizer.json unless --tokenizer).
    pub model_dir: PathBuf,
    /// Decode with bfloat16 copies of the weights (f32 activations): about 2x the tokens/s of float32 on a
    /// memory-bound CPU, at bf16 weight precision (the dtype Dolly itself generates in).
    #[arg(long)]
    pub bf16: bool,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// tokenizer.json to use instead of MODEL_DIR/tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Model id clients must send (default: the model directory's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Most requests decoded together in one batch.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Most requests waiting for a batch row; more get 429.
    #[arg(long, default_value_t = 64)]
    pub queue_size: usize,
    /// KV cache slots per row, i.e. the longest prompt + answer (default: the model's context window).
    #[arg(long)]
    pub kv_slots: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub body_limit: usize,
    /// max_tokens when a request sets none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Milliseconds to wait for concurrent requests before starting a batch.
    #[arg(long, default_value_t = 2)]
    pub batch_window_ms: u64,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let tok = DollyTokenizer::resolve(Some(&a.model_dir), a.tokenizer.as_deref())?;
    let mut model = Model::load(&a.model_dir).with_context(|| format!("loading model {}", a.model_dir.display()))?;
    model.set_decode_bf16(a.bf16);
    let name = a.model_name.clone().unwrap_or_else(|| {
        let canon = a.model_dir.canonicalize().unwrap_or_else(|_| a.model_dir.clone());
        canon.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "dolly".into())
    });
    if a.max_batch == 0 || a.queue_size == 0 {
        bail!("--max-batch and --queue-size must be at least 1");
    }
    let opts = ServerOptions {
        model_id: name.clone(),
        max_batch: a.max_batch,
        queue_size: a.queue_size,
        kv_slots: a.kv_slots,
        body_limit: a.body_limit,
        default_max_tokens: a.default_max_tokens,
        batch_window: Duration::from_millis(a.batch_window_ms),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener =
            tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        // the line tests and scripts wait for
        eprintln!("dolly serve: model `{name}` listening on http://{local}");
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            eprintln!("dolly serve: shutting down (finishing in-flight requests)");
        };
        serve(listener, Arc::new(model), tok, opts, shutdown).await?;
        eprintln!("dolly serve: stopped");
        anyhow::Ok(())
    })
}
