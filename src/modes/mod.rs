//! What the modes beyond co-located add (DESIGN.md "Modes"): [`centralized`] elects the one
//! proxy that serves (a lease in etcd through [`etcd`], or a peer watch), and the router
//! switches strictly there.

pub mod centralized;
pub mod etcd;
