//! Alert sinks: where a rule's notices go (a generic webhook, Slack, DingTalk,
//! Feishu/Lark, email), how a sink is checked and shown without its secrets, and how
//! one notice is formatted for one sink and delivered to it, once.
//!
//! Retrying, counting and deduplicating belong to the caller: this module answers
//! only "did this attempt land, and is another attempt worth it"
//! ([`SinkError::retryable`]). Every notice carries an `id` so a receiver can drop
//! the duplicates that retries after an ambiguous failure produce.
//!
//! Email is a minimal SMTP client, meant for an internal relay on port 25 or 587
//! that accepts mail without authentication: no STARTTLS and no AUTH in this version
//! (both are a follow-up).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

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
///   (plain SMTP to a relay that needs no authentication: no STARTTLS or AUTH yet)
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
        /// `host:port` of the relay (`[::1]:25` for an IPv6 literal).
        smtp: String,
        /// Envelope and header sender, `local@domain`.
        from: String,
        /// Recipients, 1 to 20.
        to: Vec<String>,
    },
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
            Sink::Email { smtp, from, to } => {
                check_smtp(&sub(field, "smtp"), smtp)?;
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
            Sink::Email { .. } => self.clone(),
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
        /// `SMTP greeting`, `SMTP EHLO`, `SMTP MAIL FROM`, `SMTP RCPT TO`, `SMTP DATA`,
        /// `SMTP message`.
        step: &'static str,
        /// The reply code.
        code: u16,
        /// The reply's last line, code included.
        line: String,
    },
}

