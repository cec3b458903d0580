//! Bearer tokens: who may use the admin API (console, CLI), who may connect as a
//! worker, who may produce items. Separate token sets, so a leaked worker token
//! cannot change jobs.
//!
//! A token file holds one token per line (blank lines and `#` comments ignored),
//! optionally followed by the token's name (`<token> ci-deployer`): the name is who
//! the audit log and the logs say made a call, never the token. A token of the
//! admin API may also carry a role (`<token> grafana role=viewer`, see [`Role`]);
//! without one it is an admin, as every admin token was before roles. A producer
//! token may be limited to some handlers (`<token> coupons handlers=coupon.remind,coupon.expire`):
//! it then enqueues, finds, cancels, reschedules, lists and requeues only items of
//! those handlers. An admin, producer or worker token may be limited to namespaces
//! (`<token> team-a-ci role=operator ns=payments,search`): an admin token then sees
//! and touches only jobs, runs, workers and delayed items of those namespaces (an
//! item's namespace is its handler's: `payments/charge`) and nothing cluster-wide,
//! a producer token only their items, a worker token registers only into groups of
//! them. An unnamed token
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
//! [`Policy`] maps request methods and paths to the [`Gate`] guarding them (which
//! token set, and the least role), and each edge answers a refusal in its own
//! language (a gRPC status, a JSON error): an unknown token is unauthenticated, a
//! known one whose role is too low is forbidden. Clients present their token with
//! [`Bearer`].

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

/// What a token of the admin API may do; each role may do what the roles before
/// it may.
///
/// - `viewer`: read jobs, runs, workers, queues, dead letters, settings, alert
///   rules (without their secrets) and the audit log; change nothing.
/// - `operator`: also act on what exists: trigger, pause, resume, kill, rerun,
///   requeue dead letters, enqueue, cancel and reschedule items, test an alert.
/// - `admin`: also define: create, change and delete jobs, settings and alert
///   rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads.
    Viewer,
    /// Reads and acts.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    /// Every role, least first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// Its name in token files, refusals and `/api/session`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a presented token is: its name, role and handler scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's name (see the module docs); never the token.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The handlers whose items it may touch (`None`: any); only producer tokens
    /// have a scope.
    pub handlers: Option<Vec<String>>,
    /// The namespaces it may see and touch (`None`: every one, and what is
    /// cluster-wide); every set's tokens may have them.
    pub namespaces: Option<Vec<String>>,
}

impl Identity {
    /// Whether it may see and touch namespace `ns`.
    pub fn may_see(&self, ns: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|n| n.iter().any(|x| x == ns))
    }
}

/// Which gate a token set opens, and so which fields its lines may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    /// Admin tokens: `role=`, `ns=`.
    Admin,
    /// Producer tokens: `handlers=`, `ns=`.
    Producer,
    /// Worker tokens: `ns=`.
    Worker,
    /// Tokens of a worker's delivery service: `ns=` (its subscribers then take
    /// only handlers of those namespaces).
    Plain,
}

/// A set of accepted tokens, fixed or read from a file.
#[derive(Debug)]
pub struct Tokens {
    file: Option<PathBuf>,
    /// Which fields its lines may carry: a `role=` outside the admin set (or a
    /// `handlers=` outside the producer set) is refused rather than silently
    /// meaning nothing.
    kind: SetKind,
    state: Mutex<State>,
}

