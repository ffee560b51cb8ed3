//! What the benchmark binaries share: process helpers (nginx, wrk, CPU and
//! memory of a process), a blocking HTTP probe, filling a control plane's
//! database, and summaries of measurements.

pub mod db;
pub mod probe;
pub mod procs;
pub mod stats;
