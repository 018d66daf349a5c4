//! The `it` integration-test binary: shared fixtures in `support`, one module per area.

mod support;
mod support_selftest;
