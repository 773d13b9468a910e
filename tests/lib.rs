//! katalite's end-to-end tests (`e2e.rs`, feature `e2e`) and the lab half of its bench
//! (`bench_runner.rs`, feature `bench`). Both are static programs that run inside the lab
//! (`cargo xtask lab e2e`, `cargo xtask bench`) and drive the `katalite` on `PATH`; this
//! library is empty because cargo wants a package to have one.
