//! What a registry (or an `oci:`/`docker-archive:` source) hands us before any layer: image
//! manifests and indexes with platform selection, image configs, plus the text the user
//! or the host gives next to them (references, `registries.toml`, `--limit`) and a
//! registry's `WWW-Authenticate` challenge. The first byte picks the parser (its low three
//! bits; the high four pick a manifest's content type); the rest is its input. Errors are fine, panics are not, and what
//! parses must print back to something that parses the same.

#![no_main]

use std::path::Path;

use imagebuilder::config::RegistryConfig;
use imagebuilder::image::{ParsedConfig, Platform};
use imagebuilder::limits::Limits;
use imagebuilder::manifest::{
    select_platform, Manifest, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
};
use imagebuilder::reference::Reference;
use imagebuilder::registry::fuzz_parse_challenge;
use libfuzzer_sys::fuzz_target;

/// Content types a registry may send with a manifest (or none, or one with parameters).
const CONTENT_TYPES: [Option<&str>; 6] = [
    None,
    Some(OCI_MANIFEST),
    Some(OCI_INDEX),
    Some(DOCKER_MANIFEST),
    Some(DOCKER_LIST),
    Some("application/vnd.oci.image.index.v1+json; charset=utf-8"),
];

fn manifest(selector: u8, bytes: &[u8]) {
    let content_type = CONTENT_TYPES[usize::from(selector >> 4) % CONTENT_TYPES.len()];
    let Ok(parsed) = Manifest::parse(bytes, content_type) else {
        return;
    };
    if let Manifest::Index(entries) = parsed {
        for platform in [
            "linux/amd64",
            "linux/arm64/v8",
            "linux/arm/v7",
            "windows/amd64",
        ] {
            let want = Platform::parse(platform).expect("a valid platform");
            let _ = select_platform(&entries, &want);
        }
        let _ = select_platform(&entries, &Platform::host());
    }
}

fn config(bytes: &[u8]) {
    let Ok(parsed) = ParsedConfig::from_json(bytes) else {
        return;
    };
    let _ = parsed.check_platform(&Platform::host());
    let _ = parsed.check_layer_count(parsed.diff_ids.len());
}

fn registries(text: &str) {
    let Ok(mut config) = RegistryConfig::from_toml(text, Path::new("registries.toml")) else {
        return;
    };
    let names: Vec<String> = config.registries.keys().cloned().collect();
    for name in names.iter().map(String::as_str).chain(["docker.io"]) {
        let _ = config.endpoints(name);
    }
    // The environment one-offs, with the same text as their values.
    let _ = config.apply_env(|_| Some(text.to_string()));
}

fn reference(text: &str) {
    let Ok(parsed) = Reference::parse(text) else {
        return;
    };
    let printed = parsed.to_string();
    let again = Reference::parse(&printed)
        .unwrap_or_else(|err| panic!("{text:?} printed as {printed:?}, which fails: {err}"));
    assert_eq!(again, parsed, "{text:?} printed as {printed:?}");
    let _ = parsed.manifest_reference();
}

fn platform_and_limits(text: &str) {
    if let Ok(platform) = Platform::parse(text) {
        let printed = platform.to_string();
        assert_eq!(Platform::parse(&printed).ok().as_ref(), Some(&platform));
    }
    let mut limits = Limits::default();
    let _ = limits.apply_overrides(text);
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 8 {
        1 => config(rest),
        kind @ 2..=5 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            match kind {
                2 => registries(text),
                3 => reference(text),
                4 => platform_and_limits(text),
                _ => {
                    let _ = fuzz_parse_challenge(text);
                }
            }
        }
        _ => manifest(selector, rest),
    }
});
