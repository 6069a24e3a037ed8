//! POSIX ACLs as Linux stores them (`system.posix_acl_access` / `_default` values) and the
//! mode arithmetic a filesystem owes the kernel when it offers FUSE_POSIX_ACL: the kernel
//! enforces ACLs, but leaves to the filesystem what a local one does in its own code —
//! keeping mode bits and the access ACL in step on setxattr and chmod, and inheriting a
//! directory's default ACL on create. The rules are the kernel's (`fs/posix_acl.c`:
//! `posix_acl_equiv_mode`, `posix_acl_create_masq`, `__posix_acl_chmod`), so a file ends up
//! with the same mode and ACL as on ext4.
//!
//! Value format (`include/uapi/linux/posix_acl_xattr.h`): `u32 version = 2`, then entries of
//! `u16 tag, u16 perm, u32 id`, all little-endian, sorted by tag then id.

/// Name of the access ACL attribute.
pub const ACCESS: &str = "system.posix_acl_access";
/// Name of the default ACL attribute (directories).
pub const DEFAULT: &str = "system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// One ACL entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Entry type (`ACL_USER_OBJ` ...).
    pub tag: u16,
    /// `rwx` bits (0..=7).
    pub perm: u16,
    /// Uid or gid for named entries; `u32::MAX` otherwise.
    pub id: u32,
}

/// A value that is not a POSIX ACL.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid;

/// Parses an xattr value into entries (checks the version and entry tags).
pub fn parse(v: &[u8]) -> Result<Vec<Entry>, Invalid> {
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) {
        return Err(Invalid);
    }
    if u32::from_le_bytes([v[0], v[1], v[2], v[3]]) != VERSION {
        return Err(Invalid);
    }
    v[4..]
        .chunks_exact(8)
        .map(|c| {
            let e = Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            };
            match e.tag {
                USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER if e.perm <= 7 => Ok(e),
                _ => Err(Invalid),
            }
        })
        .collect()
}

/// Encodes entries as an xattr value.
pub fn serialize(acl: &[Entry]) -> Vec<u8> {
    let mut out = VERSION.to_le_bytes().to_vec();
    for e in acl {
        out.extend(e.tag.to_le_bytes());
        out.extend(e.perm.to_le_bytes());
        out.extend(e.id.to_le_bytes());
    }
    out
}

/// The permission bits (`0o777`) an ACL implies, and whether it says more than a mode can
/// (named entries or a mask): `posix_acl_equiv_mode`.
pub fn equiv_mode(acl: &[Entry]) -> (u32, bool) {
    let mut mode = 0u32;
    let mut not_equiv = false;
    for e in acl {
        let p = (e.perm & 7) as u32;
        match e.tag {
            USER_OBJ => mode |= p << 6,
            GROUP_OBJ => mode |= p << 3,
            OTHER => mode |= p,
            MASK => {
                mode = (mode & !0o070) | (p << 3);
                not_equiv = true;
            }
            _ => not_equiv = true,
        }
    }
    (mode, not_equiv)
}

/// Applies the requested `mode` of a new entry to an inherited default ACL (in place):
/// returns the resulting mode (special bits kept) and whether the ACL must be stored
/// (`posix_acl_create_masq`). `None`: the ACL lacks a group entry (invalid).
pub fn create_masq(acl: &mut [Entry], mode: u32) -> Option<(u32, bool)> {
    let mut m = mode & 0o777;
    let mut not_equiv = false;
    let (mut group_obj, mut mask_obj) = (None, None);
    for (i, e) in acl.iter_mut().enumerate() {
        let p = e.perm as u32;
        match e.tag {
            USER_OBJ => {
                let np = p & ((m >> 6) | !0o7);
                e.perm = np as u16;
                m &= (np << 6) | !0o700;
            }
            USER | GROUP => not_equiv = true,
            GROUP_OBJ => group_obj = Some(i),
            OTHER => {
                let np = p & (m | !0o7);
                e.perm = np as u16;
                m &= np | !0o7;
            }
            MASK => {
                mask_obj = Some(i);
                not_equiv = true;
            }
            _ => return None,
        }
    }
    let g = mask_obj.or(group_obj)?;
    let np = acl[g].perm as u32 & ((m >> 3) | !0o7);
    acl[g].perm = np as u16;
    m &= (np << 3) | !0o070;
    Some(((mode & !0o777) | (m & 0o777), not_equiv))
}

