//! Tokenizer set-up for Dolly (spec section 3): loads a `tokenizer.json` with the `tokenizers` crate, sets pad to
//! `<|endoftext|>`, adds Dolly's three special tokens in Dolly's order and checks each encodes to one id; encodes
//! without BOS/EOS, decodes keeping special tokens with Hugging Face's space clean-up; checks the fit against a
//! model's embedding rows; writes the HF tokenizer files of a saved model.
//! Does not pad or truncate (examples and batches do that), does not download anything.

use crate::error::{DataError, Result};
use crate::template::DOLLY_SPECIAL_TOKENS;
use std::path::{Path, PathBuf};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// The pad/end-of-text token Dolly pads with.
pub const PAD_TOKEN: &str = "<|endoftext|>";

/// Words kept in the BPE cache (dolly-15k has about 60k distinct pre-tokenized words).
const BPE_CACHE_WORDS: usize = 200_000;

/// Ids of the tokens the pipeline relies on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SpecialIds {
    /// `### End` (50277 on the 20B tokenizer).
    pub end: u32,
    /// `### Instruction:` (50278).
    pub instruction: u32,
    /// `### Response:\n` (50279).
    pub response: u32,
    /// `<|endoftext|>` (0), used for padding.
    pub pad: u32,
}

/// How a tokenizer's vocabulary fits a model's embedding matrix (spec section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabFit {
    /// The matrix has exactly as many rows as the tokenizer has ids.
    Exact,
    /// The matrix is padded (e.g. Pythia's 50304): Dolly shrinks it to the tokenizer size, keeping the first rows.
    Shrink { rows: usize, to: usize },
    /// The tokenizer is larger (added tokens): new rows must be initialised.
    Grow { rows: usize, to: usize },
}

/// A `tokenizers::Tokenizer` set up the way Dolly's trainer sets it up.
#[derive(Clone)]
pub struct DollyTokenizer {
    inner: Tokenizer,
    special: SpecialIds,
    base_vocab_size: usize,
    /// `inner.get_vocab_size(true)`, computed once: `tokenizers` builds the whole vocabulary map to count it
    /// (too slow to repeat, see docs/benchmarks.md#decode-path-tuning), and decoding checks ids against it on
    /// every streamed token.
    vocab_size: usize,
    /// The most bytes of text one token can stand for (see `min_tokens_for_bytes`).
    max_token_bytes: usize,
    source: PathBuf,
    /// The bytes of every id (`token_bytes`), built on first use: `tokenizers` clones its added-token map on
    /// every lookup, too slow for a server's per-token log-probabilities.
    bytes: std::sync::OnceLock<Vec<Box<[u8]>>>,
}

fn tok_err(path: &Path, what: &str, e: impl std::fmt::Display) -> DataError {
    DataError::tokenizer(format!("{}: {what}: {e}", path.display()))
}

impl DollyTokenizer {
    /// `--tokenizer FILE` wins; otherwise `MODEL_DIR/tokenizer.json`.
    pub fn resolve(model_dir: Option<&Path>, tokenizer_file: Option<&Path>) -> Result<Self> {
        match (tokenizer_file, model_dir) {
            (Some(f), _) => Self::from_file(f),
            (None, Some(d)) => Self::from_file(&d.join("tokenizer.json")),
            (None, None) => Err(DataError::tokenizer(
                "no tokenizer: pass --tokenizer FILE or a model directory containing tokenizer.json",
            )),
        }
    }

