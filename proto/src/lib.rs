//! zeroshard's wire protocol: the `.proto` files of the `zeroshard.v1` services
//! (client → coordinator `Inference`, coordinator → worker `Worker`, worker ↔ worker
//! `Shards`) and their generated tonic/prost code. Filled by the cluster work.
