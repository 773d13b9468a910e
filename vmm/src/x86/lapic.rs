//! Local APIC wiring of the virtual-wire mode the MP spec (§3.6.2.2, and the MP table's
//! local interrupt entries) describes: LINT0 receives the 8259 PIC's ExtINT, LINT1 the NMI.

use kvm_bindings::kvm_lapic_state;

/// Offset of the LVT LINT0 register in the LAPIC page.
const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
const APIC_LVT1: usize = 0x360;
/// LVT delivery mode field, bits 8-10.
const DELIVERY_MODE_MASK: u32 = 0x700;
const DELIVERY_EXTINT: u32 = 0x7 << 8;
const DELIVERY_NMI: u32 = 0x4 << 8;

fn read_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (byte, reg) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *byte = reg.to_ne_bytes()[0];
    }
    u32::from_le_bytes(bytes)
}

fn write_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (reg, byte) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *reg = std::os::raw::c_char::from_ne_bytes([byte]);
    }
}

/// Sets LINT0 to ExtINT and LINT1 to NMI, keeping the other LVT bits (mask, trigger).
pub fn set_virtual_wire(lapic: &mut kvm_lapic_state) {
    for (offset, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let value = read_reg(lapic, offset);
        write_reg(lapic, offset, (value & !DELIVERY_MODE_MASK) | mode);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        // Reset value: masked, fixed delivery.
        write_reg(&mut lapic, APIC_LVT0, 0x0001_0000);
        write_reg(&mut lapic, APIC_LVT1, 0x0001_0300);
        write_reg(&mut lapic, 0x340, 0xdead_beef);
        set_virtual_wire(&mut lapic);
        assert_eq!(read_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(read_reg(&lapic, APIC_LVT1), 0x0001_0400);
        assert_eq!(read_reg(&lapic, 0x340), 0xdead_beef);
    }
}
