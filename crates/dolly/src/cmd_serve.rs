//! `dolly serve MODEL`: the OpenAI-compatible HTTP server of the `infer` crate (completions, chat, SSE, models,
//! health) on `--host`/`--port`, stopping gracefully on SIGTERM or Ctrl-C (in-flight requests finish).
//! Front-end only: checks the flags (ranges, the open-file limit, then the model's context window and the KV
//! cache's memory, before the weights are loaded), loads the model and tokenizer, runs the server.

use crate::flags::{parse_bool, parse_quant};
use anyhow::{bail, Context};
use clap::Args;
use data::DollyTokenizer;
use infer::server::{fd_capacity, fds_needed, serve, CompletionsTemplate, LogOptions, ServerOptions};
use neox::NeoxConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const DEFAULT_MAX_CONNECTIONS: usize = 256;
const DEFAULT_MAX_TOKENS: usize = 256;

#[derive(Args)]
pub struct ServeArgs {
    /// Model directory (config.json + safetensors; tokenizer.json unless --tokenizer), or a hub model id like
    /// EleutherAI/pythia-70m (downloaded into the Hugging Face cache; HF_HUB_OFFLINE=1 uses only the cache), or a
    /// LoRA adapter directory (adapter_config.json, as `dolly train --lora-r` writes): then its base is loaded
    /// from base_model_name_or_path and the adapter attached, as PEFT's AutoPeftModelForCausalLM does.
    pub model: String,
    /// PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to apply to MODEL without
    /// merging: the base is resized to the tokenizer's vocabulary as dolly train does, and each targeted product
    /// adds the adapter's branch in f32 (with --bf16 the base weights are read as bf16). The tokenizer is the
    /// adapter directory's tokenizer.json when it has one.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Decode with bfloat16 copies of the weights (f32 activations): about 2x the tokens/s of float32 on a
    /// memory-bound CPU, at bf16 weight precision (the dtype Dolly itself generates in). `--bf16` = true.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_bool)]
    pub bf16: bool,
    /// Quantize the weight matrices while loading: q8_0 (ggml's 8-bit blocks, 1.06 bytes per weight against 2
    /// for bf16) or q4_k (ggml's 4-bit k-quant, 0.58 bytes, embedding and head kept in q8_0): the fastest
    /// decoding on a memory-bound CPU and the least memory, at 8- or 4-bit weight precision. The model is never
    /// held whole in f32; the KV cache is bf16. With an adapter, the base is resized and quantized in memory,
    /// then the adapter's branches run in f32.
    #[arg(long, value_name = "TYPE", value_parser = parse_quant)]
    pub quantize: Option<neox::QuantType>,
    /// Address to listen on (0.0.0.0 for every interface; an address other than loopback needs --api-key or
    /// --insecure).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health (1-256 printable ASCII bytes; default:
    /// the DOLLY_API_KEY environment variable, if set). Prefer the variable: a flag shows in the process list.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// How /v1/completions reads its prompt: `raw` (the text as given, as vLLM, llama-server and evaluation
    /// harnesses expect) or `dolly` (wrapped in Dolly's instruction template and the answer extracted, the
    /// behaviour before 2026-12; a request's `raw_prompt` overrides it). /v1/chat/completions always applies
    /// Dolly's template.
    #[arg(long, value_name = "raw|dolly", default_value = "raw", value_parser = parse_template)]
    pub completions_template: CompletionsTemplate,
    /// Allow cross-origin requests from this browser origin (scheme://host[:port]; `*` for any), for web pages
    /// served elsewhere that call this API. Repeat for several. Default: none (browsers block other origins).
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Write one line per request to stderr (time, method, path, status, tokens, latency). `--log-requests false`
    /// silences it.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_value = "true", default_missing_value = "true",
          value_parser = parse_bool)]
    pub log_requests: bool,
    /// Add each generation request's prompt text to its log line (off by default: prompts may be private).
    #[arg(long)]
    pub log_prompts: bool,
    /// Allow listening on a non-loopback address without an API key (anyone who can reach the port may use it).
    #[arg(long)]
    pub insecure: bool,
    /// TCP port to listen on (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// tokenizer.json to use instead of the model directory's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Model id clients must send (default: the adapter directory's name with an adapter, else the hub id or
    /// the model directory's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Most requests decoded together in one batch (1..=1024; its KV cache must fit in memory).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Most requests waiting for a batch row; more get 429 (1..=1048576).
    #[arg(long, default_value_t = 64)]
    pub queue_size: usize,
    /// KV cache slots per row, i.e. the longest prompt + answer (2..=the context window; default: the model's
    /// context window).
    #[arg(long)]
    pub kv_slots: Option<usize>,
    /// Largest request body in bytes (1024..=1073741824); a larger Content-Length gets 413 before the body is read.
    #[arg(long, default_value_t = 1 << 20)]
    pub body_limit: usize,
    /// max_tokens when a request sets none (1..KV slots) [default: 256, or the KV slots - 1 when fewer].
    #[arg(long)]
    pub default_max_tokens: Option<usize>,
    /// Milliseconds to wait for concurrent requests before starting a batch (0..=1000).
    #[arg(long, default_value_t = 2)]
    pub batch_window_ms: u64,
    /// Open connections at most (1..=65536); one more is answered 503 and closed. Must fit in the open-file
    /// limit (ulimit -n) [default: 256, lowered to what that limit allows].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds a connection may take to send its request header (1..=3600); slower ones are closed.
    #[arg(long, default_value_t = 10)]
    pub header_timeout_s: u64,
    /// Seconds a kept-alive connection may stay idle between requests (1..=3600).
    #[arg(long, default_value_t = 30)]
    pub idle_timeout_s: u64,
}