impl SinkError {
    /// Whether another attempt may succeed: 5xx, 408, 429, service throttling,
    /// timeouts, connection and I/O errors, SMTP 4xx. Other 4xx, explicit
    /// rejections, SMTP 5xx and unusable sinks are final.
    pub fn retryable(&self) -> bool {
        match self {
            SinkError::Invalid(_) | SinkError::Rejected(_) => false,
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
            Sink::Email { smtp, from, to } => self.email(smtp, from, to, notice).await,
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
        smtp: &str,
        from: &str,
        to: &[String],
        notice: &Notice,
    ) -> Result<(), SinkError> {
        let stream = tokio::time::timeout(self.timeout, TcpStream::connect(smtp))
            .await
            .map_err(|_| SinkError::Timeout {
                during: "SMTP connect",
                after: self.timeout,
            })?
            .map_err(|e| SinkError::Connect(format!("{smtp}: {e}")))?;
        let mut session = Smtp {
            stream: BufReader::new(stream),
            timeout: self.timeout,
        };
        session.expect(None, "SMTP greeting", &[220]).await?;
        let ehlo = format!("EHLO {}", self.helo);
        let extensions = match session.expect(Some(&ehlo), "SMTP EHLO", &[250]).await {
            Ok(reply) => reply.lines,
            // A server from before ESMTP: say HELO, use no extension.
            Err(SinkError::Smtp {
                code: 500 | 502, ..
            }) => {
                let helo = format!("HELO {}", self.helo);
                session.expect(Some(&helo), "SMTP HELO", &[250]).await?;
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let eight_bit = extensions
            .iter()
            .any(|l| l.split_whitespace().next() == Some("8BITMIME"));
        let mail = if eight_bit {
            format!("MAIL FROM:<{from}> BODY=8BITMIME")
        } else {
            format!("MAIL FROM:<{from}>")
        };
        session
            .expect(Some(&mail), "SMTP MAIL FROM", &[250])
            .await?;
        // One refused recipient fails the attempt: a retry then reaches all of them
        // again, and the Message-ID (the notice id) lets clients fold duplicates.
        for rcpt in to {
            let line = format!("RCPT TO:<{rcpt}>");
            session
                .expect(Some(&line), "SMTP RCPT TO", &[250, 251])
                .await?;
        }
        session.expect(Some("DATA"), "SMTP DATA", &[354]).await?;
        let data = smtp_data(&email_message(
            from,
            to,
            notice,
            &chrono::Utc::now().to_rfc2822(),
        ));
        session.send_raw(&data, "SMTP message").await?;
        session.expect(None, "SMTP message", &[250]).await?;
        // Accepted: whatever QUIT meets no longer matters, and failing now would
        // only make the caller send a duplicate.
        let _ = session.expect(Some("QUIT"), "SMTP QUIT", &[221]).await;
        Ok(())
    }
}

/// One SMTP conversation.
struct Smtp {
    stream: BufReader<TcpStream>,
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

impl Smtp {
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

fn check_smtp(field: &str, smtp: &str) -> Result<()> {
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
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad("the port is not a number from 1 to 65535")),
    }
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

    // ---- a tiny SMTP receiver ----

    #[derive(Debug, Default, Clone)]
    struct Mail {
        commands: Vec<String>,
        rcpt: Vec<String>,
        /// The DATA section as sent (dot-stuffed, CRLF), without the final ".".
        data: String,
    }

    /// An SMTP server answering `rcpt_reply` to RCPT TO (`greet`: false says nothing).
    async fn smtp_receiver(greet: bool, rcpt_reply: &'static str) -> (String, Seen<Mail>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen: Seen<Mail> = Arc::default();
        let recorded = seen.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    if !greet {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let mut r = BufReader::new(socket);
                    let mut mail = Mail::default();
                    r.get_mut().write_all(b"220 test ESMTP\r\n").await.unwrap();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap() == 0 {
                            break;
                        }
                        let line = line.trim_end().to_string();
                        mail.commands.push(line.clone());
                        let reply: &str = if line.starts_with("EHLO") {
                            "250-test greets you\r\n250-8BITMIME\r\n250 SIZE 1000000\r\n"
                        } else if line.starts_with("MAIL FROM:") {
                            "250 2.1.0 ok\r\n"
                        } else if let Some(to) = line.strip_prefix("RCPT TO:") {
                            mail.rcpt.push(to.to_string());
                            rcpt_reply
                        } else if line == "DATA" {
                            r.get_mut().write_all(b"354 go ahead\r\n").await.unwrap();
                            loop {
                                let mut l = String::new();
                                r.read_line(&mut l).await.unwrap();
                                if l == ".\r\n" {
                                    break;
                                }
                                mail.data.push_str(&l);
                            }
                            "250 2.0.0 queued\r\n"
                        } else if line == "QUIT" {
                            recorded.lock().unwrap().push(mail.clone());
                            r.get_mut().write_all(b"221 bye\r\n").await.unwrap();
                            break;
                        } else {
                            "502 what\r\n"
                        };
                        r.get_mut().write_all(reply.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (addr, seen)
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

        let sink = Sink::Email {
            smtp: format!("127.0.0.1:{port}"),
            from: "chime@example.com".into(),
            to: vec!["ops@example.com".into()],
        };
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
        let sink = Sink::Email {
            smtp: addr,
            from: "chime@example.com".into(),
            to: vec!["ops@example.com".into()],
        };
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

    fn email_sink(smtp: String) -> Sink {
        Sink::Email {
            smtp,
            from: "chime@example.com".into(),
            to: vec!["ops@example.com".into(), "dev@example.org".into()],
        }
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

        let email = |smtp: &str, from: &str, to: &[&str]| Sink::Email {
            smtp: smtp.into(),
            from: from.into(),
            to: to.iter().map(|s| s.to_string()).collect(),
        };
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
        let sink = Sink::Email {
            smtp: "127.0.0.1:25".into(),
            from: "a@b\r\nRCPT TO:<victim@x>".into(),
            to: vec!["c@d".into()],
        };
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
            Sink::Email {
                smtp: "m:25".into(),
                from: "a@b".into(),
                to: vec!["c@d".into()],
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
