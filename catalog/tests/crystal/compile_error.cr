n : Int32 = "not an int"
puts n
