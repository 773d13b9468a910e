//! The `katalite` command line.

fn main() {}
