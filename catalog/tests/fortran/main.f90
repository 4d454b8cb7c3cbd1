program main
  implicit none
  integer :: n, i, length
  character(len=4096) :: arg
  read (*, *) n
  print '(I0)', n * 2
  do i = 1, command_argument_count()
    call get_command_argument(i, arg, length)
    print '(A)', arg(1:length)
  end do
  write (0, '(A)') 'conformance-stderr'
  call exit(3)
end program main
