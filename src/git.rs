//! The git proxy: smart-HTTP routes, scoped credentials swapped for the real token, one-branch pushes.

pub mod pktline;
pub mod push;
