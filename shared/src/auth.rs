//! Bearer tokens: who may use the admin API (console, CLI), who may connect as a
//! worker, who may produce items. Separate token sets, so a leaked worker token
//! cannot change jobs.
//!
//! A token file holds one token per line (blank lines and `#` comments ignored),
//! optionally followed by a space and the token's name (`<token> ci-deployer`): the
//! name is who the audit log says made a change, never the token. An unnamed token
//! is named `token-` + the first 8 hex digits of its SHA-256, which tells tokens
//! apart without revealing them. Several lines are several valid tokens, which is how
//! tokens rotate without a restart: add the new token, roll the clients, remove the
//! old one. The file is
//! re-read when its modification time changes (checked at most once a second), so a
//! Kubernetes Secret update reaches a running process.
//!
//! Comparison is constant-time in the token's content, so response timing does not
//! leak how much of a guess was right.
//!
//! Servers check tokens with one tower layer, [`require_token`], on every edge (the
//! coordinator's gRPC and HTTP listeners, the worker's delivery service): a
//! [`Policy`] maps request paths to the [`Gate`] guarding them, and each edge
//! answers a refusal in its own language (a gRPC status, a JSON error). Clients
//! present their token with [`Bearer`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

#[cfg(feature = "server")]
use tower_http::validate_request::{ValidateRequest, ValidateRequestHeaderLayer};

use crate::error::{Error, Result};

/// Shortest token accepted from a file.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted (a header longer than this is refused unread).
pub const MAX_TOKEN_LEN: usize = 512;
/// How often a token file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// A set of accepted tokens, fixed or read from a file.
#[derive(Debug)]
pub struct Tokens {
    file: Option<PathBuf>,
    state: Mutex<State>,
}

/// One accepted token and the name the audit log gives its holder.
#[derive(Debug)]
struct Token {
    secret: Vec<u8>,
    name: String,
}

/// Longest token name.
pub const MAX_TOKEN_NAME_LEN: usize = 64;

/// The name of an unnamed token: `token-` and the first 8 hex digits of its
/// SHA-256 (stable across restarts and replicas; reveals nothing usable).
pub fn fingerprint(token: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let hex: String = d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("token-{hex}")
}

#[derive(Debug)]
struct State {
    tokens: Vec<Token>,
    modified: Option<SystemTime>,
    checked: Instant,
}

fn parse(text: &str, origin: &str) -> Result<Vec<Token>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (t, name) = match line.split_once(char::is_whitespace) {
            Some((t, name)) => (t, Some(name.trim())),
            None => (line, None),
        };
        if let Some(name) = name
            && (name.is_empty()
                || name.len() > MAX_TOKEN_NAME_LEN
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c)))
        {
            return Err(Error::invalid(
                origin,
                format!(
                    "line {}: a token's name is 1..={MAX_TOKEN_NAME_LEN} of A-Z a-z 0-9 . _ @ -",
                    n + 1
                ),
            ));
        }
        if t.len() < MIN_TOKEN_LEN || t.len() > MAX_TOKEN_LEN {
            return Err(Error::invalid(
                origin,
                format!(
                    "line {}: a token must be {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN} characters",
                    n + 1
                ),
            ));
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(
                origin,
                format!(
                    "line {}: a token has no spaces or control characters",
                    n + 1
                ),
            ));
        }
        out.push(Token {
            secret: t.as_bytes().to_vec(),
            name: name.map_or_else(|| fingerprint(t.as_bytes()), str::to_owned),
        });
    }
    if out.is_empty() {
        return Err(Error::invalid(origin, "holds no token"));
    }
    Ok(out)
}

fn read(path: &Path) -> Result<(Vec<Token>, Option<SystemTime>)> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::invalid(&origin, format!("cannot read the token file: {e}")))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((parse(&text, &origin)?, modified))
}

