//! The architecture invariants that execute (in the spirit of rust-analyzer's tidy):
//! each test reads the source tree and fails, naming the file and line, when an
//! invariant ARCHITECTURE.md states is broken.
//!
//! - Domain files import no edge code (tonic, axum, hyper, generated proto, etcd).
//! - Every Lua script touches only keys its header (or the prelude it is run with)
//!   declares, and builds no key name inside the script.
//! - Every source file is named in ARCHITECTURE.md's code map.
//! - The worker SDK's default dependency tree has no axum, no HTTP server, no etcd
//!   client and no allocator.
//!
//! Each check is a function over text, and each has a test feeding it a planted
//! violation, so a check that silently stopped finding anything fails too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// Files under `dir` (recursively) whose name ends with `ext`, as paths relative to
/// the workspace root with `/` separators, sorted.
fn files(dir: &str, ext: &str) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, ext: &str, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                if name != "target" && !name.starts_with('.') && name != "node_modules" {
                    walk(root, &p, ext, out);
                }
            } else if name.ends_with(ext) {
                let rel = p.strip_prefix(root).expect("under the root");
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let root = root();
    let mut out = Vec::new();
    walk(&root, &root.join(dir), ext, &mut out);
    out.sort();
    out
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ---------------------------------------------------------------------------------
// Domain files import no edge code.

/// Domain code: the scheduling core, the models, the delay queue and its stores, live
/// settings, the worker's consumer and hub. Paths ending in `/` are directories.
const DOMAIN: &[&str] = &[
    "coordinator/src/admin.rs",
    "coordinator/src/model.rs",
    "coordinator/src/schedule.rs",
    "coordinator/src/store.rs",
    "coordinator/src/workflow.rs",
    "coordinator/src/engine/",
    "shared/src/queue/",
    "shared/src/clock.rs",
    "shared/src/limits.rs",
    "shared/src/ratelimit.rs",
    "shared/src/trace/mod.rs",
    "shared/src/config/mod.rs",
    "shared/src/config/source.rs",
    "shared/src/config/follow.rs",
    "shared/src/config/watcher.rs",
    "worker/src/consumer.rs",
    "worker/src/handler.rs",
    "worker/src/jobs.rs",
    "worker/src/live.rs",
    "worker/src/delivery/mod.rs",
];

/// Paths a domain file must not name: the gRPC and HTTP stacks, generated code, etcd.
const EDGE_PATHS: &[&str] = &[
    "tonic",
    "axum",
    "hyper",
    "hyper_util",
    "proto",
    "pb",
    "etcd_client",
];

/// Every use of an edge path in `text` (comments skipped), as (line, path).
fn edge_imports(text: &str) -> Vec<(usize, &'static str)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        for &edge in EDGE_PATHS {
            let as_path = format!("{edge}::");
            let as_use = format!("use {edge}");
            for (at, _) in code
                .match_indices(&as_path)
                .chain(code.match_indices(&as_use))
            {
                // `use proto` and `proto::` count; `myproto::` or `x.proto::` do not.
                let before = code[..at].chars().next_back();
                let word_start = !before.is_some_and(|c| c.is_alphanumeric() || c == '_');
                let after = code[at..]
                    .strip_prefix(&as_use)
                    .and_then(|r| r.chars().next());
                let word_end = !after.is_some_and(|c| c.is_alphanumeric() || c == '_');
                if word_start && word_end {
                    out.push((n + 1, edge));
                }
            }
        }
    }
    out.dedup();
    out
}

#[test]
fn domain_files_import_no_edge_code() {
    let mut violations = Vec::new();
    let mut checked = 0;
    for entry in DOMAIN {
        let list = if entry.ends_with('/') {
            files(entry, ".rs")
        } else {
            vec![(*entry).to_owned()]
        };
        assert!(
            !list.is_empty(),
            "{entry}: no such domain file or directory"
        );
        for f in list {
            checked += 1;
            for (line, edge) in edge_imports(&read(&f)) {
                violations.push(format!("{f}:{line} uses `{edge}`"));
            }
        }
    }
    assert!(checked >= 30, "only {checked} domain files found");
    assert!(
        violations.is_empty(),
        "domain code has no tonic, axum, hyper, generated proto or etcd imports; the \
         edges (grpc/, http.rs, session.rs, delivery/{{server,client,wire}}.rs, \
         producer.rs) convert at one place (ARCHITECTURE.md, invariants):\n{}",
        violations.join("\n")
    );
}

