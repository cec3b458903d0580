//! Alert sinks: where a rule's notices go (a generic webhook, Slack, DingTalk,
//! Feishu/Lark, email), how a sink is checked and shown without its secrets, and how
//! one notice is formatted for one sink and delivered to it, once.
//!
//! Retrying, counting and deduplicating belong to the caller: this module answers
//! only "did this attempt land, and is another attempt worth it"
//! ([`SinkError::retryable`]). Every notice carries an `id` so a receiver can drop
//! the duplicates that retries after an ambiguous failure produce.
//!
//! Email is a small SMTP client: plain, STARTTLS (587) or implicit TLS (465), with
//! AUTH PLAIN (or LOGIN when that is all the relay offers) once TLS is up. The
//! certificate is checked against the webpki roots plus an optional `ca_file`; a
//! password is never sent in clear to a host that is not loopback.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::{CoordError, Result};

/// Longest URL a sink may have.
const MAX_URL: usize = 2048;
/// Longest secret, in characters.
const MAX_SECRET: usize = 256;
/// Most recipients of one email sink.
const MAX_RECIPIENTS: usize = 20;
/// Longest address (RFC 5321's path limit less the brackets).
const MAX_ADDRESS: usize = 254;
/// How much of an HTTP answer is read: enough for any service's verdict, and a
/// receiver that streams megabytes cannot make the sender hold them.
const MAX_ANSWER: usize = 16 * 1024;
/// How much of an answer an error quotes.
const EXCERPT: usize = 300;
/// Longest details text put into chat messages (Slack sections hold 3000
/// characters; the others are larger but a wall of text helps nobody in a chat).
const MAX_CHAT_DETAILS: usize = 2500;
/// Longest line of an email (RFC 5321 allows 998 octets before CRLF).
const MAX_MAIL_LINE: usize = 990;
/// Longest SMTP reply line read, and most lines of one reply.
const MAX_SMTP_LINE: u64 = 4096;
const MAX_SMTP_LINES: usize = 100;
/// Longest `ca_file` path.
const MAX_PATH: usize = 4096;

/// Where a rule's notices go. JSON (internally tagged by `kind`, snake_case, unknown
/// fields refused):
///
/// - `{"kind":"webhook","url":"https://…","secret":"…"}` (secret optional: HMAC-SHA256
///   signature header)
/// - `{"kind":"slack","url":"https://hooks.slack.com/services/…"}`
/// - `{"kind":"dingtalk","url":"https://oapi.dingtalk.com/robot/send?access_token=…","secret":"SEC…"}`
///   (secret optional: DingTalk's 加签 signing)
/// - `{"kind":"feishu","url":"https://open.feishu.cn/open-apis/bot/v2/hook/…","secret":"…"}`
///   (secret optional: Feishu/Lark signature check)
/// - `{"kind":"email","smtp":"mail.example.com:25","from":"chime@example.com","to":["ops@example.com"]}`
///   (plain SMTP to a relay that needs no authentication), or
///   `{"kind":"email","smtp":"smtp.example.com:587","from":"…","to":[…],"username":"…","password":"…"}`
///   (STARTTLS then AUTH; `tls` `none` | `starttls` | `implicit` defaults by port:
///   587 starttls, 465 implicit, else none; `ca_file` adds roots for a private relay)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Sink {
    /// Any HTTP endpoint: the notice as JSON, signed when `secret` is set.
    Webhook {
        /// Where to POST.
        url: String,
        /// Key of the `X-Chime-Signature` HMAC; empty: unsigned.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        secret: String,
    },
    /// A Slack incoming webhook (the URL is the credential).
    Slack {
        /// `https://hooks.slack.com/services/…`.
        url: String,
    },
    /// A DingTalk custom robot.
    Dingtalk {
        /// `https://oapi.dingtalk.com/robot/send?access_token=…`.
        url: String,
        /// The robot's signing secret (`SEC…`); empty: unsigned.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        secret: String,
    },
    /// A Feishu/Lark custom bot.
    Feishu {
        /// `https://open.feishu.cn/open-apis/bot/v2/hook/…` (or Lark's host).
        url: String,
        /// The bot's signature secret; empty: unsigned.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        secret: String,
    },
    /// Email through an SMTP relay.
    Email {
        /// `host:port` of the relay (`[::1]:25` for an IPv6 literal). The host is
        /// also the name the relay's certificate must carry.
        smtp: String,
        /// Envelope and header sender, `local@domain`.
        from: String,
        /// Recipients, 1 to 20.
        to: Vec<String>,
        /// How the connection is secured; not written: by port (see [`EmailTls`]).
        #[serde(default, skip_serializing_if = "EmailTls::is_auto")]
        tls: EmailTls,
        /// AUTH user; empty: no AUTH.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        username: String,
        /// AUTH password (a secret: redacted, refused over a clear connection to a
        /// host that is not loopback).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        password: String,
        /// A PEM file of extra roots for a relay with a private CA, read at each
        /// send; empty: the webpki roots only.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        ca_file: String,
    },
}

/// How an email sink secures its connection to the relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmailTls {
    /// Not written: by the port, 465 `implicit`, 587 `starttls`, any other `none`
    /// ([`EmailTls::for_port`]). Kept as written, so a rule round-trips unchanged.
    #[default]
    Auto,
    /// Plain SMTP (an internal relay on 25).
    None,
    /// Plain at first, then `STARTTLS` before anything else is said; a relay that
    /// does not offer it is refused, not talked to in clear.
    Starttls,
    /// TLS from the first byte (SMTPS, port 465).
    Implicit,
}

impl EmailTls {
    /// What is used with `port`: the mode as written, or for `Auto` the port's
    /// usual one.
    pub fn for_port(self, port: u16) -> EmailTls {
        match self {
            EmailTls::Auto => match port {
                465 => EmailTls::Implicit,
                587 => EmailTls::Starttls,
                _ => EmailTls::None,
            },
            written => written,
        }
    }

    fn is_auto(&self) -> bool {
        *self == EmailTls::Auto
    }
}

impl Sink {
    /// Checks the sink; errors are `CoordError::invalid` naming `{field}.url`,
    /// `{field}.smtp`, `{field}.from`, `{field}.to[2]`, … (field is e.g. "sinks[0]").
    pub fn check(&self, field: &str) -> Result<()> {
        match self {
            Sink::Webhook { url, secret }
            | Sink::Dingtalk { url, secret }
            | Sink::Feishu { url, secret } => {
                check_url(&sub(field, "url"), url)?;
                check_secret(&sub(field, "secret"), secret)
            }
            Sink::Slack { url } => check_url(&sub(field, "url"), url).map(|_| ()),
            Sink::Email {
                smtp,
                from,
                to,
                tls,
                username,
                password,
                ca_file,
            } => {
                let (host, port) = check_smtp(&sub(field, "smtp"), smtp)?;
                check_address(&sub(field, "from"), from)?;
                if to.is_empty() || to.len() > MAX_RECIPIENTS {
                    return Err(CoordError::invalid(
                        sub(field, "to"),
                        format!("needs 1 to {MAX_RECIPIENTS} addresses, has {}", to.len()),
                    ));
                }
                for (i, address) in to.iter().enumerate() {
                    check_address(&sub(field, &format!("to[{i}]")), address)?;
                }
                check_secret(&sub(field, "username"), username)?;
                check_secret(&sub(field, "password"), password)?;
                if username.is_empty() != password.is_empty() {
                    let (missing, given) = if username.is_empty() {
                        ("username", "password")
                    } else {
                        ("password", "username")
                    };
                    return Err(CoordError::invalid(
                        sub(field, missing),
                        format!("is required with {given}"),
                    ));
                }
                let tls = tls.for_port(port);
                if tls == EmailTls::None && !password.is_empty() && !is_loopback(host) {
                    return Err(CoordError::invalid(
                        sub(field, "password"),
                        format!(
                            "would be sent in clear to {host}: set \"tls\" to \"starttls\" or \"implicit\" \
                             (without tls, port {port} is plain SMTP)"
                        ),
                    ));
                }
                if !ca_file.is_empty() {
                    if tls == EmailTls::None {
                        return Err(CoordError::invalid(
                            sub(field, "ca_file"),
                            format!(
                                "is only used with TLS, and port {port} without \"tls\" is plain SMTP"
                            ),
                        ));
                    }
                    if ca_file.len() > MAX_PATH || ca_file.chars().any(char::is_control) {
                        return Err(CoordError::invalid(
                            sub(field, "ca_file"),
                            format!(
                                "must be a path of at most {MAX_PATH} bytes without control characters"
                            ),
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    /// "webhook" | "slack" | "dingtalk" | "feishu" | "email"
    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Webhook { .. } => "webhook",
            Sink::Slack { .. } => "slack",
            Sink::Dingtalk { .. } => "dingtalk",
            Sink::Feishu { .. } => "feishu",
            Sink::Email { .. } => "email",
        }
    }

    /// The sink without secrets, for display/audit: a set secret becomes `***`;
    /// Slack, DingTalk and Feishu URLs carry their credential in path or query, so
    /// only scheme, host and port are kept (`https://hooks.slack.com/***`). A
    /// webhook URL keeps its path but not its query (`?***`), where tokens of
    /// generic receivers usually sit. A URL that does not parse becomes `***`.
    pub fn redacted(&self) -> Sink {
        match self {
            Sink::Webhook { url, secret } => Sink::Webhook {
                url: redact_query(url),
                secret: mask(secret),
            },
            Sink::Slack { url } => Sink::Slack {
                url: redact_path(url),
            },
            Sink::Dingtalk { url, secret } => Sink::Dingtalk {
                url: redact_path(url),
                secret: mask(secret),
            },
            Sink::Feishu { url, secret } => Sink::Feishu {
                url: redact_path(url),
                secret: mask(secret),
            },
            Sink::Email {
                smtp,
                from,
                to,
                tls,
                username,
                password,
                ca_file,
            } => Sink::Email {
                smtp: smtp.clone(),
                from: from.clone(),
                to: to.clone(),
                tls: *tls,
                username: username.clone(),
                password: mask(password),
                ca_file: ca_file.clone(),
            },
        }
    }
}

/// Whether a notice opens or closes an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeStatus {
    /// The condition holds.
    Firing,
    /// The condition no longer holds.
    Resolved,
}

impl NoticeStatus {
    /// `firing` | `resolved`, as serialized and in `X-Chime-Event`.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeStatus::Firing => "firing",
            NoticeStatus::Resolved => "resolved",
        }
    }

    /// `FIRING` | `RESOLVED`, as humans read it in titles.
    pub fn label(self) -> &'static str {
        match self {
            NoticeStatus::Firing => "FIRING",
            NoticeStatus::Resolved => "RESOLVED",
        }
    }
}

/// One notice: what every sink is told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// Unique per notice (dedup key for receivers), e.g.
    /// "rule/subject/firing/1733300000000".
    pub id: String,
    /// The rule's name.
    pub rule: String,
    /// Firing or resolved.
    pub status: NoticeStatus,
    /// E.g. "run_failed", "dead_letters", "queue_lag", "workers_below",
    /// "fire_skipped", "leader_changed".
    pub condition: String,
    /// What it is about: a job name, a queue family, a group, "leader".
    pub subject: String,
    /// One line, e.g. "job coupon-sync: run r-123 failed after 3 attempts".
    pub summary: String,
    /// More lines (may be empty).
    pub details: String,
    /// When the condition was seen, Unix ms.
    pub at_ms: i64,
    /// The deployment's name/prefix, so several clusters can share a channel.
    pub cluster: String,
}

impl Notice {
    /// `[FIRING] rule: summary`.
    fn headline(&self) -> String {
        format!("[{}] {}: {}", self.status.label(), self.rule, self.summary)
    }

