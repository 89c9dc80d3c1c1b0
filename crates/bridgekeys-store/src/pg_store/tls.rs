//! TLS to the database, with libpq's `sslmode`, `sslrootcert`, `sslcert`
//! and `sslkey`.
//!
//! A bridge that outgrows one process usually talks to a database on
//! another machine, and operators already write libpq's connection
//! parameters (Synapse and most bridges take them). tokio-postgres knows
//! only `sslmode=disable|prefer|require` and no root certificates, so
//! [`ConnectionString::parse`](super::connection_string::ConnectionString::parse)
//! takes these parameters out of the string and hands the rest to
//! tokio-postgres, and [`TlsPolicy::connector`] builds the rustls
//! configuration that gives each mode libpq's meaning:
//!
//! | `sslmode` | TLS | the server's certificate is checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (the default) | when the server offers it | no |
//! | `require` | always | against `sslrootcert` if one is given (chain, not name), else not |
//! | `verify-ca` | always | chains to `sslrootcert` |
//! | `verify-full` | always | chains to `sslrootcert` and names the host |
//!
//! `sslrootcert` is a PEM file of one or more CA certificates, or `system`
//! for the public web PKI roots (Mozilla's list, as the homeserver client
//! uses). As in libpq 16 and later, `system` means `verify-full`: it is the
//! mode when none is given, and a weaker one is refused (anyone can get a
//! publicly trusted certificate for *some* name). `verify-ca` and
//! `verify-full` need a root: unlike libpq, there is no default file under
//! the home directory to fall back on silently. As libpq does, the
//! environment's `PGSSLMODE` and `PGSSLROOTCERT` stand in for a parameter
//! the string leaves out.
//!
//! A server that authenticates clients by certificate (`cert` in
//! `pg_hba.conf`) gets the one `sslcert` and `sslkey` name (PEM files; the
//! key unencrypted, as `sslpassword` is not supported); a pair written in
//! the string must be whole and go over TLS. `PGSSLCERT` and `PGSSLKEY`
//! are used when both are set and TLS is on, and are otherwise left alone.
//! Unlike libpq, nothing is read from the home directory unasked.
//!
//! An address given without a host (`hostaddr` alone) also names the
//! server for TLS, as in libpq: `verify-full` then checks the address
//! against the certificate.
//!
//! Over Unix sockets only (every host a socket directory), `sslmode` is
//! ignored, as in libpq: the server never offers TLS there. Where
//! tokio-postgres differs from libpq otherwise, it wins: `prefer` does not
//! try again without TLS when the handshake fails (write `sslmode=disable`
//! for a server whose TLS cannot be negotiated), and a host list that mixes
//! sockets and TCP hosts has one mode for all of them (`require` or
//! stronger then fails on the sockets).
//!
//! Without a certificate check (`prefer`, `require` without a root) the
//! connection is encrypted against a passive listener only, exactly as
//! with libpq; the handshake's signatures are still verified. Secrets are
//! sealed before they reach the database in every mode.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Why a connection string's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgTlsError {
    /// `sslmode` is not one of libpq's modes this store supports.
    #[error(
        "sslmode={0:?} is not supported (use disable, prefer, require, verify-ca or verify-full)"
    )]
    UnknownMode(String),
    /// `sslrootcert=system` with a mode weaker than `verify-full`.
    #[error(
        "sslrootcert=system trusts every public CA, so it only goes with sslmode=verify-full, \
         not sslmode={mode}"
    )]
    SystemRootsNeedFullCheck {
        /// The mode asked for.
        mode: &'static str,
    },
    /// `verify-ca` or `verify-full` without `sslrootcert`.
    #[error(
        "sslmode={mode} checks the server's certificate, so it needs sslrootcert=<CA file> \
         (or sslrootcert=system for the public web PKI roots)"
    )]
    MissingRoot {
        /// The mode asked for.
        mode: &'static str,
    },
    /// The `sslrootcert` file cannot be read or holds no usable certificate.
    #[error("sslrootcert {path}: {reason}")]
    BadRoot {
        /// The file named.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `sslcert` without `sslkey`, or the other way round.
    #[error("sslcert and sslkey go together: a client certificate needs its key")]
    HalfAClientCertificate,
    /// A client certificate with `sslmode=disable`.
    #[error("sslcert is only shown over TLS, and sslmode=disable turns TLS off")]
    ClientCertificateWithoutTls,
    /// The `sslcert` or `sslkey` file cannot be used.
    #[error("client certificate {path}: {reason}")]
    BadClientCertificate {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A parameter of the connection string is malformed.
    #[error("invalid PostgreSQL connection string: {0}")]
    Malformed(String),
}

/// libpq's `sslmode`, all five that make sense for a client that must not
/// silently lose encryption it was asked for (`allow` is left out: it
/// prefers no TLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    pub(super) fn parse(value: &str) -> Result<Self, PgTlsError> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(PgTlsError::UnknownMode(other.to_owned())),
        })
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether TLS may be skipped.
    pub(super) fn wire(self) -> SslMode {
        match self {
            Self::Disable => SslMode::Disable,
            Self::Prefer => SslMode::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => SslMode::Require,
        }
    }
}

