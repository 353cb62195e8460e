//! This machine's memory, for refusing work that cannot fit before allocating it: total and available bytes
//! from `/proc/meminfo` (Linux), a cgroup v2 `memory.max` limit when one is set and smaller, and a formatter
//! for "needs ~N GiB, this machine has M" messages. Elsewhere (no /proc) nothing is known and checks pass.

/// Bytes of memory this process may use at most: min(MemTotal, cgroup limit). None when unknown.
pub fn total_bytes() -> Option<u64> {
    let total = meminfo_kib("MemTotal:").map(|k| k * 1024);
    match (total, cgroup_limit()) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// Bytes available now without swapping (MemAvailable, capped by the cgroup limit). None when unknown.
pub fn available_bytes() -> Option<u64> {
    let avail = meminfo_kib("MemAvailable:").map(|k| k * 1024);
    match (avail, cgroup_limit()) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn cgroup_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
    text.trim().parse().ok()
}

/// `1.5 GiB`, `312 MiB`: a byte count for people.
pub fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let f = b as f64;
    if f >= GIB {
        format!("{:.1} GiB", f / GIB)
    } else {
        format!("{:.0} MiB", (f / MIB).max(1.0))
    }
}

/// Err("{what} needs ~N GiB, this machine has M GiB (A GiB available)") when `need` exceeds the total memory.
/// Unknown memory (no /proc) passes.
pub fn check_fits(what: &str, need: u64) -> Result<(), String> {
    match total_bytes() {
        Some(total) if need > total => Err(format!(
            "{what} needs ~{}, this machine has {}{}",
            human_bytes(need),
            human_bytes(total),
            available_bytes().map(|a| format!(" ({} available)", human_bytes(a))).unwrap_or_default()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_refuses_the_impossible() {
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(312 << 20), "312 MiB");
        if total_bytes().is_some() {
            let e = check_fits("this run", u64::MAX).unwrap_err();
            assert!(e.contains("this run needs ~") && e.contains("this machine has"), "{e}");
            assert!(check_fits("a byte", 1).is_ok());
        }
    }
}

/// This process's peak resident set size (`VmHWM` of /proc/self/status), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Zero `buf` and give its whole memory pages back to the OS (`madvise(MADV_DONTNEED)`): the resident set
/// shrinks, and the released pages read as zero until written again (the partial pages at either end are zeroed
/// by writing). For large sharded training buffers (ZeRO); `T` is a plain number type whose all-zero bytes are a
/// valid value. Elsewhere than Linux it only zeroes.
pub fn release_pages<T: Zeroable>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (a, b) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
        if b <= a {
            buf.fill(T::ZERO);
            return;
        }
        let size = std::mem::size_of::<T>();
        let (head, tail) = ((a - start) / size, (end - b) / size);
        let n = buf.len();
        buf[..head].fill(T::ZERO);
        buf[n - tail..].fill(T::ZERO);
        {
            // SAFETY: [a, b) lies inside `buf`, which we borrow mutably; it is private anonymous memory from the
            // allocator, which MADV_DONTNEED refills with zero pages on the next touch, and zero bytes are a
            // valid `T` (Zeroable). The allocator's own metadata is outside `buf`.
            let rc = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
            if rc != 0 {
                buf[head..n - tail].fill(T::ZERO);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    buf.fill(T::ZERO);
}

/// Drop the pages of `bytes`, part of a read-only file mapping, from this process's resident set once they have
/// been read (a model file streamed through a map would otherwise count in full towards the peak RSS). The
/// contents are unchanged: a later read faults them in from the file again. Only whole pages inside `bytes`
/// are dropped. Elsewhere than Linux it does nothing.
pub fn forget_mapped_pages(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = bytes.as_ptr() as usize;
        let (a, b) = (start.next_multiple_of(PAGE), (start + bytes.len()) / PAGE * PAGE);
        if b > a {
            // SAFETY: [a, b) lies inside `bytes`, which the caller says is a read-only file mapping: MADV_DONTNEED
            // only unmaps its pages, and the next access reads the same bytes from the file. No Rust value
            // changes. (The result is ignored: failing to drop pages only costs memory.)
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

/// Types whose all-zero bit pattern is a valid value (what `release_pages` may leave behind).
///
/// # Safety
/// Implement only for types for which all-zero bytes are a valid value.
pub unsafe trait Zeroable: Copy {
    const ZERO: Self;
}
// SAFETY: zero bytes are 0.0.
unsafe impl Zeroable for f32 {
    const ZERO: f32 = 0.0;
}
// SAFETY: zero bytes are 0.
unsafe impl Zeroable for u16 {
    const ZERO: u16 = 0;
}

#[cfg(test)]
mod release_tests {
    use super::release_pages;

    /// Every element reads zero afterwards, whatever the alignment of the slice's ends, and neighbours outside
    /// the slice keep their values.
    #[test]
    fn released_slices_read_zero_and_neighbours_survive() {
        let mut v: Vec<f32> = (0..100_000).map(|i| i as f32 + 1.0).collect();
        for (a, b) in [(0usize, 100_000usize), (3, 99_997), (1000, 1003), (5000, 70_001)] {
            for (i, x) in v.iter_mut().enumerate() {
                *x = i as f32 + 1.0;
            }
            release_pages(&mut v[a..b]);
            assert!(v[a..b].iter().all(|&x| x == 0.0), "{a}..{b}");
            assert!(v[..a].iter().enumerate().all(|(i, &x)| x == i as f32 + 1.0), "{a}..{b}");
            assert!(v[b..].iter().enumerate().all(|(i, &x)| x == (b + i) as f32 + 1.0), "{a}..{b}");
        }
    }
}
