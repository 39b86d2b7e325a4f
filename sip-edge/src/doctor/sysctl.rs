//! What a reboot will set: the sysctl.d files systemd-sysctl (and procps
//! `sysctl --system`) apply at boot, read in their order, so the doctor
//! can tell a setting that is only live from one that survives a reboot.
//!
//! Order (sysctl.d(5)): files named `*.conf` from `/etc/sysctl.d`,
//! `/run/sysctl.d`, `/usr/local/lib/sysctl.d`, `/usr/lib/sysctl.d`,
//! `/lib/sysctl.d`; a name in an earlier directory hides the same name in
//! a later one; all are applied sorted by file name, then
//! `/etc/sysctl.conf`. The last assignment of a key wins. Pure functions
//! over file texts; the caller reads the files.

use std::path::{Path, PathBuf};

/// The directories, highest priority first.
pub const DIRS: &[&str] = &[
    "/etc/sysctl.d",
    "/run/sysctl.d",
    "/usr/local/lib/sysctl.d",
    "/usr/lib/sysctl.d",
    "/lib/sysctl.d",
];

/// The classic file, applied last.
pub const SYSCTL_CONF: &str = "/etc/sysctl.conf";

/// Files in boot order, from each directory's listing.
pub fn boot_order(listings: &[(&str, Vec<PathBuf>)]) -> Vec<PathBuf> {
    let mut by_name: std::collections::BTreeMap<String, PathBuf> = Default::default();
    for dir in DIRS {
        let Some((_, files)) = listings.iter().find(|(d, _)| d == dir) else {
            continue;
        };
        for f in files {
            let Some(name) = f.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if name.ends_with(".conf") {
                by_name.entry(name).or_insert_with(|| f.clone());
            }
        }
    }
    let mut v: Vec<PathBuf> = by_name.into_values().collect();
    v.push(PathBuf::from(SYSCTL_CONF));
    v
}

/// A key in dotted form (`net/ipv4/ip_forward` and `net.ipv4.ip_forward`
/// are the same key; sysctl.d(5)).
pub fn normalise(key: &str) -> String {
    key.trim().trim_start_matches('-').replace('/', ".")
}

/// The value the files, in boot order, leave for `key`, with the file.
pub fn persisted(files: &[(PathBuf, String)], key: &str) -> Option<(String, PathBuf)> {
    let want = normalise(key);
    let mut found = None;
    for (path, text) in files {
        for line in text.lines() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
                continue;
            }
            let Some((k, v)) = l.split_once('=') else {
                continue;
            };
            if normalise(k) == want {
                found = Some((v.trim().to_owned(), path.clone()));
            }
        }
    }
    found
}

/// Whether `p` is `/etc/sysctl.conf` (shown as such in messages).
pub fn is_sysctl_conf(p: &Path) -> bool {
    p == Path::new(SYSCTL_CONF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etc_hides_lib_and_the_last_assignment_wins() {
        let order = boot_order(&[
            (
                "/usr/lib/sysctl.d",
                vec![
                    PathBuf::from("/usr/lib/sysctl.d/50-default.conf"),
                    PathBuf::from("/usr/lib/sysctl.d/90-x.conf"),
                ],
            ),
            (
                "/etc/sysctl.d",
                vec![
                    PathBuf::from("/etc/sysctl.d/90-x.conf"),
                    PathBuf::from("/etc/sysctl.d/README"),
                ],
            ),
        ]);
        assert_eq!(
            order,
            vec![
                PathBuf::from("/usr/lib/sysctl.d/50-default.conf"),
                PathBuf::from("/etc/sysctl.d/90-x.conf"),
                PathBuf::from(SYSCTL_CONF)
            ]
        );
        let files = vec![
            (
                order[0].clone(),
                "net.ipv4.ip_forward = 0\n# net.ipv4.ip_forward = 1\n".to_owned(),
            ),
            (order[1].clone(), "-net/ipv4/ip_forward=1\n".to_owned()),
        ];
        assert_eq!(
            persisted(&files, "net.ipv4.ip_forward"),
            Some(("1".to_owned(), order[1].clone()))
        );
        assert_eq!(persisted(&files, "net.ipv4.conf.all.rp_filter"), None);
    }
}
