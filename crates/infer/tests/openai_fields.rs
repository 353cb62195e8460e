//! The OpenAI fields beyond the basics, against a real server on 127.0.0.1: `stop` (also split across tokens and
//! streamed), `n` (one prefill, own RNG streams, reproducible with a seed), several prompts and token-id prompts,
//! `logprobs` / `top_logprobs` (completions and chat shapes), `echo` with prompt log-probabilities and
//! `max_tokens: 0` (what lm-eval's loglikelihood requests send), `stream_options.include_usage`, `logit_bias`,
//! `min_tokens`, the penalties, and `--completions-template dolly`. Reference numbers: the engine's training
//! forward (`Model::forward_logits`, the path `dolly train` and `dolly eval` use) with a float64 log-softmax in
//! this file; texts: the server's own greedy answer without the field under test. Model: random pythia-14m shape,
//! 2 layers; the real 20B tokenizer.

use data::DollyTokenizer;
use infer::server::{spawn, CompletionsTemplate, ServerHandle, ServerOptions};
use neox::{Activations, Model, NeoxConfig, OwnedBatch};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use test_support::http::{post, Conn};

fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| {
        let mut cfg = NeoxConfig::preset("pythia-14m").unwrap();
        cfg.num_hidden_layers = 2;
        Arc::new(Model::new_random(cfg, 11))
    })
    .clone()
}

fn tokenizer() -> DollyTokenizer {
    DollyTokenizer::from_file(&test_support::shared_file("20B_tokenizer.json")).expect("shared/data/20B_tokenizer.json")
}

fn start(template: CompletionsTemplate) -> ServerHandle {
    let opts = ServerOptions {
        model_id: "m".into(),
        max_batch: 4,
        batch_window: Duration::from_millis(1),
        completions_template: template,
        ..Default::default()
    };
    spawn("127.0.0.1:0".parse().unwrap(), model(), tokenizer(), opts).unwrap()
}

