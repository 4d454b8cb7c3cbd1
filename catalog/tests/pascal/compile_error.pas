program Main;
var
  n: Integer;
begin
  n := 'not an integer';
  WriteLn(n);
end.
