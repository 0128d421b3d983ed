//! tern-cpu
