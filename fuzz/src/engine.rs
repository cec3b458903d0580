//! The fuzzing engine: a coverage-less mutational fuzzer for stable Rust.
//!
//! It runs every seed once, then until its limit (a deadline or an execution count)
//! picks an input (a seed, an input that produced a new outcome, or a recent
//! mutant), applies a stack of byte-level mutations (bit flips, interesting bytes and
//! integers, range insert/delete/duplicate, splices with other inputs, the target's
//! dictionary tokens, ASCII number swaps) and runs the target under
//! [`std::panic::catch_unwind`]. A panic, or an execution slower than the timeout,
//! is a failure: the input goes to `<artifacts>/<target>/crash-<hash>` (or
//! `hang-<hash>`) and the run stops (or, with `keep_going`, records one failure per
//! panic location and goes on).
//!
//! There is no coverage instrumentation (that needs nightly). As a cheap stand-in,
//! each target answers a coarse *outcome signal* (which stage the input reached, which
//! field an error named); an input producing a signal not seen before is kept for
//! further mutation, so inputs that get past the parsers stay in the pool.
//!
//! Runs are deterministic for a given seed: the same seed and the same execution
//! count replay the same inputs (a time-limited run stops at a different count, but
//! its inputs are a prefix of the same sequence).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use chime_shared::queue::fnv1a64;

use crate::Target;

/// Stack of the thread that runs the targets: tokio's default worker stack, the
/// budget chime's own code has in production (so a deep recursion that would
/// overflow a server thread overflows here too instead of passing on a main
/// thread's 8 MiB).
pub const STACK_BYTES: usize = 2 * 1024 * 1024;

/// Default input size cap: inputs beyond it say nothing new and slow every target.
pub const DEFAULT_MAX_LEN: usize = 64 * 1024;

/// Inputs kept because they produced a new outcome signal; beyond it, new ones
/// replace random old ones (memory stays bounded on long runs).
const MAX_FINDS: usize = 4096;

/// Recent mutants kept for stacked mutation (they drift further from the seeds).
const RECENT: usize = 64;

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// After this long (seeds included).
    Time(Duration),
    /// After this many executions (seeds included): deterministic, for tests.
    Executions(u64),
}

/// How to run one target.
#[derive(Debug, Clone)]
pub struct Options {
    /// RNG seed: the same seed replays the same inputs.
    pub seed: u64,
    /// When to stop.
    pub limit: Limit,
    /// Largest input generated, bytes.
    pub max_len: usize,
    /// An execution slower than this is a hang (a failure). A watchdog ends the
    /// process when one execution has run for ten times this (at least 10 s), since
    /// a looping target never returns to be timed.
    pub timeout: Duration,
    /// Where failing inputs are written (`<dir>/<target>/crash-<hash>`); `None`
    /// writes nothing (tests).
    pub artifacts: Option<PathBuf>,
    /// Record one failure per panic location and go on, instead of stopping at the
    /// first.
    pub keep_going: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seed: 0,
            limit: Limit::Time(Duration::from_secs(60)),
            max_len: DEFAULT_MAX_LEN,
            timeout: Duration::from_secs(1),
            artifacts: None,
            keep_going: false,
        }
    }
}

/// Why an input failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// The target panicked.
    Panic,
    /// One execution took longer than the timeout.
    Hang,
}

/// A failing input and what happened.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Panic or hang.
    pub kind: FailureKind,
    /// The panic message (or the hang's duration).
    pub message: String,
    /// `file:line:col` of the panic, when known.
    pub location: Option<String>,
    /// Backtrace of the panic (only captured by [`replay`]).
    pub backtrace: Option<String>,
    /// The input.
    pub input: Vec<u8>,
    /// Where the input was written.
    pub artifact: Option<PathBuf>,
}

impl Failure {
    /// What distinguishes two failures for `keep_going`: the panic location.
    fn key(&self) -> String {
        match self.kind {
            FailureKind::Hang => "hang".to_owned(),
            FailureKind::Panic => self
                .location
                .clone()
                .unwrap_or_else(|| self.message.clone()),
        }
    }
}

