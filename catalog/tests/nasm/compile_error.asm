        global  _start
        section .text
_start:
        mov     eax, 60
        movq    rdi, no_such_symbol_here
        bogus_instruction rdi
        syscall
