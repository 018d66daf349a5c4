//! What the modes beyond co-located add (DESIGN.md "Modes"): [`centralized`] elects the one
//! proxy that serves (a lease in etcd through [`etcd`], or a peer watch), and the router
//! switches strictly there; [`pooled`] shares the members' health across a pool of active
//! proxies, so they agree on the active member.

pub mod centralized;
pub mod etcd;
pub mod pooled;
