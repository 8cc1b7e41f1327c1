//! Interlock's wire types and gRPC stubs, generated from `proto/interlock/v1`.
//!
//! Nothing else lives here: core types are converted from these at the gRPC boundary
//! (`TryFrom<proto::X>`), never used as domain types.

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
