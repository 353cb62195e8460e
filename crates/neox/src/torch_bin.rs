//! `pytorch_model.bin` as `torch.save` (>= 1.6) writes it: a zip archive `PREFIX/data.pkl` (the state dict's
//! pickle, read by the non-executing `pickle` module) + `PREFIX/data/KEY` (one raw little-endian storage per
//! key) + `PREFIX/byteorder`. Entries are stored uncompressed, so every storage is a byte range of the
//! memory-mapped file and tensors convert from there straight into the caller's buffer (no second copy).
//! Everything is checked before any weight is read: each storage entry's size against its numel, each tensor's
//! view (offset, size, stride) against its storage. The legacy (pre-1.6, non-zip) format is refused.

use crate::error::{Error, Result};
use crate::pickle::{self, StorageDtype, TensorRef};
use crate::weights::{convert, Elem};
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::ops::Range;
use std::path::Path;

/// Largest `data.pkl` accepted: a state dict's pickle is a few hundred bytes per tensor.
const MAX_PICKLE: u64 = 256 << 20;

/// The tensors of one archive, validated against its storages.
pub struct TorchArchive {
    pub tensors: Vec<(String, TensorRef)>,
    /// Storage key -> byte range of its data in the file.
    storages: HashMap<String, Range<usize>>,
}

impl Elem {
    fn from_storage(d: StorageDtype) -> std::result::Result<Elem, String> {
        match d {
            StorageDtype::F32 => Ok(Elem::F32),
            StorageDtype::F16 => Ok(Elem::F16),
            StorageDtype::Bf16 => Ok(Elem::Bf16),
            other => Err(format!("dtype {} is not supported (need float32, float16 or bfloat16)", other.torch_name())),
        }
    }
}

/// The element type a tensor would load as, or why it cannot.
pub fn elem_of(t: &TensorRef) -> std::result::Result<Elem, String> {
    Elem::from_storage(t.storage.dtype)
}

/// Byte range of a stored (uncompressed) entry inside `bytes`.
fn entry_range(path: &Path, zip: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str, len: usize) -> Result<Range<usize>> {
    let f = zip.by_name_raw(name.as_bytes()).map_err(|e| Error::file(path, format!("zip entry `{name}`: {e}")))?;
    if f.compression() != zip::CompressionMethod::Stored {
        return Err(Error::file(
            path,
            format!("zip entry `{name}` is compressed ({}); torch.save stores entries uncompressed", f.compression()),
        ));
    }
    let start = f.data_start().ok_or_else(|| Error::file(path, format!("zip entry `{name}`: no data offset")))?;
    let end = start.checked_add(f.size()).filter(|&e| e <= len as u64);
    match end {
        Some(end) => Ok(start as usize..end as usize),
        None => Err(Error::file(path, format!("zip entry `{name}` runs past the end of the file (truncated?)"))),
    }
}

impl TorchArchive {
    /// Parse and validate the archive in `bytes` (the whole file).
    pub fn open(path: &Path, bytes: &[u8]) -> Result<Self> {
        if !bytes.starts_with(b"PK\x03\x04") {
            let msg = if bytes.first() == Some(&0x80) {
                "a legacy (pre-1.6, non-zip) torch.save pickle, which is not read: re-save it with a current torch, \
                 or convert it to safetensors"
            } else {
                "not a torch.save zip archive"
            };
            return Err(Error::file(path, msg));
        }
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
            .map_err(|e| Error::file(path, format!("not a valid zip archive (truncated or corrupt?): {e}")))?;
        let pkls: Vec<String> = zip
            .file_names()
            .filter_map(|n| n.ok())
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .map(|n| n.to_string())
            .collect();
        let [pkl] = pkls.as_slice() else {
            return Err(Error::file(path, format!("expected one PREFIX/data.pkl entry, found {}", pkls.len())));
        };
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let order_name = format!("{prefix}byteorder");
        if zip.index_for_name(&order_name).is_some() {
            let f = zip.by_name(&order_name).map_err(|e| Error::file(path, format!("`{order_name}`: {e}")))?;
            let mut order = String::new();
            f.take(16).read_to_string(&mut order).map_err(|e| Error::file(path, format!("`{order_name}`: {e}")))?;
            if order.trim() != "little" {
                return Err(Error::file(path, format!("byte order `{}` (only little-endian is read)", order.trim())));
            }
        }
        let r = entry_range(path, &mut zip, pkl, bytes.len())?;
        if r.len() as u64 > MAX_PICKLE {
            return Err(Error::file(path, format!("`{pkl}` is {} bytes, more than a state dict needs", r.len())));
        }
        let sd = pickle::read_state_dict(&bytes[r]).map_err(|m| Error::file(path, format!("`{pkl}`: {m}")))?;
        let mut storages: HashMap<String, Range<usize>> = HashMap::new();
        let mut kinds: HashMap<String, (StorageDtype, u64)> = HashMap::new();
        for (name, t) in &sd.tensors {
            let s = &t.storage;
            match kinds.get(&s.key) {
                Some(&(d, n)) if (d, n) != (s.dtype, s.numel) => {
                    return Err(Error::tensor(
                        path,
                        name,
                        format!(
                            "storage `{}` is recorded both as {} x{n} and {} x{}",
                            s.key,
                            d.torch_name(),
                            s.dtype.torch_name(),
                            s.numel
                        ),
                    ))
                }
                Some(_) => {}
                None => {
                    let entry = format!("{prefix}data/{}", s.key);
                    let r = entry_range(path, &mut zip, &entry, bytes.len())?;
                    let want = s.numel.checked_mul(s.dtype.size() as u64);
                    if want != Some(r.len() as u64) {
                        return Err(Error::tensor(
                            path,
                            name,
                            format!(
                                "storage `{}` holds {} bytes, its record says {} x {} elements ({} bytes each)",
                                s.key,
                                r.len(),
                                s.dtype.torch_name(),
                                s.numel,
                                s.dtype.size()
                            ),
                        ));
                    }
                    kinds.insert(s.key.clone(), (s.dtype, s.numel));
                    storages.insert(s.key.clone(), r);
                }
            }
            check_view(t).map_err(|m| Error::tensor(path, name, m))?;
        }
        Ok(TorchArchive { tensors: sd.tensors, storages })
    }

