//! `chime-fuzz`: runs the fuzz targets for a bounded time and prints one JSON line
//! per target; exits non-zero when any target panicked or hung.
//!
//! ```text
//! chime-fuzz [--seconds N] [--seed N] [--keep-going] [--timeout-ms N] [--max-len N]
//!            [--corpus DIR] [--artifacts DIR] [target...]
//! chime-fuzz --replay <file> <target>
//! chime-fuzz --write-seeds [--corpus DIR]
//! chime-fuzz --list
//! ```
//!
//! Arguments are parsed by hand: six flags do not justify a parser dependency in a
//! crate every CI build compiles.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chime_fuzz::engine::{self, Limit, Options};
use chime_fuzz::{TARGETS, Target};

const USAGE: &str = "\
usage: chime-fuzz [--seconds N] [--seed N] [--keep-going] [--timeout-ms N] [--max-len N]
                  [--corpus DIR] [--artifacts DIR] [target...]
       chime-fuzz --replay <file> <target>
       chime-fuzz --write-seeds [--corpus DIR]
       chime-fuzz --list

Fuzzes each target (default: all) for --seconds (default 60) from its seed corpus
(default fuzz/corpus/<target>/) and prints one JSON line per target. A panic or an
execution slower than --timeout-ms (default 1000) is a crash: the input is written to
<artifacts>/<target>/crash-<hash> (default fuzz/artifacts/) and the exit code is 1.
--seed makes a run replayable (a random seed is drawn and printed otherwise);
--keep-going records one crash per panic location instead of stopping at the first.
Each target runs in a child process (--child runs in this one), so a hang or an
abort in one target still leaves its report line and the others still run.";

struct Args {
    seconds: u64,
    seed: Option<u64>,
    keep_going: bool,
    timeout_ms: u64,
    max_len: usize,
    corpus: PathBuf,
    artifacts: PathBuf,
    targets: Vec<&'static Target>,
    replay: Option<PathBuf>,
    write_seeds: bool,
    list: bool,
    child: bool,
}

