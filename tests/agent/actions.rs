//! The action loop end to end with real agents, a real coordinator on real etcd, real mounts and
//! processes.
