//! `pytorch_model.bin` model directories and hub cache snapshots. The fixtures under `fixtures/pickle/` were made
//! by `tools/make_pickle_fixtures.py` (torch 2.15.0) from `fixtures/tiny-parallel/model.safetensors`, cut to
//! vocab 16 and one layer; each case must load to exactly those values (bf16/f16 cases: rounded to nearest-even
//! as torch's `.to()` does, which `half` reproduces). Hostile, legacy, truncated and inconsistent archives, and
//! configs that would allocate more than the files hold, must give specific errors, never a panic or an abort.

use neox::weights::{weight_files, WeightFormat};
use neox::{Layout, Model, NeoxConfig, SaveDtype};
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

/// The cut-down model's parameters taken from tiny-parallel's safetensors, each value passed through `round`;
/// with `tied`, `embed_out` holds `embed_in`'s values.
fn expected(round: fn(f32) -> f32, tied: bool) -> (NeoxConfig, Vec<f32>) {
    let full = Model::load(&fixture("tiny-parallel")).unwrap();
    let cfg = NeoxConfig::from_file(&fixture("pickle/f32/config.json")).unwrap();
    let layout = Layout::new(&cfg);
    let mut out = vec![f32::NAN; layout.total];
    for p in &layout.params {
        let src_name = if tied && p.name == "embed_out.weight" { "gpt_neox.embed_in.weight" } else { &p.name };
        let src = full.layout.find(src_name).unwrap();
        // Embedding rows are row-major, so the first 16 rows are the first numel values.
        let vals = &full.params()[src.offset..src.offset + p.numel()];
        out[p.range()].iter_mut().zip(vals).for_each(|(o, v)| *o = round(*v));
    }
    (cfg, out)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn torch_bin_fixtures_load_bit_for_bit() {
    let (cfg, f32_want) = expected(|x| x, false);
    let dir = fixture("pickle/f32");
    assert_eq!(weight_files(&dir).unwrap().format, WeightFormat::TorchBin);
    let m = Model::load(&dir).unwrap();
    assert_eq!(m.config, cfg);
    assert_eq!(bits(m.params()), bits(&f32_want), "f32 (with the bool attention.bias buffer ignored)");

    // One flat bf16 storage: non-zero offsets, a transposed view, embed_out sharing embed_in's storage.
    let (_, want) = expected(|x| half::bf16::from_f32(x).to_f32(), true);
    let m = Model::load(&fixture("pickle/bf16-views")).unwrap();
    assert_eq!(bits(m.params()), bits(&want), "bf16 views");

    let (_, want) = expected(|x| half::f16::from_f32(x).to_f32(), false);
    let dir = fixture("pickle/f16-sharded");
    let wf = weight_files(&dir).unwrap();
    assert_eq!((wf.format, wf.files.len()), (WeightFormat::TorchBin, 2));
    assert_eq!(bits(Model::load(&dir).unwrap().params()), bits(&want), "f16 shards");
}

#[test]
fn safetensors_is_preferred_over_pytorch_model_bin() {
    let (cfg, want) = expected(|x| x, false);
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("pickle/f32"), tmp.path());
    let doubled: Vec<f32> = want.iter().map(|x| 2.0 * x).collect();
    Model::from_parts(cfg, doubled.clone()).unwrap().save(tmp.path(), SaveDtype::F32).unwrap();
    assert_eq!(weight_files(tmp.path()).unwrap().format, WeightFormat::Safetensors);
    assert_eq!(bits(Model::load(tmp.path()).unwrap().params()), bits(&doubled));
}

#[test]
fn hostile_and_legacy_pickles_are_refused() {
    // data.pkl holds REDUCE(posix.system, ("echo pwned",)); nothing is imported or called, the global is named.
    let e = load_err(&fixture("pickle/hostile"));
    assert!(e.contains("pytorch_model.bin") && e.contains("global `posix.system` is not allowed"), "{e}");
    let e = load_err(&fixture("pickle/legacy"));
    assert!(e.contains("pytorch_model.bin: a legacy (pre-1.6, non-zip) torch.save pickle"), "{e}");
}