/// One accepted token, the name the audit log gives its holder, its role and its
/// handler scope.
#[derive(Debug)]
struct Token {
    secret: Vec<u8>,
    name: String,
    role: Role,
    handlers: Option<Vec<String>>,
    namespaces: Option<Vec<String>>,
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

fn parse(text: &str, origin: &str, kind: SetKind) -> Result<Vec<Token>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let t = fields.next().unwrap_or_default();
        let (mut name, mut role, mut handlers, mut namespaces) = (None, None, None, None);
        for field in fields {
            let at = |what: String| Error::invalid(origin, format!("line {}: {what}", n + 1));
            if let Some(list) = field.strip_prefix("ns=") {
                if namespaces.is_some() {
                    return Err(at("more than one ns=".into()));
                }
                let list: Vec<String> = list.split(',').map(str::to_owned).collect();
                for ns in &list {
                    crate::limits::check_namespace("ns", ns).map_err(|e| at(e.to_string()))?;
                }
                namespaces = Some(list);
            } else if let Some(list) = field.strip_prefix("handlers=") {
                if kind != SetKind::Producer {
                    return Err(at("only producer tokens have handlers".into()));
                }
                if handlers.is_some() {
                    return Err(at("more than one handlers=".into()));
                }
                let list: Vec<String> = list.split(',').map(str::to_owned).collect();
                if let Some(bad) = list
                    .iter()
                    .find(|h| crate::limits::check_qualified("handlers", h).is_err())
                {
                    return Err(at(format!(
                        "handlers: {bad:?} is not a handler name (1..=128 of A-Z a-z 0-9 . _ : -, \
                         optionally after <namespace>/; comma-separated)"
                    )));
                }
                handlers = Some(list);
            } else if let Some(r) = field.strip_prefix("role=") {
                if kind != SetKind::Admin {
                    return Err(at(
                        "only admin tokens have roles (this set opens one gate)".into()
                    ));
                }
                if role.is_some() {
                    return Err(at("more than one role".into()));
                }
                role = Some(Role::parse(r).ok_or_else(|| {
                    at(format!("unknown role {r:?} (viewer, operator or admin)"))
                })?);
            } else if name.is_some() {
                return Err(at(format!(
                    "{field:?} is neither the token's name (given already) nor role=<role>"
                )));
            } else {
                name = Some(field);
            }
        }
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
            role: role.unwrap_or(Role::Admin),
            handlers,
            namespaces,
        });
    }
    if out.is_empty() {
        return Err(Error::invalid(origin, "holds no token"));
    }
    Ok(out)
}

