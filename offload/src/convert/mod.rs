//! Conversions between this crate's domain types and their protobuf form
//! (`zeroshard.v1`), in one place: the only module of the crate that names
//! generated types. Messages coming in are validated.
mod digest;
mod plan;
mod request;
mod shards;

pub use digest::{digests_from_pb, digests_to_pb};
pub use request::generation_params;
pub use shards::fetch_ranges;
