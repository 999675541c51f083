/* guest.S — vmreplica's test guest: a 512-byte x86 boot sector (GNU as).
 *
 * Booted by SeaBIOS from a disk (file, or NBD export behind virtio-blk), it
 *   1. prints "vmreplica test guest\r\n" to COM1 (port 0x3f8);
 *   2. writes TOTAL_WRITES sequence-stamped sectors to its boot disk (the BIOS
 *      drive number in DL at entry) with int 0x13 AH=0x43 (extended write),
 *      one sector per call: write number s = 1..TOTAL_WRITES goes to LBA
 *      BASE_LBA + (s - 1) % NSECT; every BATCH writes it prints "seq S\r\n"
 *      and waits DELAY_US microseconds (int 0x15 AH=0x86);
 *   3. prints "seq TOTAL_WRITES\r\ndone\r\n" and ends QEMU through the
 *      isa-debug-exit device at port 0xf4 (-device
 *      isa-debug-exit,iobase=0xf4,iosize=0x04): QEMU exits with status
 *      (EXIT_OK << 1) | 1 = 33.  On a disk error it prints "error N\r\n" (N =
 *      the BIOS status in AH) and exits with (EXIT_ERR << 1) | 1 = 65.
 *
 * Sector layout (little endian):
 *   0..7    "VRSEQ\0\0\0"
 *   8..11   u32 sequence number s (1-based)
 *   12..15  u32 LBA of this sector
 *   16..511 u32 s repeated (124 times)
 * So after a complete run, LBA BASE_LBA + i holds the largest
 * s <= TOTAL_WRITES with (s - 1) % NSECT == i.
 *
 * Parameters are assemble-time symbols; override with
 * `as --defsym TOTAL_WRITES=500 …` (tests/guest/meson.build passes them).
 * They are also recorded in a parameter block at offset 0x1e0 of the sector
 * so that tests can read them back from the image:
 *   0x1e0 "VRGP", then u32 TOTAL_WRITES, BASE_LBA, NSECT, BATCH, DELAY_US.
 *
 * Build:  as --32 -o guest.o guest.S
 *         ld -m elf_i386 --oformat binary -Ttext 0x7c00 -e _start \
 *            -o guest.img guest.o
 */

        .ifndef TOTAL_WRITES
        .set    TOTAL_WRITES, 1024      /* sectors written in all */
        .endif
        .ifndef BASE_LBA
        .set    BASE_LBA, 64            /* first sector written */
        .endif
        .ifndef NSECT
        .set    NSECT, 256              /* sectors cycled over */
        .endif
        .ifndef BATCH
        .set    BATCH, 16               /* writes between "seq" lines */
        .endif
        .ifndef DELAY_US
        .set    DELAY_US, 40000         /* pause after each batch */
        .endif
        .ifndef EXIT_OK
        .set    EXIT_OK, 0x10           /* QEMU exit status 33 */
        .endif
        .ifndef EXIT_ERR
        .set    EXIT_ERR, 0x20          /* QEMU exit status 65 */
        .endif

        .set    BUF, 0x8000             /* sector buffer (after us) */
        .set    COM1, 0x3f8
        .set    EXIT_PORT, 0xf4

        .code16
        .text
        .globl  _start
_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7c00, %sp
        ljmp    $0, $start2             /* CS:IP = 0:7c.. whatever the BIOS */
start2:
        sti
        cld
        movb    %dl, boot_drive

        /* COM1: no interrupts, 115200 8N1. */
        movw    $COM1 + 1, %dx
        xorb    %al, %al
        outb    %al, %dx                /* IER = 0 */
        movw    $COM1 + 3, %dx
        movb    $0x80, %al
        outb    %al, %dx                /* LCR: DLAB */
        movw    $COM1, %dx
        movb    $1, %al
        outb    %al, %dx                /* divisor low = 1 */
        incw    %dx
        xorb    %al, %al
        outb    %al, %dx                /* divisor high = 0 */
        movw    $COM1 + 3, %dx
        movb    $3, %al
        outb    %al, %dx                /* LCR: 8N1 */

        movw    $banner, %si
        call    puts