/// Equal in constant time over `presented`'s length (and independent of where the
/// first difference is).
fn same(expected: &[u8], presented: &[u8]) -> bool {
    let mut diff = (expected.len() != presented.len()) as u8;
    for (i, b) in presented.iter().enumerate() {
        diff |= b ^ expected.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

impl Tokens {
    /// Tokens from a file (see the module docs); an unreadable or empty file, or a
    /// short token, is an error naming the file.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let (tokens, modified) = read(&path)?;
        Ok(Self {
            file: Some(path),
            state: Mutex::new(State {
                tokens,
                modified,
                checked: Instant::now(),
            }),
        })
    }

    /// One fixed token (`chime dev`, tests). No length rule: it is the caller's.
    pub fn fixed(token: impl Into<String>) -> Self {
        let secret = token.into().into_bytes();
        Self {
            file: None,
            state: Mutex::new(State {
                tokens: vec![Token {
                    name: fingerprint(&secret),
                    secret,
                }],
                modified: None,
                checked: Instant::now(),
            }),
        }
    }

    /// Whether `presented` is one of the tokens. A file that changed is re-read
    /// first; a file that became unreadable or invalid keeps the last good tokens
    /// (an operator's typo must not lock everyone out), and says so in the log.
    pub fn verify(&self, presented: &str) -> bool {
        self.name_of(presented).is_some()
    }

    /// The name of the token `presented` is (see the module docs), `None` when it is
    /// none of them. Re-reads a changed file as [`Tokens::verify`] says.
    pub fn name_of(&self, presented: &str) -> Option<String> {
        if presented.is_empty() || presented.len() > MAX_TOKEN_LEN {
            return None;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.file
            && st.checked.elapsed() >= RECHECK
        {
            st.checked = Instant::now();
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if modified != st.modified {
                match read(path) {
                    Ok((tokens, modified)) => {
                        tracing::info!(file = %path.display(), tokens = tokens.len(), "token file reloaded");
                        st.tokens = tokens;
                        st.modified = modified;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "token file changed but is not usable; keeping the previous tokens");
                        st.modified = modified;
                    }
                }
            }
        }
        // Every token is compared, so timing does not tell which one matched.
        st.tokens
            .iter()
            .fold(None, |hit, t| match same(&t.secret, presented.as_bytes()) {
                true => Some(t.name.clone()),
                false => hit,
            })
    }
}

/// The token of an `authorization: Bearer <token>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A tonic interceptor adding `authorization: Bearer <token>` to every call (no
/// header without a token).
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    /// Presents `token` (none: calls go without).
    pub fn new(token: Option<&str>) -> Result<Self> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Self(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Self(Some(v)))
                .map_err(|_| Error::invalid("token", "holds characters a header cannot carry")),
        }
    }

    /// Adds the header to `metadata`.
    pub fn apply(&self, metadata: &mut tonic::metadata::MetadataMap) {
        if let Some(v) = &self.0 {
            metadata.insert("authorization", v.clone());
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        self.apply(req.metadata_mut());
        Ok(req)
    }
}

/// Reads a client's token file (the first token in it), for the CLI and workers.
pub fn read_client_token(path: &Path) -> Result<String> {
    let (tokens, _) = read(path)?;
    Ok(String::from_utf8(tokens[0].secret.clone()).unwrap_or_default())
}

/// Who may pass a [`Gate`].
#[derive(Debug, Clone)]
pub enum Access {
    /// Anyone who reaches the port (no token set configured: the operator chose
    /// `auth.allow_unauthenticated`, or the path changes nothing).
    Open,
    /// Whoever presents a token of any of these sets.
    Tokens(Vec<Arc<Tokens>>),
}

impl Access {
    /// Holders of `tokens`; `None` (no set configured) is [`Access::Open`].
    pub fn tokens(tokens: Option<Arc<Tokens>>) -> Self {
        match tokens {
            None => Access::Open,
            Some(t) => Access::Tokens(vec![t]),
        }
    }

    /// Holders of `tokens` pass too. `None` adds nobody: a set that is not
    /// configured never opens a gate by itself (the delay queue without producer
    /// tokens takes the admin ones only).
    pub fn or(self, tokens: Option<Arc<Tokens>>) -> Self {
        match (self, tokens) {
            (Access::Tokens(mut sets), Some(t)) => {
                sets.push(t);
                Access::Tokens(sets)
            }
            (access, _) => access,
        }
    }

    /// Whether an `authorization` header value (`Bearer <token>`) passes.
    pub fn admits(&self, header: Option<&str>) -> bool {
        match self {
            Access::Open => true,
            Access::Tokens(sets) => header.and_then(bearer).is_some_and(|token| {
                // Every set is asked, so timing does not tell which one matched.
                sets.iter().fold(false, |hit, set| set.verify(token) | hit)
            }),
        }
    }
}

/// What guards a group of paths: who may pass, and the name of the token a refused
/// caller lacks (`admin`, `worker`, `producer or admin`), for the refusal.
#[derive(Debug, Clone)]
pub struct Gate {
    name: &'static str,
    access: Access,
}

impl Gate {
    /// A gate `access` lets through; `name` names its token in refusals.
    pub fn new(name: &'static str, access: Access) -> Self {
        Self { name, access }
    }

    /// A gate everyone passes.
    pub fn open() -> Self {
        Self::new("", Access::Open)
    }

    /// The name of the token this gate asks for.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Who passes.
    pub fn access(&self) -> &Access {
        &self.access
    }
}

