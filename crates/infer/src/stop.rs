//! Stop strings matched on decoded text, for streaming: `push` returns the text that can no longer be part of a
//! stop string, holding back the longest tail that is still the start of one; a match ends the sequence and
//! neither the stop string nor anything after it is returned (OpenAI's and vLLM's rule). The concatenation of the
//! returned pieces is the same whatever the deltas' boundaries, so streamed and non-streamed texts agree.

/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOPS: usize = 4;

#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// `stops`: non-empty strings (none: every push passes through).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops, held: String::new(), stopped: false }
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Add decoded text; returns the part that is final, and whether a stop string was found (nothing more is
    /// returned after that).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        if self.stops.is_empty() {
            return (delta.to_string(), false);
        }
        self.held.push_str(delta);
        // the earliest match wins (the text before it is what a non-streaming client gets)
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // hold back the longest tail that a stop string starts with
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - hold;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// The sequence ended without a stop string: the held-back text is final.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for d in deltas {
            let (t, stop) = m.push(d);
            out.push(t);
            if stop {
                return (out, true);
            }
        }
        out.push(m.finish());
        (out, false)
    }

    #[test]
    fn stop_split_across_deltas_is_found_and_not_returned() {
        let (out, stop) = run(&["\n\nUser:"], &["Hello", " world\n", "\nUs", "er: more"]);
        assert!(stop);
        assert_eq!(out.concat(), "Hello world");
        // the tail that could start the stop string was held back, then released when it could not
        let (out, stop) = run(&["\n\nUser:"], &["a\n", "\nUx", "y"]);
        assert!(!stop);
        assert_eq!(out, vec!["a", "\n\nUx", "y", ""]);
    }

    #[test]
    fn any_split_gives_the_text_of_one_delta() {
        let text = "one two. three; stop here. four";
        for stops in [vec!["stop"], vec!["; ", "four"], vec!["zzz"], vec!["two.", "o t"]] {
            let (whole, _) = run(&stops, &[text]);
            for cut in 0..text.len() {
                if !text.is_char_boundary(cut) {
                    continue;
                }
                let (parts, _) = run(&stops, &[&text[..cut], &text[cut..]]);
                assert_eq!(parts.concat(), whole.concat(), "{stops:?} cut {cut}");
            }
        }
        // the earliest match among several
        assert_eq!(run(&["four", "three"], &[text]).0.concat(), "one two. ");
        // multibyte: a held tail never splits a character
        let (out, stop) = run(&["é!"], &["café", " ok"]);
        assert!(!stop);
        assert_eq!(out, vec!["caf", "é ok", ""]);
    }
}
