let n: int = "not an int"
echo n
