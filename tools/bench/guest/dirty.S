# A tiny QEMU guest for the live-migration benchmark: dirties guest RAM at a given rate, the
# way vmsnap's counter guest does with `--dirty-rate` (testdata/guest/counter.S), so that QEMU
# and vmsnap migrate the same amount of dirty memory.
#
# Multiboot (v1) ELF for `qemu-system-x86_64 -kernel dirty.elf -append RATE_MIB_PER_S[,SPAN]`.
# Runs in 32-bit protected mode without paging. It programs the PIC and the PIT (100 Hz), and at
# each handled timer tick stores the tick number into the first SPAN bytes (default 4, rounded
# down to dwords, at most 4096) of ceil(RATE * 256 / 100) pages, cycling page by page through
# all RAM from 2 MiB to the end of low memory that the multiboot information reports. Ticks missed while the vCPU does not run are not made up.
#
# Rebuild: tools/bench/guest/build.sh (writes dirty.elf next to this file).
        .intel_syntax noprefix
        .code32
        .set MB_MAGIC,      0x1badb002
        .set MB_FLAGS,      0
        .set AREA_START,    0x200000
        .set CODE_SEL,      0x08
        .set DATA_SEL,      0x10

        .section .text
        .globl _start
        .align 4
mb_header:
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

_start:
        cli
        lgdt [gdt_desc]
        ljmp CODE_SEL, offset 1f
1:      mov ax, DATA_SEL
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov esp, offset stack_top

        # command line (multiboot info flag bit 2): RATE[,SPAN], decimal
        xor eax, eax
        xor edi, edi                    # 1 once the comma was read
        test dword ptr [ebx], 4
        jz 3f
        mov esi, [ebx + 16]
2:      movzx ecx, byte ptr [esi]
        inc esi
        test ecx, ecx
        jz 3f
        cmp ecx, ','
        jne 1f
        mov [per_tick], eax             # the rate, until it turns into pages per tick
        xor eax, eax
        mov edi, 1
        jmp 2b
1:      sub ecx, '0'
        cmp ecx, 9
        ja 2b
        imul eax, eax, 10
        add eax, ecx
        jmp 2b
3:      test edi, edi
        jz 9f
        # span: bytes stored per page, in dwords from 1 to 1024
        shr eax, 2
        jnz 1f
        inc eax
1:      cmp eax, 1024
        jbe 1f
        mov eax, 1024
1:      mov [span], eax
        mov eax, [per_tick]
9:      # pages per tick = ceil(rate * 256 / 100)
        imul eax, eax, 256
        add eax, 99
        xor edx, edx
        mov ecx, 100
        div ecx
        mov [per_tick], eax

        # end of the area: 1 MiB + mem_upper KiB (multiboot info flag bit 0), else 64 MiB
        mov eax, 0x4000000
        test dword ptr [ebx], 1
        jz 4f
        mov eax, [ebx + 8]
        shl eax, 10
        add eax, 0x100000
4:      and eax, 0xfffff000
        mov [area_end], eax
        mov dword ptr [cursor], AREA_START

        # IDT: every vector to `ignore`, vector 0x20 to `timer`
        mov edi, offset idt
        xor ecx, ecx
5:      mov eax, offset ignore
        cmp ecx, 0x20
        jne 6f
        mov eax, offset timer
6:      mov [edi], ax                   # offset 15:0
        mov word ptr [edi + 2], CODE_SEL
        mov word ptr [edi + 4], 0x8e00  # present, DPL 0, 32-bit interrupt gate
        shr eax, 16
        mov [edi + 6], ax               # offset 31:16
        add edi, 8
        inc ecx
        cmp ecx, 256
        jb 5b
        lidt [idt_desc]

        # 8259A master: vector base 0x20, only IRQ0 unmasked; slave masked
        mov al, 0x11
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x04
        out 0x21, al
        mov al, 0x01
        out 0x21, al
        mov al, 0xfe
        out 0x21, al
        mov al, 0xff
        out 0xa1, al
        # 8254 channel 0, mode 2, 100 Hz (1193182 / 11932)
        mov al, 0x34
        out 0x43, al
        mov al, 0x9c
        out 0x40, al
        mov al, 0x2e
        out 0x40, al
        sti

main:
        hlt
        mov eax, [ticks]
        cmp eax, [last]
        je main
        mov [last], eax
        mov ecx, [per_tick]
        test ecx, ecx
        jz main
        mov edi, [cursor]
        mov edx, [area_end]
7:      cmp edi, edx
        jb 8f
        mov edi, AREA_START
8:      mov esi, [span]
1:      mov [edi + esi * 4 - 4], eax
        dec esi
        jnz 1b
        add edi, 0x1000
        dec ecx
        jnz 7b
        mov [cursor], edi
        jmp main

timer:
        push eax
        inc dword ptr [ticks]
        mov al, 0x20
        out 0x20, al
        pop eax
        iret

ignore:
        iret

        .section .data
        .align 8
gdt:
        .quad 0
        .quad 0x00cf9a000000ffff        # 0x08: flat 32-bit code
        .quad 0x00cf92000000ffff        # 0x10: flat data
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt
        .align 4
idt_desc:
        .word 256 * 8 - 1
        .long idt
ticks:    .long 0
last:     .long 0
per_tick: .long 0
area_end: .long 0
cursor:   .long 0
span:     .long 1                       # dwords stored from the start of each dirtied page

        .section .bss
        .align 16
idt:    .skip 256 * 8
        .skip 4096
stack_top:
