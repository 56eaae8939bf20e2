//! What the main stream carries besides RAM.

/// What the main stream carries besides RAM: a header and configuration
/// made up for a destination machine type, or the bytes recorded from a
/// QEMU source (a snapshot's prefix and tail), replayed verbatim.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    /// Verbatim bytes up to the `ram` START section (file header,
    /// configuration, ...), as recorded from a QEMU source. `None`: write a
    /// header and a configuration section naming [`StreamPlan::machine`].
    pub prefix: Option<Vec<u8>>,
    /// QEMU machine type the destination runs (`none`, `pc-q35-10.0`, ...).
    pub machine: String,
    /// Section id of the `ram` section.
    pub ram_section_id: u32,
    /// Send the SWITCHOVER_START command before the `ram` END section
    /// (QEMU 10.0 machine types do; 9.2 and older do not).
    pub switchover_start: bool,
    /// Verbatim bytes after the `ram` END section: device state sections,
    /// EOF and vmdesc. `None`: the device state from
    /// [`SourceVm::device_state`](super::SourceVm::device_state), EOF and a
    /// vmdesc describing no devices.
    pub tail: Option<Vec<u8>>,
}

impl Default for StreamPlan {
    fn default() -> Self {
        Self {
            prefix: None,
            machine: "none".into(),
            ram_section_id: 1,
            switchover_start: true,
            tail: None,
        }
    }
}
