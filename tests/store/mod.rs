//! The store conformance suite, run against the embedded store and a real etcd: the embedded
//! store is a product feature and must behave like etcd for everything the coordinator uses.

mod auth;
mod backends;
mod conformance;
