//! The "device state" of the VM as opaque bytes: what a migration carries
//! besides RAM.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! magic   8 bytes  "MFDVMST1"
//! section*         tag: 4 ASCII bytes, len: u32, payload: len bytes
//! ```
//!
//! | tag    | payload |
//! |--------|---------|
//! | `REGS` | `struct kvm_regs`, the kernel uapi layout (x86-64) |
//! | `SREG` | `struct kvm_sregs` |
//! | `FPU ` | `struct kvm_fpu`, written field by field in uapi order (416 bytes) |
//! | `XCRS` | `struct kvm_xcrs` |
//! | `DREG` | `struct kvm_debugregs` |
//! | `EVNT` | `struct kvm_vcpu_events` |
//! | `MPST` | `struct kvm_mp_state` |
//! | `MSRS` | n × `struct kvm_msr_entry` (index u32, reserved u32, data u64) |
//! | `LAPC` | `struct kvm_lapic_state` (only with an in-kernel irqchip) |
//! | `SERL` | u64: serial markers seen so far (the VMM's one device) |
//!
//! The uapi structures are a stable kernel ABI, so a state saved by one
//! x86-64 host restores on another. Unknown tags are refused.

use anyhow::{Context, Result, bail, ensure};
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs,
};
use zerocopy::{FromBytes, IntoBytes};

const MAGIC: &[u8; 8] = b"MFDVMST1";

/// Everything of one vCPU the guest can observe, plus the VMM's counters.
#[derive(Debug, Clone, Default)]
pub struct VmState {
    /// General-purpose registers, rip, rflags.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMI, interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Runnable / halted / waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Model-specific registers (see `vm::SAVED_MSRS`).
    pub msrs: Vec<kvm_msr_entry>,
    /// Local APIC registers, when the VM has an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// Serial markers counted so far.
    pub markers: u64,
}

