//! Fleet-level action tests (several real agents against one coordinator on real etcd).
