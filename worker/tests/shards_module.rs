//! Builds and runs the unit tests of `src/shards/` and `src/convert.rs` until
//! `worker/src/lib.rs` declares `pub mod shards; pub mod convert;` (then delete
//! this file).
#[allow(dead_code, unused_imports)]
#[path = "../src/shards/mod.rs"]
mod shards;

#[allow(dead_code)]
#[path = "../src/convert.rs"]
mod convert;
