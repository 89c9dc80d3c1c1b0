//! Throwaway certificates, for testing TLS against a real server.
//!
//! [`TestCa`] is a fresh certificate authority that lives for one test;
//! [`TestCa::issue`] signs a server certificate with it, which
//! [`PostgresOptions::tls`](crate::PostgresOptions::tls) serves. A client
//! that trusts [`TestCa::pem`] then checks the server the way it would
//! check a deployed one (chain and name), with nothing mocked.

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};

use crate::TestkitError;

/// A certificate authority made for one test.
pub struct TestCa {
    certificate: Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate and its private key, PEM, issued by a [`TestCa`].
#[derive(Clone)]
pub struct IssuedCertificate {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("IssuedCertificate").finish_non_exhaustive()
    }
}

fn tls_error(what: &str) -> impl FnOnce(rcgen::Error) -> TestkitError + '_ {
    move |e| TestkitError::Tls {
        detail: format!("{what}: {e}"),
    }
}

impl TestCa {
    /// A new CA named `name` (its common name), with a fresh key.
    pub fn generate(name: &str) -> Result<Self, TestkitError> {
        let key = KeyPair::generate().map_err(tls_error("generating a CA key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(tls_error("building the CA certificate"))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let certificate = params
            .self_signed(&key)
            .map_err(tls_error("signing the CA certificate"))?;
        Ok(Self { certificate, key })
    }

    /// The CA's certificate, PEM: what a client trusts.
    pub fn pem(&self) -> String {
        self.certificate.pem()
    }

    /// A server certificate for `names` (each a DNS name or an IP
    /// address), signed by this CA, with a fresh key.
    pub fn issue(&self, names: &[&str]) -> Result<IssuedCertificate, TestkitError> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params =
            CertificateParams::new(names).map_err(tls_error("building a server certificate"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "bridgekeys test server");
        self.sign(params)
    }

    /// A client certificate whose common name is `user`: what PostgreSQL's
    /// `cert` authentication takes as the role's name.
    pub fn issue_client(&self, user: &str) -> Result<IssuedCertificate, TestkitError> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(tls_error("building a client certificate"))?;
        params.distinguished_name.push(DnType::CommonName, user);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<IssuedCertificate, TestkitError> {
        let key = KeyPair::generate().map_err(tls_error("generating a key"))?;
        let certificate = params
            .signed_by(&key, &self.certificate, &self.key)
            .map_err(tls_error("signing a certificate"))?;
        Ok(IssuedCertificate {
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
