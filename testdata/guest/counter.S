# The `counter` test guest of vmsnap's VMM (x86-64, long mode, GNU as, Intel syntax).
#
# Loaded at guest-physical 0x10000, identity mapped. The VMM builds the GDT, IDT, TSS and page
# tables (src/vmm/guest/) and enters `kernel_entry` on vCPU 0 and `ap_entry` on the others in
# 64-bit kernel mode. Kernel-mode code is kept tiny (kvm_pvm emulates it one instruction at a
# time); everything else runs in user mode (CPL 3, IOPL 3, TSS I/O bitmap all zero).
#
# Optional memory dirtying: at each handled tick the user loop also stores one qword into each
# of `dirty_per_tick` pages, cycling through a RAM area above the fixed layout; the VMM writes
# these parameters (0xc38..0xc48) before start (`vmsnap run --dirty-rate MIB`).
#
# Rebuild: testdata/guest/build.sh (writes counter.bin next to this file).
#
# Linked at 0x10000. The layout (offsets from the load address) is fixed by the `.org` lines below and mirrored
# in src/vmm/guest/counter.rs.
        .intel_syntax noprefix
        .code64
        .text
        .set BASE,          0x10000
        .set KSTACK_BSP,    0x70000     # per-vCPU kernel stacks, 0x1000 each, downwards
        .set USTACK_BSP,    0x80000     # per-vCPU user stacks, 0x1000 each, downwards
        .set REGION,        0x100000    # RAM region rewritten from the tick count
        .set REGION_QWORDS, 8192        # 64 KiB
        .set DMA_BUF,       0x90000     # one-sector bounce buffer for the disk
        .set USER_CS,       0x1b        # GDT entry 3, RPL 3
        .set USER_SS,       0x23        # GDT entry 4, RPL 3
        .set COM1,          0x3f8
        .set BLK,           0x500       # paravirtual block device (src/vmm/devices/pvblock.rs)
        .set CTRL,          0x600       # test control device (src/vmm/devices/control.rs)
        .set REC_MAGIC,     0x524e54434b434954  # "TICKCTNR" little-endian
        .set RECORD_EVERY,  4           # write the disk record every 4 ticks
        .set CHECK_EVERY,   64          # periodic self-check

        .globl kernel_entry
        .org 0x0
# ---- kernel part --------------------------------------------------------------------------
# vCPU 0 entry: program PIC and PIT, then drop to user mode.
kernel_entry:
        # 8259A master: ICW1 edge+ICW4, ICW2 vector base 0x20, ICW3 slave on IR2, ICW4 8086 mode
        mov al, 0x11
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x04
        out 0x21, al
        mov al, 0x01
        out 0x21, al
        mov al, 0xfe            # unmask IRQ0 only
        out 0x21, al
        # 8254 channel 0, lobyte/hibyte, mode 2 (rate generator), 100 Hz (1193182 / 11932)
        mov al, 0x34
        out 0x43, al
        mov al, 0x9c
        out 0x40, al
        mov al, 0x2e
        out 0x40, al
        # disk 0 present? (an unclaimed port reads all ones)
        mov dx, BLK + 20
        in eax, dx
        inc eax
        setnz byte ptr [has_disk]
        # iretq frame: SS, RSP, RFLAGS (IF | IOPL 3), CS, RIP
        push USER_SS
        push USTACK_BSP
        push 0x3202
        push USER_CS
        push OFFSET user_main
        iretq

        .org 0x80
# Other vCPUs: straight to user mode; rdi = vCPU index (set by the VMM), rsi = its user stack.
ap_entry:
        push USER_SS
        push rsi
        push 0x3202
        push USER_CS
        push OFFSET ap_main
        iretq

        .org 0x100
# IRQ0 (vector 0x20): count the tick, EOI to the PIC.
timer_isr:
        push rax
        inc qword ptr [ticks]
        mov al, 0x20
        out 0x20, al
        pop rax
        iretq

        .org 0x140
