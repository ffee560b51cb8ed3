//! What the benchmark binaries share: process helpers (nginx, wrk, CPU and
//! memory of a process) and a blocking HTTP probe.

pub mod probe;
pub mod procs;
