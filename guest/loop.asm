; loop.asm: a 512-byte boot sector for the live-guest migration tests.
;
;   nasm -f bin guest/loop.asm -o boot.img [-DSTART=0x1000000 -DEND=0x3000000 -DMARKER=0x2e]
;
; It enters 32-bit protected mode (flat 4 GiB segments, A20 on) so it can
; reach RAM above 1 MiB, then loops forever: each pass increments byte 0 of
; every 4 KiB page in [START, END) in ascending order (8-bit counters that
; wrap), then writes MARKER to the first serial port (0x3f8). A copy of the
; RAM taken while the vCPU is stopped therefore has every counter equal, or
; a prefix of the pages one ahead of the rest (the pass in progress); the
; other bytes of those pages stay zero. The checker is
; crates/multifd-cli/tests/common/checker.rs.
;
; Without a BIOS (examples/vmm) the sector is loaded at 0x7c00 and either
; run from `start` in real mode, or entered at `pm32` in protected mode
; through the trailer at byte 502.
;
; Defaults: 16 MiB .. 48 MiB of guest-physical memory (8192 pages), which
; fits a 64 MiB+ guest below the PCI hole of q35 / pc.

%ifndef START
%define START 0x01000000
%endif
%ifndef END
%define END 0x03000000
%endif
%ifndef MARKER
%define MARKER 0x2e                     ; '.'
%endif

%if (START % 4096) || (END % 4096) || (END <= START)
%error "START and END must be page aligned, START < END"
%endif

        bits 16
        org 0x7c00

start:
        cli
        cld
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7c00
        jmp 0x0000:.flat                ; CS = 0 whatever the BIOS jumped with
.flat:
        ; A20 on through the "fast A20" port (bit 1), without a reset (bit 0).
        in al, 0x92
        or al, 0x02
        and al, 0xfe
        out 0x92, al

        lgdt [gdt_desc]
        mov eax, cr0
        or eax, 1                       ; PE
        mov cr0, eax
        jmp 0x08:pm32                   ; load the 32-bit code segment

        bits 32
pm32:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        mov ss, ax
        mov esp, 0x7c00
        mov dx, 0x3f8                   ; COM1 data register

pass:
        mov edi, START
.page:
        inc byte [edi]
        add edi, 4096
        cmp edi, END
        jb .page
        mov al, MARKER
        out dx, al                      ; one marker per completed pass
        jmp pass

        align 8
gdt:
        dq 0                            ; null descriptor
        dq 0x00cf9a000000ffff           ; 0x08: code, base 0, limit 4 GiB, 32-bit
        dq 0x00cf92000000ffff           ; 0x10: data, base 0, limit 4 GiB
gdt_desc:
        dw gdt_desc - gdt - 1
        dd gdt

        ; Trailer for a VMM without a BIOS (examples/vmm): "PM32" and the
        ; 32-bit entry point, so it can start the vCPU at pm32 in protected
        ; mode (flat code 0x08 / data 0x10 as in gdt above). A BIOS never
        ; reads these bytes; the program is the same either way.
        times 502 - ($ - $$) db 0
        db "PM32"
        dd pm32
        dw 0xaa55