    /// The facts every format lists under the text.
    fn facts(&self) -> [(&'static str, String); 5] {
        [
            ("cluster", self.cluster.clone()),
            ("condition", self.condition.clone()),
            ("subject", self.subject.clone()),
            ("at", rfc3339(self.at_ms)),
            ("notice", self.id.clone()),
        ]
    }
}

/// Why one delivery attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink cannot be used as written (it fails [`Sink::check`], or the notice
    /// cannot be encoded); retrying will not help.
    #[error("unusable sink: {0}")]
    Invalid(String),
    /// The receiver could not be reached: name resolution, connection refused or
    /// reset, TLS handshake.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// TLS with an SMTP relay cannot be had as configured: the relay does not offer
    /// STARTTLS, or its certificate is not trusted or not for its name. Retrying
    /// will not help (a connection that breaks mid-handshake is [`SinkError::Io`]).
    #[error("TLS: {0}")]
    Tls(String),
    /// No answer within the sender's timeout.
    #[error("timed out after {after:?} ({during})")]
    Timeout {
        /// The step that timed out (`HTTP request`, `SMTP RCPT TO`, …).
        during: &'static str,
        /// The sender's timeout.
        after: Duration,
    },
    /// The connection broke, or the receiver spoke something that is not the
    /// protocol, in the middle of an exchange.
    #[error("i/o: {0}")]
    Io(String),
    /// An HTTP receiver answered with a status other than success.
    #[error("HTTP {status}: {body:?}")]
    Http {
        /// The status code.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
    /// The service answered and refused this notice: a DingTalk `errcode` or Feishu
    /// `code` other than 0, a Slack answer other than `ok`.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The service answered that it is rate limiting (DingTalk 130101, Feishu
    /// 9499/11232): later may work.
    #[error("throttled: {0}")]
    Throttled(String),
    /// The SMTP server refused a step.
    #[error("{step} refused: {line:?}")]
    Smtp {
        /// `SMTP greeting`, `SMTP EHLO`, `SMTP STARTTLS`, `SMTP AUTH`, `SMTP MAIL FROM`,
        /// `SMTP RCPT TO`, `SMTP DATA`, `SMTP message`.
        step: &'static str,
        /// The reply code.
        code: u16,
        /// The reply's last line, code included.
        line: String,
    },
}

impl SinkError {
    /// Whether another attempt may succeed: 5xx, 408, 429, service throttling,
    /// timeouts, connection and I/O errors, SMTP 4xx (AUTH 454 included). Other 4xx,
    /// explicit rejections, SMTP 5xx (AUTH 535 included), TLS that cannot be had and
    /// unusable sinks are final.
    pub fn retryable(&self) -> bool {
        match self {
            SinkError::Invalid(_) | SinkError::Rejected(_) | SinkError::Tls(_) => false,
            SinkError::Connect(_)
            | SinkError::Timeout { .. }
            | SinkError::Io(_)
            | SinkError::Throttled(_) => true,
            SinkError::Http { status, .. } => matches!(status, 408 | 429 | 500..=599),
            SinkError::Smtp { code, .. } => (400..500).contains(code),
        }
    }
}

/// Sends notices; cheap to clone (one HTTP client with connection reuse and
/// timeouts).
#[derive(Debug, Clone)]
pub struct Sender {
    http: reqwest::Client,
    timeout: Duration,
    /// What EHLO says this host is.
    helo: String,
}

impl Sender {
    /// A sender whose every attempt gives up after `timeout` (HTTP: whole request;
    /// SMTP: each step). Redirects are not followed: a receiver that moved answers
    /// 3xx, which is reported (and not retried) rather than silently re-aimed.
    pub fn new(timeout: Duration) -> Result<Self> {
        if timeout.is_zero() {
            return Err(CoordError::invalid("timeout", "must be more than 0"));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("chime/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CoordError::Unavailable(format!("alert HTTP client: {}", chain(&e))))?;
        Ok(Sender {
            http,
            timeout,
            helo: helo_name(),
        })
    }

    /// Delivers `notice` to `sink` once (no retry here: the caller retries and
    /// counts). Err names the cause (status code and body excerpt, connection
    /// refused, SMTP reply code/line, a DingTalk/Feishu/Slack error answer such as
    /// `{"errcode":310000,...}` / `{"code":19021,...}` / `invalid_token`). Errors never
    /// quote the URL: for chat sinks it is the credential.
    pub async fn send(&self, sink: &Sink, notice: &Notice) -> Result<(), SinkError> {
        // The sink is normally checked when its rule is stored; checking again keeps
        // an unchecked one from smuggling CR/LF into SMTP commands or headers.
        sink.check("sink")
            .map_err(|e| SinkError::Invalid(e.to_string()))?;
        match sink {
            Sink::Webhook { url, secret } => self.webhook(url, secret, notice).await,
            Sink::Slack { url } => self.slack(url, notice).await,
            Sink::Dingtalk { url, secret } => self.dingtalk(url, secret, notice).await,
            Sink::Feishu { url, secret } => self.feishu(url, secret, notice).await,
            Sink::Email {
                smtp,
                from,
                to,
                tls,
                username,
                password,
                ca_file,
            } => {
                let (host, port) = split_smtp(smtp)
                    .ok_or_else(|| SinkError::Invalid(format!("smtp {smtp:?} is not host:port")))?;
                let relay = Relay {
                    smtp,
                    host,
                    tls: tls.for_port(port),
                    username,
                    password,
                    ca_file,
                };
                self.email(&relay, from, to, notice).await
            }
        }
    }

    async fn webhook(&self, url: &str, secret: &str, notice: &Notice) -> Result<(), SinkError> {
        let body = serde_json::to_vec(notice).map_err(|e| SinkError::Invalid(e.to_string()))?;
        let ts = unix_ms() / 1000;
        let mut request = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Chime-Event", notice.status.as_str())
            .header("X-Chime-Notice-Id", header_safe(&notice.id))
            .header("X-Chime-Timestamp", ts.to_string());
        if !secret.is_empty() {
            // Over "<timestamp>.<body>", as Stripe does: the receiver checks the
            // timestamp is recent, so a captured request cannot be replayed later.
            let mut signed = format!("{ts}.").into_bytes();
            signed.extend_from_slice(&body);
            let signature = hex(&hmac_sha256(secret.as_bytes(), &signed));
            request = request.header("X-Chime-Signature", format!("sha256={signature}"));
        }
        let (status, answer) = self.exchange(request.body(body)).await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(SinkError::Http {
                status,
                body: excerpt(&answer),
            })
        }
    }

    async fn slack(&self, url: &str, notice: &Notice) -> Result<(), SinkError> {
        let request = self.http.post(url).json(&slack_payload(notice));
        let (status, answer) = self.exchange(request).await?;
        if status != 200 {
            return Err(SinkError::Http {
                status,
                body: excerpt(&answer),
            });
        }
        // Slack answers errors with 4xx and a word (`invalid_payload`, `no_team`);
        // a 200 that is not "ok" is refused too rather than assumed delivered.
        if answer.trim() == "ok" {
            Ok(())
        } else {
            Err(SinkError::Rejected(format!(
                "slack answered {:?}",
                excerpt(&answer)
            )))
        }
    }

    async fn dingtalk(&self, url: &str, secret: &str, notice: &Notice) -> Result<(), SinkError> {
        let mut url = reqwest::Url::parse(url).map_err(|e| SinkError::Invalid(e.to_string()))?;
        if !secret.is_empty() {
            // DingTalk's 加签: HMAC-SHA256 keyed by the secret over "<ms>\n<secret>",
            // base64, then URL-encoded into the query next to the ms timestamp.
            let ts = unix_ms();
            let digest = hmac_sha256(secret.as_bytes(), format!("{ts}\n{secret}").as_bytes());
            let sign = percent_encode(&base64(&digest));
            let query = match url.query() {
                Some(q) if !q.is_empty() => format!("{q}&timestamp={ts}&sign={sign}"),
                _ => format!("timestamp={ts}&sign={sign}"),
            };
            url.set_query(Some(&query));
        }
        let request = self.http.post(url).json(&dingtalk_payload(notice));
        let (status, answer) = self.exchange(request).await?;
        robot_verdict("dingtalk", status, &answer, &["errcode"], &[130101])
    }

    async fn feishu(&self, url: &str, secret: &str, notice: &Notice) -> Result<(), SinkError> {
        let mut payload = serde_json::Map::new();
        if !secret.is_empty() {
            // Feishu signs nothing of the message: the key is "<s>\n<secret>" and the
            // data empty; the timestamp (seconds, a string) travels in the body.
            let ts = (unix_ms() / 1000).to_string();
            let digest = hmac_sha256(format!("{ts}\n{secret}").as_bytes(), b"");
            payload.insert("timestamp".into(), Value::String(ts));
            payload.insert("sign".into(), Value::String(base64(&digest)));
        }
        payload.insert("msg_type".into(), json!("text"));
        payload.insert("content".into(), json!({ "text": plain_text(notice) }));
        let request = self.http.post(url).json(&payload);
        let (status, answer) = self.exchange(request).await?;
        // `code` in today's API, `StatusCode` in the older one.
        robot_verdict(
            "feishu",
            status,
            &answer,
            &["code", "StatusCode"],
            &[9499, 11232],
        )
    }

    /// Sends `request`; the status and the start of the answer's body.
    async fn exchange(&self, request: reqwest::RequestBuilder) -> Result<(u16, String), SinkError> {
        let mut response = request.send().await.map_err(|e| self.http_error(e))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while body.len() < MAX_ANSWER {
            match response.chunk().await.map_err(|e| self.http_error(e))? {
                Some(chunk) => body.extend_from_slice(&chunk),
                None => break,
            }
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    fn http_error(&self, e: reqwest::Error) -> SinkError {
        // Without the URL: for chat sinks it is the credential, and errors are
        // logged and shown.
        let e = e.without_url();
        if e.is_timeout() {
            SinkError::Timeout {
                during: "HTTP request",
                after: self.timeout,
            }
        } else if e.is_connect() {
            SinkError::Connect(chain(&e))
        } else if e.is_builder() {
            SinkError::Invalid(chain(&e))
        } else {
            SinkError::Io(chain(&e))
        }
    }

    async fn email(
        &self,
        relay: &Relay<'_>,
        from: &str,
        to: &[String],
        notice: &Notice,
    ) -> Result<(), SinkError> {
        // The roots first: a bad ca_file is reported without a connection.
        let tls = match relay.tls {
            EmailTls::Starttls | EmailTls::Implicit => Some(tls_connector(relay.ca_file).await?),
            EmailTls::None | EmailTls::Auto => None,
        };
        let smtp = relay.smtp;
        let stream = tokio::time::timeout(self.timeout, TcpStream::connect(smtp))
            .await
            .map_err(|_| smtp_timeout("SMTP connect", self.timeout))?
            .map_err(|e| SinkError::Connect(format!("{smtp}: {e}")))?;
        let Some(connector) = tls else {
            let mut session = Smtp::new(stream, self.timeout);
            session.expect(None, "SMTP greeting", &[220]).await?;
            let extensions = session.hello(&self.helo).await?;
            return session.deliver(&extensions, relay, from, to, notice).await;
        };
        let stream = if relay.tls == EmailTls::Implicit {
            self.handshake(&connector, relay, stream).await?
        } else {
            let mut session = Smtp::new(stream, self.timeout);
            session.expect(None, "SMTP greeting", &[220]).await?;
            let extensions = session.hello(&self.helo).await?;
            if !has_extension(&extensions, "STARTTLS") {
                return Err(SinkError::Tls(format!(
                    "the relay does not offer STARTTLS ({smtp} does not list it after EHLO); \
                     set \"tls\": \"implicit\" if it speaks TLS from the start (465), or \
                     \"none\" for a relay without TLS"
                )));
            }
            session
                .expect(Some("STARTTLS"), "SMTP STARTTLS", &[220])
                .await?;
            let stream = session.into_plain()?;
            self.handshake(&connector, relay, stream).await?
        };
        let mut session = Smtp::new(stream, self.timeout);
        if relay.tls == EmailTls::Implicit {
            session.expect(None, "SMTP greeting", &[220]).await?;
        }
        // After STARTTLS the relay forgets what was said before (RFC 3207): EHLO
        // again, and trust only what it lists now.
        let extensions = session.hello(&self.helo).await?;
        session.deliver(&extensions, relay, from, to, notice).await
    }

    /// TLS over `stream`, the certificate checked against `relay.host`.
    async fn handshake(
        &self,
        connector: &TlsConnector,
        relay: &Relay<'_>,
        stream: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, SinkError> {
        let host = relay.host;
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            SinkError::Invalid(format!("smtp host {host:?} is not a TLS server name: {e}"))
        })?;
        tokio::time::timeout(self.timeout, connector.connect(name, stream))
            .await
            .map_err(|_| smtp_timeout("SMTP TLS handshake", self.timeout))?
            .map_err(|e| {
                // tokio-rustls wraps what rustls refused (certificate, protocol, an
                // alert from the relay) in InvalidData; anything else is the
                // connection breaking, which may not happen next time.
                match e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                {
                    Some(rustls::Error::InvalidCertificate(cause)) => {
                        let cause = cause.to_string();
                        // webpki does not take a CA certificate as the relay's own:
                        // `openssl req -x509` makes one unless told CA:FALSE.
                        let hint = if cause.contains("CaUsedAsEndEntity") {
                            "; the relay presents a CA certificate as its own: give it \
                             a certificate with CA:FALSE, signed by the CA in ca_file"
                        } else if relay.ca_file.is_empty() {
                            "; a relay with a private CA needs ca_file"
                        } else {
                            ""
                        };
                        SinkError::Tls(format!(
                            "handshake with {host}: the relay's certificate is not \
                             trusted: {cause}{hint}"
                        ))
                    }
                    Some(tls) => SinkError::Tls(format!("handshake with {host}: {tls}")),
                    None => SinkError::Io(format!("SMTP TLS handshake: {e}")),
                }
            })
    }
}

/// An email sink's relay, as one send uses it.
struct Relay<'a> {
    /// `host:port`.
    smtp: &'a str,
    /// The host part (brackets of an IPv6 literal removed).
    host: &'a str,
    /// Resolved: never `Auto`.
    tls: EmailTls,
    username: &'a str,
    password: &'a str,
    ca_file: &'a str,
}

/// The webpki roots, plus those in `ca_file` when set.
async fn tls_connector(ca_file: &str) -> Result<TlsConnector, SinkError> {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if !ca_file.is_empty() {
        let bad = |what: String| SinkError::Invalid(format!("ca_file {ca_file}: {what}"));
        let pem = tokio::fs::read(ca_file)
            .await
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad("holds no certificate".to_string()));
        }
    }
    // ring, not the process default: the sink works whether or not a provider was
    // installed (the binaries install ring too).
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| SinkError::Invalid(format!("TLS client: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Whether an EHLO reply lists `name` (a keyword, any case).
fn has_extension(extensions: &[String], name: &str) -> bool {
    extensions.iter().any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(name))
    })
}

