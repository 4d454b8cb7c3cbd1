(* Run with `poly --script main.sml`: CommandLine.arguments () begins with "--script" "main.sml". *)
fun programArgs ("--script" :: _ :: rest) = rest
  | programArgs args = args;

val n = case TextIO.inputLine TextIO.stdIn of
            SOME line => valOf (Int.fromString line)
          | NONE => 0;
val () = print (Int.toString (n * 2) ^ "\n");
val () = app (fn a => print (a ^ "\n")) (programArgs (CommandLine.arguments ()));
val () = TextIO.output (TextIO.stdErr, "conformance-stderr\n");
val () = TextIO.flushOut TextIO.stdOut;
val _ = Posix.Process.exit 0w3;
