; Linux x86-64, no libc: read a line, print twice its number, the arguments, then exit 3.
        global  _start

        section .bss
inbuf:  resb    64
outbuf: resb    32

        section .rodata
errmsg: db      "conformance-stderr", 10
errlen  equ     $ - errmsg
nl:     db      10

        section .text
_start:
        mov     r15, rsp                ; [r15] = argc, [r15+8] = argv[0], ...

        xor     eax, eax                ; read(0, inbuf, 64)
        xor     edi, edi
        lea     rsi, [rel inbuf]
        mov     edx, 64
        syscall

        xor     eax, eax                ; parse a non-negative decimal number
        lea     rsi, [rel inbuf]
.parse: movzx   ecx, byte [rsi]
        sub     ecx, '0'
        cmp     ecx, 9
        ja      .parsed
        imul    rax, rax, 10
        add     rax, rcx
        inc     rsi
        jmp     .parse
.parsed:
        add     rax, rax

        lea     rdi, [rel outbuf + 31]  ; format backwards, newline last
        mov     byte [rdi], 10
        mov     ecx, 10
.digit: xor     edx, edx
        div     rcx
        add     dl, '0'
        dec     rdi
        mov     [rdi], dl
        test    rax, rax
        jnz     .digit
        lea     rdx, [rel outbuf + 32]
        sub     rdx, rdi
        mov     rsi, rdi
        mov     eax, 1                  ; write(1, digits, len)
        mov     edi, 1
        syscall

        mov     r12, 1                  ; each argument on its own line
.args:  cmp     r12, [r15]
        jae     .done
        mov     rsi, [r15 + 8 + r12*8]
        xor     edx, edx
.len:   cmp     byte [rsi + rdx], 0
        je      .print
        inc     rdx
        jmp     .len
.print: mov     eax, 1
        mov     edi, 1
        syscall
        mov     eax, 1
        mov     edi, 1
        lea     rsi, [rel nl]
        mov     edx, 1
        syscall
        inc     r12
        jmp     .args

.done:  mov     eax, 1                  ; write(2, errmsg, errlen)
        mov     edi, 2
        lea     rsi, [rel errmsg]
        mov     edx, errlen
        syscall

        mov     eax, 60                 ; exit(3)
        mov     edi, 3
        syscall
