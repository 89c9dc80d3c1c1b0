//! A PostgreSQL connection string split into what tokio-postgres reads
//! and what this store handles itself: libpq's TLS parameters (`sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`; see [`super::tls`] for their
//! meanings) and `passfile` (see [`super::passfile`]).
//!
//! Both libpq forms are read: a `postgres://` or `postgresql://` URL, whose
//! other query parameters stay exactly as written, and a key-value string,
//! whose other pairs are written back quoted. Errors never quote the
//! string (it may hold a password): they say where, or what to write
//! instead. A URL that tokio-postgres would read differently from libpq
//! (an `@` left unescaped in the password, or one in the query of a URL
//! without a user) is refused, since it would connect to another host.

use std::path::PathBuf;

use tokio_postgres::config::SslMode;

use super::tls::{ClientCert, Mode, PgTlsError, Roots, TlsPolicy};

/// A connection string split into what tokio-postgres parses and the TLS
/// settings this module handles. Its `Debug` shows only the TLS settings:
/// the rest may hold a password.
pub(crate) struct ConnectionString {
    /// The string without `sslmode`, `sslrootcert`, `sslcert`, `sslkey`
    /// and `passfile`.
    pub(crate) rest: String,
    /// The TLS policy (the mode is also set on the parsed config).
    pub(crate) tls: TlsPolicy,
    /// libpq's `passfile`: the password file to read (see `passfile.rs`).
    pub(crate) passfile: Option<PathBuf>,
}

/// An environment variable as libpq reads it: an empty one counts as
/// unset (and one that is not UTF-8 too).
pub(super) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionString")
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl ConnectionString {
    /// Split `url` (a `postgres://` / `postgresql://` URL or a libpq
    /// key-value string) and check its TLS settings; `PGSSLMODE` and
    /// `PGSSLROOTCERT` fill in what it leaves out.
    pub(crate) fn parse(url: &str) -> Result<Self, PgTlsError> {
        Self::parse_with_env(url, env)
    }

    /// [`ConnectionString::parse`] with the environment given.
    fn parse_with_env(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, PgTlsError> {
        let (rest, found) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            split_url(url)?
        } else {
            split_key_values(url)?
        };
        let mode = found.mode.or_else(|| env("PGSSLMODE"));
        // A client certificate written in the string must be whole and go
        // over TLS; one only from the environment (set for every program)
        // is used when it is whole and TLS is on, and else left alone, as
        // libpq leaves it.
        let written = found.cert.is_some() || found.key.is_some();
        let client = match (
            found.cert.or_else(|| env("PGSSLCERT")),
            found.key.or_else(|| env("PGSSLKEY")),
        ) {
            (Some(cert), Some(key)) => Some(ClientCert {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }),
            (None, None) => None,
            _ if written => return Err(PgTlsError::HalfAClientCertificate),
            _ => None,
        };
        let roots = found.root.or_else(|| env("PGSSLROOTCERT")).map(|r| {
            if r == "system" {
                Roots::System
            } else {
                Roots::File(PathBuf::from(r))
            }
        });
        let mode = match (mode, &roots) {
            (Some(m), _) => Mode::parse(&m)?,
            (None, Some(Roots::System)) => Mode::VerifyFull,
            (None, _) => Mode::Prefer,
        };
        if roots == Some(Roots::System) && mode != Mode::VerifyFull {
            return Err(PgTlsError::SystemRootsNeedFullCheck { mode: mode.name() });
        }
        if matches!(mode, Mode::VerifyCa | Mode::VerifyFull) && roots.is_none() {
            return Err(PgTlsError::MissingRoot { mode: mode.name() });
        }
        let client = match client {
            Some(_) if mode == Mode::Disable && written => {
                return Err(PgTlsError::ClientCertificateWithoutTls);
            }
            Some(_) if mode == Mode::Disable => None,
            other => other,
        };
        Ok(Self {
            rest,
            tls: TlsPolicy {
                mode,
                roots,
                client,
            },
            passfile: found.passfile.map(PathBuf::from),
        })
    }

    /// The rest parsed by tokio-postgres, with the TLS mode set.
    ///
    /// The rest must not name a mode itself: that can only happen when the
    /// split misread the string (a `?` or `&` left unescaped in a
    /// password), and the mode it hid must not be quietly replaced.
    pub(crate) fn config(&self) -> Result<tokio_postgres::Config, String> {
        let mut config: tokio_postgres::Config =
            self.rest.parse().map_err(|e: tokio_postgres::Error| {
                let e = e.to_string();
                // "unknown option `...`" quotes the string: with an
                // unescaped space or '&' in a password, part of it.
                if e.contains("unknown option") {
                    "invalid PostgreSQL url: an unknown option (is a space or '&' in a value \
                     not quoted or percent-encoded?)"
                        .to_owned()
                } else {
                    format!("invalid PostgreSQL url: {e}")
                }
            })?;
        if config.get_ssl_mode() != SslMode::Prefer {
            return Err(
                "invalid PostgreSQL url: sslmode could not be read where it is written \
                 (percent-encode any '?', '@', '&' or '/' in the user name or password)"
                    .into(),
            );
        }
        config.ssl_mode(self.tls.mode.wire());
        // tokio-postgres names the server for TLS by `host` only, and
        // refuses TLS without one; libpq uses `hostaddr` then. So an
        // address given alone is also the host's name (connections still go
        // to the address), and its certificate is checked against it.
        if config.get_hosts().is_empty() && !config.get_hostaddrs().is_empty() {
            for addr in config.get_hostaddrs().to_vec() {
                config.host(addr.to_string());
            }
        }
        // libpq ignores `sslmode` over a Unix socket: the connection does
        // not leave the machine, and PostgreSQL never offers TLS there.
        // tokio-postgres would still ask for TLS, and refuse `require` and
        // stronger when the server says no: a string that works with psql
        // would fail here. So when every host is a socket directory, TLS is
        // not asked for at all. (A list mixing sockets and TCP hosts keeps
        // its mode: tokio-postgres has one mode for every host.)
        if unix_sockets_only(&config) {
            config.ssl_mode(SslMode::Disable);
        }
        Ok(config)
    }
}

