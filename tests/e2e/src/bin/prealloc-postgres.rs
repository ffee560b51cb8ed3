//! A throwaway PostgreSQL server for a test run: starts one (`postgres.rs`),
//! prints its URL on stdout, and stops and removes it when stdin closes.
//!
//! `cargo xtask test` runs the control plane's suite on PostgreSQL through it:
//! the suite's tests each create a database of their own on this server.

use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let pg = match prealloc_e2e::postgres::Postgres::start() {
        Ok(pg) => pg,
        Err(e) => {
            eprintln!("prealloc-postgres: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", pg.url());
    let _ = std::io::stdout().flush();
    // Until whoever started us is done (or gone).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(pg);
    ExitCode::SUCCESS
}