fn ok(a: SocketAddr, path: &str, body: &Value) -> Value {
    let r = post(a, path, body);
    assert_eq!(r.status, 200, "{body}: {}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// Every `data:` event of a streamed response (the final `[DONE]` checked and dropped).
fn sse(a: SocketAddr, path: &str, body: &Value) -> Vec<Value> {
    let r = Conn::open(a, "POST", path, Some(body.to_string().as_bytes())).body();
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

/// log p(ids[i] | ids[..i]) for i >= 1 from the training forward, float64 log-softmax over every head row.
fn reference_logprobs(ids: &[u32]) -> Vec<f64> {
    let m = model();
    let t = ids.len();
    let batch = OwnedBatch::dense(1, t, ids.to_vec(), vec![neox::IGNORE_INDEX; t]);
    let mut acts = Activations::new(&m.config, 1, t, false);
    let logits = m.forward_logits(&batch.view(), &mut acts).unwrap();
    let v = m.config.vocab_size;
    (1..t)
        .map(|i| {
            let row = &logits[(i - 1) * v..i * v];
            let mx = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
            let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
            row[ids[i] as usize] as f64 - lse
        })
        .collect()
}

fn text(v: &Value, i: usize) -> String {
    v["choices"][i]["text"].as_str().unwrap().to_string()
}

#[test]
fn stop_strings_end_the_text_before_them_streamed_or_not() {
    let srv = start(CompletionsTemplate::Raw);
    let a = srv.addr;
    let base = json!({"prompt": "The weather today is", "max_tokens": 40, "temperature": 0, "logprobs": 0});
    let full = ok(a, "/v1/completions", &base);
    let whole = text(&full, 0);
    let tokens: Vec<String> = full["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().into())
        .collect();
    assert_eq!(tokens.concat(), whole, "raw completions: the tokens spell the text");
    // a stop string across the boundary of tokens 5 and 6 (the end of one and the start of the next)
    let (t5, t6) = (&tokens[5], &tokens[6]);
    let cut = |s: &str, n: usize, tail: bool| -> String {
        let c: Vec<char> = s.chars().collect();
        let n = n.min(c.len());
        if tail {
            c[c.len() - n..].iter().collect()
        } else {
            c[..n].iter().collect()
        }
    };
    let stop = format!("{}{}", cut(t5, 2, true), cut(t6, 2, false));
    let at = whole.find(&stop).unwrap();
    let mut req = base.clone();
    req["stop"] = json!([stop, "never appears \u{1F980}"]);
    let v = ok(a, "/v1/completions", &req);
    assert_eq!(text(&v, 0), whole[..at]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // the row stopped: tokens up to the one completing the stop string
    let used = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(used <= 7, "{used}");
    req["stream"] = json!(true);
    let chunks = sse(a, "/v1/completions", &req);
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, whole[..at]);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    // min_tokens delays stop strings: none is looked for before the 20th token
    let mut late = base.clone();
    late["stop"] = json!(stop);
    late["min_tokens"] = json!(20);
    assert!(text(&ok(a, "/v1/completions", &late), 0).len() > at);
    srv.shutdown().unwrap();
}

#[test]
fn logprobs_and_echo_match_the_training_forward() {
    let srv = start(CompletionsTemplate::Raw);
    let a = srv.addr;
    let tok = tokenizer();
    let prompt = "Instruction: name a primary color.\nAnswer:";
    let req = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 3});
    let v = ok(a, "/v1/completions", &req);
    let lp = &v["choices"][0]["logprobs"];
    let ids: Vec<u32> = tok.encode(&(prompt.to_string() + &text(&v, 0))).unwrap();
    let generated = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(generated.len(), 12);
    let p_len = tok.encode(prompt).unwrap().len();
    let want = reference_logprobs(&ids[..p_len + 12.min(ids.len() - p_len)]);
    for (i, g) in generated.iter().enumerate().take(ids.len() - p_len) {
        let g = g.as_f64().unwrap();
        // greedy: the chosen token is the top alternative, with the same number
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(top.len() <= 3 && !top.is_empty());
        let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(best, g, "token {i}");
        // decode path (KV cache) against the training forward: f32 rounding only
        assert!((g - want[p_len - 1 + i]).abs() < 2e-3, "token {i}: {g} vs {}", want[p_len - 1 + i]);
    }
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));

    // lm-eval's loglikelihood request: echo the prompt with its tokens' logprobs, generate nothing
    let ctx = "The capital of France is";
    let ids = tok.encode(&format!("{ctx} Paris")).unwrap();
    let e = ok(
        a,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0}),
    );
    assert_eq!(text(&e, 0), tok.decode(&ids).unwrap());
    assert_eq!(e["usage"]["completion_tokens"], 0);
    assert_eq!(e["usage"]["prompt_tokens"], ids.len());
    assert_eq!(e["choices"][0]["finish_reason"], "length");
    let lps = e["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), ids.len());
    assert!(lps[0].is_null(), "the first token has no context");
    assert!(e["choices"][0]["logprobs"]["top_logprobs"][0].is_null());
    let want = reference_logprobs(&ids);
    for i in 1..ids.len() {
        assert!((lps[i].as_f64().unwrap() - want[i - 1]).abs() < 2e-3, "prompt token {i}");
    }
    // and their sum is minus the training loss of the same tokens (`Model::forward_loss`, what `dolly eval` and
    // the trainer's eval report)
    let m = model();
    let labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let batch = OwnedBatch::dense(1, ids.len(), ids.clone(), labels);
    let mut acts = Activations::new(&m.config, 1, ids.len(), false);
    let (loss, count) = m.forward_loss(&batch.view(), &mut acts).unwrap();
    assert_eq!(count, ids.len() - 1);
    let echoed: f64 = lps[1..].iter().map(|x| x.as_f64().unwrap()).sum();
    assert!((echoed + loss).abs() < 1e-3 * count as f64, "echo {echoed} vs loss {loss}");
    // echo with generation: the prompt's entries, then the answer's
    let g = ok(
        a,
        "/v1/completions",
        &json!({"prompt": ctx, "max_tokens": 3, "echo": true, "logprobs": 0, "temperature": 0}),
    );
    assert!(text(&g, 0).starts_with(ctx));
    let n = g["choices"][0]["logprobs"]["tokens"].as_array().unwrap().len();
    assert_eq!(n, tok.encode(ctx).unwrap().len() + 3);

    // chat: logprobs true + top_logprobs, with token bytes
    let c = ok(
        a,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0,
            "logprobs": true, "top_logprobs": 2}),
    );
    let content = c["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    for t in content {
        let tops = t["top_logprobs"].as_array().unwrap();
        assert_eq!(tops.len(), 2);
        assert_eq!(tops[0]["logprob"], t["logprob"]);
        assert_eq!(tops[0]["token"], t["token"]);
        let bytes: Vec<u8> = t["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        if let Ok(s) = std::str::from_utf8(&bytes) {
            assert_eq!(t["token"], s);
        }
    }
    srv.shutdown().unwrap();
}