# Every other vector: count it, and stop the machine with a marker the VMM recognises.
other_isr:
        inc qword ptr [faults]
        mov dx, CTRL + 1
        mov al, 0xee
        out dx, al
        hlt
        jmp other_isr

# ---- user part ----------------------------------------------------------------------------
        .org 0x200
user_main:
        mov rax, [ticks]
        cmp rax, [last]
        jne 1f
        mov dx, CTRL + 2                # idle: the VMM holds this read for up to 1 ms
        in al, dx
        jmp user_main
1:      mov rbx, [last]                 # handle the ticks one by one: two interrupts within
        inc rbx                         # one round (a vCPU preempted on a busy host) give two
        mov [last], rbx                 # rounds, so every tick is printed; rbx = N
        lea rsi, [rip + msg_tick]
        call puts
        mov rax, rbx
        call putdec
        mov al, 10
        call putc
        # check when the VMM asks (CTRL reads 1) or every CHECK_EVERY ticks
        mov dx, CTRL
        in al, dx
        test al, al
        jnz 2f
        test rbx, CHECK_EVERY - 1
        jnz 3f
2:      call check
3:      # rewrite the RAM region from N
        mov rax, rbx
        call fill
        mov [filled], rbx
        call dirty
        # every RECORD_EVERY ticks write the record {magic, N, ~N} to sector 1 of disk 0
        test rbx, RECORD_EVERY - 1
        jnz user_main
        cmp byte ptr [has_disk], 0
        je user_main
        mov rdi, DMA_BUF
        mov rax, REC_MAGIC
        mov [rdi], rax
        mov [rdi + 8], rbx
        mov rax, rbx
        not rax
        mov [rdi + 16], rax
        mov eax, 2                      # command 2 = write
        call blk_io
        test eax, eax
        jnz 4f
        mov [disk_n], rbx
        jmp user_main
4:      lea rsi, [rip + msg_ioerr]
        call puts
        jmp user_main

# fill: region qword i = rax + i
fill:
        mov rdi, REGION
        xor ecx, ecx
1:      lea rdx, [rax + rcx]
        mov [rdi + rcx * 8], rdx
        inc rcx
        cmp rcx, REGION_QWORDS
        jb 1b
        ret

# dirty: store N (rbx) into the first `dirty_qwords` qwords of `dirty_per_tick` pages, cycling
# page by page through [dirty_start, dirty_end) (parameters the VMM writes before start; 0 pages = off).
# One call per handled tick, so ticks lost while the vCPU is throttled are not made up.
dirty:
        mov rcx, [dirty_per_tick]
        test rcx, rcx
        jz 3f
        add [dirty_total], rcx
        mov rdi, [dirty_cursor]
        mov r8, [dirty_start]
        mov r9, [dirty_end]
1:      cmp rdi, r8
        jb 2f
        cmp rdi, r9
        jb 4f
2:      mov rdi, r8
4:      mov r10, [dirty_qwords]         # qwords stored per page (0 counts as 1)
        test r10, r10
        jnz 5f
        inc r10
5:      mov [rdi + r10 * 8 - 8], rbx
        dec r10
        jnz 5b
        add rdi, 0x1000
        dec rcx
        jnz 1b
        mov [dirty_cursor], rdi
3:      ret

# check: region agrees with `filled`, sector 1 agrees with `disk_n`; prints CHECK OK/FAIL.
check:
        mov rax, [filled]
        mov rdi, REGION
        xor ecx, ecx