/// The SASL mechanisms an EHLO reply lists (`AUTH PLAIN LOGIN`, or the old
/// `AUTH=LOGIN`), upper case.
fn auth_mechanisms(extensions: &[String]) -> Vec<String> {
    extensions
        .iter()
        .filter_map(|l| {
            let keyword = l.get(..5)?;
            (keyword.eq_ignore_ascii_case("AUTH ") || keyword.eq_ignore_ascii_case("AUTH="))
                .then(|| l[5..].split_whitespace().map(str::to_ascii_uppercase))
        })
        .flatten()
        .collect()
}

/// One SMTP conversation, over TCP or TLS.
struct Smtp<S> {
    stream: BufReader<S>,
    timeout: Duration,
}

/// One (possibly multi-line) SMTP reply.
struct Reply {
    code: u16,
    /// Each line's text after the code and separator.
    lines: Vec<String>,
    /// The last line as received, code included.
    last: String,
}

impl Smtp<TcpStream> {
    /// The connection, for the TLS handshake after `STARTTLS` was accepted. Refused
    /// if the relay already sent more: bytes from before the handshake must not be
    /// read as if they came over TLS (the STARTTLS command injection of
    /// CVE-2011-0411, from the other side).
    fn into_plain(self) -> Result<TcpStream, SinkError> {
        if !self.stream.buffer().is_empty() {
            return Err(SinkError::Tls(
                "the relay sent data after its STARTTLS reply, before the handshake".into(),
            ));
        }
        Ok(self.stream.into_inner())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Smtp<S> {
    fn new(stream: S, timeout: Duration) -> Self {
        Smtp {
            stream: BufReader::new(stream),
            timeout,
        }
    }

    /// EHLO (HELO for a server from before ESMTP); the extensions the reply lists.
    async fn hello(&mut self, helo: &str) -> Result<Vec<String>, SinkError> {
        let ehlo = format!("EHLO {helo}");
        match self.expect(Some(&ehlo), "SMTP EHLO", &[250]).await {
            Ok(reply) => Ok(reply.lines),
            // A server from before ESMTP: say HELO, use no extension.
            Err(SinkError::Smtp {
                code: 500 | 502, ..
            }) => {
                let helo = format!("HELO {helo}");
                self.expect(Some(&helo), "SMTP HELO", &[250]).await?;
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// AUTH when the relay has a username, then the mail, then QUIT.
    async fn deliver(
        &mut self,
        extensions: &[String],
        relay: &Relay<'_>,
        from: &str,
        to: &[String],
        notice: &Notice,
    ) -> Result<(), SinkError> {
        if !relay.username.is_empty() {
            self.auth(extensions, relay.username, relay.password)
                .await?;
        }
        let eight_bit = has_extension(extensions, "8BITMIME");
        let mail = if eight_bit {
            format!("MAIL FROM:<{from}> BODY=8BITMIME")
        } else {
            format!("MAIL FROM:<{from}>")
        };
        self.expect(Some(&mail), "SMTP MAIL FROM", &[250]).await?;
        // One refused recipient fails the attempt: a retry then reaches all of them
        // again, and the Message-ID (the notice id) lets clients fold duplicates.
        for rcpt in to {
            let line = format!("RCPT TO:<{rcpt}>");
            self.expect(Some(&line), "SMTP RCPT TO", &[250, 251])
                .await?;
        }
        self.expect(Some("DATA"), "SMTP DATA", &[354]).await?;
        let data = smtp_data(&email_message(
            from,
            to,
            notice,
            &chrono::Utc::now().to_rfc2822(),
        ));
        self.send_raw(&data, "SMTP message").await?;
        self.expect(None, "SMTP message", &[250]).await?;
        // Accepted: whatever QUIT meets no longer matters, and failing now would
        // only make the caller send a duplicate.
        let _ = self.expect(Some("QUIT"), "SMTP QUIT", &[221]).await;
        Ok(())
    }

    /// AUTH PLAIN (RFC 4616), or LOGIN when the relay lists LOGIN but not PLAIN.
    /// 235 is success; the relay's refusal (535 bad credentials, 454 try later) is
    /// returned as is. Errors never quote what was sent.
    async fn auth(
        &mut self,
        extensions: &[String],
        username: &str,
        password: &str,
    ) -> Result<(), SinkError> {
        let mechanisms = auth_mechanisms(extensions);
        let login_only =
            mechanisms.iter().any(|m| m == "LOGIN") && !mechanisms.iter().any(|m| m == "PLAIN");
        if login_only {
            self.expect(Some("AUTH LOGIN"), "SMTP AUTH", &[334]).await?;
            self.expect(Some(&base64(username.as_bytes())), "SMTP AUTH", &[334])
                .await?;
            self.expect(Some(&base64(password.as_bytes())), "SMTP AUTH", &[235])
                .await?;
        } else {
            let credentials = base64(format!("\0{username}\0{password}").as_bytes());
            self.expect(
                Some(&format!("AUTH PLAIN {credentials}")),
                "SMTP AUTH",
                &[235],
            )
            .await?;
        }
        Ok(())
    }

    /// Sends `command` (if any), reads the reply and refuses codes not in `ok`.
    async fn expect(
        &mut self,
        command: Option<&str>,
        step: &'static str,
        ok: &[u16],
    ) -> Result<Reply, SinkError> {
        if let Some(command) = command {
            self.send_raw(&format!("{command}\r\n"), step).await?;
        }
        let after = self.timeout;
        let reply = tokio::time::timeout(after, self.read_reply(step))
            .await
            .map_err(|_| smtp_timeout(step, after))??;
        if ok.contains(&reply.code) {
            Ok(reply)
        } else {
            Err(SinkError::Smtp {
                step,
                code: reply.code,
                line: reply.last,
            })
        }
    }

    async fn send_raw(&mut self, text: &str, step: &'static str) -> Result<(), SinkError> {
        let after = self.timeout;
        let stream = self.stream.get_mut();
        let write = async {
            stream.write_all(text.as_bytes()).await?;
            stream.flush().await
        };
        tokio::time::timeout(after, write)
            .await
            .map_err(|_| smtp_timeout(step, after))?
            .map_err(|e| SinkError::Io(format!("{step}: {e}")))
    }

    async fn read_reply(&mut self, step: &'static str) -> Result<Reply, SinkError> {
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            let n = (&mut self.stream)
                .take(MAX_SMTP_LINE)
                .read_until(b'\n', &mut raw)
                .await
                .map_err(|e| SinkError::Io(format!("{step}: {e}")))?;
            if n == 0 {
                return Err(SinkError::Io(format!(
                    "{step}: connection closed by the server"
                )));
            }
            let line = String::from_utf8_lossy(&raw).trim_end().to_string();
            let code = line
                .get(..3)
                .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| SinkError::Io(format!("{step}: not a reply: {line:?}")))?;
            // "250-…" continues, "250 …" (or a bare "250") ends the reply.
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if !more {
                return Ok(Reply {
                    code,
                    lines,
                    last: line,
                });
            }
            if lines.len() >= MAX_SMTP_LINES {
                return Err(SinkError::Io(format!("{step}: endless reply")));
            }
        }
    }
}

fn smtp_timeout(step: &'static str, after: Duration) -> SinkError {
    SinkError::Timeout {
        during: step,
        after,
    }
}

/// DingTalk and Feishu answer 200 with a JSON result code; 0 is delivered.
fn robot_verdict(
    service: &str,
    status: u16,
    answer: &str,
    code_keys: &[&str],
    throttled: &[i64],
) -> Result<(), SinkError> {
    let verdict = serde_json::from_str::<Value>(answer).ok().and_then(|v| {
        let code = code_keys
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_i64))?;
        let message = ["errmsg", "msg", "StatusMessage"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_str))
            .unwrap_or("")
            .to_string();
        Some((code, message))
    });
    let success = (200..300).contains(&status);
    match verdict {
        Some((code, message)) if throttled.contains(&code) => Err(SinkError::Throttled(format!(
            "{service} code {code}: {}",
            excerpt(&message)
        ))),
        _ if !success => Err(SinkError::Http {
            status,
            body: excerpt(answer),
        }),
        Some((0, _)) => Ok(()),
        Some((code, message)) => Err(SinkError::Rejected(format!(
            "{service} code {code}: {}",
            excerpt(&message)
        ))),
        None => Err(SinkError::Rejected(format!(
            "{service} answered without a result code: {:?}",
            excerpt(answer)
        ))),
    }
}

fn slack_payload(notice: &Notice) -> Value {
    // Slack reads text as mrkdwn: &, < and > would start entities and links.
    let mut section = format!("*{}*", slack_escape(&truncate(&notice.summary, 400)));
    if !notice.details.is_empty() {
        let details = slack_escape(&truncate(&notice.details, MAX_CHAT_DETAILS));
        section.push_str("\n```");
        section.push_str(&details.replace("```", "'''"));
        section.push_str("```");
    }
    let context = notice
        .facts()
        .iter()
        .map(|(k, v)| format!("{k}: {}", slack_escape(v)))
        .collect::<Vec<_>>()
        .join(" · ");
    json!({
        "text": slack_escape(&truncate(&notice.headline(), 1000)),
        "blocks": [
            {
                "type": "header",
                "text": {
                    "type": "plain_text",
                    "text": truncate(&format!("[{}] {}", notice.status.label(), notice.rule), 150),
                    "emoji": false,
                },
            },
            { "type": "section", "text": { "type": "mrkdwn", "text": section } },
            {
                "type": "context",
                "elements": [ { "type": "mrkdwn", "text": truncate(&context, 2000) } ],
            },
        ],
    })
}

fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn dingtalk_payload(notice: &Notice) -> Value {
    // DingTalk's markdown joins single newlines; each line is its own paragraph.
    let mut text = format!(
        "#### [{}] {}\n\n**{}**\n\n",
        notice.status.label(),
        notice.rule,
        notice.summary
    );
    for line in truncate(&notice.details, MAX_CHAT_DETAILS).lines() {
        if !line.trim().is_empty() {
            text.push_str(line);
            text.push_str("\n\n");
        }
    }
    for (k, v) in notice.facts() {
        text.push_str(&format!("- {k}: {v}\n"));
    }
    json!({
        "msgtype": "markdown",
        "markdown": { "title": truncate(&notice.headline(), 100), "text": text },
    })
}

