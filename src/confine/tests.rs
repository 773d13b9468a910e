use super::*;

#[test]
fn every_role_compiles_and_allows_a_bounded_set() {
    for role in Role::ALL {
        compile(role, SeccompAction::Trap).expect("compiles");
        let count = allowed_syscalls(role);
        println!("{}: {count} syscalls", role.name());
        assert!((20..200).contains(&count), "{}: {count}", role.name());
    }
    // The vCPU and device threads get the least.
    let vcpu = allowed_syscalls(Role::Vm(ThreadRole::Vcpu));
    assert!(vcpu < allowed_syscalls(Role::Vm(ThreadRole::Net)));
    assert!(vcpu < allowed_syscalls(Role::Vm(ThreadRole::Main)));
}

/// In a child (this test binary re-run with `CHILD`): confine the thread as a vCPU, make
/// an allowed syscall and say so, then a forbidden one.
const CHILD: &str = "KATALITE_SECCOMP_CHILD";

/// In the child: installs the SIGSYS handler and confines this thread to `role`.
fn confine_as(role: Role) {
    let program = compile(role, SeccompAction::Trap).expect("bpf");
    sigsys::install().expect("handler");
    sigsys::set_thread_role(role.name());
    if filters::spawns(role) {
        seccompiler::apply_filter(&compile_clone3_refused().expect("bpf")).expect("filter");
    }
    seccompiler::apply_filter(&program).expect("filter");
}

fn in_child(test: &str) -> std::process::Output {
    let exe = std::env::current_exe().expect("exe");
    std::process::Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .expect("child")
}

#[test]
fn a_forbidden_syscall_kills_the_process_and_is_named() {
    if std::env::var_os(CHILD).is_some() {
        confine_as(Role::Vm(ThreadRole::Vcpu));
        // Allowed: write and getpid.
        // SAFETY: getpid takes no arguments.
        let pid = unsafe { libc::getpid() };
        println!("allowed syscalls work (pid {pid})");
        // Forbidden for a vCPU: opening a file.
        let _ = std::fs::File::open("/etc/hostname");
        println!("the forbidden syscall returned");
        return;
    }
    let out = in_child("confine::tests::a_forbidden_syscall_kills_the_process_and_is_named");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(EXIT_FORBIDDEN_SYSCALL),
        "{stdout}{stderr}"
    );
    assert!(stdout.contains("allowed syscalls work"), "{stdout}");
    assert!(!stdout.contains("returned"), "{stdout}");
    assert!(
        stderr.contains("katalite: seccomp: the vcpu thread made a forbidden syscall: open"),
        "{stderr}"
    );
}

#[test]
fn ioctl_is_allowed_to_a_vcpu_only_for_kvm_run() {
    if std::env::var_os(CHILD).is_some() {
        confine_as(Role::Vm(ThreadRole::Vcpu));
        // KVM_RUN on a descriptor that is no vCPU: the filter lets it through, the kernel
        // refuses it.
        // SAFETY: an ioctl without an argument pointer on stdin.
        let kvm_run = unsafe { libc::ioctl(0, 0xae80, 0) };
        println!("KVM_RUN passed the filter ({kvm_run})");
        // TIOCGWINSZ: not for a vCPU.
        // SAFETY: winsize is plain integers; all zeroes is a valid value.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into `size`, which lives on this stack.
        unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut size) };
        println!("TIOCGWINSZ passed the filter");
        return;
    }
    let out = in_child("confine::tests::ioctl_is_allowed_to_a_vcpu_only_for_kvm_run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(EXIT_FORBIDDEN_SYSCALL),
        "{stdout}{stderr}"
    );
    assert!(stdout.contains("KVM_RUN passed"), "{stdout}");
    assert!(!stdout.contains("TIOCGWINSZ passed"), "{stdout}");
    assert!(stderr.contains("forbidden syscall: ioctl (16)"), "{stderr}");
}

#[test]
fn threads_cannot_start_processes() {
    if std::env::var_os(CHILD).is_some() {
        confine_as(Role::Control);
        let thread = std::thread::spawn(|| 7).join().expect("a thread starts");
        println!("thread ok {thread}");
        let _ = std::process::Command::new("/bin/true").status();
        println!("a process started");
        return;
    }
    let out = in_child("confine::tests::threads_cannot_start_processes");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The clone of a new process is trapped while the spawning code blocks every signal,
    // so the kernel kills with SIGSYS itself instead of running the handler.
    use std::os::unix::process::ExitStatusExt;
    let killed = out.status.code() == Some(EXIT_FORBIDDEN_SYSCALL)
        || out.status.signal() == Some(libc::SIGSYS);
    assert!(killed, "{:?}: {stdout}{stderr}", out.status);
    assert!(stdout.contains("thread ok 7"), "{stdout}");
    assert!(!stdout.contains("a process started"), "{stdout}");
}

/// The enforcing programs as they compile from the rules today, in the embedded order.
fn compiled_now() -> Vec<BpfProgram> {
    let mut programs: Vec<BpfProgram> = Role::ALL
        .into_iter()
        .map(|role| compile(role, SeccompAction::Trap).expect("compiles"))
        .collect();
    programs.push(compile_clone3_refused().expect("compiles"));
    programs
}

#[test]
fn the_embedded_filters_are_the_rules_compiled() {
    let now = precompiled::encode(&compiled_now());
    if std::env::var_os("KATALITE_UPDATE_FILTERS").is_some_and(|v| v == "1") {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/confine/filters.bpf");
        std::fs::write(path, &now).expect("write filters.bpf");
        return;
    }
    let embedded = precompiled::programs(Role::ALL.len() + 1).expect("embedded filters");
    assert!(
        precompiled::encode(&embedded) == now,
        "src/confine/filters.bpf is stale: run KATALITE_UPDATE_FILTERS=1 cargo test -p katalite \
         the_embedded_filters_are_the_rules_compiled"
    );
    let policy = embedded_policy_for_test();
    for role in Role::ALL {
        assert!(!policy.programs[&role].is_empty(), "{}", role.name());
    }
}

fn embedded_policy_for_test() -> Policy {
    embedded().expect("embedded policy")
}

#[test]
fn precompiled_programs_round_trip_and_damage_is_refused() {
    let programs = compiled_now();
    let bytes = precompiled::encode(&programs);
    let back = precompiled::decode(&bytes, programs.len()).expect("decodes");
    assert_eq!(precompiled::encode(&back), bytes);
    assert_eq!(back[0].len(), programs[0].len());
    let error = |bytes: &[u8], expected| {
        precompiled::decode(bytes, expected)
            .expect_err("refused")
            .to_string()
    };
    assert!(error(&bytes[..bytes.len() - 3], programs.len()).contains("truncated"));
    assert!(error(&bytes, programs.len() + 1).contains("programs"));
    assert!(error(&[0xff, 0xff, 0xff, 0xff], 1).contains("truncated"));
}
