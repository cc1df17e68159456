//! Shoal's wire types and pure decision logic.
//!
//! Goal: everything that can be decided without a socket or a clock lives here, so that it can be
//! tested exhaustively (property tests, fuzz targets) and driven by the simulator. Non-goal: any
//! I/O. Nothing in this crate reads the time, opens a file or spawns a task.

pub mod auth;
pub mod chunk;
pub mod digest;
pub mod error;
pub mod media;
pub mod range;
pub mod reference;
pub mod route;
pub mod serve;
pub mod swarm;
pub mod wire;

pub use digest::{Digest, DigestError};
pub use error::{ErrorCode, OciError};
pub use range::{ByteRange, RangeError};
pub use reference::{Name, Reference};
pub use route::{Route, RouteError};