/// The JSON API speaks to the domain admin service directly: JSON never passes
/// through protobuf, and the HTTP edge has no gRPC in it.
#[test]
fn the_http_edge_has_no_grpc_or_proto() {
    let f = "coordinator/src/http.rs";
    let grpc: Vec<String> = edge_imports(&read(f))
        .into_iter()
        .filter(|(_, e)| matches!(*e, "tonic" | "proto" | "pb"))
        .map(|(l, e)| format!("{f}:{l} uses `{e}`"))
        .collect();
    assert!(grpc.is_empty(), "{}", grpc.join("\n"));
}

#[test]
fn the_import_check_catches_a_planted_violation() {
    let planted = "//! doc mentioning tonic:: is fine\nuse std::sync::Arc;\nuse tonic::Status;\n\
                   fn f() -> proto::Job { todo!() }\nlet x = myproto::y;\nuse protobuf_x;\n";
    assert_eq!(edge_imports(planted), vec![(3, "tonic"), (4, "proto")]);
}

// ---------------------------------------------------------------------------------
// Lua scripts touch only declared keys.

/// What a script may touch: the `KEYS[n]` its header comments declare, and every
/// index from `open_from` on when it declares a `KEYS[n..]` range.
#[derive(Debug, Default)]
struct Declared {
    keys: BTreeSet<u32>,
    open_from: Option<u32>,
}

/// The leading comment block of a script (its header).
fn header(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .take_while(|l| l.trim_start().starts_with("--") || l.trim().is_empty())
}

fn declared(text: &str, into: &mut Declared) {
    for line in header(text) {
        let mut rest = line;
        while let Some(i) = rest.find("KEYS[") {
            rest = &rest[i + 5..];
            let Some(end) = rest.find(']') else { break };
            let inner = &rest[..end];
            if let Some(from) = inner.strip_suffix("..") {
                if let Ok(n) = from.trim().parse() {
                    into.open_from = Some(n);
                }
            } else if let Ok(n) = inner.trim().parse() {
                into.keys.insert(n);
            }
        }
    }
}

/// The code of a line (a `--` comment stripped).
fn code(line: &str) -> &str {
    line.find("--").map_or(line, |i| &line[..i])
}

/// The argument list of each `redis.call(`/`redis.pcall(` in `line`, split at
/// top-level commas.
fn redis_calls(line: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("redis.") {
        rest = &rest[i + 6..];
        let Some(args) = rest
            .strip_prefix("call(")
            .or_else(|| rest.strip_prefix("pcall("))
        else {
            continue;
        };
        let (mut depth, mut cur, mut list) = (0usize, String::new(), Vec::new());
        for c in args.chars() {
            match c {
                '(' | '{' | '[' => {
                    depth += 1;
                    cur.push(c);
                }
                ')' | '}' | ']' if depth == 0 => break,
                ')' | '}' | ']' => {
                    depth -= 1;
                    cur.push(c);
                }
                ',' if depth == 0 => list.push(std::mem::take(&mut cur).trim().to_owned()),
                _ => cur.push(c),
            }
        }
        list.push(cur.trim().to_owned());
        out.push(list);
    }
    out
}

/// Commands whose first argument is not a key (a `PUBLISH` channel is not a key: it
/// has no slot, and a publish on one node of a cluster reaches every node).
const KEYLESS: &[&str] = &["'TIME'", "'PING'", "'PUBLISH'"];

