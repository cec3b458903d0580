//! Leader election through etcd: every coordinator campaigns for one election key
//! with a lease (TTL, default 5 s) kept alive every third of the TTL. The winner's
//! election revision is its **fencing token**: it is installed in Redis before the
//! engine starts, and every fire record carries it, so a deposed leader that wakes
//! up (GC pause, SIGSTOP, partition) cannot fire — its token is older.
//!
//! A leader that cannot renew its lease for a whole TTL (etcd down, partition) steps
//! down by itself: by then etcd may have expired the lease and elected someone else.
//! Followers learn the leader's address from the election and tell workers.

use std::time::Duration;

use etcd_client::{Client, LeaderKey, ResignOptions};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// This coordinator's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Leads, with this fencing token.
    Leader {
        /// Election revision of our leader key.
        fence: i64,
    },
    /// Follows `leader` (`host:port`, empty while unknown).
    Follower {
        /// The leader's advertised address.
        leader: String,
    },
}

/// Election settings.
#[derive(Debug, Clone)]
pub struct ElectionOptions {
    /// The election key, e.g. `/chime/election/coordinator`.
    pub name: String,
    /// This coordinator's advertised address (the election value).
    pub advertise: String,
    /// Lease TTL, seconds.
    pub ttl_s: i64,
}

/// Campaigns until `shutdown`; answers the role as it changes. Notify `resign` to
/// give up leadership (the engine saw a newer fence, or it could not start); this
/// coordinator then campaigns again.
///
/// The task ends after `shutdown` once it resigned and revoked its lease (each call
/// bounded): a process that exits before awaiting it leaves its leader key in etcd,
/// and its successor waits out the lease TTL instead of leading at once.
pub fn spawn(
    client: Client,
    opts: ElectionOptions,
    resign: std::sync::Arc<Notify>,
    shutdown: CancellationToken,
) -> (watch::Receiver<Role>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Role::Follower {
        leader: String::new(),
    });
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match term(&client, &opts, &tx, &resign, &shutdown).await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    warn!(error = %e, "election: etcd call failed; retrying");
                    tx.send_replace(Role::Follower {
                        leader: String::new(),
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {},
                        _ = shutdown.cancelled() => {},
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    });
    (rx, task)
}

/// One lease: campaign, lead until the lease is lost or we resign.
async fn term(
    client: &Client,
    opts: &ElectionOptions,
    tx: &watch::Sender<Role>,
    resign: &Notify,
    shutdown: &CancellationToken,
) -> Result<(), etcd_client::Error> {
    let mut c = client.clone();
    // Bounded: a call on a connection etcd dropped without a word (a restart, a
    // partition) could wait forever, and this candidate would never campaign again.
    let ttl = Duration::from_secs(opts.ttl_s.max(1) as u64);
    let lease = tokio::time::timeout(ttl, c.lease_grant(opts.ttl_s, None))
        .await
        .map_err(|_| etcd_client::Error::ElectError("lease grant timed out".into()))??
        .id();
    let lost = CancellationToken::new();
    let keeper = tokio::spawn(keep_alive(client.clone(), lease, opts.ttl_s, lost.clone()));
    // While not leading, tell everyone who does.
    let watching = CancellationToken::new();
    let follower = tokio::spawn(follow(
        client.clone(),
        opts.name.clone(),
        tx.clone(),
        watching.clone(),
    ));
    let campaign = async {
        let mut c = client.clone();
        c.campaign(opts.name.as_str(), opts.advertise.as_str(), lease)
            .await
    };
    // etcd answers a campaign once every older candidate's key is gone, and that
    // answer can be lost: a campaign pending across an etcd restart was seen never
    // to return while this candidate's key was already the oldest (found by
    // `chime bench chaos --seed 3`: the election had a leader that did not know
    // it, and nothing fired for 80 s). So the campaign is also settled by asking:
    // when the election's leader key (the oldest) carries our lease, we won, with
    // that key's create revision as the fence — what the campaign would answer.
    let asked = async {
        let mut c = client.clone();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(1), c.leader(opts.name.as_str())).await
                && let Some(kv) = r.kv()
                && kv.lease() == lease
            {
                return LeaderKey::new()
                    .with_name(opts.name.as_str())
                    .with_key(kv.key())
                    .with_rev(kv.create_revision())
                    .with_lease(lease);
            }
        }
    };
    // A failed campaign must still end this term below: returning at once would
    // leave the keeper renewing the lease, and its candidate key, older than every
    // later one, would block every election after it for good (found by `chime
    // bench chaos --seed 11`: no leader for the last 80 s after an etcd restart).
    let mut failed = None;
    let won = tokio::select! {
        r = campaign => match r {
            Ok(resp) => Some(resp.leader().cloned()),
            Err(e) => {
                failed = Some(e);
                None
            }
        },
        k = asked => Some(Some(k)),
        _ = lost.cancelled() => None,
        _ = shutdown.cancelled() => None,
    };
    watching.cancel();
    let _ = follower.await;
    if let Some(key) = won {
        let fence = key.as_ref().map_or(0, |k| k.rev());
        info!(fence, advertise = %opts.advertise, "elected leader");
        tx.send_replace(Role::Leader { fence });
        tokio::select! {
            _ = lost.cancelled() => warn!("leader lease lost; stepping down"),
            _ = resign.notified() => info!("resigning leadership"),
            _ = shutdown.cancelled() => info!("shutting down: handing over leadership"),
        }
        tx.send_replace(Role::Follower {
            leader: String::new(),
        });
        if let Some(k) = key {
            let mut c = client.clone();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                c.resign(Some(ResignOptions::new().with_leader(k))),
            )
            .await;
        }
    }
    // Revoking the lease deletes our candidate key; if etcd cannot be reached the
    // lease, no longer renewed, expires within the TTL and takes the key with it.
    keeper.abort();
    let mut c = client.clone();
    let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(lease)).await;
    failed.map_or(Ok(()), Err)
}

