//! TLS at run time: each listener's server configuration (certificate chain and key read
//! from PEM files, re-read on every reload) and each upstream's client configuration
//! (verification by the system roots, a CA file, a pinned certificate, or none).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::UpstreamTlsVerify;

/// Where Debian, Fedora/RHEL and others keep the system's CA bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// ring, the project's one crypto provider (DEPENDENCIES.md: no aws-lc-sys, no cmake).
/// rustls 0.23.48 deprecates it for lacking post-quantum key exchange; SMTP peers negotiate
/// classical X25519/ECDHE with it, which is what opportunistic STARTTLS meets in practice.
#[allow(deprecated)]
fn ring_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring_provider())
}

/// Installs ring as the process-wide provider, so a crate that enables another provider
/// later cannot make rustls panic for want of a default.
pub fn install_default_provider() {
    let _ = ring_provider().install_default();
}

/// The server side of a listener: TLS 1.2 and 1.3 with the given chain and key.
///
/// # Errors
/// A message naming the file and what is wrong with it.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read certificate file {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM in certificate file {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not match or are unusable: {e}"))?;
    Ok(Arc::new(config))
}

/// The client side towards an upstream MTA.
///
/// # Errors
/// A message naming what could not be loaded.
pub fn client_config(
    verify: &UpstreamTlsVerify,
    ca_file: Option<&Path>,
    pins: &[String],
) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let config = match verify {
        UpstreamTlsVerify::System => {
            let path = SYSTEM_BUNDLES
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .ok_or("no system CA bundle found (install ca-certificates or set tls_ca_file)")?;
            builder.with_root_certificates(roots(path)?).with_no_client_auth()
        }
        UpstreamTlsVerify::CaFile => {
            let path = ca_file.ok_or("tls_verify = \"ca_file\" needs tls_ca_file")?;
            builder.with_root_certificates(roots(path)?).with_no_client_auth()
        }
        UpstreamTlsVerify::Pin => {
            let pins = pins.iter().map(|p| parse_pin(p)).collect::<Result<Vec<_>, _>>()?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified {
                    provider: provider(),
                    pins: Some(pins),
                }))
                .with_no_client_auth()
        }
        UpstreamTlsVerify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified {
                provider: provider(),
                pins: None,
            }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("bad PEM in CA file {}: {e}", path.display()))?;
        store
            .add(c)
            .map_err(|e| format!("unusable CA certificate in {}: {e}", path.display()))?;
    }
    if store.is_empty() {
        return Err(format!("no CA certificate in {}", path.display()));
    }
    Ok(store)
}

/// A SHA-256 fingerprint written as 64 hex digits, colons allowed.
pub fn parse_pin(text: &str) -> Result<[u8; 32], String> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    let bad = || format!("{text:?} is not a SHA-256 fingerprint (64 hex digits)");
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// SHA-256 of a certificate, as pinned in `tls_pin_sha256`.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The server name to verify and send as SNI: the host part of `host:port`.
pub fn server_name(address: &str, configured: Option<&str>) -> Result<ServerName<'static>, String> {
    let host = match configured {
        Some(h) => h.to_string(),
        None => match address.parse::<std::net::SocketAddr>() {
            Ok(sa) => sa.ip().to_string(),
            Err(_) => address.rsplit_once(':').map_or(address, |(h, _)| h).to_string(),
        },
    };
    ServerName::try_from(host.clone()).map_err(|_| format!("{host:?} is not a valid TLS server name"))
}

/// Accepts any certificate chain (`tls_verify = "none"`: encryption against passive
/// listeners, as Postfix's `may`), or only one whose leaf matches a pinned fingerprint.
/// Handshake signatures are always checked, so the peer must hold the certificate's key.
#[derive(Debug)]
struct Unverified {
    provider: Arc<CryptoProvider>,
    pins: Option<Vec<[u8; 32]>>,
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pins {
            Some(pins) if !pins.contains(&fingerprint(end_entity)) => Err(rustls::Error::General(
                "upstream certificate does not match tls_pin_sha256".into(),
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `TLSv1.3` / `TLS13_AES_256_GCM_SHA384`, for the Received header and logs.
pub fn describe(
    version: Option<rustls::ProtocolVersion>,
    suite: Option<rustls::SupportedCipherSuite>,
) -> (String, String) {
    let v = match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_string(),
    };
    let c = suite
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "unknown".into());
    (v, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_and_names() {
        let hex = "AB".repeat(32);
        assert_eq!(parse_pin(&hex).unwrap(), [0xAB; 32]);
        let colons: Vec<String> = (0..32).map(|_| "ab".to_string()).collect();
        assert_eq!(parse_pin(&colons.join(":")).unwrap(), [0xAB; 32]);
        assert!(parse_pin("abcd").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
        assert!(matches!(
            server_name("127.0.0.1:25", None).unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("mx.example.com:25", None).unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(matches!(
            server_name("127.0.0.1:25", Some("mx.example.com")).unwrap(),
            ServerName::DnsName(_)
        ));
    }
}
