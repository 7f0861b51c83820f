//! Shared helpers for the Surety benchmarks.
