//! Can this host run katalite VMs? A quick look at /dev/kvm (present, openable) and at
//! which KVM back end provides it, without creating a VM, so the CLI can fail early with
//! advice instead of an ioctl error.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;

/// Errors that make this host unusable.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No KVM device node.
    #[error(
        "{0} does not exist: katalite needs KVM (hardware virtualization, or nested \
         virtualization when the host is itself a VM)"
    )]
    Missing(String),
    /// The device exists but this user may not open it.
    #[error("permission denied opening {0}: add your user to the `kvm` group (or run as root)")]
    Permission(String, #[source] io::Error),
    /// Opening failed for another reason.
    #[error("cannot open {0}")]
    Open(String, #[source] io::Error),
}

/// Which KVM implementation serves /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// VT-x / AMD-V backed KVM: boots ordinary guest kernels.
    Hardware,
    /// PVM (`kvm_pvm` module): only PVM-enabled guest kernels boot.
    Pvm,
}

const KVM_DEVICE: &str = "/dev/kvm";
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Checks that /dev/kvm exists and can be opened read-write, and tells which KVM it is.
pub fn check_kvm() -> Result<KvmKind, HostError> {
    check_at(Path::new(KVM_DEVICE), Path::new(PVM_MODULE))
}

fn check_at(device: &Path, pvm_module: &Path) -> Result<KvmKind, HostError> {
    let name = device.display().to_string();
    match OpenOptions::new().read(true).write(true).open(device) {
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(HostError::Missing(name));
        }
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
            return Err(HostError::Permission(name, err));
        }
        Err(err) => return Err(HostError::Open(name, err)),
    }
    Ok(if pvm_module.exists() {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh scratch directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("katalite-host-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("scratch dir");
            Self(dir)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_missing_device_says_kvm_is_needed() {
        let dir = Scratch::new("missing");
        let err = check_at(&dir.path().join("kvm"), &dir.path().join("pvm")).expect_err("missing");
        assert!(matches!(err, HostError::Missing(_)));
        let message = err.to_string();
        assert!(message.contains("does not exist") && message.contains("nested virtualization"));
    }

    #[test]
    fn the_pvm_module_decides_the_kind() {
        let dir = Scratch::new("kind");
        let device = dir.path().join("kvm");
        std::fs::write(&device, b"").expect("fake device");
        let module = dir.path().join("kvm_pvm");
        assert_eq!(check_at(&device, &module).expect("ok"), KvmKind::Hardware);
        std::fs::create_dir(&module).expect("fake module");
        assert_eq!(check_at(&device, &module).expect("ok"), KvmKind::Pvm);
    }

    #[test]
    fn the_permission_message_names_the_kvm_group() {
        let err = HostError::Permission(
            KVM_DEVICE.into(),
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert!(err.to_string().contains("`kvm` group"));
    }

    #[test]
    fn this_host_is_classified_when_kvm_exists() {
        if !Path::new(KVM_DEVICE).exists() {
            eprintln!("skipped: no /dev/kvm on this host");
            return;
        }
        let kind = check_kvm().expect("kvm usable");
        assert_eq!(kind == KvmKind::Pvm, Path::new(PVM_MODULE).exists());
    }
}
