//! Who is in the cluster: the [`Membership`] trait and its etcd implementation
//! come from [`zeroshard_membership`] (shared with the worker's registrars);
//! [`embedded`] is the in-process one `zeroshard up` uses, fed by the
//! `Control` service.
pub mod embedded;

pub use zeroshard_membership::*;
