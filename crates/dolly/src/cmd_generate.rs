//! `dolly generate MODEL [INSTRUCTION]`: Dolly's instruction pipeline from the command line — one instruction
//! (streamed token by token), an interactive prompt loop (no instruction, stdin a terminal), or batch mode
//! (`--input FILE.jsonl` -> JSONL). MODEL is a directory or a hub id. Flags, the model, `--input` and `--output`
//! are checked before the weights are loaded. Front-end only: sampling, batching and extraction live in the
//! `infer` crate.

use crate::flags::{parse_bool, parse_quant};
use anyhow::{bail, ensure, Context};
use clap::Args;
use common::Rng;
use data::{generation_prompt, DollyTokenizer};
use infer::{extract_response, GenOutput, SamplingParams, SeqParams, TextStream};
use neox::{Model, NeoxConfig};
use serde_json::{json, Value};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct GenerateArgs {
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
    /// The instruction. Without it: an interactive loop when stdin is a terminal, else the instruction is read
    /// from stdin.
    pub instruction: Option<String>,
    /// Context (input) for the instruction, folded in as Dolly's examples do.
    #[arg(long)]
    pub context: Option<String>,
    /// tokenizer.json to use instead of the model directory's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Tokens to generate at most (Dolly: 256).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Softmax temperature (Dolly: 1.0; 0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Nucleus sampling mass (Dolly: 0.92; 1 = off).
    #[arg(long, default_value_t = 0.92)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (Dolly: 0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Greedy decoding (do_sample = false) instead of sampling. `--greedy` = true.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_bool)]
    pub greedy: bool,
    /// Seed of the sampling RNG (each sequence draws from its own stream derived from it).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Sequences per instruction.
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,
    /// Batch mode: JSONL with `instruction` and optional `context` per line.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Batch mode: write the JSONL here (atomically) instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Batch mode: instructions decoded together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print the answer at the end instead of streaming it. `--no-stream` = true.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = parse_bool)]
    pub no_stream: bool,
}

struct Pipeline {
    model: Model,
    tok: DollyTokenizer,
    sampling: SamplingParams,
    max_new: usize,
    seed: u64,
    n: usize,
}

impl Pipeline {
    fn prompt_ids(&self, instruction: &str, context: Option<&str>) -> anyhow::Result<Vec<u32>> {
        let ids = self.tok.encode(&generation_prompt(instruction, context))?;
        let max_pos = self.model.config.max_position_embeddings;
        ensure!(
            ids.len() + self.max_new <= max_pos,
            "prompt of {} tokens + --max-new-tokens {} exceeds the model's context window of {max_pos} tokens",
            ids.len(),
            self.max_new
        );
        Ok(ids)
    }

    fn params(&self, stream: u64) -> SeqParams {
        SeqParams::new(self.sampling, self.max_new, Rng::derive(self.seed, stream))
    }

    fn generate(
        &self,
        seqs: Vec<(Vec<u32>, SeqParams)>,
        on_token: impl FnMut(usize, &infer::TokenEvent),
    ) -> anyhow::Result<Vec<GenOutput>> {
        let limit = self.tok.vocab_size();
        Ok(infer::generate(&self.model, seqs, limit, Some(self.tok.special().end), on_token)?)
    }

