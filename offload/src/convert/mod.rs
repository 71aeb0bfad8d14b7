//! Conversions between this crate's domain types and their protobuf form
//! (`zeroshard.v1`), in one place: the only module of the crate that names
//! generated types. Messages coming in are validated.
mod plan;
mod request;
mod shards;

pub use request::generation_params;
pub use shards::fetch_ranges;
