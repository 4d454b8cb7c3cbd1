//! x86_64 boot: memory layout, boot protocol structures, CPUID, registers and the MP table.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
