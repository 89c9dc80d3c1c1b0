//! libpq's password file, so a bridge's password can live in a file only
//! its user can read instead of in `config.toml` or the environment.
//!
//! Which file: the connection string's `passfile`, else `PGPASSFILE`, else
//! `~/.pgpass`. It is read only when neither the string nor `PGPASSWORD`
//! gives a password (an empty one counts as none), and, as libpq does,
//! ignored with a warning naming the file when its group or others may
//! read it, or when it cannot be read at all, so a stray file never stops
//! a bridge that needs none.
//!
//! Each line is `host:port:database:user:password`; `*` in one of the
//! first four fields matches anything, `\:` and `\\` stand for `:` and
//! `\`, the password ends at the next unescaped `:`, and lines starting
//! with `#` are comments. The first line that matches wins. A connection
//! over a Unix socket in the usual directory matches the host `localhost`,
//! one elsewhere the directory's path. With several hosts in the string no
//! password is looked up (libpq looks one up per host; this store uses one
//! password for all).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

/// What a password is looked up for.
struct Target<'a> {
    host: &'a str,
    port: u16,
    database: &'a str,
    user: &'a str,
}

/// The password the file holds for the server `pg` names, `explicit`
/// being the string's own `passfile`; `None` with several hosts.
pub(crate) fn password_for(
    pg: &tokio_postgres::Config,
    explicit: Option<PathBuf>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let host = host(pg)?;
    let file = path(explicit, env)?;
    let user = pg.get_user().unwrap_or_default();
    lookup(
        &file,
        &Target {
            host: &host,
            port: pg.get_ports().first().copied().unwrap_or(5432),
            database: pg.get_dbname().unwrap_or(user),
            user,
        },
    )
}

/// The host a password-file line must name: the one host (or address)
/// of the string, `localhost` for a Unix socket in the usual directory and
/// the directory's path for one elsewhere; `None` with several hosts.
fn host(pg: &tokio_postgres::Config) -> Option<String> {
    use tokio_postgres::config::Host;
    match (pg.get_hosts(), pg.get_hostaddrs()) {
        ([Host::Tcp(host)], _) => Some(host.clone()),
        ([Host::Unix(dir)], _) => Some(
            if ["/tmp", "/run/postgresql", "/var/run/postgresql"]
                .iter()
                .any(|usual| dir == Path::new(usual))
            {
                "localhost".to_owned()
            } else {
                dir.display().to_string()
            },
        ),
        ([], [addr]) => Some(addr.to_string()),
        ([], []) => Some("localhost".to_owned()),
        _ => None,
    }
}

/// The file to read: `explicit` (the string's `passfile`), else
/// `PGPASSFILE`, else `~/.pgpass`; `None` if there is no home either.
fn path(explicit: Option<PathBuf>, env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    explicit
        .or_else(|| env("PGPASSFILE").map(PathBuf::from))
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".pgpass")))
}

/// The password `file` holds for `target`: `None` when the file is
/// missing, has no line for it, or cannot be used (readable by others, not
/// a plain file, unreadable: each ignored with a warning naming the file,
/// as libpq ignores it).
fn lookup(file: &Path, target: &Target<'_>) -> Option<String> {
    let ignored = |why: &dyn std::fmt::Display| {
        tracing::warn!(file = %file.display(), %why, "password file ignored");
        None
    };
    let metadata = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return ignored(&e),
    };
    if !metadata.is_file() {
        return ignored(&"not a plain file");
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        return ignored(&"group or others may read it (make it u=rw, 0600)");
    }
    match std::fs::read(file) {
        // Bytes that are not UTF-8 only fail the lines they are on.
        Ok(bytes) => find(&String::from_utf8_lossy(&bytes), target),
        Err(e) => ignored(&e),
    }
}

/// The first matching line's password.
fn find(text: &str, target: &Target<'_>) -> Option<String> {
    let port = target.port.to_string();
    let wanted = [target.host, port.as_str(), target.database, target.user];
    text.split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let fields = fields(line)?;
            wanted
                .iter()
                .zip(&fields[..4])
                .all(|(want, field)| field.matches(want))
                .then(|| fields[4].text.clone())
        })
}