/// Rebuild a zip, entry by entry (stored), letting `edit` change or drop (None) each entry's bytes.
fn rewrite(src: &[u8], mut edit: impl FnMut(&str, Vec<u8>) -> Option<Vec<u8>>) -> Vec<u8> {
    let mut a = zip::ZipArchive::new(Cursor::new(src)).unwrap();
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..a.len() {
        let mut f = a.by_index(i).unwrap();
        let name = f.name().unwrap().to_string();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        drop(f);
        if let Some(d) = edit(&name, data) {
            w.start_file(name, opts).unwrap();
            w.write_all(&d).unwrap();
        }
    }
    w.finish().unwrap().into_inner()
}

/// A copy of the f32 case whose archive is `bytes`.
fn case_with(root: &Path, label: &str, bytes: &[u8]) -> PathBuf {
    let d = root.join(label);
    copy_dir(&fixture("pickle/f32"), &d);
    std::fs::write(d.join("pytorch_model.bin"), bytes).unwrap();
    d
}

#[test]
fn broken_archives_give_clean_errors() {
    let good = std::fs::read(fixture("pickle/f32/pytorch_model.bin")).unwrap();
    let root = tempfile::tempdir().unwrap();
    for cut in [good.len() / 2, good.len() - 10, 100, 30] {
        let e = load_err(&case_with(root.path(), &format!("cut-{cut}"), &good[..cut]));
        assert!(e.contains("pytorch_model.bin") && e.contains("truncated or corrupt"), "cut {cut}: {e}");
    }
    assert!(load_err(&case_with(root.path(), "cut-3", &good[..3])).contains("not a torch.save zip archive"));

    let mut shortened = String::new();
    let bytes = rewrite(&good, |name, mut d| {
        if shortened.is_empty() && name.starts_with("pytorch_model/data/") {
            shortened = name.to_string();
            d.truncate(d.len() - 4);
        }
        Some(d)
    });
    let e = load_err(&case_with(root.path(), "short-storage", &bytes));
    assert!(e.contains("holds") && e.contains("its record says"), "{e}");

    for (label, op, want) in
        [("unknown-op", 0xffu8, "opcode unknown (0xff) at byte 2"), ("newobj", 0x81, "opcode NEWOBJ (0x81) at byte 2")]
    {
        let bytes = rewrite(&good, |name, d| {
            Some(if name.ends_with("/data.pkl") { [&d[..2], &[op], &d[2..]].concat() } else { d })
        });
        let e = load_err(&case_with(root.path(), label, &bytes));
        assert!(e.contains("data.pkl") && e.contains(want), "{label}: {e}");
    }

    let bytes = rewrite(&good, |name, d| (!name.ends_with("/data.pkl")).then_some(d));
    assert!(load_err(&case_with(root.path(), "no-pkl", &bytes)).contains("expected one PREFIX/data.pkl"));

    let bytes = rewrite(&good, |name, d| Some(if name.ends_with("/byteorder") { b"big".to_vec() } else { d }));
    assert!(load_err(&case_with(root.path(), "big-endian", &bytes)).contains("byte order `big`"));

    let bytes = rewrite(&good, |name, d| (!name.ends_with("/data/0")).then_some(d));
    let e = load_err(&case_with(root.path(), "no-storage", &bytes));
    assert!(e.contains("zip entry `pytorch_model/data/0`"), "{e}");
}

