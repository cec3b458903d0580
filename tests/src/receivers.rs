//! Local receivers for alert notices: an HTTP server that records every request
//! and answers as the service behind a path would (`/slack…` like Slack's incoming
//! webhooks, `/dingtalk…` like a DingTalk robot, `/feishu…` like a Feishu bot,
//! anything else with 200 `{}`), and an SMTP server that speaks the dialogue a
//! relay does and records each message. Real sockets on free loopback ports; the
//! servers stop when dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What a receiver records, shared with its connections.
type Log<T> = Arc<Mutex<Vec<T>>>;

/// Listens on a free loopback port and serves each connection with `serve`, which
/// records into the log this answers; the task accepts until aborted.
async fn listen<T, F, Fut>(serve: F) -> Result<(SocketAddr, Log<T>, JoinHandle<()>)>
where
    T: Send + 'static,
    F: Fn(tokio::net::TcpStream, Log<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let got: Log<T> = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let task = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            // A connection that breaks off is the sender's business, not the log's.
            let conn = serve(sock, g.clone());
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    Ok((addr, got, task))
}

/// One request an [`HttpReceiver`] got.
#[derive(Debug, Clone)]
pub struct Request {
    /// Path and query.
    pub target: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Request {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.1 server recording requests.
#[derive(Debug)]
pub struct HttpReceiver {
    addr: SocketAddr,
    got: Log<Request>,
    task: JoinHandle<()>,
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpReceiver {
    /// Starts one on a free port.
    pub async fn start() -> Result<Self> {
        let (addr, got, task) = listen(serve_http).await?;
        Ok(Self { addr, got, task })
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests so far whose target starts with `prefix`.
    pub fn requests(&self, prefix: &str) -> Vec<Request> {
        self.got
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| r.target.starts_with(prefix))
            .cloned()
            .collect()
    }
}

async fn serve_http(sock: tokio::net::TcpStream, got: Log<Request>) -> Result<()> {
    let mut r = BufReader::new(sock);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let target = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).await?;
        let answer = if target.starts_with("/slack") {
            "ok"
        } else if target.starts_with("/dingtalk") {
            r#"{"errcode":0,"errmsg":"ok"}"#
        } else if target.starts_with("/feishu") {
            r#"{"code":0,"msg":"success","data":{}}"#
        } else {
            "{}"
        };
        got.lock().unwrap_or_else(|p| p.into_inner()).push(Request {
            target,
            headers,
            body,
        });
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        r.get_mut().write_all(resp.as_bytes()).await?;
    }
}

/// One message an [`SmtpReceiver`] got.
#[derive(Debug, Clone)]
pub struct Mail {
    /// `MAIL FROM` address.
    pub from: String,
    /// `RCPT TO` addresses.
    pub to: Vec<String>,
    /// The message (headers and body), dot-stuffing undone.
    pub data: String,
}

impl Mail {
    /// A header's value (first line only).
    pub fn header(&self, name: &str) -> Option<String> {
        self.data
            .lines()
            .take_while(|l| !l.is_empty())
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
    }
}

/// An SMTP server recording messages.
#[derive(Debug)]
pub struct SmtpReceiver {
    addr: SocketAddr,
    got: Log<Mail>,
    task: JoinHandle<()>,
}

impl Drop for SmtpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpReceiver {
    /// Starts one on a free port.
    pub async fn start() -> Result<Self> {
        let (addr, got, task) = listen(serve_smtp).await?;
        Ok(Self { addr, got, task })
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Messages so far.
    pub fn mails(&self) -> Vec<Mail> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn serve_smtp(sock: tokio::net::TcpStream, got: Log<Mail>) -> Result<()> {
    let mut r = BufReader::new(sock);
    r.get_mut().write_all(b"220 receiver ESMTP\r\n").await?;
    let (mut from, mut to) = (String::new(), Vec::new());
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_owned();
        let upper = cmd.to_ascii_uppercase();
        let addr = || {
            cmd.split_once('<')
                .and_then(|(_, rest)| rest.split_once('>'))
                .map(|(a, _)| a.to_owned())
                .unwrap_or_default()
        };
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-receiver\r\n250-8BITMIME\r\n250 OK\r\n"
        } else if upper.starts_with("HELO") {
            b"250 receiver\r\n"
        } else if upper.starts_with("MAIL FROM") {
            from = addr();
            b"250 OK\r\n"
        } else if upper.starts_with("RCPT TO") {
            to.push(addr());
            b"250 OK\r\n"
        } else if upper == "DATA" {
            r.get_mut().write_all(b"354 go ahead\r\n").await?;
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if r.read_line(&mut l).await? == 0 {
                    return Ok(());
                }
                if l == ".\r\n" {
                    break;
                }
                data.push_str(l.strip_prefix('.').unwrap_or(&l));
            }
            got.lock().unwrap_or_else(|p| p.into_inner()).push(Mail {
                from: std::mem::take(&mut from),
                to: std::mem::take(&mut to),
                data: data.replace("\r\n", "\n"),
            });
            b"250 queued\r\n"
        } else if upper == "QUIT" {
            r.get_mut().write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"250 OK\r\n"
        };
        r.get_mut().write_all(reply).await?;
    }
}
