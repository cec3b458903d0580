//! [`EtcdSource`]: live settings in etcd under a prefix (the production
//! [`ConfigSource`]). Behind the `etcd` feature, so a worker SDK user who hands the
//! worker a config handle of their own compiles no etcd client.

use async_trait::async_trait;
use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;

use super::source::{Change, ConfigSource, Expect, Snapshot, WatchMsg, WatchRx};
use crate::error::{Error, Result};

/// Keys in the first range request of [`EtcdSource::load`]; later pages are sized
/// from the bytes per key seen so far, to about [`LOAD_PAGE_BYTES`].
const LOAD_PAGE: i64 = 1_000;

/// What a page aims at: half of the 4 MiB a gRPC client decodes by default.
const LOAD_PAGE_BYTES: usize = 2 << 20;

/// The most keys in one page.
const LOAD_PAGE_MAX: i64 = 50_000;

/// Keys in the next page, for `bytes` read in `keys` keys so far.
fn next_page(bytes: usize, keys: usize) -> i64 {
    let per_key = (bytes / keys.max(1)).max(1);
    ((LOAD_PAGE_BYTES / per_key) as i64).clamp(LOAD_PAGE / 10, LOAD_PAGE_MAX)
}

/// Whether `e` is a response over the client's decode limit (a page too big).
fn too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::OutOfRange)
}

/// The end of the range of keys starting with `prefix` (etcd's prefix rule: the
/// prefix with its last byte below 0xff incremented; empty, or all 0xff: every
/// key from it, `\0`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Settings in etcd under a prefix.
#[derive(Clone)]
pub struct EtcdSource {
    client: etcd_client::Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSource")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdSource {
    /// Settings under `prefix` (which should end with `/`).
    pub fn new(client: etcd_client::Client, prefix: impl Into<String>) -> Self {
        Self {
            client,
            prefix: prefix.into(),
        }
    }

    fn relative(&self, key: &[u8]) -> Option<String> {
        std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&self.prefix)
            .map(str::to_owned)
    }
}

#[async_trait]
impl ConfigSource for EtcdSource {
    /// Reads the prefix in pages, every page at the first page's revision, so the
    /// snapshot is one consistent revision whatever its size. (In one response,
    /// 100,000 jobs of about 600 bytes would be a 60 MB message, far over the 4
    /// MiB a gRPC client decodes by default.) A compaction past that revision
    /// between two pages fails the load; the caller loads again.
    ///
    /// Pages are as big as fit about [`LOAD_PAGE_BYTES`]: etcd 3.4 walks its whole
    /// index of the range for every page (to count it), so pages of 1,000 keys
    /// made a load of 100,000 keys quadratic (1.4 s, most of it etcd's CPU). A
    /// page that still comes back over the decode limit is asked for again at
    /// half the size.
    async fn load(&self) -> Result<Snapshot> {
        let mut entries = Vec::new();
        let revision = self
            .load_each(&mut |k: &str, v: &str, rev: i64| {
                entries.push((k.to_owned(), v.to_owned(), rev));
            })
            .await?;
        Ok(Snapshot { entries, revision })
    }

