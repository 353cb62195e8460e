//! Greedy token ids of a GGUF model for a prompt of token ids, one per line on stdout (tools/check_gguf.py
//! compares them with llama.cpp's on the same file): `gguf_greedy FILE N ID...`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: gguf_greedy FILE N ID...".into());
    }
    let (model, _) = neox::Model::load_gguf(std::path::Path::new(&args[1]))?;
    let n: usize = args[2].parse()?;
    let prompt: Vec<u32> = args[3..].iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    let out = neox::generate::greedy(&model, &[prompt], n)?;
    println!("{}", out[0].iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" "));
    Ok(())
}