/// The notice as plain text (Feishu, and the email body).
fn plain_text(notice: &Notice) -> String {
    let mut text = notice.headline();
    text.push('\n');
    if !notice.details.is_empty() {
        text.push('\n');
        text.push_str(notice.details.trim_end());
        text.push('\n');
    }
    text.push('\n');
    for (k, v) in notice.facts() {
        text.push_str(&format!("{k}: {v}\n"));
    }
    text
}

/// The email, headers and body, lines separated by `\n` (see [`smtp_data`]).
fn email_message(from: &str, to: &[String], notice: &Notice, date: &str) -> String {
    let subject = header_text(&truncate(&format!("[chime] {}", notice.headline()), 200));
    // The notice id, so every attempt of one notice carries one Message-ID.
    let domain = from.rsplit_once('@').map_or("chime", |(_, d)| d);
    let id: String = notice
        .id
        .chars()
        .take(200)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '.'
            }
        })
        .collect();
    let mut message = String::new();
    for (name, value) in [
        ("Date", header_safe(date)),
        ("From", from.to_string()),
        ("To", to.join(",\n ")),
        ("Subject", subject),
        ("Message-ID", format!("<chime.{id}@{domain}>")),
        ("MIME-Version", "1.0".to_string()),
        ("Content-Type", "text/plain; charset=utf-8".to_string()),
        ("Content-Transfer-Encoding", "8bit".to_string()),
        // RFC 3834: vacation responders and the like do not answer it.
        ("Auto-Submitted", "auto-generated".to_string()),
        ("X-Chime-Event", notice.status.as_str().to_string()),
        ("X-Chime-Notice-Id", header_safe(&notice.id)),
    ] {
        message.push_str(name);
        message.push_str(": ");
        message.push_str(&value);
        message.push('\n');
    }
    message.push('\n');
    message.push_str(&plain_text(notice));
    message
}

/// A header value from free text: no control characters (a CR/LF would start a
/// header of the text's choosing, `Bcc:` say), non-ASCII as RFC 2047 encoded words.
fn header_text(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.is_ascii() {
        return clean;
    }
    // Words of at most 45 bytes (60 in base64), split on char boundaries, folded.
    let mut words = Vec::new();
    let mut word = String::new();
    for c in clean.chars() {
        if word.len() + c.len_utf8() > 45 {
            words.push(format!("=?UTF-8?B?{}?=", base64(word.as_bytes())));
            word.clear();
        }
        word.push(c);
    }
    if !word.is_empty() {
        words.push(format!("=?UTF-8?B?{}?=", base64(word.as_bytes())));
    }
    words.join("\n ")
}

/// Printable ASCII only: what a header (HTTP or mail) can carry as is.
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '_' })
        .collect()
}

/// The DATA section: CRLF line endings, lines at most 990 bytes, a leading dot
/// doubled (else a line "." would end the message early), and the final ".".
fn smtp_data(message: &str) -> String {
    let normalized = message.replace("\r\n", "\n").replace('\r', "\n");
    let mut data = String::with_capacity(normalized.len() + 64);
    for line in normalized.split('\n') {
        let mut rest = line;
        loop {
            let mut cut = rest.len().min(MAX_MAIL_LINE);
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            let (piece, tail) = rest.split_at(cut);
            if piece.starts_with('.') {
                data.push('.');
            }
            data.push_str(piece);
            data.push_str("\r\n");
            if tail.is_empty() {
                break;
            }
            rest = tail;
        }
    }
    data.push_str(".\r\n");
    data
}

/// `field.name`, or `name` when there is no field.
fn sub(field: &str, name: &str) -> String {
    if field.is_empty() {
        name.to_string()
    } else {
        format!("{field}.{name}")
    }
}

fn check_url(field: &str, url: &str) -> Result<reqwest::Url> {
    if url.len() > MAX_URL {
        return Err(CoordError::invalid(
            field,
            format!("longer than {MAX_URL} characters"),
        ));
    }
    // The URL parser drops tabs and newlines silently; refuse them instead.
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(CoordError::invalid(
            field,
            "must not contain whitespace or control characters",
        ));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| CoordError::invalid(field, e))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(CoordError::invalid(
            field,
            format!("scheme must be http or https, not {:?}", parsed.scheme()),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(CoordError::invalid(field, "has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(CoordError::invalid(
            field,
            "must not carry user:password@ (use the secret)",
        ));
    }
    Ok(parsed)
}

fn check_secret(field: &str, secret: &str) -> Result<()> {
    if secret.chars().count() > MAX_SECRET {
        return Err(CoordError::invalid(
            field,
            format!("longer than {MAX_SECRET} characters"),
        ));
    }
    if secret.chars().any(char::is_control) {
        return Err(CoordError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// `host:port` of an email sink: the host (an IPv6 literal without its brackets)
/// and the port, or None when it is not that shape.
fn split_smtp(smtp: &str) -> Option<(&str, u16)> {
    let (host, port) = match smtp.strip_prefix('[') {
        Some(rest) => rest.split_once("]:")?,
        None => smtp.rsplit_once(':')?,
    };
    Some((host, port.parse().ok()?))
}

/// Checks `host:port`; the host and the port.
fn check_smtp<'a>(field: &str, smtp: &'a str) -> Result<(&'a str, u16)> {
    let bad = |reason: &str| CoordError::invalid(field, format!("{reason} (want host:port)"));
    let (host, port) = match smtp.strip_prefix('[') {
        Some(rest) => {
            let (ip, port) = rest.split_once("]:").ok_or_else(|| bad("no port"))?;
            ip.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("not an IPv6 address in brackets"))?;
            (ip, port)
        }
        None => smtp.rsplit_once(':').ok_or_else(|| bad("no port"))?,
    };
    if host.is_empty() || host.len() > 253 {
        return Err(bad("no host"));
    }
    if !smtp.starts_with('[')
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(bad("the host has characters a host name cannot have"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host, p)),
        _ => Err(bad("the port is not a number from 1 to 65535")),
    }
}

/// A loopback address (127.0.0.0/8, ::1) or `localhost`: where a password may go
/// without TLS, since it never leaves the machine.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `local@domain`, ASCII, nothing that would end an SMTP path or split a header.
fn check_address(field: &str, address: &str) -> Result<()> {
    let bad = |reason: &str| CoordError::invalid(field, format!("{reason} (want local@domain)"));
    if address.len() > MAX_ADDRESS {
        return Err(bad("too long"));
    }
    if !address.is_ascii() {
        return Err(bad("not ASCII"));
    }
    if address
        .chars()
        .any(|c| c.is_ascii_whitespace() || c.is_ascii_control() || "<>,;:\"()[]\\".contains(c))
    {
        return Err(bad(
            "has whitespace, a control character or one of <>,;:\"()[]\\",
        ));
    }
    let (local, domain) = address.split_once('@').ok_or_else(|| bad("no @"))?;
    if local.is_empty() || domain.is_empty() || domain.contains('@') {
        return Err(bad("needs exactly one @ between a local part and a domain"));
    }
    if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
        return Err(bad("the domain is not a host name"));
    }
    Ok(())
}

fn mask(secret: &str) -> String {
    if secret.is_empty() {
        String::new()
    } else {
        "***".to_string()
    }
}

