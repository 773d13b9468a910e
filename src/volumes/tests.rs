//! Tests of the run's mounts: checks before anything is made, host directories, volumes in
//! a store of their own, and the VMM/init plan.

use std::fs;

use super::*;

fn spec(source: SpecSource, target: &str) -> MountSpec {
    MountSpec {
        source,
        target: target.into(),
        read_only: false,
    }
}

fn bind(path: &Path, create: bool) -> SpecSource {
    SpecSource::Bind {
        path: path.to_path_buf(),
        create,
    }
}

fn volume(name: Option<&str>) -> SpecSource {
    SpecSource::Volume(name.map(String::from))
}

fn tmpfs() -> SpecSource {
    SpecSource::Tmpfs(TmpfsMount::default())
}

#[test]
fn duplicate_targets_and_too_many_shares_are_refused() {
    let a = spec(volume(Some("aa")), "/data");
    let b = spec(tmpfs(), "/data");
    let err = check(&[&a, &b]).expect_err("duplicate");
    assert_eq!(err.to_string(), "Duplicate mount point: /data");
    let many: Vec<MountSpec> = (0..=MAX_SHARES)
        .map(|i| spec(volume(Some("vv")), &format!("/v{i}")))
        .collect();
    let refs: Vec<&MountSpec> = many.iter().collect();
    let err = check(&refs).expect_err("too many");
    assert_eq!(
        err.to_string(),
        "too many volumes and bind mounts: 9 (at most 8 per container)"
    );
    check(&refs[..MAX_SHARES]).expect("eight are fine");
    let tmpfs_too: Vec<MountSpec> = (0..20).map(|i| spec(tmpfs(), &format!("/t{i}"))).collect();
    let mut refs: Vec<&MountSpec> = refs[..MAX_SHARES].to_vec();
    refs.extend(&tmpfs_too);
    check(&refs).expect("tmpfs mounts are not shares");
}

#[test]
fn host_directories_are_created_for_v_and_required_for_mount() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("a/b");
    let err = host_dir(&missing, false).expect_err("missing");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid mount config for type \"bind\": bind source path does not exist: {}",
            missing.display()
        )
    );
    let made = host_dir(&missing, true).expect("created");
    assert!(missing.is_dir());
    assert_eq!(made, missing.canonicalize().expect("canonical"));
    let file = tmp.path().join("file");
    fs::write(&file, "x").expect("write");
    let err = host_dir(&file, true).expect_err("a file");
    assert!(
        err.to_string()
            .starts_with("bind-mounting a file is not supported yet: "),
        "{err}"
    );
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&missing, &link).expect("symlink");
    assert_eq!(host_dir(&link, false).expect("link"), made);
}

#[test]
fn resolving_makes_volumes_and_cleans_up_after_a_failure() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("volumes");
    let open = || VolumeStore::at(dir.clone());
    let host = tmp.path().join("host");
    let specs = [
        spec(bind(&host, true), "/h"),
        spec(volume(Some("named")), "/n"),
        spec(volume(None), "/anon"),
        MountSpec {
            read_only: true,
            ..spec(tmpfs(), "/t")
        },
    ];
    let refs: Vec<&MountSpec> = specs.iter().collect();
    let resolved = resolve_in(&refs, open).expect("resolve");
    assert!(resolved.lock.is_some());
    let store = open().expect("store");
    let names: Vec<String> = store
        .list()
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"named".to_string()));
    let mounts = &resolved.mounts;
    assert_eq!(
        mounts[0].source,
        ResolvedSource::Bind {
            path: host.canonicalize().expect("canonical")
        }
    );
    assert!(matches!(
        &mounts[2].source,
        ResolvedSource::Volume {
            anonymous: true,
            ..
        }
    ));
    assert!(uses_volume(mounts, "named") && !uses_volume(mounts, "other"));
    drop(resolved.lock);

    // A failure after an anonymous volume was made removes it again, not named ones.
    let specs = [
        spec(volume(None), "/anon"),
        spec(volume(Some("named2")), "/n"),
        spec(bind(&tmp.path().join("absent"), false), "/b"),
    ];
    let refs: Vec<&MountSpec> = specs.iter().collect();
    let err = resolve_in(&refs, open).expect_err("missing bind source");
    assert!(
        err.to_string().contains("bind source path does not exist"),
        "{err}"
    );
    let after: Vec<String> = store
        .list()
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(after.contains(&"named2".to_string()));
    let mut before = names.clone();
    before.push("named2".into());
    before.sort();
    assert_eq!(after, before);

    // Anonymous volumes go with remove_anonymous_in.
    remove_anonymous_in(&store, mounts);
    let left: Vec<String> = store
        .list()
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(left, ["named", "named2"]);
}

#[test]
fn the_plan_tags_shares_in_order_and_passes_tmpfs_through() {
    let mounts = [
        ResolvedMount {
            source: ResolvedSource::Bind {
                path: PathBuf::from("/srv/site"),
            },
            target: "/usr/share/nginx/html".into(),
            read_only: true,
        },
        ResolvedMount {
            source: ResolvedSource::Tmpfs {
                size_bytes: Some(1 << 20),
                mode: Some(0o755),
                exec: true,
            },
            target: "/run".into(),
            read_only: false,
        },
        ResolvedMount {
            source: ResolvedSource::Volume {
                name: "data".into(),
                path: PathBuf::from("/var/lib/katalite/volumes/data/_data"),
                anonymous: false,
            },
            target: "/data".into(),
            read_only: false,
        },
    ];
    let (shares, guest) = plan(&mounts).expect("plan");
    assert_eq!(
        shares,
        [
            FsShareConfig {
                tag: "katalite-vol0".into(),
                root: PathBuf::from("/srv/site"),
                read_only: true,
            },
            FsShareConfig {
                tag: "katalite-vol1".into(),
                root: PathBuf::from("/var/lib/katalite/volumes/data/_data"),
                read_only: false,
            },
        ]
    );
    assert!(shares.iter().all(|s| vmm::virtio::is_valid_tag(&s.tag)));
    assert_eq!(
        guest,
        [
            MountConfig {
                target: "/usr/share/nginx/html".into(),
                read_only: true,
                kind: MountKind::VirtioFs(VirtioFsMount {
                    tag: "katalite-vol0".into()
                }),
            },
            MountConfig {
                target: "/run".into(),
                read_only: false,
                kind: MountKind::Tmpfs(TmpfsMount {
                    size_bytes: Some(1 << 20),
                    mode: Some(0o755),
                    exec: true,
                }),
            },
            MountConfig {
                target: "/data".into(),
                read_only: false,
                kind: MountKind::VirtioFs(VirtioFsMount {
                    tag: "katalite-vol1".into()
                }),
            },
        ]
    );
    let value = inspect(&mounts);
    assert_eq!(value[0]["Type"], "bind");
    assert_eq!(value[0]["RW"], false);
    assert_eq!(value[2]["Name"], "data");
    assert_eq!(value[1]["Destination"], "/run");
}

#[test]
fn the_store_follows_the_data_dir_variable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The only test that sets the variable; nothing else in this crate reads it.
    std::env::set_var(store::DATA_DIR_ENV, tmp.path());
    let store = VolumeStore::open().expect("open");
    let made = store.create(Some("envvol")).expect("create");
    assert_eq!(made.mountpoint, tmp.path().join("volumes/envvol/_data"));
    std::env::remove_var(store::DATA_DIR_ENV);
}
