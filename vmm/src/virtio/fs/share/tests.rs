//! The confinement and policy rules on a temporary directory, without KVM.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rustix::io::Errno;

use super::*;
use crate::virtio::fs::abi::{fattr, SetattrIn, ROOT_ID};

pub(crate) fn policy(read_only: bool) -> Policy {
    Policy {
        read_only,
        xattrs: XattrPolicy {
            privileged_writes: false,
        },
        ids: IdMap::Identity,
    }
}

const ROOT: Caller = Caller { uid: 0, gid: 0 };

fn cstr(s: &str) -> CString {
    CString::new(s).expect("name")
}

/// A share over `<tmp>/share`, with `<tmp>/outside` beside it.
fn setup(read_only: bool) -> (tempfile::TempDir, Share) {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(tmp.path().join("share")).expect("share");
    std::fs::write(tmp.path().join("outside"), b"secret").expect("outside");
    std::fs::write(tmp.path().join("share/file"), b"hello").expect("file");
    let share = Share::new(&tmp.path().join("share"), policy(read_only)).expect("share");
    (tmp, share)
}

fn read_all(share: &mut Share, node: u64) -> Vec<u8> {
    let fh = share.open(node, 0).expect("open").fh;
    let mut out = Vec::new();
    share.read(fh, 0, 4096, &mut out).expect("read");
    share.release(fh);
    out
}

#[test]
fn lookups_stay_inside_the_share() {
    let (_tmp, mut share) = setup(false);
    for name in ["..", ".", "../outside", "/etc", "a/b"] {
        assert_eq!(
            share.lookup(ROOT_ID, &cstr(name)).err(),
            Some(Errno::INVAL),
            "{name}"
        );
    }
    let file = share.lookup(ROOT_ID, &cstr("file")).expect("file");
    assert_eq!(read_all(&mut share, file.nodeid), b"hello");
    // A node id the guest never got is no file.
    assert_eq!(share.getattr(999).err(), Some(Errno::NOENT));
}

