program Main;
var
  n: Int64;
  i: Integer;
begin
  ReadLn(n);
  WriteLn(n * 2);
  for i := 1 to ParamCount do
    WriteLn(ParamStr(i));
  WriteLn(StdErr, 'conformance-stderr');
  Halt(3);
end.