/// What one run of one target did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Target name.
    pub target: &'static str,
    /// RNG seed of the run.
    pub seed: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Executions of the target (seeds included).
    pub executions: u64,
    /// Seed inputs loaded.
    pub seeds: usize,
    /// Distinct outcome signals seen.
    pub outcomes: usize,
    /// Slowest single execution, ms.
    pub slowest_ms: f64,
    /// The input of the slowest execution.
    pub slowest_input: Vec<u8>,
    /// Failures (one per panic location; at most one without `keep_going`).
    pub failures: Vec<Failure>,
}

impl Report {
    /// Executions per second.
    pub fn execs_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.executions as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// The one-line JSON summary `chime-fuzz` prints.
    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "target": self.target,
            "seconds": (self.seconds * 10.0).round() / 10.0,
            "executions": self.executions,
            "execs_per_s": self.execs_per_s().round(),
            "seeds": self.seeds,
            "crashes": self.failures.len(),
            "outcomes": self.outcomes,
            "slowest_ms": (self.slowest_ms * 10.0).round() / 10.0,
            "slowest_input": escape(&self.slowest_input, 96),
            "seed": self.seed,
        });
        if !self.failures.is_empty() {
            v["failures"] = self
                .failures
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "kind": format!("{:?}", f.kind).to_lowercase(),
                        "message": f.message,
                        "location": f.location,
                        "artifact": f.artifact.as_ref().map(|p| p.display().to_string()),
                        "input": escape(&f.input, 512),
                    })
                })
                .collect();
        }
        v
    }
}

/// A short printable form of an input (for reports): `\xNN` for non-printable bytes,
/// cut at `max` bytes.
pub fn escape(input: &[u8], max: usize) -> String {
    let mut s: String = input[..input.len().min(max)]
        .escape_ascii()
        .map(char::from)
        .collect();
    if input.len() > max {
        s.push_str(&format!("... ({} bytes)", input.len()));
    }
    s
}

// ---- panic capture -------------------------------------------------------------

/// What the panic hook saw on a fuzzing thread.
struct Caught {
    message: String,
    location: Option<String>,
    backtrace: Option<String>,
}

thread_local! {
    /// This thread runs targets: its panics are captured, not printed.
    static FUZZING: Cell<bool> = const { Cell::new(false) };
    /// Capture a backtrace too (slow; only for replays).
    static WANT_BACKTRACE: Cell<bool> = const { Cell::new(false) };
    /// The last captured panic of this thread.
    static CAUGHT: RefCell<Option<Caught>> = const { RefCell::new(None) };
}

/// Installs (once per process) a panic hook that captures panics of fuzzing threads
/// and hands every other panic to the previous hook, so tests running next to a
/// fuzz run still report their own failures.
fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !FUZZING.with(Cell::get) {
                previous(info);
                return;
            }
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string panic payload)".to_owned());
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            let backtrace = WANT_BACKTRACE
                .with(Cell::get)
                .then(|| std::backtrace::Backtrace::force_capture().to_string());
            CAUGHT.with(|c| {
                *c.borrow_mut() = Some(Caught {
                    message,
                    location,
                    backtrace,
                })
            });
        }));
    });
}

/// Outcome of one execution.
enum Exec {
    /// Returned, with its outcome signal.
    Ok(u64),
    /// Panicked.
    Panic(Caught),
}

/// Runs `target` on `input` once on the current (fuzzing) thread.
fn execute(target: &Target, input: &[u8]) -> Exec {
    match panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input))) {
        Ok(signal) => Exec::Ok(signal),
        Err(payload) => Exec::Panic(CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or_else(|| {
            Caught {
                message: payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .unwrap_or_else(|| "(panic not seen by the hook)".to_owned()),
                location: None,
                backtrace: None,
            }
        })),
    }
}

/// Runs `f` on a fresh thread with [`STACK_BYTES`] of stack that captures its
/// panics, and answers its result.
fn on_fuzz_thread<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    install_hook();
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(format!("fuzz-{name}"))
            .stack_size(STACK_BYTES)
            .spawn_scoped(s, || {
                FUZZING.with(|f| f.set(true));
                let out = f();
                FUZZING.with(|f| f.set(false));
                out
            });
        match handle {
            Ok(h) => match h.join() {
                Ok(v) => v,
                // Target panics are caught inside; a panic here is the engine's own.
                Err(p) => panic::resume_unwind(p),
            },
            Err(e) => panic!("cannot start the fuzzing thread: {e}"),
        }
    })
}

// ---- watchdog ------------------------------------------------------------------

