module main;
  initial begin
    $display("unterminated)
  end
endmodule
