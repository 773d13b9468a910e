//! Air-gapped sources built in the test: `oci:` layouts, `oci-archive:` and
//! `docker-archive:` tarballs; then `images`/`rmi`/gc over what they left in the cache.

mod support;

use imagebuilder::image::{LayerCompression, Platform};
use imagebuilder::source::{PullError, PullPolicy};
use support::images::{self, Compress};

fn opts() -> imagebuilder::source::PullOptions {
    support::options(support::fast_config())
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[test]
fn oci_layout_by_tag_and_by_platform() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("layout");
    let v1 = images::simple(false);
    let arm = images::image(&[(&[("arm", b"arm")], Compress::None)], "arm64", false);
    let multi = images::index(
        &[
            (&v1.manifest, "linux", "amd64"),
            (&arm.manifest, "linux", "arm64"),
        ],
        false,
    );
    let mut blobs = v1.blobs();
    blobs.extend(arm.blobs());
    blobs.push(&v1.manifest);
    blobs.push(&arm.manifest);
    images::write_oci_layout(&layout, &[("v1", &v1.manifest), ("multi", &multi)], &blobs);
    let (_d, store) = support::store();

    let pulled =
        support::pull(&format!("oci:{}:v1", layout.display()), &store, &opts()).expect("by tag");
    assert_eq!(pulled.manifest_digest, v1.manifest.digest);
    assert_eq!(pulled.reference, format!("oci:{}:v1", layout.display()));
    assert_eq!(pulled.config.cmd, ["echo hi"]);
    support::assert_layers_match(&pulled, &v1);

    let multi_src = format!("oci:{}:multi", layout.display());
    let pulled = support::pull(&multi_src, &store, &opts()).expect("index, host platform");
    assert_eq!(pulled.manifest_digest, v1.manifest.digest);
    let mut arm_opts = opts();
    arm_opts.platform = Platform::parse("linux/arm64").expect("platform");
    let pulled = support::pull(&multi_src, &store, &arm_opts).expect("index, arm64");
    assert_eq!(pulled.manifest_digest, arm.manifest.digest);
    assert_eq!(pulled.layers[0].compression, LayerCompression::None);

    let err = support::pull(&format!("oci:{}", layout.display()), &store, &opts())
        .expect_err("ambiguous");
    assert!(chain(&err).contains("v1, multi"), "{}", chain(&err));
    let err = support::pull(&format!("oci:{}:nope", layout.display()), &store, &opts())
        .expect_err("no tag");
    assert!(
        chain(&err).contains("no image tagged \"nope\""),
        "{}",
        chain(&err)
    );
}

#[test]
fn oci_layout_with_bad_blobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("layout");
    let image = images::simple(false);
    let mut blobs = image.blobs();
    blobs.push(&image.manifest);
    images::write_oci_layout(&layout, &[("latest", &image.manifest)], &blobs);
    let source = format!("oci:{}", layout.display());
    let layer = layout.join("blobs/sha256").join(image.layers[1].hex());

    let (_d, store) = support::store();
    let mut tampered = image.layers[1].bytes.clone();
    tampered[0] ^= 1;
    std::fs::write(&layer, &tampered).expect("tamper");
    let err = support::pull(&source, &store, &opts()).expect_err("tampered blob");
    assert!(
        chain(&err).contains("content has digest"),
        "{}",
        chain(&err)
    );
    assert!(!store.has_blob(&image.layers[1].digest.parse().expect("digest")));
    assert!(store.images().expect("index").is_empty());

    std::fs::remove_file(&layer).expect("remove");
    let err = support::pull(&source, &store, &opts()).expect_err("missing blob");
    assert!(chain(&err).contains("is missing"), "{}", chain(&err));

    std::fs::remove_file(layout.join("oci-layout")).expect("remove");
    let err = support::pull(&source, &store, &opts()).expect_err("not a layout");
    assert!(
        chain(&err).contains("not an OCI image layout"),
        "{}",
        chain(&err)
    );
}

