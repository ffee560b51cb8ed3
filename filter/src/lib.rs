//! prealloc routing filter (skeleton; see issue 2).
