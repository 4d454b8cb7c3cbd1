// Reads a number from stdin, prints it doubled, a line on stderr, and finishes with exit code 3.
// Verilog programs get no argv: arguments are plusargs, so they are not checked here.
module main;
  integer n, r, stdin, stderr;
  initial begin
    stdin = 32'h8000_0000;
    stderr = 32'h8000_0002;
    r = $fscanf(stdin, "%d", n);
    $display("%0d", n * 2);
    $fdisplay(stderr, "conformance-stderr");
    $finish_and_return(3);
  end
endmodule