1:      lea rdx, [rax + rcx]
        cmp [rdi + rcx * 8], rdx
        jne 8f
        inc rcx
        cmp rcx, REGION_QWORDS
        jb 1b
        mov rdx, [disk_n]
        test rdx, rdx                   # nothing written yet: nothing to compare
        jz 7f
        mov rdi, DMA_BUF
        mov qword ptr [rdi], 0
        mov qword ptr [rdi + 8], 0
        mov eax, 1                      # command 1 = read
        call blk_io
        test eax, eax
        jnz 8f
        mov rdi, DMA_BUF
        mov rax, REC_MAGIC
        cmp [rdi], rax
        jne 8f
        mov rdx, [disk_n]
        cmp [rdi + 8], rdx
        jne 8f
        not rdx
        cmp [rdi + 16], rdx
        jne 8f
7:      lea rsi, [rip + msg_ok]
        jmp puts
8:      inc qword ptr [check_fails]
        lea rsi, [rip + msg_fail]
        jmp puts

# blk_io: eax = command (1 read, 2 write) of sector 1 to/from DMA_BUF; returns status in eax.
blk_io:
        mov ecx, eax
        mov dx, BLK
        mov eax, 1                      # sector (low 32 bits)
        out dx, eax
        mov dx, BLK + 4
        xor eax, eax                    # sector (high 32 bits)
        out dx, eax
        mov dx, BLK + 8
        mov eax, DMA_BUF                # buffer guest-physical address
        out dx, eax
        mov dx, BLK + 12
        mov eax, 1                      # sector count
        out dx, eax
        mov dx, BLK + 16
        mov eax, ecx                    # command; the device completes it synchronously
        out dx, eax
        in eax, dx                      # status: 0 = ok
        ret

# puts: NUL-terminated string at rsi
puts:
1:      mov al, [rsi]
        test al, al
        jz 2f
        call putc
        inc rsi
        jmp 1b
2:      ret

putc:
        mov dx, COM1
        out dx, al
        ret

# putdec: rax in decimal
putdec:
        mov rcx, rsp
        sub rsp, 32
        mov r8, 10
1:      xor edx, edx
        div r8
        add dl, '0'
        dec rcx
        mov [rcx], dl
        test rax, rax
        jnz 1b
2:      mov al, [rcx]
        mov dx, COM1
        out dx, al
        inc rcx
        lea rdx, [rsp + 32]
        cmp rcx, rdx
        jb 2b
        add rsp, 32
        ret

# Other vCPUs: bump a per-vCPU counter in RAM forever (the state lives in registers and RAM),
# idling about 1 ms between bumps.
ap_main:
        lea r9, [ap_counters]
        mov dx, CTRL + 2
1:      inc qword ptr [r9 + rdi * 8]
        in al, dx
        jmp 1b

msg_tick:  .asciz "tick "
msg_ok:    .asciz "CHECK OK\n"
msg_fail:  .asciz "CHECK FAIL\n"
msg_ioerr: .asciz "DISK ERROR\n"

# ---- data ---------------------------------------------------------------------------------
        .org 0xc00
ticks:        .quad 0           # 0xc00 incremented by the timer interrupt
last:         .quad 0           # 0xc08 last tick the user loop handled
filled:       .quad 0           # 0xc10 value the RAM region was last filled from
disk_n:       .quad 0           # 0xc18 N of the last record written to disk
faults:       .quad 0           # 0xc20 unexpected exceptions
check_fails:  .quad 0           # 0xc28 failed checks
has_disk:     .byte 0           # 0xc30 1 if disk 0 answered at boot
        .org 0xc38
dirty_per_tick: .quad 0         # 0xc38 pages to dirty per handled tick (written by the VMM)
dirty_start:  .quad 0           # 0xc40 first page of the dirtied area (written by the VMM)
dirty_end:    .quad 0           # 0xc48 end of the dirtied area (written by the VMM)
dirty_cursor: .quad 0           # 0xc50 next page to dirty
dirty_total:  .quad 0           # 0xc58 pages dirtied so far
dirty_qwords: .quad 0           # 0xc60 qwords stored from the start of each dirtied page (0 = 1; written by the VMM)
        .org 0xd00
ap_counters:  .fill 32, 8, 0    # 0xd00 one counter per vCPU
        .org 0x1000
