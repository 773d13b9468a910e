//! Where the container's root filesystem comes from. An image boots from its EROFS disk
//! image (cached, built once per manifest) on a read-only virtio-blk disk whose every
//! block the VMM checks against the image's block list, so neither start time nor guest
//! RAM grows with the image. `--rootfs DIR` (and `--image-root initramfs`, which the bench
//! compares) are packed into an initramfs the kernel unpacks into RAM.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use imagebuilder::disk::{cached_disk_image, disk_image, DiskImage, DiskOptions};
use imagebuilder::image::{ImageConfig, PulledImage};
use imagebuilder::pack::{cached_packed_initramfs, packed_initramfs, PackOptions};
use imagebuilder::progress::Progress;
use imagebuilder::source::PullPolicy;
use vmm::{BlockHashes, InitramfsPart};

use crate::image_cmds;
use crate::spec::{ContainerSpec, RootDelivery, RootSource};

/// The guest's block device name of the first disk, which holds the image.
pub const ROOT_DISK: &str = "vda";

/// MiB the guest kernel and init need besides the root filesystem (measured in the lab:
/// the smallest `--memory` that runs busybox from its disk image, rounded up).
pub const BASE_MEMORY_MIB: u64 = 64;

/// An initramfs's bytes are in guest RAM twice while the kernel unpacks it (the archive
/// and the tmpfs it fills); packed images are compressed, so their contents take more.
const INITRAMFS_EXPANSION: u64 = 4;

/// The root filesystem of one run.
pub enum GuestRoot {
    /// The image's EROFS disk image and its verified block list.
    Disk(RootDisk),
    /// An initramfs archive the kernel unpacks before init starts: a cached packed image
    /// (its open file, read straight into guest memory) or one packed for this run.
    Archive(InitramfsPart),
    /// A host directory (`--rootfs DIR`, absolute), shared with the guest over virtio-fs.
    Share(PathBuf),
}

/// The `--rootfs` directory as the VMM shares it: absolute, symlinks resolved, and a
/// directory.
fn shared_root(dir: &Path) -> Result<PathBuf> {
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("cannot use root filesystem {}", dir.display()))?;
    if !dir.is_dir() {
        bail!("root filesystem {} is not a directory", dir.display());
    }
    Ok(dir)
}

/// An image's disk image, opened: the run keeps reading the open file even if a
/// concurrent `rmi` removes it from the cache.
pub struct RootDisk {
    /// The open image.
    pub file: File,
    /// Its path in the cache, for messages.
    pub path: PathBuf,
    /// SHA-256 of each 4 KiB block, checked by the VMM on every read.
    pub block_hashes: BlockHashes,
}

