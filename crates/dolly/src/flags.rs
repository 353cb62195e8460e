//! Flag parsers shared by the subcommands: one shape for boolean flags (`--bf16`, `--greedy`, `--bf16 false`).

/// A boolean flag's value: `true|false` (also `1|0`, `yes|no`, `True|False`). Declared with `num_args = 0..=1,
/// default_missing_value = "true"` so that a bare `--flag` means true.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "True" | "1" | "yes" => Ok(true),
        "false" | "False" | "0" | "no" => Ok(false),
        // a bare switch takes the next word as its value: say how to pass a positional after it
        _ => Err(format!("expected true or false, got `{s}` (to give a positional after a bare switch, put it first or write --flag=true)")),
    }
}

/// `--quantize TYPE`: a weight format of `neox::QuantType` (`q8_0`).
pub fn parse_quant(s: &str) -> Result<neox::QuantType, String> {
    neox::QuantType::parse(s).ok_or_else(|| format!("unknown quantization `{s}` (supported: q8_0)"))
}