#[test]
fn oci_archive_plain_and_gzipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("layout");
    let image = images::simple(false);
    let mut blobs = image.blobs();
    blobs.push(&image.manifest);
    images::write_oci_layout(&layout, &[("latest", &image.manifest)], &blobs);
    let tar = dir.path().join("image.tar");
    images::tar_dir(&layout, &tar);
    let gz = dir.path().join("image.tar.gz");
    std::fs::write(
        &gz,
        images::compress(&std::fs::read(&tar).expect("read"), Compress::Gzip),
    )
    .expect("gz");

    for file in [&tar, &gz] {
        let (_d, store) = support::store();
        let pulled = support::pull(&format!("oci-archive:{}", file.display()), &store, &opts())
            .expect("archive");
        assert_eq!(pulled.manifest_digest, image.manifest.digest);
        support::assert_layers_match(&pulled, &image);
    }

    // A truncated archive is a clean error and leaves no record.
    let bytes = std::fs::read(&tar).expect("read");
    let cut = dir.path().join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let (_d, store) = support::store();
    assert!(support::pull(&format!("oci-archive:{}", cut.display()), &store, &opts()).is_err());
    assert!(store.images().expect("index").is_empty());
}

#[test]
fn docker_save_archives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = images::image(
        &[
            (&[("bin/sh", b"sh")], Compress::None),
            (&[("etc/a", b"a")], Compress::None),
        ],
        "amd64",
        true,
    );
    // `b` shares its first layer with `a`: docker save links it.
    let b = images::image(
        &[
            (&[("bin/sh", b"sh")], Compress::None),
            (&[("etc/b", b"b")], Compress::None),
        ],
        "amd64",
        true,
    );
    let single = dir.path().join("single.tar");
    images::docker_archive(&single, &[(&["busybox:latest"], &a)]);
    let double = dir.path().join("double.tar");
    images::docker_archive(
        &double,
        &[(&["app:a"], &a), (&["localhost:5000/app:b"], &b)],
    );
    let (_d, store) = support::store();

    let source = format!("docker-archive:{}", single.display());
    let first = support::pull(&source, &store, &opts()).expect("single image");
    assert_eq!(first.config.entrypoint, ["/bin/sh", "-c"]);
    assert_eq!(first.layers.len(), 2);
    for (layer, tar) in first.layers.iter().zip(&a.tars) {
        assert_eq!(layer.compression, LayerCompression::None);
        assert_eq!(std::fs::read(&layer.path).expect("layer"), *tar);
    }
    // The synthesized manifest is deterministic: same archive, same image identity.
    let again = support::pull(&source, &store, &opts()).expect("again");
    assert_eq!(again.manifest_digest, first.manifest_digest);

    let err = support::pull(
        &format!("docker-archive:{}", double.display()),
        &store,
        &opts(),
    )
    .expect_err("ambiguous");
    assert!(
        chain(&err).contains("app:a, localhost:5000/app:b"),
        "{}",
        chain(&err)
    );
    let pulled = support::pull(
        &format!("docker-archive:{}:localhost:5000/app:b", double.display()),
        &store,
        &opts(),
    )
    .expect("by name, through a linked layer");
    assert_eq!(
        std::fs::read(&pulled.layers[0].path).expect("layer"),
        b.tars[0]
    );
    assert_eq!(
        std::fs::read(&pulled.layers[1].path).expect("layer"),
        b.tars[1]
    );
    let pulled = support::pull(
        &format!("docker-archive:{}:app:a", double.display()),
        &store,
        &opts(),
    )
    .expect("by name");
    assert_eq!(pulled.manifest_digest, first.manifest_digest);
    assert!(support::pull(
        &format!("docker-archive:{}:app:zzz", double.display()),
        &store,
        &opts()
    )
    .is_err());
}

