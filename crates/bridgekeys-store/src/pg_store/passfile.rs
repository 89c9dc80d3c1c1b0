//! libpq's password file, so a bridge's password can live in a file only
//! its user can read instead of in `config.toml` or the environment.
//!
//! Which file: the connection string's `passfile`, else `PGPASSFILE`, else
//! `~/.pgpass`. It is read only when neither the string nor `PGPASSWORD`
//! gives a password, and, as libpq does, ignored (with a warning naming
//! the file) when its group or others may read it.
//!
//! Each line is `host:port:database:user:password`; `*` in one of the
//! first four fields matches anything, `\:` and `\\` stand for `:` and
//! `\`, and lines starting with `#` are comments. The first line that
//! matches wins. A Unix-socket connection matches the host `localhost`.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

/// What a password is looked up for.
pub(crate) struct Target<'a> {
    pub(crate) host: &'a str,
    pub(crate) port: u16,
    pub(crate) database: &'a str,
    pub(crate) user: &'a str,
}

/// The file to read: `explicit` (the string's `passfile`), else
/// `PGPASSFILE`, else `~/.pgpass`; `None` if there is no home either.
pub(crate) fn path(
    explicit: Option<PathBuf>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<PathBuf> {
    explicit
        .or_else(|| env("PGPASSFILE").map(PathBuf::from))
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".pgpass")))
}

/// The password `file` holds for `target`: `None` when the file is
/// missing, readable by others (ignored, with a warning), or has no line
/// for it. An unreadable file is an error: it was meant to be used.
pub(crate) fn lookup(file: &Path, target: &Target<'_>) -> Result<Option<String>, String> {
    let metadata = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("password file {}: {e}", file.display())),
    };
    if !metadata.is_file() {
        return Ok(None);
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        tracing::warn!(file = %file.display(),
            "password file has group or world access; ignored (make it u=rw, 0600)");
        return Ok(None);
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("password file {}: {e}", file.display()))?;
    Ok(find(&text, target))
}

/// The first matching line's password.
fn find(text: &str, target: &Target<'_>) -> Option<String> {
    let port = target.port.to_string();
    let wanted = [target.host, port.as_str(), target.database, target.user];
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = fields(line)?;
            wanted
                .iter()
                .zip(&fields[..4])
                .all(|(want, field)| field == "*" || field == want)
                .then(|| fields[4].clone())
        })
}

/// A line's five fields, unescaped; `None` for a line with fewer.
fn fields(line: &str) -> Option<[String; 5]> {
    let mut fields: [String; 5] = Default::default();
    let mut index = 0;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(escaped) = chars.next() {
                    fields[index].push(escaped);
                }
            }
            ':' if index < 4 => index += 1,
            c => fields[index].push(c),
        }
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
db.internal:*:echo:bridge:pa\\:ss\\\\word:tail
*:*:*:*:too-late
";
        assert_eq!(find(text, &target()).as_deref(), Some("pa:ss\\word:tail"));
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
        assert_eq!(lookup(&file, &target()), Ok(Some("secret".into())));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(lookup(&file, &target()), Ok(None));
        assert_eq!(lookup(&dir.path().join("missing"), &target()), Ok(None));
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
