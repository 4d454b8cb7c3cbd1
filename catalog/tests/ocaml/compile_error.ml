let () = print_endline (1 + "not an int")