/// Every violation in `script` run after `prelude` (both texts), as (line, why);
/// lines count in `script`.
fn lua_violations(prelude: &str, script: &str) -> Vec<(usize, String)> {
    let mut decl = Declared::default();
    declared(prelude, &mut decl);
    declared(script, &mut decl);
    // Local names that hold keys: assigned only from KEYS or K_ aliases.
    let all: Vec<&str> = prelude.lines().chain(script.lines()).map(code).collect();
    let holds_key = |name: &str| {
        let mut assigned = false;
        for l in &all {
            for stmt in l.split(';') {
                let s = stmt.trim().trim_start_matches("local ").trim();
                let Some((lhs, rhs)) = s.split_once('=') else {
                    continue;
                };
                if rhs.starts_with('=') || lhs.ends_with(['~', '<', '>', '=']) {
                    continue;
                }
                let names: Vec<&str> = lhs.split(',').map(str::trim).collect();
                if let Some(pos) = names.iter().position(|n| *n == name) {
                    let rhs_part = rhs.split(',').nth(pos).unwrap_or(rhs).trim();
                    let whole = rhs.trim();
                    let part = if names.len() > 1 { rhs_part } else { whole };
                    if part.contains("..") || part.contains('\'') || part.contains('"') {
                        return false;
                    }
                    if !(part.contains("KEYS[") || part.contains("K_")) {
                        return false;
                    }
                    assigned = true;
                }
            }
        }
        assigned
    };
    let mut out = Vec::new();
    for (n, line) in script.lines().enumerate() {
        let c = code(line);
        // Every KEYS[...] index is declared.
        let mut rest = c;
        while let Some(i) = rest.find("KEYS[") {
            rest = &rest[i + 5..];
            let Some(end) = rest.find(']') else { break };
            let inner = rest[..end].trim();
            let ok = match inner.parse::<u32>() {
                Ok(k) => decl.keys.contains(&k) || decl.open_from.is_some_and(|f| k >= f),
                Err(_) => decl.open_from.is_some(),
            };
            if !ok {
                out.push((
                    n + 1,
                    format!("KEYS[{inner}] is not declared in the header"),
                ));
            }
        }
        // No key is built inside the script.
        for args in redis_calls(c) {
            let (Some(cmd), Some(key)) = (args.first(), args.get(1)) else {
                continue;
            };
            if KEYLESS.contains(&cmd.as_str()) || key.is_empty() {
                continue;
            }
            let plain = key.chars().all(|ch| ch.is_alphanumeric() || ch == '_');
            let ok = if key.contains("..")
                || key.contains('\'')
                || key.contains('"')
                || key.contains("ARGV")
            {
                false
            } else if key.starts_with("KEYS[") || key.starts_with("K_") {
                true
            } else {
                plain && holds_key(key)
            };
            if !ok {
                out.push((
                    n + 1,
                    format!("{cmd} on `{key}`, a key built in the script"),
                ));
            }
        }
    }
    out
}

#[test]
fn lua_scripts_touch_only_declared_keys() {
    // Queue scripts run after common.lua (`script!` in redis_store.rs), which
    // declares the twenty-one keys of a queue; ratelimit.lua and the coordinator's
    // scripts run alone.
    let common = read("shared/src/queue/lua/common.lua");
    assert!(
        read("shared/src/queue/redis_store.rs").contains("include_str!(\"lua/common.lua\")"),
        "the queue's scripts are no longer run after common.lua: update this test"
    );
    let mut scripts = Vec::new();
    for f in files("shared/src/queue/lua", ".lua") {
        let alone = f.ends_with("/common.lua") || f.ends_with("/ratelimit.lua");
        scripts.push((f, alone));
    }
    for f in files("coordinator/src", ".lua") {
        scripts.push((f, true));
    }
    assert!(scripts.len() >= 25, "only {} scripts found", scripts.len());
    let mut violations = Vec::new();
    for (f, alone) in &scripts {
        let prelude = if *alone { "" } else { common.as_str() };
        let text = read(f);
        let mut decl = Declared::default();
        declared(prelude, &mut decl);
        declared(&text, &mut decl);
        if decl.keys.is_empty() && decl.open_from.is_none() && text.contains("redis.call") {
            violations.push(format!("{f}: declares no keys in its header"));
        }
        for (line, why) in lua_violations(prelude, &text) {
            violations.push(format!("{f}:{line}: {why}"));
        }
    }
    assert!(
        violations.is_empty(),
        "every script declares its keys (`-- KEYS[n] name TYPE` in its header) and \
         touches only them, so each touches one hash tag:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_lua_check_catches_planted_violations() {
    let script = "-- X: KEYS[1] due ZSET, KEYS[2] items HASH\n\
                  local due = KEYS[1]\n\
                  redis.call('ZADD', due, 1, 'a')\n\
                  redis.call('HSET', KEYS[2], 'a', 'b')\n\
                  redis.call('DEL', KEYS[3])\n\
                  redis.call('SET', ARGV[1] .. 'fired:' .. ARGV[2], '1')\n\
                  local t = redis.call('TIME')\n\
                  local k = 'x:' .. ARGV[1]\n\
                  redis.call('GET', k)\n";
    let v = lua_violations("", script);
    let lines: Vec<usize> = v.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, vec![5, 6, 9], "{v:?}");
    // An open range declares every index from its start, variable ones included.
    let ranged = "-- KEYS[1] fence, KEYS[2..] per fire\nlocal k = 2\n\
                  redis.call('SET', KEYS[k], 1)\nredis.call('GET', KEYS[7])\n";
    assert!(lua_violations("", ranged).is_empty());
}

