//! prealloc control plane (skeleton; see issue 3).
