//! TLS for `capsync serve --tls-cert PEM --tls-key PEM`.

use crate::error::{Result, ServerError};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// A server configuration from a PEM certificate chain and a PEM private key.
pub fn server_config(cert_pem: &Path, key_pem: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let bad = |what: &str, path: &Path, e: &dyn std::fmt::Display| ServerError::Invalid(format!("{what} {}: {e}", path.display()));
    let chain = CertificateDer::pem_file_iter(cert_pem)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad("reading the certificate chain", cert_pem, &e))?;
    if chain.is_empty() {
        return Err(ServerError::Invalid(format!("{} holds no PEM certificate", cert_pem.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| bad("reading the private key", key_pem, &e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Invalid(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| ServerError::Invalid(format!("the certificate and key do not work together: {e}")))?;
    Ok(Arc::new(config))
}
