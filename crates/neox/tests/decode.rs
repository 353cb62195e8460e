//! KV-cache decoding against the full forward: prefill + one-token steps must give, at every position, the
//! logits the training forward gives for the same prefix; a left-padded row must equal the same row alone.

mod common;
use common::*;
use neox::{Activations, OwnedBatch};

#[test]
fn kv_cache_equals_full_forward_at_every_position() {
    for parallel in [true, false] {
        let m = perturbed_model(tiny_config(parallel, 40), 21);
        let v = 40;
        let mut r = ::common::Rng::new(4);
        // 37 tokens in a cache of 37 slots: three key blocks of 16, the last one partly used
        let ids: Vec<u32> = (0..37).map(|_| r.below(v as u64) as u32).collect();
        let full = OwnedBatch::dense(1, ids.len(), ids.clone(), vec![-100; ids.len()]);
        let mut acts = Activations::new(&m.config, 1, ids.len(), false);
        let logits = m.forward_logits(&full.view(), &mut acts).unwrap();
        let mut cache = m.new_kv_cache(1, 37);
        let mut out = vec![0f32; v];
        let prefill = 5;
        m.forward_cached(&ids[..prefill], &[1; 5], &mut cache, &mut out).unwrap();
        assert_close("prefill", &out, &logits[(prefill - 1) * v..prefill * v], 1e-5, 1e-4);
        for t in prefill..ids.len() {
            m.forward_cached(&ids[t..t + 1], &[1], &mut cache, &mut out).unwrap();
            assert_close(&format!("pos {t}"), &out, &logits[t * v..(t + 1) * v], 1e-5, 1e-4);
        }
    }
}

#[test]
fn left_padded_row_equals_row_alone() {
    let m = perturbed_model(tiny_config(true, 40), 22);
    let v = 40;
    let long: Vec<u32> = vec![5, 9, 13, 2, 7, 30, 31];
    let short: Vec<u32> = vec![8, 3, 17, 4];
    let pad = long.len() - short.len();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    ids.extend(std::iter::repeat_n(0, pad).chain(short.iter().copied()));
    mask.extend(std::iter::repeat_n(0u8, pad).chain(std::iter::repeat_n(1, short.len())));
    ids.extend(&long);
    mask.extend(std::iter::repeat_n(1u8, long.len()));
    let mut cache = m.new_kv_cache(2, 16);
    let mut out = vec![0f32; 2 * v];
    m.forward_cached(&ids, &mask, &mut cache, &mut out).unwrap();
    let mut alone = m.new_kv_cache(1, 16);
    let mut out1 = vec![0f32; v];
    m.forward_cached(&short, &[1; 4], &mut alone, &mut out1).unwrap();
    assert_close("prefill row 0", &out[..v], &out1, 1e-5, 1e-4);
    for step in [11u32, 23, 6] {
        m.forward_cached(&[step, step + 1], &[1, 1], &mut cache, &mut out).unwrap();
        m.forward_cached(&[step], &[1], &mut alone, &mut out1).unwrap();
        assert_close("decode row 0", &out[..v], &out1, 1e-5, 1e-4);
    }
    assert_eq!(cache.real_len(0), short.len() + 3);
    let e = m.forward_cached(&[1; 2 * 20], &[1; 40], &mut cache, &mut out).unwrap_err().to_string();
    assert!(e.contains("KV cache full"), "{e}");
}

#[test]
fn reset_row_starts_a_fresh_sequence_in_a_running_batch() {
    let m = perturbed_model(tiny_config(false, 40), 23);
    let v = 40;
    let mut cache = m.new_kv_cache(2, 32);
    let mut out = vec![0f32; 2 * v];
    m.forward_cached(&[3, 4, 5, 6, 7, 8], &[1; 6], &mut cache, &mut out).unwrap();
    m.forward_cached(&[9, 10], &[1, 1], &mut cache, &mut out).unwrap();
    cache.reset_row(0);
    let fresh: Vec<u32> = vec![12, 13, 14, 15];
    let mut alone = m.new_kv_cache(1, 32);
    let mut out1 = vec![0f32; v];
    for (i, &tok) in fresh.iter().enumerate() {
        m.forward_cached(&[tok, 20 + i as u32], &[1, 1], &mut cache, &mut out).unwrap();
        m.forward_cached(&[tok], &[1], &mut alone, &mut out1).unwrap();
        assert_close(&format!("reset row step {i}"), &out[..v], &out1, 1e-5, 1e-4);
    }
    assert_eq!(cache.real_len(0), fresh.len());
    assert_eq!(cache.real_len(1), 3 + 1 + fresh.len());
}

