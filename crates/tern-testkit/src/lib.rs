//! Test support shared by tern's crates (dev-dependency only): waiting on conditions
//! ([`wait`]), throwaway network namespaces ([`netns`]), the repository and its guest
//! artifacts ([`paths`]), a newc cpio writer for tiny initramfs images ([`cpio`]) and common
//! fixtures ([`fixtures`]). Tests observe state through these stable handles rather than
//! fixed sleeps.

pub mod cpio;
pub mod fixtures;
pub mod netns;
pub mod paths;
pub mod wait;

pub use netns::NetNs;
pub use paths::repo_root;
pub use wait::{poll_until, wait_for, wait_until};
