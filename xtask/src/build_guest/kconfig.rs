//! Kconfig files: parse a fragment or a `.config`, lay a fragment over a base, and list the
//! requested options that `make olddefconfig` dropped (it silently resets options whose
//! dependencies are unmet, so a fragment is only trusted after this check).

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{bail, Result};

/// Ordered `CONFIG_*` assignments. Values are kept as Kconfig writes them: `y`, `m`, a
/// number, a quoted string, or `n` for `# CONFIG_X is not set`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    entries: Vec<(String, String)>,
}

/// A requested option whose value in the final `.config` differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The option, with its `CONFIG_` prefix.
    pub name: String,
    /// The value the fragment asked for.
    pub wanted: String,
    /// The value in `.config` (`n` when it is absent or not set).
    pub got: String,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: requested {}, got {}",
            self.name, self.wanted, self.got
        )
    }
}

impl Config {
    /// Parses `CONFIG_X=value` and `# CONFIG_X is not set` lines. Other comments and blank
    /// lines are skipped; anything else, or an option assigned twice, is an error (in a
    /// reviewed fragment both are mistakes, and Kconfig would silently keep the last one).
    pub fn parse(text: &str) -> Result<Self> {
        let mut entries: Vec<(String, String)> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let Some((name, value)) = parse_line(line) else {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                bail!("line {}: not a Kconfig assignment: {line}", index + 1);
            };
            if !is_option_name(name) {
                bail!("line {}: bad option name {name:?}", index + 1);
            }
            if entries.iter().any(|(known, _)| known == name) {
                bail!("line {}: {name} is assigned twice", index + 1);
            }
            entries.push((name.to_owned(), value.to_owned()));
        }
        Ok(Self { entries })
    }

    /// The value of `name` (`n` for an explicit "is not set"), `None` when absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, value)| value.as_str())
    }

    /// Number of assignments.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Moves every assignment of `top` to the end, replacing the old one, as
    /// `scripts/kconfig/merge_config.sh` does: each option appears once, and within a choice
    /// (e.g. `-O2` vs `-Os`) Kconfig honours the last `=y`, which must be the fragment's.
    pub fn overlay(&mut self, top: &Config) {
        self.entries.retain(|(name, _)| top.get(name).is_none());
        self.entries.extend(top.entries.iter().cloned());
    }

    /// The assignments in `.config` syntax, one per line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, value) in &self.entries {
            if value == "n" {
                out.push_str(&format!("# {name} is not set\n"));
            } else {
                out.push_str(&format!("{name}={value}\n"));
            }
        }
        out
    }

    /// Every assignment of `self` (the request) that `actual` (the resolved `.config`) does
    /// not honour. Kconfig omits options whose dependencies hide them, so absent means `n`.
    pub fn dropped_in(&self, actual: &Config) -> Vec<Dropped> {
        let resolved: BTreeMap<&str, &str> = actual
            .entries
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        self.entries
            .iter()
            .filter_map(|(name, wanted)| {
                let got = resolved.get(name.as_str()).copied().unwrap_or("n");
                (got != wanted).then(|| Dropped {
                    name: name.clone(),
                    wanted: wanted.clone(),
                    got: got.to_owned(),
                })
            })
            .collect()
    }
}

fn parse_line(line: &str) -> Option<(&str, &str)> {
    if let Some(rest) = line.strip_prefix("# ") {
        let name = rest.strip_suffix(" is not set")?;
        return Some((name, "n"));
    }
    if line.starts_with('#') {
        return None;
    }
    line.split_once('=')
}