/// Where the CA certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Roots {
    File(PathBuf),
    System,
}

/// How connections are encrypted and what is checked.
#[derive(Clone, Debug)]
pub(crate) struct TlsPolicy {
    pub(super) mode: Mode,
    pub(super) roots: Option<Roots>,
    /// The certificate this client shows, for servers that authenticate
    /// clients by certificate (`cert` in `pg_hba.conf`).
    pub(super) client: Option<ClientCert>,
}

/// libpq's `sslcert` and `sslkey`: PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ClientCert {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

impl TlsPolicy {
    /// A short description for logs and `Debug` (never a secret).
    pub(crate) fn describe(&self) -> String {
        let mut text = match &self.roots {
            None => self.mode.name().to_owned(),
            Some(Roots::System) => format!("{} (system roots)", self.mode.name()),
            Some(Roots::File(path)) => format!("{} ({})", self.mode.name(), path.display()),
        };
        if let Some(client) = &self.client {
            text.push_str(&format!(", client certificate {}", client.cert.display()));
        }
        text
    }

    /// The rustls connector every pooled connection uses.
    pub(crate) fn connector(&self) -> Result<MakeRustlsConnect, PgTlsError> {
        // ring, as the homeserver client uses: aws-lc-rs needs cmake to
        // build. rustls 0.23.48 deprecates ring's provider because it has no
        // post-quantum key exchange; PostgreSQL servers offer X25519, which
        // it has.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let check = match self.mode {
            Mode::Disable | Mode::Prefer => Check::Nothing,
            Mode::Require if self.roots.is_none() => Check::Nothing,
            Mode::Require | Mode::VerifyCa => Check::Chain,
            Mode::VerifyFull => Check::ChainAndName,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (check, &self.roots) {
            (Check::Nothing, _) => Arc::new(Unchecked {
                algorithms: provider.signature_verification_algorithms,
            }),
            (_, None) => {
                return Err(PgTlsError::MissingRoot {
                    mode: self.mode.name(),
                });
            }
            (check, Some(roots)) => {
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(root_store(roots)?),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| PgTlsError::BadRoot {
                    path: roots.path(),
                    reason: e.to_string(),
                })?;
                if check == Check::ChainAndName {
                    webpki
                } else {
                    Arc::new(AnyName { inner: webpki })
                }
            }
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PgTlsError::Malformed(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.client {
            None => config.with_no_client_auth(),
            Some(client) => {
                let (chain, key) = client.load()?;
                config.with_client_auth_cert(chain, key).map_err(|e| {
                    PgTlsError::BadClientCertificate {
                        path: client.key.clone(),
                        reason: e.to_string(),
                    }
                })?
            }
        };
        // PostgreSQL 17 requires it for `sslnegotiation=direct`; servers
        // that do not know it ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(MakeRustlsConnect::new(config))
    }
}

impl Roots {
    fn path(&self) -> PathBuf {
        match self {
            Self::File(p) => p.clone(),
            Self::System => PathBuf::from("system"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

impl ClientCert {
    /// The certificate chain and its private key (PKCS#8, PKCS#1 or SEC1;
    /// not encrypted: libpq's `sslpassword` is not supported).
    fn load(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PgTlsError> {
        let bad = |path: &Path, reason: String| PgTlsError::BadClientCertificate {
            path: path.to_owned(),
            reason,
        };
        let chain = read_pem_certificates(&self.cert).map_err(|r| bad(&self.cert, r))?;
        if chain.is_empty() {
            return Err(bad(&self.cert, "no certificate in it".into()));
        }
        let pem = std::fs::read(&self.key).map_err(|e| bad(&self.key, e.to_string()))?;
        // The reason never quotes the file: it holds a private key.
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
            bad(
                &self.key,
                "no unencrypted PEM private key in it (PKCS#8, PKCS#1 or SEC1)".into(),
            )
        })?;
        Ok((chain, key))
    }
}

/// The CA certificates of `roots`.
fn root_store(roots: &Roots) -> Result<RootCertStore, PgTlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Roots::File(path) => {
            let bad = |reason: String| PgTlsError::BadRoot {
                path: path.clone(),
                reason,
            };
            let certs = read_pem_certificates(path).map_err(bad)?;
            let (added, _ignored) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(bad("no usable CA certificate in it".into()));
            }
        }
    }
    Ok(store)
}

fn read_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))
}

/// `verify-ca`: the chain must lead to a trusted root, whatever name the
/// certificate is for (libpq's meaning; for databases reached by an
/// address their certificate does not name).
#[derive(Debug)]
struct AnyName {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first and the name last, so a name error
        // means the chain was good.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `prefer`, and `require` without a root: encryption only, as libpq does.
/// The handshake's signatures are still checked against the certificate's
/// key (so the session key is the server's, whoever that server is).
#[derive(Debug)]
struct Unchecked {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
