//! TLS to the broker: the private CA and client certificate an `amqps://` connection uses,
//! the EXTERNAL mechanism a client certificate allows, and failed verifications in words.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig, RustlsConnector, RustlsConnectorConfig};
use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{CertificateError, Error as TlsError};

use crate::config::Secret;

/// How `amqps://` connections authenticate the broker and themselves. The default trusts
/// the system's roots and presents no certificate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AmqpTls {
    /// `OUTBOX_AMQP_CA_FILE`: PEM certificates of the private CA that signed the broker's
    /// certificate: trusted instead of the system's roots.
    pub ca: Option<String>,
    /// `OUTBOX_AMQP_CLIENT_CERT` and `OUTBOX_AMQP_CLIENT_KEY`: this client's certificate,
    /// presented to a broker that asks for one.
    pub client: Option<ClientIdentity>,
}

/// A client certificate chain and its private key, both PEM.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientIdentity {
    /// The certificate, then any intermediates.
    pub cert: String,
    /// The unencrypted private key (PKCS#8, PKCS#1 or SEC1); never logged.
    pub key: Secret,
}

impl AmqpTls {
    /// With a private CA, a connector that trusts its certificates alone (lapin's own adds
    /// them to the system's roots), presenting the client certificate if one is set.
    pub(crate) fn private_ca_connector(&self) -> std::io::Result<Option<RustlsConnector>> {
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let mut config = RustlsConnectorConfig::default();
        config.add_parsable_certificates(pem_certificates(ca)?);
        let connector = match &self.client {
            Some(client) => {
                let key = PrivateKeyDer::from_pem_slice(client.key.expose().as_bytes())
                    .map_err(std::io::Error::other)?;
                config.connector_with_single_cert(pem_certificates(&client.cert)?, key)?
            }
            None => config.connector_with_no_client_auth()?,
        };
        Ok(Some(connector))
    }

    /// lapin's form of these settings, without a private CA.
    pub(crate) fn lapin_config(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: self.client.as_ref().map(|c| OwnedIdentity::PKCS8 {
                pem: c.cert.clone().into_bytes(),
                key: c.key.expose().as_bytes().to_vec(),
            }),
            cert_chain: None,
        }
    }

    /// Asks for EXTERNAL authentication (the client certificate's subject is the user) when
    /// a TLS URL names neither user nor password nor mechanism and a certificate is set.
    pub(crate) fn choose_mechanism(&self, url: &str, uri: &mut AMQPUri) {
        let anonymous =
            url::Url::parse(url).is_ok_and(|u| u.username().is_empty() && u.password().is_none());
        if anonymous && self.client.is_some() && uri.scheme == AMQPScheme::AMQPS {
            uri.query
                .auth_mechanism
                .get_or_insert(SASLMechanism::External);
        }
    }
}

/// The certificates in `pem`.
fn pem_certificates(pem: &str) -> std::io::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(std::io::Error::other)
}

/// Checks that `pem` holds at least one certificate.
pub fn check_certificates(pem: &str) -> Result<(), String> {
    match CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => Ok(()),
        Ok(_) => Err("no PEM certificate in it".into()),
        Err(e) => Err(format!("not a valid PEM certificate ({e})")),
    }
}

/// Checks that `pem` holds an unencrypted private key.
pub fn check_private_key(pem: &str) -> Result<(), String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map(drop)
        .map_err(|e| format!("not an unencrypted PEM private key ({e})"))
}

/// The error of a connection attempt in one line; a refused broker certificate says why
/// (unknown CA, host name mismatch, expired…).
pub fn describe(error: &lapin::Error) -> String {
    match certificate_error(error) {
        Some(reason) => format!("TLS: the broker's certificate was refused: {reason}"),
        None => error.to_string(),
    }
}

/// The reason rustls gave for refusing the peer's certificate, somewhere in `error`'s chain.
fn certificate_error(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        // An io::Error's `source()` skips the error it wraps: look at it first.
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for e in inner.into_iter().chain([e]) {
            if let Some(TlsError::InvalidCertificate(why)) = e.downcast_ref::<TlsError>() {
                return Some(reason(why));
            }
        }
        next = e.source();
    }
    None
}

/// A certificate error in an operator's words.
fn reason(error: &CertificateError) -> String {
    match error {
        CertificateError::UnknownIssuer => {
            "unknown CA (not signed by OUTBOX_AMQP_CA_FILE's CA, or without it the system's roots)"
                .into()
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("host name mismatch ({error})")
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            format!("expired ({error})")
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            format!("not valid yet ({error})")
        }
        CertificateError::Revoked => "revoked".into(),
        _ => error.to_string(),
    }
}
