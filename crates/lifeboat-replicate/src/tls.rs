//! Mutual TLS 1.3 between agents and the server.
//!
//! The server keeps a private CA (`lifeboat server init`). It signs its own
//! certificate (name [`SERVER_NAME`], whatever address agents dial) and one
//! client certificate per enrolled agent. An enrollment token carries the
//! fingerprint of the CA certificate, so an agent that holds nothing else
//! yet can still authenticate the server it enrolls with (it pins the CA
//! by fingerprint). After enrollment both sides verify each other against
//! the CA; the server also refuses certificates it has revoked (checked
//! after the handshake against its state database).
//!
//! Fingerprints are BLAKE3 of the DER certificate, in hex.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// The name in the server certificate; agents always verify this name (the
/// CA is private to one server, so the name need not match the address).
pub const SERVER_NAME: &str = "lifeboat-server";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// BLAKE3 of a DER certificate, in hex.
pub fn fingerprint(der: &[u8]) -> String {
    blake3::hash(der).to_hex().to_string()
}

/// The server's certificate authority.
pub struct Ca {
    pub cert_der: Vec<u8>,
    key: KeyPair,
    params: CertificateParams,
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Lifeboat");
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

impl Ca {
    /// A new CA named `name` (e.g. "Lifeboat CA <server>").
    ///
    /// # Errors
    /// Key generation or signing errors.
    pub fn create(name: &str) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let params = ca_params(name)?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_der: cert.der().to_vec(),
            key,
            params,
        })
    }

    /// The CA from its certificate, its key (PKCS#8 PEM) and its name.
    ///
    /// # Errors
    /// A key that does not parse.
    pub fn load(name: &str, cert_der: Vec<u8>, key_pem: &str) -> Result<Ca> {
        let key = KeyPair::from_pem(key_pem).context("the CA key does not parse")?;
        Ok(Ca {
            cert_der,
            key,
            params: ca_params(name)?,
        })
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn issue(&self, cn: &str, sans: Vec<String>, server: bool) -> Result<(Vec<u8>, Vec<u8>)> {
        let key = KeyPair::generate()?;
        let cert = self.sign(cn, sans, server, &key)?;
        Ok((cert, key.serialize_der()))
    }

    fn sign(
        &self,
        cn: &str,
        sans: Vec<String>,
        server: bool,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<Vec<u8>> {
        let mut p = CertificateParams::new(sans)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let mut serial = [0u8; 16];
        getrandom(&mut serial);
        serial[0] &= 0x7f;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(key, &issuer)?;
        Ok(cert.der().to_vec())
    }

    /// A client certificate for agent `agent_id` and the public key it sent
    /// at enrollment, once `proof` (its signature over the token and the
    /// key) verifies: the agent's private key never leaves the agent.
    ///
    /// # Errors
    /// A key that is not a P-256 point, a proof that does not verify.
    pub fn issue_agent_for(
        &self,
        agent_id: &str,
        token: &str,
        public_key: &[u8],
        proof: &[u8],
    ) -> Result<Vec<u8>> {
        verify_enrollment(token, public_key, proof)?;
        self.sign(
            agent_id,
            vec![],
            false,
            &AgentPublicKey(public_key.to_vec()),
        )
    }

    /// The server's certificate and key (DER).
    ///
    /// # Errors
    /// Signing errors.
    pub fn issue_server(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        self.issue(SERVER_NAME, vec![SERVER_NAME.to_string()], true)
    }

    /// A client certificate and key (DER) for agent `agent_id`.
    ///
    /// # Errors
    /// Signing errors.
    pub fn issue_agent(&self, agent_id: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        self.issue(agent_id, vec![], false)
    }
}

/// A public key an agent sent: a P-256 point.
struct AgentPublicKey(Vec<u8>);

impl rcgen::PublicKeyData for AgentPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// What an agent signs at enrollment.
fn enrollment_message(token: &str, public_key: &[u8]) -> Vec<u8> {
    let mut m = b"lifeboat enrollment v2\0".to_vec();
    m.extend_from_slice(token.as_bytes());
    m.push(0);
    m.extend_from_slice(public_key);
    m
}

/// Check an agent's proof of possession of the key it sent.
///
/// # Errors
/// A key that is not a P-256 point, or a proof that does not verify.
pub fn verify_enrollment(token: &str, public_key: &[u8], proof: &[u8]) -> Result<()> {
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        public_key,
    )
    .verify(&enrollment_message(token, public_key), proof)
    .map_err(|_| anyhow!("the enrollment proof does not verify against the public key sent"))
}