/// Whether the connection goes to Unix sockets only (every host a socket
/// directory, no `hostaddr`).
#[cfg(unix)]
fn unix_sockets_only(config: &tokio_postgres::Config) -> bool {
    !config.get_hosts().is_empty()
        && config.get_hostaddrs().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|host| matches!(host, tokio_postgres::config::Host::Unix(_)))
}

#[cfg(not(unix))]
fn unix_sockets_only(_: &tokio_postgres::Config) -> bool {
    false
}

/// The TLS parameters found in a connection string (libpq's names).
#[derive(Default)]
struct Found {
    mode: Option<String>,
    root: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    passfile: Option<String>,
}

impl Found {
    /// Keep `value` if `key` is one of ours; whether it was.
    fn take(
        &mut self,
        key: &str,
        value: impl FnOnce() -> Result<String, PgTlsError>,
    ) -> Result<bool, PgTlsError> {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.root,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            "passfile" => &mut self.passfile,
            _ => return Ok(false),
        };
        *slot = Some(value()?);
        Ok(true)
    }
}

/// The string without our parameters, and what they said.
type Split = (String, Found);

/// A URL: `sslmode` and `sslrootcert` leave the query; the other
/// parameters stay exactly as written.
fn split_url(url: &str) -> Result<Split, PgTlsError> {
    // As tokio-postgres reads it: the credentials end at the first '@',
    // the query starts at the first '?' after them.
    let scheme = url.find("://").map_or(0, |i| i + 3);
    let after_credentials = url[scheme..].find('@').map_or(scheme, |i| scheme + i + 1);
    // Where tokio-postgres and libpq would read different hosts (an '@'
    // left in the password, or an '@' in the query and no user), refuse
    // rather than connect somewhere else, maybe without the checks asked
    // for. The message quotes nothing: it would be part of a password.
    let user = url[scheme..after_credentials.saturating_sub(1).max(scheme)]
        .split(':')
        .next()
        .unwrap_or_default();
    let host_end = url[after_credentials..]
        .find(['/', '?'])
        .map_or(url.len(), |i| after_credentials + i);
    if user.contains(['/', '?', '=', '&']) || url[after_credentials..host_end].contains('@') {
        return Err(PgTlsError::Malformed(
            "the user name, password or query holds a character that must be \
             percent-encoded there ('@', '/', '?', '=' or '&')"
                .into(),
        ));
    }
    let Some(at) = url[after_credentials..]
        .find('?')
        .map(|i| after_credentials + i)
    else {
        return Ok((url.to_owned(), Found::default()));
    };
    let (base, query) = (&url[..at], &url[at + 1..]);
    let mut found = Found::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !found.take(&percent_decode(key)?, || percent_decode(value))? {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, found))
}

