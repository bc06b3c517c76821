//! The gRPC contract between proxies and the control plane (`weft.*.v1`), generated at build time.

pub mod identity {
    //! `weft.identity.v1`: certificate issuance.
    tonic::include_proto!("weft.identity.v1");
}

pub mod destination {
    //! `weft.destination.v1`: outbound discovery.
    tonic::include_proto!("weft.destination.v1");
}

pub mod inbound {
    //! `weft.inbound.v1`: inbound authorization policy.
    tonic::include_proto!("weft.inbound.v1");
}