/// The root filesystem `spec` asks for and the image's config (empty for a directory).
pub fn prepare(spec: &ContainerSpec) -> Result<(GuestRoot, ImageConfig)> {
    let memory = spec.resources.memory_mib;
    let disk_path = spec.root.delivery == RootDelivery::Disk;
    let (reference, pull, fetch) = match &spec.root.source {
        RootSource::Rootfs { path: dir } => {
            // `--write-initramfs` and the bench's `--image-root initramfs` still pack it.
            if disk_path {
                let dir = shared_root(dir)?;
                return Ok((GuestRoot::Share(dir), ImageConfig::default()));
            }
            let archive =
                imagebuilder::pack_dir(dir, &imagebuilder::limits::Limits::default(), Vec::new())
                    .with_context(|| format!("cannot pack root filesystem {}", dir.display()))?;
            check_initramfs_fits(archive.len() as u64, 2, memory)?;
            return Ok((GuestRoot::Archive(archive.into()), ImageConfig::default()));
        }
        RootSource::Image {
            reference,
            pull,
            fetch,
        } => (reference.as_str(), *pull, fetch),
    };
    let store = image_cmds::open_store()?;
    // Keeps a concurrent `rmi` from deleting layers while they are packed.
    let _hold = store.hold().context("cannot lock the image cache")?;
    // A cached disk image is all a start needs: the layers are re-hashed (O(image) work)
    // only when they are about to be read to build one.
    let image = image_cmds::resolve_verified(&store, reference, pull, fetch, false)?;
    // The image again with its cached layers re-hashed, before they are read to build a
    // boot image; `--pull always` just fetched it: nothing to re-hash or resolve again.
    let fetched = pull == PullPolicy::Always;
    let verified = |image: PulledImage| -> Result<PulledImage> {
        if fetched {
            Ok(image)
        } else {
            image_cmds::resolve(&store, reference, pull, fetch)
        }
    };
    if disk_path {
        let cached = cached_disk_image(&image, store.root())
            .with_context(|| format!("cannot use the disk image of {reference}"))?;
        if let Some(disk) = cached {
            return Ok((GuestRoot::Disk(open_disk(&disk, reference)?), image.config));
        }
    }
    let progress = Progress::stderr(fetch.quiet);
    // --write-initramfs hands the bench an initramfs, whatever the path.
    if !disk_path {
        let opts = PackOptions {
            progress,
            ..PackOptions::default()
        };
        // An intact packed archive is all a start needs, as a cached disk image is.
        let cached = cached_packed_initramfs(&image, store.root(), opts.compression)
            .with_context(|| format!("cannot use the packed image of {reference}"))?;
        let packed = match cached {
            Some(packed) => packed,
            None => packed_initramfs(&verified(image.clone())?, store.root(), &opts)
                .with_context(|| format!("cannot pack image {reference}"))?,
        };
        let archive = File::open(&packed)
            .with_context(|| format!("cannot open packed image {}", packed.display()))?;
        let size = archive
            .metadata()
            .with_context(|| format!("cannot read packed image {}", packed.display()))?
            .len();
        check_initramfs_fits(size, INITRAMFS_EXPANSION, memory)?;
        return Ok((
            GuestRoot::Archive(InitramfsPart::File(archive)),
            image.config,
        ));
    }
    check_memory(memory)?;
    let image = verified(image)?;
    let opts = DiskOptions {
        progress,
        ..DiskOptions::default()
    };
    let disk = disk_image(&image, store.root(), &opts)
        .with_context(|| format!("cannot build the disk image of {reference}"))?;
    Ok((GuestRoot::Disk(open_disk(&disk, reference)?), image.config))
}

/// Opens a disk image and reads its block list once, checking it against its name.
fn open_disk(disk: &DiskImage, reference: &str) -> Result<RootDisk> {
    let context = || format!("cannot use the disk image of {reference}");
    let list = disk.open_block_list().with_context(context)?;
    let (block_hashes, digest) = BlockHashes::read(list)
        .with_context(|| format!("cannot read block list {}", disk.blocks_path.display()))
        .with_context(context)?;
    disk.check_block_list(&digest, block_hashes.blocks())
        .with_context(context)?;
    let file = File::open(&disk.path)
        .with_context(|| format!("cannot open disk image {}", disk.path.display()))?;
    Ok(RootDisk {
        file,
        path: disk.path.clone(),
        block_hashes,
    })
}

/// A disk root needs only what the kernel and init need.
fn check_memory(memory_mib: u64) -> Result<()> {
    if memory_mib < BASE_MEMORY_MIB {
        bail!(
            "--memory {memory_mib}m is too little for the guest kernel and init: at least \
             {BASE_MEMORY_MIB}m is needed"
        );
    }
    Ok(())
}

/// Refuses an initramfs that cannot fit: the kernel would panic unpacking it ("VFS: Unable
/// to mount root fs") instead of giving a reason.
fn check_initramfs_fits(archive_bytes: u64, expansion: u64, memory_mib: u64) -> Result<()> {
    let needed = archive_bytes
        .saturating_mul(expansion)
        .div_ceil(1 << 20)
        .saturating_add(BASE_MEMORY_MIB);
    if needed > memory_mib {
        bail!(
            "the root filesystem needs about {needed}m of guest memory as an initramfs, more \
             than --memory {memory_mib}m"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_must_fit_with_the_kernel() {
        let mib = 1 << 20;
        assert!(check_initramfs_fits(10 * mib, 2, 512).is_ok());
        let err = check_initramfs_fits(300 * mib, 2, 512).expect_err("600m of root in 512m");
        assert!(err.to_string().contains("--memory 512m"), "{err}");
        assert!(check_initramfs_fits(u64::MAX, 4, 1 << 20).is_err());
    }

    #[test]
    fn a_disk_root_needs_the_base_memory() {
        assert!(check_memory(BASE_MEMORY_MIB).is_ok());
        assert!(check_memory(BASE_MEMORY_MIB - 1).is_err());
    }
}
