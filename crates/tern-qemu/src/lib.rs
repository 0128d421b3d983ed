//! tern-qemu
