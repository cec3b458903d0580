//! Connecting to etcd: endpoints, credentials and the options every chime process
//! uses. The client is cheap to clone (one HTTP/2 channel balanced over endpoints).

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::error::{Error, Result};
use crate::tls::ClientTls;

/// Where etcd is and how to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSpec {
    /// `http://host:port` endpoints (several for a cluster).
    pub endpoints: Vec<String>,
    /// User name, when etcd has authentication on.
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<String>,
    /// TLS files for `https://` endpoints.
    pub tls: ClientTls,
}

impl EtcdSpec {
    /// Parses `url[,url…]`.
    pub fn parse(endpoints: &str) -> Result<Self> {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(Error::invalid("etcd_endpoints", "is empty"));
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(Error::invalid(
                    "etcd_endpoints",
                    format!("{e:?} is not an http(s):// URL"),
                ));
            }
        }
        Ok(Self {
            endpoints,
            user: None,
            password: None,
            tls: ClientTls::default(),
        })
    }

    /// Connects. Keep-alive pings detect a dead server on long watches (within 15 s);
    /// no request timeout is set because watches are long-lived streams. The ping
    /// interval stays above etcd's `--grpc-keepalive-min-time` (5 s by default):
    /// etcd counts a quicker ping as abuse and, on the third, closes the connection
    /// with `too_many_pings` (at 3 s, every idle watch broke every 12 s).
    pub async fn connect(&self) -> Result<Client> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            opts = opts.with_user(u.clone(), p.clone());
        }
        if self.endpoints.iter().any(|e| e.starts_with("https://")) {
            opts = opts.with_tls(self.tls.tonic("etcd.")?);
        }
        Ok(Client::connect(&self.endpoints, Some(opts)).await?)
    }
}

impl From<etcd_client::Error> for Error {
    fn from(e: etcd_client::Error) -> Self {
        Error::Unavailable(format!("etcd: {e}"))
    }
}