    async fn load_each(
        &self,
        each: &mut (dyn for<'e> FnMut(&'e str, &'e str, i64) + Send),
    ) -> Result<i64> {
        let mut c = self.client.clone();
        let end = prefix_end(self.prefix.as_bytes());
        let mut from = self.prefix.as_bytes().to_vec();
        let mut revision = 0;
        let (mut limit, mut bytes, mut count) = (LOAD_PAGE, 0usize, 0usize);
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(limit);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = match c.get(from.clone(), Some(opts)).await {
                Ok(r) => r,
                Err(e) if too_large(&e) && limit > 1 => {
                    limit /= 2;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in resp.kvs() {
                bytes += kv.key().len() + kv.value().len();
                count += 1;
                if let Some(k) = self.relative(kv.key()) {
                    each(&k, &String::from_utf8_lossy(kv.value()), kv.mod_revision());
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    // The next page starts just after the last key read.
                    from = last.key().to_vec();
                    from.push(0);
                    limit = next_page(bytes, count);
                }
                _ => break,
            }
        }
        Ok(revision)
    }

    async fn watch(&self, after: i64) -> Result<WatchRx> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after + 1)
            .with_progress_notify();
        let mut stream = c.watch(self.prefix.as_str(), Some(opts)).await?;
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let msg = match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            if resp.compact_revision() > 0 {
                                Ok(WatchMsg::Compacted)
                            } else {
                                Err(Error::Unavailable(format!(
                                    "etcd watch cancelled: {}",
                                    resp.cancel_reason()
                                )))
                            }
                        } else if resp.events().is_empty() {
                            Ok(WatchMsg::Progress(
                                resp.header().map(|h| h.revision()).unwrap_or(0),
                            ))
                        } else {
                            let changes = resp
                                .events()
                                .iter()
                                .filter_map(|ev| {
                                    let kv = ev.kv()?;
                                    let key = me.relative(kv.key())?;
                                    let revision = kv.mod_revision();
                                    Some(match ev.event_type() {
                                        EventType::Put => Change::Put {
                                            key,
                                            value: String::from_utf8_lossy(kv.value()).into_owned(),
                                            revision,
                                        },
                                        EventType::Delete => Change::Delete { key, revision },
                                    })
                                })
                                .collect();
                            Ok(WatchMsg::Changes(changes))
                        }
                    }
                    Ok(None) => Err(Error::Unavailable("etcd watch stream ended".into())),
                    Err(e) => Err(e.into()),
                };
                let end = msg.is_err() || matches!(msg, Ok(WatchMsg::Compacted));
                if tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn put(&self, key: &str, value: &str) -> Result<i64> {
        let mut c = self.client.clone();
        let resp = c.put(format!("{}{key}", self.prefix), value, None).await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn delete(&self, key: &str) -> Result<i64> {
        let mut c = self.client.clone();
        let resp = c.delete(format!("{}{key}", self.prefix), None).await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn get(&self, key: &str) -> Result<Option<(String, i64)>> {
        let mut c = self.client.clone();
        let resp = c.get(format!("{}{key}", self.prefix), None).await?;
        Ok(resp.kvs().first().map(|kv| {
            (
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.mod_revision(),
            )
        }))
    }

    async fn list_under(&self, sub: &str) -> Result<Snapshot> {
        let mut c = self.client.clone();
        let from = format!("{}{sub}", self.prefix);
        let resp = c
            .get(from.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let entries = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let k = self.relative(kv.key())?;
                Some((
                    k,
                    String::from_utf8_lossy(kv.value()).into_owned(),
                    kv.mod_revision(),
                ))
            })
            .collect();
        Ok(Snapshot {
            entries,
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
        })
    }

    async fn commit(
        &self,
        writes: &[(String, String, Expect)],
        deletes: &[String],
    ) -> Result<Option<i64>> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let mut conds = Vec::with_capacity(writes.len());
        let mut ops = Vec::with_capacity(writes.len() + deletes.len());
        for (key, value, expect) in writes {
            let full = format!("{}{key}", self.prefix);
            match *expect {
                Expect::Absent => conds.push(Compare::version(full.as_str(), CompareOp::Equal, 0)),
                Expect::Revision(r) => {
                    conds.push(Compare::mod_revision(full.as_str(), CompareOp::Equal, r))
                }
                Expect::Any => {}
            }
            ops.push(TxnOp::put(full, value.as_str(), None));
        }
        for key in deletes {
            ops.push(TxnOp::delete(format!("{}{key}", self.prefix), None));
        }
        let txn = Txn::new().when(conds).and_then(ops);
        let mut c = self.client.clone();
        let resp = c.txn(txn).await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map(|h| h.revision()).unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn pages_aim_at_two_mib() {
        // 100,000 keys of 300 bytes: about 7,000 a page, not 1,000.
        assert_eq!(super::next_page(300_000, 1_000), 6_990);
        // Big values: smaller pages, never below 100 keys.
        assert_eq!(super::next_page(1 << 30, 1_000), 100);
        // Tiny values: at most 50,000 keys.
        assert_eq!(super::next_page(1_000, 1_000), 50_000);
    }

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"/chime/"), b"/chime0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
