with Ada.Text_IO; use Ada.Text_IO;
with Ada.Command_Line; use Ada.Command_Line;

procedure Main is
   N : constant Long_Integer := Long_Integer'Value (Get_Line);
begin
   Put_Line (Long_Integer'Image (N * 2) (2 .. Long_Integer'Image (N * 2)'Last));
   for I in 1 .. Argument_Count loop
      Put_Line (Argument (I));
   end loop;
   Put_Line (Standard_Error, "conformance-stderr");
   Set_Exit_Status (3);
end Main;
