//! One choice of a completion or chat response while its tokens arrive: its text (`TextStream`, then the stop
//! strings, `stop`), the echoed prompt, its token count and finish reason, and the log-probabilities still to be
//! sent, in OpenAI's two shapes (completions: `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`; chat:
//! `content: [{token, logprob, bytes, top_logprobs}]`). The streaming and the non-streaming responses are built
//! from the same pieces, so they carry the same text, tokens and numbers.

use crate::decoding::FinishReason;
use crate::logprobs::TokenLogprob;
use crate::stop::StopMatcher;
use crate::stream::TextStream;
use data::DollyTokenizer;
use serde_json::{json, Map, Value};

/// One token's entry in a `logprobs` object (prompt tokens have no logprob at position 0).
#[derive(Clone, Debug)]
pub(crate) struct LpEntry {
    pub id: u32,
    pub lp: Option<TokenLogprob>,
}

/// What a choice has to send after an event.
#[derive(Default)]
pub(crate) struct Piece {
    pub text: String,
    pub lps: Vec<LpEntry>,
    pub finish: Option<FinishReason>,
}

pub(crate) struct Choice {
    ts: TextStream,
    stop: StopMatcher,
    stop_id: u32,
    /// Stop strings are only looked for once this many tokens are generated (vLLM's `min_tokens`).
    min_tokens: usize,
    /// `max_tokens: 0` with `echo`: the one token decoded internally is not part of the answer.
    echo_only: bool,
    /// Tokens generated (the stop token counts).
    pub generated: usize,
    pub finish: Option<FinishReason>,
    /// The prompt's text and, with logprobs, its tokens' entries, not yet sent.
    echo: Option<(String, Vec<LpEntry>)>,
    /// Characters sent so far (the next `text_offset`).
    offset: usize,
}

impl Choice {
    pub fn new(strip: bool, stops: Vec<String>, stop_id: u32, min_tokens: usize) -> Self {
        Choice {
            ts: TextStream::new(strip),
            stop: StopMatcher::new(stops),
            stop_id,
            min_tokens,
            echo_only: false,
            generated: 0,
            finish: None,
            echo: None,
            offset: 0,
        }
    }

    /// Echo `text` before the answer (`echo_only`: and nothing else).
    pub fn echo(&mut self, text: String, echo_only: bool) {
        self.echo = Some((text, Vec::new()));
        self.echo_only = echo_only;
    }

    /// The prompt's log-probabilities arrived (`ids` are its tokens).
    pub fn prompt_logprobs(&mut self, ids: &[u32], lps: &[Option<TokenLogprob>]) {
        if let Some((_, e)) = &mut self.echo {
            *e = ids.iter().zip(lps).map(|(&id, lp)| LpEntry { id, lp: lp.clone() }).collect();
        }
    }

    /// Take the pending echo (sent before the first token's piece).
    fn take_echo(&mut self, piece: &mut Piece) {
        if let Some((t, lps)) = self.echo.take() {
            piece.text = t;
            piece.lps = lps;
        }
    }

    /// A token arrived: what to send now.
    pub fn on_token(
        &mut self,
        tok: &DollyTokenizer,
        id: u32,
        finish: Option<FinishReason>,
        lp: Option<TokenLogprob>,
    ) -> Result<Piece, String> {
        let mut piece = Piece::default();
        if self.finish.is_some() {
            return Ok(piece);
        }
        self.take_echo(&mut piece);
        if self.echo_only {
            self.finish = Some(FinishReason::Length);
            piece.finish = self.finish;
            return Ok(piece);
        }
        self.generated += 1;
        let dec = |ids: &[u32]| tok.decode(ids);
        let mut text = String::new();
        if id != self.stop_id {
            text = self.ts.push(id, dec).map_err(|e| e.to_string())?;
        }
        // `### End` is listed too (not in the text): lm-eval reads a continuation's scores as the entries between
        // the prompt's and the one generated token, whatever that token is
        if let Some(lp) = lp {
            piece.lps.push(LpEntry { id, lp: Some(lp) });
        }
        if finish.is_some() {
            text.push_str(&self.ts.finish(|ids: &[u32]| tok.decode(ids)).map_err(|e| e.to_string())?);
        }
        // stop strings: only after min_tokens; before, text passes straight through
        let (out, stopped) = if self.generated >= self.min_tokens { self.stop.push(&text) } else { (text, false) };
        piece.text.push_str(&out);
        if stopped {
            self.finish = Some(FinishReason::Stop);
        } else if let Some(f) = finish {
            piece.text.push_str(&self.stop.finish());
            self.finish = Some(f);
        }
        piece.finish = self.finish;
        Ok(piece)
    }

    /// Ended by a stop string (the scheduler is told to stop its row).
    pub fn stopped_by_string(&self) -> bool {
        self.stop.stopped()
    }

    /// The completions-shaped `logprobs` object of `lps` (`text_offset` counts characters of the returned text).
    pub fn completion_logprobs(&mut self, tok: &DollyTokenizer, lps: &[LpEntry]) -> Value {
        let (mut tokens, mut token_lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for e in lps {
            let bytes = tok.token_bytes(e.id);
            tokens.push(json!(token_string(bytes)));
            offsets.push(json!(self.offset));
            self.offset += bytes.iter().filter(|&&b| b & 0xC0 != 0x80).count();
            match &e.lp {
                None => {
                    token_lps.push(Value::Null);
                    tops.push(Value::Null);
                }
                Some(lp) => {
                    token_lps.push(json!(lp.logprob));
                    let mut top = Map::new();
                    for &(id, x) in &lp.top {
                        top.entry(token_string(tok.token_bytes(id))).or_insert(json!(x));
                    }
                    tops.push(Value::Object(top));
                }
            }
        }
        json!({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets})
    }

    /// The chat-shaped `logprobs` object of `lps`.
    pub fn chat_logprobs(tok: &DollyTokenizer, lps: &[LpEntry]) -> Value {
        let one = |id: u32, x: f32| {
            let bytes = tok.token_bytes(id);
            json!({"token": token_string(bytes), "logprob": x, "bytes": bytes})
        };
        let content: Vec<Value> = lps
            .iter()
            .filter_map(|e| e.lp.as_ref().map(|lp| (e.id, lp)))
            .map(|(id, lp)| {
                let mut v = one(id, lp.logprob);
                v["top_logprobs"] = Value::Array(lp.top.iter().map(|&(i, x)| one(i, x)).collect());
                v
            })
            .collect();
        json!({"content": content, "refusal": null})
    }
}

/// A token's text as OpenAI shows it: the UTF-8 string, or `bytes:\xNN...` for a token that is part of a
/// character.
pub(crate) fn token_string(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let mut s = String::from("bytes:");
            for b in bytes {
                s.push_str(&format!("\\x{b:02x}"));
            }
            s
        }
    }
}