/// `--max-connections` within the open-file limit: an explicit value that does not fit is refused, the default
/// is lowered with a note.
fn max_connections(given: Option<usize>) -> anyhow::Result<usize> {
    let want = given.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if !(1..=infer::server::MAX_CONNECTIONS.1).contains(&want) {
        bail!("--max-connections must be between 1 and {}, got {want}", infer::server::MAX_CONNECTIONS.1);
    }
    let Some((cap, limit)) = fd_capacity(want) else { return Ok(want) };
    if cap >= want {
        return Ok(want);
    }
    if cap == 0 {
        bail!("the open-file limit (ulimit -n {limit}) is too low to serve connections: raise it");
    }
    match given {
        Some(n) => bail!(
            "--max-connections {n} needs ~{} open files, but this process may open only {limit} (ulimit -n): use \
             --max-connections {cap} or less, or raise the limit",
            fds_needed(n)
        ),
        None => {
            eprintln!(
                "dolly serve: the open-file limit (ulimit -n {limit}) allows {cap} connections: --max-connections \
                 lowered from {want} to {cap}"
            );
            Ok(cap)
        }
    }
}

/// Whether `host` is a loopback address (127.0.0.0/8, ::1, localhost).
fn loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// What MODEL names: a GGUF file (loaded with its tokenizer, its config being in its header) or a model directory
/// (resolved; its weights load after the port is bound).
enum Loaded {
    Gguf(Box<(neox::Model, DollyTokenizer)>),
    Dir(crate::adapter_arg::Source),
}

fn parse_template(s: &str) -> Result<CompletionsTemplate, String> {
    CompletionsTemplate::parse(s).ok_or_else(|| format!("expected `raw` or `dolly`, got `{s}`"))
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let mut opts = ServerOptions {
        model_id: String::new(),
        max_batch: a.max_batch,
        queue_size: a.queue_size,
        kv_slots: a.kv_slots,
        body_limit: a.body_limit,
        default_max_tokens: a.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        batch_window: Duration::from_millis(a.batch_window_ms),
        max_connections: max_connections(a.max_connections)?,
        header_timeout: Duration::from_secs(a.header_timeout_s),
        idle_timeout: Duration::from_secs(a.idle_timeout_s),
        api_key: a.api_key.clone().or_else(|| std::env::var("DOLLY_API_KEY").ok().filter(|k| !k.is_empty())),
        completions_template: a.completions_template,
        cors_origins: a.cors_origins.clone(),
        log: LogOptions { requests: a.log_requests, prompts: a.log_prompts },
    };
    opts.validate_flags().map_err(anyhow::Error::msg)?;
    if opts.api_key.is_none() && !a.insecure && !loopback(&a.host) {
        bail!(
            "--host {} is reachable from other machines: give --api-key KEY (or set DOLLY_API_KEY), or pass              --insecure to serve without authentication",
            a.host
        );
    }
    // a GGUF file is read whole first (its config is in its header); a directory's config.json is checked before
    // the port and the weights
    let source = if crate::model_arg::is_gguf(&a.model) {
        if a.adapter.is_some() {
            bail!("--adapter with a GGUF model: merge the adapter first (dolly merge), then export");
        }
        Loaded::Gguf(Box::new(crate::model_arg::load_gguf(&a.model, a.tokenizer.as_deref(), a.quantize)?))
    } else {
        Loaded::Dir(crate::adapter_arg::resolve(&a.model, a.adapter.as_deref())?)
    };
    let cfg = match &source {
        Loaded::Gguf(g) => g.0.config.clone(),
        Loaded::Dir(src) => NeoxConfig::from_file(&src.base.join("config.json"))?,
    };
    if a.default_max_tokens.is_none() {
        opts.default_max_tokens = DEFAULT_MAX_TOKENS.min(opts.kv_slots_for(&cfg).saturating_sub(1)).max(1);
    }
    let quantized = a.quantize.is_some() || matches!(&source, Loaded::Gguf(g) if g.0.quantized().is_some());
    opts.validate_for_model(&cfg, if a.bf16 || quantized { 2 } else { 4 }).map_err(anyhow::Error::msg)?;
    opts.model_id = a.model_name.clone().unwrap_or_else(|| match &source {
        Loaded::Dir(crate::adapter_arg::Source { adapter: Some(ad), .. }) => crate::adapter_arg::name_of(ad),
        Loaded::Dir(src) => default_name(&a.model, &src.base),
        Loaded::Gguf(_) => Path::new(&a.model).file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned()),
    });
    // a busy port is reported before the weights load
    // an IPv6 host goes in brackets
    let addr = match a.host.contains(':') && !a.host.starts_with('[') {
        true => format!("[{}]:{}", a.host, a.port),
        false => format!("{}:{}", a.host, a.port),
    };
    let std_listener = std::net::TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let (mut model, tok) = match source {
        Loaded::Gguf(g) => *g,
        Loaded::Dir(src) => {
            let tok = DollyTokenizer::resolve(Some(src.tokenizer_dir()), a.tokenizer.as_deref())?;
            crate::adapter_arg::check(&src, &crate::adapter_arg::config_for(&src, tok.vocab_size())?)?;
            (crate::adapter_arg::load(&src, tok.vocab_size(), a.quantize)?, tok)
        }
    };
    model.set_decode_bf16(a.bf16);
    let name = opts.model_id.clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).context("listening")?;
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

/// The hub id when the model came from the hub (its directory is a commit hash), else the directory's name.
fn default_name(spec: &str, dir: &Path) -> String {
    if !Path::new(spec).is_dir() {
        return spec.to_string();
    }
    let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    canon.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "dolly".into())
}