#[test]
fn bf16_decode_stays_close_to_f32() {
    let mut m = perturbed_model(tiny_config(true, 40), 24);
    let v = 40;
    let ids: Vec<u32> = vec![5, 9, 13, 2, 7];
    let run = |m: &neox::Model| {
        let mut cache = m.new_kv_cache(1, 16);
        let mut out = vec![0f32; v];
        m.forward_cached(&ids[..2], &[1, 1], &mut cache, &mut out).unwrap();
        let mut all = out.clone();
        for &t in &ids[2..] {
            m.forward_cached(&[t], &[1], &mut cache, &mut out).unwrap();
            all.extend_from_slice(&out);
        }
        all
    };
    let f32_logits = run(&m);
    m.set_decode_bf16(true);
    let bf16_logits = run(&m);
    let scale = f32_logits.iter().fold(0f32, |a, &b| a.max(b.abs()));
    let worst = f32_logits.iter().zip(&bf16_logits).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    // bf16 keeps 8 mantissa bits: weights off by <= 2^-9 relative; logits here move by well under 5% of their range.
    assert!(worst > 0.0, "bf16 path not taken");
    assert!(worst < 0.05 * scale, "bf16 logits differ by {worst} (scale {scale})");
    m.set_decode_bf16(false);
    assert_eq!(run(&m), f32_logits);
}

/// Every row has its own slots: padding and other rows' prompts use none, a full row is an error naming it (and
/// changes nothing), the other row goes on, and a reset row starts again at slot 0.
#[test]
fn each_row_has_its_own_slots() {
    let m = perturbed_model(tiny_config(true, 40), 25);
    let v = 40;
    let mut cache = m.new_kv_cache(2, 4);
    let mut out = vec![0f32; 2 * v];
    // row 0: a 4-token prompt fills it; row 1: 1 real token behind 3 padding slots
    m.forward_cached(&[1, 2, 3, 4, 0, 0, 0, 5], &[1, 1, 1, 1, 0, 0, 0, 1], &mut cache, &mut out).unwrap();
    assert_eq!((cache.real_len(0), cache.real_len(1)), (4, 1));
    assert_eq!((cache.free_slots(0), cache.free_slots(1)), (0, 3));
    let e = m.forward_cached(&[6, 7], &[1, 1], &mut cache, &mut out).unwrap_err().to_string();
    assert!(e.contains("row 0") && e.contains("capacity 4"), "{e}");
    assert_eq!((cache.real_len(0), cache.real_len(1)), (4, 1), "a refused call must not change the cache");
    // row 1 alone goes on for 3 more tokens; its logits equal the same sequence decoded in a fresh cache
    for t in [6, 7, 8] {
        m.forward_cached(&[0, t], &[0, 1], &mut cache, &mut out).unwrap();
    }
    let mut alone = m.new_kv_cache(1, 4);
    let mut want = vec![0f32; v];
    m.forward_cached(&[5, 6, 7, 8], &[1, 1, 1, 1], &mut alone, &mut want).unwrap();
    assert_eq!(&out[v..], &want[..]);
    // a reset row is a fresh sequence from slot 0
    cache.reset_row(0);
    m.forward_cached(&[5, 6, 7, 8, 0, 0, 0, 0], &[1, 1, 1, 1, 0, 0, 0, 0], &mut cache, &mut out).unwrap();
    assert_eq!(&out[..v], &want[..]);
}
