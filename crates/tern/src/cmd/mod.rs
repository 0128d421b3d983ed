//! One module per command group; each parses its arguments and prints, nothing more.

pub mod drs;
