//! TLS material from PEM files, for every listener and client chime has: the
//! coordinator's gRPC and HTTP listeners (optionally requiring client certificates:
//! mutual TLS for workers), and the clients that dial them (workers, the CLI, a
//! follower forwarding to the leader). One crypto provider (ring) for all of it.
//!
//! Errors name the setting and the file, so a wrong path or a key that does not
//! match its certificate is reported at start-up, not at the first handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// A listener's TLS files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerTls {
    /// Certificate chain (PEM).
    pub cert_file: String,
    /// Private key (PEM).
    pub key_file: String,
    /// When set, clients must present a certificate signed by this CA (PEM).
    pub client_ca_file: String,
}

/// A client's TLS files (all optional: system roots and no client certificate).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA that signed the server's certificate (PEM); empty: the system roots.
    pub ca_file: String,
    /// Client certificate (PEM), for servers that require one.
    pub cert_file: String,
    /// Its private key (PEM).
    pub key_file: String,
    /// Name to verify the server certificate against, when it is not the host of
    /// the URL (e.g. dialing by IP).
    pub domain: String,
}

fn read(setting: &str, path: &str) -> Result<Vec<u8>> {
    std::fs::read(Path::new(path))
        .map_err(|e| Error::invalid(setting, format!("cannot read {path}: {e}")))
}

fn certs(setting: &str, path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(setting, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::invalid(setting, format!("{path}: not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(Error::invalid(
            setting,
            format!("{path} holds no certificate"),
        ));
    }
    Ok(certs)
}

fn key(setting: &str, path: &str) -> Result<PrivateKeyDer<'static>> {
    let pem = read(setting, path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| Error::invalid(setting, format!("{path}: not a PEM private key: {e}")))
}

/// Installs ring as the process's rustls provider (once; later calls are no-ops).
/// Every TLS user in the process (tonic, redis, etcd, the HTTP listener) then
/// agrees on it.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl ServerTls {
    /// Whether TLS is configured (a certificate is given).
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }

    /// Checks the files: readable, PEM, key matching the certificate.
    pub fn check(&self) -> Result<()> {
        self.rustls(false).map(|_| ())
    }

    /// The rustls server config of the HTTP listener. Browsers do not present
    /// client certificates, so `require_client_cert = false` there even when the
    /// gRPC side demands one.
    pub fn rustls(&self, require_client_cert: bool) -> Result<Arc<rustls::ServerConfig>> {
        if self.key_file.is_empty() {
            return Err(Error::invalid(
                "tls.key_file",
                "is required with tls.cert_file",
            ));
        }
        let chain = certs("tls.cert_file", &self.cert_file)?;
        let key = key("tls.key_file", &self.key_file)?;
        let builder = rustls::ServerConfig::builder();
        let builder = if require_client_cert && !self.client_ca_file.is_empty() {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs("tls.client_ca_file", &self.client_ca_file)? {
                roots
                    .add(c)
                    .map_err(|e| Error::invalid("tls.client_ca_file", e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| Error::invalid("tls.client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut cfg = builder.with_single_cert(chain, key).map_err(|e| {
            Error::invalid("tls.key_file", format!("does not match tls.cert_file: {e}"))
        })?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The tonic server config of the gRPC listener (client certificates required
    /// when `client_ca_file` is set).
    #[cfg(feature = "server")]
    pub fn tonic(&self) -> Result<tonic::transport::ServerTlsConfig> {
        self.check()?;
        let identity = tonic::transport::Identity::from_pem(
            read("tls.cert_file", &self.cert_file)?,
            read("tls.key_file", &self.key_file)?,
        );
        let mut cfg = tonic::transport::ServerTlsConfig::new().identity(identity);
        if !self.client_ca_file.is_empty() {
            certs("tls.client_ca_file", &self.client_ca_file)?;
            cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(read(
                "tls.client_ca_file",
                &self.client_ca_file,
            )?));
        }
        Ok(cfg)
    }
}

impl ClientTls {
    /// The tonic client config; `prefix` names the settings in errors (e.g.
    /// `coordinator.tls_ca_file`).
    pub fn tonic(&self, prefix: &str) -> Result<tonic::transport::ClientTlsConfig> {
        let mut cfg = tonic::transport::ClientTlsConfig::new();
        if self.ca_file.is_empty() {
            cfg = cfg.with_enabled_roots();
        } else {
            let setting = format!("{prefix}tls_ca_file");
            certs(&setting, &self.ca_file)?;
            cfg = cfg.ca_certificate(tonic::transport::Certificate::from_pem(read(
                &setting,
                &self.ca_file,
            )?));
        }
        match (self.cert_file.is_empty(), self.key_file.is_empty()) {
            (true, true) => {}
            (false, false) => {
                let (c, k) = (
                    format!("{prefix}tls_cert_file"),
                    format!("{prefix}tls_key_file"),
                );
                certs(&c, &self.cert_file)?;
                key(&k, &self.key_file)?;
                cfg = cfg.identity(tonic::transport::Identity::from_pem(
                    read(&c, &self.cert_file)?,
                    read(&k, &self.key_file)?,
                ));
            }
            _ => {
                return Err(Error::invalid(
                    format!("{prefix}tls_key_file"),
                    "a client certificate needs both tls_cert_file and tls_key_file",
                ));
            }
        }
        if !self.domain.is_empty() {
            cfg = cfg.domain_name(self.domain.clone());
        }
        Ok(cfg)
    }
}

/// A tonic endpoint for `url`, with TLS when the URL is `https://`. A bare
/// `host:port` (how the protos name coordinators: `NotLeader.leader`,
/// `Registered.coordinator`) is dialled with `https://` when a CA or a client
/// certificate is configured, `http://` otherwise.
pub fn endpoint(url: &str, tls: &ClientTls, prefix: &str) -> Result<tonic::transport::Endpoint> {
    let url = if url.contains("://") {
        url.to_owned()
    } else if tls.ca_file.is_empty() && tls.cert_file.is_empty() {
        format!("http://{url}")
    } else {
        format!("https://{url}")
    };
    let url = url.as_str();
    let ep = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| Error::invalid(format!("{prefix}endpoints"), format!("{url:?}: {e}")))?;
    if url.starts_with("https://") {
        ep.tls_config(tls.tonic(prefix)?)
            .map_err(|e| Error::invalid(format!("{prefix}tls_ca_file"), e.to_string()))
    } else {
        Ok(ep)
    }
}
