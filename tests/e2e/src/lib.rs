//! end-to-end harness (skeleton).