/// Shared with the watchdog: the input being executed and since when.
struct Watch {
    /// Start of the current execution, ms since `origin` + 1 (0: idle).
    started: AtomicU64,
    input: Mutex<Vec<u8>>,
    /// Executions before the current one (for the report of a hang).
    executions: AtomicU64,
    done: AtomicBool,
    origin: Instant,
    seed: u64,
    seeds: usize,
}

impl Watch {
    fn begin(&self, input: &[u8], executions: u64) {
        if let Ok(mut cur) = self.input.lock() {
            cur.clear();
            cur.extend_from_slice(input);
        }
        self.executions.store(executions, Ordering::Relaxed);
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        self.started.store(now, Ordering::Release);
    }

    fn end(&self) {
        self.started.store(0, Ordering::Release);
    }
}

/// Ends the process (exit code 3) when one execution runs past `limit`, since a
/// target that never returns cannot be timed by the loop: writes the input as a hang
/// and prints the target's JSON report line first.
fn spawn_watchdog(
    target: &'static str,
    watch: Arc<Watch>,
    limit: Duration,
    artifacts: Option<PathBuf>,
) {
    let spawned = std::thread::Builder::new()
        .name(format!("fuzz-watchdog-{target}"))
        .spawn(move || {
            while !watch.done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(100));
                let started = watch.started.load(Ordering::Acquire);
                if started == 0 {
                    continue;
                }
                let now = watch.origin.elapsed().as_millis() as u64 + 1;
                if now.saturating_sub(started) < limit.as_millis() as u64 {
                    continue;
                }
                let input = watch.input.lock().map(|i| i.clone()).unwrap_or_default();
                let artifact = artifacts
                    .as_deref()
                    .and_then(|dir| write_artifact(dir, target, "hang", &input).ok());
                let message = format!(
                    "one execution has run for more than {} s (the run was stopped)",
                    limit.as_secs()
                );
                eprintln!(
                    "chime-fuzz: {target}: {message}; input {} written to {}",
                    escape(&input, 256),
                    artifact
                        .as_ref()
                        .map_or("(not written)".to_owned(), |p| p.display().to_string())
                );
                let report = Report {
                    target,
                    seed: watch.seed,
                    seconds: watch.origin.elapsed().as_secs_f64(),
                    executions: watch.executions.load(Ordering::Relaxed) + 1,
                    seeds: watch.seeds,
                    outcomes: 0,
                    slowest_ms: (now - started) as f64,
                    slowest_input: input.clone(),
                    failures: vec![Failure {
                        kind: FailureKind::Hang,
                        message,
                        location: None,
                        backtrace: None,
                        input,
                        artifact,
                    }],
                };
                println!("{}", report.json());
                use std::io::Write;
                let _ = std::io::stdout().flush();
                std::process::exit(3);
            }
        });
    if let Err(e) = spawned {
        eprintln!("chime-fuzz: no watchdog ({e}); a looping target would hang the run");
    }
}

/// Writes a failing input to `<dir>/<target>/<kind>-<hash>`.
pub fn write_artifact(
    dir: &Path,
    target: &str,
    kind: &str,
    input: &[u8],
) -> std::io::Result<PathBuf> {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{kind}-{:016x}", fnv1a64(input)));
    std::fs::write(&path, input)?;
    Ok(path)
}

// ---- corpus --------------------------------------------------------------------

/// Reads every file of `dir` (sorted by name, so runs are deterministic); a missing
/// directory is an empty corpus.
pub fn load_corpus(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths.iter().map(std::fs::read).collect()
}

// ---- mutation ------------------------------------------------------------------

/// Numbers that break parsers, swapped in for ASCII digit runs.
const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "7",
    "8",
    "13",
    "24",
    "29",
    "31",
    "32",
    "59",
    "60",
    "99",
    "100",
    "127",
    "128",
    "255",
    "256",
    "4096",
    "4097",
    "65535",
    "65536",
    "86400000",
    "2147483647",
    "2147483648",
    "-2147483649",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "253402300799999",
    "8210266876799999",
    "-8334601315200000",
    "1e309",
    "-1e309",
    "1e-7",
    "0.0001",
    "1.5",
    "NaN",
    "inf",
    "-inf",
    "+1",
    "0x10",
    "00000000000000000000001",
];

const INTERESTING_U64: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x1_0001,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

const INTERESTING_BYTES: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b' ', b'0', b'9', b'-', b'|', b'\n', b'"', b'\\', 0xc3, 0xed,
];

