void main()
{
    int n = "not an int";
}