// ---------------------------------------------------------------------------------
// Every source file is in ARCHITECTURE.md's code map.

/// The sections of ARCHITECTURE.md's code map: `### \`dir/\`` heading → its text.
fn code_map(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in doc.lines() {
        if line.starts_with("## ") || line.starts_with("### ") {
            out.extend(current.take());
            if let Some(rest) = line.strip_prefix("### `")
                && let Some((dir, _)) = rest.split_once("/`")
            {
                current = Some((dir.to_owned(), String::new()));
            }
            continue;
        }
        if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    out.extend(current);
    out
}

/// `a/{b,c}_x.rs` → `a/b_x.rs`, `a/c_x.rs`.
fn expand(token: &str) -> Vec<String> {
    let (Some(open), Some(close)) = (token.find('{'), token.find('}')) else {
        return vec![token.to_owned()];
    };
    if close < open {
        return vec![token.to_owned()];
    }
    token[open + 1..close]
        .split(',')
        .flat_map(|alt| expand(&format!("{}{alt}{}", &token[..open], &token[close + 1..])))
        .collect()
}

/// Whether `name` matches `pattern` (`*` matches any run of characters but `/`).
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            let Some(rest) = name.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|&i| rest.is_char_boundary(i) && !rest[..i].contains('/'))
                .any(|i| glob(tail, &rest[i..]))
        }
    }
}

/// Files of `crate_dir` (paths relative to the crate) that `section` does not name.
/// A file is named by its path (relative to the crate or to its `src/`), by a glob
/// of it, or by its file name when its directory is named too (`engine/` … `machine.rs`).
fn unmapped(section: &str, crate_files: &[String]) -> Vec<String> {
    let tokens: BTreeSet<String> = section
        .split('`')
        .skip(1)
        .step_by(2)
        .flat_map(expand)
        .collect();
    let named = |candidate: &str| tokens.iter().any(|t| glob(t, candidate));
    crate_files
        .iter()
        .filter(|rel| {
            let in_src = rel.strip_prefix("src/").unwrap_or(rel);
            if named(rel) || named(in_src) {
                return false;
            }
            let (dir, name) = in_src.rsplit_once('/').unwrap_or(("", in_src));
            let dir_named = dir.is_empty()
                || tokens.contains(&format!("{dir}/"))
                || rel
                    .rsplit_once('/')
                    .is_some_and(|(d, _)| tokens.contains(&format!("{d}/")));
            !(named(name) && dir_named)
        })
        .cloned()
        .collect()
}

