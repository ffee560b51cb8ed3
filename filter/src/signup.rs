//! Sign-up through the filter (issue 4): pure request/response logic.