    /// Convert tensor `t` (named `name`, from this archive) into `out`, which holds exactly its elements.
    pub fn read_into(&self, path: &Path, bytes: &[u8], name: &str, t: &TensorRef, out: &mut [f32]) -> Result<()> {
        let elem = elem_of(t).map_err(|m| Error::tensor(path, name, m))?;
        let es = t.storage.dtype.size();
        let range = self
            .storages
            .get(&t.storage.key)
            .ok_or_else(|| Error::tensor(path, name, format!("storage `{}` not found", t.storage.key)))?;
        let storage = &bytes[range.clone()];
        let numel: usize = t.size.iter().product();
        if out.len() != numel {
            return Err(Error::tensor(path, name, format!("{numel} elements, the buffer holds {}", out.len())));
        }
        if numel == 0 {
            return Ok(());
        }
        let off = t.offset as usize;
        if is_contiguous(&t.size, &t.stride) {
            return convert(path, name, elem, &storage[off * es..(off + numel) * es], out);
        }
        // A strided view: gather element by element in row-major order of `size`.
        let mut idx = vec![0usize; t.size.len()];
        for o in out.iter_mut() {
            let at = off + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            convert(path, name, elem, &storage[at * es..(at + 1) * es], std::slice::from_mut(o))?;
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(())
    }
}

/// Row-major contiguous (dims of size 1 may have any stride).
fn is_contiguous(size: &[usize], stride: &[usize]) -> bool {
    let mut want = 1usize;
    for (&n, &s) in size.iter().zip(stride).rev() {
        if n != 1 && s != want {
            return false;
        }
        want = want.saturating_mul(n);
    }
    true
}

/// The view stays inside its storage: offset + sum((size_i - 1) * stride_i) < numel, without overflow.
fn check_view(t: &TensorRef) -> std::result::Result<(), String> {
    let bad = || {
        format!(
            "view (offset {}, size {:?}, stride {:?}) does not fit in storage `{}` of {} elements",
            t.offset, t.size, t.stride, t.storage.key, t.storage.numel
        )
    };
    let numel = t.size.iter().try_fold(1u64, |a, &n| a.checked_mul(n as u64)).ok_or_else(bad)?;
    if numel == 0 {
        return Ok(());
    }
    let mut last = t.offset;
    for (&n, &s) in t.size.iter().zip(&t.stride) {
        let step = (n as u64 - 1).checked_mul(s as u64).ok_or_else(bad)?;
        last = last.checked_add(step).ok_or_else(bad)?;
    }
    if last >= t.storage.numel {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle::StorageRef;

    fn view(offset: u64, size: Vec<usize>, stride: Vec<usize>, numel: u64) -> TensorRef {
        TensorRef { storage: StorageRef { key: "0".into(), dtype: StorageDtype::F32, numel }, offset, size, stride }
    }

    #[test]
    fn views_are_bounded_and_contiguity_is_exact() {
        assert!(check_view(&view(0, vec![2, 3], vec![3, 1], 6)).is_ok());
        assert!(check_view(&view(1, vec![2, 3], vec![3, 1], 6)).is_err());
        assert!(check_view(&view(0, vec![3, 2], vec![1, 3], 6)).is_ok());
        assert!(check_view(&view(5, vec![0, 9], vec![9, 1], 1)).is_ok());
        assert!(check_view(&view(u64::MAX, vec![2], vec![1], 10)).is_err());
        assert!(check_view(&view(0, vec![usize::MAX, 2], vec![usize::MAX, 1], 10)).is_err());
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(is_contiguous(&[], &[]));
    }
}