#[test]
fn n_prompts_and_usage() {
    let srv = start(CompletionsTemplate::Raw);
    let a = srv.addr;
    let tok = tokenizer();
    let greedy = json!({"prompt": "List two fruits:", "max_tokens": 10, "temperature": 0});
    let one = text(&ok(a, "/v1/completions", &greedy), 0);
    // n greedy sequences sharing one prefill are all the single answer
    let mut req = greedy.clone();
    req["n"] = json!(3);
    let v = ok(a, "/v1/completions", &req);
    for i in 0..3 {
        assert_eq!(v["choices"][i]["index"], i);
        assert_eq!(text(&v, i), one);
    }
    let p = tok.encode("List two fruits:").unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], p);
    assert_eq!(v["usage"]["completion_tokens"], 30);
    // sampled n with a seed: reproducible, each choice its own stream
    let seeded = json!({"prompt": "List two fruits:", "max_tokens": 10, "n": 2, "seed": 3, "top_p": 1.0});
    let s1 = ok(a, "/v1/completions", &seeded);
    let s2 = ok(a, "/v1/completions", &seeded);
    assert_eq!(s1["choices"], s2["choices"]);
    assert_ne!(text(&s1, 0), text(&s1, 1));
    // several prompts (text and ids): choices in prompt order, each the single-prompt answer
    let ids = tok.encode("Name a planet.").unwrap();
    let planet =
        text(&ok(a, "/v1/completions", &json!({"prompt": "Name a planet.", "max_tokens": 10, "temperature": 0})), 0);
    let b = ok(
        a,
        "/v1/completions",
        &json!({"prompt": [tok.encode("List two fruits:").unwrap(), ids], "max_tokens": 10, "temperature": 0}),
    );
    assert_eq!(text(&b, 0), one);
    assert_eq!(text(&b, 1), planet);
    let b = ok(
        a,
        "/v1/completions",
        &json!({"prompt": ["List two fruits:", "Name a planet."], "max_tokens": 10, "temperature": 0, "n": 2}),
    );
    assert_eq!(
        (text(&b, 0), text(&b, 1), text(&b, 2), text(&b, 3)),
        (one.clone(), one.clone(), planet.clone(), planet)
    );

    // streaming with n and include_usage: every chunk has usage null, the last one before [DONE] has the usage
    let mut st = req.clone();
    st["stream"] = json!(true);
    st["stream_options"] = json!({"include_usage": true});
    let chunks = sse(a, "/v1/completions", &st);
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], v["usage"]);
    assert!(rest.iter().all(|c| c["usage"].is_null() && c.get("usage").is_some()));
    for i in 0..3 {
        let s: String = rest
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .map(|c| c["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(s, one, "choice {i}");
    }
    // chat streams too: a role chunk per choice, then content
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0, "n": 2,
        "stream": true, "stream_options": {"include_usage": true}});
    let chunks = sse(a, "/v1/chat/completions", &chat);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[1]["choices"][0]["index"], 1);
    // two greedy choices of equal length
    let used = chunks.last().unwrap()["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(used.is_multiple_of(2) && (2..=10).contains(&used), "{used}");
    srv.shutdown().unwrap();
}