    /// Load `path` and apply Dolly's set-up.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| tok_err(path, "cannot read tokenizer file", e))?;
        Self::from_json(&bytes, path)
    }

    /// The text of a tokenizer.json (a file's, or one embedded in a GGUF model) with Dolly's set-up; `source`
    /// names it in errors.
    pub fn from_json(bytes: &[u8], source: &Path) -> Result<Self> {
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| tok_err(source, "not a valid tokenizer.json", e))?;
        Self::from_tokenizer(inner, source)
    }

    /// Apply Dolly's set-up to an already parsed tokenizer; `source` names it in errors.
    pub fn from_tokenizer(mut inner: Tokenizer, source: &Path) -> Result<Self> {
        inner.with_truncation(None).map_err(|e| tok_err(source, "cannot disable truncation", e))?.with_padding(None);
        // A larger BPE word cache (the default holds 10k words and stops filling): ids are unchanged.
        let mut model = inner.get_model().clone();
        model.resize_cache(BPE_CACHE_WORDS);
        inner.with_model(model);
        let pad = inner.token_to_id(PAD_TOKEN).ok_or_else(|| {
            tok_err(
                source,
                "missing token",
                format!("{PAD_TOKEN:?} (Dolly pads with it; is this a GPT-NeoX tokenizer?)"),
            )
        })?;
        let base_vocab_size = inner.get_vocab_size(true);
        let added: Vec<AddedToken> = DOLLY_SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect();
        inner.add_special_tokens(&added);
        let mut ids = [0u32; 3];
        for (slot, tok) in ids.iter_mut().zip(DOLLY_SPECIAL_TOKENS) {
            let id = inner
                .token_to_id(tok)
                .ok_or_else(|| tok_err(source, "special token was not added", format!("{tok:?}")))?;
            let enc = inner.encode_fast(tok, true).map_err(|e| tok_err(source, "cannot encode", e))?;
            if enc.get_ids() != [id] {
                return Err(tok_err(
                    source,
                    "special token does not encode to exactly one id",
                    format!("{tok:?}: expected [{id}], got {:?}", enc.get_ids()),
                ));
            }
            *slot = id;
        }
        let special = SpecialIds { end: ids[0], instruction: ids[1], response: ids[2], pad };
        // Tokens already present (a saved Dolly tokenizer) keep their ids and are not counted as new.
        let base_vocab_size = base_vocab_size.min(ids.iter().copied().min().unwrap_or(0) as usize);
        let vocab_size = inner.get_vocab_size(true);
        // Byte-level BPE (GPT-NeoX): each character of a vocabulary entry stands for one byte. Otherwise count
        // the entry's UTF-8 bytes, which can only overstate it.
        let byte_level = matches!(inner.get_pre_tokenizer(), Some(PreTokenizerWrapper::ByteLevel(_)));
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(|k| if byte_level { k.chars().count() } else { k.len() })
            .max()
            .unwrap_or(1)
            .max(DOLLY_SPECIAL_TOKENS.iter().map(|t| t.len()).max().unwrap_or(1));
        Ok(DollyTokenizer {
            inner,
            special,
            base_vocab_size,
            vocab_size,
            max_token_bytes,
            source: source.to_path_buf(),
            bytes: std::sync::OnceLock::new(),
        })
    }

    /// A lower bound on the number of tokens `bytes` bytes of text encode to, whatever the text: one token
    /// covers at most `max_token_bytes` bytes after normalisation, and NFC shrinks UTF-8 text at most 3-fold
    /// (Hangul L+V+T jamo, 9 bytes, compose to one 3-byte syllable; 4 is used for margin). Lets the data
    /// pipeline drop a record that cannot fit `max_length` without tokenizing it.
    pub fn min_tokens_for_bytes(&self, bytes: usize) -> usize {
        bytes / (4 * self.max_token_bytes)
    }

    /// The special ids (end=50277, instruction=50278, response=50279, pad=0 on the 20B tokenizer).
    pub fn special(&self) -> SpecialIds {
        self.special
    }

    /// Number of ids including added tokens (50,280 for the 20B tokenizer after Dolly's set-up).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Where the tokenizer was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Token ids of `text`; no BOS/EOS is added (the 20B post-processor adds none), special tokens matched first.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, true).map_err(|e| tok_err(&self.source, "cannot encode text", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode keeping special tokens, then apply Hugging Face's `clean_up_tokenization` (spec section 9).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(clean_up_tokenization(&self.decode_raw(ids, false)?))
    }

    /// The raw bytes token `id` stands for: an added token's text, or a byte-level vocabulary entry mapped back
    /// through GPT-2's byte-to-character table (so a token holding part of a UTF-8 character gives that part).
    /// Empty for an unknown id. The table of all ids is built on the first call (~50k short entries).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let table = self.bytes.get_or_init(|| {
            let added = self.inner.get_added_tokens_decoder();
            let inv = byte_level_inverse();
            (0..self.vocab_size as u32)
                .map(|i| {
                    let Some(piece) = self.inner.id_to_token(i) else { return Box::default() };
                    if added.contains_key(&i) {
                        return piece.into_bytes().into_boxed_slice();
                    }
                    let bytes: Option<Vec<u8>> = piece.chars().map(|c| inv.get(&c).copied()).collect();
                    bytes.unwrap_or_else(|| piece.into_bytes()).into_boxed_slice()
                })
                .collect()
        });
        table.get(id as usize).map_or(&[], |b| b)
    }

    /// Plain `tokenizers` decode, no clean-up.
    pub fn decode_raw(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let v = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(DataError::tokenizer(format!("cannot decode id {bad}: vocabulary has {v} ids")));
        }
        self.inner.decode(ids, skip_special_tokens).map_err(|e| tok_err(&self.source, "cannot decode", e))
    }

    /// Check the tokenizer against a model's `vocab_size` (embedding rows). A tokenizer whose own vocabulary
    /// (before Dolly's three tokens) is larger than the matrix belongs to another model: error.
    pub fn check_model_vocab(&self, model_rows: usize) -> Result<VocabFit> {
        let n = self.vocab_size();
        if self.base_vocab_size > model_rows {
            return Err(DataError::tokenizer(format!(
                "{}: tokenizer has {} ids before Dolly's special tokens but the model has only {model_rows} \
                 embedding rows: this tokenizer does not belong to this model",
                self.source.display(),
                self.base_vocab_size
            )));
        }
        Ok(match n.cmp(&model_rows) {
            std::cmp::Ordering::Equal => VocabFit::Exact,
            std::cmp::Ordering::Less => VocabFit::Shrink { rows: model_rows, to: n },
            std::cmp::Ordering::Greater => VocabFit::Grow { rows: model_rows, to: n },
        })
    }

    /// Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `dir` (atomically each),
    /// loadable by `transformers.AutoTokenizer` (spec section 7's final save).
    pub fn save_pretrained(&self, dir: &Path, model_max_length: Option<usize>) -> Result<()> {
        let json = self.inner.to_string(false).map_err(|e| tok_err(&self.source, "cannot serialise tokenizer", e))?;
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            common::atomic_write(&p, bytes).map_err(|e| DataError::io(format!("{}: {e}", p.display())))
        };
        write("tokenizer.json", json.as_bytes())?;
        write("tokenizer_config.json", &pretty(&tokenizer_config_json(model_max_length)))?;
        write("special_tokens_map.json", &pretty(&special_tokens_map_json()))?;
        Ok(())
    }
}

