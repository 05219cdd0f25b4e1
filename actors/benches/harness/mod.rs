//! The harness of berth's micro-benchmarks: each benchmark is registered once
//! and runs in one of two modes.
//!
//! - **criterion** (the default): `cargo bench` measures time per iteration
//!   with criterion's statistics; `cargo test --benches` runs each routine
//!   once, as a test.
//! - **counting** (`BERTH_BENCH_ITERS=N`): each selected routine runs
//!   [`WARMUP`] times, then exactly `N` times, each in its own call of
//!   [`measured`], with no timer, no statistics and no other thread. Run
//!   under `valgrind --tool=callgrind --toggle-collect='*harness::measured*'`,
//!   the instructions collected are exactly those of the `N` routine runs
//!   (setup excluded), so instructions per iteration are repeatable on a
//!   shared machine where time is not. `scripts/bench-instructions.sh` does
//!   this; the first argument that is not a flag names the one benchmark to
//!   run (all run without one).
//!
//! Why not criterion's `--profile-time`: it runs for a time, not a count, so
//! the number of iterations would change with the machine's load.
//!
//! Shared by the benches of berth-actors and berth-cluster
//! (`cluster/benches/ring.rs` includes this file by path): one copy of the
//! rules the script relies on.

#![allow(dead_code)] // each bench binary uses its own part of the API

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion};

/// The variable that selects the counting mode, and its iterations.
pub const ITERS_VAR: &str = "BERTH_BENCH_ITERS";

/// Runs before the counted ones (not collected): first-use costs such as the
/// allocator growing its heap stay out of the count.
pub const WARMUP: u64 = 2;

/// The benchmarks of one bench binary.
pub struct Benches {
    mode: Mode,
}

enum Mode {
    Criterion(Box<Criterion>),
    Count {
        iters: u64,
        only: Option<String>,
        ran: Vec<String>,
    },
}

impl Benches {
    /// Counting when [`ITERS_VAR`] is set, criterion (configured from the
    /// command line) otherwise. Criterion's defaults are shortened (1 s
    /// warm-up, 3 s measurement) so a whole `cargo bench` stays in minutes on
    /// a 2-core machine; `--measurement-time` and `--warm-up-time` override them.
    pub fn from_env() -> Benches {
        let mode = match std::env::var(ITERS_VAR) {
            Ok(n) => Mode::Count {
                iters: n
                    .parse()
                    .unwrap_or_else(|_| panic!("{ITERS_VAR}={n:?} is not a count")),
                only: std::env::args().skip(1).find(|a| !a.starts_with('-')),
                ran: Vec::new(),
            },
            Err(_) => Mode::Criterion(Box::new(
                Criterion::default()
                    .warm_up_time(Duration::from_secs(1))
                    .measurement_time(Duration::from_secs(3))
                    .configure_from_args(),
            )),
        };
        Benches { mode }
    }

    /// Benchmark `name`: `routine` on a fresh `setup()` each iteration;
    /// setup, and dropping what the routine returns, are not measured.
    pub fn batched<I, O>(
        &mut self,
        name: &str,
        mut setup: impl FnMut() -> I,
        mut routine: impl FnMut(I) -> O,
    ) {
        match &mut self.mode {
            Mode::Criterion(c) => {
                c.bench_function(name, |b| {
                    b.iter_batched(&mut setup, &mut routine, BatchSize::SmallInput)
                });
            }
            Mode::Count { iters, only, ran } => {
                if only.as_deref().is_some_and(|only| only != name) {
                    return;
                }
                for _ in 0..WARMUP {
                    black_box(routine(black_box(setup())));
                }
                for _ in 0..*iters {
                    let input = setup();
                    let output = measured(&mut routine, input);
                    drop(output);
                }
                ran.push(name.to_owned());
            }
        }
    }

    /// Benchmark `name`: `routine`, with nothing to set up.
    pub fn iter<O>(&mut self, name: &str, mut routine: impl FnMut() -> O) {
        match &mut self.mode {
            Mode::Criterion(c) => {
                c.bench_function(name, |b| b.iter(&mut routine));
            }
            Mode::Count { .. } => self.batched(name, || (), |()| routine()),
        }
    }

    /// Criterion's summary; in counting mode, one line per benchmark run
    /// (`counted NAME N`), and a failure if the name matched none.
    pub fn finish(self) {
        match self.mode {
            Mode::Criterion(c) => c.final_summary(),
            Mode::Count { iters, only, ran } => {
                if ran.is_empty() {
                    eprintln!("no benchmark is named {only:?}");
                    std::process::exit(2);
                }
                for name in ran {
                    println!("counted {name} {iters}");
                }
            }
        }
    }
}

/// One counted run of a routine: the function callgrind's `--toggle-collect`
/// names. Never inlined, so it exists to be named; its input and output
/// pass through `black_box` so the work is not optimised away.
#[inline(never)]
pub fn measured<I, O>(routine: &mut impl FnMut(I) -> O, input: I) -> O {
    black_box(routine(black_box(input)))
}