/// Renews the lease every third of the TTL; cancels `lost` when no renewal
/// succeeded for a whole TTL.
async fn keep_alive(client: Client, lease: i64, ttl_s: i64, lost: CancellationToken) {
    let ttl = Duration::from_secs(ttl_s.max(1) as u64);
    let every = ttl / 3;
    let mut last_ok = tokio::time::Instant::now();
    let mut stream = None;
    loop {
        if last_ok.elapsed() >= ttl {
            lost.cancel();
            return;
        }
        if stream.is_none() {
            let mut c = client.clone();
            if let Ok(Ok(s)) = tokio::time::timeout(every, c.lease_keep_alive(lease)).await {
                stream = Some(s);
            }
        }
        if let Some((keeper, replies)) = stream.as_mut() {
            let ok = tokio::time::timeout(every, async {
                keeper.keep_alive().await?;
                replies.message().await
            })
            .await;
            match ok {
                Ok(Ok(Some(r))) if r.ttl() > 0 => last_ok = tokio::time::Instant::now(),
                Ok(Ok(Some(_))) => {
                    // TTL 0: the lease is gone.
                    lost.cancel();
                    return;
                }
                _ => stream = None,
            }
        }
        tokio::time::sleep(every.saturating_sub(last_ok.elapsed().min(every))).await;
    }
}

/// Publishes the current leader's address until `stop`: the moment etcd's election
/// observer reports a new leader, and by asking every 500 ms besides.
///
/// Why both: the observer is what makes a failover fast (followers name the new
/// leader within milliseconds of its election, and workers held by
/// `Shared::leader_named` follow at once), but it never reports "no leader" and its
/// stream can break; the poll covers both, and a broken observer is reopened on the
/// next round.
async fn follow(client: Client, name: String, tx: watch::Sender<Role>, stop: CancellationToken) {
    let publish = |leader: String| {
        tx.send_if_modified(|role| {
            let next = Role::Follower { leader };
            if *role != next && !matches!(role, Role::Leader { .. }) {
                *role = next;
                true
            } else {
                false
            }
        });
    };
    let mut c = client;
    let mut observer = None;
    while !stop.is_cancelled() {
        if observer.is_none() {
            observer = tokio::time::timeout(Duration::from_secs(1), c.observe(name.as_str()))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let leader =
            match tokio::time::timeout(Duration::from_secs(1), c.leader(name.as_str())).await {
                Ok(Ok(r)) => r
                    .kv()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                    .unwrap_or_default(),
                _ => String::new(),
            };
        publish(leader);
        let poll = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(poll);
        loop {
            let observed = async {
                match observer.as_mut() {
                    Some(o) => o.message().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut poll => break,
                _ = stop.cancelled() => return,
                m = observed => match m {
                    Ok(Some(r)) => publish(
                        r.kv()
                            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                            .unwrap_or_default(),
                    ),
                    // Ended or broken: polled until reopened next round.
                    _ => observer = None,
                },
            }
        }
    }
}
