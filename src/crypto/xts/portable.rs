//! Portable XTS on the `aes` crate: tweaks for a batch of blocks are computed first, XORed in,
//! the batch goes through `encrypt_blocks`/`decrypt_blocks` (which pipelines AES-NI or
//! bitsliced AES over many blocks), and the tweaks are XORed out again.

use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes256, Aes256Enc, Block};

use super::{mul_alpha, BlockOps, BLOCK};
use crate::crypto::secret::{Plain, Secret};

/// Blocks per batch: enough to keep the `aes` crate's 8-block pipeline full, small enough to
/// stay on the stack (32 × 16 bytes of data plus 32 tweaks).
const BATCH: usize = 32;

/// K1 (both directions) and K2 (encryption only: the tweak is always encrypted). The `aes`
/// crate's `zeroize` feature wipes both schedules on drop.
pub(super) struct Keys {
    k1: Aes256,
    k2: Aes256Enc,
}

// SAFETY: the `aes` crate's key schedules are arrays of round keys (and a zero-sized CPU
// feature token): no pointers, and all-zero bytes are a valid value.
unsafe impl Plain for Keys {}

impl Keys {
    /// The schedules, moved into secret pages. The `aes` crate builds them by value, so a
    /// copy passes through this thread's stack: the caller scrubs it (`VolumeKeys`
    /// construction does).
    pub(super) fn new(k1: &[u8; 32], k2: &[u8; 32]) -> Secret<Keys> {
        Secret::new(Keys {
            k1: Aes256::new(GenericArray::from_slice(k1)),
            k2: Aes256Enc::new(GenericArray::from_slice(k2)),
        })
    }

    /// Runs XTS over `data` in batches with `op` as the raw block operation.
    #[inline(always)]
    fn run(&self, mut t: u128, data: &mut [u8], op: impl Fn(&mut [Block])) -> u128 {
        let mut blocks = [Block::default(); BATCH];
        let mut tweaks = [0u128; BATCH];
        let whole = data.len() / BLOCK * BLOCK;
        for chunk in data[..whole].chunks_mut(BATCH * BLOCK) {
            let n = chunk.len() / BLOCK;
            for ((src, blk), tw) in chunk
                .chunks_exact(BLOCK)
                .zip(blocks.iter_mut())
                .zip(tweaks.iter_mut())
            {
                *tw = t;
                t = mul_alpha(t);
                let x = u128::from_le_bytes(src.try_into().unwrap()) ^ *tw;
                blk.copy_from_slice(&x.to_le_bytes());
            }
            op(&mut blocks[..n]);
            for ((dst, blk), tw) in chunk
                .chunks_exact_mut(BLOCK)
                .zip(blocks.iter())
                .zip(tweaks.iter())
            {
                let x = u128::from_le_bytes((*blk).into()) ^ *tw;
                dst.copy_from_slice(&x.to_le_bytes());
            }
        }
        t
    }
}

impl BlockOps for Keys {
    fn tweak(&self, tweak: u128) -> u128 {
        let mut b = Block::from(tweak.to_le_bytes());
        self.k2.encrypt_block(&mut b);
        u128::from_le_bytes(b.into())
    }

    fn encrypt_blocks(&self, tweak: u128, data: &mut [u8]) -> u128 {
        self.run(self.tweak(tweak), data, |b| self.k1.encrypt_blocks(b))
    }

    fn decrypt_blocks(&self, tweak: u128, data: &mut [u8]) -> u128 {
        self.run(self.tweak(tweak), data, |b| self.k1.decrypt_blocks(b))
    }

    fn encrypt_block(&self, block: &mut [u8; BLOCK]) {
        self.k1.encrypt_block(GenericArray::from_mut_slice(block));
    }

    fn decrypt_block(&self, block: &mut [u8; BLOCK]) {
        self.k1.decrypt_block(GenericArray::from_mut_slice(block));
    }
}
