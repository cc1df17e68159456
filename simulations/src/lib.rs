//! `shoal-sim`: a deterministic discrete-event simulator of a Shoal swarm.
//!
//! Goal: measure the swarm protocol (`shoal_protocol::swarm`) at up to 100,000 nodes by driving
//! its real state machines ([`Download`](shoal_protocol::swarm::Download),
//! [`SeedPlan`](shoal_protocol::swarm::SeedPlan),
//! [`designated_seeders`](shoal_protocol::swarm::designated_seeders)) with simulated time, a
//! flow-level network model, a DHT with latency and a rate-limited upstream registry. Non-goal:
//! packet-level fidelity (see `README.md` for the model and its approximations).
//!
//! Deterministic: one seeded generator, ordered containers only, and an event queue ordered by
//! (time, sequence number); the sha256 of the event log ([`Report::log_hash`]) identifies a run.

pub mod queue;
pub mod rng;
pub mod scenario;
pub mod sim;

pub use scenario::{Params, SCENARIOS};
pub use sim::{Report, Sim};

/// Runs a scenario with these parameters.
pub fn run(params: Params) -> Report {
    Sim::new(params).run()
}

/// Checks parameters a user can set; an error names the problem in one line.
pub fn validate(p: &Params) -> Result<(), String> {
    if p.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    if p.nodes > 10_000_000 {
        return Err("--nodes must be at most 10000000".into());
    }
    for &b in &p.blobs {
        shoal_protocol::chunk::ChunkLayout::new(b, p.chunk_size_of(b))
            .map_err(|e| format!("bad chunk size {}: {e}", p.chunk_size))?;
    }
    if p.seeders == 0 {
        return Err("--seeders must be at least 1".into());
    }
    if p.rtt_jitter_percent > 100 {
        return Err(format!(
            "rtt_jitter_percent must be at most 100 (a round trip cannot go below zero), not {}",
            p.rtt_jitter_percent
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