#[derive(Debug, Clone)]
struct Rule {
    path: String,
    whole: bool,
    gate: Gate,
}

/// Request paths → the gate guarding them. Rules are tried in the order they were
/// added and the first that matches decides; a path no rule matches is open (an
/// edge's probes, health checks and unknown paths, which the router answers).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Arc<Vec<Rule>>,
}

impl Policy {
    /// No rules yet: everything open.
    pub fn new() -> Self {
        Self::default()
    }

    fn rule(mut self, path: String, whole: bool, gate: Gate) -> Self {
        Arc::make_mut(&mut self.rules).push(Rule { path, whole, gate });
        self
    }

    /// `path` exactly (query strings are not part of a path).
    pub fn exact(self, path: impl Into<String>, gate: Gate) -> Self {
        self.rule(path.into(), true, gate)
    }

    /// Every path starting with `prefix` (a gRPC service is `/<package>.<Service>/`).
    pub fn prefix(self, prefix: impl Into<String>, gate: Gate) -> Self {
        self.rule(prefix.into(), false, gate)
    }

    /// The gate guarding `path` (`None`: open).
    pub fn gate(&self, path: &str) -> Option<&Gate> {
        self.rules
            .iter()
            .find(|r| {
                if r.whole {
                    path == r.path
                } else {
                    path.starts_with(&r.path)
                }
            })
            .map(|r| &r.gate)
    }
}

/// The token check of a server edge: a request whose path a [`Policy`] gate guards
/// goes on only with an `authorization: Bearer <token>` header the gate admits;
/// otherwise `refuse` answers it, in the edge's language (gRPC:
/// `tonic::Status::unauthenticated(…).into_http()`; HTTP: a JSON 401), and the
/// service behind never sees it (nor its body, which stays unread). tower-http's
/// request validation is the layer around it ([`require_token`]).
#[cfg(feature = "server")]
#[derive(Clone)]
pub struct RequireToken<R> {
    policy: Policy,
    refuse: R,
}

#[cfg(feature = "server")]
impl<R> std::fmt::Debug for RequireToken<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequireToken")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "server")]
impl<B, R, ResBody> ValidateRequest<B> for RequireToken<R>
where
    R: Fn(&Gate) -> http::Response<ResBody>,
{
    type ResponseBody = ResBody;

    fn validate(
        &mut self,
        req: &mut http::Request<B>,
    ) -> std::result::Result<(), http::Response<ResBody>> {
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self.policy.gate(req.uri().path()) {
            Some(gate) if !gate.access.admits(header) => Err((self.refuse)(gate)),
            _ => Ok(()),
        }
    }
}

/// The layer checking tokens on a server edge (see [`RequireToken`]).
#[cfg(feature = "server")]
pub type RequireTokenLayer<R> = ValidateRequestHeaderLayer<RequireToken<R>>;

