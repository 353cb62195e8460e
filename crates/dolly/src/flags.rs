//! Flag parsers and checks shared by the subcommands: one shape for boolean flags (`--bf16`, `--greedy`,
//! `--bf16 false`), output-file paths.

use std::path::Path;

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

/// `--quantize TYPE`: a weight format of `neox::QuantType` (`q8_0`, `q4_k`).
pub fn parse_quant(s: &str) -> Result<neox::QuantType, String> {
    neox::QuantType::parse(s).ok_or_else(|| format!("unknown quantization `{s}` (supported: q8_0, q4_k)"))
}

/// An output file flag (`flag` = `--output`, ...): not a directory, its directory exists, and it is not `input`
/// (the file being read, named by its flag).
pub fn check_output_file(flag: &str, out: &Path, input: Option<(&str, &Path)>) -> anyhow::Result<()> {
    if out.is_dir() {
        anyhow::bail!("{flag} {}: is a directory (give a file path)", out.display());
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        anyhow::bail!("{flag} {}: directory {} does not exist", out.display(), parent.display());
    }
    if let Some((what, input)) = input {
        let same = |a: &Path, b: &Path| a.canonicalize().ok().is_some_and(|x| b.canonicalize().ok() == Some(x));
        if same(out, input) {
            anyhow::bail!("{flag} {} is the {what} file", out.display());
        }
    }
    Ok(())
}
