//! The site CA and secret tokens.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use thiserror::Error;

/// Making or writing trust material failed.
#[derive(Debug, Error)]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was being made.
        what: &'static str,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// Writing a file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The system's random source failed.
    #[error("no randomness available: {0}")]
    Random(String),
    /// A certificate, key or request cannot be used.
    #[error("{what}: {detail}")]
    Invalid {
        /// What was being read.
        what: String,
        /// Why it is unusable.
        detail: String,
    },
}

/// Name in the site's QUIC certificate; DPs connect to it.
pub const SITE_SERVER_NAME: &str = "ferry-site";
/// Prefix of enrollment tokens (format version 1).
const ENROLL_TOKEN_PREFIX: &str = "ferry1";
/// How long certificates issued by the site are valid.
const CERT_VALID_DAYS: i64 = 5 * 365;

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// The certificate.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

/// A certificate authority: certificate and private key, both PEM.
#[derive(Clone, Debug)]
pub struct CaFiles {
    /// The CA certificate.
    pub cert_pem: String,
    /// The CA private key.
    pub key_pem: String,
}

/// Makes a self-signed CA for the site `site_code`.
pub fn make_ca(site_code: &str) -> Result<CaFiles, PkiError> {
    let gen = |source| PkiError::Generate {
        what: "site CA",
        source,
    };
    let key = KeyPair::generate().map_err(gen)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Ferry site {site_code} CA"));
    dn.push(DnType::OrganizationName, "Ferry");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(gen)?;
    Ok(CaFiles {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn invalid(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |e| PkiError::Invalid {
        what,
        detail: e.to_string(),
    }
}

fn issuer(ca: &CaFiles) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(&ca.key_pem).map_err(invalid("site CA key"))?;
    Issuer::from_ca_cert_pem(&ca.cert_pem, key).map_err(invalid("site CA certificate"))
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(CERT_VALID_DAYS);
}

/// Issues the certificate the site presents on its QUIC endpoint
/// (name [`SITE_SERVER_NAME`]).
pub fn issue_site_cert(ca: &CaFiles, site_code: &str) -> Result<CertFiles, PkiError> {
    let gen = |source| PkiError::Generate {
        what: "site certificate",
        source,
    };
    let key = KeyPair::generate().map_err(gen)?;
    let mut params = CertificateParams::new(vec![SITE_SERVER_NAME.to_string()]).map_err(gen)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Ferry site {site_code}"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params);
    let cert = params.signed_by(&key, &issuer(ca)?).map_err(gen)?;
    Ok(CertFiles {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A DP's new private key (PEM) and a signing request for it (DER), for
/// its QUIC certificate or its HTTPS listener's.
pub fn make_csr(dp_name: &str) -> Result<(String, Vec<u8>), PkiError> {
    let gen = |source| PkiError::Generate {
        what: "DP key and certificate request",
        source,
    };
    let key = KeyPair::generate().map_err(gen)?;
    let mut params = CertificateParams::new(vec![]).map_err(gen)?;
    params.distinguished_name.push(DnType::CommonName, dp_name);
    let csr = params.serialize_request(&key).map_err(gen)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Signs a DP's certificate request. The subject is set to `dp_name`
/// whatever the request asked for; the certificate is for client use only.
pub fn sign_csr(ca: &CaFiles, csr_der: &[u8], dp_name: &str) -> Result<Vec<u8>, PkiError> {
    sign_for_dp(ca, csr_der, dp_name, "certificate", |p| {
        p.subject_alt_names = Vec::new();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(())
    })
}

/// Signs a request of DP `dp_name` with the subject set to its name, no CA
/// rights, the site's validity, and what `shape` sets; what the request
/// itself asked for is ignored.
fn sign_for_dp(
    ca: &CaFiles,
    csr_der: &[u8],
    dp_name: &str,
    what: &str,
    shape: impl FnOnce(&mut CertificateParams) -> Result<(), PkiError>,
) -> Result<Vec<u8>, PkiError> {
    let mut csr =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(invalid(format!("{what} request of DP {dp_name}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, dp_name);
    csr.params.distinguished_name = dn;
    csr.params.is_ca = IsCa::ExplicitNoCa;
    shape(&mut csr.params)?;
    validity(&mut csr.params);
    let cert = csr
        .signed_by(&issuer(ca)?)
        .map_err(invalid(format!("{what} of DP {dp_name}")))?;
    Ok(cert.der().to_vec())
}

/// Checks the names a DP asks its HTTPS certificate for: host names or
/// IP addresses, at least one, no wildcards.
pub fn check_server_names(names: &[String]) -> Result<(), PkiError> {
    let bad = |detail: String| PkiError::Invalid {
        what: "client listener names".into(),
        detail,
    };
    if names.is_empty() || names.len() > 16 {
        return Err(bad(format!(
            "{} names given: give 1 to 16 host names or addresses",
            names.len()
        )));
    }
    for n in names {
        if n.parse::<std::net::IpAddr>().is_ok() {
            continue;
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if n.len() > 253 || !n.split('.').all(label_ok) {
            return Err(bad(format!(
                "{n:?} is neither a host name (letters, digits, '-', dots) nor an IP address"
            )));
        }
    }
    Ok(())
}

fn subject_alt_names(names: &[String]) -> Result<Vec<rcgen::SanType>, PkiError> {
    names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(rcgen::SanType::IpAddress(ip)),
            Err(_) => n
                .clone()
                .try_into()
                .map(rcgen::SanType::DnsName)
                .map_err(invalid(format!("host name {n:?}"))),
        })
        .collect()
}

/// Signs the certificate of DP `dp_name`'s HTTPS listener: subject the
/// DP's name, the names checked by [`check_server_names`], server use
/// only. What the request itself asked for is ignored.
pub fn sign_server_csr(
    ca: &CaFiles,
    csr_der: &[u8],
    dp_name: &str,
    names: &[String],
) -> Result<Vec<u8>, PkiError> {
    check_server_names(names)?;
    sign_for_dp(ca, csr_der, dp_name, "HTTPS certificate", |p| {
        p.subject_alt_names = subject_alt_names(names)?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        Ok(())
    })
}

/// BLAKE3 of a certificate's DER, hex: how Ferry names and pins certificates.
pub fn fingerprint(der: &[u8]) -> String {
    blake3::hash(der).to_hex().to_string()
}

/// The DER of the first certificate in a PEM text.
pub fn cert_der(pem: &str, what: &str) -> Result<CertificateDer<'static>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Invalid {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

/// A one-time enrollment token: a secret the site checks, and the
/// fingerprint of the site CA the DP pins before sending anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollToken {
    /// 64 hex digits; the site stores only its BLAKE3.
    pub secret: String,
    /// [`fingerprint`] of the site CA certificate.
    pub ca_fingerprint: String,
}

impl std::fmt::Display for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{ENROLL_TOKEN_PREFIX}.{}.{}",
            self.secret, self.ca_fingerprint
        )
    }
}

impl std::str::FromStr for EnrollToken {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, PkiError> {
        let bad = || PkiError::Invalid {
            what: "enrollment token".into(),
            detail: "expected ferry1.<64 hex digits>.<64 hex digits>, as `ferry dp add` prints it"
                .into(),
        };
        let mut parts = s.trim().split('.');
        let (Some(ENROLL_TOKEN_PREFIX), Some(secret), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let hex64 = |x: &str| x.len() == 64 && x.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex64(secret) || !hex64(fp) {
            return Err(bad());
        }
        Ok(Self {
            secret: secret.to_ascii_lowercase(),
            ca_fingerprint: fp.to_ascii_lowercase(),
        })
    }
}

/// The site's manifest signing key (Ed25519).
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// A new key as PKCS#8 hex text, for [`write_secret`].
    pub fn generate() -> Result<String, PkiError> {
        let rng = ring::rand::SystemRandom::new();
        let doc =
            Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| PkiError::Random(e.to_string()))?;
        Ok(hex::encode(doc.as_ref()))
    }

    /// Reads a key written by [`SigningKey::generate`].
    pub fn from_text(text: &str, what: &str) -> Result<Self, PkiError> {
        let bad = |detail: String| PkiError::Invalid {
            what: what.to_string(),
            detail,
        };
        let der = hex::decode(text.trim()).map_err(|e| bad(e.to_string()))?;
        Ed25519KeyPair::from_pkcs8(&der)
            .map(Self)
            .map_err(|e| bad(e.to_string()))
    }

    /// Signs `body`.
    pub fn sign(&self, body: &[u8]) -> Vec<u8> {
        self.0.sign(body).as_ref().to_vec()
    }

    /// The public half, 32 bytes.
    pub fn public(&self) -> Vec<u8> {
        self.0.public_key().as_ref().to_vec()
    }
}

/// Whether `signature` is `public`'s Ed25519 signature over `body`.
pub fn verify_signature(public: &[u8], body: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public)
        .verify(body, signature)
        .is_ok()
}

/// A certificate's DER as PEM text.
pub fn cert_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// A fresh random secret as 64 hex digits (256 bits).
pub fn random_token() -> Result<String, PkiError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| PkiError::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

/// Writes `contents` to a new file only its owner can read (mode 0600).
/// Refuses to overwrite an existing file.
pub fn write_secret(path: &Path, contents: &str) -> Result<(), PkiError> {
    write_new(path, contents, 0o600)
}

/// Writes a public file (a certificate), refusing to overwrite.
pub fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    write_new(path, contents, 0o644)
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_and_token_are_fresh_and_private() {
        let ca = make_ca("FRY").unwrap();
        assert!(ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(ca.key_pem.contains("PRIVATE KEY"));
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_secret(&p, &a).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(write_secret(&p, &b).is_err(), "never overwrites");
    }

    #[test]
    fn dp_certificates_carry_the_site_given_name() {
        let ca = make_ca("FRY").unwrap();
        let (_key, csr) = make_csr("evil-name").unwrap();
        let der = sign_csr(&ca, &csr, "dp1").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "dp1");
        assert!(sign_csr(&ca, b"not a request", "dp1").is_err());
        assert!(issue_site_cert(&ca, "FRY").is_ok());
    }

    #[test]
    fn https_certificates_carry_the_asked_names_and_only_sane_ones() {
        let ca = make_ca("FRY").unwrap();
        let (_key, csr) = make_csr("dp1").unwrap();
        let names = vec!["dp1.branch.example".to_string(), "10.0.0.5".to_string()];
        let der = sign_server_csr(&ca, &csr, "dp1", &names).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let text = format!("{:?}", san.value.general_names);
        assert!(text.contains("dp1.branch.example"), "{text}");
        assert!(text.contains("[10, 0, 0, 5]"), "{text}");
        for bad in [
            vec![],
            vec!["*.example".to_string()],
            vec!["a b".to_string()],
        ] {
            assert!(sign_server_csr(&ca, &csr, "dp1", &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_parse_back_and_reject_garbage() {
        let t = EnrollToken {
            secret: random_token().unwrap(),
            ca_fingerprint: fingerprint(b"ca"),
        };
        assert_eq!(t.to_string().parse::<EnrollToken>().unwrap(), t);
        for bad in [
            "",
            "ferry1.abc.def",
            "ferry2.x.y",
            &t.to_string().replace('.', "-"),
        ] {
            assert!(bad.parse::<EnrollToken>().is_err(), "{bad}");
        }
    }

    #[test]
    fn signatures_verify_only_the_signed_bytes() {
        let key = SigningKey::from_text(&SigningKey::generate().unwrap(), "k").unwrap();
        let sig = key.sign(b"manifest");
        assert!(verify_signature(&key.public(), b"manifest", &sig));
        assert!(!verify_signature(&key.public(), b"manifesT", &sig));
        let other = SigningKey::from_text(&SigningKey::generate().unwrap(), "k").unwrap();
        assert!(!verify_signature(&other.public(), b"manifest", &sig));
    }
}
