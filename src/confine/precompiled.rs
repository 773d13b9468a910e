//! The enforcing filters, compiled ahead of time: `filters.bpf` beside this file holds the
//! BPF of every role (in [`Role::ALL`] order) and of the clone3 filter, as seccompiler
//! compiles them with [`SeccompAction::Trap`](seccompiler::SeccompAction::Trap). Compiling
//! them at every start took about 90 ms of a lab boot (where the host CPU is emulated),
//! before the VM could start. A unit test compiles the rules and fails when the file no
//! longer matches them; `KATALITE_UPDATE_FILTERS=1 cargo test -p katalite confine` rewrites
//! it. The log mode (`KATALITE_SECCOMP_LOG=1`) still compiles at start.
//!
//! Format, little-endian: per program a u32 instruction count, then per instruction the
//! u16 code, u8 jt, u8 jf and u32 k of a `struct sock_filter`.

use anyhow::{bail, Context, Result};
use seccompiler::{sock_filter, BpfProgram};

/// The programs, as the test last wrote them.
const FILTERS: &[u8] = include_bytes!("filters.bpf");

/// What a program cut short says.
const TRUNCATED: &str = "the precompiled seccomp filters are truncated";

/// Bytes of one encoded instruction.
const INSTRUCTION: usize = 8;

/// Encodes `programs` in the file's format (the test that writes the file).
#[cfg(test)]
pub fn encode(programs: &[BpfProgram]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for program in programs {
        let count = u32::try_from(program.len()).expect("a BPF program is at most 4096 long");
        bytes.extend_from_slice(&count.to_le_bytes());
        for insn in program {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
    }
    bytes
}

/// Decodes `bytes`, which must hold exactly `expected` programs.
/// A damaged file (a build from a damaged tree) is an error.
pub fn decode(mut bytes: &[u8], expected: usize) -> Result<Vec<BpfProgram>> {
    let mut programs = Vec::with_capacity(expected);
    while !bytes.is_empty() {
        let (count, rest) = bytes.split_first_chunk::<4>().context(TRUNCATED)?;
        let len = usize::try_from(u32::from_le_bytes(*count))
            .ok()
            .and_then(|count| count.checked_mul(INSTRUCTION))
            .filter(|&len| len <= rest.len())
            .context(TRUNCATED)?;
        let (body, rest) = rest.split_at(len);
        let program = body
            .chunks_exact(INSTRUCTION)
            .map(|insn| sock_filter {
                code: u16::from_le_bytes([insn[0], insn[1]]),
                jt: insn[2],
                jf: insn[3],
                k: u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]),
            })
            .collect();
        programs.push(program);
        bytes = rest;
    }
    if programs.len() != expected {
        bail!(
            "the precompiled seccomp filters hold {} programs, {expected} expected",
            programs.len()
        );
    }
    Ok(programs)
}

/// The embedded programs: one per role in [`Role::ALL`](super::Role::ALL) order, then the
/// clone3 filter.
pub fn programs(expected: usize) -> Result<Vec<BpfProgram>> {
    decode(FILTERS, expected)
}
