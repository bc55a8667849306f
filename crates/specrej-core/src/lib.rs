#![forbid(unsafe_code)]
//! Best-of-N and Speculative Rejection (Sun et al., NeurIPS 2024) over a small backend trait.

pub mod backend;
mod block_on;
pub mod likelihood;
pub mod replay;
mod require;
pub mod sampling;

pub use backend::{BackendError, Decoder, KvLayout, Response, Sampling, Scored, Scorer};
pub use block_on::block_on_ready;
pub use require::{gpu_missing, gpu_required, skipped};
pub mod scheduler;
pub mod select;
#[cfg(feature = "testing")]
pub mod testing;

pub use scheduler::{
    Candidate, Decision, Error, Event, Finish, MAX_ROWS, Method, Options, Outcome, Rejected, Rules,
    Stats, generate, validate,
};