/// The agent's side of enrollment: a new P-256 key pair (PKCS#8 DER, to be
/// kept), its public key and the proof of possession for `token`.
///
/// # Errors
/// Key generation or signing errors.
pub fn enrollment_key(token: &str) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    use rcgen::SigningKey;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let public = key.public_key_raw().to_vec();
    let proof = key.sign(&enrollment_message(token, &public))?;
    Ok((key.serialize_der(), public, proof))
}

fn getrandom(b: &mut [u8]) {
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(b)
        .expect("system randomness");
}

/// Random bytes from the system.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom(&mut b);
    b
}

fn key_der(key: &[u8]) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec()))
}

fn roots(ca_der: &[u8]) -> Result<Arc<RootCertStore>> {
    let mut r = RootCertStore::empty();
    r.add(CertificateDer::from(ca_der.to_vec()))
        .context("the CA certificate is not usable")?;
    Ok(Arc::new(r))
}

/// The server side: TLS 1.3, its certificate chain, client certificates
/// verified against the CA when presented (enrollment comes without one;
/// the server then accepts nothing but an enrollment).
///
/// # Errors
/// Unusable certificates or keys.
pub fn server_config(ca_der: &[u8], cert_der: &[u8], key: &[u8]) -> Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| anyhow!("client verifier: {e}"))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![
                CertificateDer::from(cert_der.to_vec()),
                CertificateDer::from(ca_der.to_vec()),
            ],
            key_der(key),
        )
        .context("the server certificate or key is not usable")?;
    Ok(Arc::new(cfg))
}

/// An enrolled agent: verifies the server against the CA, presents its own
/// certificate.
///
/// # Errors
/// Unusable certificates or keys.
pub fn agent_config(ca_der: &[u8], cert_der: &[u8], key: &[u8]) -> Result<Arc<ClientConfig>> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_der)?)
        .with_client_auth_cert(vec![CertificateDer::from(cert_der.to_vec())], key_der(key))
        .context("the agent certificate or key is not usable")?;
    Ok(Arc::new(cfg))
}

/// An agent that is not enrolled: no client certificate, and the server is
/// trusted if its chain holds a CA with fingerprint `ca_pin` that signed it.
///
/// # Errors
/// TLS set-up errors.
pub fn enroll_config(ca_pin: &str) -> Result<Arc<ClientConfig>> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            pin: ca_pin.to_ascii_lowercase(),
            provider: provider(),
        }))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Trusts a server whose chain carries the pinned CA and verifies against it.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's CA does not match the token (wrong server, or a token of another server)".into(),
                )
            })?;
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots(ca).map_err(|e| rustls::Error::General(e.to_string()))?,
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        v.verify_server_cert(end_entity, &[], server_name, ocsp, now)
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

/// An enrollment token: `lbt1.<secret hex>.<CA fingerprint hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub secret: String,
    pub ca_pin: String,
}

impl Token {
    pub fn new(ca_der: &[u8]) -> Token {
        Token {
            secret: hex::encode(random::<16>()),
            ca_pin: fingerprint(ca_der),
        }
    }

    /// What the server stores: a hash, so a copy of its database enrolls nobody.
    pub fn secret_hash(secret: &str) -> String {
        blake3::hash(secret.as_bytes()).to_hex().to_string()
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lbt1.{}.{}", self.secret, self.ca_pin)
    }
}

impl std::str::FromStr for Token {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Token> {
        let s = s.trim();
        let parts: Vec<&str> = s.split('.').collect();
        let ok_hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.len() != 3 || parts[0] != "lbt1" || !ok_hex(parts[1], 32) || !ok_hex(parts[2], 64)
        {
            bail!("not a Lifeboat enrollment token (expected lbt1.<32 hex>.<64 hex>; make one with `lifeboat server token create`)");
        }
        Ok(Token {
            secret: parts[1].to_ascii_lowercase(),
            ca_pin: parts[2].to_ascii_lowercase(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_roundtrip_and_garbage_is_refused() {
        let ca = Ca::create("Lifeboat CA test").unwrap();
        let t = Token::new(&ca.cert_der);
        let s = t.to_string();
        assert_eq!(s.parse::<Token>().unwrap(), t);
        assert!("lbt1.zz.yy".parse::<Token>().is_err());
        assert!("".parse::<Token>().is_err());
    }

    #[test]
    fn a_reloaded_ca_issues_certificates_that_verify() {
        let ca = Ca::create("Lifeboat CA test").unwrap();
        let ca2 = Ca::load("Lifeboat CA test", ca.cert_der.clone(), &ca.key_pem()).unwrap();
        let (scert, skey) = ca2.issue_server().unwrap();
        let (acert, akey) = ca2.issue_agent("agent-1").unwrap();
        server_config(&ca.cert_der, &scert, &skey).unwrap();
        agent_config(&ca.cert_der, &acert, &akey).unwrap();
        enroll_config(&fingerprint(&ca.cert_der)).unwrap();
    }
}
