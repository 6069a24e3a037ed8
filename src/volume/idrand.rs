//! Random bytes for identifiers that are stored in the clear and only need to be unique:
//! file ids (file headers), directory ids, temporary names. They are taken from the kernel
//! 4 KiB at a time, one `getrandom` per ~250 new files instead of one per file; bytes handed
//! out are wiped from the pool, so no two callers ever get the same ones. Secrets and the
//! nonces of sealed values keep asking the kernel directly.

use std::sync::Mutex;

const POOL: usize = 4096;

struct Pool {
    buf: [u8; POOL],
    used: usize,
}

static POOL_BYTES: Mutex<Pool> = Mutex::new(Pool {
    buf: [0; POOL],
    used: POOL,
});

/// Fills `out` with random bytes (at most 256 from the pool; larger requests go to the
/// kernel). Errors: the kernel's `getrandom` failed.
pub fn fill(out: &mut [u8]) -> Result<(), getrandom::Error> {
    if out.len() > 256 {
        return getrandom::getrandom(out);
    }
    let mut p = POOL_BYTES.lock().unwrap_or_else(|e| e.into_inner());
    if POOL - p.used < out.len() {
        getrandom::getrandom(&mut p.buf)?;
        p.used = 0;
    }
    let (start, end) = (p.used, p.used + out.len());
    out.copy_from_slice(&p.buf[start..end]);
    p.buf[start..end].fill(0);
    p.used = end;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_the_pool_are_all_different_across_refills() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 * POOL / 16 {
            let mut id = [0u8; 16];
            fill(&mut id).unwrap();
            assert!(seen.insert(id), "an id came out twice");
        }
        let mut odd = [0u8; 7];
        fill(&mut odd).unwrap();
        let mut big = [0u8; 300];
        fill(&mut big).unwrap();
        assert!(big.iter().any(|&b| b != 0));
    }
}