/// Checks `policy` on every request, refusing with `refuse(gate)`.
#[cfg(feature = "server")]
pub fn require_token<R>(policy: Policy, refuse: R) -> RequireTokenLayer<R> {
    ValidateRequestHeaderLayer::custom(RequireToken { policy, refuse })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_equality_is_equality() {
        assert!(same(b"abcdef", b"abcdef"));
        assert!(!same(b"abcdef", b"abcdeg"));
        assert!(!same(b"abcdef", b"abcde"));
        assert!(!same(b"abcde", b"abcdef"));
        assert!(!same(b"", b"a"));
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn file_tokens_rotate_and_bad_files_keep_the_last_good_set() {
        let dir = std::env::temp_dir().join(format!("chime-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tokens");
        std::fs::write(&f, "# admin\nold-token-0123456789\n").unwrap();
        let t = Tokens::from_file(&f).unwrap();
        assert!(t.verify("old-token-0123456789"));
        assert!(!t.verify("new-token-0123456789"));
        assert!(!t.verify(""));
        // Rotation: both valid, then only the new one.
        let bump = |text: &str, secs: u64| {
            std::fs::write(&f, text).unwrap();
            let when = SystemTime::now() + Duration::from_secs(secs);
            std::fs::File::options()
                .write(true)
                .open(&f)
                .unwrap()
                .set_modified(when)
                .unwrap();
            t.state.lock().unwrap().checked = Instant::now() - RECHECK;
        };
        bump("old-token-0123456789\nnew-token-0123456789\n", 10);
        assert!(t.verify("old-token-0123456789") && t.verify("new-token-0123456789"));
        bump("new-token-0123456789\n", 20);
        assert!(!t.verify("old-token-0123456789"));
        assert!(t.verify("new-token-0123456789"));
        // A broken file keeps the previous set.
        bump("short\n", 30);
        assert!(t.verify("new-token-0123456789"));
        // Bad files are refused at start, naming the file.
        std::fs::write(&f, "\n# nothing\n").unwrap();
        let e = Tokens::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("tokens") && e.contains("no token"), "{e}");
        std::fs::write(&f, "short\n").unwrap();
        let e = Tokens::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        // Names: given, or the fingerprint; a bad name is refused.
        std::fs::write(
            &f,
            "named-token-0123456789 ci-deployer\nplain-token-0123456789\n",
        )
        .unwrap();
        let t = Tokens::from_file(&f).unwrap();
        assert_eq!(
            t.name_of("named-token-0123456789").as_deref(),
            Some("ci-deployer")
        );
        let anon = t.name_of("plain-token-0123456789").unwrap();
        assert_eq!(anon, fingerprint(b"plain-token-0123456789"));
        assert!(anon.starts_with("token-") && anon.len() == 14 && !anon.contains("plain"));
        assert_eq!(t.name_of("other-token-0123456789"), None);
        assert_eq!(
            read_client_token(&f).unwrap(),
            "named-token-0123456789",
            "a client reads the token, not its name"
        );
        std::fs::write(&f, "named-token-0123456789 bad/name\n").unwrap();
        let e = Tokens::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("name"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    const ADMIN: &str = "admin-token-0123456789";
    const PRODUCER: &str = "producer-token-0123456789";

    fn set(t: &str) -> Option<Arc<Tokens>> {
        Some(Arc::new(Tokens::fixed(t)))
    }

    #[test]
    fn access_sets_combine_as_the_coordinator_needs() {
        let h = |t: &str| format!("Bearer {t}");
        assert!(Access::tokens(None).admits(None));
        let admin = Access::tokens(set(ADMIN));
        assert!(admin.admits(Some(&h(ADMIN))));
        assert!(!admin.admits(Some(&h(PRODUCER))));
        assert!(!admin.admits(Some(ADMIN)), "no scheme");
        assert!(!admin.admits(None));
        // Admin or producer; a missing producer set adds nobody, an open admin
        // gate stays open.
        let queue = Access::tokens(set(ADMIN)).or(set(PRODUCER));
        assert!(queue.admits(Some(&h(ADMIN))) && queue.admits(Some(&h(PRODUCER))));
        assert!(!queue.admits(Some("Bearer someone-else-0123456789")));
        let queue = Access::tokens(set(ADMIN)).or(None);
        assert!(!queue.admits(Some(&h(PRODUCER))));
        assert!(Access::tokens(None).or(set(PRODUCER)).admits(None));
    }

    #[test]
    fn the_first_matching_rule_decides_and_unmatched_paths_are_open() {
        let p = Policy::new()
            .exact("/api/session", Gate::open())
            .prefix("/api/", Gate::new("admin", Access::tokens(set(ADMIN))));
        assert!(p.gate("/api/session").is_some_and(|g| g.name().is_empty()));
        assert_eq!(p.gate("/api/jobs").map(Gate::name), Some("admin"));
        assert_eq!(p.gate("/api/session/x").map(Gate::name), Some("admin"));
        assert!(p.gate("/livez").is_none());
        assert!(p.gate("/api").is_none());
    }

    #[cfg(feature = "server")]
    #[tokio::test]
    async fn the_layer_refuses_in_the_edge_s_language_and_passes_the_rest() {
        use tower::{Layer, ServiceExt};
        let policy = Policy::new().prefix(
            "/chime.v1.Admin/",
            Gate::new("admin", Access::tokens(set(ADMIN))),
        );
        let refuse = |g: &Gate| {
            http::Response::builder()
                .status(401)
                .body(format!("no {} token", g.name()))
                .unwrap()
        };
        let svc =
            require_token(policy, refuse).layer(tower::service_fn(|_: http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new("handled".to_owned()))
            }));
        let call = |path: &str, token: Option<&str>| {
            let mut req = http::Request::builder().uri(path);
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            svc.clone().oneshot(req.body(()).unwrap())
        };
        let r = call("/chime.v1.Admin/ListJobs", None).await.unwrap();
        assert_eq!(
            (r.status().as_u16(), r.body().as_str()),
            (401, "no admin token")
        );
        let r = call("/chime.v1.Admin/ListJobs", Some(PRODUCER))
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = call("/chime.v1.Admin/ListJobs", Some(ADMIN)).await.unwrap();
        assert_eq!(r.body(), "handled");
        let r = call("/grpc.health.v1.Health/Check", None).await.unwrap();
        assert_eq!(r.body(), "handled");
    }
}
