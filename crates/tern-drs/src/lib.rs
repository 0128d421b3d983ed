//! tern-drs