#[test]
fn every_source_file_is_in_the_code_map() {
    let doc = read("ARCHITECTURE.md");
    let map = code_map(&doc);
    let crates = [
        "proto",
        "shared",
        "worker",
        "coordinator",
        "cli",
        "tests",
        "fuzz",
    ];
    let mut missing = Vec::new();
    for krate in crates {
        let Some((_, section)) = map.iter().find(|(d, _)| d == krate) else {
            missing.push(format!("{krate}/: no `### \\`{krate}/\\`` section"));
            continue;
        };
        let mut crate_files = files(krate, ".rs");
        crate_files.extend(files(krate, ".lua"));
        assert!(!crate_files.is_empty(), "{krate}: no source files found");
        let rel: Vec<String> = crate_files
            .iter()
            .map(|f| f[krate.len() + 1..].to_owned())
            .collect();
        for f in unmapped(section, &rel) {
            missing.push(format!("{krate}/{f}"));
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md's code map names every source file (in its crate's section): \
         add these or remove the files:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_code_map_check_catches_a_planted_violation() {
    let doc = "## Code map\n### `demo/` (crate)\n`lib.rs` the root; `engine/`: `a.rs`, \
               `b.rs`; `tests/{x,y}_e2e.rs`; `lua/*.lua`.\n## Next\n`c.rs`\n";
    let map = code_map(doc);
    assert_eq!(map.len(), 1);
    let files: Vec<String> = [
        "src/lib.rs",
        "src/engine/a.rs",
        "src/engine/b.rs",
        "src/engine/c.rs",
        "src/other/a.rs",
        "tests/x_e2e.rs",
        "tests/z_e2e.rs",
        "src/lua/f.lua",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    assert_eq!(
        unmapped(&map[0].1, &files),
        vec!["src/engine/c.rs", "src/other/a.rs", "tests/z_e2e.rs"]
    );
}

// ---------------------------------------------------------------------------------
// The worker SDK's dependency tree.

/// Packages a plain worker SDK user must not compile, and (package, feature) pairs
/// that mean an HTTP server. The allocator is the binary's choice: a library that
/// set one would impose it on every program embedding the SDK.
const NOT_IN_THE_SDK: &[&str] = &[
    "axum",
    "axum-core",
    "axum-server",
    "etcd-client",
    "tonic-health",
    "tikv-jemallocator",
    "tikv-jemalloc-sys",
];
const SERVER_FEATURES: &[(&str, &str)] = &[
    ("hyper", "server"),
    ("hyper-util", "server"),
    ("hyper-util", "server-auto"),
    ("tonic", "server"),
    ("tonic", "router"),
];

/// What in `tree` (`cargo tree -f '{p} {f}' --prefix none` output) breaks the rule.
fn sdk_tree_violations(tree: &str) -> Vec<String> {
    let mut out = BTreeSet::new();
    for line in tree.lines() {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(_version)) = (parts.next(), parts.next()) else {
            continue;
        };
        if NOT_IN_THE_SDK.contains(&name) {
            out.insert(format!("{name} is in the tree"));
        }
        let features: BTreeSet<&str> = parts
            .filter(|p| !p.starts_with('(') && !p.starts_with('/'))
            .flat_map(|p| p.split(','))
            .collect();
        for (pkg, feature) in SERVER_FEATURES {
            if name == *pkg && features.contains(feature) {
                out.insert(format!("{pkg} has feature `{feature}` (an HTTP server)"));
            }
        }
    }
    out.into_iter().collect()
}

fn cargo_tree(package: &str, features: &[&str]) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.current_dir(root()).args([
        "tree",
        "--locked",
        "--offline",
        "-p",
        package,
        "-e",
        "normal",
        "--prefix",
        "none",
        "-f",
        "{p} {f}",
    ]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = cmd.output().expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn the_worker_sdk_has_no_http_server_axum_or_etcd_by_default() {
    let tree = cargo_tree("chime-worker", &[]);
    assert!(
        tree.contains("chime-shared "),
        "unexpected cargo tree output:\n{tree}"
    );
    assert!(
        tree.contains("tonic "),
        "the SDK calls gRPC: tonic is expected"
    );
    let v = sdk_tree_violations(&tree);
    assert!(
        v.is_empty(),
        "`chime-worker` with default features pulls in what only a server needs \
         (ARCHITECTURE.md, invariants):\n{}",
        v.join("\n")
    );
    // The check sees the server when the feature that needs it is on.
    let serving = cargo_tree("chime-worker", &["serve"]);
    assert!(
        !sdk_tree_violations(&serving).is_empty(),
        "with `serve` on, the tree should show tonic's server (is the check blind?)"
    );
}

#[test]
fn the_tree_check_catches_a_planted_violation() {
    let tree = "chime-worker v0.1.0 (/w/worker)\ntonic v0.14.9 channel,codegen,tls-ring\n\
                hyper v1.12.0 client,http1,http2,server\naxum v0.8.9 default\n\
                hyper-util v0.1.21 client-legacy,tokio\n";
    assert_eq!(
        sdk_tree_violations(tree),
        vec![
            "axum is in the tree".to_owned(),
            "hyper has feature `server` (an HTTP server)".to_owned()
        ]
    );
}