fn read(path: &Path, kind: SetKind) -> Result<(Vec<Token>, Option<SystemTime>)> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::invalid(&origin, format!("cannot read the token file: {e}")))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((parse(&text, &origin, kind)?, modified))
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
        Self::from_file_of(path, SetKind::Plain)
    }

    /// Admin tokens from a file: as [`Tokens::from_file`], and a token may carry a
    /// `role=` (none: admin).
    pub fn from_file_with_roles(path: impl Into<PathBuf>) -> Result<Self> {
        Self::from_file_of(path, SetKind::Admin)
    }

    /// Tokens of a `kind` of set from a file (see the module docs).
    pub fn from_file_of(path: impl Into<PathBuf>, kind: SetKind) -> Result<Self> {
        let path = path.into();
        let (tokens, modified) = read(&path, kind)?;
        Ok(Self {
            file: Some(path),
            kind,
            state: Mutex::new(State {
                tokens,
                modified,
                checked: Instant::now(),
            }),
        })
    }

    /// One fixed token (`chime dev`, tests). No length rule: it is the caller's.
    pub fn fixed(token: impl Into<String>) -> Self {
        Self::fixed_roles([(token.into(), Role::Admin)])
    }

    /// Fixed tokens, each with its role (tests, `chime dev`). No length rule.
    pub fn fixed_roles(tokens: impl IntoIterator<Item = (String, Role)>) -> Self {
        Self::fixed_limited(tokens.into_iter().map(|(t, r)| (t, r, None)))
    }

    /// Fixed admin tokens, each with its role and the namespaces it is limited to
    /// (tests). No length rule.
    pub fn fixed_limited(
        tokens: impl IntoIterator<Item = (String, Role, Option<Vec<String>>)>,
    ) -> Self {
        let tokens = tokens
            .into_iter()
            .map(|(t, role, namespaces)| {
                let secret = t.into_bytes();
                Token {
                    name: fingerprint(&secret),
                    secret,
                    role,
                    handlers: None,
                    namespaces,
                }
            })
            .collect();
        Self {
            file: None,
            kind: SetKind::Admin,
            state: Mutex::new(State {
                tokens,
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
        self.identify(presented).map(|i| i.name)
    }

    /// Who the token `presented` is, `None` when it is none of them. Re-reads a
    /// changed file as [`Tokens::verify`] says.
    pub fn identify(&self, presented: &str) -> Option<Identity> {
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
                match read(path, self.kind) {
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
                true => Some(Identity {
                    name: t.name.clone(),
                    role: t.role,
                    handlers: t.handlers.clone(),
                    namespaces: t.namespaces.clone(),
                }),
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
    // A client reads its own token from any kind of file.
    let (tokens, _) = read(path, SetKind::Producer).or_else(|_| read(path, SetKind::Admin))?;
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

    /// Whether an `authorization` header value (`Bearer <token>`) passes with any
    /// role.
    pub fn admits(&self, header: Option<&str>) -> bool {
        self.check(header, Role::Viewer).is_ok()
    }

    /// Who an `authorization` header value is, if it is a token of these sets
    /// (the highest role when it is in several). `Open` knows nobody.
    pub fn identify(&self, header: Option<&str>) -> Option<Identity> {
        match self {
            Access::Open => None,
            Access::Tokens(sets) => header.and_then(bearer).and_then(|token| {
                // Every set is asked, so timing does not tell which one matched.
                sets.iter().map(|set| set.identify(token)).fold(
                    None,
                    |best: Option<Identity>, hit| match (best, hit) {
                        (Some(b), Some(h)) if h.role > b.role => Some(h),
                        (Some(b), _) => Some(b),
                        (None, h) => h,
                    },
                )
            }),
        }
    }

    /// Whether an `authorization` header value passes where `need` is the least
    /// role: open access always does; a token of these sets does when its role
    /// is at least `need`.
    pub fn check(&self, header: Option<&str>, need: Role) -> std::result::Result<(), Refusal> {
        self.check_at(header, need, false)
    }

    /// As [`Access::check`]; `cluster`: what the gate guards is cluster-wide, so a
    /// token limited to namespaces does not pass.
    pub fn check_at(
        &self,
        header: Option<&str>,
        need: Role,
        cluster: bool,
    ) -> std::result::Result<(), Refusal> {
        if matches!(self, Access::Open) {
            return Ok(());
        }
        match self.identify(header) {
            None => Err(Refusal::Unauthenticated),
            Some(who) if who.role < need => Err(Refusal::Forbidden { who, need }),
            Some(who) if cluster && who.namespaces.is_some() => Err(Refusal::ClusterWide { who }),
            Some(_) => Ok(()),
        }
    }
}

/// Why a gate refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or one of no set the gate takes.
    Unauthenticated,
    /// A known token whose role is below the gate's.
    Forbidden {
        /// Who asked.
        who: Identity,
        /// The least role the gate takes.
        need: Role,
    },
    /// A known token limited to namespaces, at a gate of what is cluster-wide
    /// (settings, alert rules, queues, the audit log).
    ClusterWide {
        /// Who asked.
        who: Identity,
    },
}

/// What guards a group of paths: who may pass (which token sets, and the least
/// role), and the name of the token a refused caller lacks (`admin`, `worker`,
/// `producer or admin`), for the refusal.
#[derive(Debug, Clone)]
pub struct Gate {
    name: &'static str,
    access: Access,
    need: Role,
    /// What it guards is cluster-wide: tokens limited to namespaces do not pass.
    cluster: bool,
}

impl Gate {
    /// A gate `access` lets through whatever the token's role (a worker or
    /// producer set, whose tokens have none, or a read); `name` names its token in
    /// refusals.
    pub fn new(name: &'static str, access: Access) -> Self {
        Self {
            name,
            access,
            need: Role::Viewer,
            cluster: false,
        }
    }

    /// This gate, guarding what is cluster-wide: a token limited to namespaces
    /// does not pass whatever its role.
    pub fn cluster_wide(mut self) -> Self {
        self.cluster = true;
        self
    }

    /// This gate, passed only by tokens of role `need` or above.
    pub fn needs(mut self, need: Role) -> Self {
        self.need = need;
        self
    }

    /// The least role it takes.
    pub fn need(&self) -> Role {
        self.need
    }

    /// Whether an `authorization` header value passes.
    pub fn check(&self, header: Option<&str>) -> std::result::Result<(), Refusal> {
        self.access.check_at(header, self.need, self.cluster)
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
    /// `None`: every method.
    method: Option<http::Method>,
    path: String,
    match_: Match,
    gate: Gate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    /// The path exactly.
    Exact,
    /// Segment by segment, a `{name}` segment matching any one segment.
    Pattern,
    /// Every path starting with it.
    Prefix,
}

/// Whether `path` is `pattern` with each `{…}` segment one non-empty segment.
fn pattern_matches(pattern: &str, path: &str) -> bool {
    let (mut p, mut q) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.starts_with('{') && a.ends_with('}') => {
                if b.is_empty() {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
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

    fn rule(
        mut self,
        method: Option<http::Method>,
        path: String,
        match_: Match,
        gate: Gate,
    ) -> Self {
        Arc::make_mut(&mut self.rules).push(Rule {
            method,
            path,
            match_,
            gate,
        });
        self
    }

    /// `path` exactly, any method (query strings are not part of a path).
    pub fn exact(self, path: impl Into<String>, gate: Gate) -> Self {
        self.rule(None, path.into(), Match::Exact, gate)
    }

    /// `method` on paths of `pattern` (`/api/jobs/{name}`: a `{…}` segment is any
    /// one segment), as the router routes them.
    pub fn route(self, method: http::Method, pattern: impl Into<String>, gate: Gate) -> Self {
        self.rule(Some(method), pattern.into(), Match::Pattern, gate)
    }

    /// Every path starting with `prefix` (a gRPC service is `/<package>.<Service>/`).
    pub fn prefix(self, prefix: impl Into<String>, gate: Gate) -> Self {
        self.rule(None, prefix.into(), Match::Prefix, gate)
    }

    fn find(&self, method: &http::Method, path: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            r.method.as_ref().is_none_or(|m| m == method)
                && match r.match_ {
                    Match::Exact => path == r.path,
                    Match::Pattern => pattern_matches(&r.path, path),
                    Match::Prefix => path.starts_with(&r.path),
                }
        })
    }

    /// The gate guarding `method` on `path` (`None`: open).
    pub fn gate_for(&self, method: &http::Method, path: &str) -> Option<&Gate> {
        self.find(method, path).map(|r| &r.gate)
    }

    /// Whether a rule names `method` on `path` itself (exactly or by pattern), not
    /// only a prefix catching what no rule names: the check that every route has
    /// its own rule.
    pub fn names(&self, method: &http::Method, path: &str) -> bool {
        self.find(method, path)
            .is_some_and(|r| r.match_ != Match::Prefix)
    }
}

/// The token check of a server edge: a request whose method and path a [`Policy`]
/// gate guards goes on only with an `authorization: Bearer <token>` header the gate
/// admits; otherwise `refuse` answers it, in the edge's language (gRPC:
/// `UNAUTHENTICATED` or `PERMISSION_DENIED`; HTTP: a JSON 401 or 403), and the
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
    R: Fn(&Gate, &Refusal) -> http::Response<ResBody>,
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
        let Some(gate) = self.policy.gate_for(req.method(), req.uri().path()) else {
            return Ok(());
        };
        gate.check(header).map_err(|refusal| {
            // A known caller reaching past its role or namespaces is worth a
            // line: the token's name, never the token.
            match &refusal {
                Refusal::Forbidden { who, need } => tracing::info!(
                    token = %who.name,
                    role = %who.role,
                    need = %need,
                    method = %req.method(),
                    path = req.uri().path(),
                    "refused: the token's role is too low"
                ),
                Refusal::ClusterWide { who } => tracing::info!(
                    token = %who.name,
                    method = %req.method(),
                    path = req.uri().path(),
                    "refused: the token is limited to namespaces; this is cluster-wide"
                ),
                Refusal::Unauthenticated => {}
            }
            (self.refuse)(gate, &refusal)
        })
    }
}

/// The layer checking tokens on a server edge (see [`RequireToken`]).
#[cfg(feature = "server")]
pub type RequireTokenLayer<R> = ValidateRequestHeaderLayer<RequireToken<R>>;

/// Checks `policy` on every request, refusing with `refuse(gate, why)`.
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
        let get = |path: &str| p.gate_for(&http::Method::GET, path);
        assert!(get("/api/session").is_some_and(|g| g.name().is_empty()));
        assert_eq!(get("/api/jobs").map(Gate::name), Some("admin"));
        assert_eq!(get("/api/session/x").map(Gate::name), Some("admin"));
        assert!(get("/livez").is_none());
        assert!(get("/api").is_none());
    }

    #[test]
    fn routes_match_by_method_and_pattern_and_prefixes_only_catch() {
        let admin = || Gate::new("admin", Access::tokens(set(ADMIN)));
        let p = Policy::new()
            .route(
                http::Method::GET,
                "/api/jobs/{name}",
                admin().needs(Role::Viewer),
            )
            .route(
                http::Method::POST,
                "/api/jobs/{name}/pause",
                admin().needs(Role::Operator),
            )
            .prefix("/api/", admin().needs(Role::Admin));
        let need = |m: http::Method, path: &str| p.gate_for(&m, path).map(Gate::need);
        assert_eq!(need(http::Method::GET, "/api/jobs/a"), Some(Role::Viewer));
        assert_eq!(need(http::Method::PUT, "/api/jobs/a"), Some(Role::Admin));
        assert_eq!(
            need(http::Method::POST, "/api/jobs/a/pause"),
            Some(Role::Operator)
        );
        // `{name}` is one non-empty segment.
        assert_eq!(need(http::Method::GET, "/api/jobs/"), Some(Role::Admin));
        assert_eq!(need(http::Method::GET, "/api/jobs/a/b"), Some(Role::Admin));
        assert!(p.names(&http::Method::GET, "/api/jobs/a"));
        assert!(
            !p.names(&http::Method::DELETE, "/api/jobs/a"),
            "only the prefix"
        );
        assert!(!p.names(&http::Method::GET, "/livez"));
    }

    #[test]
    fn roles_rank_and_a_low_role_is_forbidden_not_unauthenticated() {
        let dir = std::env::temp_dir().join(format!("chime-roles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tokens");
        std::fs::write(
            &f,
            "viewer-token-0123456789 grafana role=viewer\n\
             operator-token-0123456789 role=operator oncall\n\
             admin-token-0123456789 ci\n",
        )
        .unwrap();
        let t = Arc::new(Tokens::from_file_with_roles(&f).unwrap());
        let who = |tok: &str| t.identify(tok).map(|i| (i.name, i.role));
        assert_eq!(
            who("viewer-token-0123456789"),
            Some(("grafana".into(), Role::Viewer))
        );
        assert_eq!(
            who("operator-token-0123456789"),
            Some(("oncall".into(), Role::Operator))
        );
        assert_eq!(
            who("admin-token-0123456789"),
            Some(("ci".into(), Role::Admin)),
            "no role: admin, as before roles"
        );
        let access = Access::Tokens(vec![t.clone()]);
        let h = |tok: &str| format!("Bearer {tok}");
        assert_eq!(
            access.check(Some(&h("viewer-token-0123456789")), Role::Viewer),
            Ok(())
        );
        assert!(matches!(
            access.check(Some(&h("viewer-token-0123456789")), Role::Operator),
            Err(Refusal::Forbidden { need: Role::Operator, ref who }) if who.name == "grafana"
        ));
        assert_eq!(
            access.check(Some(&h("operator-token-0123456789")), Role::Operator),
            Ok(())
        );
        assert!(
            access
                .check(Some(&h("operator-token-0123456789")), Role::Admin)
                .is_err()
        );
        assert_eq!(
            access.check(Some(&h("unknown-token-0123456789")), Role::Viewer),
            Err(Refusal::Unauthenticated)
        );
        assert_eq!(
            access.check(None, Role::Viewer),
            Err(Refusal::Unauthenticated)
        );
        // Bad roles name the line; a worker or producer set takes none.
        for (text, says) in [
            ("t-0123456789abcdef role=root\n", "unknown role"),
            (
                "t-0123456789abcdef role=viewer role=admin\n",
                "more than one role",
            ),
            ("t-0123456789abcdef a b\n", "neither"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = Tokens::from_file_with_roles(&f).unwrap_err().to_string();
            assert!(e.contains("line 1") && e.contains(says), "{text}: {e}");
        }
        std::fs::write(&f, "t-0123456789abcdef w1 role=viewer\n").unwrap();
        let e = Tokens::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("only admin tokens have roles"), "{e}");
        // Producer tokens may be limited to handlers; no other set takes that.
        std::fs::write(
            &f,
            "p-0123456789abcdef coupons handlers=coupon.remind,coupon.expire\nq-0123456789abcdef\n",
        )
        .unwrap();
        let p = Tokens::from_file_of(&f, SetKind::Producer).unwrap();
        let scoped = p.identify("p-0123456789abcdef").unwrap();
        assert_eq!(scoped.name, "coupons");
        assert_eq!(
            scoped.handlers,
            Some(vec!["coupon.remind".to_owned(), "coupon.expire".to_owned()])
        );
        assert_eq!(p.identify("q-0123456789abcdef").unwrap().handlers, None);
        for (kind, says) in [
            (SetKind::Admin, "only producer"),
            (SetKind::Worker, "only producer"),
        ] {
            let e = Tokens::from_file_of(&f, kind).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("line 1"), "{e}");
        }
        // A handler may carry a namespace; a producer token may be limited to
        // namespaces too.
        std::fs::write(
            &f,
            "p-0123456789abcdef pay handlers=payments/charge ns=payments\n",
        )
        .unwrap();
        let p = Tokens::from_file_of(&f, SetKind::Producer).unwrap();
        let scoped = p.identify("p-0123456789abcdef").unwrap();
        assert_eq!(scoped.handlers, Some(vec!["payments/charge".to_owned()]));
        assert_eq!(scoped.namespaces, Some(vec!["payments".to_owned()]));
        for bad in [
            "handlers=",
            "handlers=a,,b",
            "handlers=a/b/c",
            "handlers=default/b",
            "handlers=a handlers=b",
        ] {
            std::fs::write(&f, format!("p-0123456789abcdef {bad}\n")).unwrap();
            let e = Tokens::from_file_of(&f, SetKind::Producer)
                .unwrap_err()
                .to_string();
            assert!(e.contains("line 1") && e.contains("handlers"), "{bad}: {e}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(feature = "server")]
    #[tokio::test]
    async fn the_layer_refuses_in_the_edge_s_language_and_passes_the_rest() {
        use tower::{Layer, ServiceExt};
        let policy = Policy::new().prefix(
            "/chime.v1.Admin/",
            Gate::new("admin", Access::tokens(set(ADMIN))),
        );
        let refuse = |g: &Gate, _: &Refusal| {
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
