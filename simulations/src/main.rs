//! `shoal-sim run SCENARIO [--nodes N] [--seed S] [--json]`: see the crate's README.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use shoal_simulations::{run, validate, Params, SCENARIOS};

#[derive(Parser)]
#[command(name = "shoal-sim", about = "Deterministic simulator of a Shoal swarm")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a scenario: kraken, cold-start, churn, sites or poisoned.
    Run {
        /// The scenario.
        scenario: String,
        /// Number of nodes (default: the scenario's).
        #[arg(long)]
        nodes: Option<usize>,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the result as one JSON object on the last line.
        #[arg(long)]
        json: bool,
        /// Chunk size of peer transfers in bytes, the daemon's `--chunk-size` (default 4 MiB, a
        /// multiple of 64; smaller blobs get smaller chunks, as in the daemon). Unset above
        /// 20,000 nodes: 16 MiB for every blob.
        #[arg(long)]
        chunk_size: Option<u32>,
        /// Designated seeders per blob (default 1).
        #[arg(long)]
        seeders: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            // clap's message on one line: the first line, and the indented ones that continue
            // it (the names of missing arguments).
            let text = e.to_string();
            let mut lines = text.lines().filter(|l| !l.trim().is_empty());
            let first = lines.next().unwrap_or("bad arguments");
            let mut line = first.strip_prefix("error: ").unwrap_or(first).to_string();
            if line.ends_with(':') {
                for more in lines.take_while(|l| l.starts_with(' ')) {
                    line.push(' ');
                    line.push_str(more.trim());
                }
            }
            eprintln!("shoal-sim: {line}");
            return ExitCode::from(2);
        }
    };
    let Command::Run {
        scenario,
        nodes,
        seed,
        json,
        chunk_size,
        seeders,
    } = cli.command;
    let Some(mut params) = Params::scenario(&scenario) else {
        eprintln!(
            "shoal-sim: unknown scenario '{scenario}' (one of: {})",
            SCENARIOS.join(", ")
        );
        return ExitCode::from(2);
    };
    if let Some(n) = nodes {
        params.nodes = n;
    }
    match chunk_size {
        Some(c) => params.chunk_size = c,
        None => params.auto_chunk_size(),
    }
    if let Some(s) = seeders {
        params.seeders = s;
    }
    params.seed = seed;
    if let Some(spec) = std::env::var_os("SHOAL_SIM_TUNE") {
        if let Err(e) = params.tune(&spec.to_string_lossy()) {
            eprintln!("shoal-sim: SHOAL_SIM_TUNE: {e}");
            return ExitCode::from(2);
        }
    }
    if let Err(e) = validate(&params) {
        eprintln!("shoal-sim: {e}");
        return ExitCode::from(2);
    }
    let report = run(params);
    if json {
        match serde_json::to_string(&report) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("shoal-sim: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!("{}", report.summary());
    }
    ExitCode::SUCCESS
}
