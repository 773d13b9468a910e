//! Capabilities per thread: Linux keeps them per thread, so each thread drops what its
//! role does not need as it confines itself, after the VM's privileged setup (`/dev/kvm`,
//! TAP devices, shared directories) is done. Only the threads that act on files for
//! others keep the file capabilities: the fs shares (files owned by guest users) and the
//! thread that tears the VM down (`--rm` removes what guest users made).

use std::io;

use vmm::confine::ThreadRole;

use super::Role;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit halves.
const VERSION_3: u32 = 0x2008_0522;

const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The capabilities `role` keeps (a mask over the low 32 capabilities).
fn kept(role: Role) -> u32 {
    match role {
        Role::Vm(ThreadRole::Fs) | Role::Vm(ThreadRole::Main) => [
            CAP_CHOWN,
            CAP_DAC_OVERRIDE,
            CAP_DAC_READ_SEARCH,
            CAP_FOWNER,
            CAP_FSETID,
        ]
        .iter()
        .fold(0, |mask, cap| mask | 1 << cap),
        _ => 0,
    }
}

/// Reduces the calling thread's capabilities to what `role` keeps (of those it has).
pub(super) fn drop_for(role: Role) -> io::Result<()> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two Data structs (version 3) into `data`; header and data
    // live on this stack for the call.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let keep = kept(role);
    let reduced = [
        Data {
            effective: data[0].effective & keep,
            permitted: data[0].permitted & keep,
            inheritable: 0,
        },
        Data::default(),
    ];
    // SAFETY: as above; capset only reads `header` and `reduced`, and only lowers the
    // calling thread's sets.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, reduced.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Ambient capabilities would survive an exec; none may remain.
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_file_roles_keep_file_capabilities() {
        assert_eq!(kept(Role::Vm(ThreadRole::Vcpu)), 0);
        assert_eq!(kept(Role::Vm(ThreadRole::Net)), 0);
        assert_eq!(kept(Role::Control), 0);
        assert_eq!(kept(Role::Vm(ThreadRole::Fs)), 0b1_1111);
    }

    #[test]
    fn a_thread_drops_its_capabilities() {
        let status = std::thread::spawn(|| {
            drop_for(Role::Vm(ThreadRole::Vcpu)).expect("capset");
            std::fs::read_to_string("/proc/thread-self/status").expect("status")
        })
        .join()
        .expect("thread");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .map(str::to_owned)
        };
        assert_eq!(field("CapEff:").as_deref(), Some("0000000000000000"));
        assert_eq!(field("CapPrm:").as_deref(), Some("0000000000000000"));
    }
}