#[test]
fn logit_bias_min_tokens_and_penalties_are_honoured() {
    let srv = start(CompletionsTemplate::Raw);
    let a = srv.addr;
    let tok = tokenizer();
    let end = tok.special().end;
    let base = json!({"prompt": "Say something.", "max_tokens": 12, "temperature": 0});
    // a +100 bias makes one token the greedy choice every time
    let hello = tok.encode(" hello").unwrap()[0];
    let mut req = base.clone();
    req["logit_bias"] = json!({hello.to_string(): 100});
    assert_eq!(text(&ok(a, "/v1/completions", &req), 0), " hello".repeat(12));
    // Dolly's `### End` biased up ends at once; min_tokens holds it off for that many tokens
    let mut req = base.clone();
    req["logit_bias"] = json!({end.to_string(): 100});
    let v = ok(a, "/v1/completions", &req);
    assert_eq!(
        (v["usage"]["completion_tokens"].as_u64(), v["choices"][0]["finish_reason"].as_str()),
        (Some(1), Some("stop"))
    );
    req["min_tokens"] = json!(5);
    let v = ok(a, "/v1/completions", &req);
    assert_eq!(
        (v["usage"]["completion_tokens"].as_u64(), v["choices"][0]["finish_reason"].as_str()),
        (Some(6), Some("stop"))
    );
    // a frequency penalty larger than the bias's margin stops the repetition (OpenAI: -count * penalty)
    let mut req = base.clone();
    req["logit_bias"] = json!({hello.to_string(): 20});
    req["frequency_penalty"] = json!(2.0);
    let t = text(&ok(a, "/v1/completions", &req), 0);
    let count = t.matches(" hello").count();
    assert!((5..12).contains(&count), "{count} in {t:?}");
    assert!(t.starts_with(&" hello".repeat(5)));
    // the repetition penalty divides a positive logit of a prompt token: " a" biased to win greedy every time
    // wins no more once divided by 10
    let a_id = tok.encode(" a").unwrap()[0];
    let rep = json!({"prompt": "a a a a", "max_tokens": 8, "temperature": 0, "logit_bias": {a_id.to_string(): 3},
        "logprobs": 0});
    assert_eq!(text(&ok(a, "/v1/completions", &rep), 0), " a".repeat(8));
    let mut rep = rep;
    rep["repetition_penalty"] = json!(10.0);
    let v = ok(a, "/v1/completions", &rep);
    let tokens = v["choices"][0]["logprobs"]["tokens"].as_array().unwrap();
    assert!(!tokens.contains(&json!(" a")), "{tokens:?}");
    // a presence penalty larger than the bias: " a" once, then never again
    let mut pres = rep;
    pres["repetition_penalty"] = json!(1.0);
    pres["presence_penalty"] = json!(2.0);
    pres["logit_bias"] = json!({a_id.to_string(): 1.5});
    let v = ok(a, "/v1/completions", &pres);
    let tokens = v["choices"][0]["logprobs"]["tokens"].as_array().unwrap();
    assert_eq!(tokens[0], " a");
    assert_eq!(tokens.iter().filter(|t| *t == " a").count(), 1, "{tokens:?}");
    srv.shutdown().unwrap();
}

#[test]
fn completions_template_option_wraps_prompts_in_dollys_template() {
    let tok = tokenizer();
    let srv = start(CompletionsTemplate::Dolly);
    let a = srv.addr;
    let v = ok(a, "/v1/completions", &json!({"prompt": "Name a color.", "max_tokens": 4, "temperature": 0}));
    let want = tok.encode(&data::generation_prompt("Name a color.", None)).unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], want);
    // `raw_prompt: true` still takes the text as given
    let v = ok(a, "/v1/completions", &json!({"prompt": "Name a color.", "max_tokens": 4, "raw_prompt": true}));
    assert_eq!(v["usage"]["prompt_tokens"], tok.encode("Name a color.").unwrap().len());
    srv.shutdown().unwrap();
}
