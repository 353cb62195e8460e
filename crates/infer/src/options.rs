//! Server settings (the `dolly serve` flags) and their validation: each out-of-range value is refused with a
//! message naming the flag and its allowed range, before the model is loaded where the check needs no model
//! (`validate_flags`), else from the model's config (`validate_for_model`: KV slots and max tokens against the
//! context window, the KV cache against this machine's memory).

pub use crate::observe::LogOptions;
use neox::NeoxConfig;
use std::time::Duration;

/// How `/v1/completions` treats its prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CompletionsTemplate {
    /// Raw text, as vLLM, llama-server and evaluation harnesses expect (the default).
    #[default]
    Raw,
    /// Wrapped in Dolly's instruction template, the answer extracted (the behaviour before raw became default).
    Dolly,
}

impl CompletionsTemplate {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "raw" => Some(Self::Raw),
            "dolly" => Some(Self::Dolly),
            _ => None,
        }
    }
}

/// Server settings (the `dolly serve` flags).
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The id clients must use as `model` (also listed by `/v1/models`).
    pub model_id: String,
    pub max_batch: usize,
    pub queue_size: usize,
    /// KV cache slots per row (longest prompt + answer); None = the model's context window.
    pub kv_slots: Option<usize>,
    /// Largest accepted request body in bytes.
    pub body_limit: usize,
    /// `max_tokens` when a request gives none (Dolly: 256); below the KV slots per row.
    pub default_max_tokens: usize,
    pub batch_window: Duration,
    /// Open connections at most; one more is answered 503 and closed.
    pub max_connections: usize,
    /// A connection must send its request header within this (from connecting, or from the first byte of a
    /// later request on a kept-alive connection).
    pub header_timeout: Duration,
    /// A kept-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// `Some(key)`: every endpoint but `/health` needs `Authorization: Bearer key` (`auth`).
    pub api_key: Option<String>,
    pub completions_template: CompletionsTemplate,
    /// Origins allowed by CORS (`*`: any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// The request log (stderr).
    pub log: LogOptions,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_id: "dolly".into(),
            max_batch: 8,
            queue_size: 64,
            kv_slots: None,
            body_limit: 1 << 20,
            default_max_tokens: 256,
            batch_window: Duration::from_millis(2),
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            api_key: None,
            completions_template: CompletionsTemplate::Raw,
            cors_origins: Vec::new(),
            log: LogOptions::default(),
        }
    }
}

/// Allowed ranges (inclusive).
pub const MAX_BATCH: (usize, usize) = (1, 1024);
pub const QUEUE_SIZE: (usize, usize) = (1, 1 << 20);
pub const BATCH_WINDOW_MS: u64 = 1000;
pub const BODY_LIMIT: (usize, usize) = (1024, 1 << 30);
pub const MAX_CONNECTIONS: (usize, usize) = (1, 65536);
pub const TIMEOUT_S: (u64, u64) = (1, 3600);

fn in_range<T: PartialOrd + std::fmt::Display>(flag: &str, v: T, lo: T, hi: T) -> Result<(), String> {
    if v < lo || v > hi {
        return Err(format!("{flag} must be between {lo} and {hi}, got {v}"));
    }
    Ok(())
}

impl ServerOptions {
    /// Checks that need no model.
    pub fn validate_flags(&self) -> Result<(), String> {
        in_range("--max-batch", self.max_batch, MAX_BATCH.0, MAX_BATCH.1)?;
        in_range("--queue-size", self.queue_size, QUEUE_SIZE.0, QUEUE_SIZE.1)?;
        let ms = self.batch_window.as_millis();
        if ms > BATCH_WINDOW_MS as u128 {
            return Err(format!("--batch-window-ms must be between 0 and {BATCH_WINDOW_MS}, got {ms}"));
        }
        in_range("--body-limit", self.body_limit, BODY_LIMIT.0, BODY_LIMIT.1)?;
        in_range("--max-connections", self.max_connections, MAX_CONNECTIONS.0, MAX_CONNECTIONS.1)?;
        // Durations below a second are for tests; the flags take whole seconds
        for (flag, d) in [("--header-timeout-s", self.header_timeout), ("--idle-timeout-s", self.idle_timeout)] {
            if d.is_zero() || d > Duration::from_secs(TIMEOUT_S.1) {
                return Err(format!("{flag} must be between {} and {} seconds, got {d:?}", TIMEOUT_S.0, TIMEOUT_S.1));
            }
        }
        if let Some(s) = self.kv_slots {
            if s < 2 {
                return Err(format!("--kv-slots must be at least 2 (a prompt token and an answer token), got {s}"));
            }
        }
        if self.default_max_tokens == 0 {
            return Err("--default-max-tokens must be at least 1, got 0".into());
        }
        if let Some(k) = &self.api_key {
            crate::auth::check_key(k)?;
        }
        for o in &self.cors_origins {
            crate::cors::check_origin(o)?;
        }
        Ok(())
    }