/// One tensor of a hand-made state dict: (name, storage key, storage class, storage numel, offset, size, stride).
type Spec = (String, String, &'static str, u64, u64, Vec<usize>, Vec<usize>);

/// The protocol-2 pickle torch writes for an OrderedDict of `_rebuild_tensor_v2` tensors.
fn state_dict_pickle(tensors: &[Spec]) -> Vec<u8> {
    fn s(p: &mut Vec<u8>, x: &str) {
        p.push(b'X');
        p.extend((x.len() as u32).to_le_bytes());
        p.extend(x.as_bytes());
    }
    fn int(p: &mut Vec<u8>, x: u64) {
        p.push(0x8a);
        p.push(8);
        p.extend(x.to_le_bytes());
    }
    let mut p = b"\x80\x02ccollections\nOrderedDict\n)R(".to_vec();
    for (name, key, class, numel, offset, size, stride) in tensors {
        s(&mut p, name);
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        s(&mut p, "storage");
        p.extend(format!("ctorch\n{class}\n").as_bytes());
        s(&mut p, key);
        s(&mut p, "cpu");
        int(&mut p, *numel);
        p.extend(b"tQ");
        int(&mut p, *offset);
        for dims in [size, stride] {
            p.push(b'(');
            dims.iter().for_each(|&d| int(&mut p, d as u64));
            p.push(b't');
        }
        p.extend(b"\x89ccollections\nOrderedDict\n)RtR");
    }
    p.extend(b"u.");
    p
}

/// A torch-style archive with `pickle` and the given storages (key, bytes).
fn archive(pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut put = |name: String, d: &[u8]| {
        w.start_file(name, opts).unwrap();
        w.write_all(d).unwrap();
    };
    put("archive/data.pkl".into(), pickle);
    put("archive/byteorder".into(), b"little");
    for (k, d) in storages {
        put(format!("archive/data/{k}"), d);
    }
    w.finish().unwrap().into_inner()
}

fn write_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("pickle/f32/config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

#[test]
fn config_sizes_are_checked_against_the_headers_before_allocating() {
    let root = tempfile::tempdir().unwrap();
    // An inflated config.json next to real weights: a shape error from the headers, not an allocation.
    for (label, src) in [("st", "tiny-parallel"), ("bin", "pickle/f32")] {
        let d = root.path().join(label);
        copy_dir(&fixture(src), &d);
        write_config(&d, |c| c["hidden_size"] = 1_000_000.into());
        let e = load_err(&d);
        assert!(e.contains("expected [") && e.contains("1000000] from config.json"), "{label}: {e}");
    }
    // An inflated layer count would build a huge layout: refused from the number of tensors the files hold.
    let d = root.path().join("layers");
    copy_dir(&fixture("pickle/f32"), &d);
    write_config(&d, |c| c["num_hidden_layers"] = 1_000_000_000_000u64.into());
    let e = load_err(&d);
    assert!(e.contains("config.json: num_hidden_layers 1000000000000 needs"), "{e}");

    let d = root.path().join("overflow");
    copy_dir(&fixture("pickle/f32"), &d);
    write_config(&d, |c| {
        c["hidden_size"] = (1u64 << 40).into();
        c["vocab_size"] = (1u64 << 40).into();
    });
    assert!(load_err(&d).contains("does not fit in memory addresses"));

    // Every tensor a stride-0 view of one 4-byte storage: headers that agree with a config of ~24 TB.
    let d = root.path().join("huge");
    write_config(&d, |c| {
        c["hidden_size"] = 1_000_000.into();
        c["vocab_size"] = 1_000_000.into();
        c["intermediate_size"] = 4.into();
    });
    let cfg = NeoxConfig::from_file(&d.join("config.json")).unwrap();
    let specs: Vec<Spec> = Layout::new(&cfg)
        .params
        .iter()
        .map(|p| (p.name.clone(), "0".into(), "FloatStorage", 1, 0, p.shape.clone(), vec![0; p.shape.len()]))
        .collect();
    std::fs::write(d.join("pytorch_model.bin"), archive(&state_dict_pickle(&specs), &[("0", vec![0; 4])])).unwrap();
    if common::sysmem::total_bytes().is_some() {
        let e = load_err(&d);
        assert!(e.contains("loading the model") && e.contains("needs ~") && e.contains("this machine has"), "{e}");
    }

    // A view reaching past its storage is refused before anything is read.
    let d = root.path().join("out-of-bounds");
    write_config(&d, |_| {});
    let mut specs: Vec<Spec> = Layout::new(&NeoxConfig::from_file(&d.join("config.json")).unwrap())
        .params
        .iter()
        .map(|p| (p.name.clone(), p.name.clone(), "FloatStorage", p.numel() as u64, 0, p.shape.clone(), vec![]))
        .collect();
    for s in &mut specs {
        let mut stride = vec![1usize; s.5.len()];
        for i in (0..s.5.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * s.5[i + 1];
        }
        s.6 = stride;
    }
    specs[3].4 = 1; // offset 1: the last element falls outside
    let storages: Vec<(&str, Vec<u8>)> = specs.iter().map(|s| (s.1.as_str(), vec![0u8; 4 * s.3 as usize])).collect();
    std::fs::write(d.join("pytorch_model.bin"), archive(&state_dict_pickle(&specs), &storages)).unwrap();
    let e = load_err(&d);
    assert!(e.contains(&format!("`{}`", specs[3].0)) && e.contains("does not fit in storage"), "{e}");
}

/// A hub cache repository `models--org--NAME` under `hub` whose snapshot `REV` links each of `files` (taken from
/// `src`) to `../../blobs/<n>`, as huggingface_hub lays it out. Returns the snapshot dir.
fn fake_cache(hub: &Path, name: &str, src: &Path, files: &[&str]) -> PathBuf {
    let repo = hub.join(format!("models--org--{name}"));
    let snap = repo.join("snapshots").join("0123456789abcdef0123456789abcdef01234567");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for (i, f) in files.iter().enumerate() {
        let blob = format!("{i:064x}");
        std::fs::copy(src.join(f), repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(f)).unwrap();
    }
    snap
}

#[test]
fn hub_snapshot_shards_link_into_their_own_blobs() {
    let hub = tempfile::tempdir().unwrap();
    let shards = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"];
    let files = ["config.json", "pytorch_model.bin.index.json", shards[0], shards[1]];
    let snap = fake_cache(hub.path(), "bin", &fixture("pickle/f16-sharded"), &files);
    let (_, want) = expected(|x| half::f16::from_f32(x).to_f32(), false);
    assert_eq!(bits(Model::load(&snap).unwrap().params()), bits(&want));

    // Safetensors shards the same way.
    let (cfg, want) = expected(|x| x, false);
    let src = hub.path().join("st-src");
    std::fs::create_dir_all(&src).unwrap();
    let layout = Layout::new(&cfg);
    let st = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let mut map = serde_json::Map::new();
    for (k, f) in st.iter().enumerate() {
        let part: Vec<_> = layout.params.iter().skip(k).step_by(2).collect();
        let tensors: Vec<(&str, &[usize], &[f32])> =
            part.iter().map(|p| (p.name.as_str(), p.shape.as_slice(), &want[p.range()])).collect();
        neox::weights::save_tensors(&src.join(f), &tensors, SaveDtype::F32).unwrap();
        for p in part {
            map.insert(p.name.clone(), (*f).into());
        }
    }
    let index = serde_json::json!({ "weight_map": map });
    std::fs::write(src.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::copy(fixture("pickle/f32/config.json"), src.join("config.json")).unwrap();
    let snap = fake_cache(hub.path(), "st", &src, &["config.json", "model.safetensors.index.json", st[0], st[1]]);
    assert_eq!(bits(Model::load(&snap).unwrap().params()), bits(&want));

    // A link into ANOTHER cache repository's blobs is outside.
    fake_cache(hub.path(), "other", &src, &[st[1]]);
    std::fs::remove_file(snap.join(st[1])).unwrap();
    std::os::unix::fs::symlink(format!("../../../models--org--other/blobs/{:064x}", 0), snap.join(st[1])).unwrap();
    assert!(std::fs::metadata(snap.join(st[1])).is_ok(), "the link itself resolves");
    assert!(load_err(&snap).contains("resolves outside the model directory"));

    // The same `../../blobs` links from a directory that is not under `snapshots/` are outside too.
    let repo = snap.parent().unwrap().parent().unwrap();
    let fake = repo.join("not-snapshots").join("rev");
    std::fs::create_dir_all(&fake).unwrap();
    for f in ["config.json", "model.safetensors.index.json", st[0]] {
        std::os::unix::fs::symlink(std::fs::read_link(snap.join(f)).unwrap(), fake.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(std::fs::read_link(snap.join(st[0])).unwrap(), fake.join(st[1])).unwrap();
    assert!(load_err(&fake).contains("resolves outside the model directory"));

    // Naming the blob with `..` in the index is refused by name, before resolving.
    let d = fake_cache(hub.path(), "dotdot", &src, &["config.json", st[0], st[1]]);
    let mut idx = index.clone();
    idx["weight_map"][&layout.params[0].name] = format!("../../blobs/{:064x}", 1).into();
    std::fs::write(d.join("model.safetensors.index.json"), idx.to_string()).unwrap();
    assert!(load_err(&d).contains("must be a relative path inside the model directory"));
}
