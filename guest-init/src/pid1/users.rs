//! Docker's `--user` against the image's /etc/passwd and /etc/group, with the rules of
//! moby/sys/user's `GetExecUser`: a numeric part is always an id (it need not exist), a name
//! must exist, and supplementary groups come from /etc/group only when no group is given.

/// Highest uid or gid Docker accepts (moby/sys/user's `maxID`, 2^31 - 1).
const MAX_ID: i64 = i32::MAX as i64;

/// The identity the workload runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids, in /etc/group order (for `setgroups`).
    pub groups: Vec<u32>,
    /// Home directory from the passwd entry, else `/`.
    pub home: String,
}

/// A `--user` that cannot be resolved; the messages are Docker's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// A user name with no passwd entry.
    #[error("unable to find user {0}: no matching entries in passwd file")]
    UnknownUser(String),
    /// A group name with no group entry.
    #[error("unable to find group {0}: no matching entries in group file")]
    UnknownGroup(String),
    /// An id outside 0..=2^31-1 (given numerically or found in the image's files).
    #[error("uids and gids must be in range 0-{MAX_ID}")]
    OutOfRange,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: i64,
    gid: i64,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: i64,
    members: Vec<&'a str>,
}

/// Resolves `spec` (`""`, `name`, `uid`, `name:group`, `uid:gid`...) against the text of
/// the image's /etc/passwd and /etc/group (`None` when the file is missing).
pub fn resolve(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ExecUser, UserError> {
    let mut parts = spec.split(':');
    let user_arg = parts.next().unwrap_or("");
    let group_arg = parts.next().unwrap_or("");
    let user_id = parse_id(user_arg);
    let group_id = parse_id(group_arg);

    let entry = passwd_entries(passwd.unwrap_or("")).find(|entry| match user_id {
        // No user given: root's entry (Docker resolves the current user, uid 0).
        _ if user_arg.is_empty() => entry.uid == 0,
        Some(id) => entry.uid == id,
        None => entry.name == user_arg,
    });
    let (uid, mut gid, home, name) = match entry {
        Some(entry) => (entry.uid, entry.gid, entry.home, Some(entry.name)),
        None if user_arg.is_empty() => (0, 0, "/", None),
        None => match user_id {
            Some(id) => (id, 0, "/", None),
            None => return Err(UserError::UnknownUser(user_arg.to_string())),
        },
    };

    let mut groups = Vec::new();
    if !group_arg.is_empty() {
        let found = group_entries(group.unwrap_or("")).find(|entry| match group_id {
            Some(id) => entry.gid == id,
            None => entry.name == group_arg,
        });
        gid = match (found, group_id) {
            (Some(entry), _) => entry.gid,
            (None, Some(id)) => id,
            (None, None) => return Err(UserError::UnknownGroup(group_arg.to_string())),
        };
    } else if let Some(name) = name {
        // Supplementary groups only in the implicit form, as Docker does.
        for entry in group_entries(group.unwrap_or("")) {
            if entry.members.contains(&name) {
                groups.push(to_id(entry.gid)?);
            }
        }
    }
    Ok(ExecUser {
        uid: to_id(uid)?,
        gid: to_id(gid)?,
        groups,
        home: if home.is_empty() { "/" } else { home }.to_string(),
    })
}

/// A decimal id as Go's `strconv.Atoi` reads it (an optional sign); `None` for a name.
fn parse_id(text: &str) -> Option<i64> {
    text.parse().ok()
}

fn to_id(id: i64) -> Result<u32, UserError> {
    if (0..=MAX_ID).contains(&id) {
        u32::try_from(id).map_err(|_| UserError::OutOfRange)
    } else {
        Err(UserError::OutOfRange)
    }
}

/// Entries of /etc/passwd (`name:password:uid:gid:gecos:home:shell`). Lines whose ids do
/// not parse are skipped rather than read as 0, which would make them root.
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    records(text).filter_map(|fields| {
        Some(PasswdEntry {
            name: fields.first()?,
            uid: fields.get(2)?.parse().ok()?,
            gid: fields.get(3)?.parse().ok()?,
            home: fields.get(5).copied().unwrap_or(""),
        })
    })
}

/// Entries of /etc/group (`name:password:gid:member,member`).
fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    records(text).filter_map(|fields| {
        Some(GroupEntry {
            name: fields.first()?,
            gid: fields.get(2)?.parse().ok()?,
            members: fields
                .get(3)
                .map(|list| list.split(',').map(str::trim).filter(|m| !m.is_empty()))
                .into_iter()
                .flatten()
                .collect(),
        })
    })
}