/// Scheme, host and port of `url`, then `/***`.
fn redact_path(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) if u.host_str().is_some() => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}/***",
                u.scheme(),
                u.host_str().unwrap_or_default()
            )
        }
        _ => "***".to_string(),
    }
}

/// `url` without credentials, query (`?***` when there was one) or fragment.
fn redact_query(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_fragment(None);
            if u.query().is_some() {
                u.set_query(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "***".to_string(),
    }
}

/// The error and its sources, `: `-joined (reqwest's own message is only the outer
/// layer: "error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// At most `max` characters of `text`, an ellipsis marking a cut.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => {
            let mut short = text[..cut].to_string();
            short.pop();
            short.push('…');
            short
        }
        None => text.to_string(),
    }
}

/// The start of a receiver's answer, for an error message.
fn excerpt(answer: &str) -> String {
    truncate(answer.trim(), EXCERPT)
}

/// `at_ms` as RFC 3339 UTC, or the raw number when out of range.
fn rfc3339(at_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(at_ms).map_or_else(
        || at_ms.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// Wall-clock Unix ms. Not chime's `Clock`: receivers compare signature timestamps
/// with their own wall clock, so a test clock would only make signatures fail.
fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What EHLO names: `$HOSTNAME` when it is a plausible host name, else "chime".
fn helo_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 253
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .unwrap_or_else(|| "chime".to_string())
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, data).as_ref().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Standard base64 (RFC 4648 §4) with padding; a few lines instead of a crate.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b0 = chunk.first().copied().unwrap_or(0);
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 63) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// Percent-encodes every byte but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(DIGITS[usize::from(b >> 4)]));
            out.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    use super::*;

    // ---- a tiny HTTP/1.1 receiver ----

    #[derive(Debug, Clone)]
    struct Request {
        method: String,
        target: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Request {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap()
        }
    }

    /// What the receiver answers: a status and body, or nothing at all.
    #[derive(Debug, Clone)]
    enum Answer {
        Reply(u16, &'static str),
        Silent,
    }

    type Seen<T> = Arc<Mutex<Vec<T>>>;

    /// A receiver on 127.0.0.1; its base URL and what it was sent.
    async fn http_receiver(answer: Answer) -> (String, Seen<Request>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen: Seen<Request> = Arc::default();
        let recorded = seen.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let recorded = recorded.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut r = BufReader::new(socket);
                    let mut line = String::new();
                    r.read_line(&mut line).await.unwrap();
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap().to_string();
                    let target = parts.next().unwrap().to_string();
                    let mut headers = Vec::new();
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).await.unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap();
                        headers.push((k.trim().to_string(), v.trim().to_string()));
                    }
                    let len = headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .map_or(0, |(_, v)| v.parse().unwrap());
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).await.unwrap();
                    recorded.lock().unwrap().push(Request {
                        method,
                        target,
                        headers,
                        body,
                    });
                    match answer {
                        Answer::Reply(status, body) => {
                            let head = format!(
                                "HTTP/1.1 {status} Whatever\r\ncontent-type: text/plain\r\n\
                                 content-length: {}\r\nconnection: close\r\n\r\n",
                                body.len()
                            );
                            let s = r.get_mut();
                            s.write_all(head.as_bytes()).await.unwrap();
                            s.write_all(body.as_bytes()).await.unwrap();
                            s.shutdown().await.unwrap();
                        }
                        Answer::Silent => tokio::time::sleep(Duration::from_secs(60)).await,
                    }
                });
            }
        });
        (base, seen)
    }

    /// A local port nothing listens on.
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    // ---- a tiny SMTP receiver (plain, STARTTLS, implicit TLS) ----

    #[derive(Debug, Default, Clone)]
    struct Mail {
        commands: Vec<String>,
        /// Per command: whether it came over TLS.
        secure: Vec<bool>,
        rcpt: Vec<String>,
        /// The DATA section as sent (dot-stuffed, CRLF), without the final ".".
        data: String,
    }

    impl Mail {
        fn saw(&self, prefix: &str) -> bool {
            self.commands.iter().any(|c| c.starts_with(prefix))
        }
    }

    /// How a test relay behaves.
    #[derive(Debug, Clone, Copy)]
    struct TestRelay {
        /// false: accept and say nothing.
        greet: bool,
        /// TLS from the first byte.
        implicit: bool,
        /// Whether EHLO lists STARTTLS (before TLS).
        starttls: bool,
        /// What `250-AUTH` lists; empty: no AUTH line.
        mechanisms: &'static str,
        /// The answer that ends an AUTH exchange.
        auth_reply: &'static str,
        rcpt_reply: &'static str,
    }

    impl TestRelay {
        fn plain(rcpt_reply: &'static str) -> Self {
            TestRelay {
                greet: true,
                implicit: false,
                starttls: false,
                mechanisms: "",
                auth_reply: "235 2.7.0 ok\r\n",
                rcpt_reply,
            }
        }

        /// Offers STARTTLS and AUTH PLAIN LOGIN (before and after TLS: the client
        /// must not take the offer in clear).
        fn starttls() -> Self {
            TestRelay {
                starttls: true,
                mechanisms: "PLAIN LOGIN",
                ..TestRelay::plain("250 ok\r\n")
            }
        }
    }

    /// How a session (or its plain part) ended.
    enum Ended {
        Starttls,
        Quit,
        Closed,
    }

    /// An SMTP server answering `rcpt_reply` to RCPT TO (`greet`: false says nothing).
    async fn smtp_receiver(greet: bool, rcpt_reply: &'static str) -> (String, Seen<Mail>) {
        relay_receiver(
            TestRelay {
                greet,
                ..TestRelay::plain(rcpt_reply)
            },
            None,
        )
        .await
    }

    /// A relay on 127.0.0.1 (TLS with `acceptor`); its address and the sessions it
    /// had, each recorded at QUIT or when the client went away.
    async fn relay_receiver(
        relay: TestRelay,
        acceptor: Option<TlsAcceptor>,
    ) -> (String, Seen<Mail>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen: Seen<Mail> = Arc::default();
        let recorded = seen.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let recorded = recorded.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if !relay.greet {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let mut mail = Mail::default();
                    let ended = if relay.implicit {
                        match acceptor.unwrap().accept(socket).await {
                            Ok(tls) => {
                                let mut r = BufReader::new(tls);
                                serve_smtp(&mut r, &mut mail, true, relay, &recorded).await
                            }
                            Err(_) => Ended::Closed,
                        }
                    } else {
                        let mut r = BufReader::new(socket);
                        match serve_smtp(&mut r, &mut mail, false, relay, &recorded).await {
                            Ended::Starttls => {
                                assert!(r.buffer().is_empty(), "pipelined after STARTTLS");
                                match acceptor.unwrap().accept(r.into_inner()).await {
                                    Ok(tls) => {
                                        let mut r = BufReader::new(tls);
                                        serve_smtp(&mut r, &mut mail, true, relay, &recorded).await
                                    }
                                    Err(_) => Ended::Closed,
                                }
                            }
                            ended => ended,
                        }
                    };
                    if !matches!(ended, Ended::Quit) {
                        recorded.lock().unwrap().push(mail);
                    }
                });
            }
        });
        (addr, seen)
    }

    /// One session over `r` (`secure`: TLS is up, so no STARTTLS and a new greeting
    /// is not due).
    async fn serve_smtp<S: AsyncRead + AsyncWrite + Unpin>(
        r: &mut BufReader<S>,
        mail: &mut Mail,
        secure: bool,
        relay: TestRelay,
        recorded: &Seen<Mail>,
    ) -> Ended {
        async fn say<S: AsyncRead + AsyncWrite + Unpin>(r: &mut BufReader<S>, text: &str) -> bool {
            let s = r.get_mut();
            s.write_all(text.as_bytes()).await.is_ok() && s.flush().await.is_ok()
        }
        async fn hear<S: AsyncRead + AsyncWrite + Unpin>(
            r: &mut BufReader<S>,
            mail: &mut Mail,
            secure: bool,
        ) -> Option<String> {
            let mut line = String::new();
            match r.read_line(&mut line).await {
                Ok(n) if n > 0 => {
                    let line = line.trim_end().to_string();
                    mail.commands.push(line.clone());
                    mail.secure.push(secure);
                    Some(line)
                }
                _ => None,
            }
        }

        let greeting = !secure || relay.implicit;
        if greeting && !say(r, "220 test ESMTP\r\n").await {
            return Ended::Closed;
        }
        loop {
            let Some(line) = hear(r, mail, secure).await else {
                return Ended::Closed;
            };
            let reply: String = if line.starts_with("EHLO") {
                let mut reply = "250-test greets you\r\n250-8BITMIME\r\n".to_string();
                if relay.starttls && !secure {
                    reply.push_str("250-STARTTLS\r\n");
                }
                if !relay.mechanisms.is_empty() {
                    reply.push_str(&format!("250-AUTH {}\r\n", relay.mechanisms));
                }
                reply + "250 SIZE 1000000\r\n"
            } else if line == "STARTTLS" && relay.starttls && !secure {
                return if say(r, "220 2.0.0 ready to start TLS\r\n").await {
                    Ended::Starttls
                } else {
                    Ended::Closed
                };
            } else if line.starts_with("AUTH PLAIN ") {
                relay.auth_reply.to_string()
            } else if line == "AUTH LOGIN" {
                for prompt in ["334 VXNlcm5hbWU6\r\n", "334 UGFzc3dvcmQ6\r\n"] {
                    if !say(r, prompt).await || hear(r, mail, secure).await.is_none() {
                        return Ended::Closed;
                    }
                }
                relay.auth_reply.to_string()
            } else if line.starts_with("MAIL FROM:") {
                "250 2.1.0 ok\r\n".to_string()
            } else if let Some(to) = line.strip_prefix("RCPT TO:") {
                mail.rcpt.push(to.to_string());
                relay.rcpt_reply.to_string()
            } else if line == "DATA" {
                if !say(r, "354 go ahead\r\n").await {
                    return Ended::Closed;
                }
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).await.unwrap_or(0) == 0 {
                        return Ended::Closed;
                    }
                    if l == ".\r\n" {
                        break;
                    }
                    mail.data.push_str(&l);
                }
                "250 2.0.0 queued\r\n".to_string()
            } else if line == "QUIT" {
                recorded.lock().unwrap().push(mail.clone());
                say(r, "221 bye\r\n").await;
                return Ended::Quit;
            } else {
                "502 what\r\n".to_string()
            };
            if !say(r, &reply).await {
                return Ended::Closed;
            }
        }
    }

    /// The session a relay recorded, once it has (a failed send returns before the
    /// relay notices the client left).
    async fn recorded_mail(seen: &Seen<Mail>) -> Mail {
        for _ in 0..200 {
            if let Some(mail) = seen.lock().unwrap().pop() {
                return mail;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the relay recorded no session");
    }

    // ---- a throwaway certificate (openssl) ----

    /// A self-signed certificate for localhost and 127.0.0.1, made once per test
    /// process with the `openssl` command; the paths of its PEM files.
    fn test_cert() -> &'static (String, String) {
        static CERT: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
        CERT.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("chime-sink-tls-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let (key, cert) = (dir.join("k.pem"), dir.join("c.pem"));
            let output = std::process::Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=localhost",
                ])
                .args([
                    "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-days",
                    "1",
                ])
                // Else OpenSSL 3 marks it a CA, which webpki refuses as a server's.
                .args(["-addext", "basicConstraints=critical,CA:FALSE"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "the email TLS tests need the `openssl` command line to make a \
                         throwaway certificate, and it cannot be run: {e}"
                    )
                });
            assert!(
                output.status.success(),
                "`openssl req` failed making the test certificate: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            (
                cert.to_string_lossy().into_owned(),
                key.to_string_lossy().into_owned(),
            )
        })
    }

    /// The server side of TLS with the throwaway certificate.
    fn acceptor() -> TlsAcceptor {
        let (cert, key) = test_cert();
        let chain = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<std::result::Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }

    // ---- helpers ----

    fn notice() -> Notice {
        Notice {
            id: "failures/coupon-sync/firing/1733300000000".into(),
            rule: "failures".into(),
            status: NoticeStatus::Firing,
            condition: "run_failed".into(),
            subject: "coupon-sync".into(),
            summary: "job coupon-sync: run r-123 failed after 3 attempts".into(),
            details: "exit code 2\nstderr: boom".into(),
            at_ms: 1_733_300_000_000,
            cluster: "prod-eu".into(),
        }
    }

    fn sender() -> Sender {
        Sender::new(Duration::from_secs(5)).unwrap()
    }

    fn now_s() -> i64 {
        unix_ms() / 1000
    }

    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
        target
            .split_once('?')?
            .1
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    }

    fn sign(key: &[u8], data: &[u8]) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        ring::hmac::sign(&key, data).as_ref().to_vec()
    }

    // ---- encoders against published vectors ----

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn hmac_and_hex_match_rfc4231_case_2() {
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn percent_encoding_keeps_only_unreserved() {
        assert_eq!(
            percent_encode("aZ09-._~+/= é"),
            "aZ09-._~%2B%2F%3D%20%C3%A9"
        );
    }

    // ---- wire formats ----

    #[tokio::test]
    async fn webhook_posts_the_notice_signed_over_timestamp_and_body() {
        let (base, seen) = http_receiver(Answer::Reply(204, "")).await;
        let sink = Sink::Webhook {
            url: format!("{base}/hooks/chime?x=1"),
            secret: "s3cret".into(),
        };
        sender().send(&sink, &notice()).await.unwrap();

        let req = seen.lock().unwrap().pop().unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.target, "/hooks/chime?x=1");
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(req.header("x-chime-event"), Some("firing"));
        assert_eq!(
            req.header("x-chime-notice-id"),
            Some("failures/coupon-sync/firing/1733300000000")
        );
        let body: Notice = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body, notice());
        assert_eq!(req.json()["status"], "firing");

        let ts = req.header("x-chime-timestamp").unwrap();
        assert!((ts.parse::<i64>().unwrap() - now_s()).abs() <= 5);
        let mut signed = format!("{ts}.").into_bytes();
        signed.extend_from_slice(&req.body);
        let expected = sign(b"s3cret", &signed)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        assert_eq!(
            req.header("x-chime-signature"),
            Some(format!("sha256={expected}").as_str())
        );
    }

    #[tokio::test]
    async fn webhook_without_secret_is_unsigned() {
        let (base, seen) = http_receiver(Answer::Reply(200, "thanks")).await;
        let sink = Sink::Webhook {
            url: base,
            secret: String::new(),
        };
        let mut resolved = notice();
        resolved.status = NoticeStatus::Resolved;
        sender().send(&sink, &resolved).await.unwrap();
        let req = seen.lock().unwrap().pop().unwrap();
        assert_eq!(req.header("x-chime-event"), Some("resolved"));
        assert!(req.header("x-chime-signature").is_none());
        assert!(req.header("x-chime-timestamp").is_some());
    }

    #[tokio::test]
    async fn slack_posts_text_and_blocks() {
        let (base, seen) = http_receiver(Answer::Reply(200, "ok")).await;
        let sink = Sink::Slack {
            url: format!("{base}/services/T0/B0/xyz"),
        };
        let mut n = notice();
        n.details = "a < b && c > d".into();
        sender().send(&sink, &n).await.unwrap();

        let req = seen.lock().unwrap().pop().unwrap();
        assert_eq!(req.target, "/services/T0/B0/xyz");
        assert_eq!(req.header("content-type"), Some("application/json"));
        let body = req.json();
        assert_eq!(
            body["text"],
            "[FIRING] failures: job coupon-sync: run r-123 failed after 3 attempts"
        );
        let blocks = body["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        assert_eq!(blocks[0]["text"]["type"], "plain_text");
        assert_eq!(blocks[0]["text"]["text"], "[FIRING] failures");
        assert_eq!(blocks[1]["type"], "section");
        let section = blocks[1]["text"]["text"].as_str().unwrap();
        assert!(section.contains("run r-123 failed"), "{section}");
        assert!(
            section.contains("a &lt; b &amp;&amp; c &gt; d"),
            "{section}"
        );
        assert_eq!(blocks[2]["type"], "context");
        let context = blocks[2]["elements"][0]["text"].as_str().unwrap();
        assert!(context.contains("cluster: prod-eu"), "{context}");
        assert!(context.contains("2024-12-04T08:13:20Z"), "{context}");
    }

    #[tokio::test]
    async fn dingtalk_signs_the_url_and_posts_markdown() {
        let (base, seen) =
            http_receiver(Answer::Reply(200, r#"{"errcode":0,"errmsg":"ok"}"#)).await;
        let secret = "SECabc123+/=";
        let sink = Sink::Dingtalk {
            url: format!("{base}/robot/send?access_token=tok"),
            secret: secret.into(),
        };
        sender().send(&sink, &notice()).await.unwrap();

        let req = seen.lock().unwrap().pop().unwrap();
        assert!(
            req.target
                .starts_with("/robot/send?access_token=tok&timestamp=")
        );
        let ts = query_param(&req.target, "timestamp").unwrap();
        assert!((ts.parse::<i64>().unwrap() / 1000 - now_s()).abs() <= 5);
        let sent_sign = query_param(&req.target, "sign").unwrap();
        assert!(!sent_sign.contains(['+', '/', '=']), "{sent_sign}");
        let expected = base64(&sign(
            secret.as_bytes(),
            format!("{ts}\n{secret}").as_bytes(),
        ));
        assert_eq!(percent_decode(sent_sign), expected);

        let body = req.json();
        assert_eq!(body["msgtype"], "markdown");
        let title = body["markdown"]["title"].as_str().unwrap();
        assert!(title.starts_with("[FIRING] failures"), "{title}");
        let text = body["markdown"]["text"].as_str().unwrap();
        assert!(text.contains("run r-123 failed"), "{text}");
        assert!(text.contains("stderr: boom"), "{text}");
    }

    #[tokio::test]
    async fn dingtalk_url_without_query_gets_one() {
        let (base, seen) =
            http_receiver(Answer::Reply(200, r#"{"errcode":0,"errmsg":"ok"}"#)).await;
        let sink = Sink::Dingtalk {
            url: format!("{base}/robot"),
            secret: "SEC1".into(),
        };
        sender().send(&sink, &notice()).await.unwrap();
        let req = seen.lock().unwrap().pop().unwrap();
        assert!(
            req.target.starts_with("/robot?timestamp="),
            "{}",
            req.target
        );
        assert!(query_param(&req.target, "sign").is_some());
    }

    #[tokio::test]
    async fn feishu_posts_text_with_timestamp_and_sign() {
        let (base, seen) = http_receiver(Answer::Reply(
            200,
            r#"{"code":0,"data":{},"msg":"success"}"#,
        ))
        .await;
        let sink = Sink::Feishu {
            url: format!("{base}/open-apis/bot/v2/hook/abc"),
            secret: "fs-secret".into(),
        };
        sender().send(&sink, &notice()).await.unwrap();

        let req = seen.lock().unwrap().pop().unwrap();
        assert_eq!(req.target, "/open-apis/bot/v2/hook/abc");
        let body = req.json();
        assert_eq!(body["msg_type"], "text");
        let text = body["content"]["text"].as_str().unwrap();
        assert!(
            text.starts_with("[FIRING] failures: job coupon-sync"),
            "{text}"
        );
        let ts = body["timestamp"].as_str().unwrap();
        assert!((ts.parse::<i64>().unwrap() - now_s()).abs() <= 5);
        let expected = base64(&sign(format!("{ts}\nfs-secret").as_bytes(), b""));
        assert_eq!(body["sign"], expected.as_str());
    }

    #[tokio::test]
    async fn feishu_without_secret_and_old_status_code_answer() {
        let (base, seen) = http_receiver(Answer::Reply(
            200,
            r#"{"Extra":null,"StatusCode":0,"StatusMessage":"success"}"#,
        ))
        .await;
        let sink = Sink::Feishu {
            url: base,
            secret: String::new(),
        };
        sender().send(&sink, &notice()).await.unwrap();
        let body = seen.lock().unwrap().pop().unwrap().json();
        assert!(body.get("timestamp").is_none() && body.get("sign").is_none());
    }

    // ---- error classification ----

    async fn http_error(kind: &str, answer: Answer) -> SinkError {
        let (base, _) = http_receiver(answer).await;
        let sink = match kind {
            "webhook" => Sink::Webhook {
                url: base,
                secret: String::new(),
            },
            "slack" => Sink::Slack { url: base },
            "dingtalk" => Sink::Dingtalk {
                url: base,
                secret: String::new(),
            },
            _ => Sink::Feishu {
                url: base,
                secret: String::new(),
            },
        };
        sender().send(&sink, &notice()).await.unwrap_err()
    }

    #[tokio::test]
    async fn http_status_decides_retry() {
        let e = http_error("webhook", Answer::Reply(500, "db down")).await;
        assert!(matches!(&e, SinkError::Http { status: 500, body } if body == "db down"));
        assert!(e.retryable());
        let e = http_error("webhook", Answer::Reply(429, "slow down")).await;
        assert!(e.retryable(), "{e}");
        let e = http_error("webhook", Answer::Reply(400, "bad")).await;
        assert!(matches!(e, SinkError::Http { status: 400, .. }));
        assert!(!e.retryable());
        // Redirects are reported, not followed.
        let e = http_error("webhook", Answer::Reply(302, "")).await;
        assert!(matches!(e, SinkError::Http { status: 302, .. }));
        assert!(!e.retryable());
    }

    #[tokio::test]
    async fn slack_errors() {
        let e = http_error("slack", Answer::Reply(403, "invalid_token")).await;
        assert!(e.to_string().contains("invalid_token"), "{e}");
        assert!(!e.retryable());
        let e = http_error("slack", Answer::Reply(404, "no_team")).await;
        assert!(!e.retryable());
        let e = http_error("slack", Answer::Reply(200, "invalid_payload")).await;
        assert!(matches!(&e, SinkError::Rejected(m) if m.contains("invalid_payload")));
        assert!(!e.retryable());
        let e = http_error("slack", Answer::Reply(503, "")).await;
        assert!(e.retryable());
    }

    #[tokio::test]
    async fn dingtalk_errcodes() {
        let e = http_error(
            "dingtalk",
            Answer::Reply(
                200,
                r#"{"errcode":310000,"errmsg":"keywords not in content"}"#,
            ),
        )
        .await;
        assert!(
            matches!(&e, SinkError::Rejected(m) if m.contains("310000") && m.contains("keywords"))
        );
        assert!(!e.retryable());
        let e = http_error(
            "dingtalk",
            Answer::Reply(200, r#"{"errcode":130101,"errmsg":"send too fast"}"#),
        )
        .await;
        assert!(matches!(e, SinkError::Throttled(_)));
        assert!(e.retryable());
        let e = http_error("dingtalk", Answer::Reply(200, "<html>portal</html>")).await;
        assert!(matches!(e, SinkError::Rejected(_)));
    }

    #[tokio::test]
    async fn feishu_codes() {
        let e = http_error(
            "feishu",
            Answer::Reply(200, r#"{"code":19021,"data":{},"msg":"sign match fail or timestamp is not within one hour from current time"}"#),
        )
        .await;
        assert!(matches!(&e, SinkError::Rejected(m) if m.contains("19021")));
        assert!(!e.retryable());
        let e = http_error(
            "feishu",
            Answer::Reply(200, r#"{"code":11232,"msg":"frequency limited"}"#),
        )
        .await;
        assert!(e.retryable(), "{e}");
        let e = http_error(
            "feishu",
            Answer::Reply(400, r#"{"code":9499,"msg":"Bad Request"}"#),
        )
        .await;
        assert!(matches!(e, SinkError::Throttled(_)));
        let e = http_error("feishu", Answer::Reply(502, "bad gateway")).await;
        assert!(matches!(e, SinkError::Http { status: 502, .. }));
        assert!(e.retryable());
    }

    #[tokio::test]
    async fn connection_refused_is_retryable_and_hides_the_url() {
        let port = closed_port().await;
        let sink = Sink::Slack {
            url: format!("http://127.0.0.1:{port}/services/SECRET-PATH"),
        };
        let e = sender().send(&sink, &notice()).await.unwrap_err();
        assert!(matches!(e, SinkError::Connect(_)), "{e:?}");
        assert!(e.retryable());
        assert!(!e.to_string().contains("SECRET-PATH"), "{e}");

        let sink = plain_email(
            &format!("127.0.0.1:{port}"),
            "chime@example.com",
            &["ops@example.com"],
        );
        let e = sender().send(&sink, &notice()).await.unwrap_err();
        assert!(matches!(e, SinkError::Connect(_)), "{e:?}");
        assert!(e.retryable());
    }

    #[tokio::test]
    async fn silent_receivers_time_out_within_the_timeout() {
        let timeout = Duration::from_millis(300);
        let sender = Sender::new(timeout).unwrap();
        let (base, _) = http_receiver(Answer::Silent).await;
        let sink = Sink::Webhook {
            url: base,
            secret: String::new(),
        };
        let started = Instant::now();
        let e = sender.send(&sink, &notice()).await.unwrap_err();
        assert!(
            matches!(
                e,
                SinkError::Timeout {
                    during: "HTTP request",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.retryable());
        assert!(started.elapsed() < Duration::from_secs(2));

        let (addr, _) = smtp_receiver(false, "250 ok\r\n").await;
        let sink = plain_email(&addr, "chime@example.com", &["ops@example.com"]);
        let started = Instant::now();
        let e = sender.send(&sink, &notice()).await.unwrap_err();
        assert!(
            matches!(
                e,
                SinkError::Timeout {
                    during: "SMTP greeting",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn retryable_table() {
        let smtp = |code| SinkError::Smtp {
            step: "SMTP RCPT TO",
            code,
            line: String::new(),
        };
        assert!(smtp(451).retryable());
        assert!(!smtp(550).retryable());
        assert!(!SinkError::Invalid(String::new()).retryable());
        assert!(SinkError::Io(String::new()).retryable());
        let http = |status| SinkError::Http {
            status,
            body: String::new(),
        };
        assert!(http(408).retryable() && http(503).retryable());
        assert!(!http(404).retryable() && !http(401).retryable());
    }

    // ---- email ----

    /// An email sink as rules had it before TLS and AUTH: no tls, no credentials.
    fn plain_email(smtp: &str, from: &str, to: &[&str]) -> Sink {
        Sink::Email {
            smtp: smtp.into(),
            from: from.into(),
            to: to.iter().map(|s| s.to_string()).collect(),
            tls: EmailTls::Auto,
            username: String::new(),
            password: String::new(),
            ca_file: String::new(),
        }
    }

    fn email_sink(smtp: String) -> Sink {
        plain_email(
            &smtp,
            "chime@example.com",
            &["ops@example.com", "dev@example.org"],
        )
    }

    /// The header lines of a DATA section (up to the blank line).
    fn headers_of(data: &str) -> Vec<&str> {
        data.split("\r\n").take_while(|l| !l.is_empty()).collect()
    }

    #[tokio::test]
    async fn email_speaks_smtp_with_headers_and_crlf() {
        let (addr, seen) = smtp_receiver(true, "250 2.1.5 ok\r\n").await;
        sender().send(&email_sink(addr), &notice()).await.unwrap();
        let mail = seen.lock().unwrap().pop().unwrap();

        assert!(mail.commands[0].starts_with("EHLO "), "{:?}", mail.commands);
        assert_eq!(
            mail.commands[1],
            "MAIL FROM:<chime@example.com> BODY=8BITMIME"
        );
        assert_eq!(mail.rcpt, ["<ops@example.com>", "<dev@example.org>"]);
        assert_eq!(mail.commands.last().unwrap(), "QUIT");

        assert!(!mail.data.replace("\r\n", "").contains('\n'), "bare LF");
        let headers = headers_of(&mail.data);
        let has = |prefix: &str| headers.iter().any(|h| h.starts_with(prefix));
        for name in [
            "Date: ",
            "From: chime@example.com",
            "To: ops@example.com,",
            "Message-ID: <chime.failures.coupon-sync.firing.1733300000000@example.com>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
            "X-Chime-Event: firing",
        ] {
            assert!(has(name), "{name} missing in {headers:?}");
        }
        assert!(headers.contains(&" dev@example.org"), "{headers:?}");
        assert!(headers.contains(
            &"Subject: [chime] [FIRING] failures: job coupon-sync: run r-123 failed after 3 attempts"
        ));
        let date = headers
            .iter()
            .find_map(|h| h.strip_prefix("Date: "))
            .unwrap();
        chrono::DateTime::parse_from_rfc2822(date).unwrap();
        assert!(
            mail.data
                .contains("\r\n\r\n[FIRING] failures: job coupon-sync")
        );
        assert!(mail.data.contains("\r\nstderr: boom\r\n"));
    }

    #[tokio::test]
    async fn email_headers_cannot_be_injected_and_dots_are_stuffed() {
        let (addr, seen) = smtp_receiver(true, "250 ok\r\n").await;
        let mut n = notice();
        n.summary = "x\r\nBcc: x@evil.example".into();
        n.details = "before\n.\n.hidden\nafter".into();
        sender().send(&email_sink(addr), &n).await.unwrap();
        let mail = seen.lock().unwrap().pop().unwrap();

        let headers = headers_of(&mail.data);
        assert!(!headers.iter().any(|h| h.starts_with("Bcc")), "{headers:?}");
        let subject = headers.iter().find(|h| h.starts_with("Subject:")).unwrap();
        assert_eq!(
            *subject,
            "Subject: [chime] [FIRING] failures: x  Bcc: x@evil.example"
        );
        assert_eq!(mail.rcpt.len(), 2);
        assert!(
            mail.data
                .contains("\r\nbefore\r\n..\r\n..hidden\r\nafter\r\n"),
            "{}",
            mail.data
        );
    }

    #[test]
    fn non_ascii_subjects_are_encoded_words() {
        let subject = header_text("[chime] [FIRING] 任务失败: 优惠券同步任务在三次尝试后失败了");
        assert!(subject.is_ascii());
        for word in subject.split("\n ") {
            assert!(
                word.starts_with("=?UTF-8?B?") && word.ends_with("?="),
                "{word}"
            );
            assert!(word.len() <= 75, "{word}");
        }
        assert!(subject.split("\n ").count() > 1);
    }

    #[test]
    fn long_lines_are_split_below_the_smtp_limit() {
        let data = smtp_data(&"é".repeat(1000));
        assert!(data.split("\r\n").all(|l| l.len() <= MAX_MAIL_LINE));
        assert!(data.ends_with("\r\n.\r\n"));
    }

    #[tokio::test]
    async fn smtp_rcpt_refusals() {
        let (addr, _) = smtp_receiver(true, "451 4.7.1 greylisted, try later\r\n").await;
        let e = sender()
            .send(&email_sink(addr), &notice())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SinkError::Smtp { step: "SMTP RCPT TO", code: 451, line } if line.contains("greylisted")),
            "{e:?}"
        );
        assert!(e.retryable());

        let (addr, _) = smtp_receiver(true, "550-5.1.1 no such user\r\n550 5.1.1 really\r\n").await;
        let e = sender()
            .send(&email_sink(addr), &notice())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SinkError::Smtp { code: 550, line, .. } if line == "550 5.1.1 really"),
            "{e:?}"
        );
        assert!(!e.retryable());
    }

    // ---- email over TLS, with AUTH ----

    fn tls_email(smtp: &str, tls: EmailTls, username: &str, password: &str, ca_file: &str) -> Sink {
        Sink::Email {
            smtp: smtp.into(),
            from: "chime@example.com".into(),
            to: vec!["ops@example.com".into()],
            tls,
            username: username.into(),
            password: password.into(),
            ca_file: ca_file.into(),
        }
    }

    /// The throwaway certificate's path, as a sink's `ca_file`.
    fn ca_file() -> &'static str {
        &test_cert().0
    }

    fn unbase64(text: &str) -> Vec<u8> {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits = 0u32;
        let mut count = 0;
        let mut out = Vec::new();
        for c in text.bytes().filter(|&c| c != b'=') {
            let v = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
            bits = (bits << 6) | v;
            count += 6;
            if count >= 8 {
                count -= 8;
                out.push((bits >> count) as u8);
                bits &= (1 << count) - 1;
            }
        }
        out
    }

    #[tokio::test]
    async fn email_starttls_then_auth_plain_delivers() {
        let (addr, seen) = relay_receiver(TestRelay::starttls(), Some(acceptor())).await;
        let sink = tls_email(&addr, EmailTls::Starttls, "user", "pass", ca_file());
        sender().send(&sink, &notice()).await.unwrap();
        let mail = seen.lock().unwrap().pop().unwrap();

        let steps: Vec<&str> = mail
            .commands
            .iter()
            .map(|c| c.split_whitespace().take(2).last().unwrap_or(""))
            .collect();
        assert!(mail.commands[0].starts_with("EHLO "), "{:?}", mail.commands);
        assert_eq!(mail.commands[1], "STARTTLS");
        assert!(mail.commands[2].starts_with("EHLO "), "{:?}", mail.commands);
        assert!(mail.commands[3].starts_with("AUTH PLAIN "), "{steps:?}");
        assert!(mail.commands[4].starts_with("MAIL FROM:<chime@example.com>"));
        // In clear: only EHLO and STARTTLS, though AUTH was offered there too.
        assert_eq!(mail.secure[..2], [false, false]);
        assert!(mail.secure[2..].iter().all(|&s| s), "{:?}", mail.secure);
        let credentials = mail.commands[3].strip_prefix("AUTH PLAIN ").unwrap();
        assert_eq!(unbase64(credentials), b"\0user\0pass");
        assert_eq!(mail.rcpt, ["<ops@example.com>"]);
        assert!(mail.data.contains("run r-123 failed"), "{}", mail.data);
        assert_eq!(mail.commands.last().unwrap(), "QUIT");
    }

    #[tokio::test]
    async fn email_auth_login_when_the_relay_offers_only_login() {
        let relay = TestRelay {
            mechanisms: "LOGIN",
            ..TestRelay::starttls()
        };
        let (addr, seen) = relay_receiver(relay, Some(acceptor())).await;
        let sink = tls_email(&addr, EmailTls::Starttls, "user", "pässword", ca_file());
        sender().send(&sink, &notice()).await.unwrap();
        let mail = seen.lock().unwrap().pop().unwrap();
        let auth = mail
            .commands
            .iter()
            .position(|c| c == "AUTH LOGIN")
            .unwrap();
        assert!(mail.secure[auth]);
        assert_eq!(unbase64(&mail.commands[auth + 1]), b"user");
        assert_eq!(unbase64(&mail.commands[auth + 2]), "pässword".as_bytes());
        assert!(mail.commands[auth + 3].starts_with("MAIL FROM:"));
    }

    #[tokio::test]
    async fn email_implicit_tls_delivers() {
        let relay = TestRelay {
            implicit: true,
            ..TestRelay::starttls()
        };
        let (addr, seen) = relay_receiver(relay, Some(acceptor())).await;
        let sink = tls_email(&addr, EmailTls::Implicit, "user", "pass", ca_file());
        sender().send(&sink, &notice()).await.unwrap();
        let mail = seen.lock().unwrap().pop().unwrap();
        assert!(mail.commands[0].starts_with("EHLO "), "{:?}", mail.commands);
        assert!(
            mail.commands[1].starts_with("AUTH PLAIN "),
            "{:?}",
            mail.commands
        );
        assert!(!mail.saw("STARTTLS"));
        assert!(mail.secure.iter().all(|&s| s));
        assert!(mail.data.contains("run r-123 failed"));

        // No credentials: no AUTH, delivered all the same.
        let (addr, seen) = relay_receiver(relay, Some(acceptor())).await;
        let sink = tls_email(&addr, EmailTls::Implicit, "", "", ca_file());
        sender().send(&sink, &notice()).await.unwrap();
        let mail = seen.lock().unwrap().pop().unwrap();
        assert!(!mail.saw("AUTH"), "{:?}", mail.commands);
        assert_eq!(mail.rcpt, ["<ops@example.com>"]);
    }

    #[tokio::test]
    async fn email_relay_without_starttls_is_final() {
        let relay = TestRelay {
            starttls: false,
            ..TestRelay::starttls()
        };
        let (addr, seen) = relay_receiver(relay, Some(acceptor())).await;
        let sink = tls_email(&addr, EmailTls::Starttls, "user", "pass", ca_file());
        let e = sender().send(&sink, &notice()).await.unwrap_err();
        assert!(
            matches!(&e, SinkError::Tls(m) if m.contains("does not offer STARTTLS")),
            "{e:?}"
        );
        assert!(!e.retryable());
        let mail = recorded_mail(&seen).await;
        assert_eq!(mail.commands.len(), 1, "{:?}", mail.commands);
        assert!(!mail.saw("AUTH") && !mail.saw("MAIL"));
    }

    #[tokio::test]
    async fn email_refuses_data_pipelined_before_the_handshake() {
        // A relay (or someone in the path) that sends a reply right behind its 220
        // to STARTTLS: read after the handshake, it would pass for the relay's.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut r = BufReader::new(socket);
            r.get_mut().write_all(b"220 test\r\n").await.unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            r.get_mut()
                .write_all(b"250-test\r\n250 STARTTLS\r\n")
                .await
                .unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            r.get_mut()
                .write_all(b"220 go ahead\r\n250 2.0.0 injected\r\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let sink = tls_email(&addr, EmailTls::Starttls, "", "", ca_file());
        let e = sender().send(&sink, &notice()).await.unwrap_err();
        assert!(
            matches!(&e, SinkError::Tls(m) if m.contains("before the handshake")),
            "{e:?}"
        );
        assert!(!e.retryable());
    }

    #[tokio::test]
    async fn email_auth_refusals() {
        for (reply, code, retryable) in [
            (
                "535 5.7.8 authentication credentials invalid\r\n",
                535,
                false,
            ),
            ("454 4.7.0 temporary authentication failure\r\n", 454, true),
        ] {
            let relay = TestRelay {
                auth_reply: reply,
                ..TestRelay::starttls()
            };
            let (addr, seen) = relay_receiver(relay, Some(acceptor())).await;
            let sink = tls_email(&addr, EmailTls::Starttls, "user", "hunter2", ca_file());
            let e = sender().send(&sink, &notice()).await.unwrap_err();
            assert!(
                matches!(&e, SinkError::Smtp { step: "SMTP AUTH", code: c, .. } if *c == code),
                "{e:?}"
            );
            assert_eq!(e.retryable(), retryable, "{e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
            let mail = recorded_mail(&seen).await;
            assert!(!mail.saw("MAIL"), "{:?}", mail.commands);
        }
    }

    #[tokio::test]
    async fn email_untrusted_certificate_is_final() {
        for relay in [
            TestRelay::starttls(),
            TestRelay {
                implicit: true,
                ..TestRelay::starttls()
            },
        ] {
            let (addr, seen) = relay_receiver(relay, Some(acceptor())).await;
            let tls = if relay.implicit {
                EmailTls::Implicit
            } else {
                EmailTls::Starttls
            };
            let sink = tls_email(&addr, tls, "user", "pass", "");
            let e = sender().send(&sink, &notice()).await.unwrap_err();
            assert!(
                matches!(&e, SinkError::Tls(m) if m.contains("certificate") && m.contains("ca_file")),
                "{e:?}"
            );
            assert!(!e.retryable());
            let mail = recorded_mail(&seen).await;
            assert!(!mail.saw("AUTH"), "{:?}", mail.commands);
        }

        // A ca_file that cannot be read is named, and nothing is dialed.
        let sink = tls_email(
            "127.0.0.1:1",
            EmailTls::Implicit,
            "",
            "",
            "/nonexistent/ca.pem",
        );
        let e = sender().send(&sink, &notice()).await.unwrap_err();
        assert!(
            matches!(&e, SinkError::Invalid(m) if m.contains("ca_file /nonexistent/ca.pem")),
            "{e:?}"
        );
        assert!(!e.retryable());
    }

    #[tokio::test]
    async fn email_rules_without_the_new_fields_work_as_before() {
        let (addr, seen) = smtp_receiver(true, "250 ok\r\n").await;
        let json = format!(
            r#"{{"kind":"email","smtp":"{addr}","from":"chime@example.com","to":["ops@example.com"]}}"#
        );
        let sink: Sink = serde_json::from_str(&json).unwrap();
        assert_eq!(
            sink,
            plain_email(&addr, "chime@example.com", &["ops@example.com"])
        );
        assert_eq!(serde_json::to_string(&sink).unwrap(), json);
        sink.check("sinks[0]").unwrap();
        sender().send(&sink, &notice()).await.unwrap();
        let mail = seen.lock().unwrap().pop().unwrap();
        assert!(
            !mail.saw("STARTTLS") && !mail.saw("AUTH"),
            "{:?}",
            mail.commands
        );
        assert!(mail.commands[1].starts_with("MAIL FROM:"));
    }

    #[test]
    fn email_tls_defaults_by_port() {
        for (port, tls) in [
            (25, EmailTls::None),
            (465, EmailTls::Implicit),
            (587, EmailTls::Starttls),
            (2525, EmailTls::None),
        ] {
            assert_eq!(EmailTls::Auto.for_port(port), tls, "{port}");
        }
        for written in [EmailTls::None, EmailTls::Starttls, EmailTls::Implicit] {
            for port in [25, 465, 587] {
                assert_eq!(written.for_port(port), written);
            }
        }
    }

    #[test]
    fn check_keeps_passwords_off_clear_connections() {
        let sink = |smtp: &str, tls, username: &str, password: &str, ca: &str| {
            tls_email(smtp, tls, username, password, ca)
        };
        use EmailTls::{Auto, Implicit, None as Plain, Starttls};
        for bad in [
            sink("mail.example.com:25", Auto, "u", "p", ""),
            sink("mail.example.com:587", Plain, "u", "p", ""),
            sink("10.0.0.8:2525", Auto, "u", "p", ""),
            sink("[2001:db8::1]:25", Auto, "u", "p", ""),
            sink("mail.example.com:587", Auto, "u", "p\r\nQUIT", ""),
            sink("mail.example.com:587", Auto, "u", &"p".repeat(257), ""),
            sink("mail.example.com:587", Auto, "u", "", ""),
        ] {
            assert_eq!(invalid_field(&bad), "sinks[0].password", "{bad:?}");
        }
        let e = sink("mail.example.com:25", Auto, "u", "p", "").check("sinks[0]");
        assert!(e.unwrap_err().to_string().contains("in clear"));
        for bad in [
            sink("mail.example.com:587", Auto, "", "p", ""),
            sink("mail.example.com:587", Auto, "u\0x", "p", ""),
        ] {
            assert_eq!(invalid_field(&bad), "sinks[0].username", "{bad:?}");
        }
        for bad in [
            sink("mail.example.com:25", Auto, "", "", "/etc/ca.pem"),
            sink("mail.example.com:587", Plain, "", "", "/etc/ca.pem"),
            sink("mail.example.com:587", Auto, "", "", "/etc/ca\n.pem"),
        ] {
            assert_eq!(invalid_field(&bad), "sinks[0].ca_file", "{bad:?}");
        }
        for good in [
            sink("127.0.0.1:25", Auto, "u", "p", ""),
            sink("127.0.0.2:2525", Plain, "u", "p", ""),
            sink("[::1]:25", Auto, "u", "p", ""),
            sink("localhost:25", Plain, "u", "p", ""),
            sink("smtp.example.com:587", Auto, "AKIA", "secret", ""),
            sink("smtp.example.com:465", Auto, "u", "p", "/etc/ca.pem"),
            sink("relay.internal:2525", Starttls, "u", "p", "/etc/ca.pem"),
            sink("relay.internal:2525", Implicit, "", "", ""),
        ] {
            good.check("sinks[0]").unwrap();
        }
    }

    #[test]
    fn redacted_hides_the_email_password() {
        let sink = tls_email("smtp.example.com:587", EmailTls::Auto, "AKIA", "s3cret", "");
        let shown = sink.redacted();
        assert_eq!(
            shown,
            tls_email("smtp.example.com:587", EmailTls::Auto, "AKIA", "***", "")
        );
        assert!(!serde_json::to_string(&shown).unwrap().contains("s3cret"));
    }

    #[test]
    fn email_serde_keeps_what_was_written() {
        for json in [
            r#"{"kind":"email","smtp":"smtp.example.com:587","from":"a@b","to":["c@d"],"username":"u","password":"p"}"#,
            r#"{"kind":"email","smtp":"smtp.example.com:465","from":"a@b","to":["c@d"],"tls":"none"}"#,
            r#"{"kind":"email","smtp":"r.internal:2525","from":"a@b","to":["c@d"],"tls":"starttls","ca_file":"/etc/ca.pem"}"#,
            r#"{"kind":"email","smtp":"r.internal:2465","from":"a@b","to":["c@d"],"tls":"implicit"}"#,
        ] {
            let sink: Sink = serde_json::from_str(json).unwrap();
            assert_eq!(serde_json::to_string(&sink).unwrap(), json);
        }
        let sink: Sink = serde_json::from_str(
            r#"{"kind":"email","smtp":"m:587","from":"a@b","to":["c@d"],"tls":"auto"}"#,
        )
        .unwrap();
        assert!(matches!(
            sink,
            Sink::Email {
                tls: EmailTls::Auto,
                ..
            }
        ));
        for json in [
            r#"{"kind":"email","smtp":"m:25","from":"a@b","to":["c@d"],"tls":"ssl"}"#,
            r#"{"kind":"email","smtp":"m:25","from":"a@b","to":["c@d"],"user":"u"}"#,
        ] {
            assert!(serde_json::from_str::<Sink>(json).is_err(), "{json}");
        }
    }

    // ---- check ----

    fn invalid_field(sink: &Sink) -> String {
        match sink.check("sinks[0]") {
            Err(CoordError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument for {sink:?}, got {other:?}"),
        }
    }

    #[test]
    fn check_accepts_the_documented_examples() {
        for json in [
            r#"{"kind":"webhook","url":"https://example.com/hook","secret":"s"}"#,
            r#"{"kind":"slack","url":"https://hooks.slack.com/services/T/B/X"}"#,
            r#"{"kind":"dingtalk","url":"https://oapi.dingtalk.com/robot/send?access_token=abc","secret":"SECx"}"#,
            r#"{"kind":"feishu","url":"https://open.feishu.cn/open-apis/bot/v2/hook/abc"}"#,
            r#"{"kind":"email","smtp":"mail.example.com:25","from":"chime@example.com","to":["ops@example.com"]}"#,
            r#"{"kind":"email","smtp":"[::1]:587","from":"a@b","to":["c@d.e"]}"#,
            r#"{"kind":"email","smtp":"email-smtp.eu-west-1.amazonaws.com:587","from":"chime@example.com","to":["oncall@example.com"],"username":"AKIAXXXX","password":"xxxx"}"#,
        ] {
            let sink: Sink = serde_json::from_str(json).unwrap();
            sink.check("sinks[0]").unwrap();
        }
    }

    #[test]
    fn check_names_each_bad_field() {
        let hook = |url: &str| Sink::Webhook {
            url: url.into(),
            secret: String::new(),
        };
        for url in [
            "ftp://x",
            "not a url",
            "https://user:pw@example.com/",
            "https://example.com/\r\nx",
            "file:///etc/passwd",
            &format!("https://example.com/{}", "a".repeat(2048)),
        ] {
            assert_eq!(invalid_field(&hook(url)), "sinks[0].url", "{url}");
        }
        assert_eq!(
            invalid_field(&Sink::Slack {
                url: "ftp://x".into()
            }),
            "sinks[0].url"
        );
        assert_eq!(
            invalid_field(&Sink::Dingtalk {
                url: "https://oapi.dingtalk.com/robot/send".into(),
                secret: "a\nb".into(),
            }),
            "sinks[0].secret"
        );
        assert_eq!(
            invalid_field(&Sink::Feishu {
                url: "https://open.feishu.cn/x".into(),
                secret: "s".repeat(257),
            }),
            "sinks[0].secret"
        );

        let email = plain_email;
        for smtp in [
            "host",
            "host:",
            "host:0",
            "host:70000",
            ":25",
            "ho st:25",
            "::1:25",
        ] {
            assert_eq!(
                invalid_field(&email(smtp, "a@b", &["c@d"])),
                "sinks[0].smtp",
                "{smtp}"
            );
        }
        for from in [
            "",
            "nobody",
            "a@",
            "@b",
            "a@b@c",
            "<a@b>",
            "a@b\r\nRCPT TO:<x@y>",
            "a,b@c",
        ] {
            assert_eq!(
                invalid_field(&email("h:25", from, &["c@d"])),
                "sinks[0].from",
                "{from}"
            );
        }
        assert_eq!(
            invalid_field(&email("h:25", "a@b", &["ok@c", "a b@c"])),
            "sinks[0].to[1]"
        );
        assert_eq!(invalid_field(&email("h:25", "a@b", &[])), "sinks[0].to");
        let many: Vec<String> = (0..21).map(|i| format!("u{i}@d")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(invalid_field(&email("h:25", "a@b", &many)), "sinks[0].to");
    }

    #[tokio::test]
    async fn send_refuses_an_unchecked_sink() {
        let sink = plain_email("127.0.0.1:25", "a@b\r\nRCPT TO:<victim@x>", &["c@d"]);
        let e = sender().send(&sink, &notice()).await.unwrap_err();
        assert!(matches!(e, SinkError::Invalid(_)), "{e:?}");
        assert!(!e.retryable());
    }

    #[test]
    fn zero_timeout_is_refused() {
        assert!(matches!(
            Sender::new(Duration::ZERO),
            Err(CoordError::InvalidArgument { .. })
        ));
    }

    // ---- serde ----

    #[test]
    fn serde_round_trips_and_omits_empty_secrets() {
        let sinks = [
            Sink::Webhook {
                url: "https://e.com/h".into(),
                secret: "k".into(),
            },
            Sink::Webhook {
                url: "https://e.com/h".into(),
                secret: String::new(),
            },
            Sink::Slack {
                url: "https://hooks.slack.com/services/x".into(),
            },
            Sink::Dingtalk {
                url: "https://oapi.dingtalk.com/robot/send?access_token=t".into(),
                secret: "SEC".into(),
            },
            Sink::Feishu {
                url: "https://open.larksuite.com/open-apis/bot/v2/hook/x".into(),
                secret: String::new(),
            },
            plain_email("m:25", "a@b", &["c@d"]),
            Sink::Email {
                smtp: "smtp.example.com:587".into(),
                from: "a@b".into(),
                to: vec!["c@d".into()],
                tls: EmailTls::Auto,
                username: "AKIA".into(),
                password: "pw".into(),
                ca_file: String::new(),
            },
            Sink::Email {
                smtp: "relay.internal:2525".into(),
                from: "a@b".into(),
                to: vec!["c@d".into()],
                tls: EmailTls::Starttls,
                username: String::new(),
                password: String::new(),
                ca_file: "/etc/chime/relay-ca.pem".into(),
            },
            Sink::Email {
                smtp: "smtp.example.com:465".into(),
                from: "a@b".into(),
                to: vec!["c@d".into()],
                tls: EmailTls::None,
                username: String::new(),
                password: String::new(),
                ca_file: String::new(),
            },
        ];
        for sink in sinks {
            let json = serde_json::to_string(&sink).unwrap();
            assert!(
                json.starts_with(&format!(r#"{{"kind":"{}""#, sink.kind())),
                "{json}"
            );
            assert_eq!(serde_json::from_str::<Sink>(&json).unwrap(), sink);
        }
        assert_eq!(
            serde_json::to_string(&Sink::Webhook {
                url: "https://e.com/h".into(),
                secret: String::new()
            })
            .unwrap(),
            r#"{"kind":"webhook","url":"https://e.com/h"}"#
        );
        let n = notice();
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(json["status"], "firing");
        assert_eq!(serde_json::from_value::<Notice>(json).unwrap(), n);
    }

    #[test]
    fn serde_refuses_unknown_fields_and_kinds() {
        for json in [
            r#"{"kind":"slack","url":"https://hooks.slack.com/x","secret":"s"}"#,
            r#"{"kind":"webhook","url":"https://e.com","headers":{}}"#,
            r#"{"kind":"teams","url":"https://e.com"}"#,
            r#"{"url":"https://e.com"}"#,
            r#"{"kind":"email","smtp":"m:25","from":"a@b"}"#,
        ] {
            assert!(serde_json::from_str::<Sink>(json).is_err(), "{json}");
        }
    }

    // ---- redacted ----

    #[test]
    fn redacted_hides_secrets_and_credential_urls() {
        assert_eq!(
            Sink::Webhook {
                url: "https://e.com:8443/hook/path?token=abc#frag".into(),
                secret: "k".into(),
            }
            .redacted(),
            Sink::Webhook {
                url: "https://e.com:8443/hook/path?***".into(),
                secret: "***".into(),
            }
        );
        assert_eq!(
            Sink::Webhook {
                url: "https://e.com/hook".into(),
                secret: String::new(),
            }
            .redacted(),
            Sink::Webhook {
                url: "https://e.com/hook".into(),
                secret: String::new(),
            }
        );
        assert_eq!(
            Sink::Slack {
                url: "https://hooks.slack.com/services/T0/B0/xyz".into(),
            }
            .redacted(),
            Sink::Slack {
                url: "https://hooks.slack.com/***".into(),
            }
        );
        assert_eq!(
            Sink::Dingtalk {
                url: "https://oapi.dingtalk.com/robot/send?access_token=tok".into(),
                secret: "SECx".into(),
            }
            .redacted(),
            Sink::Dingtalk {
                url: "https://oapi.dingtalk.com/***".into(),
                secret: "***".into(),
            }
        );
        assert_eq!(
            Sink::Feishu {
                url: "https://open.feishu.cn/open-apis/bot/v2/hook/abc".into(),
                secret: String::new(),
            }
            .redacted(),
            Sink::Feishu {
                url: "https://open.feishu.cn/***".into(),
                secret: String::new(),
            }
        );
        assert_eq!(
            Sink::Slack {
                url: "garbage".into()
            }
            .redacted(),
            Sink::Slack { url: "***".into() }
        );
        let email = email_sink("m:25".into());
        assert_eq!(email.redacted(), email);
    }
}
