//! The workload's environment, assembled as Docker does (`CreateDaemonEnvironment`, then
//! `ReplaceOrAppendEnvValues`, then runc's HOME): defaults first, the config's entries
//! replace or append, an entry without `=` unsets, HOME last from the user's passwd entry.

/// Docker's PATH when the image and the command line set none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment for the workload, in order: `PATH`, `HOSTNAME`, `TERM=xterm` with a
/// terminal, then the config's entries (replacing a default in place or appended), then
/// `HOME=home` unless the config set one.
pub fn assemble(
    entries: &[String],
    hostname: &str,
    home: &str,
    tty: bool,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, Option<String>)> = vec![
        ("PATH".into(), Some(DEFAULT_PATH.into())),
        ("HOSTNAME".into(), Some(hostname.into())),
    ];
    if tty {
        env.push(("TERM".into(), Some("xterm".into())));
    }
    for entry in entries {
        let (name, value) = match entry.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            // Docker: a bare name removes that variable (the CLI already replaced `-e NAME`
            // by the host's value, so what reaches here is an explicit unset).
            None => (entry.as_str(), None),
        };
        if name.is_empty() {
            continue;
        }
        match env.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None if value.is_some() => env.push((name.to_string(), value)),
            None => {}
        }
    }
    if !env.iter().any(|(n, v)| n == "HOME" && v.is_some()) {
        env.push(("HOME".into(), Some(home.into())));
    }
    env.into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|e| e.to_string()).collect()
    }

    fn pairs(env: &[(String, String)]) -> Vec<String> {
        env.iter().map(|(n, v)| format!("{n}={v}")).collect()
    }

    #[test]
    fn defaults_without_config() {
        let env = assemble(&[], "box", "/root", false);
        assert_eq!(
            pairs(&env),
            [
                format!("PATH={DEFAULT_PATH}"),
                "HOSTNAME=box".into(),
                "HOME=/root".into()
            ]
        );
        let env = assemble(&[], "box", "/", true);
        assert!(pairs(&env).contains(&"TERM=xterm".to_string()));
    }

    #[test]
    fn config_entries_replace_defaults_in_place_and_append_others() {
        let env = assemble(
            &strings(&[
                "FOO=1",
                "PATH=/bin",
                "HOSTNAME=",
                "TERM=vt100",
                "FOO=2",
                "A=b=c",
            ]),
            "box",
            "/",
            true,
        );
        assert_eq!(
            pairs(&env),
            [
                "PATH=/bin",
                "HOSTNAME=",
                "TERM=vt100",
                "FOO=2",
                "A=b=c",
                "HOME=/"
            ]
        );
    }

    #[test]
    fn home_from_config_wins_over_passwd() {
        let env = assemble(&strings(&["HOME=/data"]), "box", "/root", false);
        assert_eq!(pairs(&env).last().map(String::as_str), Some("HOME=/data"));
        assert_eq!(env.iter().filter(|(n, _)| n == "HOME").count(), 1);
    }

    #[test]
    fn entries_without_equals_unset_and_are_never_passed() {
        let env = assemble(
            &strings(&["PATH", "NOPE", "=x", "HOME"]),
            "box",
            "/root",
            false,
        );
        assert_eq!(pairs(&env), ["HOSTNAME=box", "HOME=/root"]);
    }
}