fn number<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
    v.as_deref()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{flag} needs a number"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        seconds: 60,
        seed: None,
        keep_going: false,
        timeout_ms: 1_000,
        max_len: engine::DEFAULT_MAX_LEN,
        corpus: chime_fuzz::corpus_root(),
        artifacts: chime_fuzz::artifacts_root(),
        targets: Vec::new(),
        replay: None,
        write_seeds: false,
        list: false,
        child: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => a.seconds = number(&arg, it.next())?,
            "--seed" => a.seed = Some(number(&arg, it.next())?),
            "--timeout-ms" => a.timeout_ms = number(&arg, it.next())?,
            "--max-len" => a.max_len = number(&arg, it.next())?,
            "--keep-going" => a.keep_going = true,
            "--corpus" => a.corpus = it.next().ok_or("--corpus needs a directory")?.into(),
            "--artifacts" => a.artifacts = it.next().ok_or("--artifacts needs a directory")?.into(),
            "--replay" => a.replay = Some(it.next().ok_or("--replay needs a file")?.into()),
            "--write-seeds" => a.write_seeds = true,
            "--list" => a.list = true,
            "--child" => a.child = true,
            "-h" | "--help" => return Err(String::new()),
            flag if flag.starts_with('-') => return Err(format!("unknown flag {flag}")),
            name => a.targets.push(chime_fuzz::target(name).ok_or_else(|| {
                let known: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
                format!("unknown target {name:?}; known: {}", known.join(", "))
            })?),
        }
    }
    if a.targets.is_empty() && a.replay.is_none() {
        a.targets = TARGETS.iter().collect();
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("chime-fuzz: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.list {
        for t in TARGETS {
            println!("{:<14} {}", t.name, t.about);
        }
        return ExitCode::SUCCESS;
    }
    if args.write_seeds {
        return match chime_fuzz::seeds::write(&args.corpus) {
            Ok(n) => {
                eprintln!(
                    "chime-fuzz: wrote {n} generated seeds under {}",
                    args.corpus.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chime-fuzz: cannot write seeds: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(file) = &args.replay {
        return replay(file, &args);
    }
    fuzz(&args)
}

fn replay(file: &PathBuf, args: &Args) -> ExitCode {
    let [target] = args.targets[..] else {
        eprintln!("chime-fuzz: --replay needs exactly one target");
        return ExitCode::from(2);
    };
    let input = match std::fs::read(file) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("chime-fuzz: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    println!(
        "input ({} bytes): {}",
        input.len(),
        engine::escape(&input, 4096)
    );
    match engine::replay(target, &input, Duration::from_millis(args.timeout_ms)) {
        Ok(_) => {
            println!("{}: no crash", target.name);
            ExitCode::SUCCESS
        }
        Err(f) => {
            println!("{}: {:?}: {}", target.name, f.kind, f.message);
            if let Some(l) = &f.location {
                println!("at {l}");
            }
            if let Some(b) = &f.backtrace {
                println!("{b}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs every target in a child process of its own (`--child`): a hang (which the
/// watchdog can only end by exiting) or an abort (a stack overflow) in one target
/// then still leaves a report line, and the other targets still run.
fn fuzz(args: &Args) -> ExitCode {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    if args.child {
        return fuzz_here(args, seed);
    }
    eprintln!("chime-fuzz: seed {seed} (replay this run with --seed {seed})");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("chime-fuzz: cannot find my own binary ({e}); running in process");
            return fuzz_here(args, seed);
        }
    };
    let mut failed = false;
    for target in &args.targets {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("--child")
            .args(["--seconds", &args.seconds.to_string()])
            .args(["--seed", &seed.to_string()])
            .args(["--timeout-ms", &args.timeout_ms.to_string()])
            .args(["--max-len", &args.max_len.to_string()])
            .arg("--corpus")
            .arg(&args.corpus)
            .arg("--artifacts")
            .arg(&args.artifacts);
        if args.keep_going {
            cmd.arg("--keep-going");
        }
        cmd.arg(target.name).stderr(std::process::Stdio::inherit());
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) => {
                eprintln!("chime-fuzz: cannot start {}: {e}", exe.display());
                return ExitCode::from(2);
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
        for l in &lines {
            println!("{l}");
        }
        if !out.status.success() {
            failed = true;
            if lines.is_empty() {
                // Died without a word: an abort (stack overflow, out of memory) or a
                // signal. Running with the same --seed replays the same inputs.
                println!(
                    "{}",
                    serde_json::json!({
                        "target": target.name,
                        "crashes": 1,
                        "failures": [{
                            "kind": "abort",
                            "message": format!("the fuzzing process died: {}", out.status),
                        }],
                        "seed": seed,
                    })
                );
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs the targets in this process, one after the other.
fn fuzz_here(args: &Args, seed: u64) -> ExitCode {
    let mut failed = false;
    for target in &args.targets {
        let dir = args.corpus.join(target.name);
        let seeds = match engine::load_corpus(&dir) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("chime-fuzz: cannot read {}: {e}", dir.display());
                return ExitCode::from(2);
            }
        };
        let opts = Options {
            seed,
            limit: Limit::Time(Duration::from_secs(args.seconds)),
            max_len: args.max_len,
            timeout: Duration::from_millis(args.timeout_ms),
            artifacts: Some(args.artifacts.clone()),
            keep_going: args.keep_going,
        };
        let report = engine::fuzz(target, &seeds, &opts);
        println!("{}", report.json());
        for f in &report.failures {
            failed = true;
            let saved = f
                .artifact
                .as_ref()
                .map_or("<file>".to_owned(), |p| p.display().to_string());
            eprintln!(
                "chime-fuzz: {}: {:?} at {}: {}\n  input: {}\n  replay: chime-fuzz --replay {saved} {}",
                target.name,
                f.kind,
                f.location.as_deref().unwrap_or("?"),
                f.message,
                engine::escape(&f.input, 256),
                target.name,
            );
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
