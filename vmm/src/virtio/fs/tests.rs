//! The FUSE server fed hostile requests: every one gets an error reply or none, never a
//! panic, and nothing outside the share is touched.

use vm_memory::ByteValued;

use super::abi::{self, opcode, InHeader, OutHeader};
use super::server::{Server, MAX_WRITE};
use super::share::tests::policy;
use super::share::Share;

fn request(op: u32, nodeid: u64, args: &[u8]) -> Vec<u8> {
    let header = InHeader {
        len: u32::try_from(std::mem::size_of::<InHeader>() + args.len()).expect("len"),
        opcode: op,
        unique: 7,
        nodeid,
        ..Default::default()
    };
    let mut out = header.as_slice().to_vec();
    out.extend_from_slice(args);
    out
}

fn reply_header(out: &[u8]) -> OutHeader {
    let mut header = OutHeader::default();
    header
        .as_mut_slice()
        .copy_from_slice(&out[..std::mem::size_of::<OutHeader>()]);
    header
}

fn served(server: &mut Server, req: &[u8]) -> (i32, Vec<u8>) {
    let mut out = Vec::new();
    server.handle(req, &mut out);
    let header = reply_header(&out);
    assert_eq!(header.len as usize, out.len());
    assert_eq!(header.unique, 7);
    (header.error, out[16..].to_vec())
}

fn server() -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("file"), b"hello").expect("file");
    let share = Share::new(tmp.path(), policy(false)).expect("share");
    let mut server = Server::new(share);
    let init = abi::InitIn {
        major: 7,
        minor: 41,
        max_readahead: 1 << 17,
        flags: u32::MAX,
    };
    let (error, body) = served(&mut server, &request(opcode::INIT, 0, init.as_slice()));
    assert_eq!(error, 0);
    let mut out = abi::InitOut::default();
    out.as_mut_slice().copy_from_slice(&body);
    assert_eq!((out.major, out.minor, out.max_write), (7, 31, MAX_WRITE));
    (tmp, server)
}

#[test]
fn nothing_is_served_before_init() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut server = Server::new(Share::new(tmp.path(), policy(false)).expect("share"));
    let (error, _) = served(&mut server, &request(opcode::LOOKUP, 1, b"file\0"));
    assert_eq!(error, -libc::EIO);
}

#[test]
fn truncated_and_oversized_requests_are_errors() {
    let (_tmp, mut server) = server();
    // Shorter than a header: there is nothing to answer.
    let mut out = vec![1, 2, 3];
    server.handle(&[0u8; 39], &mut out);
    assert!(out.is_empty());
    // A header whose length claims more than arrived.
    let mut req = request(opcode::LOOKUP, 1, b"file\0");
    req[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(served(&mut server, &req).0, -libc::EINVAL);
    // Arguments cut short: a READ without its struct, a name without its NUL.
    assert_eq!(
        served(&mut server, &request(opcode::READ, 2, &[0; 8])).0,
        -libc::EINVAL
    );
    assert_eq!(
        served(&mut server, &request(opcode::LOOKUP, 1, b"file")).0,
        -libc::EINVAL
    );
    // A WRITE whose size exceeds its data.
    let write = abi::WriteIn {
        size: 1 << 30,
        ..Default::default()
    };
    let mut args = write.as_slice().to_vec();
    args.extend_from_slice(b"abc");
    assert_eq!(
        served(&mut server, &request(opcode::WRITE, 2, &args)).0,
        -libc::EINVAL
    );
    // Extensions were never negotiated.
    let mut req = request(opcode::GETATTR, 1, &[0; 16]);
    req[36..38].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(served(&mut server, &req).0, -libc::EINVAL);
}

#[test]
fn bad_nodes_names_and_opcodes_are_errors() {
    let (_tmp, mut server) = server();
    assert_eq!(
        served(&mut server, &request(opcode::GETATTR, 99, &[0; 16])).0,
        -libc::ENOENT
    );
    assert_eq!(
        served(&mut server, &request(opcode::LOOKUP, 1, b"../etc\0")).0,
        -libc::EINVAL
    );
    assert_eq!(
        served(&mut server, &request(opcode::LOOKUP, 1, b"a/b\0")).0,
        -libc::EINVAL
    );
    assert_eq!(
        served(&mut server, &request(opcode::LOOKUP, 1, b"..\0")).0,
        -libc::EINVAL
    );
    assert_eq!(served(&mut server, &request(9999, 1, &[])).0, -libc::ENOSYS);
    let (error, body) = served(&mut server, &request(opcode::LOOKUP, 1, b"file\0"));
    assert_eq!(error, 0);
    assert_eq!(body.len(), std::mem::size_of::<abi::EntryOut>());
}

#[test]
fn forgets_are_never_answered_and_batch_counts_are_not_trusted() {
    let (_tmp, mut server) = server();
    let batch = abi::BatchForgetIn {
        count: u32::MAX,
        dummy: 0,
    };
    let mut out = vec![1];
    server.handle(
        &request(opcode::BATCH_FORGET, 0, batch.as_slice()),
        &mut out,
    );
    assert!(out.is_empty());
    server.handle(
        &request(opcode::FORGET, 12345, &5u64.to_le_bytes()),
        &mut out,
    );
    assert!(out.is_empty());
    assert_eq!(server.share().counts(), (0, 1));
}

#[test]
fn reads_are_capped_at_max_write() {
    let (_tmp, mut server) = server();
    let (_, body) = served(&mut server, &request(opcode::LOOKUP, 1, b"file\0"));
    let node = u64::from_le_bytes(body[0..8].try_into().expect("node"));
    let (_, body) = served(&mut server, &request(opcode::OPEN, node, &[0; 8]));
    let fh = u64::from_le_bytes(body[0..8].try_into().expect("fh"));
    let read = abi::ReadIn {
        fh,
        size: u32::MAX,
        ..Default::default()
    };
    let (error, body) = served(&mut server, &request(opcode::READ, node, read.as_slice()));
    assert_eq!((error, body.as_slice()), (0, &b"hello"[..]));
}

#[test]
fn a_requester_or_owner_id_of_minus_one_is_refused() {
    // Found by fuzz/virtio_fs: the ids reached rustix, which asserts they are not -1 (a
    // debug build's worker panicked; in release chown left the VMM's own ids).
    let (tmp, mut server) = server();
    let mkdir = abi::MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let mut args = mkdir.as_slice().to_vec();
    args.extend_from_slice(b"made\0");
    for (uid, gid) in [(u32::MAX, 0), (0, u32::MAX)] {
        let mut req = request(opcode::MKDIR, 1, &args);
        req[24..28].copy_from_slice(&uid.to_le_bytes());
        req[28..32].copy_from_slice(&gid.to_le_bytes());
        assert_eq!(served(&mut server, &req).0, -libc::EINVAL);
        assert!(
            !tmp.path().join("made").exists(),
            "a refused mkdir left its entry"
        );
    }
    let (_, body) = served(&mut server, &request(opcode::LOOKUP, 1, b"file\0"));
    let node = u64::from_le_bytes(body[0..8].try_into().expect("node"));
    let chown = abi::SetattrIn {
        valid: abi::fattr::UID,
        uid: u32::MAX,
        ..Default::default()
    };
    assert_eq!(
        served(
            &mut server,
            &request(opcode::SETATTR, node, chown.as_slice())
        )
        .0,
        -libc::EINVAL
    );
}
