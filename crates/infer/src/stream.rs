//! Incremental text of a growing token sequence, for streaming: each `push` returns only text that can no longer
//! change — never half a UTF-8 character (a trailing U+FFFD from an incomplete byte sequence is held back), never
//! text that HF's space clean-up (`" ."` -> `"."`, `" n't"` -> `"n't"`, ...) could still rewrite, and, when
//! stripping, no leading whitespace and no trailing whitespace until something follows it. The concatenation of
//! all deltas plus `finish()` is the final text, so streamed and non-streamed answers are equal by construction.
//! Re-decodes the whole sequence per token (fine up to a few thousand tokens). Does not stop generation.

/// Longest clean-up pattern after its leading space (`" n't"`): text within this many chars of a space may change.
const CLEANUP_TAIL: usize = 3;

pub struct TextStream {
    tokens: Vec<u32>,
    emitted: String,
    strip: bool,
    diverged: bool,
}

impl TextStream {
    /// `strip`: trim whitespace at both ends of the final text (Dolly's response extraction does).
    pub fn new(strip: bool) -> Self {
        TextStream { tokens: Vec::new(), emitted: String::new(), strip, diverged: false }
    }

    /// Text streamed so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }

    fn full<E>(&self, decode: &impl Fn(&[u32]) -> Result<String, E>) -> Result<String, E> {
        let t = decode(&self.tokens)?;
        Ok(if self.strip { t.trim_start().to_string() } else { t })
    }

    fn advance(&mut self, upto: &str) -> String {
        if self.diverged {
            return String::new();
        }
        if !upto.starts_with(self.emitted.as_str()) {
            // Cannot happen with the clean-up rules above; if it does, stop streaming rather than emit garbage.
            if !self.emitted.starts_with(upto) {
                self.diverged = true;
            }
            return String::new();
        }
        let delta = upto[self.emitted.len()..].to_string();
        self.emitted.push_str(&delta);
        delta
    }

    /// Add one generated token (not the stop token) and return the newly stable text (maybe empty).
    pub fn push<E>(&mut self, token: u32, decode: impl Fn(&[u32]) -> Result<String, E>) -> Result<String, E> {
        self.tokens.push(token);
        let full = self.full(&decode)?;
        let mut s = full.trim_end_matches('\u{FFFD}');
        // hold back from the first space among the last chars, where a clean-up pattern (or a chain of two)
        // could still complete
        let window = s.char_indices().rev().nth(2 * CLEANUP_TAIL).map(|(i, _)| i).unwrap_or(0);
        if let Some(sp) = s[window..].find(' ') {
            s = s[..window + sp].trim_end_matches(' ');
        }
        if self.strip {
            s = s.trim_end();
        }
        let s = s.to_string();
        Ok(self.advance(&s))
    }

    /// Generation ended: return the rest of the text.
    pub fn finish<E>(&mut self, decode: impl Fn(&[u32]) -> Result<String, E>) -> Result<String, E> {
        let full = self.full(&decode)?;
        let s = if self.strip { full.trim_end().to_string() } else { full };
        Ok(self.advance(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte-level toy decoder: each id is one byte; lossy UTF-8 like the ByteLevel decoder; HF clean-up.
    fn dec(ids: &[u32]) -> Result<String, ()> {
        let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        Ok(data::tokenizer::clean_up_tokenization(&String::from_utf8_lossy(&bytes)))
    }

    fn run(text: &str, strip: bool) -> (Vec<String>, String) {
        let mut s = TextStream::new(strip);
        let mut deltas = Vec::new();
        for b in text.bytes() {
            let d = s.push(b as u32, dec).unwrap();
            assert!(!d.contains('\u{FFFD}'), "half a character streamed: {d:?}");
            deltas.push(d);
        }
        deltas.push(s.finish(dec).unwrap());
        (deltas, s.text().to_string())
    }

    #[test]
    fn concatenation_equals_final_decode() {
        for text in ["Hello , world ! I do n't know . It 's fine", "  héllo wörld 🦀 ok ?  ", "a ' b", "x  .", ""] {
            for strip in [false, true] {
                let (deltas, all) = run(text, strip);
                let want = dec(&text.bytes().map(|b| b as u32).collect::<Vec<_>>()).unwrap();
                let want = if strip { want.trim().to_string() } else { want };
                assert_eq!(deltas.concat(), want, "{text:?} strip={strip}");
                assert_eq!(all, want);
            }
        }
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let (deltas, _) = run("🦀🦀", false);
        // 8 pushes: nothing until the 4th byte completes the first crab
        assert_eq!(&deltas[..4], &["", "", "", "🦀"]);
        assert_eq!(deltas[7], "🦀");
    }
}
