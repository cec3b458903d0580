//! One Redis connection type for standalone servers and Redis Cluster.
//!
//! A [`RedisConn`] is cheap to clone: clones share one multiplexed connection (or one
//! cluster client), and concurrent requests on it are pipelined, which is how batch
//! enqueue and concurrent settles get their throughput. Standalone connections
//! reconnect by themselves (redis-rs `ConnectionManager`); the cluster client follows
//! MOVED/ASK and refreshes its slot map.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::error::{Error, Result};
use crate::tls::ClientTls;

/// Where Redis is: one URL (standalone) or several seed URLs of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSpec {
    /// `redis://[user:pass@]host:port[/db]` URLs.
    pub urls: Vec<String>,
    /// Talk the cluster protocol (implied by more than one URL).
    pub cluster: bool,
    /// How long one request may take before it fails.
    pub response_timeout_ms: u64,
    /// TLS files for `rediss://` URLs (CA, client certificate).
    pub tls: ClientTls,
}

impl RedisSpec {
    /// Parses `url` or `url1,url2,…` (a comma list means cluster seeds).
    pub fn parse(spec: &str) -> Result<Self> {
        let urls: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err(Error::invalid("redis_url", "is empty"));
        }
        for u in &urls {
            if !(u.starts_with("redis://")
                || u.starts_with("rediss://")
                || u.starts_with("unix://"))
            {
                return Err(Error::invalid(
                    "redis_url",
                    format!("{u:?} is not a redis:// URL"),
                ));
            }
        }
        Ok(Self {
            cluster: urls.len() > 1,
            urls,
            response_timeout_ms: 10_000,
            tls: ClientTls::default(),
        })
    }

    /// Forces the cluster protocol even with a single seed URL.
    pub fn cluster(mut self, yes: bool) -> Self {
        self.cluster = self.cluster || yes;
        self
    }
}

impl RedisSpec {
    /// A dedicated connection for `SUBSCRIBE` (a subscribed connection can do
    /// nothing else, so it is never the shared one) to seed `attempt` mod the seed
    /// count: a message published on one node of a cluster reaches subscribers on
    /// every node, so any seed will do, and a retry tries the next.
    pub async fn subscriber(&self, attempt: usize) -> Result<redis::aio::PubSub> {
        let seed = attempt % self.urls.len();
        let url = self.urls[seed].as_str();
        let client = match certificates(&self.tls)? {
            Some(c) => redis::Client::build_with_tls(url, c),
            None => redis::Client::open(url),
        }
        .map_err(|e| Error::invalid("redis.url", e.to_string()))?;
        let connect = client.get_async_pubsub();
        tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            // The URL may hold a password: name the seed by its place in the list.
            .map_err(|_| {
                Error::Unavailable(format!("redis: subscribing at seed {seed}: timed out"))
            })?
            .map_err(Error::from)
    }
}