fn percent_decode(s: &str) -> Result<String, PgTlsError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| PgTlsError::Malformed("a bad %-escape in the query".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| PgTlsError::Malformed("a query parameter is not UTF-8".into()))
}

/// A key-value string (`host=db sslmode=verify-full ...`): values may be
/// single-quoted with `\'` and `\\` escapes, as libpq reads them. The
/// other pairs are written back, each value quoted. Errors say where, never
/// what: the text may be part of a password.
fn split_key_values(s: &str) -> Result<Split, PgTlsError> {
    let mut found = Found::default();
    let mut kept = Vec::new();
    let mut chars = s.char_indices().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_spaces(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let malformed =
            |what: &str| PgTlsError::Malformed(format!("the parameter at byte {start} {what}"));
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        skip_spaces(&mut chars);
        if key.is_empty() || chars.next().map(|(_, c)| c) != Some('=') {
            return Err(malformed("is not key=value"));
        }
        skip_spaces(&mut chars);
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some((_, c)) => value.push(c),
                        None => return Err(malformed("has an unclosed quote")),
                    },
                    Some(c) => value.push(c),
                    None => return Err(malformed("has an unclosed quote")),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Err(malformed("has no value (write '' for an empty one)"));
            }
        }
        let quoted = format!(
            "{key}='{}'",
            value.replace('\\', "\\\\").replace('\'', "\\'")
        );
        if !found.take(&key, || Ok(value))? {
            kept.push(quoted);
        }
    }
    Ok((kept.join(" "), found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_loses_only_the_tls_parameters_and_keeps_the_rest_as_written() {
        let cs = ConnectionString::parse_with_env("postgres://u:p%40ss@db:5433/bk?application_name=a%20b&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem&connect_timeout=3", |_| None)
.expect("parses");
        assert_eq!(
            cs.rest,
            "postgres://u:p%40ss@db:5433/bk?application_name=a%20b&connect_timeout=3"
        );
        assert_eq!(cs.tls.mode, Mode::VerifyFull);
        assert_eq!(
            cs.tls.roots,
            Some(Roots::File(PathBuf::from("/etc/ca dir/ca.pem")))
        );
        let config: tokio_postgres::Config =
            cs.rest.parse().expect("tokio-postgres reads the rest");
        assert_eq!(config.get_dbname(), Some("bk"));
        assert_eq!(config.get_password(), Some(&b"p@ss"[..]));
    }

    #[test]
    fn a_key_value_string_loses_only_the_tls_parameters_and_quoted_values_survive() {
        let cs = ConnectionString::parse_with_env(r"host=db  sslmode = verify-ca sslrootcert='/etc/my ca\'s.pem' password='a b\\c' dbname=bk", |_| None)
.expect("parses");
        assert_eq!(cs.tls.mode, Mode::VerifyCa);
        assert_eq!(
            cs.tls.roots,
            Some(Roots::File(PathBuf::from("/etc/my ca's.pem")))
        );
        let config: tokio_postgres::Config =
            cs.rest.parse().expect("tokio-postgres reads the rest");
        assert_eq!(config.get_password(), Some(&br"a b\c"[..]));
        assert_eq!(config.get_dbname(), Some("bk"));
    }

    #[test]
    fn without_sslmode_tls_is_preferred_and_system_names_the_public_roots() {
        let cs = ConnectionString::parse_with_env("postgres://u@db/bk", |_| None).expect("parses");
        assert_eq!((cs.tls.mode, cs.tls.roots), (Mode::Prefer, None));
        assert_eq!(cs.rest, "postgres://u@db/bk");
        let cs = ConnectionString::parse_with_env(
            "postgresql://u@db/bk?sslmode=verify-full&sslrootcert=system",
            |_| None,
        )
        .expect("parses");
        assert_eq!(cs.tls.roots, Some(Roots::System));
        assert_eq!(cs.rest, "postgresql://u@db/bk");
        cs.tls.connector().expect("the public roots load");
    }

    #[test]
    fn the_public_roots_mean_verify_full_and_the_environment_fills_in_what_the_string_leaves_out() {
        let cs =
            ConnectionString::parse_with_env("postgres://u@db/bk?sslrootcert=system", |_| None)
                .expect("parses");
        assert_eq!(
            (cs.tls.mode, cs.tls.roots),
            (Mode::VerifyFull, Some(Roots::System))
        );
        let env = |name: &str| match name {
            "PGSSLMODE" => Some("verify-ca".to_owned()),
            "PGSSLROOTCERT" => Some("/etc/ca.pem".to_owned()),
            _ => None,
        };
        let cs = ConnectionString::parse_with_env("host=db dbname=bk", env).expect("parses");
        assert_eq!(cs.tls.mode, Mode::VerifyCa);
        assert_eq!(
            cs.tls.roots,
            Some(Roots::File(PathBuf::from("/etc/ca.pem")))
        );
        // What the string says wins over the environment.
        let cs = ConnectionString::parse_with_env("host=db sslmode=disable", env).expect("parses");
        assert_eq!(cs.tls.mode, Mode::Disable);
        let err = ConnectionString::parse_with_env("host=db", |name| {
            (name == "PGSSLMODE").then(|| "verify-full".to_owned())
        })
        .expect_err("verify-full from the environment still needs a root");
        assert!(matches!(err, PgTlsError::MissingRoot { .. }), "{err}");
    }

    #[test]
    fn a_question_mark_in_the_password_does_not_hide_the_mode_and_no_mode_can_be_replaced_unseen() {
        let cs =
            ConnectionString::parse_with_env("postgres://u:pa?ss@db/bk?sslmode=require", |_| None)
                .expect("parses");
        assert_eq!(cs.tls.mode, Mode::Require);
        assert_eq!(cs.rest, "postgres://u:pa?ss@db/bk");
        let config = cs.config().expect("tokio-postgres reads the rest");
        assert_eq!(config.get_password(), Some(&b"pa?ss"[..]));
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        // Should a mode ever be left in the rest, it is refused, not
        // replaced by the one found.
        let misread = ConnectionString {
            rest: "postgres://u@db/bk?sslmode=require".into(),
            tls: TlsPolicy {
                mode: Mode::Prefer,
                roots: None,
                client: None,
            },
            passfile: None,
        };
        let err = misread.config().expect_err("a hidden mode");
        assert!(err.contains("sslmode could not be read"), "{err}");
    }

    #[test]
    fn an_address_given_without_a_host_also_names_the_server_for_tls() {
        let cs = ConnectionString::parse_with_env("hostaddr=10.0.0.5,10.0.0.6 user=u", |_| None)
            .expect("parses");
        let config = cs.config().expect("a config");
        let hosts: Vec<_> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(hosts, ["10.0.0.5", "10.0.0.6"]);
        assert_eq!(
            config.get_hostaddrs().len(),
            2,
            "still connected by address"
        );
        let cs = ConnectionString::parse_with_env("host=db hostaddr=10.0.0.5", |_| None)
            .expect("parses");
        assert_eq!(
            cs.config().expect("a config").get_hosts().len(),
            1,
            "a host is kept"
        );
    }

    #[test]
    fn over_unix_sockets_only_no_tls_is_asked_whatever_the_mode_as_in_libpq() {
        for string in [
            "host=/run/postgresql user=u sslmode=require",
            "postgres:///db?host=%2Frun%2Fpostgresql&sslmode=verify-full&sslrootcert=system",
            "host=/run/postgresql,/tmp user=u sslmode=require",
        ] {
            let cs = ConnectionString::parse_with_env(string, |_| None).expect("parses");
            assert_eq!(
                cs.config().expect("a config").get_ssl_mode(),
                SslMode::Disable,
                "{string}"
            );
        }
        // A TCP host among them keeps the mode.
        let cs = ConnectionString::parse_with_env(
            "host=/run/postgresql,db.example.org user=u sslmode=require",
            |_| None,
        )
        .expect("parses");
        assert_eq!(
            cs.config().expect("a config").get_ssl_mode(),
            SslMode::Require
        );
        // And TCP alone, of course.
        let cs = ConnectionString::parse_with_env("host=db.example.org sslmode=require", |_| None)
            .expect("parses");
        assert_eq!(
            cs.config().expect("a config").get_ssl_mode(),
            SslMode::Require
        );
    }

    #[test]
    fn a_url_that_tokio_postgres_would_read_another_way_is_refused_without_quoting_it() {
        for url in [
            "postgres://u:p@W0rd@db/bk?sslmode=verify-full&sslrootcert=/ca.pem",
            "postgres://db/bk?sslmode=verify-full&sslrootcert=/ca.pem&application_name=a@W0rd",
        ] {
            let err = ConnectionString::parse_with_env(url, |_| None).expect_err(url);
            assert!(matches!(err, PgTlsError::Malformed(_)), "{url}: {err}");
            assert!(!err.to_string().contains("W0rd"), "{err}");
        }
        // tokio-postgres's own "unknown option" quotes the string.
        let cs =
            ConnectionString::parse_with_env("host=db password=correct horse=battery", |_| None)
                .expect("splits");
        let err = cs.config().expect_err("an unknown option");
        assert!(!err.contains("horse") && !err.contains("battery"), "{err}");
    }

    #[test]
    fn a_client_certificate_only_in_the_environment_never_stops_a_string_that_works() {
        let both = |name: &str| match name {
            "PGSSLCERT" => Some("/env.crt".to_owned()),
            "PGSSLKEY" => Some("/env.key".to_owned()),
            _ => None,
        };
        let cs = ConnectionString::parse_with_env("host=db sslmode=disable", both).expect("plain");
        assert_eq!((cs.tls.mode, cs.tls.client), (Mode::Disable, None));
        let cs = ConnectionString::parse_with_env("host=db sslmode=require", both).expect("tls");
        assert_eq!(
            cs.tls.client.map(|c| c.cert),
            Some(PathBuf::from("/env.crt"))
        );
        let half = |name: &str| (name == "PGSSLCERT").then(|| "/env.crt".to_owned());
        let cs =
            ConnectionString::parse_with_env("host=db", half).expect("half from env is ignored");
        assert_eq!(cs.tls.client, None);
    }

    #[test]
    fn errors_and_debug_output_never_show_the_password() {
        let err = ConnectionString::parse_with_env("host=db password=hunter2 tail", |_| None)
            .expect_err("malformed");
        let text = err.to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("tail"),
            "{text}"
        );
        assert!(text.contains("byte 25"), "{text}");
        let cs =
            ConnectionString::parse_with_env("postgres://u:Secret9@db/bk?sslmode=require", |_| {
                None
            })
            .expect("parses");
        assert!(!format!("{cs:?}").contains("Secret9"));
        let config = crate::PgStoreConfig::new(
            "postgres://u:Secret9@db/bk?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            crate::StoreKey::generate(),
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("Secret9"), "{debug}");
        assert!(debug.contains("verify-full (/etc/ca.pem)"), "{debug}");
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_tls_and_a_bad_key_file_is_named_not_quoted() {
        let cs = ConnectionString::parse_with_env(
            "postgres://u@db/bk?sslmode=require&sslcert=%2Fc.crt&sslkey=%2Fc.key",
            |_| None,
        )
        .expect("parses");
        assert_eq!(
            cs.tls.client,
            Some(ClientCert {
                cert: "/c.crt".into(),
                key: "/c.key".into()
            })
        );
        assert_eq!(cs.rest, "postgres://u@db/bk");
        let env = |name: &str| (name == "PGSSLKEY").then(|| "/env.key".to_owned());
        let cs = ConnectionString::parse_with_env("host=db sslcert=/c.crt", env).expect("parses");
        assert_eq!(
            cs.tls.client.map(|c| c.key),
            Some(PathBuf::from("/env.key"))
        );
        for (url, expect) in [
            ("host=db sslcert=/c.crt", "go together"),
            ("host=db sslkey=/c.key", "go together"),
            (
                "host=db sslmode=disable sslcert=/c.crt sslkey=/c.key",
                "only shown over TLS",
            ),
        ] {
            let err = ConnectionString::parse_with_env(url, |_| None).expect_err(url);
            assert!(err.to_string().contains(expect), "{url}: {err}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("c.crt"), dir.path().join("c.key"));
        // A certificate file that parses, and a key file that does not.
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        std::fs::write(&key, "SECRET-KEY-MATERIAL").expect("write");
        let url = format!(
            "host=db sslmode=require sslcert='{}' sslkey='{}'",
            cert.display(),
            key.display()
        );
        let Err(err) = ConnectionString::parse_with_env(&url, |_| None)
            .expect("parses")
            .tls
            .connector()
        else {
            panic!("a connector from a bad key");
        };
        assert!(
            matches!(&err, PgTlsError::BadClientCertificate { path, .. } if *path == key),
            "{err}"
        );
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    #[test]
    fn unusable_tls_settings_are_refused_with_what_to_write_instead() {
        for (url, expect) in [
            (
                "postgres://u@db/bk?sslmode=verify-full",
                "needs sslrootcert",
            ),
            ("host=db sslmode=verify-ca", "needs sslrootcert"),
            ("postgres://u@db/bk?sslmode=allow", "not supported"),
            ("postgres://u@db/bk?sslmode=%zz", "%-escape"),
            ("host=db sslrootcert='/x", "unclosed quote"),
            ("host=db sslmode", "is not key=value"),
            ("host=db =x", "is not key=value"),
            ("host=db sslmode=", "has no value"),
            ("postgres://u@db/bk?sslmode=%+f", "%-escape"),
            (
                "postgres://u@db/bk?sslmode=require&sslrootcert=system",
                "only goes with sslmode=verify-full",
            ),
        ] {
            let err = ConnectionString::parse_with_env(url, |_| None).expect_err(url);
            assert!(err.to_string().contains(expect), "{url}: {err}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").expect("write");
        for file in [&missing, &not_pem] {
            let url = format!(
                "host=db sslmode=verify-full sslrootcert='{}'",
                file.display()
            );
            let Err(err) = ConnectionString::parse_with_env(&url, |_| None)
                .expect("the string parses")
                .tls
                .connector()
            else {
                panic!("{} gave a connector", file.display());
            };
            assert!(
                matches!(&err, PgTlsError::BadRoot { path, .. } if path == file),
                "{err}"
            );
        }
    }
}
