//! The one error type of the wire codecs.

/// Why a piece of wire data was rejected.
///
/// Every variant names the field that was wrong and carries the offending
/// value, so a log line says what the peer sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The input ended before the item did.
    #[error("truncated {what}: need {needed} bytes, have {available}")]
    Truncated {
        /// The item being decoded.
        what: &'static str,
        /// Bytes the item needs.
        needed: usize,
        /// Bytes that were available.
        available: usize,
    },
    /// A magic number did not match.
    #[error("bad {what} magic {found:#010x}, expected {expected:#010x}")]
    BadMagic {
        /// The item being decoded.
        what: &'static str,
        /// Magic found on the wire.
        found: u32,
        /// Magic this format requires.
        expected: u32,
    },
    /// A version number is not one we speak.
    #[error("unsupported {what} version {found}, expected {expected}")]
    BadVersion {
        /// The item being decoded.
        what: &'static str,
        /// Version found on the wire.
        found: u32,
        /// Version this format requires.
        expected: u32,
    },
    /// A field holds a value outside its allowed range.
    #[error("invalid {field}: {value} ({reason})")]
    InvalidField {
        /// Name of the field.
        field: &'static str,
        /// Value found on the wire.
        value: u64,
        /// What rule it broke.
        reason: &'static str,
    },
    /// Flag bits this implementation does not know or cannot accept here.
    #[error("unsupported flags {flags:#x} in {what}")]
    BadFlags {
        /// The item being decoded.
        what: &'static str,
        /// The flags word found on the wire.
        flags: u64,
    },
    /// A name field is not valid (not NUL-terminated, not UTF-8, empty).
    #[error("invalid name in {what}: {reason}")]
    BadName {
        /// The item being decoded.
        what: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The byte that starts a main-stream element is not one we know.
    #[error("unknown main-stream element type {0:#04x}")]
    UnknownElement(u8),
    /// A command number this implementation does not know.
    #[error("unknown or unsupported command {0}")]
    UnknownCommand(u16),

    // --- main migration stream ------------------------------------------
    /// The main stream announces a version QEMU itself refuses as obsolete
    /// (version 2 of the `QEVM` stream).
    #[error("obsolete {what} version {found}")]
    ObsoleteVersion {
        /// The item being decoded.
        what: &'static str,
        /// Version found on the wire.
        found: u32,
    },
    /// A known element type that is not allowed where it was found (a PART
    /// before the START, a vmdesc not right after EOF, bytes after the vmdesc…).
    #[error("unexpected main-stream element {element:#04x} {context}")]
    UnexpectedElement {
        /// The element type byte found.
        element: u8,
        /// Where the decoder was.
        context: &'static str,
    },
    /// A command QEMU defines but this implementation does not support in a
    /// precopy stream (postcopy, COLO, packaged streams…).
    #[error("unsupported command {command} ({name})")]
    UnsupportedCommand {
        /// Command number found on the wire.
        command: u16,
        /// QEMU's name for it.
        name: &'static str,
    },
    /// A live (iterable) section other than `"ram"` was started; its payload
    /// format is unknown to us.
    #[error("unsupported live section {idstr:?} instance {instance_id}")]
    UnsupportedSection {
        /// Section idstr (lossily decoded as UTF-8).
        idstr: String,
        /// Instance id of the section.
        instance_id: u32,
    },
    /// A PART or END section names a section id that was never started.
    #[error("unknown section id {section_id}")]
    UnknownSection {
        /// Section id found on the wire.
        section_id: u32,
    },
    /// The byte where a section footer must start is not `0x7E`.
    #[error("missing footer of section {section_id}: found byte {found:#04x}")]
    MissingFooter {
        /// The section whose footer was expected.
        section_id: u32,
        /// The byte found instead.
        found: u8,
    },
    /// A section footer names another section.
    #[error("section footer names section {found}, expected {expected}")]
    FooterMismatch {
        /// The section being read.
        expected: u32,
        /// Section id in the footer.
        found: u32,
    },
    /// A RAM record type that cannot appear in a multifd precopy stream.
    #[error("unsupported RAM record {name} (flags {flags:#x})")]
    UnsupportedRecord {
        /// QEMU's name of the record type.
        name: &'static str,
        /// The low (flag) bits of the record header.
        flags: u64,
    },
    /// A RAM record with CONTINUE before any record named a block.
    #[error("RAM record at offset {offset:#x} continues a block but none was named yet")]
    ContinueWithoutBlock {
        /// Offset field of the record.
        offset: u64,
    },
    /// A legacy ZERO record whose fill byte is not zero.
    #[error("zero-page record at offset {offset:#x} has fill byte {fill:#04x}")]
    NonZeroFill {
        /// Offset field of the record.
        offset: u64,
        /// The fill byte found.
        fill: u8,
    },
    /// The RAM block lengths of a MEM_SIZE record do not add up to its total.
    #[error("MEM_SIZE total {total:#x} but the listed blocks add up to {listed:#x}")]
    MemSizeMismatch {
        /// Total announced in the record header.
        total: u64,
        /// Sum of the lengths listed so far (past the total, or overflowed).
        listed: u64,
    },
    /// The same RAM block is listed twice in one MEM_SIZE record.
    #[error("RAM block {name:?} listed twice in MEM_SIZE")]
    DuplicateRamBlock {
        /// The block id.
        name: String,
    },
    /// A subsection of the configuration section this implementation does
    /// not know (QEMU fails on it too).
    #[error("unknown configuration subsection {name:?}")]
    UnknownSubsection {
        /// Subsection name (lossily decoded as UTF-8).
        name: String,
    },
    /// The same configuration subsection appears twice.
    #[error("configuration subsection {name:?} appears twice")]
    DuplicateSubsection {
        /// Subsection name.
        name: &'static str,
    },
    /// The configuration announced a capability that changes the RAM
    /// section layout in a way this implementation does not support.
    #[error("unsupported validated capability {name:?}")]
    UnsupportedCapability {
        /// Capability name.
        name: String,
    },
    /// The opaque device-state tail does not end with EOF, or EOF and a
    /// well-formed vmdesc.
    #[error("device-state tail: {reason}")]
    BadTail {
        /// What is wrong with its end.
        reason: &'static str,
    },
    /// The decoder was called again after it handed the rest of the stream
    /// to the caller as opaque device state.
    #[error("stream decoder called after the device-state tail began")]
    DecoderFinished,
    /// An encoder was asked for an item the stream grammar does not allow
    /// where the stream is (a record outside a ram section, a second EOF).
    #[error("cannot encode {item} {state}")]
    OutOfOrder {
        /// The item asked for.
        item: &'static str,
        /// Where the stream was.
        state: &'static str,
    },

    // --- mapped-ram files -----------------------------------------------
    /// The end of a region of a mapped-ram file (start + length) does not
    /// fit in a 64-bit file offset.
    #[error(
        "mapped-ram {region} at {start:#x} with length {len:#x} overflows a 64-bit file offset"
    )]
    RegionOverflow {
        /// The region: "header", "bitmap" or "pages".
        region: &'static str,
        /// Its start offset in the file.
        start: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// A region of a mapped-ram file starts before the region that must
    /// precede it has ended (they overlap or are out of order).
    #[error(
        "mapped-ram {region} at {start:#x} starts before the end of the {previous} at {previous_end:#x}"
    )]
    RegionOverlap {
        /// The region that starts too early.
        region: &'static str,
        /// Its start offset in the file.
        start: u64,
        /// The region it runs into.
        previous: &'static str,
        /// Where that region ends (exclusive).
        previous_end: u64,
    },
    /// A region of a mapped-ram file extends past the end of the file.
    #[error("mapped-ram {region} ends at {end:#x}, past the end of the file at {file_len:#x}")]
    RegionPastEof {
        /// The region: "header", "bitmap" or "pages".
        region: &'static str,
        /// Its end offset (exclusive).
        end: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A RAM block named by the stream does not exist here.
    #[error("unknown RAM block {name:?}")]
    UnknownRamBlock {
        /// The block id from the stream.
        name: String,
    },
    /// A RAM block of the stream has another length than the local one.
    #[error("RAM block {name:?} is {listed:#x} bytes in the stream but {local:#x} here")]
    RamBlockLengthMismatch {
        /// The block id.
        name: String,
        /// Its used_length in the stream.
        listed: u64,
        /// Its length here.
        local: u64,
    },
    /// A capability that must be on (or off) on both sides is not announced
    /// the same way by the stream's configuration section.
    #[error("capability {name:?} is {} here but {} in the stream", on_off(*.expected), on_off(!*.expected))]
    CapabilityMismatch {
        /// Capability name.
        name: &'static str,
        /// Whether this side has it on.
        expected: bool,
    },
}

/// "on" or "off".
fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}
