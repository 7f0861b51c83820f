//! Test support for Surety: transport conformance suite and fault injection.