/// Applies one random mutation to `data`.
fn mutate_once(
    rng: &mut fastrand::Rng,
    data: &mut Vec<u8>,
    dict: &[Vec<u8>],
    other: &[u8],
    max_len: usize,
) {
    let len = data.len();
    // Without bytes to change, only insertions make progress.
    let op = if len == 0 {
        [4u8, 9, 12, 13][rng.usize(0..4)]
    } else {
        rng.u8(0..16)
    };
    match op {
        // Bit flip.
        0 => {
            let i = rng.usize(0..len);
            data[i] ^= 1 << rng.u8(0..8);
        }
        // Interesting byte.
        1 => {
            let i = rng.usize(0..len);
            data[i] = INTERESTING_BYTES[rng.usize(0..INTERESTING_BYTES.len())];
        }
        // Random byte.
        2 => {
            let i = rng.usize(0..len);
            data[i] = rng.u8(..);
        }
        // Small add/subtract.
        3 => {
            let i = rng.usize(0..len);
            let d = rng.u8(1..=35);
            data[i] = if rng.bool() {
                data[i].wrapping_add(d)
            } else {
                data[i].wrapping_sub(d)
            };
        }
        // Insert random bytes.
        4 => {
            let at = rng.usize(0..=len);
            let n = rng.usize(1..=8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            data.splice(at..at, bytes);
        }
        // Delete a range.
        5 => {
            let at = rng.usize(0..len);
            let most = if rng.bool() { 4 } else { 64 };
            let n = rng.usize(1..=(len - at).min(most));
            data.drain(at..at + n);
        }
        // Duplicate a range in place.
        6 => {
            let at = rng.usize(0..len);
            let n = rng.usize(1..=(len - at).min(64));
            let chunk = data[at..at + n].to_vec();
            let to = rng.usize(0..=len);
            data.splice(to..to, chunk);
        }
        // Copy a range over another place.
        7 => {
            let from = rng.usize(0..len);
            let n = rng.usize(1..=(len - from).min(64));
            let to = rng.usize(0..len);
            let n = n.min(len - to);
            let chunk = data[from..from + n].to_vec();
            data[to..to + n].copy_from_slice(&chunk);
        }
        // Splice: our prefix, another input's suffix.
        8 if !other.is_empty() => {
            let cut = rng.usize(0..=len);
            let from = rng.usize(0..other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        // Insert a range of another input.
        9 if !other.is_empty() => {
            let from = rng.usize(0..other.len());
            let n = rng.usize(1..=(other.len() - from).min(64));
            let at = rng.usize(0..=len);
            data.splice(at..at, other[from..from + n].iter().copied());
        }
        // Dictionary token: overwrite.
        10 if !dict.is_empty() => {
            let tok = &dict[rng.usize(0..dict.len())];
            let at = rng.usize(0..len);
            let end = (at + tok.len()).min(len);
            data.splice(at..end, tok.iter().copied());
        }
        // Replace an ASCII number with an interesting one.
        11 => {
            let starts: Vec<usize> = (0..len)
                .filter(|&i| data[i].is_ascii_digit() && (i == 0 || !data[i - 1].is_ascii_digit()))
                .collect();
            if starts.is_empty() {
                let at = rng.usize(0..=len);
                let num = INTERESTING_NUMBERS[rng.usize(0..INTERESTING_NUMBERS.len())];
                data.splice(at..at, num.bytes());
            } else {
                let mut at = starts[rng.usize(0..starts.len())];
                let mut end = at;
                while end < len && data[end].is_ascii_digit() {
                    end += 1;
                }
                if at > 0 && data[at - 1] == b'-' {
                    at -= 1;
                }
                let num = INTERESTING_NUMBERS[rng.usize(0..INTERESTING_NUMBERS.len())];
                data.splice(at..end, num.bytes());
            }
        }
        // Interesting little-endian integer (length fields), inserted or written.
        12 => {
            let v = INTERESTING_U64[rng.usize(0..INTERESTING_U64.len())];
            let width = [1usize, 2, 4, 8][rng.usize(0..4)];
            let v = if rng.bool() {
                v
            } else {
                v.swap_bytes() >> (64 - 8 * width as u32)
            };
            let bytes = &v.to_le_bytes()[..width];
            let at = rng.usize(0..=len);
            if rng.bool() || at + width > len {
                data.splice(at..at, bytes.iter().copied());
            } else {
                data[at..at + width].copy_from_slice(bytes);
            }
        }
        // Dictionary token: insert. Also the fallback of the guarded arms above.
        _ => {
            if dict.is_empty() {
                let at = rng.usize(0..=len);
                data.insert(at, INTERESTING_BYTES[rng.usize(0..INTERESTING_BYTES.len())]);
            } else {
                let tok = &dict[rng.usize(0..dict.len())];
                let at = rng.usize(0..=len);
                data.splice(at..at, tok.iter().copied());
            }
        }
    }
    data.truncate(max_len);
}

/// The input pools one run draws from.
struct Pools {
    seeds: Vec<Vec<u8>>,
    finds: Vec<Vec<u8>>,
    recent: Vec<Vec<u8>>,
    next_recent: usize,
}

impl Pools {
    fn pick<'a>(&'a self, rng: &mut fastrand::Rng) -> &'a [u8] {
        let roll = rng.u8(0..10);
        let pool = if roll < 4 && !self.seeds.is_empty() {
            &self.seeds
        } else if roll < 8 && !self.finds.is_empty() {
            &self.finds
        } else if !self.recent.is_empty() {
            &self.recent
        } else if !self.seeds.is_empty() {
            &self.seeds
        } else {
            return &[];
        };
        &pool[rng.usize(0..pool.len())]
    }

    fn remember(&mut self, input: &[u8]) {
        if self.recent.len() < RECENT {
            self.recent.push(input.to_vec());
        } else {
            self.recent[self.next_recent].clear();
            self.recent[self.next_recent].extend_from_slice(input);
            self.next_recent = (self.next_recent + 1) % RECENT;
        }
    }

    fn keep(&mut self, rng: &mut fastrand::Rng, input: &[u8]) {
        if self.finds.len() < MAX_FINDS {
            self.finds.push(input.to_vec());
        } else {
            let i = rng.usize(0..MAX_FINDS);
            self.finds[i] = input.to_vec();
        }
    }
}

/// The per-target RNG seed: the run seed mixed with the target's name, so targets
/// get different streams from one printed seed.
pub fn target_seed(seed: u64, target: &str) -> u64 {
    seed ^ fnv1a64(target.as_bytes())
}

/// Fuzzes `target` from `seeds` until `opts.limit`.
pub fn fuzz(target: &Target, seeds: &[Vec<u8>], opts: &Options) -> Report {
    let watch = Arc::new(Watch {
        started: AtomicU64::new(0),
        input: Mutex::new(Vec::new()),
        executions: AtomicU64::new(0),
        done: AtomicBool::new(false),
        origin: Instant::now(),
        seed: opts.seed,
        seeds: seeds.len(),
    });
    spawn_watchdog(
        target.name,
        watch.clone(),
        (opts.timeout * 10).max(Duration::from_secs(10)),
        opts.artifacts.clone(),
    );
    let report = on_fuzz_thread(target.name, || fuzz_loop(target, seeds, opts, &watch));
    watch.done.store(true, Ordering::Release);
    report
}

fn fuzz_loop(target: &Target, seeds: &[Vec<u8>], opts: &Options, watch: &Watch) -> Report {
    let start = Instant::now();
    let mut rng = fastrand::Rng::with_seed(target_seed(opts.seed, target.name));
    let dict = (target.dictionary)();
    let mut pools = Pools {
        seeds: seeds
            .iter()
            .map(|s| s[..s.len().min(opts.max_len)].to_vec())
            .collect(),
        finds: Vec::new(),
        recent: Vec::new(),
        next_recent: 0,
    };
    let mut signals: HashSet<u64> = HashSet::new();
    let mut failures: HashMap<String, Failure> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut executions: u64 = 0;
    let mut slowest = Duration::ZERO;
    let mut slowest_input: Vec<u8> = Vec::new();
    let mut input: Vec<u8> = Vec::new();
    let mut seed_index = 0;

    loop {
        let more = match opts.limit {
            Limit::Executions(n) => executions < n,
            // Seeds always run, whatever the deadline.
            Limit::Time(d) => seed_index < pools.seeds.len() || start.elapsed() < d,
        };
        if !more {
            break;
        }
        input.clear();
        if seed_index < pools.seeds.len() {
            input.extend_from_slice(&pools.seeds[seed_index]);
            seed_index += 1;
        } else {
            input.extend_from_slice(pools.pick(&mut rng));
            let stack = 1 << rng.u32(0..4);
            for _ in 0..stack {
                let other = pools.pick(&mut rng).to_vec();
                mutate_once(&mut rng, &mut input, &dict, &other, opts.max_len);
            }
        }

        watch.begin(&input, executions);
        let t0 = Instant::now();
        let outcome = execute(target, &input);
        let took = t0.elapsed();
        watch.end();
        executions += 1;
        if took > slowest {
            slowest = took;
            slowest_input.clone_from(&input);
        }

        let failure = match outcome {
            Exec::Ok(_) if took > opts.timeout => Some(Failure {
                kind: FailureKind::Hang,
                message: format!(
                    "one execution took {} ms (limit {} ms)",
                    took.as_millis(),
                    opts.timeout.as_millis()
                ),
                location: None,
                backtrace: None,
                input: input.clone(),
                artifact: None,
            }),
            Exec::Ok(signal) => {
                if signals.insert(signal) {
                    pools.keep(&mut rng, &input);
                }
                None
            }
            Exec::Panic(c) => Some(Failure {
                kind: FailureKind::Panic,
                message: c.message,
                location: c.location,
                backtrace: c.backtrace,
                input: input.clone(),
                artifact: None,
            }),
        };
        pools.remember(&input);
        if let Some(mut f) = failure {
            let key = f.key();
            // Keep the shortest input per location: the easiest to read.
            let better = failures
                .get(&key)
                .is_none_or(|old| f.input.len() < old.input.len());
            if better {
                let kind = if f.kind == FailureKind::Hang {
                    "hang"
                } else {
                    "crash"
                };
                if let Some(dir) = &opts.artifacts {
                    match write_artifact(dir, target.name, kind, &f.input) {
                        Ok(p) => f.artifact = Some(p),
                        Err(e) => eprintln!("chime-fuzz: cannot write the failing input: {e}"),
                    }
                }
                if !failures.contains_key(&key) {
                    order.push(key.clone());
                }
                failures.insert(key, f);
            }
            if !opts.keep_going {
                break;
            }
        }
    }

    Report {
        target: target.name,
        seed: opts.seed,
        seconds: start.elapsed().as_secs_f64(),
        executions,
        seeds: pools.seeds.len(),
        outcomes: signals.len(),
        slowest_ms: slowest.as_secs_f64() * 1000.0,
        slowest_input,
        failures: order
            .into_iter()
            .filter_map(|k| failures.remove(&k))
            .collect(),
    }
}

/// Runs `target` once on `input` (on a fuzzing thread, capturing a panic with its
/// backtrace): `Ok(signal)` when it returned within `timeout`.
pub fn replay(target: &Target, input: &[u8], timeout: Duration) -> Result<u64, Box<Failure>> {
    on_fuzz_thread(target.name, || {
        WANT_BACKTRACE.with(|w| w.set(true));
        let t0 = Instant::now();
        let out = execute(target, input);
        let took = t0.elapsed();
        WANT_BACKTRACE.with(|w| w.set(false));
        match out {
            Exec::Ok(_) if took > timeout => Err(Box::new(Failure {
                kind: FailureKind::Hang,
                message: format!("took {} ms", took.as_millis()),
                location: None,
                backtrace: None,
                input: input.to_vec(),
                artifact: None,
            })),
            Exec::Ok(s) => Ok(s),
            Exec::Panic(c) => Err(Box::new(Failure {
                kind: FailureKind::Panic,
                message: c.message,
                location: c.location,
                backtrace: c.backtrace,
                input: input.to_vec(),
                artifact: None,
            })),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_bounded_and_deterministic() {
        let dict = vec![b"tok".to_vec(), vec![0xff; 10]];
        let run = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut data = b"0 0 2 * * *".to_vec();
            let mut seen = Vec::new();
            for _ in 0..5_000 {
                mutate_once(&mut rng, &mut data, &dict, b"other input 123", 32);
                assert!(data.len() <= 32);
                seen.push(data.clone());
            }
            seen
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn escape_cuts_long_inputs() {
        assert_eq!(escape(b"a\x00", 10), "a\\x00");
        assert!(escape(&[b'x'; 20], 4).ends_with("(20 bytes)"));
    }
}
