//! A TCP fault proxy for `chime bench chaos`: a loopback port that forwards every
//! connection to a store (Redis or etcd), and can be **cut** — bytes stop moving in
//! both directions on every connection, old and new, until it is healed — as a
//! network partition does: connections stay open and nothing arrives, so a client
//! learns of it only from its own timeouts (the nastier case: a refused connection
//! would tell it at once). Healing lets the held bytes through, as TCP retransmission
//! does after a partition ends. A cut of one direction only (upstream to client) is
//! the asymmetric partition: the client's bytes still arrive, the answers wait.
//!
//! The SDK conformance suite (`tests/tests/sdk_conformance.rs`) includes this file
//! as its own module, to stall a worker's session stream: one proxy, two users.

use std::net::SocketAddr;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy; dropping it stops accepting (open connections end with the
/// bench process).
pub(super) struct FaultProxy {
    /// The loopback port clients connect to.
    pub(super) port: u16,
    /// Which directions are cut. A watch channel because every pump must see each
    /// change and a pump that starts later must see the current state.
    cut: watch::Sender<Cut>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub(super) async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, _) = watch::channel(Cut::default());
        let rx = cut.subscribe();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    // The store is down (a restart fault): the client sees a closed
                    // connection, as it would without the proxy.
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(
                        pump(cr, sw, rx.clone(), |c| c.to_upstream),
                        pump(sr, cw, rx, |c| c.to_client)
                    );
                });
            }
        });
        Ok(Self { port, cut, accept })
    }

    /// Stops every byte until [`heal`](Self::heal).
    pub(super) fn cut(&self) {
        self.cut.send_replace(Cut {
            to_upstream: true,
            to_client: true,
        });
    }

    /// Stops the bytes from upstream to clients only, until [`heal`](Self::heal).
    #[allow(
        dead_code,
        reason = "used by the SDK conformance suite, which includes this file"
    )]
    pub(super) fn cut_to_client(&self) {
        self.cut.send_replace(Cut {
            to_upstream: false,
            to_client: true,
        });
    }

    /// Lets bytes move again.
    pub(super) fn heal(&self) {
        self.cut.send_replace(Cut::default());
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The directions a proxy holds.
#[derive(Debug, Clone, Copy, Default)]
struct Cut {
    /// Client to upstream.
    to_upstream: bool,
    /// Upstream to client.
    to_client: bool,
}

/// Copies one direction, holding each read until `held` says this direction is not
/// cut (checked before the read and again before the write, so nothing read during
/// a cut passes before the heal). Ends on EOF or an error on either side and
/// closes the write half, so the peer sees the end too.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut cut: watch::Receiver<Cut>,
    held: fn(&Cut) -> bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if cut.wait_for(|c| !held(c)).await.is_err() {
            break;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.wait_for(|c| !held(c)).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
