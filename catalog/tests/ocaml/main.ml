let () =
  let n = int_of_string (String.trim (input_line stdin)) in
  print_endline (string_of_int (n * 2));
  Array.iteri (fun i a -> if i > 0 then print_endline a) Sys.argv;
  prerr_endline "conformance-stderr";
  exit 3
