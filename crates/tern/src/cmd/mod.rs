//! One module per command group; each parses its arguments and prints, nothing more.

pub mod cluster;
pub mod connect;
pub mod datastore;
pub mod drs;
pub mod evc;
pub mod event;
pub mod host;
pub mod image;
pub mod install;
pub mod lab;
pub mod migrate;
pub mod output;
pub mod pool;
pub mod rule;
pub mod task;
pub mod token;
pub mod trust;
pub mod ui;
pub mod vm;
