//! Small real images built in the test: tar layers, configs, OCI / Docker manifests and
//! indexes, OCI layouts, oci-archives and `docker save` archives.

use std::io::Write;
use std::path::Path;

use imagebuilder::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Content with its digest and media type.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub digest: String,
}

impl Blob {
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Self {
        let digest = Digest::of(&bytes).to_string();
        Self {
            media_type: media_type.to_string(),
            bytes,
            digest,
        }
    }

    pub fn hex(&self) -> &str {
        &self.digest["sha256:".len()..]
    }

    pub fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    None,
    Gzip,
    Zstd,
}

/// A tar stream of regular files (parents are implied, as in many real layers).
pub fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder
            .append_data(&mut header, name, *content)
            .expect("append to tar");
    }
    builder.into_inner().expect("finish tar")
}

pub fn compress(tar: &[u8], how: Compress) -> Vec<u8> {
    match how {
        Compress::None => tar.to_vec(),
        Compress::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(tar).expect("gzip");
            enc.finish().expect("gzip")
        }
        Compress::Zstd => zstd::encode_all(tar, 1).expect("zstd"),
    }
}

/// An image: config, layers, manifest.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub config: Blob,
    pub layers: Vec<Blob>,
    /// Uncompressed layer tars (for docker archives).
    pub tars: Vec<Vec<u8>>,
    pub manifest: Blob,
}

impl TestImage {
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut all = vec![&self.config];
        all.extend(self.layers.iter());
        all
    }
}

/// The files of one layer and how it is compressed.
pub type LayerSpec<'a> = (&'a [(&'a str, &'a [u8])], Compress);

/// Builds an image for `arch` from layer contents; `docker` picks Docker v2 media types.
pub fn image(layers: &[LayerSpec<'_>], arch: &str, docker: bool) -> TestImage {
    let tars: Vec<Vec<u8>> = layers.iter().map(|(files, _)| layer_tar(files)).collect();
    let layer_type = |c: Compress| match (docker, c) {
        (true, Compress::Gzip) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        (_, Compress::None) => "application/vnd.oci.image.layer.v1.tar",
        (_, Compress::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip",
        (_, Compress::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
    };
    let blobs: Vec<Blob> = tars
        .iter()
        .zip(layers)
        .map(|(tar, (_, c))| Blob::new(layer_type(*c), compress(tar, *c)))
        .collect();
    let diff_ids: Vec<String> = tars.iter().map(|t| Digest::of(t).to_string()).collect();
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "GREETING=hello"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hi"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
            "ExposedPorts": {"80/tcp": {}},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_type = if docker {
        "application/vnd.docker.container.image.v1+json"
    } else {
        "application/vnd.oci.image.config.v1+json"
    };
    let config = Blob::new(config_type, serde_json::to_vec(&config).expect("json"));
    let manifest_type = if docker {
        DOCKER_MANIFEST
    } else {
        OCI_MANIFEST
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": blobs.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    let manifest = Blob::new(manifest_type, serde_json::to_vec(&manifest).expect("json"));
    TestImage {
        config,
        layers: blobs,
        tars,
        manifest,
    }
}

/// A two-layer busybox-like image for the host's architecture.
pub fn simple(docker: bool) -> TestImage {
    image(
        &[
            (&[("bin/hello", b"#!/bin/sh\necho hello\n")], Compress::Gzip),
            (
                &[("etc/motd", b"welcome\n"), ("srv/data", b"0123456789")],
                Compress::Zstd,
            ),
        ],
        "amd64",
        docker,
    )
}

/// An index over `(manifest, os, arch)` entries.
pub fn index(entries: &[(&Blob, &str, &str)], docker: bool) -> Blob {
    let media_type = if docker { DOCKER_LIST } else { OCI_INDEX };
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(m, os, arch)| {
            let mut d = m.descriptor();
            d["platform"] = serde_json::json!({"os": os, "architecture": arch});
            d
        })
        .collect();
    let json =
        serde_json::json!({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests});
    Blob::new(media_type, serde_json::to_vec(&json).expect("json"))
}

/// Writes an OCI layout: `refs` are (tag, top-level manifest or index); `blobs` everything.
pub fn write_oci_layout(dir: &Path, refs: &[(&str, &Blob)], blobs: &[&Blob]) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("mkdir");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
    for blob in blobs.iter().chain(refs.iter().map(|(_, b)| b)) {
        std::fs::write(dir.join("blobs/sha256").join(blob.hex()), &blob.bytes).expect("blob");
    }
    let manifests: Vec<serde_json::Value> = refs
        .iter()
        .map(|(tag, b)| {
            let mut d = b.descriptor();
            d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
            d
        })
        .collect();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("write");
}

/// Tars a directory tree (an OCI layout) into `out`.
pub fn tar_dir(dir: &Path, out: &Path) {
    let mut builder = tar::Builder::new(std::fs::File::create(out).expect("create"));
    builder.append_dir_all(".", dir).expect("tar dir");
    builder.finish().expect("finish");
}

/// Writes a legacy `docker save` archive (`<id>/layer.tar`, `<config hex>.json`,
/// `manifest.json`); a layer repeated in a later image is stored as a symlink, as Docker
/// does.
pub fn docker_archive(out: &Path, images: &[(&[&str], &TestImage)]) {
    let mut builder = tar::Builder::new(std::fs::File::create(out).expect("create"));
    let mut listing = Vec::new();
    let mut written: Vec<String> = Vec::new();
    let append = |b: &mut tar::Builder<std::fs::File>, name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        b.append_data(&mut header, name, data).expect("append");
    };
    for (tags, image) in images {
        let mut layers = Vec::new();
        for tar in &image.tars {
            let id = Digest::of(tar).hex().to_string();
            let name = format!("{id}/layer.tar");
            if written.contains(&id) {
                let link = format!("{}/layer.tar", &id[..8]);
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder
                    .append_link(&mut header, &link, format!("../{id}/layer.tar"))
                    .expect("symlink");
                layers.push(link);
                continue;
            }
            append(&mut builder, &format!("{id}/VERSION"), b"1.0");
            append(&mut builder, &name, tar);
            written.push(id);
            layers.push(name);
        }
        let config_name = format!("{}.json", image.config.hex());
        append(&mut builder, &config_name, &image.config.bytes);
        listing
            .push(serde_json::json!({"Config": config_name, "RepoTags": tags, "Layers": layers}));
    }
    append(
        &mut builder,
        "manifest.json",
        &serde_json::to_vec(&listing).expect("json"),
    );
    builder.finish().expect("finish");
}
