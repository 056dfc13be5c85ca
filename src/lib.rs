//! The `meshid` package: the workload side of the mesh and the small commands. The CLI
//! (`main.rs`) is a thin layer over these modules; end-to-end tests use them as a client would.

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod sidecar;
pub mod telemetry;
