procedure Main is
   N : Integer := "not an integer";
begin
   null;
end Main;
