program main
  implicit none
  integer :: n
  n = 'not an integer'
  print *, n
end program main
