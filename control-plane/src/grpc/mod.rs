//! The gRPC layer: translates between the `weft.*.v1` protobuf contract and the
//! transport-free model/index. No policy decisions are made here.

pub mod destination;
pub mod identity;
pub mod inbound;