    fn response(&self, prompt: &[u32], out: &GenOutput) -> anyhow::Result<String> {
        let mut seq = prompt.to_vec();
        seq.extend_from_slice(&out.tokens);
        Ok(extract_response(&seq, &self.tok.special(), |ids| self.tok.decode(ids))?)
    }
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    ensure!(a.max_new_tokens >= 1, "--max-new-tokens must be at least 1");
    ensure!(a.num_return_sequences >= 1, "--num-return-sequences must be at least 1");
    ensure!(a.batch_size >= 1, "--batch-size must be at least 1");
    let sampling = SamplingParams { do_sample: !a.greedy, temperature: a.temperature, top_p: a.top_p, top_k: a.top_k };
    sampling.validate().map_err(anyhow::Error::msg)?;
    if a.input.is_some() {
        ensure!(a.instruction.is_none(), "give either an INSTRUCTION or --input, not both");
    } else {
        ensure!(a.output.is_none(), "--output is for batch mode (--input)");
    }
    // the paths and the model before the tokenizer and the weights
    let items = match &a.input {
        Some(input) => {
            let text = std::fs::read_to_string(input).with_context(|| format!("--input {}", input.display()))?;
            Some(read_items(input, &text)?)
        }
        None => None,
    };
    if let Some(out) = &a.output {
        crate::flags::check_output_file("--output", out, a.input.as_deref().map(|i| ("--input", i)))?;
    }
    let (mut model, tok) = if crate::model_arg::is_gguf(&a.model) {
        ensure!(a.adapter.is_none(), "--adapter with a GGUF model: merge the adapter first (dolly merge), then export");
        crate::model_arg::load_gguf(&a.model, a.tokenizer.as_deref(), a.quantize)?
    } else {
        let src = crate::adapter_arg::resolve(&a.model, a.adapter.as_deref())?;
        let ctx = NeoxConfig::from_file(&src.base.join("config.json"))?.max_position_embeddings;
        check_max_new(a.max_new_tokens, ctx)?;
        let tok = DollyTokenizer::resolve(Some(src.tokenizer_dir()), a.tokenizer.as_deref())?;
        crate::adapter_arg::check(&src, &crate::adapter_arg::config_for(&src, tok.vocab_size())?)?;
        (crate::adapter_arg::load(&src, tok.vocab_size(), a.quantize)?, tok)
    };
    check_max_new(a.max_new_tokens, model.config.max_position_embeddings)?;
    model.set_decode_bf16(a.bf16);
    if tok.vocab_size() > model.config.vocab_size {
        bail!(
            "tokenizer {} has {} ids but the model has {} embedding rows: they do not belong together",
            tok.source().display(),
            tok.vocab_size(),
            model.config.vocab_size
        );
    }
    let p = Pipeline { model, tok, sampling, max_new: a.max_new_tokens, seed: a.seed, n: a.num_return_sequences };
    if let (Some(input), Some(items)) = (&a.input, items) {
        return batch(&p, input, items, a.output.as_deref(), a.batch_size);
    }
    let stream = !a.no_stream && p.n == 1;
    match a.instruction {
        Some(i) => single(&p, &i, a.context.as_deref(), stream, 0),
        None if std::io::stdin().is_terminal() => interactive(&p, a.context.as_deref(), stream),
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading the instruction from stdin")?;
            let s = s.trim_end_matches(['\n', '\r']);
            ensure!(!s.is_empty(), "no instruction: pass INSTRUCTION, pipe one on stdin, or use --input FILE.jsonl");
            single(&p, s, a.context.as_deref(), stream, 0)
        }
    }
}

/// --max-new-tokens leaves room for one prompt token in the context window of `ctx` tokens.
fn check_max_new(max_new: usize, ctx: usize) -> anyhow::Result<()> {
    ensure!(
        max_new < ctx,
        "--max-new-tokens must be between 1 and {} (the model's context window of {ctx} tokens less one prompt \
         token), got {max_new}",
        ctx.saturating_sub(1)
    );
    Ok(())
}

/// `--output` must be a file path in an existing directory, and not the input.
/// One instruction: stream the answer (n = 1) or print each sequence.
fn single(p: &Pipeline, instruction: &str, context: Option<&str>, stream: bool, round: u64) -> anyhow::Result<()> {
    let prompt = p.prompt_ids(instruction, context)?;
    let seqs = (0..p.n).map(|j| (prompt.clone(), p.params((round << 20) | j as u64))).collect();
    let mut out = std::io::stdout().lock();
    let mut ts = TextStream::new(true);
    let end = p.tok.special().end;
    let t0 = Instant::now();
    let mut first = None;
    let mut err = None;
    let outs = p.generate(seqs, |_, e| {
        first.get_or_insert_with(|| t0.elapsed());
        if !stream || err.is_some() {
            return;
        }
        let mut d = String::new();
        if e.token != end {
            match ts.push(e.token, |ids| p.tok.decode(ids)) {
                Ok(s) => d = s,
                Err(x) => err = Some(x),
            }
        }
        if e.finish.is_some() {
            match ts.finish(|ids| p.tok.decode(ids)) {
                Ok(s) => d.push_str(&s),
                Err(x) => err = Some(x),
            }
        }
        let _ = out.write_all(d.as_bytes()).and_then(|_| out.flush());
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    let dt = t0.elapsed().as_secs_f64();
    if stream {
        writeln!(out)?;
    } else {
        for (j, o) in outs.iter().enumerate() {
            if p.n > 1 {
                writeln!(out, "--- sequence {} ---", j + 1)?;
            }
            writeln!(out, "{}", p.response(&prompt, o)?)?;
        }
    }
    out.flush()?;
    let toks: usize = outs.iter().map(|o| o.tokens.len()).sum();
    let reasons: Vec<&str> = outs.iter().map(|o| o.finish.as_str()).collect();
    eprintln!(
        "[{toks} tokens in {dt:.2} s, {:.1} tokens/s, first token after {:.3} s, finish: {}]",
        toks as f64 / dt.max(1e-9),
        first.map(|d| d.as_secs_f64()).unwrap_or(0.0),
        reasons.join(",")
    );
    Ok(())
}

fn interactive(p: &Pipeline, context: Option<&str>, stream: bool) -> anyhow::Result<()> {
    eprintln!("Dolly: type an instruction and press Enter; an empty line or Ctrl-D quits.");
    let stdin = std::io::stdin();
    let mut round = 0u64;
    loop {
        eprint!("\n>>> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
            eprintln!();
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            return Ok(());
        }
        if let Err(e) = single(p, line, context, stream, round) {
            eprintln!("error: {e:#}");
        }
        round += 1;
    }
}

/// One parsed input line.
struct Item {
    line: usize,
    instruction: String,
    context: Option<String>,
}

/// Parse a JSONL batch input: each non-blank line an object with a non-empty string `instruction` and an optional
/// string (or null) `context`. Errors name file:line.
pub fn read_items(path: &Path, text: &str) -> anyhow::Result<Vec<(usize, String, Option<String>)>> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{n}: not valid JSON", path.display()))?;
        let Value::Object(m) = v else { bail!("{}:{n}: expected a JSON object", path.display()) };
        let instruction = match m.get("instruction") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) => bail!("{}:{n}: `instruction` is empty", path.display()),
            _ => bail!("{}:{n}: missing string field `instruction`", path.display()),
        };
        let context = match m.get("context") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => bail!("{}:{n}: `context` must be a string", path.display()),
        };
        items.push((n, instruction, context));
    }
    Ok(items)
}

