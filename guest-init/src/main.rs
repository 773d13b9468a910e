//! katalite-init: PID 1 in the guest. A short, linear list of steps: mount the kernel
//! filesystems, read the run config, start the workload, reap until it exits, stop what is
//! left, sync, report the status to the VMM, power off.

#[cfg(target_os = "linux")]
mod pid1;

#[cfg(target_os = "linux")]
fn main() {
    // The kernel starts PID 1 without arguments; a person asking for the version is not it.
    if std::env::args().nth(1).as_deref() == Some("--version") {
        print!("{}", guest_init::INIT_VERSION);
        return;
    }
    pid1::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("katalite-init runs only as PID 1 of a Linux guest");
    std::process::exit(125);
}