write_loop:
        /* Fill the buffer: magic, seq, LBA, then seq repeated. */
        movw    $BUF, %di
        movl    $0x45535256, %eax       /* "VRSE" */
        stosl
        movl    $0x00000051, %eax       /* "Q\0\0\0" */
        stosl
        movl    seq, %eax
        stosl
        movl    dap_lba, %eax
        stosl
        movl    seq, %eax
        movw    $124, %cx
        rep stosl

        movw    $0x4300, %ax            /* extended write, no verify */
        movb    boot_drive, %dl
        movw    $dap, %si
        int     $0x13
        jc      disk_error

        /* Next LBA, cycling over NSECT sectors. */
        movl    dap_lba, %eax
        incl    %eax
        cmpl    $BASE_LBA + NSECT, %eax
        jb      1f
        movl    $BASE_LBA, %eax
1:      movl    %eax, dap_lba

        movl    seq, %eax
        cmpl    $TOTAL_WRITES, %eax
        jae     finished
        xorl    %edx, %edx
        movl    $BATCH, %ebx
        divl    %ebx
        testl   %edx, %edx
        jnz     2f
        call    report
        .if DELAY_US
        movw    $(DELAY_US >> 16), %cx
        movw    $(DELAY_US & 0xffff), %dx
        movb    $0x86, %ah
        int     $0x15                   /* wait CX:DX microseconds */
        .endif
2:      incl    seq
        jmp     write_loop

finished:
        call    report
        movw    $done_msg, %si
        call    puts
        movb    $EXIT_OK, %al
        jmp     quit

disk_error:
        movzbl  %ah, %ebx
        movw    $error_msg, %si
        call    puts
        movl    %ebx, %eax
        call    putdec
        movw    $crlf, %si
        call    puts
        movb    $EXIT_ERR, %al
quit:
        outb    %al, $EXIT_PORT         /* QEMU exits here */
hang:
        cli
        hlt
        jmp     hang

/* report: print "seq S\r\n". */
report:
        movw    $seq_msg, %si
        call    puts
        movl    seq, %eax
        call    putdec
        movw    $crlf, %si
        jmp     puts

/* putdec: print EAX in decimal.  Clobbers EAX, ECX, EDX. */
putdec:
        pushl   %ebx
        movl    $10, %ebx
        xorw    %cx, %cx
1:      xorl    %edx, %edx
        divl    %ebx
        pushw   %dx
        incw    %cx
        testl   %eax, %eax
        jnz     1b
2:      popw    %ax
        addb    $'0', %al
        call    putc
        loop    2b
        popl    %ebx
        ret

/* puts: print the NUL-terminated string at DS:SI. */
puts:
        lodsb
        testb   %al, %al
        jz      1f
        call    putc
        jmp     puts
1:      ret

/* putc: print AL to COM1, waiting (bounded) for the transmitter. */
putc:
        pushw   %cx
        pushw   %dx
        pushw   %ax
        movw    $COM1 + 5, %dx
        movw    $0xffff, %cx
1:      inb     %dx, %al
        testb   $0x20, %al
        loopz   1b
        popw    %ax
        movw    $COM1, %dx
        outb    %al, %dx
        popw    %dx
        popw    %cx
        ret

banner:         .asciz  "vmreplica test guest\r\n"
seq_msg:        .asciz  "seq "
done_msg:       .asciz  "done\r\n"
error_msg:      .asciz  "error "
crlf:           .asciz  "\r\n"
boot_drive:     .byte   0x80

        .balign 4
seq:            .long   1
/* Disk address packet for int 0x13 AH=0x43. */
dap:            .byte   0x10, 0         /* size, reserved */
                .word   1               /* sectors */
                .word   BUF, 0          /* buffer offset, segment */
dap_lba:        .long   BASE_LBA, 0     /* LBA (64 bits) */

        /* Parameter block (an error here means the code grew too big). */
        .org    0x1e0
        .ascii  "VRGP"
        .long   TOTAL_WRITES, BASE_LBA, NSECT, BATCH, DELAY_US

        .org    0x1fe
        .byte   0x55, 0xaa