fn batch(
    p: &Pipeline,
    input: &Path,
    items: Vec<(usize, String, Option<String>)>,
    output: Option<&Path>,
    batch_size: usize,
) -> anyhow::Result<()> {
    let items: Vec<Item> =
        items.into_iter().map(|(line, instruction, context)| Item { line, instruction, context }).collect();
    let mut prompts = Vec::with_capacity(items.len());
    for it in &items {
        prompts.push(
            p.prompt_ids(&it.instruction, it.context.as_deref())
                .with_context(|| format!("{}:{}", input.display(), it.line))?,
        );
    }
    let t0 = Instant::now();
    let mut lines: Vec<String> = Vec::with_capacity(items.len());
    let mut stdout = std::io::stdout().lock();
    let mut total = 0usize;
    for (c, chunk) in items.chunks(batch_size).enumerate() {
        let base = c * batch_size;
        let mut seqs = Vec::new();
        for (k, _) in chunk.iter().enumerate() {
            for j in 0..p.n {
                seqs.push((prompts[base + k].clone(), p.params((((base + k) as u64) << 20) | j as u64)));
            }
        }
        let outs = p.generate(seqs, |_, _| {})?;
        for (k, it) in chunk.iter().enumerate() {
            let prompt = &prompts[base + k];
            let mut seqs_json = Vec::with_capacity(p.n);
            for o in &outs[k * p.n..(k + 1) * p.n] {
                total += o.tokens.len();
                seqs_json.push(json!({
                    "response": p.response(prompt, o)?,
                    "generated_token_ids": o.tokens,
                    "finish_reason": o.finish.as_str(),
                }));
            }
            let mut obj = json!({"instruction": it.instruction});
            if let Some(ctx) = &it.context {
                obj["context"] = json!(ctx);
            }
            for key in ["response", "generated_token_ids", "finish_reason"] {
                obj[key] = seqs_json[0][key].clone();
            }
            if p.n > 1 {
                obj["sequences"] = Value::Array(seqs_json);
            }
            let line = obj.to_string();
            if output.is_none() {
                writeln!(stdout, "{line}")?;
            } else {
                lines.push(line);
            }
        }
        stdout.flush()?;
        eprintln!("[{}/{} instructions]", (base + chunk.len()).min(items.len()), items.len());
    }
    if let Some(path) = output {
        common::atomic_write_with(path, |w| {
            for l in &lines {
                w.write_all(l.as_bytes())?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })
        .with_context(|| format!("writing {}", path.display()))?;
    }
    let dt = t0.elapsed().as_secs_f64();
    eprintln!(
        "[{} instructions, {total} tokens in {dt:.2} s, {:.1} tokens/s]",
        items.len(),
        total as f64 / dt.max(1e-9)
    );
    Ok(())
}