/// One field of a line, unescaped.
#[derive(Default)]
struct Field {
    text: String,
    /// Whether it was a bare `*` (an escaped `\*` is a star, not a
    /// wildcard).
    wildcard: bool,
    escaped: bool,
}

impl Field {
    fn matches(&self, want: &str) -> bool {
        self.wildcard || self.text == want
    }
}

/// A line's five fields; `None` for a line with fewer. The password ends
/// at the next unescaped `:`, as libpq reads it.
fn fields(line: &str) -> Option<[Field; 5]> {
    let mut fields: [Field; 5] = Default::default();
    let mut index = 0;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(escaped) = chars.next() {
                    fields[index].text.push(escaped);
                    fields[index].escaped = true;
                }
            }
            ':' if index < 4 => index += 1,
            ':' => break,
            c => fields[index].text.push(c),
        }
    }
    for field in &mut fields[..4] {
        field.wildcard = field.text == "*" && !field.escaped;
    }
    (index == 4).then_some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target<'static> {
        Target {
            host: "db.internal",
            port: 5432,
            database: "echo",
            user: "bridge",
        }
    }

    #[test]
    fn the_first_matching_line_wins_with_wildcards_escapes_and_comments() {
        let text = "\
# comment:*:*:*:nope
db.internal:5432:other:bridge:wrong-database
  # not a comment: it does not start with '#'
db.internal:*:echo:bridge:pa\\:ss\\\\word:tail\r
*:*:*:*:too-late
";
        assert_eq!(find(text, &target()).as_deref(), Some("pa:ss\\word"));
        assert_eq!(
            find("db.internal:5432:\\*:bridge:x\n*:*:*:*:y", &target()).as_deref(),
            Some("y"),
            "an escaped star is a star, not a wildcard"
        );
        assert_eq!(
            find("short:line\n*:*:*:bridge:any", &target()).as_deref(),
            Some("any")
        );
        assert_eq!(find("db.internal:5433:echo:bridge:x", &target()), None);
    }

    #[test]
    fn a_file_others_can_read_is_ignored_and_a_missing_one_is_no_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pgpass");
        std::fs::write(&file, "*:*:*:*:secret\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(lookup(&file, &target()), Some("secret".into()));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(lookup(&file, &target()), None);
        assert_eq!(lookup(&dir.path().join("missing"), &target()), None);
        assert_eq!(lookup(dir.path(), &target()), None, "a directory");
    }

    #[test]
    fn the_host_to_look_up_is_the_strings_one_host_or_socket_and_none_with_several() {
        let host = |s: &str| super::host(&s.parse().expect("a config"));
        assert_eq!(host("host=db.internal").as_deref(), Some("db.internal"));
        assert_eq!(
            host("host=/var/run/postgresql").as_deref(),
            Some("localhost")
        );
        assert_eq!(host("host=/srv/pg/sock").as_deref(), Some("/srv/pg/sock"));
        assert_eq!(host("hostaddr=10.0.0.5").as_deref(), Some("10.0.0.5"));
        assert_eq!(host("user=bridge").as_deref(), Some("localhost"));
        assert_eq!(host("host=a,b"), None);
    }

    #[test]
    fn the_file_is_the_strings_then_pgpassfile_then_the_homes() {
        let env = |name: &str| match name {
            "PGPASSFILE" => Some("/env/pgpass".to_owned()),
            "HOME" => Some("/home/bridge".to_owned()),
            _ => None,
        };
        assert_eq!(
            path(Some("/s/pgpass".into()), env),
            Some("/s/pgpass".into())
        );
        assert_eq!(path(None, env), Some("/env/pgpass".into()));
        let home = |name: &str| (name == "HOME").then(|| "/home/bridge".to_owned());
        assert_eq!(path(None, home), Some("/home/bridge/.pgpass".into()));
        assert_eq!(path(None, |_| None), None);
    }
}