fn pretty(v: &serde_json::Value) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).unwrap_or_default();
    s.push(b'\n');
    s
}

/// `tokenizer_config.json` as transformers writes it for Dolly v2 models.
pub fn tokenizer_config_json(model_max_length: Option<usize>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "add_prefix_space": false,
        "bos_token": PAD_TOKEN,
        "clean_up_tokenization_spaces": true,
        "eos_token": PAD_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": PAD_TOKEN,
        "tokenizer_class": "GPTNeoXTokenizer",
        "additional_special_tokens": DOLLY_SPECIAL_TOKENS,
    });
    if let Some(n) = model_max_length {
        v["model_max_length"] = serde_json::json!(n);
    }
    v
}

/// `special_tokens_map.json`: pad `<|endoftext|>`, additional_special_tokens the three Dolly keys.
pub fn special_tokens_map_json() -> serde_json::Value {
    serde_json::json!({
        "additional_special_tokens": DOLLY_SPECIAL_TOKENS,
        "bos_token": PAD_TOKEN,
        "eos_token": PAD_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": PAD_TOKEN,
    })
}

/// GPT-2's `bytes_to_unicode`, inverted: the byte each character of a byte-level vocabulary entry stands for.
fn byte_level_inverse() -> &'static std::collections::HashMap<char, u8> {
    static MAP: std::sync::OnceLock<std::collections::HashMap<char, u8>> = std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut extra = 0u32;
        (0..=255u8)
            .map(|b| {
                let c = if printable(b) {
                    b as u32
                } else {
                    extra += 1;
                    255 + extra
                };
                (char::from_u32(c).unwrap_or('\u{FFFD}'), b)
            })
            .collect()
    })
}

/// Hugging Face transformers' `clean_up_tokenization` (PreTrainedTokenizerBase), replacement for replacement.
pub fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("Hi , you ! I 'm sure it 's done . Is n't it ?"),
            "Hi, you! I'm sure it's done. Isn't it?"
        );
        assert_eq!(clean_up_tokenization("a ' b"), "a'b");
    }
}