fn section(out: &mut Vec<u8>, tag: &[u8; 4], payload: &[u8]) {
    out.extend_from_slice(tag);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(416);
    for r in &f.fpr {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.push(f.ftwx);
    b.push(f.pad1);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    for r in &f.xmm {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b.extend_from_slice(&f.pad2.to_le_bytes());
    debug_assert_eq!(b.len(), 416);
    b
}

fn fpu_from(b: &[u8]) -> Result<kvm_fpu> {
    ensure!(
        b.len() == 416,
        "FPU section of {} bytes, expected 416",
        b.len()
    );
    let mut f = kvm_fpu::default();
    let mut at = 0;
    let mut take = |n: usize| {
        let s = &b[at..at + n];
        at += n;
        s
    };
    for r in &mut f.fpr {
        r.copy_from_slice(take(16));
    }
    f.fcw = u16::from_le_bytes(take(2).try_into()?);
    f.fsw = u16::from_le_bytes(take(2).try_into()?);
    f.ftwx = take(1)[0];
    f.pad1 = take(1)[0];
    f.last_opcode = u16::from_le_bytes(take(2).try_into()?);
    f.last_ip = u64::from_le_bytes(take(8).try_into()?);
    f.last_dp = u64::from_le_bytes(take(8).try_into()?);
    for r in &mut f.xmm {
        r.copy_from_slice(take(16));
    }
    f.mxcsr = u32::from_le_bytes(take(4).try_into()?);
    f.pad2 = u32::from_le_bytes(take(4).try_into()?);
    Ok(f)
}

fn read_struct<T: FromBytes>(tag: &str, b: &[u8]) -> Result<T> {
    T::read_from_bytes(b).map_err(|_| {
        anyhow::anyhow!(
            "{tag} section of {} bytes, expected {}",
            b.len(),
            std::mem::size_of::<T>()
        )
    })
}

impl VmState {
    /// Encodes the state (layout in the module documentation).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        section(&mut out, b"REGS", self.regs.as_bytes());
        section(&mut out, b"SREG", self.sregs.as_bytes());
        section(&mut out, b"FPU ", &fpu_bytes(&self.fpu));
        section(&mut out, b"XCRS", self.xcrs.as_bytes());
        section(&mut out, b"DREG", self.debugregs.as_bytes());
        section(&mut out, b"EVNT", self.events.as_bytes());
        section(&mut out, b"MPST", self.mp_state.as_bytes());
        section(&mut out, b"MSRS", self.msrs.as_slice().as_bytes());
        if let Some(lapic) = &self.lapic {
            section(&mut out, b"LAPC", lapic.as_bytes());
        }
        section(&mut out, b"SERL", &self.markers.to_le_bytes());
        out
    }

    /// Decodes a state written by [`VmState::to_bytes`]. Every section but
    /// `LAPC` is required.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        ensure!(
            b.len() >= 8 && &b[..8] == MAGIC,
            "not a VM state (bad magic)"
        );
        let mut s = VmState::default();
        let mut seen = Vec::new();
        let mut rest = &b[8..];
        while !rest.is_empty() {
            ensure!(rest.len() >= 8, "truncated section header");
            let tag: [u8; 4] = rest[..4].try_into()?;
            let len = u32::from_le_bytes(rest[4..8].try_into()?) as usize;
            ensure!(rest.len() >= 8 + len, "truncated {tag:?} section");
            let p = &rest[8..8 + len];
            rest = &rest[8 + len..];
            let name = String::from_utf8_lossy(&tag).into_owned();
            ensure!(!seen.contains(&tag), "section {name} twice");
            seen.push(tag);
            match &tag {
                b"REGS" => s.regs = read_struct(&name, p)?,
                b"SREG" => s.sregs = read_struct(&name, p)?,
                b"FPU " => s.fpu = fpu_from(p)?,
                b"XCRS" => s.xcrs = read_struct(&name, p)?,
                b"DREG" => s.debugregs = read_struct(&name, p)?,
                b"EVNT" => s.events = read_struct(&name, p)?,
                b"MPST" => s.mp_state = read_struct(&name, p)?,
                b"MSRS" => {
                    let size = std::mem::size_of::<kvm_msr_entry>();
                    ensure!(
                        p.len().is_multiple_of(size),
                        "MSRS section of {} bytes",
                        p.len()
                    );
                    // Entry by entry: the payload need not be 8-aligned.
                    s.msrs = p
                        .chunks(size)
                        .map(|c| read_struct(&name, c))
                        .collect::<Result<_>>()?;
                }
                b"LAPC" => s.lapic = Some(read_struct(&name, p)?),
                b"SERL" => {
                    s.markers = u64::from_le_bytes(p.try_into().context("SERL section")?);
                }
                _ => bail!("unknown section {name:?}"),
            }
        }
        for need in [
            b"REGS", b"SREG", b"FPU ", b"XCRS", b"DREG", b"EVNT", b"MPST", b"MSRS", b"SERL",
        ] {
            ensure!(
                seen.contains(need),
                "section {} missing",
                String::from_utf8_lossy(need)
            );
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut s = VmState::default();
        s.regs.rip = 0x7c42;
        s.regs.rax = 0xdead_beef;
        s.sregs.cr0 = 0x11;
        s.sregs.cs.selector = 8;
        s.fpu.fcw = 0x37f;
        s.fpu.mxcsr = 0x1f80;
        s.fpu.xmm[3][5] = 9;
        s.fpu.last_ip = 0x1234_5678_9abc;
        s.msrs = vec![kvm_msr_entry {
            index: 0x10,
            data: 42,
            ..Default::default()
        }];
        s.markers = 77;
        let b = s.to_bytes();
        let t = VmState::from_bytes(&b).unwrap();
        assert_eq!(t.regs, s.regs);
        assert_eq!(t.sregs, s.sregs);
        assert_eq!(t.fpu, s.fpu);
        assert_eq!(t.msrs, s.msrs);
        assert_eq!(t.markers, 77);
        assert!(t.lapic.is_none());
        assert_eq!(t.to_bytes(), b);
    }

    #[test]
    fn refuses_damage() {
        let b = VmState::default().to_bytes();
        assert!(VmState::from_bytes(&b[..b.len() - 1]).is_err());
        assert!(VmState::from_bytes(b"MFDVMST0").is_err());
        let mut extra = b.clone();
        section(&mut extra, b"XXXX", &[]);
        assert!(VmState::from_bytes(&extra).is_err());
        let mut dup = b.clone();
        section(&mut dup, b"SERL", &0u64.to_le_bytes());
        assert!(VmState::from_bytes(&dup).is_err());
    }
}
