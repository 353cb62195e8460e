//! Dolly's prompt templates, byte-exact (spec section 2): the training text split into the prompt part (ends with
//! `### Response:\n`) and the supervised part (`{response}\n\n### End`), and the generation prompt.
//! Does not strip, clean or otherwise touch the text; does not tokenize.

/// The instruction preamble every Dolly prompt starts with.
pub const INTRO: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.";
/// Special token: end of a response (id 50277 on the 20B tokenizer).
pub const END_KEY: &str = "### End";
/// Special token: start of the instruction (id 50278).
pub const INSTRUCTION_KEY: &str = "### Instruction:";
/// Special token: start of the response, newline included (id 50279).
pub const RESPONSE_KEY_NL: &str = "### Response:\n";
/// Marker of the context block (not a special token).
pub const INPUT_KEY: &str = "Input:";
/// The three Dolly special tokens in the order Dolly adds them.
pub const DOLLY_SPECIAL_TOKENS: [&str; 3] = [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL];

/// The unsupervised part of a training text: everything up to and including `### Response:\n`.
/// An empty `context` gives the no-input template.
pub fn training_prompt(instruction: &str, context: &str) -> String {
    if context.is_empty() {
        format!("{INTRO}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n{RESPONSE_KEY_NL}")
    } else {
        format!("{INTRO}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n{INPUT_KEY}\n{context}\n\n{RESPONSE_KEY_NL}")
    }
}

/// The supervised part of a training text: `{response}\n\n### End` (nothing follows `### End`).
pub fn training_target(response: &str) -> String {
    format!("{response}\n\n{END_KEY}")
}

/// The full training text: `training_prompt + training_target`.
pub fn training_text(instruction: &str, context: &str, response: &str) -> String {
    let mut s = training_prompt(instruction, context);
    s.push_str(&training_target(response));
    s
}

/// The generation prompt. A non-empty context is folded into the instruction as
/// `"{instruction}\n\nInput:\n{context}"`, which makes the prompt byte-identical to the training prefix.
pub fn generation_prompt(instruction: &str, context: Option<&str>) -> String {
    training_prompt(instruction, context.unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_spec_literals() {
        let intro = INTRO;
        assert_eq!(
            training_text("I", "", "R"),
            format!("{intro}\n\n### Instruction:\nI\n\n### Response:\nR\n\n### End")
        );
        assert_eq!(
            training_text("I", "C", "R"),
            format!("{intro}\n\n### Instruction:\nI\n\nInput:\nC\n\n### Response:\nR\n\n### End")
        );
        assert_eq!(generation_prompt("I", None), format!("{intro}\n\n### Instruction:\nI\n\n### Response:\n"));
        assert_eq!(generation_prompt("I", Some("")), generation_prompt("I", None));
        // With context the generation prompt is exactly the training prefix.
        let full = training_text("I", "C", "R");
        assert!(full.starts_with(&generation_prompt("I", Some("C"))));
    }
}