/// Makes the ACL follow a chmod to `mode` (in place): owner, mask (or group) and other
/// entries take the new bits, named entries stay (`__posix_acl_chmod`).
pub fn chmod(acl: &mut [Entry], mode: u32) -> Result<(), Invalid> {
    let (mut group_obj, mut mask_obj) = (None, None);
    for (i, e) in acl.iter_mut().enumerate() {
        match e.tag {
            USER_OBJ => e.perm = ((mode >> 6) & 7) as u16,
            USER | GROUP => {}
            GROUP_OBJ => group_obj = Some(i),
            MASK => mask_obj = Some(i),
            OTHER => e.perm = (mode & 7) as u16,
            _ => return Err(Invalid),
        }
    }
    let g = mask_obj.or(group_obj).ok_or(Invalid)?;
    acl[g].perm = ((mode >> 3) & 7) as u16;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(tag: u16, perm: u16, id: u32) -> Entry {
        Entry { tag, perm, id }
    }
    const U: u32 = u32::MAX;

    #[test]
    fn round_trip_and_equivalence() {
        let minimal = vec![e(USER_OBJ, 6, U), e(GROUP_OBJ, 4, U), e(OTHER, 0, U)];
        assert_eq!(parse(&serialize(&minimal)).unwrap(), minimal);
        assert_eq!(equiv_mode(&minimal), (0o640, false));
        let named = vec![
            e(USER_OBJ, 7, U),
            e(USER, 7, 65534),
            e(GROUP_OBJ, 5, U),
            e(MASK, 7, U),
            e(OTHER, 1, U),
        ];
        // With a mask, the group bits are the mask's.
        assert_eq!(equiv_mode(&named), (0o771, true));
        assert_eq!(parse(b"\x02\0\0\0\x01"), Err(Invalid));
        assert_eq!(parse(b"\x01\0\0\0"), Err(Invalid));
    }

    #[test]
    fn create_masks_the_inherited_acl_like_the_kernel() {
        // default ACL: u::rwx u:65534:rwx g::r-x m::rwx o::r-x; create(0644)
        let mut acl = vec![
            e(USER_OBJ, 7, U),
            e(USER, 7, 65534),
            e(GROUP_OBJ, 5, U),
            e(MASK, 7, U),
            e(OTHER, 5, U),
        ];
        let (mode, store) = create_masq(&mut acl, libc::S_IFREG | 0o644).unwrap();
        assert_eq!(mode, libc::S_IFREG | 0o644);
        assert!(store);
        assert_eq!(acl[0].perm, 6);
        assert_eq!(acl[3].perm, 4, "mask takes the group bits of the mode");
        assert_eq!(acl[4].perm, 4);
        // A minimal default ACL makes the mode the intersection, and nothing to store.
        let mut min = vec![e(USER_OBJ, 7, U), e(GROUP_OBJ, 0, U), e(OTHER, 0, U)];
        assert_eq!(create_masq(&mut min, 0o4777), Some((0o4700, false)));
    }

    #[test]
    fn chmod_rewrites_owner_mask_and_other() {
        let mut acl = vec![
            e(USER_OBJ, 7, U),
            e(USER, 7, 65534),
            e(GROUP_OBJ, 5, U),
            e(MASK, 7, U),
            e(OTHER, 5, U),
        ];
        chmod(&mut acl, 0o640).unwrap();
        assert_eq!(
            acl.iter().map(|e| e.perm).collect::<Vec<_>>(),
            vec![6, 7, 5, 4, 0]
        );
    }
}