fn is_option_name(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).expect("valid config text")
    }

    #[test]
    fn parses_values_not_set_and_skips_comments() {
        let parsed = config(
            "# Platform\nCONFIG_SMP=y\n\n# CONFIG_PCI is not set\nCONFIG_NR_CPUS=64\n\
             CONFIG_CMDLINE=\"console=ttyS0 quiet\"\n",
        );
        assert_eq!(parsed.len(), 4);
        assert_eq!(parsed.get("CONFIG_SMP"), Some("y"));
        assert_eq!(parsed.get("CONFIG_PCI"), Some("n"));
        assert_eq!(parsed.get("CONFIG_NR_CPUS"), Some("64"));
        assert_eq!(
            parsed.get("CONFIG_CMDLINE"),
            Some("\"console=ttyS0 quiet\"")
        );
        assert_eq!(parsed.get("CONFIG_ACPI"), None);
    }

    #[test]
    fn rejects_garbage_and_duplicates() {
        assert!(Config::parse("CONFIG_SMP y\n").is_err());
        assert!(Config::parse("SMP=y\n").is_err());
        assert!(Config::parse("CONFIG_=y\n").is_err());
        assert!(Config::parse("CONFIG_SMP=y\nCONFIG_SMP=n\n").is_err());
        assert!(Config::parse("CONFIG_SMP=y\n# CONFIG_SMP is not set\n").is_err());
    }

    #[test]
    fn real_dotconfig_header_parses() {
        let parsed = config(
            "#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86 6.12.117 Kernel \
             Configuration\n#\nCONFIG_CC_VERSION_TEXT=\"gcc (Debian 12.2.0-14) 12.2.0\"\n\
             CONFIG_PHYSICAL_START=0x1000000\n",
        );
        assert_eq!(parsed.get("CONFIG_PHYSICAL_START"), Some("0x1000000"));
    }

    #[test]
    fn overlay_moves_the_fragment_last() {
        let mut base = config(
            "# CONFIG_SMP is not set\n# CONFIG_CC_OPTIMIZE_FOR_PERFORMANCE is not set\n\
             CONFIG_CC_OPTIMIZE_FOR_SIZE=y\nCONFIG_PRINTK=y\n",
        );
        base.overlay(&config(
            "CONFIG_SMP=y\nCONFIG_CC_OPTIMIZE_FOR_PERFORMANCE=y\n",
        ));
        // The choice's new `=y` must come after the base's, or Kconfig keeps `-Os`.
        assert_eq!(
            base.render(),
            "CONFIG_CC_OPTIMIZE_FOR_SIZE=y\nCONFIG_PRINTK=y\nCONFIG_SMP=y\n\
             CONFIG_CC_OPTIMIZE_FOR_PERFORMANCE=y\n"
        );
    }

    #[test]
    fn render_round_trips() {
        let text = "CONFIG_SMP=y\n# CONFIG_PCI is not set\nCONFIG_CMDLINE=\"a b\"\n";
        assert_eq!(config(text).render(), text);
    }

    #[test]
    fn missing_yes_is_dropped() {
        let wanted = config("CONFIG_PVH=y\nCONFIG_SMP=y\n");
        let actual = config("CONFIG_SMP=y\n");
        let dropped = wanted.dropped_in(&actual);
        assert_eq!(
            dropped,
            vec![Dropped {
                name: "CONFIG_PVH".into(),
                wanted: "y".into(),
                got: "n".into()
            }]
        );
        assert_eq!(dropped[0].to_string(), "CONFIG_PVH: requested y, got n");
    }

    #[test]
    fn not_set_is_honoured_when_absent_or_not_set() {
        let wanted = config("# CONFIG_PCI is not set\n# CONFIG_ACPI is not set\n");
        let actual = config("# CONFIG_PCI is not set\nCONFIG_SMP=y\n");
        assert!(wanted.dropped_in(&actual).is_empty());
    }

    #[test]
    fn forced_on_option_is_reported() {
        let wanted = config("# CONFIG_HPET_TIMER is not set\n");
        let actual = config("CONFIG_HPET_TIMER=y\n");
        assert_eq!(wanted.dropped_in(&actual)[0].got, "y");
    }

    #[test]
    fn module_is_not_yes() {
        let wanted = config("CONFIG_VIRTIO_NET=y\n");
        let actual = config("CONFIG_VIRTIO_NET=m\n");
        assert_eq!(wanted.dropped_in(&actual).len(), 1);
    }

    #[test]
    fn int_and_string_values_must_match_exactly() {
        let wanted = config("CONFIG_NR_CPUS=64\nCONFIG_CMDLINE=\"quiet\"\n");
        assert!(wanted
            .dropped_in(&config("CONFIG_NR_CPUS=64\nCONFIG_CMDLINE=\"quiet\"\n"))
            .is_empty());
        let dropped = wanted.dropped_in(&config("CONFIG_NR_CPUS=8\nCONFIG_CMDLINE=\"\"\n"));
        let names: Vec<&str> = dropped.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["CONFIG_NR_CPUS", "CONFIG_CMDLINE"]);
        assert_eq!(dropped[0].got, "8");
    }

    #[test]
    fn the_katalite_fragment_parses() {
        let text = include_str!("../../../kernel-config/katalite.config");
        let fragment = config(text);
        assert_eq!(fragment.get("CONFIG_PVH"), Some("y"));
        assert_eq!(fragment.get("CONFIG_MODULES"), Some("n"));
    }
}
