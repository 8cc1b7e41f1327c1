//! Interlock's wire types and gRPC stubs, generated from `proto/interlock/v1`.
//!
//! Besides the generated code, only the channel's security lives here (`tls`: the files of a
//! mutual-TLS identity, shared by the agent and the CLI). Core types are converted from these
//! at the gRPC boundary (`TryFrom<proto::X>`), never used as domain types.

pub mod tls;

/// Version 1 of the API.
pub mod v1 {
    // Generated code follows tonic's style, not our workspace lints.
    #![allow(
        missing_debug_implementations,
        unused_qualifications,
        clippy::allow_attributes_without_reason,
        clippy::cast_possible_truncation,
        reason = "generated code"
    )]
    tonic::include_proto!("interlock.v1");
}