    /// KV slots per row for a model with this context window.
    pub fn kv_slots_for(&self, cfg: &NeoxConfig) -> usize {
        self.kv_slots.unwrap_or(cfg.max_position_embeddings)
    }

    /// Checks against the model's config; `kv_dtype_bytes` is 4 (float32 decode) or 2 (bf16 decode).
    pub fn validate_for_model(&self, cfg: &NeoxConfig, kv_dtype_bytes: usize) -> Result<(), String> {
        self.validate_flags()?;
        let ctx = cfg.max_position_embeddings;
        let slots = self.kv_slots_for(cfg);
        if slots > ctx {
            return Err(format!("--kv-slots must be between 2 and {ctx} (the model's context window), got {slots}"));
        }
        if self.default_max_tokens >= slots {
            return Err(format!(
                "--default-max-tokens must be between 1 and {} (the context window of {slots} tokens less one \
                 prompt token), got {}",
                slots - 1,
                self.default_max_tokens
            ));
        }
        let bytes = kv_cache_bytes(cfg, self.max_batch, slots, kv_dtype_bytes);
        common::check_fits(&format!("the KV cache for --max-batch {} x --kv-slots {slots}", self.max_batch), bytes)
    }
}

/// Keys and values of every layer for `rows` rows of `slots` tokens.
pub fn kv_cache_bytes(cfg: &NeoxConfig, rows: usize, slots: usize, dtype_bytes: usize) -> u64 {
    [2, cfg.num_hidden_layers, rows, slots, cfg.hidden_size, dtype_bytes]
        .iter()
        .fold(1u64, |acc, &x| acc.saturating_mul(x as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NeoxConfig {
        let mut c = NeoxConfig::preset("pythia-14m").unwrap();
        c.max_position_embeddings = 2048;
        c
    }

    #[test]
    fn each_bad_flag_is_named_with_its_range() {
        let bad: Vec<(ServerOptions, &str)> = vec![
            (ServerOptions { kv_slots: Some(0), ..Default::default() }, "--kv-slots"),
            (ServerOptions { kv_slots: Some(1), ..Default::default() }, "--kv-slots"),
            (ServerOptions { kv_slots: Some(4096), ..Default::default() }, "--kv-slots must be between 2 and 2048"),
            (ServerOptions { default_max_tokens: 2048, ..Default::default() }, "--default-max-tokens"),
            (ServerOptions { kv_slots: Some(100), ..Default::default() }, "between 1 and 99"),
            (ServerOptions { batch_window: Duration::from_secs(3600), ..Default::default() }, "--batch-window-ms"),
            (ServerOptions { max_batch: 0, ..Default::default() }, "--max-batch must be between 1 and 1024"),
            (ServerOptions { max_batch: 100_000, ..Default::default() }, "--max-batch"),
            (ServerOptions { queue_size: 0, ..Default::default() }, "--queue-size"),
            (ServerOptions { body_limit: 0, ..Default::default() }, "--body-limit must be between 1024"),
            (ServerOptions { max_connections: 0, ..Default::default() }, "--max-connections"),
            (ServerOptions { header_timeout: Duration::ZERO, ..Default::default() }, "--header-timeout-s"),
            (ServerOptions { idle_timeout: Duration::from_secs(1 << 20), ..Default::default() }, "--idle-timeout-s"),
        ];
        for (o, want) in bad {
            let e = o.validate_for_model(&cfg(), 4).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        assert!(ServerOptions::default().validate_for_model(&cfg(), 4).is_ok());
    }

    #[test]
    fn a_kv_cache_larger_than_memory_is_refused() {
        let mut c = cfg();
        c.max_position_embeddings = 1 << 20;
        let o = ServerOptions { max_batch: 1024, kv_slots: Some(1 << 20), ..Default::default() };
        // 2 * 6 layers * 1024 rows * 2^20 slots * 128 hidden * 4 bytes = 6 TiB
        assert_eq!(kv_cache_bytes(&c, 1024, 1 << 20, 4), 2 * 6 * 1024 * (1 << 20) * 128 * 4);
        if common::sysmem::total_bytes().is_some() {
            let e = o.validate_for_model(&c, 4).unwrap_err();
            assert!(e.contains("the KV cache for --max-batch 1024 x --kv-slots 1048576 needs ~"), "{e}");
        }
    }
}
