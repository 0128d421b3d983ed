//! tern-guest: the program inside tern's test guests, and its client.
//!
//! In the guest (PID 1 of the initramfs, see [`init`]) it fills and verifies memory at a set
//! dirty rate ([`mem`]), appends and verifies a disk journal ([`disk`]), burns CPU ([`burn`]) and
//! serves a TCP stream of sequence-numbered records ([`serve`], protocol in [`proto`]) and
//! answers numbered requests ([`rr`]). On the
//! host side, [`client`] reads that stream and reports gaps, resets, losses and duplicates; it
//! also fetches the guest's stats (the JSON object documented on
//! [`services::Services::stats_json`]); [`arp`] asks for a guest's address as a client without
//! an ARP entry for it does, and times the answers.

pub mod arp;
pub mod burn;
pub mod client;
pub mod disk;
pub mod init;
pub mod json;
pub mod mem;
pub mod proto;
pub mod rr;
pub mod serve;
pub mod services;