/// The colon-separated fields of each non-empty, non-comment line.
fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split(':').collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment
broken:x:notanumber:0::/:/bin/sh
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
alice:x:1000:1000:Alice:/home/alice:/bin/bash
nohome:x:1001:1001::
";
    const GROUP: &str = "\
root:x:0:
wheel:x:10:root,alice
www-data:x:33:
alice:x:1000:
audio:x:29: alice , bob
staff:x:50:
";

    fn resolve_ok(spec: &str) -> ExecUser {
        resolve(spec, Some(PASSWD), Some(GROUP)).expect("resolves")
    }

    #[test]
    fn default_user_is_root_with_its_groups() {
        assert_eq!(
            resolve_ok(""),
            ExecUser {
                uid: 0,
                gid: 0,
                groups: vec![10],
                home: "/root".into()
            }
        );
    }

    #[test]
    fn names_resolve_with_primary_and_supplementary_groups() {
        assert_eq!(
            resolve_ok("alice"),
            ExecUser {
                uid: 1000,
                gid: 1000,
                groups: vec![10, 29],
                home: "/home/alice".into()
            }
        );
        let www = resolve_ok("www-data");
        assert_eq!((www.uid, www.gid, www.home.as_str()), (33, 33, "/var/www"));
        assert!(www.groups.is_empty());
    }

    #[test]
    fn numeric_uid_matches_an_entry_or_stands_alone() {
        // A uid with an entry takes its gid, home and groups.
        assert_eq!(resolve_ok("1000"), resolve_ok("alice"));
        // A uid without one is accepted as is, gid 0, home /.
        assert_eq!(
            resolve_ok("4242"),
            ExecUser {
                uid: 4242,
                gid: 0,
                groups: vec![],
                home: "/".into()
            }
        );
    }

    #[test]
    fn explicit_groups_replace_the_primary_and_drop_supplementary_ones() {
        let by_name = resolve_ok("alice:staff");
        assert_eq!((by_name.uid, by_name.gid), (1000, 50));
        assert!(by_name.groups.is_empty());
        assert_eq!(resolve_ok("1000:4343").gid, 4343);
        assert_eq!(resolve_ok("4242:staff").gid, 50);
        assert_eq!(resolve_ok("alice:10").gid, 10);
        assert_eq!(resolve_ok("0:0").uid, 0);
    }

    #[test]
    fn unknown_names_fail_with_dockers_messages() {
        let err = resolve("nobody2", Some(PASSWD), Some(GROUP)).expect_err("unknown user");
        assert_eq!(
            err.to_string(),
            "unable to find user nobody2: no matching entries in passwd file"
        );
        let err = resolve("alice:nogroup", Some(PASSWD), Some(GROUP)).expect_err("unknown group");
        assert_eq!(
            err.to_string(),
            "unable to find group nogroup: no matching entries in group file"
        );
        // A malformed line is never matched (its uid would otherwise read as 0).
        assert_eq!(
            resolve("broken", Some(PASSWD), Some(GROUP)),
            Err(UserError::UnknownUser("broken".into()))
        );
    }

    #[test]
    fn missing_files_still_allow_numeric_ids_and_root() {
        assert_eq!(resolve("", None, None).map(|u| u.uid), Ok(0));
        assert_eq!(
            resolve("12:34", None, None).map(|u| (u.uid, u.gid)),
            Ok((12, 34))
        );
        assert_eq!(
            resolve("alice", None, None),
            Err(UserError::UnknownUser("alice".into()))
        );
    }

    #[test]
    fn out_of_range_ids_are_rejected() {
        for spec in ["4294967296", "-1", "2147483648", "1000:4294967296", "1:-5"] {
            assert_eq!(
                resolve(spec, Some(PASSWD), Some(GROUP)),
                Err(UserError::OutOfRange),
                "{spec}"
            );
        }
        assert_eq!(resolve_ok("2147483647").uid, 2_147_483_647);
        let huge_entry = "big:x:5000000000:0::/:/bin/sh\n";
        assert_eq!(
            resolve("big", Some(huge_entry), None),
            Err(UserError::OutOfRange)
        );
    }

    #[test]
    fn entries_without_home_fall_back_to_root_dir() {
        assert_eq!(resolve_ok("nohome").home, "/");
    }
}
