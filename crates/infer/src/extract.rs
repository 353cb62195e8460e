//! Response extraction exactly as Dolly's `InstructionTextGenerationPipeline.postprocess` (dolly-spec section 9):
//! decode the tokens strictly between the first `### Response:\n` (50279) and the first `### End` (50277), or the
//! end, stripped; without a response token, regex fallbacks on the fully decoded text. Decoding is the caller's
//! (special tokens kept, HF clean-up), so this stays a pure function. Does not generate or stop anything.

use data::SpecialIds;
use regex::Regex;
use std::sync::OnceLock;

fn re_until_end() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    R.get_or_init(|| Regex::new(r"(?s)#+\s*Response:\s*(.+?)#+\s*End").expect("static regex"))
}

fn re_open() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    R.get_or_init(|| Regex::new(r"(?s)#+\s*Response:\s*(.+)").expect("static regex"))
}

/// Python's `str.strip()` (Unicode whitespace).
fn strip(s: &str) -> String {
    s.trim().to_string()
}

/// The regex fallback on a fully decoded sequence; empty when neither pattern matches (the original returns None).
pub fn extract_from_text(full: &str) -> String {
    if let Some(c) = re_until_end().captures(full) {
        return strip(&c[1]);
    }
    if let Some(c) = re_open().captures(full) {
        return strip(&c[1]);
    }
    String::new()
}

/// Extract the response from a full sequence (prompt + generated ids). `decode` must keep special tokens and
/// apply HF's clean-up (`DollyTokenizer::decode`).
pub fn extract_response<E>(
    sequence: &[u32],
    special: &SpecialIds,
    decode: impl Fn(&[u32]) -> Result<String, E>,
) -> Result<String, E> {
    // The original tests `if response_pos:`, so a response token at position 0 counts as absent; kept as is.
    match sequence.iter().position(|&t| t == special.response) {
        Some(rp) if rp > 0 => {
            let end = sequence.iter().position(|&t| t == special.end).unwrap_or(sequence.len());
            // Python slicing: an end before the response position gives an empty slice.
            let body = if end > rp + 1 { &sequence[rp + 1..end] } else { &[][..] };
            Ok(strip(&decode(body)?))
        }
        _ => Ok(extract_from_text(&decode(sequence)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SP: SpecialIds = SpecialIds { end: 50277, instruction: 50278, response: 50279, pad: 0 };

    /// Toy decoder: specials by name, others as `<id>` words.
    fn dec(ids: &[u32]) -> Result<String, ()> {
        Ok(ids
            .iter()
            .map(|&i| match i {
                50277 => "### End".to_string(),
                50278 => "### Instruction:".to_string(),
                50279 => "### Response:\n".to_string(),
                _ => format!(" w{i}"),
            })
            .collect())
    }

    #[test]
    fn between_first_response_and_first_end() {
        let seq = [5, 50278, 6, 50279, 7, 8, 50277, 9, 50277];
        assert_eq!(extract_response(&seq, &SP, dec).unwrap(), "w7 w8");
        // no end: up to the end of the sequence
        assert_eq!(extract_response(&[5, 50279, 7, 8], &SP, dec).unwrap(), "w7 w8");
        // a second response token inside the answer is decoded as text
        assert_eq!(extract_response(&[5, 50279, 7, 50279, 8], &SP, dec).unwrap(), "w7### Response:\n w8");
        // end before the response token: empty slice, as in Python
        assert_eq!(extract_response(&[50277, 5, 50279, 7], &SP, dec).unwrap(), "");
    }

    #[test]
    fn regex_fallbacks_without_response_token() {
        assert_eq!(extract_from_text("intro\n## Response:  the answer\nline 2\n### End tail"), "the answer\nline 2");
        assert_eq!(extract_from_text("x ### Response:\nopen ended\n"), "open ended");
        assert_eq!(extract_from_text("nothing here"), "");
        // position 0 counts as absent (original's truthiness test): falls back to the text
        let seq = [50279, 7, 50277];
        assert_eq!(extract_response(&seq, &SP, dec).unwrap(), "w7");
    }
}