#[test]
fn symlinks_are_returned_never_followed() {
    let (tmp, mut share) = setup(false);
    std::os::unix::fs::symlink("/", tmp.path().join("share/root")).expect("symlink");
    std::os::unix::fs::symlink("../outside", tmp.path().join("share/up")).expect("symlink");
    let root = share.lookup(ROOT_ID, &cstr("root")).expect("lookup");
    assert_eq!(root.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(share.readlink(root.nodeid).expect("readlink"), b"/");
    // Opening or listing through it is refused: the guest resolves it in its own root.
    assert!(share.open(root.nodeid, 0).is_err());
    assert!(share.opendir(root.nodeid).is_err());
    assert_eq!(
        share.lookup(root.nodeid, &cstr("etc")).err(),
        Some(Errno::NOTDIR)
    );
    let up = share.lookup(ROOT_ID, &cstr("up")).expect("lookup");
    assert!(share.open(up.nodeid, 0).is_err());
}

#[test]
fn hard_links_only_name_inodes_already_in_the_share() {
    let (tmp, mut share) = setup(false);
    // A hard link the host made is part of the share, the path outside is not.
    std::fs::hard_link(tmp.path().join("outside"), tmp.path().join("share/linked")).expect("link");
    let linked = share.lookup(ROOT_ID, &cstr("linked")).expect("lookup");
    assert_eq!(read_all(&mut share, linked.nodeid), b"secret");
    // The guest links what it has a node for, under a single name.
    let file = share.lookup(ROOT_ID, &cstr("file")).expect("file");
    assert_eq!(
        share.link(file.nodeid, ROOT_ID, &cstr("../escape")).err(),
        Some(Errno::INVAL)
    );
    let copy = share
        .link(file.nodeid, ROOT_ID, &cstr("again"))
        .expect("link");
    assert_eq!(copy.nodeid, file.nodeid, "one node per host inode");
    assert!(!tmp.path().join("escape").exists());
}

#[test]
fn read_only_shares_refuse_every_change() {
    let (tmp, mut share) = setup(true);
    let file = share.lookup(ROOT_ID, &cstr("file")).expect("file");
    let rofs = Some(Errno::ROFS);
    assert_eq!(share.open(file.nodeid, libc::O_WRONLY as u32).err(), rofs);
    assert_eq!(
        share
            .open(file.nodeid, libc::O_RDONLY as u32 | libc::O_TRUNC as u32)
            .err(),
        rofs
    );
    assert_eq!(share.mkdir(ROOT_ID, &cstr("d"), 0o755, ROOT).err(), rofs);
    assert_eq!(
        share.create(ROOT_ID, &cstr("n"), 0, 0o644, ROOT).err(),
        rofs
    );
    assert_eq!(share.remove(ROOT_ID, &cstr("file"), false).err(), rofs);
    assert_eq!(
        share
            .rename(ROOT_ID, &cstr("file"), ROOT_ID, &cstr("x"), 0)
            .err(),
        rofs
    );
    assert_eq!(
        share.setxattr(file.nodeid, &cstr("user.a"), b"1", 0).err(),
        rofs
    );
    let set = SetattrIn {
        valid: fattr::SIZE,
        ..Default::default()
    };
    assert_eq!(share.setattr(file.nodeid, &set, ROOT).err(), rofs);
    // Reading is fine, and the host is untouched.
    assert_eq!(read_all(&mut share, file.nodeid), b"hello");
    assert_eq!(
        std::fs::read(tmp.path().join("share/file")).expect("read"),
        b"hello"
    );
}

#[test]
fn files_created_get_the_requesters_ids_and_no_setid_bits() {
    if !rustix::process::geteuid().is_root() {
        return; // chown to another user needs root; the rootless map is tested in names.
    }
    let (tmp, mut share) = setup(false);
    let caller = Caller {
        uid: 1234,
        gid: 5678,
    };
    let (entry, open) = share
        .create(ROOT_ID, &cstr("new"), libc::O_RDWR as u32, 0o6755, caller)
        .expect("create");
    assert_eq!(share.write(open.fh, 0, b"data", caller).expect("write"), 4);
    let meta = std::fs::metadata(tmp.path().join("share/new")).expect("meta");
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    assert_eq!((entry.attr.uid, entry.attr.gid), (1234, 5678));
    let chmod = SetattrIn {
        valid: fattr::MODE,
        mode: 0o4755,
        ..Default::default()
    };
    assert_eq!(
        share.setattr(entry.nodeid, &chmod, caller).err(),
        Some(Errno::PERM)
    );
}

#[test]
fn writes_by_others_clear_setuid() {
    let (tmp, mut share) = setup(false);
    let path = tmp.path().join("share/file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
    let owner = std::fs::metadata(&path).expect("meta").uid();
    let file = share.lookup(ROOT_ID, &cstr("file")).expect("file");
    let fh = share
        .open(file.nodeid, libc::O_WRONLY as u32)
        .expect("open")
        .fh;
    let other = Caller {
        uid: owner.wrapping_add(1),
        gid: 0,
    };
    share.write(fh, 0, b"x", other).expect("write");
    assert_eq!(
        std::fs::metadata(&path).expect("meta").permissions().mode() & 0o7777,
        0o755
    );
}

#[test]
fn no_device_nodes_whiteouts_or_privileged_xattrs() {
    let (tmp, mut share) = setup(false);
    let chr = libc::S_IFCHR | 0o666;
    assert_eq!(
        share.mknod(ROOT_ID, &cstr("null"), chr, ROOT).err(),
        Some(Errno::PERM)
    );
    let whiteout = 4; // RENAME_WHITEOUT
    assert_eq!(
        share
            .rename(ROOT_ID, &cstr("file"), ROOT_ID, &cstr("x"), whiteout)
            .err(),
        Some(Errno::INVAL)
    );
    let file = share.lookup(ROOT_ID, &cstr("file")).expect("file");
    assert_eq!(
        share
            .setxattr(file.nodeid, &cstr("security.capability"), b"x", 0)
            .err(),
        Some(Errno::PERM)
    );
    assert_eq!(
        share
            .setxattr(file.nodeid, &cstr("trusted.x"), b"x", 0)
            .err(),
        Some(Errno::PERM)
    );
    let fifo = share
        .mknod(ROOT_ID, &cstr("fifo"), libc::S_IFIFO | 0o644, ROOT)
        .expect("fifo");
    // A fifo is never opened here: that would block the share's thread.
    assert_eq!(share.open(fifo.nodeid, 0).err(), Some(Errno::NXIO));
    assert!(!Path::new(&tmp.path().join("x")).exists());
}

#[test]
fn handles_and_nodes_are_bounded_and_released() {
    let (_tmp, mut share) = setup(false);
    let file = share.lookup(ROOT_ID, &cstr("file")).expect("file");
    let fhs: Vec<u64> = (0..MAX_HANDLES)
        .map(|_| share.open(file.nodeid, 0).expect("open").fh)
        .collect();
    assert_eq!(share.open(file.nodeid, 0).err(), Some(Errno::NFILE));
    for fh in fhs {
        share.release(fh);
    }
    assert_eq!(share.counts(), (0, 2));
    share.forget(file.nodeid, 1);
    share.forget(ROOT_ID, 100);
    assert_eq!(share.counts(), (0, 1), "the root is never forgotten");
    assert_eq!(
        share.read(12345, 0, 10, &mut Vec::new()).err(),
        Some(Errno::BADF)
    );
}

#[test]
fn directories_list_in_pieces_by_cookie() {
    let (tmp, mut share) = setup(false);
    for i in 0..50 {
        std::fs::write(tmp.path().join(format!("share/f{i:02}")), b"").expect("file");
    }
    let fh = share.opendir(ROOT_ID).expect("opendir").fh;
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        let mut out = Vec::new();
        share.readdir(fh, offset, 256, &mut out).expect("readdir");
        if out.is_empty() {
            break;
        }
        let mut rest = &out[..];
        while !rest.is_empty() {
            let off = u64::from_le_bytes(rest[8..16].try_into().expect("off"));
            let len = u32::from_le_bytes(rest[16..20].try_into().expect("len")) as usize;
            names.push(String::from_utf8(rest[24..24 + len].to_vec()).expect("utf8"));
            offset = off;
            rest = &rest[(24 + len).next_multiple_of(8)..];
        }
    }
    names.sort();
    assert_eq!(names.len(), 53, "50 files, `file`, `.` and `..`");
    assert!(names.contains(&"f49".to_string()));
}