/// The certificates of `rediss://` connections, when any file is set (otherwise
/// the system roots and no client certificate).
fn certificates(tls: &ClientTls) -> Result<Option<redis::TlsCertificates>> {
    if tls.ca_file.is_empty() && tls.cert_file.is_empty() {
        return Ok(None);
    }
    let read = |setting: &str, path: &str| {
        std::fs::read(path).map_err(|e| Error::invalid(setting, format!("cannot read {path}: {e}")))
    };
    let root_cert = match tls.ca_file.as_str() {
        "" => None,
        f => Some(read("redis.tls_ca_file", f)?),
    };
    let client_tls = match (tls.cert_file.as_str(), tls.key_file.as_str()) {
        ("", _) => None,
        (_, "") => {
            return Err(Error::invalid(
                "redis.tls_key_file",
                "is required with redis.tls_cert_file",
            ));
        }
        (c, k) => Some(redis::ClientTlsConfig {
            client_cert: read("redis.tls_cert_file", c)?,
            client_key: read("redis.tls_key_file", k)?,
        }),
    };
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// A connection to standalone Redis or to a Redis Cluster.
#[derive(Clone)]
pub enum RedisConn {
    /// Standalone server, reconnecting.
    Single(ConnectionManager),
    /// Cluster.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisConn::Single(_) => "RedisConn::Single",
            RedisConn::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl RedisConn {
    /// Connects; fails fast if the first connection cannot be made
    /// ([`Error::Unavailable`], worth retrying) or the URL is not one
    /// ([`Error::InvalidArgument`] naming `redis.url`, not worth it).
    pub async fn connect(spec: &RedisSpec) -> Result<Self> {
        let bad_url = |e: redis::RedisError| Error::InvalidArgument {
            field: "redis.url".into(),
            reason: e.to_string(),
        };
        let timeout = Duration::from_millis(spec.response_timeout_ms);
        let certs = certificates(&spec.tls)?;
        let cluster = |certs: Option<redis::TlsCertificates>| async move {
            let mut builder = ClusterClient::builder(spec.urls.clone())
                .response_timeout(timeout)
                .connection_timeout(Duration::from_secs(5));
            if let Some(c) = certs {
                builder = builder.certs(c);
            }
            Ok::<_, Error>(RedisConn::Cluster(
                builder
                    .build()
                    .map_err(bad_url)?
                    .get_async_connection()
                    .await?,
            ))
        };
        if spec.cluster {
            cluster(certs).await
        } else {
            let client = match certs.clone() {
                Some(c) => {
                    redis::Client::build_with_tls(spec.urls[0].as_str(), c).map_err(bad_url)?
                }
                None => redis::Client::open(spec.urls[0].as_str()).map_err(bad_url)?,
            };
            // One URL may still name a cluster node: then talk the cluster protocol,
            // so a single seed is enough in every setting.
            if cluster_enabled(&client).await? {
                return cluster(certs).await;
            }
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(timeout))
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_number_of_retries(6)
                .set_max_delay(Duration::from_secs(2));
            Ok(RedisConn::Single(
                client.get_connection_manager_with_config(config).await?,
            ))
        }
    }
}

impl RedisConn {
    /// Every key matching `pattern`, on every master of a cluster (a plain `SCAN`
    /// reaches one node only). For tools and clean-ups, not hot paths.
    pub async fn scan_match(&self, pattern: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        match self {
            RedisConn::Single(c) => {
                let mut c = c.clone();
                let mut cursor = 0;
                loop {
                    let v: Value = scan_cmd(cursor, pattern).query_async(&mut c).await?;
                    cursor = scan_page(v, &mut out)?;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            RedisConn::Cluster(c) => {
                let mut c = c.clone();
                for (host, port) in master_addrs(&mut c).await? {
                    let at =
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                    let mut cursor = 0;
                    loop {
                        let v = c
                            .route_command(scan_cmd(cursor, pattern), at.clone())
                            .await?;
                        cursor = scan_page(v, &mut out)?;
                        if cursor == 0 {
                            break;
                        }
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Whether the server behind `client` runs in cluster mode (`INFO cluster`).
async fn cluster_enabled(client: &redis::Client) -> Result<bool> {
    let mut c = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| Error::Unavailable("redis: connection timed out".into()))??;
    // A server that refuses INFO (renamed command, ACL) is taken as standalone.
    let info: Option<String> = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut c)
        .await
        .ok();
    Ok(info.is_some_and(|i| i.contains("cluster_enabled:1")))
}

impl RedisConn {
    /// `INFO <section>` of every master (one entry, the server, when standalone),
    /// as `(host:port, text)`. For benchmarks and diagnostics.
    pub async fn info_per_master(&self, section: &str) -> Result<Vec<(String, String)>> {
        match self {
            RedisConn::Single(c) => {
                let mut c = c.clone();
                let text: String = redis::cmd("INFO").arg(section).query_async(&mut c).await?;
                Ok(vec![("server".into(), text)])
            }
            RedisConn::Cluster(c) => {
                let mut c = c.clone();
                let mut out = Vec::new();
                for (host, port) in master_addrs(&mut c).await? {
                    let addr = format!("{host}:{port}");
                    let at =
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                    let mut cmd = redis::cmd("INFO");
                    cmd.arg(section);
                    let v = c.route_command(cmd, at).await?;
                    let text: String = redis::from_redis_value(v)
                        .map_err(|e| Error::Corrupt(format!("INFO: {e}")))?;
                    out.push((addr, text));
                }
                out.sort();
                Ok(out)
            }
        }
    }
}

fn scan_cmd(cursor: u64, pattern: &str) -> Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1000);
    cmd
}

/// Adds a `SCAN` answer's keys to `out`; answers the next cursor.
fn scan_page(v: Value, out: &mut Vec<String>) -> Result<u64> {
    let (next, keys): (u64, Vec<String>) =
        redis::from_redis_value(v).map_err(|e| Error::Corrupt(format!("SCAN: {e}")))?;
    out.extend(keys);
    Ok(next)
}

/// `host:port` of every master that is not failing, from `CLUSTER NODES`.
/// The masters of the cluster behind `c`, as `(host, port)`, from `CLUSTER NODES`.
async fn master_addrs(c: &mut ClusterConnection) -> Result<Vec<(String, u16)>> {
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(c).await?;
    masters(&nodes)
}

fn masters(nodes: &str) -> Result<Vec<(String, u16)>> {
    let mut out = Vec::new();
    for line in nodes.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 3 || !f[2].contains("master") || f[2].contains("fail") {
            continue;
        }
        let addr = f[1].split('@').next().unwrap_or_default();
        let Some((host, port)) = addr.rsplit_once(':') else {
            continue;
        };
        let port = port
            .parse()
            .map_err(|_| Error::Corrupt(format!("CLUSTER NODES: bad address {addr}")))?;
        out.push((host.to_owned(), port));
    }
    Ok(out)
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}