#[test]
fn skopeo_style_docker_archive() {
    // skopeo writes layers as `<diff hex>.tar` at the top, linked from `<id>/layer.tar`,
    // and lists the top-level names in manifest.json.
    let dir = tempfile::tempdir().expect("tempdir");
    let image = images::image(&[(&[("bin/sh", b"sh")], Compress::None)], "amd64", true);
    let layer_name = format!("{}.tar", &image.layers[0].digest[7..]);
    let file = dir.path().join("skopeo.tar");
    let mut builder = tar::Builder::new(std::fs::File::create(&file).expect("create"));
    let mut add = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o444);
        header.set_cksum();
        builder
            .append_data(&mut header, name, data)
            .expect("append");
    };
    add(&layer_name, &image.tars[0]);
    add(&format!("{}.json", image.config.hex()), &image.config.bytes);
    let listing = serde_json::json!([{
        "Config": format!("{}.json", image.config.hex()),
        "RepoTags": ["docker.io/library/busybox:latest"],
        "Layers": [layer_name],
    }]);
    add("manifest.json", listing.to_string().as_bytes());
    add("repositories", b"{}");
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    builder
        .append_link(&mut link, "0123abcd/layer.tar", format!("../{layer_name}"))
        .expect("symlink");
    builder.finish().expect("finish");
    drop(builder);

    let (_d, store) = support::store();
    let source = format!("docker-archive:{}:busybox", file.display());
    let pulled = support::pull(&source, &store, &opts()).expect("skopeo archive, short name");
    assert_eq!(
        std::fs::read(&pulled.layers[0].path).expect("layer"),
        image.tars[0]
    );
}

#[test]
fn docker_archive_layer_must_match_diff_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut image = images::image(&[(&[("f", b"1")], Compress::None)], "amd64", true);
    image.tars[0] = images::layer_tar(&[("f", b"2")]);
    let file = dir.path().join("bad.tar");
    images::docker_archive(&file, &[(&["bad:latest"], &image)]);
    let (_d, store) = support::store();
    let err = support::pull(
        &format!("docker-archive:{}", file.display()),
        &store,
        &opts(),
    )
    .expect_err("diff_id");
    assert!(
        chain(&err).contains("the image config says"),
        "{}",
        chain(&err)
    );
    assert!(store.images().expect("index").is_empty());
}

#[test]
fn images_rmi_and_gc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("layout");
    let one = images::simple(false);
    let two = images::image(
        &[
            (&[("bin/hello", b"#!/bin/sh\necho hello\n")], Compress::Gzip),
            (&[("two", b"2")], Compress::Gzip),
        ],
        "amd64",
        false,
    );
    let mut blobs = one.blobs();
    blobs.extend(two.blobs());
    blobs.push(&one.manifest);
    blobs.push(&two.manifest);
    images::write_oci_layout(
        &layout,
        &[("one", &one.manifest), ("two", &two.manifest)],
        &blobs,
    );
    let (_d, store) = support::store();
    let src_one = format!("oci:{}:one", layout.display());
    let src_two = format!("oci:{}:two", layout.display());
    support::pull(&src_one, &store, &opts()).expect("one");
    support::pull(&src_two, &store, &opts()).expect("two");

    let records = store.images().expect("list");
    assert_eq!(records.len(), 2);
    let total: u64 = records.iter().map(|r| r.size()).sum();
    assert!(store.disk_usage().expect("du") >= total - one.layers[0].bytes.len() as u64);

    store.remove_image(&src_one).expect("rmi");
    let report = store.gc().expect("gc");
    // one's manifest, config (they differ) and its second layer go; the shared layer stays.
    assert_eq!(report.blobs_removed, 3, "{report:?}");
    let mut never = opts();
    never.policy = PullPolicy::Never;
    assert!(matches!(
        support::pull(&src_one, &store, &never),
        Err(PullError::NotCached(_))
    ));
    let kept = support::pull(&src_two, &store, &never).expect("two still cached");
    support::assert_layers_match(&kept, &two);
}
